"""The bookkeeping of a StreamEmbed run, shared by the threaded and the asyncio driver.

Every batch of inputs gets a sequence number in input order (its
``request_id``). A batch is *pending* from the moment it is pulled from the
input until its reply arrives, then *done* until it is handed to the caller in
sequence order. A pending batch is either sent on one stream *attempt* or
waiting to be (re)sent. When an attempt breaks, its pending batches go back to
the send queue and nothing else does, so each batch is answered exactly once:
no duplicates (a reply is accepted only from the attempt the batch is
outstanding on) and no gaps (a batch leaves *pending* only with a reply).

Memory is bounded twice: at most ``window`` batches are outstanding on one
attempt, and at most ``max_ahead`` batches exist between the next one to hand
out and the last one pulled from the input, however slow the head of the
line is. The input iterator is therefore never read further ahead than that.

Nothing here blocks or does I/O; drivers hold their lock around each call.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the ledger itself stays free of grpc
    from .errors import EmbeddingError


class Step(Enum):
    SEND = "send"  # send ``batch`` (again)
    PULL = "pull"  # pull the next batch from the input, then call register()
    WAIT = "wait"  # nothing to do now; wait for a change (or ``delay`` seconds)
    END = "end"  # this attempt will send nothing more: half-close it


@dataclass
class Batch:
    seq: int
    texts: list[str]
    offset: int  # position of texts[0] in the whole input
    attempt: int | None = None  # the attempt it is outstanding on; None: waiting to be sent
    not_before: float = 0.0
    retries: int = 0
    sent_at: float = 0.0

    @property
    def request_id(self) -> str:
        return str(self.seq)


@dataclass
class Action:
    step: Step
    batch: Batch | None = None
    delay: float | None = None


@dataclass
class CallState:
    """What the task or thread reading a call reports to its stream slot."""

    finished: bool = False
    detached: bool = False  # the slot moved on to a new call; the reader handles the end
    error: EmbeddingError | None = None
    requeued: int = 0


@dataclass
class StreamStats:
    """Counters for callers, tests and progress displays."""

    requests_sent: int = 0
    requests_resent: int = 0
    attempts: int = 0
    broken_attempts: int = 0  # calls that ended with requests unanswered
    stalled_attempts: int = 0  # calls cancelled because a request went unanswered too long
    rotations: int = 0  # calls closed on purpose after ``rotate_after`` seconds
    peak_ahead: int = 0  # most batches between handed-out and pulled, ever
    peak_outstanding: int = 0  # most batches sent and unanswered on all attempts together
    inputs_pulled: int = 0


@dataclass
class Ledger:
    window: int
    max_ahead: int
    rotate_after: float | None = None
    clock: Callable[[], float] = time.monotonic
    stats: StreamStats = field(default_factory=StreamStats)

    def __post_init__(self) -> None:
        if self.window < 1 or self.max_ahead < 1:
            raise ValueError("window and max_ahead must be >= 1")
        self.pending: dict[int, Batch] = {}
        self.unsent: list[tuple[int, int]] = []  # heap of (seq, seq): resends go lowest seq first
        self.done: dict[int, Any] = {}
        self.next_emit = 0
        self.registered = 0
        self.reserved = 0
        self.exhausted = False
        self.failure: BaseException | None = None
        self.input_error: BaseException | None = None  # raised after every batch before it is out
        self.outstanding: dict[int, int] = {}  # attempt -> batches sent and unanswered
        self.sending: set[int] = set()  # attempts that still take new sends
        self.rotated: set[int] = set()  # attempts that stopped sending because of their age
        self.opened_at: dict[int, float] = {}
        self.failing_since: float | None = None
        self.stalls_in_a_row = 0  # stalls detected since the last reply; reset by complete()
        self._attempt_ids = itertools.count()
        self._inputs = 0

    # --- attempts -------------------------------------------------------------

    def open_attempt(self) -> int:
        attempt = next(self._attempt_ids)
        self.outstanding[attempt] = 0
        self.sending.add(attempt)
        self.opened_at[attempt] = self.clock()
        self.stats.attempts += 1
        return attempt

    def stop_sending(self, attempt: int) -> None:
        """The attempt's server is going away: let its replies drain, send it nothing more."""
        self.sending.discard(attempt)

    def end_attempt(self, attempt: int) -> int:
        """The attempt's call is over: its unanswered batches go back to the send queue."""
        self.sending.discard(attempt)
        self.rotated.discard(attempt)
        self.outstanding.pop(attempt, None)
        self.opened_at.pop(attempt, None)
        requeued = 0
        for batch in self.pending.values():
            if batch.attempt == attempt:
                batch.attempt = None
                heapq.heappush(self.unsent, (batch.seq, batch.seq))
                requeued += 1
        if requeued:
            self.stats.broken_attempts += 1
        return requeued

    # --- sending --------------------------------------------------------------

    def next_action(self, attempt: int) -> Action:
        if self.failure is not None or attempt not in self.sending:
            return Action(Step.END)
        now = self.clock()
        if self.rotate_after is not None and now - self.opened_at[attempt] > self.rotate_after:
            # Long-lived calls stay on one replica; a fresh call lets round_robin rebalance
            # (replicas that started late, came back, or were added).
            self.sending.discard(attempt)
            self.rotated.add(attempt)
            self.stats.rotations += 1
            return Action(Step.END)
        if self.outstanding[attempt] >= self.window:
            return Action(Step.WAIT)
        delay = None
        while self.unsent:
            seq = self.unsent[0][0]
            batch = self.pending.get(seq)
            if batch is None or batch.attempt is not None:  # stale heap entry
                heapq.heappop(self.unsent)
                continue
            if batch.not_before <= now:
                heapq.heappop(self.unsent)
                self._mark_sent(batch, attempt)
                self.stats.requests_resent += 1
                return Action(Step.SEND, batch)
            delay = batch.not_before - now
            break
        if not self.exhausted and self.registered + self.reserved - self.next_emit < self.max_ahead:
            self.reserved += 1
            return Action(Step.PULL)
        if delay is not None or self.reserved or not self.exhausted:
            return Action(Step.WAIT, delay=delay)
        return Action(Step.END)

    def register(self, attempt: int | None, texts: list[str] | None) -> Batch | None:
        """Record a pulled batch (None: the input is exhausted); returns it if ``attempt`` sends it now.

        Call in input order (the driver holds its input lock across pull and
        register), so sequence numbers follow the input.
        """
        self.reserved -= 1
        if texts is None:
            self.exhausted = True
            return None
        batch = Batch(seq=self.registered, texts=texts, offset=self._inputs)
        self.registered += 1
        self._inputs += len(texts)
        self.stats.inputs_pulled = self._inputs
        self.pending[batch.seq] = batch
        self.stats.peak_ahead = max(self.stats.peak_ahead, self.registered - self.next_emit)
        if attempt is not None and attempt in self.sending and self.failure is None:
            self._mark_sent(batch, attempt)
            return batch
        heapq.heappush(self.unsent, (batch.seq, batch.seq))
        return None

    def input_failed(self, error: BaseException) -> None:
        """The input iterator raised after ``reserve``: it ends here, and its error follows the last batch."""
        self.reserved -= 1
        self.exhausted = True
        if self.input_error is None:
            self.input_error = error

    def unreserve(self) -> None:
        """A PULL that was not carried out (the attempt ended first)."""
        self.reserved -= 1

    def _mark_sent(self, batch: Batch, attempt: int) -> None:
        batch.attempt = attempt
        batch.sent_at = self.clock()
        self.outstanding[attempt] += 1
        self.stats.requests_sent += 1
        self.stats.peak_outstanding = max(self.stats.peak_outstanding, sum(self.outstanding.values()))

    # --- replies --------------------------------------------------------------

    def lookup(self, attempt: int, request_id: str) -> Batch | None:
        """The batch a reply answers, if it is outstanding on this attempt (else the reply is ignored)."""
        try:
            seq = int(request_id)
        except ValueError:
            return None
        batch = self.pending.get(seq)
        return batch if batch is not None and batch.attempt == attempt else None

    def complete(self, attempt: int, batch: Batch, result: Any) -> bool:
        """The reply for ``batch`` (a result, or an error to hand out in its place)."""
        if self.pending.get(batch.seq) is not batch or batch.attempt != attempt:
            return False
        del self.pending[batch.seq]
        self.outstanding[attempt] -= 1
        self.done[batch.seq] = result
        self.failing_since = None
        self.stalls_in_a_row = 0
        return True

    def retry_later(self, attempt: int, batch: Batch, delay: float) -> None:
        """A reply said "not now" (queue full, server draining): send the batch again after ``delay``."""
        if self.pending.get(batch.seq) is not batch or batch.attempt != attempt:
            return
        self.outstanding[attempt] -= 1
        batch.attempt = None
        batch.retries += 1
        batch.not_before = self.clock() + delay
        heapq.heappush(self.unsent, (batch.seq, batch.seq))

    # --- failures -------------------------------------------------------------

    def note_failure(self) -> float:
        """A failed attempt or reply; returns how long failures have gone on without a success."""
        now = self.clock()
        if self.failing_since is None:
            self.failing_since = now
        return now - self.failing_since

    def stalled(self, limit: float) -> set[int]:
        """Attempts with a request sent more than ``limit`` seconds ago and still unanswered."""
        cutoff = self.clock() - limit
        return {b.attempt for b in self.pending.values() if b.attempt is not None and b.sent_at < cutoff}

    def fail(self, error: BaseException) -> None:
        if self.failure is None:
            self.failure = error

    # --- handing out ----------------------------------------------------------

    def pop_ready(self) -> list[Any]:
        """Done results that are next in sequence order."""
        ready = []
        while self.next_emit in self.done:
            ready.append(self.done.pop(self.next_emit))
            self.next_emit += 1
        return ready

    @property
    def finished(self) -> bool:
        return self.exhausted and self.reserved == 0 and self.next_emit == self.registered

    def has_work(self) -> bool:
        """Whether an idle stream has something to send (or might, after pulling)."""
        if self.failure is not None:
            return False
        return bool(self.unsent) or not self.exhausted

    def next_due(self) -> float | None:
        """Seconds until the earliest waiting resend is due (0 if one is due now), None if none waits."""
        due = [b.not_before for b in self.pending.values() if b.attempt is None]
        return max(0.0, min(due) - self.clock()) if due else None
