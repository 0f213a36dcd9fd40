"""The decisions of one ``embed_stream`` run, shared by the threaded and the asyncio driver.

The ledger (ledger.py) keeps the books; this decides what to do with them:
when a result is handed out or raised, whether a broken call or a refused
request is tried again and after how long, which calls count as stalled, what
a worker does when its call ends. Nothing here blocks or does I/O: the
drivers (stream_sync.py with threads, stream_async.py with tasks) hold their
lock around each method and do the sending, reading and waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import grpc

from .errors import EmbeddingError, UnavailableError, error_for, from_status
from .ledger import Action, Batch, CallState, Ledger, StreamStats
from .proto import embedding_pb2 as pb
from .requests import EmbedOptions
from .results import Embeddings, decode_embeddings
from .retry import StreamRetry, reply_is_retryable, stream_error_is_retryable

OnError = Literal["raise", "yield"]
WATCHDOG_PERIOD = 1.0  # seconds between checks for stalled calls while the caller waits


@dataclass
class NextCall:
    """What a stream slot does after its call ended, stopped sending or rotated."""

    delay: float  # seconds to wait before opening the next call
    failures: int  # consecutive failures so far (sets the next backoff)


class StreamCore:
    """One run's ledger, its calls by attempt, and every retry and hand-out decision."""

    def __init__(
        self,
        options: EmbedOptions,
        *,
        window: int,
        streams: int,
        max_ahead: int | None,
        retry: StreamRetry,
        on_error: OnError = "raise",
        rotate_after: float | None = None,
    ) -> None:
        if streams < 1:
            raise ValueError(f"streams: must be >= 1, got {streams}")
        self.options = options
        self.retry = retry
        self.on_error = on_error
        self.streams = streams
        self.ledger = Ledger(
            window=window,
            max_ahead=max_ahead or 2 * window * streams,
            rotate_after=rotate_after if streams > 1 else None,
        )
        self.calls: dict[int, Any] = {}  # by attempt: what to cancel
        self.stalled: set[int] = set()
        self.closing = False
        self._started = False

    @property
    def stats(self) -> StreamStats:
        return self.ledger.stats

    def start(self) -> None:
        if self._started:
            raise RuntimeError("a stream run can be iterated once")
        self._started = True

    # --- the caller's side ----------------------------------------------------

    def over(self) -> bool:
        return self.ledger.failure is not None or self.ledger.finished

    def ready_or_over(self) -> bool:
        return self.ledger.next_emit in self.ledger.done or self.over()

    def take_ready(self) -> list[Embeddings] | None:
        """The results next in input order; None when the run is over (its failure is raised)."""
        ready = self.ledger.pop_ready()
        if ready:
            return ready
        if self.ledger.failure is not None:
            raise self.ledger.failure
        if self.ledger.input_error is not None:
            raise self.ledger.input_error
        return None

    def handed_out(self, result: Embeddings) -> Embeddings:
        """A result as the caller gets it: a failed request raises unless ``on_error="yield"``."""
        if result.error is not None and self.on_error == "raise":
            raise result.error
        return result

    def stalled_calls(self) -> list[Any]:
        """Watchdog: calls stuck on a request past ``stall_timeout``, to cancel (their readers resend)."""
        found = []
        for attempt in self.ledger.stalled(self.retry.stall_limit(self.ledger.stalls_in_a_row)):
            call = self.calls.get(attempt)
            if call is not None and attempt not in self.stalled:
                self.stalled.add(attempt)
                self.ledger.stats.stalled_attempts += 1
                found.append(call)
        if found:  # no reply since: the next stall must wait longer (a slow server, not a hung one)
            self.ledger.stalls_in_a_row += 1
        return found

    def crashed(self, error: BaseException) -> None:
        """A stream slot died of something unexpected: the run fails with it (never hangs)."""
        self.ledger.fail(error)

    def close(self) -> list[Any]:
        """The run ends now: the calls to cancel."""
        self.closing = True
        self.ledger.fail(error_for(grpc.StatusCode.CANCELLED, "stream closed by the caller"))
        return list(self.calls.values())

    # --- a stream slot --------------------------------------------------------

    def slot_idle(self) -> bool:
        """Whether a slot waiting to open a call should wake up (work to send, or the end)."""
        return self.closing or self.over() or self.ledger.has_work()

    def slot_done(self) -> bool:
        return self.closing or self.over()

    def call_settled(self, attempt: int, state: CallState) -> bool:
        """Whether the slot's wait on its call is over (ended, stopped sending, or the run closes)."""
        return state.finished or self.closing or self.over() or attempt not in self.ledger.sending

    def after_call(self, attempt: int, state: CallState, failures: int) -> NextCall | None:
        """What the slot does next; None: it stops (the run is over or failed)."""
        if self.closing or self.ledger.failure is not None:
            return None
        if not state.finished:  # it stopped sending: its reader finishes it, a new call starts
            state.detached = True
            if attempt in self.ledger.rotated:
                return NextCall(0.0, failures)
            return NextCall(self.retry.delay(failures), failures + 1)  # draining: let health checks see it
        if state.error is None and not state.requeued:
            return NextCall(0.0, 0)
        if not self.may_retry(state.error):
            return None
        return NextCall(self.retry.delay(failures), failures + 1)

    def may_retry(self, error: EmbeddingError | None) -> bool:
        """Whether a broken call may be re-established; else the run fails with why."""
        if error is not None and not stream_error_is_retryable(error):
            self.ledger.fail(error)
            return False
        failing_for = self.ledger.note_failure()
        if failing_for > self.retry.timeout:
            cause = error or UnavailableError("stream ended with requests unanswered")
            message = f"gave up after {failing_for:.0f}s of failed attempts: {cause.message}"
            self.ledger.fail(error_for(cause.code, message))
            return False
        return True

    def call_ended(self, attempt: int, state: CallState, error: EmbeddingError | None) -> None:
        """A call is over: its unanswered requests go back to the queue."""
        self.calls.pop(attempt, None)
        state.requeued = self.ledger.end_attempt(attempt)
        state.error = error
        state.finished = True
        if state.detached and (error is not None or state.requeued) and not self.closing:
            self.may_retry(error)  # its batches went back to the queue; other calls send them

    def stalled_error(self, attempt: int) -> EmbeddingError | None:
        """The error of a call the watchdog cancelled (None: cancelled for another reason)."""
        if attempt in self.stalled and not self.closing:
            return error_for(grpc.StatusCode.CANCELLED, "stalled call cancelled")
        return None

    # --- sending --------------------------------------------------------------

    def next_action(self, attempt: int) -> Action:
        return self.ledger.next_action(attempt)

    def request(self, batch: Batch) -> pb.EmbedRequest:
        return self.options.request(batch.texts, batch.request_id)

    # --- replies --------------------------------------------------------------

    def lookup(self, attempt: int, reply: pb.EmbedResponse) -> Batch | None:
        """The batch a reply answers (None: not ours to answer; dropped, so no duplicates)."""
        return self.ledger.lookup(attempt, reply.request_id)

    def outcome(
        self, batch: Batch, reply: pb.EmbedResponse, request_id: str | None = None
    ) -> Embeddings | EmbeddingError:
        """The reply as a result or as the request's typed error (pure: no lock needed).

        ``request_id`` is the call's id on the server (its ``x-request-id`` initial metadata).
        """
        if reply.HasField("error") and reply.error.code != 0:
            error = from_status(reply.error, offset=batch.offset, request_id=request_id)
            error.indices = list(range(batch.offset, batch.offset + len(batch.texts)))
            return error
        try:
            result = decode_embeddings(reply, len(batch.texts), self.options.outputs, batch.offset)
        except EmbeddingError as exc:
            result = Embeddings(count=len(batch.texts), offset=batch.offset, error=exc)
        result.request_ids = (request_id,) if request_id else ()
        return result

    def settle(self, attempt: int, batch: Batch, outcome: Embeddings | EmbeddingError) -> bool:
        """Record a reply; a "not now" (queue full, draining) is sent again later, a lasting refusal
        (MEMORY_LIMIT) is the request's result. True: notify waiters."""
        if isinstance(outcome, EmbeddingError):
            if reply_is_retryable(outcome) and self.ledger.note_failure() <= self.retry.timeout:
                delay = max(self.retry.delay(batch.retries), outcome.retry_after or 0.0)
                self.ledger.retry_later(attempt, batch, delay)
                if outcome.code == grpc.StatusCode.UNAVAILABLE:
                    self.ledger.stop_sending(attempt)  # draining: new work goes to a new stream
                return True
            outcome = Embeddings(count=len(batch.texts), offset=batch.offset, error=outcome)
        return self.ledger.complete(attempt, batch, outcome)

    # --- input ----------------------------------------------------------------

    def pulled(self, attempt: int, texts: list[str] | None) -> Batch | None:
        """Register a pulled batch (None: input exhausted); returns it if ``attempt`` sends it now."""
        return self.ledger.register(attempt, texts)

    def input_failed(self, error: BaseException) -> None:
        self.ledger.input_failed(error)
