"""Dispatch and runs for one model: which waiting work runs next, on which threads.

One dispatcher task per model takes work out of its queue (as in
text-embeddings-inference's ``queue.rs``): handlers are admitted
(``admission.py``) before they tokenize, put one work item per sequence in
the ``WorkQueue`` (``work_queue.py``) and await the vectors; the dispatcher
alone takes batches out and starts runs. Under load work piles up while runs
are busy, so batches grow by themselves, and before taking a batch the
dispatcher lets the busy event loop bring in the requests it is still reading
(``gather.py``); at idle a lone request runs after a few empty loop iterations.

Two classes of work share the machine:

- **interactive** (``Embed`` by default): always chosen first; may use every
  free run slot, and while bulk runs hold slots, as many extra slots as there
  are regular ones, which only interactive work may use (the OS time-slices
  the cores for the short query instead of making it wait for a long bulk
  run); on an idle server it runs on the all-cores session when the pool has
  one. It is finished on its run thread: one thread hop.
- **batch** (``StreamEmbed`` by default, corpus jobs): runs on threads with a
  lower CPU priority (``BULK_NICE``), so the query's thread wins the time
  slices, yet bulk work keeps every cycle nobody else wants; it is finished on
  the (niced) finish threads while the next run starts. It never starves: when
  both classes wait, every ``batch_share``-th free slot goes to batch work.

Both classes run through one ``_run``; only their ``Lane`` (run threads, and
finish threads or none) differs. A run's slot is handed back the moment the
model returns, before its finish step. A run that this model's runs so far
say is cheap (``inline_run_ms``, ``run_cost.py``) is made on the event loop,
finish step included, with no thread hop: a tiny model's run costs less than
the hop.

The dispatcher is supervised: if it fails, waiting work fails with UNAVAILABLE
(reason ``ENGINE_FAILED``), admission refuses new work, and ``on_failure``
tells the server (health turns NOT_SERVING).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..cpus import ThreadBudget
from ..errors import NotServing
from ..models.base import RowRequest
from ..models.loaded import LoadedModel
from ..models.types import Priority, SequenceVectors, Task
from .admission import CLASSES, Admission, AdmissionControl
from .finish import finish_batch
from .gather import LoopGather
from .jobs import StageTimings
from .observer import EngineObserver
from .run_cost import RunCost
from .tuning import BatchSettings
from .work import PaddedBatch, Reply, WorkItem, pad
from .work_queue import WorkQueue

log = logging.getLogger(__name__)

#: CPU niceness of the threads that run bulk batches (0-19; higher yields more).
BULK_NICE = 10


@dataclass(frozen=True)
class Lane:
    """Where a class of work runs: its run threads, and its finish threads (None: on the run thread)."""

    run: ThreadPoolExecutor
    finish: ThreadPoolExecutor | None


class ModelBatcher:
    """Dispatches the work of one model onto its session pool; owns its admission and queue."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: BatchSettings,
        observer: EngineObserver | None = None,
        threads: ThreadBudget | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        """``threads``: the process's budget (its ``sessions`` are the pool's); None: one for the pool.
        ``on_failure(error)``: called once if the dispatcher fails."""
        if threads is None:
            threads = ThreadBudget.plan(sessions=loaded.sessions.size)
        elif threads.sessions != loaded.sessions.size:
            raise ValueError(
                f"the thread budget plans {threads.sessions} sessions, the pool has {loaded.sessions.size}"
            )
        self.model = loaded.model
        self.sessions = loaded.sessions
        self.settings = settings
        self.observer = observer
        self.on_failure = on_failure
        self.failure: BaseException | None = None
        self.admission = AdmissionControl(self.model.name, settings, observer)
        self.queue = WorkQueue(self.model.name, settings, observer)
        self._runs = dict.fromkeys(CLASSES, 0)  # runs holding a slot, per class
        self._cost = RunCost()
        self._gather = LoopGather(settings.batch_gather_ms / 1000)
        self._last_on_loop = dict.fromkeys(CLASSES, False)  # whether the class's last run was on the loop
        self._interactive_streak = 0
        self._wake = asyncio.Event()
        name = self.model.name
        self._lanes = {
            Priority.INTERACTIVE: Lane(
                ThreadPoolExecutor(threads.interactive_run_threads, thread_name_prefix=f"run-{name}"), None
            ),
            Priority.BATCH: Lane(
                ThreadPoolExecutor(
                    threads.bulk_run_threads,
                    thread_name_prefix=f"bulk-{name}",
                    initializer=lower_thread_priority,
                ),
                ThreadPoolExecutor(
                    threads.finish_threads,
                    thread_name_prefix=f"finish-{name}",
                    initializer=lower_thread_priority,
                ),
            ),
        }
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_forever())
        self._dispatcher.add_done_callback(self._dispatcher_done)

    async def close(self) -> None:
        """Stop dispatching; work still waiting fails with UNAVAILABLE, runs in progress finish."""
        if self._dispatcher:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        self.queue.fail_waiting(NotServing("server is shutting down; retry on another replica"))
        await asyncio.gather(*self._running, return_exceptions=True)
        for lane in self._lanes.values():
            for pool in (lane.run, lane.finish):
                if pool is not None:
                    pool.shutdown(wait=True)

    # --- the work ------------------------------------------------------------------------

    async def embed(
        self,
        sequences: list[tuple[np.ndarray, RowRequest]],
        task: Task,
        deadline: float | None,
        admission: Admission,
        flow: object = None,
        tokenized: tuple[float, float] = (0.0, 0.0),
    ) -> tuple[list[SequenceVectors], StageTimings]:
        """Run a request's sequences (split across batches as needed): their vectors in order, and how
        long they waited for a session and ran. ``admission``: taken before tokenizing, released by
        the caller; settled here to the real token count. ``tokenized``: when the caller's tokenizing
        began and ended, carried into the timings (one object made, not copied to add them)."""
        priority = admission.priority
        lengths = [int(ids.shape[0]) for ids, _ in sequences]
        admission.settle(sum(lengths))
        self.admission.check_fits(lengths, priority)
        if self.failure is not None:
            raise _engine_failed(self.failure)
        loop = asyncio.get_running_loop()
        key = self.model.batch_key(task)
        reply = Reply(loop.create_future(), len(sequences))
        task_number, enqueued = int(task), time.monotonic()
        items = [
            WorkItem(ids, row, key, task_number, deadline, reply, priority, flow, index, enqueued=enqueued)
            for index, (ids, row) in enumerate(sequences)
        ]
        self.queue.put(items)
        self._wake.set()
        try:
            vectors = await reply.future
        except BaseException:
            self.queue.discard(items)  # cancelled or failed: what still waits never runs
            raise
        return vectors, _stage_timings(items, tokenized)

    # --- dispatch (event loop only) ----------------------------------------------------------

    def _dispatcher_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        assert error is not None
        self.failure = error
        log.error("the batcher of model %s failed; refusing its work", self.model.name, exc_info=error)
        refusal = _engine_failed(error)
        self.admission.close(refusal)
        self.queue.fail_waiting(refusal)
        if self.on_failure is not None:
            self.on_failure(error)

    async def _dispatch_forever(self) -> None:
        queue = self.queue
        while True:
            queue.drop_expired()
            choice = self._choose()
            if choice is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            gathering = choice[0]
            waited = await self._gather.wait(
                self._batch_full, self._last_on_loop[gathering], functools.partial(queue.depth, gathering)
            )
            if self.settings.max_batch_wait_ms > 0 and not self._batch_full():
                await asyncio.sleep(self.settings.max_batch_wait_ms / 1000)
                waited = True
            if waited:
                queue.drop_expired()
                choice = self._choose()
                if choice is None:
                    continue
            priority, wide = choice
            batch_waited = queue.depth(Priority.BATCH) > 0
            self._interactive_streak = (
                self._interactive_streak + 1 if priority == Priority.INTERACTIVE and batch_waited else 0
            )
            batch = queue.take(priority)
            self._runs[priority] += 1
            task = asyncio.get_running_loop().create_task(self._run(priority, wide, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _batch_full(self) -> bool:
        """Whether enough waits for a whole run, so waiting for more gains nothing."""
        return self.queue.total >= self.settings.max_batch_size

    def _choose(self) -> tuple[Priority, bool] | None:
        """Which class runs next, and whether on the wide session; None: nothing may start now."""
        slots = self.sessions.size
        interactive_runs, batch_runs = self._runs[Priority.INTERACTIVE], self._runs[Priority.BATCH]
        running = interactive_runs + batch_runs
        interactive_waits = self.queue.depth(Priority.INTERACTIVE) > 0
        batch_waits = self.queue.depth(Priority.BATCH) > 0
        batch_may = batch_waits and running < slots
        # While bulk runs hold slots, queries get slots of their own (up to as many again): a query
        # never waits for a bulk run to end, and the OS time-slices the cores in its favour.
        interactive_may = (
            interactive_waits
            and (
                running < slots
                or (self.settings.interactive_slot and batch_runs > 0 and interactive_runs < slots)
            )
            and self._fills_another_run()
        )
        if interactive_may and not (batch_may and self._interactive_streak >= self.settings.batch_share):
            # All cores only on a quiet machine: a multi-threaded run waits at every op for its
            # slowest thread, which loses its time slices when bulk runs share the cores.
            wide = running == 0 and not batch_waits and self.sessions.has_wide
            return Priority.INTERACTIVE, wide
        if batch_may:
            return Priority.BATCH, False
        return None

    def _fills_another_run(self) -> bool:
        """Whether an interactive run may start now: none is in flight, or enough queries wait to
        make a second run worth its fixed cost (``min_parallel_batch``).

        Under many small requests a run per request or two costs a thread hop, a session call and a
        finish step each (~1 ms of CPU for a 0.1 ms model, bench/serving_path.py); those waiting
        join the next batch when the run in flight ends, a few milliseconds at most. Batch work
        comes in large requests and fills its runs anyway; its flows' fair shares stay as they were.
        """
        if self._runs[Priority.INTERACTIVE] == 0:
            return True
        return self.queue.depth(Priority.INTERACTIVE) >= self.settings.min_parallel_batch

    async def _run(self, priority: Priority, wide: bool, batch: list[WorkItem]) -> None:
        """One run of either class: the model on the lane's run thread, the finish step on its finish
        thread (or on the run thread), the slot handed back in between; or, when cheap, all of it
        here on the event loop."""
        loop = asyncio.get_running_loop()
        lane = self._lanes[priority]
        started = time.monotonic()
        for item in batch:
            item.started = started
        on_loop = self._last_on_loop[priority] = self._cheap(max(item.length for item in batch) * len(batch))
        try:
            if on_loop:
                padded, outputs, ran, vectors = self._forward(loop.call_soon, priority, wide, batch, True)
            else:
                padded, outputs, ran, vectors = await loop.run_in_executor(
                    lane.run,
                    self._forward,
                    loop.call_soon_threadsafe,
                    priority,
                    wide,
                    batch,
                    lane.finish is None,
                )
            if vectors is None:
                vectors = await loop.run_in_executor(lane.finish, self._finish, batch, padded, outputs)
        except BaseException as exc:
            _fail(batch, exc)
            return
        if self.observer is not None:
            self.observer.on_batch(
                self.model.name,
                len(batch),
                padded.real_tokens,
                padded.padded_tokens,
                ran - started,
                priority,
                wide,
            )
        finished = time.monotonic()
        for item, result in zip(batch, vectors, strict=True):
            item.ran = ran
            item.finished = finished
            item.reply.deliver(item.index, result)
        if on_loop:
            self._gather.record_loop_run(time.monotonic() - started)

    def _cheap(self, padded_tokens: int) -> bool:
        """Whether a run of this size is predicted to cost at most ``inline_run_ms``."""
        limit = self.settings.inline_run_ms
        return limit > 0 and self._cost.predict(padded_tokens) * 1000 <= limit

    def _run_ended(self, priority: Priority, padded_tokens: int, seconds: float) -> None:
        """On the loop: the slot back, and what the session call cost (``seconds``; 0: it failed)."""
        self._runs[priority] -= 1
        if seconds > 0:
            self._cost.record(padded_tokens, seconds)
        self._wake.set()

    # --- on worker threads -----------------------------------------------------------------

    def _forward(
        self,
        on_loop: Callable[..., object],
        priority: Priority,
        wide: bool,
        batch: list[WorkItem],
        finish_here: bool,
    ) -> tuple[PaddedBatch, dict[str, np.ndarray], float, list[SequenceVectors] | None]:
        """The model; the slot is handed back (on the loop, through ``on_loop``: the loop's
        ``call_soon_threadsafe``, or ``call_soon`` on the loop itself) the moment it returns, with
        the session call's time; then, when ``finish_here``, the finish step on this thread."""
        padded_tokens, seconds = 0, 0.0
        try:
            padded = pad(batch, self.model.tokenizer.pad_id)
            feeds = self.model.feeds(padded.input_ids, padded.attention_mask, Task(batch[0].task))
            called = time.monotonic()
            outputs = self.sessions.run(_thread_slot(), self.model.output_names, feeds, wide=wide)
            ran = time.monotonic()  # before the slot is handed back: the next run starts after this
            padded_tokens, seconds = padded.padded_tokens, ran - called
        finally:
            on_loop(self._run_ended, priority, padded_tokens, seconds)
        return padded, outputs, ran, self._finish(batch, padded, outputs) if finish_here else None

    def _finish(
        self, batch: list[WorkItem], padded: PaddedBatch, outputs: dict[str, np.ndarray]
    ) -> list[SequenceVectors]:
        return finish_batch(self.model, outputs, padded, [item.row for item in batch])


_slots = threading.local()
_slot_counter = iter(range(1 << 30))


def _thread_slot() -> int:
    """A stable small number per worker thread: the session of a ``separate`` pool it runs on."""
    slot = getattr(_slots, "slot", None)
    if slot is None:
        slot = _slots.slot = next(_slot_counter)
    return slot


def lower_thread_priority() -> None:
    """Bulk worker threads yield the CPU to interactive runs and tokenizing, and the event loop."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: queue order alone
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_NICE)


def _engine_failed(error: BaseException) -> NotServing:
    return NotServing(
        f"the engine failed ({type(error).__name__}: {error}); this replica is not serving, retry on another",
        reason="ENGINE_FAILED",
    )


def _stage_timings(items: list[WorkItem], tokenized: tuple[float, float]) -> StageTimings:
    """From the items' stamps; they were enqueued together and every one has run (its reply is set)."""
    enqueued = items[0].enqueued
    tokenize_start, tokenize_end = tokenized
    runs = {(item.started, item.ran) for item in items if item.started and item.ran}
    if not runs:  # defensive: stamps missing
        return StageTimings(
            0.0,
            0.0,
            tokenize_start,
            tokenize_end,
            enqueued=enqueued,
            run_start=enqueued,
            run_end=enqueued,
            finished=enqueued,
        )
    first_run = min(start for start, _ in runs)
    last_vector = max(item.finished or first_run for item in items)
    return StageTimings(
        queue_seconds=first_run - enqueued,
        inference_seconds=last_vector - first_run,
        tokenize_start=tokenize_start,
        tokenize_end=tokenize_end,
        enqueued=enqueued,
        run_start=first_run,
        run_end=max(end for _, end in runs),
        finished=last_vector,
        runs=tuple(sorted(runs)),
    )


def _fail(batch: list[WorkItem], exc: BaseException) -> None:
    error = exc if isinstance(exc, Exception) else RuntimeError("batch cancelled")
    for item in batch:
        item.reply.fail(error)
