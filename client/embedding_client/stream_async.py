"""StreamEmbed on asyncio: the same ledger as ``stream_sync``, driven by tasks instead of threads.

Per stream, one task reads replies and one writes requests; the ledger says
what to write next. Input may be a sync or an async iterable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import grpc

from .errors import EmbeddingError, UnavailableError, error_for, from_rpc_error, from_status
from .ledger import Batch, CallState, Ledger, Step, StreamStats
from .proto import embedding_pb2_grpc
from .requests import EmbedOptions
from .results import Embeddings, decode_embeddings
from .retry import RETRYABLE_REPLY_CODES, StreamRetry, stream_error_is_retryable
from .stream_sync import WATCHDOG_PERIOD, OnError


class AsyncStreamRun:
    """One asyncio ``embed_stream`` run: ``async for`` it for :class:`Embeddings` in input order."""

    def __init__(
        self,
        stub: embedding_pb2_grpc.EmbeddingServiceStub,
        options: EmbedOptions,
        batches: AsyncIterable[list[str]] | Iterable[list[str]],
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
        self._input: Any = batches
        self._metadata = metadata
        self._retry = retry
        self._on_error = on_error
        self._streams = streams
        self.ledger = Ledger(
            window=window,
            max_ahead=max_ahead or 2 * window * streams,
            rotate_after=rotate_after if streams > 1 else None,
        )
        self._changed = asyncio.Condition()
        self._input_lock = asyncio.Lock()
        self._workers: list[asyncio.Task[None]] = []
        self._readers: set[asyncio.Future[None]] = set()
        self._calls: dict[int, Any] = {}  # by attempt
        self._stalled: set[int] = set()
        self._closing = False
        self._started = False

    @property
    def stats(self) -> StreamStats:
        return self.ledger.stats

    async def __aiter__(self) -> AsyncIterator[Embeddings]:
        self._start()
        try:
            while True:
                async with self._changed:
                    while not self._ready_or_over():
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), WATCHDOG_PERIOD)
                        self._cancel_stalled()
                    ready = self.ledger.pop_ready()
                    if not ready:
                        if self.ledger.failure is not None:
                            raise self.ledger.failure
                        if self.ledger.input_error is not None:
                            raise self.ledger.input_error
                        return
                    self._changed.notify_all()
                for result in ready:
                    if result.error is not None and self._on_error == "raise":
                        raise result.error
                    yield result
        finally:
            await self.aclose()

    def _ready_or_over(self) -> bool:
        return self.ledger.next_emit in self.ledger.done or self._over()

    def _over(self) -> bool:
        return self.ledger.failure is not None or self.ledger.finished

    def _cancel_stalled(self) -> None:
        """Watchdog: cancel calls stuck on a request; their readers resend (see stream_sync)."""
        for attempt in self.ledger.stalled(self._retry.stall_timeout):
            call = self._calls.get(attempt)
            if call is not None and attempt not in self._stalled:
                self._stalled.add(attempt)
                self.ledger.stats.stalled_attempts += 1
                call.cancel()

    async def aclose(self) -> None:
        self._closing = True
        self.ledger.fail(error_for(grpc.StatusCode.CANCELLED, "stream closed by the caller"))
        tasks = [*self._workers, *self._readers]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> AsyncStreamRun:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _start(self) -> None:
        if self._started:
            raise RuntimeError("an AsyncStreamRun can be iterated once")
        self._started = True
        if isinstance(self._input, AsyncIterable):
            self._input = aiter(self._input)
        else:
            self._input = iter(self._input)
        self._workers = [asyncio.ensure_future(self._worker()) for _ in range(self._streams)]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- one stream slot ----------------------------------------------------

    async def _worker(self) -> None:
        """Keeps one call sending; see ``stream_sync.StreamRun._worker``."""
        failures = 0
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._closing or self._over() or self.ledger.has_work())
                if self._closing or self._over():
                    return
                attempt = self.ledger.open_attempt()
            state = CallState()
            reader = asyncio.ensure_future(self._run_call(attempt, state))
            self._readers = {r for r in self._readers if not r.done()} | {reader}
            async with self._changed:
                await self._changed.wait_for(
                    lambda: state.finished or self._closing or attempt not in self.ledger.sending  # noqa: B023
                )
                if self._closing or self.ledger.failure is not None:
                    return
                if not state.finished:
                    state.detached = True
                    if attempt in self.ledger.rotated:
                        continue
                    delay = self._retry.delay(failures)
                    failures += 1
                elif state.error is None and not state.requeued:
                    failures = 0
                    continue
                else:
                    if not self._may_retry(state.error):
                        return
                    delay = self._retry.delay(failures)
                    failures += 1
            await asyncio.sleep(delay)

    def _may_retry(self, error: EmbeddingError | None) -> bool:
        if error is not None and not stream_error_is_retryable(error.code, error.message):
            self.ledger.fail(error)
            return False
        failing_for = self.ledger.note_failure()
        if failing_for > self._retry.timeout:
            cause = error or UnavailableError("stream ended with requests unanswered")
            message = f"gave up after {failing_for:.0f}s of failed attempts: {cause.message}"
            self.ledger.fail(error_for(cause.code, message))
            return False
        return True

    async def _run_call(self, attempt: int, state: CallState) -> None:
        """One call from start to end: a writer task sends, this task reads."""
        call = self._stub.StreamEmbed(metadata=self._metadata)
        self._calls[attempt] = call
        writer = asyncio.ensure_future(self._write(call, attempt))
        error = None
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    break
                await self._on_reply(attempt, reply)
            await writer
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
        except asyncio.CancelledError:
            if attempt not in self._stalled or self._closing:
                raise
            error = error_for(grpc.StatusCode.CANCELLED, "stalled call cancelled")
        finally:
            self._calls.pop(attempt, None)
            if not writer.done():
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            if not call.done():
                call.cancel()
            state.requeued = self.ledger.end_attempt(attempt)
            state.error = error
            state.finished = True
            if state.detached and (error is not None or state.requeued) and not self._closing:
                self._may_retry(error)
            await self._notify()

    async def _on_reply(self, attempt: int, reply: Any) -> None:
        batch = self.ledger.lookup(attempt, reply.request_id)
        if batch is None:
            return
        if reply.HasField("error") and reply.error.code != 0:
            error = from_status(reply.error, request_id=reply.request_id, offset=batch.offset)
            error.indices = list(range(batch.offset, batch.offset + len(batch.texts)))
            await self._on_reply_error(attempt, batch, error)
            return
        try:
            result = decode_embeddings(reply, len(batch.texts), self._options.outputs, batch.offset)
        except EmbeddingError as exc:
            result = Embeddings(count=len(batch.texts), offset=batch.offset, error=exc)
        if self.ledger.complete(attempt, batch, result):
            await self._notify()

    async def _on_reply_error(self, attempt: int, batch: Batch, error: EmbeddingError) -> None:
        if error.code in RETRYABLE_REPLY_CODES and self.ledger.note_failure() <= self._retry.timeout:
            self.ledger.retry_later(attempt, batch, self._retry.delay(batch.retries))
            if error.code == grpc.StatusCode.UNAVAILABLE:
                self.ledger.stop_sending(attempt)
        else:
            failed = Embeddings(count=len(batch.texts), offset=batch.offset, error=error)
            self.ledger.complete(attempt, batch, failed)
        await self._notify()

    async def _write(self, call: Any, attempt: int) -> None:
        try:
            while True:
                async with self._changed:
                    action = self.ledger.next_action(attempt)
                    while action.step is Step.WAIT and not self._closing:
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), action.delay)
                        action = self.ledger.next_action(attempt)
                if self._closing or action.step is Step.END:
                    if action.step is Step.PULL:
                        self.ledger.unreserve()
                    break
                batch = action.batch if action.step is Step.SEND else await self._pull(attempt)
                if batch is not None:
                    await call.write(self._options.request(batch.texts, batch.request_id))
            await call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # the call ended; the reader reports why

    async def _pull(self, attempt: int) -> Batch | None:
        async with self._input_lock:  # held across pull and register: sequence numbers follow the input
            try:
                if isinstance(self._input, AsyncIterator):
                    texts = await anext(self._input, None)
                else:
                    texts = next(self._input, None)
            except BaseException as exc:
                self.ledger.input_failed(exc)
                await self._notify()
                return None
            batch = self.ledger.register(attempt, texts)
        await self._notify()
        return batch
