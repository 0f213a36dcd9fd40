"""Dynamic batching for one model: waiting work → batches → session slots.

Handlers submit tokenized sequences and await their vectors. One dispatcher
task per model hands the next batch to each free session slot: under load,
work piles up while the slots are busy, so batches grow by themselves; at
idle a lone request runs at once. A slot is freed as soon as its session run
ends, and pooling happens on another thread while the next run starts
(tokenize → forward → post-process, as in Infinity).

Admission is bounded in requests and tokens; past the bound, callers get
Overloaded at once instead of a growing queue. Work whose deadline has passed
or whose caller went away is dropped before it reaches the model.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import DeadlineExpired, Overloaded
from ..models.base import RowRequest
from ..models.loader import LoadedModel
from ..models.pooling import truncate_and_normalize
from ..models.types import SequenceVectors, Task
from .batch_selection import select_batch
from .requests import StageTimings
from .work import PaddedBatch, WorkItem, pad


class EngineObserver(Protocol):
    """What the engine reports as it works (implemented by metrics.Metrics)."""

    def on_batch(
        self, model: str, size: int, real_tokens: int, padded_tokens: int, seconds: float
    ) -> None: ...

    def on_request(self, model: str, queue_seconds: float, inference_seconds: float) -> None: ...


@dataclass(frozen=True)
class BatchSettings:
    """How batches form and how much may wait."""

    max_batch_tokens: int = 16384  # padded tokens (longest x count) per session run
    max_batch_size: int = 128  # sequences per session run
    max_padding_waste: int = 16  # padding tokens one more sequence may add to a run (0: no limit)
    max_wait_ms: float = 0.0  # extra wait for a batch to fill when a slot is free
    max_queue_requests: int = 1024  # requests admitted and not yet answered
    max_queue_tokens: int = 4_000_000  # tokens admitted and not yet run


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


class ModelBatcher:
    """Queues, batches and runs the work of one model on its session pool."""

    def __init__(
        self, loaded: LoadedModel, settings: BatchSettings, observer: EngineObserver | None = None
    ) -> None:
        self.model = loaded.model
        self.sessions = loaded.sessions
        self.settings = settings
        self.stats = BatchStats()
        self.observer = observer
        self._waiting: dict[int, list[WorkItem]] = defaultdict(list)
        self._queued_tokens = 0
        self._admitted_requests = 0
        self._work_arrived = asyncio.Event()
        self._free_slots: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(self.sessions.size):
            self._free_slots.put_nowait(slot)
        self._session_threads = ThreadPoolExecutor(
            self.sessions.size, thread_name_prefix=f"run-{self.model.name}"
        )
        self._post_threads = ThreadPoolExecutor(1, thread_name_prefix=f"pool-{self.model.name}")
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    # --- public ------------------------------------------------------------------

    def start(self) -> None:
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_forever())

    async def close(self) -> None:
        if self._dispatcher:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        await asyncio.gather(*self._running, return_exceptions=True)
        self._session_threads.shutdown(wait=True)
        self._post_threads.shutdown(wait=True)

    @property
    def busy(self) -> bool:
        """Whether any admitted request is still unanswered."""
        return self._admitted_requests > 0

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for a session."""
        return sum(len(items) for items in self._waiting.values())

    async def embed(
        self, sequences: list[tuple[np.ndarray, RowRequest]], task: Task, deadline: float | None
    ) -> list[SequenceVectors]:
        """Run sequences (split across batches as needed) and return their vectors in order."""
        vectors, _ = await self.embed_timed(sequences, task, deadline)
        return vectors

    async def embed_timed(
        self, sequences: list[tuple[np.ndarray, RowRequest]], task: Task, deadline: float | None
    ) -> tuple[list[SequenceVectors], StageTimings]:
        """``embed``, and how long the work waited for a session and then ran."""
        tokens = sum(int(ids.shape[0]) for ids, _ in sequences)
        self._admit(tokens)
        loop = asyncio.get_running_loop()
        key = self.model.batch_key(task)
        items = [WorkItem(ids, row, key, int(task), deadline, loop.create_future()) for ids, row in sequences]
        self._waiting[key].extend(items)
        self._queued_tokens += tokens
        self._work_arrived.set()
        try:
            vectors = list(await asyncio.gather(*(item.future for item in items)))
            return vectors, _stage_timings(items)
        except BaseException:
            self._discard(items)  # cancelled or failed: what still waits never runs
            raise
        finally:
            self._admitted_requests -= 1

    # --- admission -----------------------------------------------------------------

    def _admit(self, tokens: int) -> None:
        settings = self.settings
        if self._admitted_requests >= settings.max_queue_requests:
            self.stats.rejected += 1
            raise Overloaded(
                f"server overloaded: {self._admitted_requests} requests in flight for model "
                f"{self.model.name} (limit {settings.max_queue_requests}); retry with backoff",
                reason="QUEUE_FULL",
            )
        if self._queued_tokens and self._queued_tokens + tokens > settings.max_queue_tokens:
            self.stats.rejected += 1
            raise Overloaded(
                f"server overloaded: {self._queued_tokens} tokens queued for model {self.model.name} "
                f"(limit {settings.max_queue_tokens}); retry with backoff",
                reason="QUEUE_FULL",
            )
        self._admitted_requests += 1

    def _discard(self, items: list[WorkItem]) -> None:
        for item in items:
            waiting = self._waiting.get(item.batch_key)
            if waiting and item in waiting:
                waiting.remove(item)
                self._queued_tokens -= item.length
                self.stats.dropped_cancelled += 1
            if not item.future.done():
                item.future.cancel()

    # --- dispatch --------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while True:
            slot = await self._free_slots.get()
            batch = await self._next_batch()
            task = asyncio.get_running_loop().create_task(self._run(slot, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[WorkItem]:
        """Wait for live work, then take the best batch of the key holding the oldest item."""
        while True:
            self._drop_expired()
            if not any(self._waiting.values()):
                self._work_arrived.clear()
                await self._work_arrived.wait()
                continue
            if self.settings.max_wait_ms > 0 and self.queue_depth < self.settings.max_batch_size:
                await asyncio.sleep(self.settings.max_wait_ms / 1000)
                self._drop_expired()
            key = min(
                (k for k, v in self._waiting.items() if v),
                key=lambda k: self._waiting[k][0].arrival,
                default=None,
            )
            if key is None:
                continue
            settings = self.settings
            batch = select_batch(
                self._waiting[key],
                settings.max_batch_tokens,
                settings.max_batch_size,
                settings.max_padding_waste,
            )
            chosen = set(map(id, batch))
            self._waiting[key] = [item for item in self._waiting[key] if id(item) not in chosen]
            self._queued_tokens -= sum(item.length for item in batch)
            return batch

    def _drop_expired(self) -> None:
        """Remove work nobody waits for any more, and fail work past its deadline."""
        now = time.monotonic()
        for key, items in self._waiting.items():
            live = []
            for item in items:
                if item.future.done():
                    self.stats.dropped_cancelled += 1
                elif item.deadline is not None and now >= item.deadline:
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
                self._queued_tokens -= item.length
            self._waiting[key] = live

    async def _run(self, slot: int, batch: list[WorkItem]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for item in batch:
            item.started = started
        try:
            padded, outputs = await loop.run_in_executor(self._session_threads, self._forward, slot, batch)
        except BaseException as exc:
            self._free_slots.put_nowait(slot)
            _fail(batch, exc)
            return
        self._free_slots.put_nowait(slot)  # the next run starts while this one is pooled
        self._record(batch, padded, time.monotonic() - started)
        try:
            vectors = await loop.run_in_executor(
                self._post_threads, self._postprocess, batch, padded, outputs
            )
        except BaseException as exc:
            _fail(batch, exc)
            return
        finished = time.monotonic()
        for item, result in zip(batch, vectors, strict=True):
            item.finished = finished
            if not item.future.done():
                item.future.set_result(result)

    # --- on worker threads ---------------------------------------------------------------

    def _forward(self, slot: int, batch: list[WorkItem]) -> tuple[PaddedBatch, dict[str, np.ndarray]]:
        padded = pad(batch, self.model.tokenizer.pad_id)
        feeds = self.model.feeds(padded.input_ids, padded.attention_mask, Task(batch[0].task))
        return padded, self.sessions.run(slot, self.model.output_names, feeds)

    def _postprocess(
        self, batch: list[WorkItem], padded: PaddedBatch, outputs: dict[str, np.ndarray]
    ) -> list[SequenceVectors]:
        rows = [item.row for item in batch]
        vectors = self.model.postprocess(outputs, padded.input_ids, padded.attention_mask, rows)
        for result, row in zip(vectors, rows, strict=True):
            if result.dense is not None:  # late-chunking windows return token states, pooled by the engine
                result.dense = truncate_and_normalize(result.dense, row.dimensions, self.model.normalizes)
        return vectors

    def _record(self, batch: list[WorkItem], padded: PaddedBatch, seconds: float) -> None:
        stats = self.stats
        stats.runs += 1
        stats.sequences += len(batch)
        stats.real_tokens += padded.real_tokens
        stats.padded_tokens += padded.padded_tokens
        if self.observer is not None:
            self.observer.on_batch(
                self.model.name, len(batch), padded.real_tokens, padded.padded_tokens, seconds
            )


def _stage_timings(items: list[WorkItem]) -> StageTimings:
    enqueued = min(item.enqueued for item in items)
    first_run = min(item.started or enqueued for item in items)
    last_vector = max(item.finished or first_run for item in items)
    return StageTimings(queue_seconds=first_run - enqueued, inference_seconds=last_vector - first_run)


def _fail(batch: list[WorkItem], exc: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("batch cancelled"))
