"""How close a quantized graph's outputs are to the fp32 graph's, output by output.

Both graphs run through the family's own feeds and postprocess (what the
server serves): dense vectors per task (jina-v3: every task), ColBERT rows
(per-token cosine) and sparse weights (cosine of the id -> weight vectors,
i.e. weighted overlap).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from ..models.base import EmbeddingModel, RowRequest
from ..models.family import JINA_V3
from ..models.types import TASK_NAMES, Output, SequenceVectors, SparseWeights, Task

Runner = Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]
BATCH = 16


@dataclass(frozen=True)
class Floor:
    """The fidelity every output must keep: its lowest and its mean cosine to fp32."""

    min: float = 0.99
    mean: float = 0.995


@dataclass(frozen=True)
class OutputStats:
    count: int
    min: float
    p1: float
    mean: float

    def passes(self, floor: Floor) -> bool:
        return self.min >= floor.min and self.mean >= floor.mean


def stats(cosines: list[float]) -> OutputStats:
    values = np.asarray(cosines, dtype=np.float64)
    return OutputStats(
        int(values.size), float(values.min()), float(np.percentile(values, 1)), float(values.mean())
    )


def worst(outputs: dict[str, OutputStats], floor: Floor) -> tuple[str, OutputStats]:
    """The output furthest below (or nearest to) the floor."""
    return min(outputs.items(), key=lambda item: min(item[1].min - floor.min, item[1].mean - floor.mean))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    cosines: np.ndarray = (a * b).sum(-1)
    return cosines


def sparse_cosine(a: SparseWeights, b: SparseWeights) -> float:
    """Cosine of two id -> weight vectors (1.0 when both are empty)."""
    if a.ids.size == 0 and b.ids.size == 0:
        return 1.0
    ids = np.union1d(a.ids, b.ids)
    va, vb = np.zeros(ids.size), np.zeros(ids.size)
    va[np.searchsorted(ids, a.ids)] = a.weights
    vb[np.searchsorted(ids, b.ids)] = b.weights
    denominator = np.linalg.norm(va) * np.linalg.norm(vb)
    return float(va @ vb / denominator) if denominator > 0 else 0.0


def tasks_of(model: EmbeddingModel) -> list[Task]:
    """jina-v3: every task (each is a different LoRA); others: the plain task."""
    return list(model.description.tasks) if model.family == JINA_V3 else [Task.UNSPECIFIED]


def padded(model: EmbeddingModel, texts: list[str], task: Task) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Lengths, ids and mask of ``texts`` as the server pads them (the model's pad id, truncated)."""
    tokenized = model.tokenize(texts, task, truncate=True)
    lengths = [len(t) for t in tokenized]
    ids = np.full((len(tokenized), max(lengths)), model.tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, t in enumerate(tokenized):
        ids[row, : len(t)] = t
        mask[row, : len(t)] = 1
    return lengths, ids, mask


def vectors(model: EmbeddingModel, run: Runner, texts: list[str], task: Task) -> list[SequenceVectors]:
    """What the server computes for ``texts`` (truncated to the model's maximum), batch by batch."""
    wanted = frozenset(o for o in model.description.outputs if o != Output.BINARY)
    results: list[SequenceVectors] = []
    for start in range(0, len(texts), BATCH):
        lengths, ids, mask = padded(model, texts[start : start + BATCH], task)
        outputs = dict(
            zip(model.output_names, run(model.output_names, model.feeds(ids, mask, task)), strict=True)
        )
        rows = [RowRequest(length=length, outputs=wanted) for length in lengths]
        results += model.postprocess(outputs, ids, mask, rows)
    return results


def reference_vectors(
    model: EmbeddingModel, reference: Runner, texts: list[str]
) -> dict[Task, list[SequenceVectors]]:
    """The fp32 outputs for every task, computed once and compared with each candidate."""
    return {task: vectors(model, reference, texts, task) for task in tasks_of(model)}


def compare(
    model: EmbeddingModel, expected: dict[Task, list[SequenceVectors]], candidate: Runner, texts: list[str]
) -> dict[str, OutputStats]:
    """Per-output cosine statistics of ``candidate`` against the fp32 outputs ``expected`` for ``texts``."""
    cosines: dict[str, list[float]] = {}
    for task, wanted in expected.items():
        suffix = f"[{TASK_NAMES[task]}]" if task != Task.UNSPECIFIED else ""
        for ref, cand in zip(wanted, vectors(model, candidate, texts, task), strict=True):
            if ref.dense is not None and cand.dense is not None:
                cosines.setdefault(f"dense{suffix}", []).extend(cosine_rows(ref.dense, cand.dense).tolist())
            if ref.colbert is not None and cand.colbert is not None and len(ref.colbert):
                rows = cosine_rows(ref.colbert, cand.colbert).tolist()
                cosines.setdefault(f"colbert{suffix}", []).extend(rows)
            if ref.sparse is not None and cand.sparse is not None:
                cosines.setdefault(f"sparse{suffix}", []).append(sparse_cosine(ref.sparse, cand.sparse))
    return {name: stats(values) for name, values in cosines.items()}


def as_dict(outputs: dict[str, OutputStats]) -> dict[str, dict[str, float]]:
    return {name: asdict(value) for name, value in outputs.items()}
