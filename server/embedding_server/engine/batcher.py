"""Dynamic batching for one model: admission → waiting work → batches → session runs.

One dispatcher task per model owns the queue (as in text-embeddings-inference's
``queue.rs``): handlers take an admission before they tokenize, queue one work
item per sequence and await the vectors; the dispatcher alone takes work out,
forms batches and starts runs. Under load work piles up while runs are busy,
so batches grow by themselves; at idle a lone request runs at once.

Two classes of work share the machine:

- **interactive** (``Embed`` by default): always chosen first; may use every
  free run slot, and while bulk runs hold slots, as many extra slots as there
  are regular ones, which only interactive work may use (the OS time-slices
  the cores for the short query instead of making it wait for a long bulk
  run); on an idle server it runs on the all-cores session when the pool has one. Bulk runs execute on threads
  with a lower CPU priority (``BULK_NICE``), so the query's thread wins the
  time slices, yet bulk work keeps every cycle nobody else wants.
- **batch** (``StreamEmbed`` by default, corpus jobs): fair-queued between
  flows (one flow per client connection) on the padded tokens each flow has
  been served (start-time fair queueing), so two corpus jobs get equal shares
  whatever their request sizes, and a client with 64 streams on one
  connection gets one share. It never starves: when both classes wait, every
  ``batch_share``-th free slot goes to batch work.

Admission is bounded in requests and tokens (batch work may take only
``BATCH_ADMISSION_SHARE`` of either, so queries still get in behind a corpus
job); past the bound, callers get ``Overloaded`` at once, before their text is
tokenized. A batch is cut to the memory budget (``memory.MemoryBudget``); a
sequence that cannot fit a run alone is refused. Work whose deadline has
passed or whose caller went away is dropped before it reaches the model.

The dispatcher is supervised: if it fails, waiting work fails with UNAVAILABLE
(reason ``ENGINE_FAILED``), new work is refused, and ``on_failure`` tells the
server (health turns NOT_SERVING).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..cpus import ThreadBudget
from ..errors import DeadlineExpired, MemoryLimitExceeded, NotServing, Overloaded
from ..models.base import RowRequest
from ..models.loaded import LoadedModel
from ..models.types import Priority, SequenceVectors, Task
from .batch_selection import select_batch
from .finish import finish_batch
from .jobs import StageTimings
from .tuning import BatchSettings
from .work import PaddedBatch, WorkItem, pad

log = logging.getLogger(__name__)

CLASSES = (Priority.INTERACTIVE, Priority.BATCH)
#: CPU niceness of the threads that run bulk batches (0-19; higher yields more).
BULK_NICE = 10
#: Batch work may hold at most this share of the admission limits; the rest is the queries'.
BATCH_ADMISSION_SHARE = 0.75


class EngineObserver(Protocol):
    """What the engine reports as it works (implemented by metrics.Metrics)."""

    def on_batch(
        self,
        model: str,
        size: int,
        real_tokens: int,
        padded_tokens: int,
        seconds: float,
        priority: Priority = Priority.INTERACTIVE,
    ) -> None: ...

    def on_request(
        self,
        model: str,
        queue_seconds: float,
        inference_seconds: float,
        priority: Priority = Priority.INTERACTIVE,
    ) -> None: ...

    def on_refused(self, model: str, priority: Priority, reason: str) -> None: ...


@dataclass
class BatchStats:
    """Counters for metrics and tests."""

    runs: int = 0
    sequences: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    dropped_deadline: int = 0
    dropped_cancelled: int = 0
    rejected: int = 0
    runs_by_class: dict[Priority, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    wide_runs: int = 0


class Admission:
    """One request's place in the admission bounds, from before tokenizing until it is answered.

    ``admit`` takes its place in the count bound; ``reserve`` its tokens (an
    upper bound from its characters, just before it is tokenized: only the few
    requests in the tokenizer hold an estimate); ``settle`` the real count.
    """

    def __init__(self, batcher: ModelBatcher, priority: Priority) -> None:
        self._batcher = batcher
        self.priority = priority
        self.tokens = 0
        self.released = False

    def reserve(self, tokens: int) -> None:
        """Take ``tokens`` more of the token bound, or Overloaded (then release the admission)."""
        self._batcher._reserve(self, tokens)
        self.tokens += tokens

    def settle(self, tokens: int) -> None:
        """Replace what was reserved (the estimate taken before tokenizing) with the real count."""
        if not self.released:
            self._batcher._admitted_tokens[self.priority] += tokens - self.tokens
            self.tokens = tokens

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._batcher._admitted_requests[self.priority] -= 1
            self._batcher._admitted_tokens[self.priority] -= self.tokens


class ModelBatcher:
    """Queues, batches and runs the work of one model on its session pool."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: BatchSettings,
        observer: EngineObserver | None = None,
        threads: ThreadBudget | None = None,
    ) -> None:
        """``threads``: the process's budget (its ``sessions`` are the pool's); None: one for the pool."""
        if threads is None:
            threads = ThreadBudget.plan(sessions=loaded.sessions.size)
        elif threads.sessions != loaded.sessions.size:
            raise ValueError(
                f"the thread budget plans {threads.sessions} sessions, the pool has {loaded.sessions.size}"
            )
        self.threads = threads
        self.model = loaded.model
        self.sessions = loaded.sessions
        self.settings = settings
        self.stats = BatchStats()
        self.observer = observer
        self.on_failure: Callable[[BaseException], None] | None = None
        self.failure: BaseException | None = None
        # The queue, touched only on the event loop: interactive work by batch key, batch work by flow.
        self._interactive: dict[int, list[WorkItem]] = defaultdict(list)
        self._flows: dict[object, list[WorkItem]] = {}
        self._served: dict[object, float] = {}  # padded tokens run per active flow (its virtual time)
        self._virtual = 0.0  # the served level of the flow last chosen: where a new flow starts
        self._depth = dict.fromkeys(CLASSES, 0)  # sequences waiting, per class (read by metrics)
        self._admitted_requests = dict.fromkeys(CLASSES, 0)
        self._admitted_tokens = dict.fromkeys(CLASSES, 0)
        self._runs = dict.fromkeys(CLASSES, 0)
        self._interactive_streak = 0
        self._wake = asyncio.Event()
        self._bulk_threads = ThreadPoolExecutor(
            threads.bulk_run_threads,
            thread_name_prefix=f"bulk-{self.model.name}",
            initializer=lower_thread_priority,
        )
        self._post_threads = ThreadPoolExecutor(
            threads.pool_threads,
            thread_name_prefix=f"pool-{self.model.name}",
            initializer=lower_thread_priority,
        )
        self._interactive_threads = ThreadPoolExecutor(
            threads.interactive_run_threads, thread_name_prefix=f"run-{self.model.name}"
        )
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    # --- public ------------------------------------------------------------------

    def start(self) -> None:
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_forever())
        self._dispatcher.add_done_callback(self._dispatcher_done)

    async def close(self) -> None:
        """Stop dispatching; work still waiting fails with UNAVAILABLE, runs in progress finish."""
        if self._dispatcher:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        self._fail_waiting(NotServing("server is shutting down; retry on another replica"))
        await asyncio.gather(*self._running, return_exceptions=True)
        for pool in (self._bulk_threads, self._post_threads, self._interactive_threads):
            pool.shutdown(wait=True)

    @property
    def busy(self) -> bool:
        """Whether any admitted request is still unanswered."""
        return any(self._admitted_requests.values())

    @property
    def admitted(self) -> int:
        """Requests admitted and not yet answered, both classes."""
        return sum(self._admitted_requests.values())

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for a session."""
        return sum(self._depth.values())

    def depth(self, priority: Priority) -> int:
        """Sequences of one class waiting for a session (a plain int: safe to read from any thread)."""
        return self._depth[priority]

    def admit(self, priority: Priority = Priority.INTERACTIVE) -> Admission:
        """Take one request's place in the count bound, or Overloaded; its tokens come with ``reserve``."""
        if self.failure is not None:
            raise _engine_failed(self.failure)
        limit = max(1, int(self.settings.max_queue_requests * _share(priority)))
        requests = sum(self._admitted_requests.values())
        if requests >= limit:
            self._refuse(priority, "QUEUE_FULL")
            raise Overloaded(
                f"server overloaded: {requests} requests in flight for model {self.model.name} "
                f"(limit {limit} for {priority.name.lower()} work); retry with backoff",
                reason="QUEUE_FULL",
                retry_after=0.5,
            )
        self._admitted_requests[priority] += 1
        return Admission(self, priority)

    def _reserve(self, admission: Admission, tokens: int) -> None:
        limit = max(1, int(self.settings.max_queue_tokens * _share(admission.priority)))
        queued = sum(self._admitted_tokens.values())
        if queued and queued + tokens > limit:
            self._refuse(admission.priority, "QUEUE_FULL")
            raise Overloaded(
                f"server overloaded: {queued} tokens queued for model {self.model.name} "
                f"(limit {limit} for {admission.priority.name.lower()} work); retry with backoff",
                reason="QUEUE_FULL",
                retry_after=0.5,
            )
        self._admitted_tokens[admission.priority] += tokens

    def check_fits(
        self, lengths: list[int], priority: Priority = Priority.INTERACTIVE, field: str = "inputs"
    ) -> None:
        """MemoryLimitExceeded for the first sequence too long to run alone in the memory budget."""
        budget = self.settings.memory
        if budget is None:
            return
        for index, length in enumerate(lengths):
            if not budget.fits(1, length):
                self._refuse(priority, "MEMORY_LIMIT")
                raise MemoryLimitExceeded(
                    f"{field}[{index}]: {length} tokens do not fit this server's memory budget "
                    f"(at most {budget.longest_single()} tokens per sequence for model {self.model.name}; "
                    "raise --memory-limit or send shorter inputs)",
                    field=field,
                    index=index,
                )

    async def embed(
        self, sequences: list[tuple[np.ndarray, RowRequest]], task: Task, deadline: float | None
    ) -> list[SequenceVectors]:
        """Run sequences (split across batches as needed) and return their vectors in order."""
        vectors, _ = await self.embed_timed(sequences, task, deadline)
        return vectors

    async def embed_timed(
        self,
        sequences: list[tuple[np.ndarray, RowRequest]],
        task: Task,
        deadline: float | None,
        *,
        priority: Priority = Priority.INTERACTIVE,
        flow: object = None,
        admission: Admission | None = None,
    ) -> tuple[list[SequenceVectors], StageTimings]:
        """``embed``, and how long the work waited for a session and then ran.

        ``admission``: taken by the caller before tokenizing (then released by
        it); without one, the sequences are admitted here and released on return.
        """
        tokens = sum(int(ids.shape[0]) for ids, _ in sequences)
        own = admission is None
        if admission is None:
            admission = self.admit(priority)
        try:
            if own:
                admission.reserve(tokens)
            else:
                admission.settle(tokens)
            self.check_fits([int(ids.shape[0]) for ids, _ in sequences], priority)
            if self.failure is not None:
                raise _engine_failed(self.failure)
            loop = asyncio.get_running_loop()
            key = self.model.batch_key(task)
            items = [
                WorkItem(ids, row, key, int(task), deadline, loop.create_future(), priority, flow)
                for ids, row in sequences
            ]
            self._enqueue(items)
            try:
                vectors = list(await asyncio.gather(*(item.future for item in items)))
                return vectors, _stage_timings(items)
            except BaseException:
                self._discard(items)  # cancelled or failed: what still waits never runs
                raise
        finally:
            if own:
                admission.release()

    # --- the queue (event loop only) -------------------------------------------------

    def _enqueue(self, items: list[WorkItem]) -> None:
        for item in items:
            if item.priority == Priority.INTERACTIVE:
                self._interactive[item.batch_key].append(item)
            else:
                waiting = self._flows.get(item.flow)
                if waiting is None:
                    waiting = self._flows[item.flow] = []
                    # A flow that was idle starts at the current level: no credit for idle time.
                    self._served[item.flow] = max(self._served.get(item.flow, 0.0), self._virtual)
                waiting.append(item)
            self._depth[item.priority] += 1
        self._wake.set()

    def _refuse(self, priority: Priority, reason: str) -> None:
        self.stats.rejected += 1
        if self.observer is not None:
            self.observer.on_refused(self.model.name, priority, reason)

    def _discard(self, items: list[WorkItem]) -> None:
        for item in items:
            waiting = (
                self._interactive.get(item.batch_key)
                if item.priority == Priority.INTERACTIVE
                else self._flows.get(item.flow)
            )
            if waiting and item in waiting:
                waiting.remove(item)
                self._depth[item.priority] -= 1
                self.stats.dropped_cancelled += 1
            if not item.future.done():
                item.future.cancel()
        self._forget_empty_flows()

    def _forget_empty_flows(self) -> None:
        if not any(self._flows.values()):  # nobody to be fair to: every flow starts level again
            self._flows.clear()
            self._served.clear()
            return
        for flow in [flow for flow, waiting in self._flows.items() if not waiting]:
            del self._flows[flow]
            # Keep its served level only while it is ahead: a flow that comes back soon cannot
            # jump the queue, and the table does not grow with every connection ever seen.
            if self._served.get(flow, 0.0) <= self._virtual:
                self._served.pop(flow, None)

    def _queues(self) -> list[list[WorkItem]]:
        return [*self._interactive.values(), *self._flows.values()]

    def _fail_waiting(self, error: Exception) -> None:
        for waiting in self._queues():
            for item in waiting:
                if not item.future.done():
                    item.future.set_exception(error)
            waiting.clear()
        self._depth = dict.fromkeys(CLASSES, 0)
        self._forget_empty_flows()

    # --- dispatch --------------------------------------------------------------------

    def _dispatcher_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        assert error is not None
        self.failure = error
        log.error("the batcher of model %s failed; refusing its work", self.model.name, exc_info=error)
        self._fail_waiting(_engine_failed(error))
        if self.on_failure is not None:
            self.on_failure(error)

    async def _dispatch_forever(self) -> None:
        while True:
            self._drop_expired()
            choice = self._choose()
            if choice is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.settings.max_batch_wait_ms > 0 and self.queue_depth < self.settings.max_batch_size:
                await asyncio.sleep(self.settings.max_batch_wait_ms / 1000)
                self._drop_expired()
                choice = self._choose()
                if choice is None:
                    continue
            priority, wide = choice
            batch_waited = self._depth[Priority.BATCH] > 0
            self._interactive_streak = (
                self._interactive_streak + 1 if priority == Priority.INTERACTIVE and batch_waited else 0
            )
            batch = self._take(priority)
            self._runs[priority] += 1
            task = asyncio.get_running_loop().create_task(self._run(priority, wide, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _choose(self) -> tuple[Priority, bool] | None:
        """Which class runs next, and whether on the wide session; None: nothing may start now."""
        slots = self.sessions.size
        interactive_runs, batch_runs = self._runs[Priority.INTERACTIVE], self._runs[Priority.BATCH]
        running = interactive_runs + batch_runs
        interactive_waits = self._depth[Priority.INTERACTIVE] > 0
        batch_waits = self._depth[Priority.BATCH] > 0
        batch_may = batch_waits and running < slots
        # While bulk runs hold slots, queries get slots of their own (up to as many again): a query
        # never waits for a bulk run to end, and the OS time-slices the cores in its favour.
        interactive_may = interactive_waits and (
            running < slots
            or (self.settings.interactive_slot and batch_runs > 0 and interactive_runs < slots)
        )
        if interactive_may and not (batch_may and self._interactive_streak >= self.settings.batch_share):
            # All cores only on a quiet machine: a multi-threaded run waits at every op for its
            # slowest thread, which loses its time slices when bulk runs share the cores.
            wide = running == 0 and not batch_waits and getattr(self.sessions, "has_wide", False)
            return Priority.INTERACTIVE, wide
        if batch_may:
            return Priority.BATCH, False
        return None

    def _take(self, priority: Priority) -> list[WorkItem]:
        """Remove and return the next batch of a class (it has waiting work)."""
        if priority == Priority.INTERACTIVE:
            queues = self._interactive
            key = min((k for k, v in queues.items() if v), key=lambda k: queues[k][0].arrival)
            waiting = queues[key]
        else:
            flow = min(self._flows, key=lambda f: (self._served[f], self._flows[f][0].arrival))
            self._virtual = self._served[flow]
            waiting = self._flows[flow]
            key = waiting[0].batch_key
            if any(item.batch_key != key for item in waiting):
                waiting = [item for item in waiting if item.batch_key == key]
        settings = self.settings
        memory = settings.memory
        batch = select_batch(
            waiting,
            settings.max_batch_tokens,
            settings.max_batch_size,
            settings.max_padding_waste,
            memory.fits if memory is not None else None,
        )
        chosen = set(map(id, batch))
        if priority == Priority.INTERACTIVE:
            queues[key] = [item for item in queues[key] if id(item) not in chosen]
        else:
            self._flows[flow] = [item for item in self._flows[flow] if id(item) not in chosen]
            self._served[flow] += max(item.length for item in batch) * len(batch)
            self._forget_empty_flows()
        self._depth[priority] -= len(batch)
        return batch

    def _drop_expired(self) -> None:
        """Remove work nobody waits for any more, and fail work past its deadline."""
        now = time.monotonic()
        for waiting in self._queues():
            if not any(
                item.future.done() or (item.deadline is not None and now >= item.deadline) for item in waiting
            ):
                continue
            live = []
            for item in waiting:
                if item.future.done():
                    self.stats.dropped_cancelled += 1
                elif _expired(item, now):
                    self.stats.dropped_deadline += 1
                    item.future.set_exception(
                        DeadlineExpired(
                            "deadline exceeded while queued; the model did not run it",
                            reason="DEADLINE_EXCEEDED_IN_QUEUE",
                        )
                    )
                else:
                    live.append(item)
                    continue
                self._depth[item.priority] -= 1
            waiting[:] = live
        self._forget_empty_flows()

    async def _run(self, priority: Priority, wide: bool, batch: list[WorkItem]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for item in batch:
            item.started = started
        try:
            if priority == Priority.INTERACTIVE:
                # One thread hop: the query is finished on its run thread, and its run slot is
                # handed back (on the loop) the moment the model returns.
                padded, ran, vectors = await loop.run_in_executor(
                    self._interactive_threads, self._forward_and_finish, loop, wide, batch
                )
            else:
                try:
                    padded, outputs = await loop.run_in_executor(
                        self._bulk_threads, self._forward, wide, batch
                    )
                finally:
                    self._run_ended(priority)  # the next run starts while this one is pooled
                ran = time.monotonic()
                vectors = await loop.run_in_executor(self._post_threads, self._finish, batch, padded, outputs)
        except BaseException as exc:
            _fail(batch, exc)
            return
        for item in batch:
            item.ran = ran
        self._record(batch, padded, ran - started, priority, wide)
        finished = time.monotonic()
        for item, result in zip(batch, vectors, strict=True):
            item.finished = finished
            if not item.future.done():
                item.future.set_result(result)

    def _run_ended(self, priority: Priority) -> None:
        self._runs[priority] -= 1
        self._wake.set()

    # --- on worker threads ---------------------------------------------------------------

    def _forward_and_finish(
        self, loop: asyncio.AbstractEventLoop, wide: bool, batch: list[WorkItem]
    ) -> tuple[PaddedBatch, float, list[SequenceVectors]]:
        """An interactive run: the model, then (its slot already handed back) the finish step."""
        try:
            padded, outputs = self._forward(wide, batch)
            ran = time.monotonic()  # before the slot is handed back: the next run starts after this
        finally:
            loop.call_soon_threadsafe(self._run_ended, Priority.INTERACTIVE)
        return padded, ran, self._finish(batch, padded, outputs)

    def _forward(self, wide: bool, batch: list[WorkItem]) -> tuple[PaddedBatch, dict[str, np.ndarray]]:
        padded = pad(batch, self.model.tokenizer.pad_id)
        feeds = self.model.feeds(padded.input_ids, padded.attention_mask, Task(batch[0].task))
        slot = _thread_slot()
        if wide:
            return padded, self.sessions.run(slot, self.model.output_names, feeds, wide=True)
        return padded, self.sessions.run(slot, self.model.output_names, feeds)

    def _finish(
        self, batch: list[WorkItem], padded: PaddedBatch, outputs: dict[str, np.ndarray]
    ) -> list[SequenceVectors]:
        return finish_batch(self.model, outputs, padded, [item.row for item in batch])

    def _record(
        self, batch: list[WorkItem], padded: PaddedBatch, seconds: float, priority: Priority, wide: bool
    ) -> None:
        stats = self.stats
        stats.runs += 1
        stats.runs_by_class[priority] += 1
        stats.wide_runs += wide
        stats.sequences += len(batch)
        stats.real_tokens += padded.real_tokens
        stats.padded_tokens += padded.padded_tokens
        if self.observer is not None:
            self.observer.on_batch(
                self.model.name, len(batch), padded.real_tokens, padded.padded_tokens, seconds, priority
            )


_slots = threading.local()
_slot_counter = iter(range(1 << 30))


def _thread_slot() -> int:
    """A stable small number per worker thread: the session of a ``separate`` pool it runs on."""
    slot = getattr(_slots, "slot", None)
    if slot is None:
        slot = _slots.slot = next(_slot_counter)
    return slot


def _share(priority: Priority) -> float:
    return 1.0 if priority == Priority.INTERACTIVE else BATCH_ADMISSION_SHARE


def _expired(item: WorkItem, now: float) -> bool:
    return item.deadline is not None and now >= item.deadline


def lower_thread_priority() -> None:
    """Bulk worker threads yield the CPU to interactive runs and tokenizing, and the event loop."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: queue order alone
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_NICE)


def _engine_failed(error: BaseException) -> NotServing:
    return NotServing(
        f"the engine failed ({type(error).__name__}: {error}); this replica is not serving, retry on another",
        reason="ENGINE_FAILED",
    )


def _stage_timings(items: list[WorkItem]) -> StageTimings:
    enqueued = min(item.enqueued for item in items)
    first_run = min(item.started or enqueued for item in items)
    last_vector = max(item.finished or first_run for item in items)
    return StageTimings(
        queue_seconds=first_run - enqueued,
        inference_seconds=last_vector - first_run,
        enqueued=enqueued,
        run_start=first_run,
        run_end=max(item.ran or first_run for item in items),
        finished=last_vector,
        runs=tuple(sorted({(item.started, item.ran) for item in items if item.started and item.ran})),
    )


def _fail(batch: list[WorkItem], exc: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("batch cancelled"))
