"""The batcher with real ONNX Runtime sessions, in-process so its work can be counted.

Behaviour, not timing: batches form under concurrency, big requests split
and come back in order, deadlines and cancellations drop work before the
model sees it, and admission control refuses work past its bounds.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from embedding_server.engine.embedder import Embedder
from embedding_server.engine.jobs import EmbedJob
from embedding_server.errors import DeadlineExpired, Overloaded
from embedding_server.models.loader import BUILTIN_MODEL
from embedding_server.models.types import Priority

from tests.support.engine import make_embedder, sentence, started
from tests.support.instrumented import CountingSessions
from tests.support.observer import RecordingObserver
from tests.support.polling import until


async def blocked_run(embedder: Embedder, sessions: CountingSessions, text: str) -> asyncio.Task:
    """Hold the sessions, start one request and wait until its run is stuck at the gate."""
    sessions.hold()
    blocker = asyncio.create_task(embedder.embed(EmbedJob(inputs=[text])))
    await asyncio.to_thread(sessions.entered.acquire)
    return blocker


async def run_queued_behind_a_blocked_run(
    embedder: Embedder, sessions: CountingSessions, first: str, texts: list[str]
) -> list:
    """One request per text, all queued while the first run is held, then everything released."""
    blocker = await blocked_run(embedder, sessions, first)
    jobs = [asyncio.create_task(embedder.embed(EmbedJob(inputs=[t]))) for t in texts]
    batcher = embedder.batchers[BUILTIN_MODEL]
    await until(lambda: batcher.queue.total == len(texts), "every request queued")
    sessions.release()
    results = await asyncio.gather(blocker, *jobs)
    await embedder.close()
    return results


def dense(result) -> np.ndarray:
    return np.concatenate([v.dense for v in result.vectors])


async def test_concurrent_requests_share_session_runs(builtin):
    embedder, sessions = make_embedder(builtin)
    await started(embedder, sessions)
    # the first run blocks: the other 63 queue up behind it
    results = await run_queued_behind_a_blocked_run(
        embedder, sessions, sentence(0), [sentence(i) for i in range(1, 64)]
    )
    assert len(results) == 64
    # 64 requests of 5..42 tokens, a handful of runs (split by length: see the padding-waste rule)
    assert len(sessions.runs) <= 8, [r.batch_size for r in sessions.runs]
    assert max(r.batch_size for r in sessions.runs) >= 16


async def test_batched_vectors_equal_lone_vectors(builtin):
    embedder, sessions = make_embedder(builtin)
    await started(embedder, sessions)
    texts = [sentence(i) for i in range(24)]
    together = await asyncio.gather(*(embedder.embed(EmbedJob(inputs=[t])) for t in texts))
    alone = [await embedder.embed(EmbedJob(inputs=[t])) for t in texts]
    await embedder.close()
    for a, b in zip(together, alone, strict=True):
        assert float((dense(a) @ dense(b).T)[0, 0]) > 0.99999


async def test_large_request_is_split_and_reassembled_in_order(builtin):
    embedder, sessions = make_embedder(builtin, max_batch_size=8, max_batch_tokens=10_000)
    await started(embedder, sessions)
    texts = [sentence(i) for i in range(50)]
    whole = await embedder.embed(EmbedJob(inputs=texts))
    one_by_one = [await embedder.embed(EmbedJob(inputs=[t])) for t in texts]
    await embedder.close()
    split_runs = sessions.runs[: -len(texts)]
    assert len(split_runs) >= 7 and all(r.batch_size <= 8 for r in split_runs)
    seen = sorted(row for r in split_runs for row in r.rows)
    expected = sorted(tuple(ids.tolist()) for ids in builtin.model.tokenize(texts, 0, False))
    assert seen == expected  # every input ran exactly once
    got = dense(whole)
    want = np.concatenate([dense(r) for r in one_by_one])
    np.testing.assert_allclose(np.sum(got * want, axis=1), 1.0, atol=1e-5)  # same order, same vectors
    assert whole.prompt_tokens == sum(r.prompt_tokens for r in one_by_one)


async def test_token_budget_bounds_padded_cost(builtin):
    embedder, sessions = make_embedder(builtin, max_batch_tokens=200, max_batch_size=1000)
    await started(embedder, sessions)
    await run_queued_behind_a_blocked_run(embedder, sessions, "warm", [sentence(i) for i in range(40)])
    for run in sessions.runs:
        longest = max(len(r) for r in run.rows)
        assert longest * run.batch_size <= 200 or run.batch_size == 1


async def test_length_sorted_batches_pad_little(builtin):
    embedder, sessions = make_embedder(builtin, max_batch_tokens=2048, max_batch_size=16)
    await started(embedder, sessions)
    await run_queued_behind_a_blocked_run(embedder, sessions, "warm", [sentence(i) for i in range(96)])
    real = sum(len(row) for run in sessions.runs[1:] for row in run.rows)
    padded = sum(max(len(row) for row in run.rows) * run.batch_size for run in sessions.runs[1:])
    assert real / padded >= 0.8  # arrival order is length-shuffled; FIFO batches would pad ~0.5


async def test_deadline_passed_in_queue_never_reaches_the_model(builtin):
    observed = RecordingObserver()
    embedder, sessions = make_embedder(builtin, observer=observed)
    await started(embedder, sessions)
    blocker = await blocked_run(embedder, sessions, "blocker")
    deadline = time.monotonic() + 0.1
    doomed = asyncio.create_task(embedder.embed(EmbedJob(inputs=["too late to matter"], deadline=deadline)))
    await until(lambda: time.monotonic() > deadline, "the deadline passed while the session is busy")
    sessions.release()
    with pytest.raises(DeadlineExpired):
        await doomed
    await blocker
    await embedder.close()
    ran = [row for run in sessions.runs for row in run.rows]
    doomed_ids = tuple(builtin.model.tokenize(["too late to matter"], 0, False)[0].tolist())
    assert doomed_ids not in ran
    assert observed.dropped == {(BUILTIN_MODEL, Priority.INTERACTIVE, "deadline"): 1}


async def test_cancelled_caller_work_is_dropped(builtin):
    embedder, sessions = make_embedder(builtin)
    await started(embedder, sessions)
    blocker = await blocked_run(embedder, sessions, "blocker")
    abandoned = asyncio.create_task(embedder.embed(EmbedJob(inputs=[sentence(i) for i in range(10)])))
    batcher = embedder.batchers[BUILTIN_MODEL]
    await until(lambda: batcher.queue.total == 10, "the abandoned request queued")
    abandoned.cancel()
    await asyncio.gather(abandoned, return_exceptions=True)
    assert batcher.queue.total == 0  # removed at once, not when the model gets to it
    sessions.release()
    await blocker
    await embedder.close()
    assert len(sessions.runs) == 1  # only the blocker ever ran


async def test_overload_is_refused_fast(builtin):
    embedder, sessions = make_embedder(builtin, max_queue_requests=3)
    await started(embedder, sessions)
    sessions.hold()
    admitted = [asyncio.create_task(embedder.embed(EmbedJob(inputs=[sentence(i)]))) for i in range(3)]
    await asyncio.to_thread(sessions.entered.acquire)
    with pytest.raises(Overloaded, match="overloaded"):
        await embedder.embed(EmbedJob(inputs=["one too many"]))
    sessions.release()
    assert len(await asyncio.gather(*admitted)) == 3  # admitted work is still answered
    await embedder.close()


async def test_token_bound_refuses_a_flood(builtin):
    embedder, sessions = make_embedder(builtin, max_queue_tokens=400)
    await started(embedder, sessions)
    blocker = await blocked_run(embedder, sessions, sentence(5))
    queued = asyncio.create_task(embedder.embed(EmbedJob(inputs=[sentence(i) for i in range(3)])))
    batcher = embedder.batchers[BUILTIN_MODEL]
    await until(lambda: batcher.queue.total == 3, "the first request queued")
    with pytest.raises(Overloaded, match="tokens queued"):
        await embedder.embed(EmbedJob(inputs=[sentence(i) for i in range(10, 20)]))
    sessions.release()
    await asyncio.gather(blocker, queued)
    await embedder.close()


def test_padding_waste_rule_keeps_lengths_apart():
    """A neighbour whose padding would cost more than a run of its own waits for its own batch."""
    from embedding_server.engine.batch_selection import select_batch
    from embedding_server.engine.work import WorkItem
    from embedding_server.models.base import RowRequest

    def item(length: int) -> WorkItem:
        return WorkItem(np.zeros(length, np.int64), RowRequest(length, frozenset()), 0, 0, None, None)  # type: ignore[arg-type]

    waiting = [item(10), *(item(n) for n in (11, 12, 60, 61, 62, 12))]
    chosen = select_batch(waiting, max_tokens=10_000, max_size=100, max_waste=16)
    assert sorted(i.length for i in chosen) == [10, 11, 12, 12]  # the 60s are left for a run of their own
    everything = select_batch(waiting, max_tokens=10_000, max_size=100, max_waste=0)
    assert len(everything) == len(waiting)  # 0: no limit
    rest = [i for i in waiting if i not in chosen]
    assert sorted(i.length for i in select_batch(rest, 10_000, 100, 16)) == [60, 61, 62]


@pytest.mark.parametrize("pad_id", [0, 1])
def test_a_batch_is_right_padded_with_the_models_pad_id(pad_id: int):
    """Each row: its own ids, then the pad id to the longest; the mask 1 exactly over the ids."""
    from embedding_server.engine.work import WorkItem, pad
    from embedding_server.models.base import RowRequest

    rng = np.random.default_rng(7)
    rows = [rng.integers(2, 1000, size=n, dtype=np.int64) for n in (5, 1, 9, 9, 3)]
    items = [
        WorkItem(ids, RowRequest(len(ids), frozenset()), 0, 0, None, None)  # type: ignore[arg-type]
        for ids in rows
    ]
    padded = pad(items, pad_id)
    assert padded.input_ids.shape == padded.attention_mask.shape == (5, 9)
    assert padded.input_ids.dtype == padded.attention_mask.dtype == np.int64
    for row, ids in enumerate(rows):
        expected = [*ids.tolist(), *[pad_id] * (9 - len(ids))]
        assert padded.input_ids[row].tolist() == expected
        assert padded.attention_mask[row].tolist() == [1] * len(ids) + [0] * (9 - len(ids))
    assert padded.real_tokens == sum(map(len, rows)) and padded.padded_tokens == 45
