"""Admission for one model: how many requests and tokens may be in flight, per class.

A request is admitted before it is tokenized (a permit first, as in
text-embeddings-inference's ``infer.rs``): an overloaded server refuses work
without tokenizing it. The count bound is taken by ``admit``, the token bound
by ``Admission.reserve`` (an upper bound from the characters, just before
tokenizing) and settled to the real count after; the permit is released when
the request is answered. Batch work may hold at most ``BATCH_ADMISSION_SHARE``
of either bound, so queries still get in behind a corpus job.

``AdmissionControl`` is the only writer of the counters; every refusal is
reported to the observer where it happens.
"""

from __future__ import annotations

import copy

from ..errors import MemoryLimitExceeded, NotServing, Overloaded
from ..models.types import Priority
from .memory import MIB
from .observer import EngineObserver
from .tuning import BatchSettings

CLASSES = (Priority.INTERACTIVE, Priority.BATCH)
#: Batch work may hold at most this share of the admission limits; the rest is the queries'.
BATCH_ADMISSION_SHARE = 0.75


class Admission:
    """One request's place in the admission bounds, from before tokenizing until it is answered."""

    def __init__(self, control: AdmissionControl, priority: Priority) -> None:
        self._control = control
        self.priority = priority
        self.tokens = 0
        self.released = False

    def reserve(self, tokens: int) -> None:
        """Take ``tokens`` more of the token bound, or Overloaded."""
        self._control._take_tokens(self.priority, tokens)
        self.tokens += tokens

    def settle(self, tokens: int) -> None:
        """Replace what was reserved (the estimate taken before tokenizing) with the real count."""
        if not self.released:
            self._control._move_tokens(self.priority, tokens - self.tokens)
            self.tokens = tokens

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._control._release(self.priority, self.tokens)


class AdmissionControl:
    """The admission bounds of one model and the counts held against them (event loop only)."""

    def __init__(self, model: str, settings: BatchSettings, observer: EngineObserver | None = None) -> None:
        self.model = model
        self.settings = settings
        self.observer = observer
        self._requests = dict.fromkeys(CLASSES, 0)
        self._tokens = dict.fromkeys(CLASSES, 0)
        self._closed: NotServing | None = None

    @property
    def admitted(self) -> int:
        """Requests admitted and not yet answered, both classes."""
        return sum(self._requests.values())

    @property
    def busy(self) -> bool:
        """Whether any admitted request is still unanswered."""
        return self.admitted > 0

    def close(self, error: NotServing) -> None:
        """Refuse every later request with ``error`` (the engine failed)."""
        self._closed = error

    def admit(self, priority: Priority = Priority.INTERACTIVE) -> Admission:
        """Take one request's place in the count bound, or Overloaded; its tokens come with ``reserve``."""
        if self._closed is not None:
            raise copy.copy(self._closed)  # a fresh one per caller: a raised exception keeps its traceback
        limit = max(1, int(self.settings.max_queue_requests * share(priority)))
        requests = self.admitted
        if requests >= limit:
            raise self._full(priority, f"{requests} requests in flight", limit)
        self._requests[priority] += 1
        return Admission(self, priority)

    def check_fits(
        self, lengths: list[int], priority: Priority = Priority.INTERACTIVE, field: str = "inputs"
    ) -> None:
        """MemoryLimitExceeded for the first sequence too long to run alone in the memory budget."""
        budget = self.settings.memory
        if budget is None:
            return
        for index, length in enumerate(lengths):
            if not budget.fits(1, length):
                self.refuse(priority, "MEMORY_LIMIT")
                raise MemoryLimitExceeded(
                    f"{field}[{index}]: {length} tokens do not fit this server's memory budget "
                    f"(at most {budget.longest_single()} tokens per sequence for model {self.model}; "
                    f"it needs a memory limit of about {-(-budget.limit_for(length) // MIB)}MiB: "
                    "raise --memory-limit or send shorter inputs)",
                    field=field,
                    index=index,
                )

    def refuse(self, priority: Priority, reason: str) -> None:
        """Report a refusal (``QUEUE_FULL``, ``MEMORY_LIMIT``) where it is decided."""
        if self.observer is not None:
            self.observer.on_refused(self.model, priority, reason)

    # --- for Admission ------------------------------------------------------------------

    def _take_tokens(self, priority: Priority, tokens: int) -> None:
        limit = max(1, int(self.settings.max_queue_tokens * share(priority)))
        queued = sum(self._tokens.values())
        if queued and queued + tokens > limit:
            raise self._full(priority, f"{queued} tokens queued", limit)
        self._tokens[priority] += tokens

    def _full(self, priority: Priority, held: str, limit: int) -> Overloaded:
        """A QUEUE_FULL refusal, reported; ``held``: what is already in (``3 requests in flight``)."""
        self.refuse(priority, "QUEUE_FULL")
        return Overloaded(
            f"server overloaded: {held} for model {self.model} "
            f"(limit {limit} for {priority.name.lower()} work); retry with backoff",
            reason="QUEUE_FULL",
            retry_after=0.5,
        )

    def _move_tokens(self, priority: Priority, change: int) -> None:
        self._tokens[priority] += change

    def _release(self, priority: Priority, tokens: int) -> None:
        self._requests[priority] -= 1
        self._tokens[priority] -= tokens


def share(priority: Priority) -> float:
    """The part of each admission bound a class may hold."""
    return 1.0 if priority == Priority.INTERACTIVE else BATCH_ADMISSION_SHARE
