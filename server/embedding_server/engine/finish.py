"""The finish step: what becomes of a request's vectors after its model run, decided here only.

A family's ``postprocess`` (models/*.py) turns one run's session outputs into raw
per-row results: the dense vector its pooling gives, sparse weights, ColBERT rows
before normalizing, or for a late-chunking window the token states it keeps.
Everything after that is the same for every family and lives here
(docs/models.md, "Common rules" and "Late chunking"):

- **dense**: Matryoshka ``dimensions`` keep the first components, **then**
  normalize. A full-size vector is normalized when the model normalizes (a
  sentence-transformers model without a Normalize module does not); a
  truncated vector and a late chunk's always are.
- **ColBERT** rows are normalized.
- **late chunking**: the kept token states of a document's windows are
  stitched into ``H`` (N + 2 rows) and each chunk's span is mean-pooled over it,
  then finished as a dense vector.
- **binary**: the sign bits of the finished dense vector, ``np.packbits(v > 0)``
  MSB first.

One rule set, two points in time: ``finish_batch`` for the rows of a run (a
query's on its run thread, in the same hop as the run; batch work's on the
batcher's finish thread), ``finish_document`` once every window of a
late-chunked document has run. What leaves here is final: the API layers
only convert it (grpc_api/convert.py).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from ..models.base import EmbeddingModel, RowRequest
from ..models.late_chunking import LateChunkedDocument
from ..models.pooling import normalize, span_means
from ..models.types import Output, PackedBits, SequenceVectors
from .work import PaddedBatch


def finish_batch(
    model: EmbeddingModel, outputs: dict[str, np.ndarray], padded: PaddedBatch, rows: list[RowRequest]
) -> list[SequenceVectors]:
    """Each row's final vectors from one run; a late-chunking window's states stay for its document.

    The dense vectors of rows asking for the same size are finished together (one normalize
    for the run, not one per row: numpy's per-call cost was most of the finish step's time);
    the rule is ``finish_row``'s, row for row.
    """
    results = model.postprocess(outputs, padded.input_ids, padded.attention_mask, rows)
    alike: dict[tuple[int, frozenset[Output]], list[SequenceVectors]] = {}
    for result, row in zip(results, rows, strict=True):
        if result.token_states is not None:
            continue
        if result.dense is None or result.dense.shape[0] != 1:
            finish_row(result, row.outputs, row.dimensions, model.normalizes)
            continue
        alike.setdefault((row.dimensions, row.outputs), []).append(result)
        if result.colbert is not None:  # finish_row's ColBERT rule; the dense rule runs per group below
            result.colbert = normalize(result.colbert)
    for (dimensions, wanted), members in alike.items():
        group = SequenceVectors(dense=np.concatenate([m.dense for m in members if m.dense is not None]))
        finish_row(group, wanted, dimensions, model.normalizes)
        assert group.dense is not None
        for k, member in enumerate(members):
            member.dense = group.dense[k : k + 1]
            if group.binary is not None:
                member.binary = PackedBits(group.binary.bits[k : k + 1], group.binary.dimensions)
    return results


def finish_row(
    vectors: SequenceVectors, outputs: Collection[Output], dimensions: int, normalize_full: bool
) -> None:
    """Finish one input's raw vectors in place (``normalize_full``: the model's own rule at full size)."""
    if vectors.dense is not None:
        vectors.dense = matryoshka(vectors.dense, dimensions, normalize_full)
        if Output.BINARY in outputs:
            vectors.binary = sign_bits(vectors.dense)
    if vectors.colbert is not None:
        vectors.colbert = normalize(vectors.colbert)


def finish_document(
    document: LateChunkedDocument,
    windows: list[SequenceVectors],
    dimensions: int,
    outputs: Collection[Output],
) -> list[SequenceVectors]:
    """One finished vector per chunk: v_i = normalize(mean(H[a_i:b_i])[:dim]), plus its sign bits."""
    kept: list[np.ndarray] = []
    for window in windows:
        assert window.token_states is not None  # a late-chunking window comes back unpooled
        kept.append(window.token_states)
    states = stitch(kept)
    if states.shape[0] != document.tokens:
        raise AssertionError(f"stitched {states.shape[0]} token states, the document has {document.tokens}")
    dense = matryoshka(span_means(states, document.spans), dimensions, True)
    bits = sign_bits(dense) if Output.BINARY in outputs else None
    return [
        SequenceVectors(
            dense=dense[i : i + 1],
            binary=PackedBits(bits.bits[i : i + 1], bits.dimensions) if bits is not None else None,
        )
        for i in range(dense.shape[0])
    ]


def stitch(kept_states: list[np.ndarray]) -> np.ndarray:
    """H: the kept token states of each window, in window order ([N + 2, H] float32)."""
    return kept_states[0] if len(kept_states) == 1 else np.concatenate(kept_states, axis=0)


def matryoshka(rows: np.ndarray, dimensions: int, normalize_rows: bool) -> np.ndarray:
    """Keep the first ``dimensions`` components (0: all), then normalize; a truncated vector always is."""
    if dimensions:
        rows = rows[..., :dimensions]
        normalize_rows = True
    return normalize(rows) if normalize_rows else rows


def sign_bits(rows: np.ndarray) -> PackedBits:
    """np.packbits(v > 0) per row, MSB first: [n, d] -> uint8 [n, ceil(d/8)]."""
    return PackedBits(np.packbits(rows > 0, axis=-1), int(rows.shape[-1]))
