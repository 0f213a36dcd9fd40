"""The finish step's rules (engine/finish.py) against plain numpy, without a model.

End to end, the family tests (test_default_model, test_bge_m3, test_jina_v3,
test_late_chunking_long) check the same rules through a server.
"""

from __future__ import annotations

import numpy as np
from embedding_server.engine.finish import finish_batch, finish_document, finish_row
from embedding_server.engine.work import PaddedBatch
from embedding_server.models.base import RowRequest
from embedding_server.models.late_chunking import LateChunkedDocument, Window
from embedding_server.models.types import Output, SequenceVectors

RNG = np.random.default_rng(3)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_full_size_dense_follows_the_model_and_truncation_always_normalizes() -> None:
    raw = RNG.standard_normal((1, 12)).astype(np.float32)
    kept = SequenceVectors(dense=raw.copy())
    finish_row(kept, {Output.DENSE}, 0, normalize_full=False)  # no Normalize module: as pooled
    np.testing.assert_array_equal(kept.dense, raw)
    normalized = SequenceVectors(dense=raw.copy())
    finish_row(normalized, {Output.DENSE}, 0, normalize_full=True)
    np.testing.assert_allclose(normalized.dense, unit(raw), rtol=1e-6)
    truncated = SequenceVectors(dense=raw.copy())
    finish_row(truncated, {Output.DENSE}, 5, normalize_full=False)  # truncate first, then normalize
    np.testing.assert_allclose(truncated.dense, unit(raw[:, :5]), rtol=1e-6)
    assert kept.binary is None  # sign bits only when asked for


def test_sign_bits_come_from_the_finished_vector() -> None:
    raw = np.array([[0.5, -1.0, 0.0, 2.0, -0.1, 0.3, 0.2, -0.4, 0.9, 1.0]], np.float32)
    vectors = SequenceVectors(dense=raw.copy())
    finish_row(vectors, {Output.BINARY}, 9, normalize_full=True)
    assert vectors.binary is not None
    assert vectors.binary.dimensions == 9
    assert vectors.binary.bits.tobytes() == np.packbits(raw[0, :9] > 0).tobytes()  # MSB first


class PooledRows:
    """A family's postprocess as the finish step sees it: row b's pooled vector, its ColBERT rows
    when asked for, or a late-chunking window's kept states."""

    normalizes = True

    def __init__(self, pooled: np.ndarray, colbert: np.ndarray) -> None:
        self.pooled, self.colbert = pooled, colbert

    def postprocess(self, outputs, input_ids, attention_mask, rows):  # type: ignore[no-untyped-def]
        results = []
        for b, row in enumerate(rows):
            if row.token_states is not None:
                results.append(SequenceVectors(token_states=self.colbert[b].copy()))
                continue
            colbert = self.colbert[b].copy() if Output.COLBERT in row.outputs else None
            results.append(SequenceVectors(dense=self.pooled[b : b + 1], colbert=colbert))
        return results


def test_a_run_finishes_each_row_by_its_own_request_whatever_else_shares_the_run() -> None:
    """Rows of one run asking for different sizes, bits and ColBERT: the batched finish step gives
    each the vectors of its own request, as numpy does row by row."""
    pooled = RNG.standard_normal((6, 12)).astype(np.float32)
    colbert = RNG.standard_normal((6, 3, 12)).astype(np.float32)
    rows = [
        RowRequest(4, frozenset({Output.DENSE})),
        RowRequest(4, frozenset({Output.DENSE, Output.BINARY}), dimensions=5),
        RowRequest(4, frozenset({Output.DENSE}), dimensions=5),
        RowRequest(4, frozenset({Output.DENSE, Output.COLBERT})),
        RowRequest(4, frozenset({Output.DENSE}), token_states=(0, 3)),  # a late-chunking window
        RowRequest(4, frozenset({Output.BINARY})),
    ]
    padded = PaddedBatch(np.ones((6, 4), np.int64), np.ones((6, 4), np.int64))
    results = finish_batch(PooledRows(pooled, colbert), {}, padded, rows)  # type: ignore[arg-type]
    for b, (result, row) in enumerate(zip(results, rows, strict=True)):
        if row.token_states is not None:
            assert result.dense is None
            np.testing.assert_array_equal(result.token_states, colbert[b])
            continue
        expected = unit(pooled[b : b + 1, : row.dimensions or None])
        np.testing.assert_allclose(result.dense, expected, rtol=1e-6)
        if Output.BINARY in row.outputs:
            assert result.binary is not None and result.binary.dimensions == expected.shape[1]
            assert result.binary.bits.tobytes() == np.packbits(expected[0] > 0).tobytes()
        else:
            assert result.binary is None
        if Output.COLBERT in row.outputs:
            np.testing.assert_allclose(result.colbert, unit(colbert[b]), rtol=1e-6)


def test_colbert_rows_are_normalized() -> None:
    rows = RNG.standard_normal((4, 6)).astype(np.float32)
    vectors = SequenceVectors(dense=rows[:1].copy(), colbert=rows.copy())
    finish_row(vectors, {Output.COLBERT}, 0, normalize_full=True)
    np.testing.assert_allclose(vectors.colbert, unit(rows), rtol=1e-6)


def test_a_document_is_stitched_then_its_spans_pooled_and_normalized() -> None:
    states = RNG.standard_normal((7, 8)).astype(np.float32)  # H of a 5-token document + <s>, </s>
    document = LateChunkedDocument(
        windows=[Window(np.zeros(5, np.int64), (0, 4)), Window(np.zeros(5, np.int64), (2, 5))],
        spans=[(0, 3), (3, 7)],
        tokens=7,
    )
    windows = [SequenceVectors(token_states=states[:4]), SequenceVectors(token_states=states[4:])]
    chunks = finish_document(document, windows, 4, {Output.DENSE, Output.BINARY})
    for chunk, (start, end) in zip(chunks, document.spans, strict=True):
        expected = unit(states[start:end].mean(axis=0)[:4])
        assert chunk.dense is not None and chunk.binary is not None
        np.testing.assert_allclose(chunk.dense[0], expected, rtol=1e-6)
        assert chunk.binary.bits.tobytes() == np.packbits(expected > 0).tobytes()
