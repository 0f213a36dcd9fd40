"""Independent numpy references for the synthetic models (no ONNX, no server code).

Each synthetic graph is recomputed in float64 numpy from the same weight
arrays, for one unpadded sequence at a time (so a server that pads wrongly,
or pools padding, disagrees). The pooling rules are written again here from
models.md: mean over every token (task prefix and specials included), the
task instruction prefix, Matryoshka truncate-then-normalize, late-chunking
spans by character offsets, bge-m3 CLS dense, sparse max-per-id without
special ids and zero weights, ColBERT rows 1..n-1 normalized, and
``np.packbits(v > 0)`` for binary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .synthetic import (
    BOS_ID,
    EOS_ID,
    JINA_ADAPTERS,
    JINA_INSTRUCTIONS,
    PAD_ID,
    UNK_ID,
    Backbone,
    BgeM3Dir,
    JinaV3Dir,
    Linear,
    SentenceTransformersDir,
)

#: Contract Task enum value -> jina adapter name (TASK_UNSPECIFIED is retrieval.query).
TASK_ADAPTER = {
    0: "retrieval.query",
    1: "retrieval.query",
    2: "retrieval.passage",
    3: "separation",
    4: "classification",
    5: "text-matching",
}
DROPPED_SPARSE_IDS = {BOS_ID, PAD_ID, EOS_ID, UNK_ID}


def normalize(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- tokenization ----------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    special: list[bool]


class ReferenceTokenizer:
    """``tokenizers`` straight from the model's tokenizer.json, its padding/truncation off."""

    def __init__(self, model_dir: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    def encode(self, text: str) -> Encoded:
        e = self._tokenizer.encode(text)
        return Encoded(list(e.ids), list(e.tokens), list(e.offsets), [bool(s) for s in e.special_tokens_mask])

    def ids(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Token ids; with ``max_tokens``, cut to fit while keeping ``<s> ... </s>``."""
        ids = self.encode(text).ids
        if max_tokens is not None and len(ids) > max_tokens:
            ids = [*ids[: max_tokens - 1], EOS_ID]
        return ids


# --- the synthetic backbone, one unpadded sequence ------------------------------------


def backbone_states(weights: Backbone, ids: list[int], task: int | None = None) -> np.ndarray:
    """Token states [n,H] of one sequence (float64); ``task`` is the adapter index."""
    ids_array = np.asarray(ids)
    # XLM-R position ids: 2..n+1 for real tokens. A "<pad>" typed in the text
    # becomes id 1 and, as in XLM-R, is treated as padding by the position rule.
    real = ids_array != PAD_ID
    positions = np.cumsum(real) * real + PAD_ID
    x = weights.tokens[ids_array].astype(np.float64) + weights.positions[positions]
    if weights.token_types is not None:
        x = x + weights.token_types[0]
    if task is not None:
        assert weights.task_deltas is not None
        x = x + x @ weights.task_deltas[task].astype(np.float64)
    context = x.sum(axis=0, keepdims=True) / max(int(real.sum()), 1)  # attention mask: all ones
    return np.tanh(x @ weights.w_token + context @ weights.w_context + weights.bias)


def apply_linear(x: np.ndarray, head: Linear) -> np.ndarray:
    return x @ head.weight.astype(np.float64).T + head.bias


# --- jina-v3 ------------------------------------------------------------------------


class JinaV3Reference:
    """jina-v3 ``encode()`` for the synthetic model, per models.md."""

    def __init__(self, model: JinaV3Dir) -> None:
        self.model = model
        self.tokenizer = ReferenceTokenizer(model.path)

    @staticmethod
    def prefix(task: int) -> str:
        return JINA_INSTRUCTIONS[TASK_ADAPTER[task]]

    @staticmethod
    def adapter_index(task: int) -> int:
        return JINA_ADAPTERS.index(TASK_ADAPTER[task])

    def token_ids(self, text: str, task: int, max_tokens: int | None = None) -> list[int]:
        return self.tokenizer.ids(self.prefix(task) + text, max_tokens)

    def dense(
        self, text: str, task: int = 0, dimensions: int = 0, max_tokens: int | None = None
    ) -> np.ndarray:
        ids = self.token_ids(text, task, max_tokens)
        pooled = backbone_states(self.model.weights, ids, self.adapter_index(task)).mean(axis=0)
        return normalize(pooled[: dimensions or None])

    def late_chunks(self, chunks: list[str], task: int = 0, dimensions: int = 0) -> list[np.ndarray]:
        prefix = self.prefix(task)
        document = self.tokenizer.encode(prefix + " ".join(chunks))
        spans = late_chunk_spans(document, prefix, chunks)
        states = backbone_states(self.model.weights, document.ids, self.adapter_index(task))
        return [normalize(states[a:b].mean(axis=0)[: dimensions or None]) for a, b in spans]

    def document_length(self, chunks: list[str], task: int = 0) -> int:
        return len(self.tokenizer.encode(self.prefix(task) + " ".join(chunks)).ids)

    def long_late_chunks(
        self, chunks: list[str], task: int, dimensions: int, max_tokens: int, overlap: int
    ) -> tuple[list[np.ndarray], int]:
        """models.md "Late chunking beyond the window": the chunk vectors and the number of windows."""
        prefix = self.prefix(task)
        document = self.tokenizer.encode(prefix + " ".join(chunks))
        adapter = self.adapter_index(task)
        states = windowed_states(
            lambda ids: backbone_states(self.model.weights, ids, adapter), document.ids, max_tokens, overlap
        )
        spans = late_chunk_spans(document, prefix, chunks)
        vectors = [normalize(states.rows[a:b].mean(axis=0)[: dimensions or None]) for a, b in spans]
        return vectors, len(states.windows)


@dataclass(frozen=True)
class WindowedStates:
    rows: np.ndarray  # [N + 2, H]: H of models.md
    windows: list[tuple[int, int]]  # [s_k, e_k) over the content tokens


def windowed_states(
    run: Callable[[list[int]], np.ndarray], ids: list[int], max_tokens: int, overlap: int
) -> WindowedStates:
    """Each token's state from the one window that keeps it, each window run on its own.

    Written from the spec's rule per token (not from the server's code):
    window 0 keeps content [0, e_0) and its <s>; window k > 0 keeps
    [s_k + O, e_k); the last window gives </s>. ``run`` maps one sequence's
    ids to its token states; ``ids`` is ``<s> C </s>`` (``[CLS] C [SEP]`` for BERT).
    """
    bos, eos = ids[0], ids[-1]
    content = list(ids[1:-1])
    n = len(content)
    capacity = max_tokens - 2
    step_back = min(overlap, capacity // 2)
    windows = []
    start = 0
    while True:
        end = min(start + capacity, n)
        windows.append((start, end))
        if end == n:
            break
        start = end - step_back
    rows: list[np.ndarray | None] = [None] * (n + 2)
    for k, (start, end) in enumerate(windows):
        window_ids = [bos, *content[start:end], eos]
        assert len(window_ids) <= max_tokens
        h = run(window_ids)
        if k == 0:
            rows[0] = h[0]
        if k == len(windows) - 1:
            rows[n + 1] = h[-1]
        for t in range(start if k == 0 else start + step_back, end):
            assert rows[1 + t] is None, f"token {t} kept by two windows"
            rows[1 + t] = h[1 + (t - start)]
    assert all(row is not None for row in rows), "a token no window keeps"
    return WindowedStates(np.stack(rows), windows)  # type: ignore[arg-type]


def late_chunk_spans(document: Encoded, prefix: str, chunks: list[str]) -> list[tuple[int, int]]:
    """models.md: each ordinary token goes to the first chunk i with ``end <= e_i``."""
    ends = [len(prefix) + sum(len(c) + 1 for c in chunks[:i]) + len(chunks[i]) for i in range(len(chunks))]
    last = len(chunks) - 1
    owners = []
    final = len(document.ids) - 1
    for t, ((_, end), special) in enumerate(zip(document.offsets, document.special, strict=True)):
        if special and t in (0, final):
            owners.append(0 if t == 0 else last)  # <s> joins the first span, </s> the last
        else:  # ordinary tokens, and special tokens typed in the text, by their offsets
            owners.append(next((i for i, e in enumerate(ends) if end <= e), last))
    assert owners == sorted(owners), "token owners must not go back"
    spans = []
    for i in range(len(chunks)):
        members = [t for t, owner in enumerate(owners) if owner == i]
        assert members, f"chunk {i} has no token"
        spans.append((members[0], members[-1] + 1))
    return spans


# --- bge-m3 -------------------------------------------------------------------------


@dataclass
class BgeM3Vectors:
    dense: np.ndarray  # [H] normalized (or [d] with dimensions)
    sparse: dict[int, float]
    colbert: np.ndarray  # [n-1, H] rows normalized


class BgeM3Reference:
    """FlagEmbedding's bge-m3 outputs for the synthetic model, per models.md."""

    def __init__(self, model: BgeM3Dir) -> None:
        self.model = model
        self.tokenizer = ReferenceTokenizer(model.path)

    def token_ids(self, text: str, max_tokens: int | None = None) -> list[int]:
        return self.tokenizer.ids(text, max_tokens)

    def encode(self, text: str, dimensions: int = 0, max_tokens: int | None = None) -> BgeM3Vectors:
        ids = self.token_ids(text, max_tokens)
        h = backbone_states(self.model.weights, ids)
        weights = np.maximum(apply_linear(h, self.model.sparse)[:, 0], 0.0)
        sparse: dict[int, float] = {}
        for token_id, weight in zip(ids, weights, strict=True):
            if token_id in DROPPED_SPARSE_IDS or weight <= 0:
                continue
            sparse[token_id] = max(sparse.get(token_id, 0.0), float(weight))
        colbert = apply_linear(h[1:], self.model.colbert)  # drops <s>, keeps </s>
        colbert = colbert / np.maximum(np.linalg.norm(colbert, axis=1, keepdims=True), 1e-12)
        return BgeM3Vectors(normalize(h[0][: dimensions or None]), dict(sorted(sparse.items())), colbert)

    def late_chunks(self, chunks: list[str], dimensions: int = 0) -> list[np.ndarray]:
        document = self.tokenizer.encode(" ".join(chunks))
        states = backbone_states(self.model.weights, document.ids)
        spans = late_chunk_spans(document, "", chunks)
        return [normalize(states[a:b].mean(axis=0)[: dimensions or None]) for a, b in spans]


# --- sentence-transformers ------------------------------------------------------------


class SentenceTransformersReference:
    def __init__(self, model: SentenceTransformersDir) -> None:
        self.model = model
        self.tokenizer = ReferenceTokenizer(model.path)

    def prefix(self, task: int) -> str:
        """The ``query`` / ``passage`` prompt for the two retrieval tasks, if the model has them."""
        name = {1: "query", 2: "passage"}.get(task)
        return (self.model.prompts or {}).get(name, "") if name else ""

    def dense(self, text: str, dimensions: int = 0, task: int = 0) -> np.ndarray:
        """Pooled, normalized only with a Normalize module or with ``dimensions``."""
        h = backbone_states(self.model.weights, self.tokenizer.ids(self.prefix(task) + text))
        pooled = h[0] if self.model.pooling == "cls" else h.mean(axis=0)
        if dimensions:
            return normalize(pooled[:dimensions])
        return normalize(pooled) if self.model.normalize else pooled


# --- comparing with the server ---------------------------------------------------------


def packed_sign_bits(v: np.ndarray) -> bytes:
    return np.packbits(np.asarray(v) > 0).tobytes()


def assert_binary_matches(bits: bytes, dimensions: int, reference: np.ndarray) -> None:
    """Server bits equal np.packbits(ref > 0), except where ref is within float noise of 0."""
    assert dimensions == reference.shape[0]
    assert len(bits) == (dimensions + 7) // 8
    got = np.unpackbits(np.frombuffer(bits, np.uint8))[:dimensions].astype(bool)
    expected = reference > 0
    assert np.all((got == expected) | (np.abs(reference) < 1e-5)), (got, expected)
    assert bytes(bits) == packed_sign_bits(np.where(got, 1.0, -1.0))  # pad bits are zero


class CosineLog:
    """Smallest cosine seen per label, so a run can report how close the server came."""

    def __init__(self) -> None:
        self.minimum: dict[str, float] = {}
        self.sparse_error: dict[str, float] = {}

    def check(self, label: str, actual: np.ndarray, expected: np.ndarray, threshold: float = 0.9999) -> float:
        actual = np.asarray(actual, np.float64)
        assert actual.shape == np.asarray(expected).shape, (label, actual.shape, np.asarray(expected).shape)
        value = cosine(actual, expected)
        self.minimum[label] = min(value, self.minimum.get(label, 1.0))
        assert value >= threshold, f"{label}: cosine {value:.6f} < {threshold}"
        return value

    def check_sparse(
        self, label: str, indices: list[int], values: list[float], expected: dict[int, float]
    ) -> None:
        """Exactly the expected token ids, ascending; weights within float32 noise."""
        assert list(indices) == list(expected), (label, list(indices), list(expected))
        want = np.array(list(expected.values()), np.float64)
        got = np.array(values, np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=label)
        error = float(np.abs(got - want).max()) if want.size else 0.0
        self.sparse_error[label] = max(error, self.sparse_error.get(label, 0.0))

    def report(self) -> str:
        cosines = [f"{label} 1-cos {1 - value:.1e}" for label, value in sorted(self.minimum.items())]
        sparse = [f"{label} max |dw| {value:.2e}" for label, value in sorted(self.sparse_error.items())]
        return ", ".join(cosines + sparse)


COSINES = CosineLog()
