"""The one mapping from engine errors to gRPC statuses with ``google.rpc`` details.

docs/contract.md ("Error details", AIP-193): every error carries
``ErrorInfo`` (stable ``reason``, domain ``embedding.v1``, metadata ``field``
and ``index`` when known) and ``RequestInfo`` (the call's request id, as in
the logs and the ``x-request-id`` trailer); ``INVALID_ARGUMENT`` adds a
``BadRequest`` field violation (``inputs[3]``), a full queue a ``RetryInfo``
(MEMORY_LIMIT none, and a trailer that stops gRPC's retries: ``to_grpc_status``).
Unary calls send the status as ``grpc-status-details-bin``; a StreamEmbed
reply carries the same ``google.rpc.Status`` in ``EmbedResponse.error``.
Clients and the REST shim read these details, never the message text.

Anything that is not a ServiceError is a bug: it is logged with the request
id and becomes INTERNAL, on every RPC.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..call_context import REQUEST_ID_KEY, current_request_id
from ..errors import ERROR_DOMAIN, Code, InternalError, ServiceError
from ..tracing import mark_failed

log = logging.getLogger(__name__)

#: A trailer that tells gRPC's retry policy not to retry this status (gRFC A6 server pushback).
NO_RETRY = ("grpc-retry-pushback-ms", "-1")


def status_code(error: ServiceError) -> grpc.StatusCode:
    """The gRPC status code of an engine error (errors.Code names equal grpc's)."""
    return grpc.StatusCode[error.code.name]


def as_service_error(exc: BaseException, what: str) -> ServiceError:
    """``exc`` itself when the engine raised it on purpose; else, logged, an INTERNAL error."""
    if isinstance(exc, ServiceError):
        return exc
    # The log setup appends the current request id to every line; ``extra`` makes it explicit here.
    log.error(
        "%s failed: %s", what, type(exc).__name__, exc_info=exc, extra={"request_id": current_request_id()}
    )
    return InternalError(f"internal error: {type(exc).__name__}")


def to_rpc_status(error: ServiceError, request_id: str | None = None) -> status_pb2.Status:
    """A ``google.rpc.Status`` with the details the contract lists."""
    request_id = request_id if request_id is not None else current_request_id()
    metadata = {}
    if error.field is not None:
        metadata["field"] = error.field
    if error.index is not None:
        metadata["index"] = str(error.index)
    details: list[Message] = [
        error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)
    ]
    if request_id:
        details.append(error_details_pb2.RequestInfo(request_id=request_id))
    if error.code is Code.INVALID_ARGUMENT and error.field_path is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field_path, description=error.message, reason=error.reason
        )
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(error.retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=status_code(error).value[0], message=error.message, details=packed)


def to_grpc_status(error: ServiceError, request_id: str | None = None) -> grpc.Status:
    """The status to abort a call with: details in ``grpc-status-details-bin``, plus ``x-request-id``.

    A RESOURCE_EXHAUSTED with no retry hint (MEMORY_LIMIT: the same request fails
    every time) also carries ``grpc-retry-pushback-ms: -1``: clients' retry
    policies list RESOURCE_EXHAUSTED for a full queue, and gRPC (gRFC A6) does
    not retry a status with a negative pushback.
    """
    converted = rpc_status.to_status(to_rpc_status(error, request_id))
    trailers = tuple(converted.trailing_metadata)
    if error.code is Code.RESOURCE_EXHAUSTED and error.retry_after is None:
        trailers += (NO_RETRY,)
    request_id = request_id if request_id is not None else current_request_id()
    if request_id:
        trailers += ((REQUEST_ID_KEY, request_id),)
    return _Status(converted.code, converted.details, trailers)


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, what: str) -> NoReturn:
    """End the call with the status for ``exc`` (an unexpected one is logged and sent as INTERNAL)."""
    status = to_grpc_status(as_service_error(exc, what))
    mark_failed(status.code, status.details)
    await context.abort_with_status(status)
    raise AssertionError("unreachable")  # abort_with_status raises


class _Status(
    NamedTuple(
        "_Status",
        [
            ("code", grpc.StatusCode),
            ("details", str),
            ("trailing_metadata", tuple[tuple[str, str | bytes], ...]),
        ],
    ),
    grpc.Status,
):
    """What ``abort_with_status`` takes (grpc_status builds the same, without our trailer)."""
