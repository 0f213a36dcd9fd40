"""embedding.v1.EmbeddingService over the Embedder."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import grpc
from embedding_client.proto import embedding_pb2 as pb
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from ..call_context import record_engine_time
from ..engine.jobs import EmbedResult
from ..errors import InvalidArgument
from ..models.types import Priority
from ..streaming import DEFAULT_STREAM_WINDOW
from ..tracing import Tracing, mark_failed
from . import convert
from .state import ServingState
from .status import abort, as_service_error, to_rpc_status
from .wire import bad_utf8_field


class MalformedRequest:
    """Stands in for a request whose bytes do not parse (e.g. invalid UTF-8 in a string).

    grpc would answer INTERNAL for a deserializer error; this lets the handler
    answer INVALID_ARGUMENT (reason MALFORMED_REQUEST) instead, and StreamEmbed go on.
    """

    request_id = ""

    def __init__(self, message: str, field: str | None = None, index: int | None = None) -> None:
        self.error = InvalidArgument(message, field=field, index=index, reason="MALFORMED_REQUEST")


def safe_parser(message_class: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_class.FromString(data)
        except Exception as exc:  # protobuf's DecodeError and friends
            # the stubs type DESCRIPTOR as the pure-Python or the upb class; both have the same interface
            bad = bad_utf8_field(cast(Descriptor, message_class.DESCRIPTOR), data)
            if bad is not None:
                field, index = bad
                path = field if index is None else f"{field}[{index}]"
                return MalformedRequest(
                    f"{path}: not valid UTF-8 (a proto3 string must be UTF-8)", field, index
                )
            return MalformedRequest(f"request does not parse as {message_class.__name__}: {exc}")

    return parse


def _check_parsed(request: object) -> None:
    if isinstance(request, MalformedRequest):
        raise request.error


def _recorded(result: EmbedResult, tracing: Tracing | None) -> EmbedResult:
    """The engine's timings of one job go into the call's trailers (summed over a stream), and
    into the trace as the current span's stage children when tracing is on."""
    record_engine_time(result.timings.queue_seconds, result.timings.inference_seconds)
    if tracing is not None:
        tracing.record_stages(result)
    return result


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class EmbeddingServicer:
    """The four RPCs; every failure ends as a status with details (grpc_api/status.py)."""

    def __init__(
        self, state: ServingState, stream_window: int = DEFAULT_STREAM_WINDOW, tracing: Tracing | None = None
    ) -> None:
        self.state = state
        self.stream_window = stream_window
        self.tracing = tracing

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """The reply goes out as the bytes ``encoded_response`` wrote (server.py sends bytes as they are)."""
        try:
            _check_parsed(request)
            result = await self.embed_result(
                request, _deadline(context), Priority.INTERACTIVE, context.peer()
            )
            return convert.encoded_response(request.request_id, result)
        except Exception as exc:
            await abort(context, exc, "Embed")

    async def embed_result(
        self, request: pb.EmbedRequest, deadline: float | None, unspecified: Priority, flow: object
    ) -> EmbedResult:
        """One request through the engine: the step Embed, each StreamEmbed request and the
        in-process REST shim (rest/local.py) share. Raises what the engine raised.

        ``unspecified``: the class of PRIORITY_UNSPECIFIED; ``flow``: the caller's fair-share flow,
        its client connection (a gRPC peer, or an HTTP client's address over REST).
        """
        embedder = self.state.require()
        job = convert.to_job(request, deadline, unspecified, flow=flow)
        return _recorded(await embedder.embed(job), self.tracing)

    async def embed_message(
        self, request: pb.EmbedRequest, deadline: float | None, unspecified: Priority, flow: object
    ) -> pb.EmbedResponse:
        """``embed_result`` as a reply message (the REST shim's)."""
        result = await self.embed_result(request, deadline, unspecified, flow)
        return convert.to_response(request.request_id, result)

    def models_message(self) -> pb.ListModelsResponse:
        embedder = self.state.require()
        return pb.ListModelsResponse(
            models=[convert.model_info(d, d.name == embedder.default_model) for d in embedder.descriptions()]
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        try:
            return self.models_message()
        except Exception as exc:
            await abort(context, exc, "ListModels")

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TokenizeResponse:
        try:
            _check_parsed(request)
            embedder = self.state.require()
            results = await embedder.tokenize(request.model, list(request.inputs), int(request.task))
            return convert.tokenized(results)
        except Exception as exc:
            await abort(context, exc, "Tokenize")

    async def StreamEmbed(
        self, requests: AsyncIterator[pb.EmbedRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.EmbedResponse | bytes]:
        """Every request answered once, in completion order, at most ``stream_window`` in flight.

        The reader takes a window slot before reading the next request and the
        slot is given back only when the reply has been written, so a client
        that sends fast but reads slowly is held back by gRPC flow control
        instead of growing the server's memory.
        """
        window = asyncio.Semaphore(self.stream_window)
        replies: asyncio.Queue[pb.EmbedResponse | bytes | None] = asyncio.Queue()
        in_flight: set[asyncio.Task[None]] = set()
        deadline = _deadline(context)
        flow = context.peer()  # fair share per client connection, however many streams it opens

        async def answer(request: pb.EmbedRequest | MalformedRequest) -> None:
            await replies.put(await self._stream_reply(request, deadline, flow))

        async def read() -> None:
            try:
                async for request in requests:
                    await window.acquire()
                    task = asyncio.get_running_loop().create_task(answer(request))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                await asyncio.gather(*list(in_flight))
            finally:
                await replies.put(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
                window.release()
            await reader  # surfaces a read error (e.g. the client's stream broke)
        except Exception as exc:  # a bug outside any one request: INTERNAL with details, not UNKNOWN
            if context.cancelled():
                raise
            await abort(context, exc, "StreamEmbed")
        finally:
            reader.cancel()
            for task in list(in_flight):
                task.cancel()  # a cancelled call drops its queued work

    async def _stream_reply(
        self, request: pb.EmbedRequest | MalformedRequest, deadline: float | None, flow: object
    ) -> pb.EmbedResponse | bytes:
        if self.tracing is None:
            return await self._stream_answer(request, deadline, flow)
        with self.tracing.stream_request(request.request_id) as span:
            reply = await self._stream_answer(request, deadline, flow)
            if isinstance(reply, pb.EmbedResponse):  # only a failed request's reply is a message
                mark_failed(reply.error.code, reply.error.message, span)
            return reply

    async def _stream_answer(
        self, request: pb.EmbedRequest | MalformedRequest, deadline: float | None, flow: object
    ) -> pb.EmbedResponse | bytes:
        """A reply's bytes (``encoded_response``), or the message that carries its request's error."""
        try:
            _check_parsed(request)
            # _check_parsed raised for a MalformedRequest: this is an EmbedRequest
            result = await self.embed_result(request, deadline, Priority.BATCH, flow)  # type: ignore[arg-type]
            return convert.encoded_response(request.request_id, result)
        except Exception as exc:  # a bug is answered on the stream too (INTERNAL); the stream goes on
            error = as_service_error(exc, f"StreamEmbed request {request.request_id!r}")
            return pb.EmbedResponse(request_id=request.request_id, error=to_rpc_status(error))
