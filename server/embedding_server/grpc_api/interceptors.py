"""grpc.aio server interceptors: bearer-key auth, and per-call bookkeeping.

``ObservingInterceptor`` (outermost) gives each call a request id and a
``CallContext``, counts it in flight (what a graceful shutdown waits for),
records ``embedding_requests_total`` / ``embedding_request_seconds``, logs one
line per call, and sends the call's timings as trailing metadata, as TEI does
in its ``x-*`` headers:

- ``x-request-id``: the client's ``x-request-id`` metadata (or the
  ``request_id`` field of a unary request) when given, else a fresh one
  (a StreamEmbed call also sends it as initial metadata, so each reply's
  results can carry it);
- ``x-queue-time-ms``, ``x-inference-time-ms``: engine time (summed over the
  requests of a StreamEmbed call); ``x-total-time-ms``: the whole call.

``AuthInterceptor`` answers UNAUTHENTICATED before the handler runs when the
``authorization: Bearer <key>`` metadata is missing or wrong. Health is always
open (probes carry no keys); reflection is open unless ``--auth-reflection``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from ..auth import ApiKeys
from ..call_context import (
    REQUEST_ID_KEY,
    CallContext,
    clean_request_id,
    enter_call,
    leave_call,
    timing_headers,
)
from ..errors import Unauthenticated
from ..metrics import Metrics
from .server import SERVICE_NAME
from .status import abort

log = logging.getLogger("embedding_server.access")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Server streams that run until the client leaves: a client closing one is how the call ends, not a
# failure, so it counts as OK (else every closed Watch would read as an error to rate alerts).
OPEN_ENDED_METHODS = frozenset({HEALTH_PREFIX + "Watch"})
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
OWN_PREFIX = f"/{SERVICE_NAME}/"

MISSING_KEY_MESSAGE = "missing API key: send metadata 'authorization: Bearer <key>'"
WRONG_KEY_MESSAGE = "invalid API key"

# grpc-stubs makes these generic in the request and reply types; interceptors see every method.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"


def method_label(full_method: str) -> str:
    """``Embed`` for this service's methods, ``grpc.health.v1.Health/Check`` for the others."""
    if full_method.startswith(OWN_PREFIX):
        return full_method[len(OWN_PREFIX) :]
    return full_method.lstrip("/")


def is_health(full_method: str) -> bool:
    return full_method.startswith(HEALTH_PREFIX)


def is_reflection(full_method: str) -> bool:
    return full_method.startswith(REFLECTION_PREFIXES)


def metadata_value(metadata: Any, key: str) -> str | None:
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value.decode("ascii", "replace") if isinstance(value, bytes) else value
    return None


def _with_behavior(handler: Handler, behavior: Callable[..., Any]) -> Handler:
    """A handler of the same kind and (de)serializers as ``handler`` around a new behavior."""
    if handler.unary_unary:
        make = grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream:
        make = grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary:
        make = grpc.stream_unary_rpc_method_handler
    else:
        make = grpc.stream_stream_rpc_method_handler
    return make(behavior, handler.request_deserializer, handler.response_serializer)


def _inner_behavior(handler: Handler) -> Callable[..., Any]:
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    assert behavior is not None, "a method handler has one behavior"
    return behavior


def _streams_responses(handler: Handler) -> bool:
    return bool(handler.unary_stream or handler.stream_stream)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for a missing or wrong bearer key, before the handler runs."""

    def __init__(self, keys: ApiKeys, protect_reflection: bool = False) -> None:
        self.keys = keys
        self.protect_reflection = protect_reflection
        # One refusing handler per method and reason, so the handler a call gets is one of a few
        # fixed objects (ObservingInterceptor wraps each of them once).
        self._refusals: dict[tuple[str, str], Handler] = {}

    def exempt(self, full_method: str) -> bool:
        return is_health(full_method) or (not self.protect_reflection and is_reflection(full_method))

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not self.keys.enabled or self.exempt(handler_call_details.method):
            return handler
        authorization = metadata_value(handler_call_details.invocation_metadata, "authorization")
        if self.keys.accepts(authorization):
            return handler
        if authorization:
            error = Unauthenticated(WRONG_KEY_MESSAGE, reason="INVALID_API_KEY")
        else:
            error = Unauthenticated(MISSING_KEY_MESSAGE, reason="MISSING_API_KEY")
        key = (handler_call_details.method, error.reason)
        refusing = self._refusals.get(key)
        if refusing is None:
            refusing = self._refusals[key] = _refusing(handler, error)
        return refusing


def _refusing(handler: Handler, error: Unauthenticated) -> Handler:
    if _streams_responses(handler):

        async def refuse_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            await abort(context, error, "auth")
            # abort raises; the yield only makes this an async generator, as a streaming handler must be
            yield  # type: ignore[unreachable]  # pragma: no cover

        return _with_behavior(handler, refuse_stream)

    async def refuse(request: Any, context: Context) -> Any:
        await abort(context, error, "auth")

    return _with_behavior(handler, refuse)


class InFlight:
    """Calls being served; a graceful shutdown waits until none is left."""

    def __init__(self) -> None:
        self.count = 0
        self.last_started = 0.0  # time.monotonic() of the newest call
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self.last_started = time.monotonic()
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Whether every call finished within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def wait_settled(self, quiet: float, timeout: float) -> bool:
        """Whether, within ``timeout`` seconds, no call was in flight and none had started for ``quiet``.

        A drain that stopped the server the moment the last call finished would
        cancel the calls gRPC has accepted but not yet handed over (a client
        sending again at once); waiting for a quiet moment lets them get their
        UNAVAILABLE first.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not await self.wait_idle(max(0.0, deadline - time.monotonic())):
                return False
            calm = time.monotonic() - self.last_started
            if calm >= quiet and self.count == 0:
                return True
            if time.monotonic() + quiet - calm > deadline:
                return False
            await asyncio.sleep(quiet - calm)


