"""The asyncio client: ``await AsyncEmbeddingClient("host:50051").embed([...])``.

Same methods and results as :class:`~embedding_client.EmbeddingClient`, on a
``grpc.aio`` channel. Create it inside the event loop that uses it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from pathlib import Path

import grpc

from .channel import ChannelSettings, aio_channel, join_metadata
from .client import (
    DEFAULT_ROTATE_AFTER,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    DEFAULT_WINDOW,
    _check_length_sort,
)
from .enums import OutputLike, PriorityLike, TaskLike, parse_task
from .errors import EmbeddingError, from_rpc_error
from .length_sort import AsyncSortedRun, BlockPlan, async_sorted_requests, sorted_requests
from .proto import embedding_pb2 as pb
from .proto import embedding_pb2_grpc
from .requests import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BATCH_CHARS,
    Batcher,
    EmbedOptions,
    as_text_list,
    batches,
    request_parts,
)
from .results import (
    Embedding,
    Embeddings,
    ModelInfo,
    TokenizedInput,
    concatenate,
    decode_embeddings,
    decode_model,
    decode_tokenized,
)
from .retry import StreamRetry
from .stream_async import AsyncStreamRun
from .stream_sync import OnError


class AsyncEmbeddingClient:
    """An asyncio connection to one embedding server or several replicas (see EmbeddingClient)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        model: str | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        client_certificate: bytes | str | Path | None = None,
        client_key: bytes | str | Path | None = None,
        server_name: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_concurrency: int = 4,
        stream_retry: StreamRetry | None = None,
        settings: ChannelSettings | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.target = target
        self.settings = settings or ChannelSettings(
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
            server_name=server_name,
            api_key=api_key,
        )
        self.model = model or ""
        self.timeout = timeout
        self.batch_size = batch_size
        self.max_concurrency = max(1, max_concurrency)
        self.stream_retry = stream_retry or StreamRetry()
        self._own_channel = channel is None
        self.channel = channel if channel is not None else aio_channel(target, self.settings)
        self.stub = embedding_pb2_grpc.EmbeddingServiceStub(self.channel)
        self._metadata = self.settings.metadata()

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
        timeout: float | None = None,
    ) -> Embeddings:
        """Embed texts; a long list goes as several concurrent requests, reassembled in order."""
        options = EmbedOptions.build(
            model or self.model, task, dimensions, outputs, late_chunking, truncate, priority
        )
        parts = request_parts(texts, late_chunking, batch_size or self.batch_size)
        deadline = self.timeout if timeout is None else timeout
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
        try:
            reply = await self.stub.Embed(options.request(texts), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            error: EmbeddingError = from_rpc_error(exc)
            if offset is not None:
                error.offset = offset
                error.indices = list(range(offset, offset + len(texts)))
            raise error from exc
        return decode_embeddings(reply, len(texts), options.outputs, offset or 0)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        try:
            reply = await self.stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return [decode_model(m) for m in reply.models]

    async def tokenize(
        self,
        texts: str | Iterable[str],
        *,
        model: str | None = None,
        task: TaskLike = None,
        timeout: float | None = None,
    ) -> list[TokenizedInput]:
        request = pb.TokenizeRequest(
            model=model or self.model, inputs=as_text_list(texts), task=int(parse_task(task))
        )
        try:
            reply = await self.stub.Tokenize(
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
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
        options = EmbedOptions.build(
            model or self.model, task, dimensions, outputs, late_chunking, truncate, priority
        )
        size = batch_size or self.batch_size
        source: AsyncIterable[list[str]] | Iterable[list[str]]
        plans: deque[BlockPlan] = deque()
        if length_sort:
            _check_length_sort(late_chunking, on_error)
            if isinstance(texts, AsyncIterable):
                blocks = _async_batches(texts, length_sort, max_chars=2**62)  # type: ignore[arg-type]
                source = async_sorted_requests(blocks, size, plans)
            else:
                source = sorted_requests(texts, size, length_sort, plans)  # type: ignore[arg-type]
        elif late_chunking:
            if isinstance(texts, AsyncIterable):
                source = _async_documents(texts)  # type: ignore[arg-type]
            else:
                source = (as_text_list(document) for document in texts)
        elif isinstance(texts, AsyncIterable):
            source = _async_batches(texts, size)
        else:
            source = batches(texts, size)  # type: ignore[arg-type]
        run = AsyncStreamRun(
            self.stub,
            options,
            source,
            window=window,
            streams=streams,
            max_ahead=max_ahead,
            metadata=join_metadata(self._metadata, metadata),
            retry=self.stream_retry,
            on_error=on_error,
            rotate_after=rotate_after,
        )
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
