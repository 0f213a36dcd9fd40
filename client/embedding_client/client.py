"""The synchronous client: ``EmbeddingClient("host:50051").embed(["a text"]).dense``."""

from __future__ import annotations

import itertools
import queue
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import grpc

from .channel import ChannelSettings, join_metadata, sync_channel
from .enums import OutputLike, PriorityLike, TaskLike, parse_task
from .errors import EmbeddingError, from_rpc_error
from .length_sort import BlockPlan, SortedRun, sorted_requests
from .proto import embedding_pb2 as pb
from .proto import embedding_pb2_grpc
from .requests import DEFAULT_BATCH_SIZE, EmbedOptions, as_text_list, batches, request_parts
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
from .stream_sync import OnError, StreamRun

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 60.0
DEFAULT_WINDOW = 32  # = the server's default --stream-window; more in flight, better length batching
DEFAULT_ROTATE_AFTER = 10.0


class EmbeddingClient:
    """A connection to one embedding server or several replicas.

    ``target`` is anything gRPC resolves: ``host:port``,
    ``ipv4:10.0.0.1:50051,10.0.0.2:50051``, ``dns:///svc:50051``; calls are
    spread over the replicas round-robin. ``timeout`` (seconds) bounds each
    unary call; ``model`` is the default for every call. The client is
    thread-safe; close it (or use ``with``) to release the channel.
    """

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
        channel: grpc.Channel | None = None,
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
        self.channel = channel if channel is not None else sync_channel(target, self.settings)
        self.stub = embedding_pb2_grpc.EmbeddingServiceStub(self.channel)
        self._metadata = self.settings.metadata()

    # --- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- unary --------------------------------------------------------------------

    def embed(
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
        """Embed texts; a long list goes as several concurrent requests, reassembled in order.

        With ``late_chunking`` the texts are the chunks of one document and go
        in one request. Raises an :class:`EmbeddingError` subclass on failure
        (``error.offset`` is the first input of the failed request).
        """
        options = self._options(model, task, dimensions, outputs, late_chunking, truncate, priority)
        parts = request_parts(texts, late_chunking, batch_size or self.batch_size)
        deadline = self.timeout if timeout is None else timeout
        if len(parts) == 1:
            return self._embed_one(options, parts[0], deadline)
        return concatenate(self._embed_many(options, parts, len(parts[0]), deadline))

    def _embed_one(self, options: EmbedOptions, texts: list[str], timeout: float | None) -> Embeddings:
        try:
            reply = self.stub.Embed(options.request(texts), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return decode_embeddings(reply, len(texts), options.outputs)

    def _embed_many(
        self, options: EmbedOptions, parts: list[list[str]], size: int, timeout: float | None
    ) -> list[Embeddings]:
        """At most ``max_concurrency`` requests in flight; over round_robin they spread over replicas."""
        results: list[Embeddings | None] = [None] * len(parts)
        finished: queue.SimpleQueue[tuple[int, grpc.Future]] = queue.SimpleQueue()
        running: dict[int, grpc.Future] = {}

        def start(index: int) -> None:
            future = self.stub.Embed.future(
                options.request(parts[index]), timeout=timeout, metadata=self._metadata
            )
            running[index] = future
            future.add_done_callback(lambda done: finished.put((index, done)))

        upcoming = iter(range(len(parts)))
        try:
            for index in itertools.islice(upcoming, self.max_concurrency):
                start(index)
            while running:
                index, future = finished.get()
                del running[index]
                try:
                    reply = future.result()
                except grpc.RpcError as exc:
                    raise _at(from_rpc_error(exc), index * size, len(parts[index])) from exc
                count = len(parts[index])
                results[index] = decode_embeddings(reply, count, options.outputs, index * size)
                following = next(upcoming, None)
                if following is not None:
                    start(following)
        finally:
            for future in running.values():
                future.cancel()
        return results  # type: ignore[return-value]

    def _future(self, options: EmbedOptions, texts: list[str], timeout: float | None) -> grpc.Future:
        return self.stub.Embed.future(options.request(texts), timeout=timeout, metadata=self._metadata)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        try:
            reply = self.stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return [decode_model(m) for m in reply.models]

    def tokenize(
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
            reply = self.stub.Tokenize(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return decode_tokenized(reply)

    # --- streaming ----------------------------------------------------------------

    def embed_stream_batches(
        self,
        texts: Iterable[str] | Iterable[Sequence[str]],
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
    ) -> StreamRun | SortedRun:
        """Embed any iterable through StreamEmbed; iterate the result for one :class:`Embeddings` per request.

        The input is pulled lazily, ``batch_size`` texts per request, with at
        most ``window`` requests in flight per stream and ``max_ahead``
        (default ``2 * window * streams``) between the oldest unfinished and
        the newest pulled: memory stays bounded for any input length.
        ``streams`` calls run side by side (use one per replica to spread a
        corpus over them); with several, each call is replaced by a fresh one
        after ``rotate_after`` seconds so round_robin keeps them spread over
        the live replicas (None: never). A broken stream is re-established and only its
        unanswered requests are re-sent. A failed request raises at its
        position (``on_error="raise"``) or comes back with ``.error`` set
        (``"yield"``). With ``late_chunking`` every item is one document: a
        list of its chunks, sent as one request.

        ``length_sort=N`` reads N texts ahead, sorts them by length and cuts
        them into requests of similar texts, so the server pads less (more
        throughput on mixed-length corpora); each result is then a block of
        N inputs, still in input order (see ``length_sort.py``).
        """
        options = self._options(model, task, dimensions, outputs, late_chunking, truncate, priority)
        size = batch_size or self.batch_size
        source: Iterable[list[str]]
        plans: deque[BlockPlan] = deque()
        if length_sort:
            _check_length_sort(late_chunking, on_error)
            source = sorted_requests(texts, size, length_sort, plans)  # type: ignore[arg-type]
        elif late_chunking:
            source = (as_text_list(document) for document in texts)
        else:
            source = batches(texts, size)  # type: ignore[arg-type]
        run = StreamRun(
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
        return SortedRun(run, plans) if length_sort else run

    def embed_stream(
        self,
        texts: Iterable[str],
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
    ) -> Iterator[Embedding]:
        """One :class:`Embedding` per input, in input order, for an iterable of any length.

        See :meth:`embed_stream_batches` for the flow control and retries.
        """
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
        with run:
            for result in run:
                yield from result

    # --- helpers ------------------------------------------------------------------

    def _options(
        self,
        model: str | None,
        task: TaskLike,
        dimensions: int | None,
        outputs: OutputLike | Iterable[OutputLike] | None,
        late_chunking: bool,
        truncate: bool,
        priority: PriorityLike = None,
    ) -> EmbedOptions:
        return EmbedOptions.build(
            model or self.model, task, dimensions, outputs, late_chunking, truncate, priority
        )


def _check_length_sort(late_chunking: bool, on_error: str) -> None:
    if late_chunking:
        raise ValueError("length_sort: late-chunking documents are sent whole, not sorted")
    if on_error != "raise":
        raise ValueError('length_sort: needs on_error="raise" (a block comes out whole or not at all)')


def _at(error: EmbeddingError, offset: int, count: int) -> EmbeddingError:
    error.offset = offset
    error.indices = list(range(offset, offset + count))
    return error
