"""StreamEmbed with threads: ``streams`` concurrent calls fed from one input, results in order.

One worker thread per stream runs a call, reads its replies and, when the
call breaks, re-establishes it after a backoff; grpc pulls each call's
requests from a generator (in grpc's own thread) that takes resends first,
then new batches from the shared input, as the ledger allows. The caller's
thread only waits for the next result in sequence. With ``round_robin`` each
new call goes to a ready replica, so a dead replica's work moves to the others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Literal

import grpc

from .errors import EmbeddingError, UnavailableError, error_for, from_rpc_error, from_status
from .ledger import Batch, Ledger, Step, StreamStats
from .proto import embedding_pb2_grpc
from .requests import EmbedOptions
from .results import Embeddings, decode_embeddings
from .retry import RETRYABLE_REPLY_CODES, StreamRetry, stream_error_is_retryable

OnError = Literal["raise", "yield"]


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
        self.ledger = Ledger(window=window, max_ahead=max_ahead or 2 * window * streams)
        self._cond = threading.Condition()
        self._input_lock = threading.Lock()
        self._calls: set[grpc.Future] = set()
        self._threads: list[threading.Thread] = []
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
                        self._cond.wait()
                    ready = self.ledger.pop_ready()
                    if not ready:
                        if self.ledger.failure is not None:
                            raise self.ledger.failure
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

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self.ledger.fail(error_for(grpc.StatusCode.CANCELLED, "stream closed by the caller"))
            calls = list(self._calls)
            self._cond.notify_all()
        for call in calls:
            call.cancel()
        for thread in self._threads:
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

    # --- one stream -----------------------------------------------------------

    def _worker(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not (self._closing or self._over() or self.ledger.has_work()):
                    self._cond.wait()
                if self._closing or self._over():
                    return
                attempt = self.ledger.open_attempt()
            error = self._run_attempt(attempt)
            with self._cond:
                requeued = self.ledger.end_attempt(attempt)
                self._cond.notify_all()
                if self._closing or self.ledger.failure is not None:
                    return
                if error is None and not requeued:
                    failures = 0
                    continue
                if error is not None and not stream_error_is_retryable(error.code, error.message):
                    self.ledger.fail(error)
                    self._cond.notify_all()
                    return
                failing_for = self.ledger.note_failure()
                if failing_for > self._retry.timeout:
                    cause = error or UnavailableError("stream ended with requests unanswered")
                    self.ledger.fail(
                        error_for(
                            cause.code,
                            f"gave up after {failing_for:.0f}s of failed attempts: {cause.message}",
                        )
                    )
                    self._cond.notify_all()
                    return
                wake = time.monotonic() + self._retry.delay(failures)
                failures += 1
                while not self._closing and (left := wake - time.monotonic()) > 0:
                    self._cond.wait(left)

    def _run_attempt(self, attempt: int) -> EmbeddingError | None:
        """Run one call to its end; the error that ended it, or None if it ended cleanly."""
        call = self._stub.StreamEmbed(self._requests(attempt), metadata=self._metadata)
        with self._cond:
            if self._closing:
                call.cancel()
            self._calls.add(call)
        try:
            for reply in call:
                self._on_reply(attempt, reply)
            return None
        except grpc.RpcError as exc:
            return from_rpc_error(exc)
        finally:
            with self._cond:
                self._calls.discard(call)

    def _on_reply(self, attempt: int, reply) -> None:
        with self._cond:
            batch = self.ledger.lookup(attempt, reply.request_id)
        if batch is None:
            return  # not ours to answer (cannot happen with a correct server): drop, no duplicates
        if reply.HasField("error") and reply.error.code != 0:
            error = from_status(reply.error, request_id=reply.request_id, offset=batch.offset)
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
                    self.ledger.unreserve()
                    self.ledger.fail(exc)
                    self._cond.notify_all()
                return None
            with self._cond:
                batch = self.ledger.register(attempt, texts)
                self._cond.notify_all()
                return batch
