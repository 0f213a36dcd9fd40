"""The Starlette app: OpenAI's embeddings API in front of the gRPC server.

Why Starlette + uvicorn + orjson: Starlette is a thin ASGI toolkit (routing,
request/response) without a validation layer we would have to fight to get
OpenAI's error shape; uvicorn (with httptools' C parser) serves it on the
same asyncio loop as grpc.aio, so the in-process shim needs no thread or
second loop; orjson is the fastest JSON codec for Python and writes numpy
float32 arrays directly, which is most of every response.

Each handler is: check auth, read and validate the body, one call to the
backend (rest/backend.py: the engine in this process, or a gRPC call to a
remote server), translate back. Around each call ``_observed`` does what a
gRPC interceptor does for gRPC, once: the call's request id and
``CallContext``, the metrics, one access-log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from ..auth import ApiKeys
from ..call_context import (
    REQUEST_ID_KEY,
    CallContext,
    clean_request_id,
    current_request_id,
    enter_call,
    leave_call,
)
from ..settings import DEFAULTS
from ..tracing import Tracing
from . import openapi, schema, translate
from .backend import Backend
from .errors import RestError

T = TypeVar("T")

log = logging.getLogger(__name__)
access_log = logging.getLogger("embedding_server.access")  # the gRPC calls' access log too

DEFAULT_MAX_BODY_BYTES = int(DEFAULTS.rest_max_body_mb * 1024 * 1024)

#: The status a call gets when its HTTP client hung up first (nginx's "client closed request"):
#: nobody reads it, but the metrics and the access log tell it from a bad request.
CLIENT_CLOSED = 499

#: ``observe(method, code, seconds)`` per REST call, e.g. ``Metrics.observe_call``.
Observer = Callable[[str, str, float], None]
Endpoint = Callable[[Request], Awaitable[Response]]


class JSONResponse(Response):
    """orjson, numpy arrays included."""

    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(error: RestError) -> JSONResponse:
    headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class Handlers:
    """The routes, bound to one backend, key set and body limit."""

    def __init__(
        self, backend: Backend, api_keys: ApiKeys, max_body_bytes: int, auto_truncate: bool = False
    ) -> None:
        self.backend = backend
        self.auto_truncate = auto_truncate
        self.api_keys = api_keys
        self.max_body_bytes = max_body_bytes
        self.openapi = orjson.dumps(openapi.document(auth=api_keys.enabled))

    def _authorize(self, request: Request) -> str | None:
        """The Authorization header to pass on; 401 here, before the backend is called, when it is wrong."""
        authorization = request.headers.get("authorization")
        if self.api_keys.enabled and not self.api_keys.accepts(authorization):
            raise RestError(
                401,
                "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        return authorization

    async def _read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def embeddings(self, request: Request) -> Response:
        try:
            authorization = self._authorize(request)
            body = await self._read_body(request)
            try:
                decoded = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise RestError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
            parsed = schema.parse_body(decoded)
            message, output_fields = translate.to_embed_request(parsed, self.auto_truncate)
            reply, headers = await cancel_on_disconnect(
                request,
                self.backend.embed(
                    message, authorization, output_fields, current_request_id(), flow=_client_address(request)
                ),
            )
            return JSONResponse(translate.to_embeddings_response(reply, parsed), headers=headers)
        except RestError as error:
            return error_response(error)
        except ClientDisconnect:  # gone while sending the body or waiting: nobody to answer
            return Response(status_code=CLIENT_CLOSED)

    async def models(self, request: Request) -> Response:
        try:
            reply = await self.backend.list_models(self._authorize(request))
            return JSONResponse(translate.to_models_response(reply))
        except RestError as error:
            return error_response(error)

    async def health(self, request: Request) -> Response:
        if await self.backend.serving():
            return JSONResponse({"status": "serving"})
        return JSONResponse({"status": "not_serving"}, status_code=503)

    async def openapi_json(self, request: Request) -> Response:
        return Response(self.openapi, media_type="application/json")


async def _until_disconnected(request: Request) -> None:
    """Returns when the HTTP client goes away (the body is read already, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, call: Awaitable[T]) -> T:
    """Await ``call``, but cancel it (and so its queued work) if the HTTP client hangs up.

    Without this an abandoned request still takes its turn on the model,
    which under overload is exactly the work nobody wants.
    """
    work = asyncio.ensure_future(call)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        raise ClientDisconnect()
    return work.result()


def _too_large(size: int, limit: int) -> RestError:
    return RestError(
        413,
        f"request body of {size} bytes is over the limit of {limit} bytes",
        code="request_too_large",
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in OpenAI's shape too."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(RestError(exc.status_code, message, code=code))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("REST %s %s failed", request.method, request.url.path)
    return error_response(
        RestError(500, f"internal error: {type(exc).__name__}", code="internal_error", type="server_error")
    )


def _observed(method: str, endpoint: Endpoint, observe: Observer | None) -> Endpoint:
    """``endpoint`` inside its call: a ``CallContext`` with the client's ``x-request-id`` (or a fresh
    one) that the backend and every log line of the call see and every answer carries back,
    ``observe(method, HTTP status, seconds)`` when set, and the access-log line, as the gRPC
    interceptor writes for gRPC calls."""

    async def run(request: Request) -> Response:
        call = CallContext(clean_request_id(request.headers.get(REQUEST_ID_KEY)))
        token = enter_call(call)
        started = time.perf_counter()
        try:
            response = await endpoint(request)
            response.headers.setdefault(REQUEST_ID_KEY, call.request_id)  # errors too: the log's id
            seconds = time.perf_counter() - started
            if observe is not None:
                observe(method, str(response.status_code), seconds)
            level = logging.WARNING if response.status_code >= 500 else logging.INFO
            if access_log.isEnabledFor(level):
                access_log.log(level, "%s %d %.1fms", method, response.status_code, seconds * 1000)
            return response
        finally:
            leave_call(token)

    return run


def build_app(
    backend: Backend,
    api_keys: ApiKeys | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    routes: Sequence[BaseRoute] = (),
    observe: Observer | None = None,
    auto_truncate: bool = False,
    tracing: Tracing | None = None,
) -> ASGIApp:
    """The ASGI app; ``routes`` adds more (e.g. the server's ``/metrics``), ``observe`` counts calls,
    ``auto_truncate`` cuts over-long inputs of bodies without ``truncate``, ``tracing`` opens a span
    per call (continuing the client's ``traceparent`` header)."""
    handlers = Handlers(backend, api_keys or ApiKeys(()), max_body_bytes, auto_truncate)
    embeddings = _observed("POST /v1/embeddings", handlers.embeddings, observe)
    models = _observed("GET /v1/models", handlers.models, observe)
    app = Starlette(
        routes=[
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/models", models, methods=["GET"]),
            Route("/health", handlers.health, methods=["GET"]),
            Route("/openapi.json", handlers.openapi_json, methods=["GET"]),
            *routes,
        ],
        exception_handlers={HTTPException: _http_error, Exception: _unexpected},
    )
    return app if tracing is None else tracing.asgi(app)


def _client_address(request: Request) -> str | None:
    """``host:port`` of the HTTP connection: one fair-share flow per client connection, as in gRPC."""
    client = request.client
    return f"{client.host}:{client.port}" if client is not None else None
