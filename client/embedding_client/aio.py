"""The asyncio client: ``await AsyncEmbeddingClient("host:50051").embed([...])``.

Same methods and results as :class:`~embedding_client.EmbeddingClient`, on a
``grpc.aio`` channel; like it, only the I/O lives here (the rest is
:class:`~embedding_client.core.ClientCore`). Create it inside the event loop that uses it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

import grpc

from .channel import aio_channel
from .core import DEFAULT_ROTATE_AFTER, DEFAULT_WINDOW, USE_CLIENT_DEFAULT, ClientCore, Timeout
from .enums import OutputLike, PriorityLike, TaskLike
from .length_sort import AsyncSortedRun, Plan, async_sorted_requests
from .proto import embedding_pb2 as pb
from .requests import DEFAULT_MAX_BATCH_CHARS, Batcher, EmbedOptions, as_text_list
from .results import (
    Embedding,
    Embeddings,
    ModelInfo,
    TokenizedInput,
    concatenate,
    decode_model,
    decode_tokenized,
)
from .stream_async import AsyncStreamRun
from .stream_core import OnError


class AsyncEmbeddingClient(ClientCore):
    """An asyncio connection to one embedding server or several replicas (arguments: see ClientCore)."""

    def _open_channel(self) -> grpc.aio.Channel:
        return aio_channel(self.target, self.settings)

    async def close(self) -> None:
        if self._own_channel:
            await self.channel.close()

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def embed(
        self,
        texts: str | Iterable[str],
        *,
        model: str | None = None,
        task: TaskLike = None,
        dimensions: int | None = None,
        outputs: OutputLike | Iterable[OutputLike] | None = None,
        late_chunking: bool = False,
        truncate: bool = False,
        priority: PriorityLike = None,
        batch_size: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> Embeddings:
        """Embed texts; a long list goes as several concurrent requests, reassembled in order."""
        options = self._options(model, task, dimensions, outputs, late_chunking, truncate, priority)
        parts = self._parts(texts, late_chunking, batch_size)
        deadline = self._deadline(timeout)
        if len(parts) == 1:
            return await self._embed_part(options, parts[0], None, deadline)
        limit = asyncio.Semaphore(self.max_concurrency)

        async def part(index: int) -> Embeddings:
            async with limit:
                return await self._embed_part(options, parts[index], index * len(parts[0]), deadline)

        tasks = [asyncio.ensure_future(part(i)) for i in range(len(parts))]
        try:
            return concatenate(await asyncio.gather(*tasks))
        finally:
            for task_ in tasks:
                task_.cancel()

    async def _embed_part(
        self, options: EmbedOptions, texts: list[str], offset: int | None, timeout: float | None
    ) -> Embeddings:
        call = self.stub.Embed(options.request(texts), timeout=timeout, metadata=self._metadata)
        try:
            reply = await call
        except grpc.RpcError as exc:
            raise self._error(exc, offset, len(texts)) from exc
        return self._result(reply, await call.trailing_metadata(), options, len(texts), offset or 0)

    async def list_models(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[ModelInfo]:
        try:
            reply = await self.stub.ListModels(
                pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return [decode_model(m) for m in reply.models]

    async def tokenize(
        self,
        texts: str | Iterable[str],
        *,
        model: str | None = None,
        task: TaskLike = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> list[TokenizedInput]:
        request = self._tokenize_request(texts, model, task)
        try:
            reply = await self.stub.Tokenize(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return decode_tokenized(reply)

    def embed_stream_batches(
        self,
        texts: Iterable[str] | AsyncIterable[str] | Iterable[Sequence[str]],
        *,
        model: str | None = None,
        task: TaskLike = None,
        dimensions: int | None = None,
        outputs: OutputLike | Iterable[OutputLike] | None = None,
        late_chunking: bool = False,
        truncate: bool = False,
        priority: PriorityLike = None,
        batch_size: int | None = None,
        window: int = DEFAULT_WINDOW,
        streams: int = 1,
        max_ahead: int | None = None,
        on_error: OnError = "raise",
        metadata: Sequence[tuple[str, str]] | None = None,
        rotate_after: float | None = DEFAULT_ROTATE_AFTER,
        length_sort: int | None = None,
    ) -> AsyncStreamRun | AsyncSortedRun:
        """``async for`` the result: one :class:`Embeddings` per request, in input order.

        Accepts sync and async iterables; see EmbeddingClient.embed_stream_batches.
        Use ``async with`` around it to stop the streams at once if you leave early.
        """
        options = self._options(model, task, dimensions, outputs, late_chunking, truncate, priority)
        core = self._stream_core(
            options,
            window=window,
            streams=streams,
            max_ahead=max_ahead,
            on_error=on_error,
            rotate_after=rotate_after,
            length_sort=length_sort,
        )
        size = batch_size or self.batch_size
        plans: deque[Plan] = deque()
        source: AsyncIterable[list[str]] | Iterable[list[str]]
        if not isinstance(texts, AsyncIterable):
            source = self._stream_source(texts, size, late_chunking, length_sort, plans)
        elif length_sort:
            source = async_sorted_requests(texts, size, length_sort, plans)
        elif late_chunking:
            source = _async_documents(texts)
        else:
            source = _async_batches(texts, size)
        run = AsyncStreamRun(self.stub, core, source, self._stream_metadata(metadata))
        return AsyncSortedRun(run, plans) if length_sort else run

    async def embed_stream(
        self,
        texts: Iterable[str] | AsyncIterable[str],
        *,
        model: str | None = None,
        task: TaskLike = None,
        dimensions: int | None = None,
        outputs: OutputLike | Iterable[OutputLike] | None = None,
        truncate: bool = False,
        priority: PriorityLike = None,
        batch_size: int | None = None,
        window: int = DEFAULT_WINDOW,
        streams: int = 1,
        rotate_after: float | None = DEFAULT_ROTATE_AFTER,
        length_sort: int | None = None,
    ) -> AsyncIterator[Embedding]:
        """One :class:`Embedding` per input, in input order."""
        run = self.embed_stream_batches(
            texts,
            model=model,
            task=task,
            dimensions=dimensions,
            outputs=outputs,
            truncate=truncate,
            priority=priority,
            batch_size=batch_size,
            window=window,
            streams=streams,
            rotate_after=rotate_after,
            length_sort=length_sort,
        )
        async with run:
            async for result in run:
                for item in result:
                    yield item


async def _async_batches(
    texts: AsyncIterable[str], size: int, max_chars: int = DEFAULT_MAX_BATCH_CHARS
) -> AsyncIterator[list[str]]:
    """``requests.batches`` for an async iterable."""
    batcher = Batcher(size, max_chars)
    failure: Exception | None = None
    iterator = aiter(texts)
    while True:
        try:
            complete = batcher.add(await anext(iterator))
        except StopAsyncIteration:
            break
        except Exception as exc:
            failure = exc
            break
        for batch in complete:
            yield batch
    if batcher.batch:
        yield batcher.batch
    if failure is not None:
        raise failure


async def _async_documents(documents: AsyncIterable[Sequence[str]]) -> AsyncIterator[list[str]]:
    async for document in documents:
        yield as_text_list(document)
