"""What the sync and the asyncio client share, decided once (httpx's ``BaseClient`` pattern).

``ClientCore`` parses the constructor's options, merges explicit arguments
into ``settings=`` (a conflict is refused, never silently overridden),
resolves per-call timeouts, builds requests, turns replies and failures into
results and typed errors, and reads the server's request id from the
``x-request-id`` trailer. ``EmbeddingClient`` (client.py) and
``AsyncEmbeddingClient`` (aio.py) subclass it and only do I/O.

Timeouts: a client's ``timeout`` (seconds) bounds every unary call;
``timeout=None`` means no deadline at all, for the client or for one call.
A method's ``timeout`` defaults to :data:`USE_CLIENT_DEFAULT`, "the client's
timeout", so that ``None`` is free to mean "no deadline" everywhere.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, cast

import grpc

from .channel import ChannelSettings
from .enums import OutputLike, PriorityLike, TaskLike, parse_task
from .errors import EmbeddingError, from_rpc_error, metadata_value
from .length_sort import Plan, sorted_requests
from .proto import embedding_pb2 as pb
from .proto import embedding_pb2_grpc
from .requests import DEFAULT_BATCH_SIZE, EmbedOptions, as_text_list, batches, request_parts
from .results import Embeddings, decode_embeddings
from .retry import StreamRetry
from .stream_core import OnError, StreamCore

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 60.0
DEFAULT_WINDOW = 32  # = the server's default --stream-window; more in flight, better length batching
DEFAULT_ROTATE_AFTER = 10.0


class UseClientDefault:
    """The type of :data:`USE_CLIENT_DEFAULT`: "the client's setting", as opposed to None ("none")."""

    _instance: UseClientDefault | None = None

    def __new__(cls) -> UseClientDefault:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"

    def __reduce__(self) -> str:
        return "USE_CLIENT_DEFAULT"


USE_CLIENT_DEFAULT: Final = UseClientDefault()
Timeout = float | None | UseClientDefault

#: Constructor arguments that also live in ChannelSettings (the argument's name = the field's).
CHANNEL_ARGUMENTS = ("api_key", "tls", "root_certificates", "client_certificate", "client_key", "server_name")


def merge_settings(settings: ChannelSettings | None, **explicit: Any) -> ChannelSettings:
    """``settings`` with the explicitly given connection arguments filled in.

    An argument given both ways with different values is refused: which one
    should win is the caller's decision, not ours (an ``api_key`` silently
    dropped fails much later, as UNAUTHENTICATED).
    """
    given = {name: value for name, value in explicit.items() if value is not None and value is not False}
    if settings is None:
        return ChannelSettings(**given)
    defaults = ChannelSettings()
    for name, value in given.items():
        current = getattr(settings, name)
        if current != getattr(defaults, name) and current != value:
            raise ValueError(
                f"{name}: given as an argument and, with a different value, in settings=; pass it once"
            )
    return dataclasses.replace(settings, **given)


def check_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
        raise ValueError(f"{name}: expected seconds > 0, or None for no deadline; got {timeout!r}")
    return timeout


class ClientCore:
    """Options, settings, timeouts, requests, results and errors: everything but the I/O.

    ``target`` is anything gRPC resolves: ``host:port``,
    ``ipv4:10.0.0.1:50051,10.0.0.2:50051``, ``dns:///svc:50051``; calls are
    spread over the replicas round-robin. ``timeout`` (seconds; None: no
    deadline) bounds each unary call; ``model`` is the default for every call.
    Connection arguments (``api_key``, ``tls``, certificates, ``server_name``)
    may come as arguments or in ``settings``, not as both with different values.
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
        channel: Any = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.target = target
        self.settings = merge_settings(
            settings,
            api_key=api_key,
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
            server_name=server_name,
        )
        self.model = model or ""
        self.timeout = check_timeout(timeout)
        self.batch_size = batch_size
        self.max_concurrency = max(1, max_concurrency)
        self.stream_retry = stream_retry or StreamRetry()
        self._own_channel = channel is None
        self.channel = channel if channel is not None else self._open_channel()
        self.stub = embedding_pb2_grpc.EmbeddingServiceStub(self.channel)
        self._metadata = self.settings.metadata()

    def _open_channel(self) -> Any:
        """The I/O shell's channel (sync or asyncio) for ``self.target`` and ``self.settings``."""
        raise NotImplementedError

    # --- per call -----------------------------------------------------------------

    def _deadline(self, timeout: Timeout) -> float | None:
        """A call's timeout in seconds, or None for no deadline."""
        if isinstance(timeout, UseClientDefault):
            return self.timeout
        return check_timeout(timeout)

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

    def _parts(
        self, texts: str | Iterable[str], late_chunking: bool, batch_size: int | None
    ) -> list[list[str]]:
        """The inputs of each request of one ``embed`` call (a late-chunked document stays whole)."""
        return request_parts(texts, late_chunking, batch_size or self.batch_size)

    def _tokenize_request(
        self, texts: str | Iterable[str], model: str | None, task: TaskLike
    ) -> pb.TokenizeRequest:
        return pb.TokenizeRequest(
            model=model or self.model, inputs=as_text_list(texts), task=cast(pb.Task, int(parse_task(task)))
        )

    @staticmethod
    def _result(
        reply: pb.EmbedResponse,
        trailers: Iterable[tuple[str, str | bytes]] | None,
        options: EmbedOptions,
        count: int,
        offset: int = 0,
    ) -> Embeddings:
        result = decode_embeddings(reply, count, options.outputs, offset)
        request_id = metadata_value(trailers)
        result.request_ids = (request_id,) if request_id else ()
        return result

    @staticmethod
    def _error(exc: grpc.RpcError, offset: int | None = None, count: int = 0) -> EmbeddingError:
        """The typed error for a failed call; for one part of a split call, where its inputs were."""
        error = from_rpc_error(exc)
        if offset is not None:
            error.offset = offset
            error.indices = list(range(offset, offset + count))
        return error

    # --- streams ------------------------------------------------------------------

    def _stream_source(
        self,
        texts: Iterable[str] | Iterable[Sequence[str]],
        size: int,
        late_chunking: bool,
        length_sort: int | None,
        plans: deque[Plan],
    ) -> Iterable[list[str]]:
        """The requests' inputs, lazily, from a plain iterable (aio adds async iterables)."""
        if length_sort:
            # without late chunking the items are texts, not documents (the caller checked)
            return sorted_requests(texts, size, length_sort, plans)  # type: ignore[arg-type]
        if late_chunking:
            return (as_text_list(document) for document in texts)
        return batches(texts, size)  # type: ignore[arg-type]  # texts here, as for sorted_requests

    def _stream_core(
        self,
        options: EmbedOptions,
        *,
        window: int,
        streams: int,
        max_ahead: int | None,
        on_error: OnError,
        rotate_after: float | None,
        length_sort: int | None,
    ) -> StreamCore:
        """The decisions of one stream run (sync or asyncio), its options checked once."""
        if length_sort:
            if options.late_chunking:
                raise ValueError("length_sort: late-chunking documents are sent whole, not sorted")
            if on_error != "raise":
                raise ValueError(
                    'length_sort: needs on_error="raise" (a failed request would leave a gap in the order)'
                )
        return StreamCore(
            options,
            window=window,
            streams=streams,
            max_ahead=max_ahead,
            retry=self.stream_retry,
            on_error=on_error,
            rotate_after=rotate_after,
        )

    def _stream_metadata(self, metadata: Sequence[tuple[str, str]] | None) -> tuple[tuple[str, str], ...]:
        return (*self._metadata, *(metadata or ()))
