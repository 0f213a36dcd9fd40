"""The waiting work of one model: what is queued, in what order it is taken, and what is dropped.

Interactive work waits by batch key (the oldest key's batch goes first).
Batch work waits per flow (one flow per client connection) and is taken by
start-time fair queueing on the padded tokens each flow has been served, so
two corpus jobs get equal shares whatever their request sizes, and a client
with 64 streams on one connection gets one share. A flow that was idle starts
at the current level: no credit for idle time.

Work whose caller went away or whose deadline passed is dropped before it
reaches the model, and each drop is reported to the observer
(``on_dropped``, reason ``cancelled`` or ``deadline``) where it happens.

Touched only on the event loop; ``depth`` is a plain int, safe to read from
the metrics thread.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

from ..errors import DeadlineExpired
from ..models.types import Priority
from .admission import CLASSES
from .batch_selection import select_batch
from .observer import EngineObserver
from .tuning import BatchSettings
from .work import WorkItem


class WorkQueue:
    """Waiting work of one model, per class; the dispatcher takes batches out of it."""

    def __init__(self, model: str, settings: BatchSettings, observer: EngineObserver | None = None) -> None:
        self.model = model
        self.settings = settings
        self.observer = observer
        self._interactive: dict[int, list[WorkItem]] = defaultdict(list)
        self._flows: dict[object, list[WorkItem]] = {}
        self._served: dict[object, float] = {}  # padded tokens run per active flow (its virtual time)
        self._virtual = 0.0  # the served level of the flow last chosen: where a new flow starts
        self._depth = dict.fromkeys(CLASSES, 0)
        # No waiting item's deadline is before this: drop_expired scans only once it has passed.
        self._next_deadline = math.inf

    def depth(self, priority: Priority) -> int:
        """Sequences of one class waiting for a session."""
        return self._depth[priority]

    @property
    def total(self) -> int:
        """Sequences waiting for a session, both classes."""
        return sum(self._depth.values())

    @property
    def flows(self) -> int:
        """Batch flows with work waiting."""
        return len(self._flows)

    def put(self, items: list[WorkItem]) -> None:
        for item in items:
            if item.deadline is not None and item.deadline < self._next_deadline:
                self._next_deadline = item.deadline
            if item.priority == Priority.INTERACTIVE:
                self._interactive[item.batch_key].append(item)
            else:
                waiting = self._flows.get(item.flow)
                if waiting is None:
                    waiting = self._flows[item.flow] = []
                    self._served[item.flow] = max(self._served.get(item.flow, 0.0), self._virtual)
                waiting.append(item)
            self._depth[item.priority] += 1

    def discard(self, items: list[WorkItem]) -> None:
        """Remove what still waits of a request whose caller went away (its reply is cancelled)."""
        dropped = dict.fromkeys(CLASSES, 0)
        for item in items:
            waiting = self._waiting_of(item)
            if waiting and item in waiting:
                waiting.remove(item)
                self._depth[item.priority] -= 1
                dropped[item.priority] += 1
            item.reply.cancel()
        self._forget_empty_flows()
        self._report(dropped, "cancelled")

    def take(self, priority: Priority) -> list[WorkItem]:
        """Remove and return the next batch of a class (it has waiting work)."""
        if priority == Priority.INTERACTIVE:
            queues = self._interactive
            key = min((k for k, v in queues.items() if v), key=lambda k: queues[k][0].arrival)
            source = queues[key]
        else:
            flow = min(self._flows, key=lambda f: (self._served[f], self._flows[f][0].arrival))
            self._virtual = self._served[flow]
            source = self._flows[flow]
        key = source[0].batch_key
        waiting = (
            source
            if all(item.batch_key == key for item in source)
            else [item for item in source if item.batch_key == key]
        )
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
        source[:] = [item for item in source if id(item) not in chosen]
        if priority == Priority.BATCH:
            self._served[flow] += max(item.length for item in batch) * len(batch)
            self._forget_empty_flows()
        self._depth[priority] -= len(batch)
        return batch

    def drop_expired(self) -> None:
        """Fail work past its deadline, and remove work nobody waits for any more.

        Scans the queue only once the earliest deadline of the work it holds has passed: the
        dispatcher calls it before every run, and a request whose caller went away takes its own
        work out (``discard``), so only a deadline needs looking for.
        """
        moment = time.monotonic()
        if moment < self._next_deadline:
            return
        cancelled = dict.fromkeys(CLASSES, 0)
        expired = dict.fromkeys(CLASSES, 0)
        for waiting in self._queues():
            if not any(item.reply.done() or _expired(item, moment) for item in waiting):
                continue
            live = []
            for item in waiting:
                # The deadline first: the first expired item of a request fails its reply, and its
                # other items (the same deadline) are deadline drops too, not cancellations.
                if _expired(item, moment):
                    expired[item.priority] += 1
                    item.reply.fail(
                        DeadlineExpired(
                            "deadline exceeded while queued; the model did not run it",
                            reason="DEADLINE_EXCEEDED_IN_QUEUE",
                        )
                    )
                elif item.reply.done():
                    cancelled[item.priority] += 1
                else:
                    live.append(item)
                    continue
                self._depth[item.priority] -= 1
            waiting[:] = live
        self._next_deadline = min(
            (item.deadline for waiting in self._queues() for item in waiting if item.deadline is not None),
            default=math.inf,
        )
        self._forget_empty_flows()
        self._report(cancelled, "cancelled")
        self._report(expired, "deadline")

    def fail_waiting(self, error: Exception) -> None:
        """Fail everything that waits with ``error`` (shutdown, or the engine failed)."""
        for waiting in self._queues():
            for item in waiting:
                item.reply.fail(error)
            waiting.clear()
        self._depth = dict.fromkeys(CLASSES, 0)
        self._forget_empty_flows()

    # --- internals ------------------------------------------------------------------------

    def _waiting_of(self, item: WorkItem) -> list[WorkItem] | None:
        if item.priority == Priority.INTERACTIVE:
            return self._interactive.get(item.batch_key)
        return self._flows.get(item.flow)

    def _queues(self) -> list[list[WorkItem]]:
        return [*self._interactive.values(), *self._flows.values()]

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

    def _report(self, dropped: dict[Priority, int], reason: str) -> None:
        if self.observer is None:
            return
        for priority, count in dropped.items():
            if count:
                self.observer.on_dropped(self.model, priority, reason, count)


def _expired(item: WorkItem, now: float) -> bool:
    return item.deadline is not None and now >= item.deadline
