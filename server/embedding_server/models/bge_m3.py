"""bge-m3: XLM-R with three outputs from one pass: dense (CLS), sparse, ColBERT.

Two ONNX exports occur. BAAI's backbone export returns ``token_embeddings``
and the sparse/ColBERT heads come from ``sparse_linear.pt`` and
``colbert_linear.pt`` (applied here in numpy). aapot's export already returns
``dense_vecs``, ``sparse_vecs`` (raw relu weights) and ``colbert_vecs``; the
per-id max and the dropped special ids are still applied here.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelLoadError
from .base import EmbeddingModel, RowRequest, as_float32, pooled_or_states
from .family import BGE_M3
from .limits import xlm_roberta_max_tokens
from .tokenization import TextTokenizer
from .torch_weights import load_state_dict
from .types import ModelDescription, Output, SequenceVectors, SparseWeights

TOKEN_STATE_OUTPUTS = ("token_embeddings", "last_hidden_state")
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>")


class Linear:
    """A torch nn.Linear's weights, applied in float32 numpy."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        self.weight_t = np.ascontiguousarray(weight.astype(np.float32).T)
        self.bias = bias.astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = x @ self.weight_t + self.bias
        return out


def load_linear(path: str) -> Linear:
    from pathlib import Path

    state = load_state_dict(Path(path))
    if "weight" not in state or "bias" not in state:
        raise ModelLoadError(
            f"{path}: expected a Linear state_dict with weight and bias, found {sorted(state)}"
        )
    return Linear(state["weight"], state["bias"])


class BgeM3Model(EmbeddingModel):
    family = BGE_M3

    def _configure(self) -> None:
        outputs = self.signature.outputs
        self._exported_heads = "dense_vecs" in outputs
        self._states = next((name for name in TOKEN_STATE_OUTPUTS if name in outputs), None)
        if not self._exported_heads and self._states is None:
            raise ModelLoadError(
                f"{self.files.onnx}: bge-m3 graph has neither token_embeddings nor dense_vecs outputs"
            )
        self._sparse_head = self._colbert_head = None
        if not self._exported_heads:
            if self.files.exists("sparse_linear.pt"):
                self._sparse_head = load_linear(str(self.files.path("sparse_linear.pt")))
            if self.files.exists("colbert_linear.pt"):
                self._colbert_head = load_linear(str(self.files.path("colbert_linear.pt")))

    def _load_tokenizer(self) -> TextTokenizer:
        tokenizer = TextTokenizer(self.files.path("tokenizer.json"), xlm_roberta_max_tokens(self.files))
        ids = (tokenizer.token_id(token) for token in SPECIAL_TOKENS)
        self._dropped_ids = np.array(sorted({i for i in ids if i is not None}), dtype=np.int64)
        return tokenizer

    def _describe(self) -> ModelDescription:
        shape = self.signature.outputs[
            self._states if self._states and not self._exported_heads else "dense_vecs"
        ]
        config = self.files.config("config.json") or {}
        assert isinstance(config, dict)
        width = shape[-1] if isinstance(shape[-1], int) else int(config.get("hidden_size", 1024))
        outputs = [Output.DENSE]
        if self._exported_heads or self._sparse_head:
            outputs.append(Output.SPARSE)
        if self._exported_heads or self._colbert_head:
            outputs.append(Output.COLBERT)
        outputs.append(Output.BINARY)
        return ModelDescription(
            name=self.name,
            family=self.family,
            dimensions=width,
            max_tokens=self.tokenizer.max_tokens,
            outputs=tuple(outputs),
        )

    @property
    def supports_late_chunking(self) -> bool:
        return self._states is not None

    def feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray, task: object) -> dict[str, np.ndarray]:
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @property
    def output_names(self) -> list[str]:
        heads = ["dense_vecs", "sparse_vecs", "colbert_vecs"] if self._exported_heads else []
        return heads + ([self._states] if self._states else [])  # no heads: _configure ensured states

    def token_states(self, outputs: dict[str, np.ndarray]) -> np.ndarray | None:
        return as_float32(outputs[self._states]) if self._states else None

    def postprocess(
        self,
        outputs: dict[str, np.ndarray],
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        rows: list[RowRequest],
    ) -> list[SequenceVectors]:
        states = self.token_states(outputs)
        if self._exported_heads:
            dense = as_float32(outputs["dense_vecs"])
        else:
            assert states is not None  # _configure refuses a graph with neither
            dense = states[:, 0]  # CLS
        results = pooled_or_states(states, dense, rows)
        for b, (row, vectors) in enumerate(zip(rows, results, strict=True)):
            if Output.SPARSE in row.outputs:  # never with late chunking (validation refuses it)
                vectors.sparse = self._sparse(outputs, states, input_ids[b], b, row.length)
            if Output.COLBERT in row.outputs:
                vectors.colbert = self._colbert(outputs, states, b, row.length)
        return results

    def _sparse(
        self, outputs: dict[str, np.ndarray], states: np.ndarray | None, ids: np.ndarray, b: int, n: int
    ) -> SparseWeights:
        if self._exported_heads:
            weights = as_float32(outputs["sparse_vecs"][b, :n, 0])
        else:
            # _describe offers SPARSE without exported heads only when sparse_linear.pt is loaded
            assert self._sparse_head is not None and states is not None
            weights = np.maximum(self._sparse_head(states[b, :n])[:, 0], 0.0)
        return sparse_max_per_id(ids[:n], weights, self._dropped_ids)

    def _colbert(
        self, outputs: dict[str, np.ndarray], states: np.ndarray | None, b: int, n: int
    ) -> np.ndarray:
        if self._exported_heads:
            vectors = as_float32(outputs["colbert_vecs"][b, : n - 1])
        else:
            # _describe offers COLBERT without exported heads only when colbert_linear.pt is loaded
            assert self._colbert_head is not None and states is not None
            vectors = self._colbert_head(states[b, 1:n])  # drops <s>, keeps </s>
        return vectors  # normalized by the finish step (engine/finish.py)


def sparse_max_per_id(ids: np.ndarray, weights: np.ndarray, dropped: np.ndarray) -> SparseWeights:
    """For each token id keep its largest weight; drop special ids and zero weights."""
    keep = (weights > 0) & ~np.isin(ids, dropped)
    ids, weights = ids[keep], weights[keep]
    if ids.size == 0:
        return SparseWeights(np.zeros(0, np.uint32), np.zeros(0, np.float32))
    unique, inverse = np.unique(ids, return_inverse=True)
    best = np.zeros(unique.size, np.float32)
    np.maximum.at(best, inverse, weights)
    return SparseWeights(unique.astype(np.uint32), best)
