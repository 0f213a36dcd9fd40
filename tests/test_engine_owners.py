"""The batcher's owners alone, without a model or a dispatcher: admission and the work queue.

Each is driven directly and checked against what it reported to the observer,
the way ``select_batch`` is tested by itself (tests/test_batching.py).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from embedding_server.engine.admission import BATCH_ADMISSION_SHARE, AdmissionControl
from embedding_server.engine.memory import MemoryBudget, ModelShape
from embedding_server.engine.tuning import BatchSettings
from embedding_server.engine.work import Reply, WorkItem
from embedding_server.engine.work_queue import WorkQueue
from embedding_server.errors import DeadlineExpired, MemoryLimitExceeded, NotServing, Overloaded
from embedding_server.models.base import RowRequest
from embedding_server.models.types import Priority

from tests.support.observer import RecordingObserver

INTERACTIVE, BATCH = Priority.INTERACTIVE, Priority.BATCH


def test_the_count_bound_keeps_a_share_for_queries():
    observed = RecordingObserver()
    control = AdmissionControl("m", BatchSettings(max_queue_requests=8), observed)
    bulk = [control.admit(BATCH) for _ in range(int(8 * BATCH_ADMISSION_SHARE))]
    with pytest.raises(Overloaded, match="limit 6 for batch work"):
        control.admit(BATCH)
    queries = [control.admit(INTERACTIVE) for _ in range(2)]  # the queries' part is still free
    with pytest.raises(Overloaded, match="8 requests in flight"):
        control.admit(INTERACTIVE)
    assert control.admitted == 8 and observed.refused == {
        ("m", BATCH, "QUEUE_FULL"): 1,
        ("m", INTERACTIVE, "QUEUE_FULL"): 1,
    }
    for admission in [*bulk, *queries]:
        admission.release()
        admission.release()  # twice is once
    assert control.admitted == 0 and not control.busy


def test_tokens_are_reserved_settled_and_released():
    control = AdmissionControl("m", BatchSettings(max_queue_tokens=100))
    first = control.admit()
    first.reserve(90)  # the estimate from characters
    second = control.admit()
    with pytest.raises(Overloaded, match="90 tokens queued"):
        second.reserve(20)
    first.settle(30)  # tokenized: the real count replaces the estimate
    second.reserve(20)  # now it fits
    first.release()
    second.release()
    third = control.admit()
    third.reserve(100)  # alone, any request gets in: the bound never blocks an empty queue
    third.release()
    assert control._tokens == {INTERACTIVE: 0, BATCH: 0}


def test_a_closed_admission_refuses_and_a_long_sequence_is_refused_before_it_queues():
    observed = RecordingObserver()
    shape = ModelShape(hidden=64, heads=2)
    budget = MemoryBudget(shape, run_bytes=shape.run_bytes(1, 100), queue_tokens=10_000)
    control = AdmissionControl("m", BatchSettings(memory=budget), observed)
    control.check_fits([10, 100], BATCH)
    with pytest.raises(MemoryLimitExceeded) as info:
        control.check_fits([10, 101, 500], BATCH)
    assert (info.value.field, info.value.index) == ("inputs", 1)
    assert observed.refused == {("m", BATCH, "MEMORY_LIMIT"): 1}
    control.close(NotServing("the engine failed", reason="ENGINE_FAILED"))
    with pytest.raises(NotServing, match="the engine failed"):
        control.admit()


def items(
    loop: asyncio.AbstractEventLoop,
    lengths: list[int],
    priority: Priority,
    flow: object = None,
    key: int = 0,
    deadline: float | None = None,
) -> list[WorkItem]:
    reply = Reply(loop.create_future(), len(lengths))  # one request of these sequences
    return [
        WorkItem(
            np.arange(n, dtype=np.int64),
            RowRequest(length=n, outputs=frozenset()),
            key,
            0,
            deadline,
            reply,
            priority,
            flow,
            index,
        )
        for index, n in enumerate(lengths)
    ]


async def test_two_flows_are_taken_by_served_tokens_not_by_arrival():
    queue = WorkQueue("m", BatchSettings(max_batch_size=2))
    loop = asyncio.get_running_loop()
    a = items(loop, [10] * 8, BATCH, "a")
    b = items(loop, [40] * 4, BATCH, "b")  # 4x longer: b gets a quarter of a's runs' rows
    queue.put(a)
    queue.put(b)
    assert (queue.depth(BATCH), queue.flows) == (12, 2)
    order = []
    while queue.depth(BATCH):
        batch = queue.take(BATCH)
        order.append(batch[0].flow)
    # a's runs cost 20 padded tokens, b's 80: a runs four times for each run of b while both wait.
    assert order[:5].count("a") == 4 and order[:5].count("b") == 1
    assert queue.flows == 0 and queue.total == 0


async def test_interactive_work_goes_by_its_oldest_batch_key_and_before_nothing_else():
    queue = WorkQueue("m", BatchSettings())
    loop = asyncio.get_running_loop()
    first = items(loop, [5], INTERACTIVE, key=3)
    second = items(loop, [5, 5], INTERACTIVE, key=1)
    queue.put(first)
    queue.put(second)
    assert queue.take(INTERACTIVE) == first  # key 3 arrived first; keys never share a run
    assert queue.take(INTERACTIVE) == second
    assert queue.depth(INTERACTIVE) == 0


async def test_drops_are_reported_by_reason_and_fail_or_cancel_their_callers():
    observed = RecordingObserver()
    queue = WorkQueue("m", BatchSettings(), observed)
    loop = asyncio.get_running_loop()
    late = items(loop, [5, 5], INTERACTIVE, deadline=time.monotonic() - 1)
    gone = items(loop, [5, 5, 5], BATCH, "a")
    kept = items(loop, [5], BATCH, "b")
    for group in (late, gone, kept):
        queue.put(group)
    queue.discard(gone)  # the caller went away
    queue.drop_expired()
    assert observed.dropped == {("m", INTERACTIVE, "deadline"): 2, ("m", BATCH, "cancelled"): 3}
    assert all(isinstance(item.reply.future.exception(), DeadlineExpired) for item in late)
    assert all(item.reply.future.cancelled() for item in gone)
    assert (queue.total, queue.flows) == (1, 1)
    queue.fail_waiting(NotServing("shutting down"))
    assert isinstance(kept[0].reply.future.exception(), NotServing) and queue.total == 0
    assert sum(observed.dropped.values()) == 5  # a failed item is answered, not dropped