def _code_name(context: Context, error: BaseException | None) -> str:
    code: object = context.code()  # None until the handler sets one, whatever the stubs say
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is None:
        return "OK"
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    return "UNKNOWN"


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, in-flight count, metrics, access log and timing trailers for every call.

    Written for a small per-call cost (tens of microseconds): each method's
    wrapped handler is built once (the request id is read from the call's
    context), the call context is a plain object, no context manager per call.
    """

    def __init__(self, in_flight: InFlight, metrics: Metrics | None = None) -> None:
        self.in_flight = in_flight
        self.metrics = metrics
        # (method, id of the inner handler) → (that handler, kept alive so the id stays its own; wrapped)
        self._wrapped: dict[tuple[str, int], tuple[Handler, Handler]] = {}

    @staticmethod
    def _method(full_method: str) -> tuple[str, bool, bool]:
        """The metrics label; whether the call is quiet (probes and tooling neither hold up a
        shutdown nor fill the access log); whether it is open-ended (ends when the client leaves)."""
        return (
            method_label(full_method),
            is_health(full_method) or is_reflection(full_method),
            full_method in OPEN_ENDED_METHODS,
        )

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        key = (handler_call_details.method, id(handler))
        known = self._wrapped.get(key)
        if known is None:
            known = self._wrapped[key] = (handler, self._wrap(handler_call_details.method, handler))
        return known[1]

    def _wrap(self, full_method: str, handler: Handler) -> Handler:
        method, quiet, open_ended = self._method(full_method)
        inner = _inner_behavior(handler)
        if _streams_responses(handler) and inspect.isasyncgenfunction(inner):

            async def stream_behavior(request: Any, context: Context) -> AsyncIterator[Any]:
                offered_id = metadata_value(context.invocation_metadata(), REQUEST_ID_KEY)
                call, token, started = self._begin(quiet, clean_request_id(offered_id))
                error: BaseException | None = None
                try:
                    if not quiet:  # a stream's replies need their call's id before its trailers come
                        await context.send_initial_metadata(((REQUEST_ID_KEY, call.request_id),))
                    async for reply in inner(request, context):
                        yield reply
                    _send_trailers(context, call, started)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    self._end(method, quiet, context, error, token, started, open_ended)

            return _with_behavior(handler, stream_behavior)

        async def behavior(request: Any, context: Context) -> Any:
            offered_id = metadata_value(context.invocation_metadata(), REQUEST_ID_KEY)
            call, token, started = self._begin(
                quiet, clean_request_id(offered_id or getattr(request, "request_id", None))
            )
            error: BaseException | None = None
            try:
                reply = await inner(request, context)
                _send_trailers(context, call, started)
                return reply
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._end(method, quiet, context, error, token, started, open_ended)

        return _with_behavior(handler, behavior)

    def _begin(self, quiet: bool, request_id: str) -> tuple[CallContext, Any, float]:
        call = CallContext(request_id)
        token = enter_call(call)
        if not quiet:
            self.in_flight.enter()
        return call, token, time.perf_counter()

    def _end(
        self,
        method: str,
        quiet: bool,
        context: Context,
        error: BaseException | None,
        token: Any,
        started: float,
        open_ended: bool = False,
    ) -> None:
        seconds = time.perf_counter() - started
        try:
            code = _code_name(context, error)
            if open_ended and code == "CANCELLED":
                code = "OK"
            if self.metrics is not None:
                self.metrics.observe_call(method, code, seconds)
            if not quiet:
                level = logging.WARNING if code in ("UNKNOWN", "INTERNAL") else logging.INFO
                if log.isEnabledFor(level):
                    log.log(level, "%s %s %.1fms", method, code, seconds * 1000)
        finally:
            if not quiet:
                self.in_flight.leave()
            # A cancelled stream's generator is closed from another Context, where reset() refuses
            # the token; the count above must drop anyway, or shutdown waits out its grace period.
            with contextlib.suppress(ValueError):
                leave_call(token)


def _send_trailers(context: Context, call: CallContext, started: float) -> None:
    """Before the last reply leaves: the call's timings go out as trailing metadata."""
    context.set_trailing_metadata(timing_headers(call, started))
