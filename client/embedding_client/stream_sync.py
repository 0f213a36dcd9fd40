"""StreamEmbed with threads: ``streams`` concurrent calls fed from one input, results in order.

Each stream slot has a worker thread that keeps one call sending and opens
the next one when the call breaks (after a backoff), when its server drains,
or when it reaches ``rotate_after`` seconds (so that ``round_robin`` can move
it to another replica). Each call's replies are read by a thread of its own,
which lets a retiring call finish its tail while its successor already sends.
grpc pulls a call's requests from a generator (in grpc's own thread) that
takes resends first, then new batches from the shared input, as the ledger
allows. The caller's thread only waits for the next result in sequence.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Literal

import grpc

from .errors import EmbeddingError, UnavailableError, error_for, from_rpc_error, from_status
from .ledger import Batch, CallState, Ledger, Step, StreamStats
from .proto import embedding_pb2_grpc
from .requests import EmbedOptions
from .results import Embeddings, decode_embeddings
from .retry import RETRYABLE_REPLY_CODES, StreamRetry, stream_error_is_retryable

OnError = Literal["raise", "yield"]
WATCHDOG_PERIOD = 1.0  # seconds between checks for stalled calls while the caller waits


class StreamRun:
    """One ``embed_stream`` run: iterate it for :class:`Embeddings` batches in input order.

    Closing it (or leaving the loop early) cancels the calls and stops the threads.
    """

    def __init__(
        self,
        stub: embedding_pb2_grpc.EmbeddingServiceStub,
        options: EmbedOptions,
        batches: Iterable[list[str]],
        *,
        window: int,
        streams: int,
        max_ahead: int | None,
        metadata: tuple[tuple[str, str], ...],
        retry: StreamRetry,
        on_error: OnError = "raise",
        rotate_after: float | None = None,
    ) -> None:
        if streams < 1:
            raise ValueError(f"streams: must be >= 1, got {streams}")
        self._stub = stub
        self._options = options
        self._input = iter(batches)
        self._metadata = metadata
        self._retry = retry
        self._on_error = on_error
        self._streams = streams
        self.ledger = Ledger(
            window=window,
            max_ahead=max_ahead or 2 * window * streams,
            rotate_after=rotate_after if streams > 1 else None,
        )
        self._cond = threading.Condition()
        self._input_lock = threading.Lock()
        self._calls: dict[int, grpc.Future] = {}  # by attempt
        self._threads: list[threading.Thread] = []
        self._readers: list[threading.Thread] = []
        self._stalled: set[int] = set()
        self._closing = False
        self._started = False

    @property
    def stats(self) -> StreamStats:
        return self.ledger.stats

    # --- the caller's side ----------------------------------------------------

    def __iter__(self) -> Iterator[Embeddings]:
        self._start()
        try:
            while True:
                with self._cond:
                    while not (self.ledger.next_emit in self.ledger.done or self._over()):
                        self._cond.wait(WATCHDOG_PERIOD)
                        self._cancel_stalled()
                    ready = self.ledger.pop_ready()
                    if not ready:
                        if self.ledger.failure is not None:
                            raise self.ledger.failure
                        if self.ledger.input_error is not None:
                            raise self.ledger.input_error
                        return
                    self._cond.notify_all()  # room in the window
                for result in ready:
                    if result.error is not None and self._on_error == "raise":
                        raise result.error
                    yield result
        finally:
            self.close()

    def _over(self) -> bool:
        return self.ledger.failure is not None or self.ledger.finished

    def _cancel_stalled(self) -> None:
        """Watchdog (caller's thread, lock held): cancel calls stuck on a request; readers resend."""
        for attempt in self.ledger.stalled(self._retry.stall_timeout):
            call = self._calls.get(attempt)
            if call is not None and attempt not in self._stalled:
                self._stalled.add(attempt)
                self.ledger.stats.stalled_attempts += 1
                call.cancel()  # the reader sees CANCELLED, which is retried

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self.ledger.fail(error_for(grpc.StatusCode.CANCELLED, "stream closed by the caller"))
            calls = list(self._calls.values())
            self._cond.notify_all()
        for call in calls:
            call.cancel()
        for thread in [*self._threads, *self._readers]:
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    def __enter__(self) -> StreamRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        if self._started:
            raise RuntimeError("a StreamRun can be iterated once")
        self._started = True
        for index in range(self._streams):
            thread = threading.Thread(target=self._worker, name=f"embed-stream-{index}", daemon=True)
            self._threads.append(thread)
            thread.start()

    # --- one stream slot ----------------------------------------------------

    def _worker(self) -> None:
        """Keeps one call sending: opens it, and opens the next when it breaks, drains or rotates.

        A call that stops sending (rotated, or its server is draining) is left
        to its reader thread to finish, so the next call overlaps its tail.
        """
        failures = 0
        while True:
            with self._cond:
                while not (self._closing or self._over() or self.ledger.has_work()):
                    self._cond.wait()
                if self._closing or self._over():
                    return
                attempt = self.ledger.open_attempt()
            state = self._start_call(attempt)
            with self._cond:
                while not (state.finished or self._closing or attempt not in self.ledger.sending):
                    self._cond.wait()
                if self._closing or self.ledger.failure is not None:
                    return
                if not state.finished:
                    state.detached = True  # its reader finishes it; a new call starts now
                    if attempt in self.ledger.rotated:
                        continue
                    delay = self._retry.delay(failures)  # draining: give health checks time to see it
                    failures += 1
                elif state.error is None and not state.requeued:
                    failures = 0
                    continue
                else:
                    if not self._may_retry(state.error):
                        return
                    delay = self._retry.delay(failures)
                    failures += 1
                wake = time.monotonic() + delay
                while not self._closing and (left := wake - time.monotonic()) > 0:
                    self._cond.wait(left)

    def _may_retry(self, error: EmbeddingError | None) -> bool:
        """Whether a broken call may be re-established; else the run fails. Call with the lock held."""
        if error is not None and not stream_error_is_retryable(error.code, error.message):
            self.ledger.fail(error)
            self._cond.notify_all()
            return False
        failing_for = self.ledger.note_failure()
        if failing_for > self._retry.timeout:
            cause = error or UnavailableError("stream ended with requests unanswered")
            message = f"gave up after {failing_for:.0f}s of failed attempts: {cause.message}"
            self.ledger.fail(error_for(cause.code, message))
            self._cond.notify_all()
            return False
        return True

    def _start_call(self, attempt: int) -> CallState:
        call = self._stub.StreamEmbed(self._requests(attempt), metadata=self._metadata)
        state = CallState()
        with self._cond:
            if self._closing:
                call.cancel()
            self._calls[attempt] = call
        reader = threading.Thread(target=self._read, args=(attempt, call, state), daemon=True)
        with self._cond:
            self._readers = [t for t in self._readers if t.is_alive()]
            self._readers.append(reader)
        reader.start()
        return state

    def _read(self, attempt: int, call, state: CallState) -> None:
        """Read one call's replies to its end (runs in its own thread)."""
        error = None
        try:
            for reply in call:
                self._on_reply(attempt, reply)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
        with self._cond:
            self._calls.pop(attempt, None)
            state.requeued = self.ledger.end_attempt(attempt)
            state.error = error
            state.finished = True
            if state.detached and (error is not None or state.requeued) and not self._closing:
                self._may_retry(error)  # its batches went back to the queue; other calls send them
            self._cond.notify_all()

    def _on_reply(self, attempt: int, reply) -> None:
        with self._cond:
            batch = self.ledger.lookup(attempt, reply.request_id)
        if batch is None:
            return  # not ours to answer (cannot happen with a correct server): drop, no duplicates
        if reply.HasField("error") and reply.error.code != 0:
            error = from_status(reply.error, request_id=reply.request_id, offset=batch.offset)
            error.indices = list(range(batch.offset, batch.offset + len(batch.texts)))
            self._on_reply_error(attempt, batch, error)
            return
        try:
            result = decode_embeddings(reply, len(batch.texts), self._options.outputs, batch.offset)
        except EmbeddingError as exc:
            result = Embeddings(count=len(batch.texts), offset=batch.offset, error=exc)
        with self._cond:
            if self.ledger.complete(attempt, batch, result):
                self._cond.notify_all()

    def _on_reply_error(self, attempt: int, batch: Batch, error: EmbeddingError) -> None:
        with self._cond:
            if error.code in RETRYABLE_REPLY_CODES:
                failing_for = self.ledger.note_failure()
                if failing_for <= self._retry.timeout:
                    self.ledger.retry_later(attempt, batch, self._retry.delay(batch.retries))
                    if error.code == grpc.StatusCode.UNAVAILABLE:
                        self.ledger.stop_sending(attempt)  # draining: new work goes to a new stream
                    self._cond.notify_all()
                    return
            result = Embeddings(count=len(batch.texts), offset=batch.offset, error=error)
            if self.ledger.complete(attempt, batch, result):
                self._cond.notify_all()

    def _requests(self, attempt: int) -> Iterator:
        """The requests of one call (runs in grpc's thread); returns to half-close."""
        while True:
            with self._cond:
                action = self.ledger.next_action(attempt)
                while action.step is Step.WAIT and not self._closing:
                    self._cond.wait(action.delay)
                    action = self.ledger.next_action(attempt)
                if self._closing:
                    if action.step is Step.PULL:
                        self.ledger.unreserve()
                    return
            if action.step is Step.END:
                return
            if action.step is Step.SEND:
                yield self._options.request(action.batch.texts, action.batch.request_id)  # type: ignore[union-attr]
                continue
            batch = self._pull(attempt)
            if batch is not None:
                yield self._options.request(batch.texts, batch.request_id)

    def _pull(self, attempt: int) -> Batch | None:
        with self._input_lock:  # held across pull and register: sequence numbers follow the input
            try:
                texts = next(self._input, None)
            except BaseException as exc:  # the caller's iterator failed: hand its error to the caller
                with self._cond:
                    self.ledger.input_failed(exc)
                    self._cond.notify_all()
                return None
            with self._cond:
                batch = self.ledger.register(attempt, texts)
                self._cond.notify_all()
                return batch
