"""StreamEmbed on asyncio: the same ledger and decisions as ``stream_sync``, driven by tasks.

Per stream, one task reads replies and one writes requests; stream_core
decides what to write next, what to retry and what to hand out. Input may be
a sync or an async iterable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterable
from typing import Any

import grpc

from .errors import EmbeddingError, from_rpc_error, metadata_value
from .ledger import Batch, CallState, Step, StreamStats
from .proto import embedding_pb2_grpc
from .results import Embeddings
from .stream_core import WATCHDOG_PERIOD, StreamCore


class AsyncStreamRun:
    """One asyncio ``embed_stream`` run: ``async for`` it for :class:`Embeddings` in input order."""

    def __init__(
        self,
        stub: embedding_pb2_grpc.EmbeddingServiceStub,
        core: StreamCore,
        batches: AsyncIterable[list[str]] | Iterable[list[str]],
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        self.core = core
        self.ledger = self.core.ledger
        self._stub = stub
        self._input: Any = batches
        self._metadata = metadata
        self._changed = asyncio.Condition()
        self._input_lock = asyncio.Lock()
        self._workers: list[asyncio.Task[None]] = []
        self._readers: set[asyncio.Future[None]] = set()

    @property
    def stats(self) -> StreamStats:
        return self.core.stats

    async def __aiter__(self) -> AsyncIterator[Embeddings]:
        self._start()
        try:
            while True:
                async with self._changed:
                    while not self.core.ready_or_over():
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), WATCHDOG_PERIOD)
                        for call in self.core.stalled_calls():
                            call.cancel()
                    ready = self.core.take_ready()
                    if ready is None:
                        return
                    self._changed.notify_all()
                for result in ready:
                    yield self.core.handed_out(result)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        self.core.close()
        tasks = [*self._workers, *self._readers]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> AsyncStreamRun:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _start(self) -> None:
        self.core.start()
        self._input = aiter(self._input) if isinstance(self._input, AsyncIterable) else iter(self._input)
        self._workers = [asyncio.ensure_future(self._worker()) for _ in range(self.core.streams)]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- one stream slot ----------------------------------------------------

    async def _worker(self) -> None:
        """Keeps one call sending; see ``stream_sync.StreamRun._worker`` (which also fails the run)."""
        await self._failing_the_run(self._keep_sending())

    async def _failing_the_run(self, work: Awaitable[None]) -> None:
        """Await ``work``; anything unexpected fails the run, so neither the caller nor a worker
        waiting on a call's end waits forever."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.core.crashed(exc)
            await self._notify()

    async def _keep_sending(self) -> None:
        failures = 0
        while True:
            async with self._changed:
                await self._changed.wait_for(self.core.slot_idle)
                if self.core.slot_done():
                    return
                attempt = self.ledger.open_attempt()
            state = CallState()
            reader = asyncio.ensure_future(self._failing_the_run(self._run_call(attempt, state)))
            self._readers = {r for r in self._readers if not r.done()} | {reader}
            async with self._changed:
                await self._changed.wait_for(lambda: self.core.call_settled(attempt, state))  # noqa: B023
                following = self.core.after_call(attempt, state, failures)
                self._changed.notify_all()
            if following is None:
                return
            failures = following.failures
            await asyncio.sleep(following.delay)

    async def _run_call(self, attempt: int, state: CallState) -> None:
        """One call from start to end: a writer task sends, this task reads."""
        call = self._stub.StreamEmbed(metadata=self._metadata)
        self.core.calls[attempt] = call
        writer = asyncio.ensure_future(self._write(call, attempt))
        error: EmbeddingError | None = None
        try:
            request_id = metadata_value(await call.initial_metadata())
            while (reply := await call.read()) is not grpc.aio.EOF:
                batch = self.core.lookup(attempt, reply)
                if batch is None:
                    continue  # not ours to answer: dropped, so no duplicates
                if self.core.settle(attempt, batch, self.core.outcome(batch, reply, request_id)):
                    await self._notify()
            await writer
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
        except asyncio.CancelledError:
            error = self.core.stalled_error(attempt)
            if error is None:
                raise
        finally:
            if not writer.done():
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            if not call.done():
                call.cancel()
            self.core.call_ended(attempt, state, error)
            await self._notify()

    async def _write(self, call: Any, attempt: int) -> None:
        try:
            while True:
                async with self._changed:
                    action = self.core.next_action(attempt)
                    while action.step is Step.WAIT and not self.core.closing:
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), action.delay)
                        action = self.core.next_action(attempt)
                if self.core.closing or action.step is Step.END:
                    if action.step is Step.PULL:
                        self.ledger.unreserve()
                    break
                batch = action.batch if action.step is Step.SEND else await self._pull(attempt)
                if batch is not None:
                    await call.write(self.core.request(batch))
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
                self.core.input_failed(exc)
                await self._notify()
                return None
            batch = self.core.pulled(attempt, texts)
        await self._notify()
        return batch
