"""The synchronous client: ``EmbeddingClient("host:50051").embed(["a text"]).dense``.

Only the I/O lives here (grpc's blocking stubs, futures, threads); options,
timeouts, requests, results and errors are :class:`~embedding_client.core.ClientCore`'s.
"""

from __future__ import annotations

import itertools
import queue
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

from .channel import sync_channel
from .core import (
    DEFAULT_ROTATE_AFTER,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    DEFAULT_WINDOW,
    USE_CLIENT_DEFAULT,
    ClientCore,
    Timeout,
)
from .enums import OutputLike, PriorityLike, TaskLike
from .length_sort import Plan, SortedRun
from .proto import embedding_pb2 as pb
from .requests import EmbedOptions
from .results import (
    Embedding,
    Embeddings,
    ModelInfo,
    TokenizedInput,
    concatenate,
    decode_model,
    decode_tokenized,
)
from .stream_sync import OnError, StreamRun

__all__ = ["DEFAULT_TARGET", "DEFAULT_TIMEOUT", "DEFAULT_WINDOW", "EmbeddingClient"]


class EmbeddingClient(ClientCore):
    """A connection to one embedding server or several replicas (arguments: see ClientCore).

    The client is thread-safe; close it (or use ``with``) to release the channel.
    """

    def _open_channel(self) -> grpc.Channel:
        return sync_channel(self.target, self.settings)

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
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> Embeddings:
        """Embed texts; a long list goes as several concurrent requests, reassembled in order.

        With ``late_chunking`` the texts are the chunks of one document and go
        in one request. ``timeout``: seconds per request, None for no deadline.
        Raises an :class:`EmbeddingError` subclass on failure (``error.offset``
        is the first input of the failed request, ``error.input_index`` the
        failed input when the server named one).
        """
        options = self._options(model, task, dimensions, outputs, late_chunking, truncate, priority)
        parts = self._parts(texts, late_chunking, batch_size)
        deadline = self._deadline(timeout)
        if len(parts) == 1:
            try:
                reply, call = self.stub.Embed.with_call(
                    options.request(parts[0]), timeout=deadline, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                raise self._error(exc) from exc
            return self._result(reply, call.trailing_metadata(), options, len(parts[0]))
        return concatenate(self._embed_many(options, parts, deadline))

    def _embed_many(
        self, options: EmbedOptions, parts: list[list[str]], timeout: float | None
    ) -> list[Embeddings]:
        """At most ``max_concurrency`` requests in flight; over round_robin they spread over replicas."""
        results: list[Embeddings | None] = [None] * len(parts)
        finished: queue.SimpleQueue[tuple[int, grpc.Future[Any]]] = queue.SimpleQueue()
        running: dict[int, grpc.Future[Any]] = {}
        size = len(parts[0])

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
                    raise self._error(exc, index * size, len(parts[index])) from exc
                trailers = future.trailing_metadata()  # type: ignore[attr-defined]  # a grpc.Call too
                results[index] = self._result(reply, trailers, options, len(parts[index]), index * size)
                following = next(upcoming, None)
                if following is not None:
                    start(following)
        finally:
            for future in running.values():
                future.cancel()
        return results  # type: ignore[return-value]  # every slot is filled once the loop ends

    def list_models(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[ModelInfo]:
        try:
            reply = self.stub.ListModels(
                pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return [decode_model(m) for m in reply.models]

    def tokenize(
        self,
        texts: str | Iterable[str],
        *,
        model: str | None = None,
        task: TaskLike = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> list[TokenizedInput]:
        request = self._tokenize_request(texts, model, task)
        try:
            reply = self.stub.Tokenize(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
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

        ``length_sort=N`` reads up to N texts ahead and cuts requests of
        texts alike in length, each anchored on the oldest unsent text, so the
        server pads less (more throughput on mixed-length corpora); each
        result is then the run of consecutive inputs that reply finished,
        still in input order, with ``offset`` set (see ``length_sort.py``).
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
        plans: deque[Plan] = deque()
        source = self._stream_source(texts, batch_size or self.batch_size, late_chunking, length_sort, plans)
        run = StreamRun(self.stub, core, source, self._stream_metadata(metadata))
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
