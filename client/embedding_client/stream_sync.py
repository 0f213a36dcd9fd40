"""StreamEmbed with threads: ``streams`` concurrent calls fed from one input, results in order.

Each stream slot has a worker thread that keeps one call sending and opens
the next one when the call breaks (after a backoff), when its server drains,
or when it reaches ``rotate_after`` seconds (so that ``round_robin`` can move
it to another replica). Each call's replies are read by a thread of its own,
which lets a retiring call finish its tail while its successor already sends.
grpc pulls a call's requests from a generator (in grpc's own thread) that
takes resends first, then new batches from the shared input, as the ledger
allows. The caller's thread only waits for the next result in sequence.
Every decision (retry, backoff, hand-out, stall) is stream_core's; this file
only runs threads around it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import grpc

from .errors import from_rpc_error, metadata_value
from .ledger import Batch, CallState, Step, StreamStats
from .proto import embedding_pb2 as pb
from .proto import embedding_pb2_grpc
from .results import Embeddings
from .stream_core import WATCHDOG_PERIOD, OnError, StreamCore

__all__ = ["OnError", "StreamRun"]


class _ReplyCall(Protocol):
    """What a StreamEmbed call is to its reader: the replies, and the metadata sent before them."""

    def __iter__(self) -> Iterator[pb.EmbedResponse]: ...

    def initial_metadata(self) -> Sequence[tuple[str, str | bytes]]: ...


class StreamRun:
    """One ``embed_stream`` run: iterate it for :class:`Embeddings` batches in input order.

    Closing it (or leaving the loop early) cancels the calls and stops the threads.
    """

    def __init__(
        self,
        stub: embedding_pb2_grpc.EmbeddingServiceStub,
        core: StreamCore,
        batches: Iterable[list[str]],
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        self.core = core
        self.ledger = self.core.ledger
        self._stub = stub
        self._input = iter(batches)
        self._metadata = metadata
        self._cond = threading.Condition()
        self._input_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._readers: list[threading.Thread] = []

    @property
    def stats(self) -> StreamStats:
        return self.core.stats

    # --- the caller's side ----------------------------------------------------

    def __iter__(self) -> Iterator[Embeddings]:
        self._start()
        try:
            while True:
                with self._cond:
                    while not self.core.ready_or_over():
                        self._cond.wait(WATCHDOG_PERIOD)
                        for call in self.core.stalled_calls():
                            call.cancel()  # the reader sees CANCELLED, which is retried
                    ready = self.core.take_ready()
                    if ready is None:
                        return
                    self._cond.notify_all()  # room in the window
                for result in ready:
                    yield self.core.handed_out(result)
        finally:
            self.close()

    def close(self) -> None:
        with self._cond:
            calls = self.core.close()
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
        self.core.start()
        for index in range(self.core.streams):
            thread = threading.Thread(target=self._worker, name=f"embed-stream-{index}", daemon=True)
            self._threads.append(thread)
            thread.start()

    # --- one stream slot ----------------------------------------------------

    def _worker(self) -> None:
        """Keeps one call sending: opens it, and opens the next when it breaks, drains or rotates.

        A call that stops sending (rotated, or its server is draining) is left
        to its reader thread to finish, so the next call overlaps its tail.
        Anything unexpected (a closed client's channel, a bug) fails the run
        with that exception, so the caller gets it instead of waiting forever.
        """
        try:
            self._keep_sending()
        except BaseException as exc:
            with self._cond:
                self.core.crashed(exc)
                self._cond.notify_all()

    def _keep_sending(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self.core.slot_idle():
                    self._cond.wait()
                if self.core.slot_done():
                    return
                attempt = self.ledger.open_attempt()
            state = self._start_call(attempt)
            with self._cond:
                while not self.core.call_settled(attempt, state):
                    self._cond.wait()
                following = self.core.after_call(attempt, state, failures)
                self._cond.notify_all()
                if following is None:
                    return
                failures = following.failures
                wake = time.monotonic() + following.delay
                while not self.core.closing and (left := wake - time.monotonic()) > 0:
                    self._cond.wait(left)

    def _start_call(self, attempt: int) -> CallState:
        call = self._stub.StreamEmbed(self._requests(attempt), metadata=self._metadata)
        state = CallState()
        with self._cond:
            if self.core.closing:
                call.cancel()
            self.core.calls[attempt] = call
        reader = threading.Thread(target=self._read, args=(attempt, call, state), daemon=True)
        with self._cond:
            self._readers = [t for t in self._readers if t.is_alive()]
            self._readers.append(reader)
        reader.start()
        return state

    def _read(self, attempt: int, call: _ReplyCall, state: CallState) -> None:
        """Read one call's replies to its end (runs in its own thread)."""
        error = None
        try:
            request_id = metadata_value(call.initial_metadata())
            for reply in call:
                with self._cond:
                    batch = self.core.lookup(attempt, reply)
                if batch is not None:
                    outcome = self.core.outcome(batch, reply, request_id)  # decoding outside the lock
                    with self._cond:
                        if self.core.settle(attempt, batch, outcome):
                            self._cond.notify_all()
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
        with self._cond:
            self.core.call_ended(attempt, state, error)
            self._cond.notify_all()

    def _requests(self, attempt: int) -> Iterator[pb.EmbedRequest]:
        """The requests of one call (runs in grpc's thread); returns to half-close."""
        while True:
            with self._cond:
                action = self.core.next_action(attempt)
                while action.step is Step.WAIT and not self.core.closing:
                    self._cond.wait(action.delay)
                    action = self.core.next_action(attempt)
                if self.core.closing:
                    if action.step is Step.PULL:
                        self.ledger.unreserve()
                    return
            if action.step is Step.END:
                return
            batch = action.batch if action.step is Step.SEND else self._pull(attempt)
            if batch is not None:
                yield self.core.request(batch)

    def _pull(self, attempt: int) -> Batch | None:
        with self._input_lock:  # held across pull and register: sequence numbers follow the input
            try:
                texts = next(self._input, None)
            except BaseException as exc:  # the caller's iterator failed: hand its error to the caller
                with self._cond:
                    self.core.input_failed(exc)
                    self._cond.notify_all()
                return None
            with self._cond:
                batch = self.core.pulled(attempt, texts)
                self._cond.notify_all()
                return batch
