"""Typed exceptions for gRPC failures, with what the server's status details say.

Callers catch what they can act on (``except InvalidArgumentError``) instead of
inspecting ``grpc.RpcError.code()``, and read ``reason`` (a stable word such
as ``INPUT_TOO_LONG``), ``field``, ``index``, ``request_id`` and
``retry_after`` from the ``google.rpc`` details the server attaches
(docs/contract.md "Error details"), never from the message. The same classes
serve unary calls (:func:`from_rpc_error`, details from
``grpc-status-details-bin``) and the per-request ``error`` of a StreamEmbed
reply (:func:`from_status`), so both paths look alike to the caller.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "embedding.v1"
REQUEST_ID_KEY = "x-request-id"  # the server's id for a call, sent back as a trailer
_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class ErrorDetails:
    """What a ``google.rpc.Status``'s details say; all None when the status has none.

    A status without our ``ErrorInfo`` did not come from the service's own
    checks (e.g. gRPC's message size limit, a connection failure).
    """

    reason: str | None = None
    field: str | None = None
    index: int | None = None
    request_id: str | None = None
    retry_after: float | None = None
    field_path: str | None = None  # BadRequest's ``inputs[3]``

    @classmethod
    def of(cls, status: status_pb2.Status) -> ErrorDetails:
        values: dict[str, Any] = {}
        for packed in status.details:
            if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                packed.Unpack(info)
                if info.domain == ERROR_DOMAIN:
                    values["reason"] = info.reason
                    values["field"] = info.metadata.get("field")
                    index = info.metadata.get("index")
                    values["index"] = int(index) if index is not None and index.isdigit() else None
            elif packed.Is(error_details_pb2.RequestInfo.DESCRIPTOR):
                request = error_details_pb2.RequestInfo()
                packed.Unpack(request)
                values["request_id"] = request.request_id or None
            elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                packed.Unpack(retry)
                values["retry_after"] = retry.retry_delay.ToNanoseconds() / 1e9
            elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                packed.Unpack(bad)
                if bad.field_violations:
                    values["field_path"] = bad.field_violations[0].field
        return cls(**values)


def status_of(error: grpc.RpcError) -> status_pb2.Status:
    """The call's ``google.rpc.Status``: from ``grpc-status-details-bin``, else code and message alone."""
    code = error.code() if hasattr(error, "code") else None
    message = error.details() if hasattr(error, "details") else str(error)
    try:
        status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None  # type: ignore[arg-type]
    except ValueError:  # details that disagree with the status line: trust the status line
        status = None
    if status is not None:
        return status
    return status_pb2.Status(code=(code or grpc.StatusCode.UNKNOWN).value[0], message=message or "")


def metadata_value(
    metadata: Iterable[tuple[str, str | bytes]] | None, key: str = REQUEST_ID_KEY
) -> str | None:
    """One metadata value (e.g. the ``x-request-id`` trailer), if it came."""
    for item_key, value in metadata or ():
        if item_key == key:
            return value.decode("ascii", "replace") if isinstance(value, bytes) else value
    return None


class EmbeddingError(Exception):
    """A call to the embedding service failed.

    ``code`` is the :class:`grpc.StatusCode`, ``message`` the server's text
    (for people: do not parse it). From the status details: ``reason``
    (``INPUT_TOO_LONG``, ``QUEUE_FULL``, ... see docs/errors.md), ``field``
    (``inputs``, ``dimensions``), ``index`` (the input within the failed
    request), ``request_id`` (the server's id for the call, as in its logs)
    and ``retry_after`` (seconds). For one request of a split or streamed
    call, ``offset`` is the position of its first input in the whole call
    and ``indices[k]`` the position of its ``inputs[k]`` (with
    ``length_sort`` a request holds inputs from all over a block: then only
    ``indices`` is set); :attr:`input_index` combines them.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    indices: list[int] | None = None

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode | None = None,
        *,
        request_id: str | None = None,
        offset: int | None = None,
        reason: str | None = None,
        field: str | None = None,
        index: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        if code is not None:
            self.code = code
        self.message = message
        self.request_id = request_id
        self.offset = offset
        self.reason = reason
        self.field = field
        self.index = index
        self.retry_after = retry_after
        super().__init__(message)

    @property
    def input_index(self) -> int | None:
        """The failed input's position in the whole call, when the server named one."""
        if self.field != "inputs" or self.index is None:
            return None
        if self.indices is not None:
            return self.indices[self.index] if self.index < len(self.indices) else None
        return self.index + (self.offset or 0)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}{self._where()}"

    def _where(self) -> str:
        """Where in the whole call the failed input is, when the call was split or streamed."""
        if self.input_index is not None and (self.indices is not None or self.offset):
            return f" (input #{self.input_index} of the call)"
        if self.offset is not None:
            return f" (in the request starting at input #{self.offset})"
        return ""

    def __reduce__(self):  # picklable across processes, keyword-only fields included
        fields = (self.request_id, self.offset, self.reason, self.field, self.index, self.retry_after)
        return (_rebuild, (type(self), self.message, self.code.name, fields, self.indices))


def _rebuild(
    cls: type[EmbeddingError], message: str, code: str, fields: tuple, indices: list[int] | None
) -> EmbeddingError:
    request_id, offset, reason, field, index, retry_after = fields
    error = cls(
        message,
        grpc.StatusCode[code],
        request_id=request_id,
        offset=offset,
        reason=reason,
        field=field,
        index=index,
        retry_after=retry_after,
    )
    error.indices = indices
    return error


class InvalidArgumentError(EmbeddingError):
    """The request is wrong (the message names the field and, for an input, its index)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(EmbeddingError):
    """The server does not serve the named model."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhaustedError(EmbeddingError):
    """The server's queue is full, or a message is too large."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(EmbeddingError):
    """The call's timeout passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(EmbeddingError):
    """Auth is on and the API key is missing or wrong."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(EmbeddingError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(EmbeddingError):
    """No server could take the call (down, starting up or shutting down)."""

    code = grpc.StatusCode.UNAVAILABLE


class CallCancelledError(EmbeddingError):
    """The call was cancelled (by the client, or by a server shutting down)."""

    code = grpc.StatusCode.CANCELLED


class UnimplementedError(EmbeddingError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(EmbeddingError):
    """A server bug; worth a report with the message."""

    code = grpc.StatusCode.INTERNAL


ERROR_CLASSES: dict[grpc.StatusCode, type[EmbeddingError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        ResourceExhaustedError,
        DeadlineExceededError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        CallCancelledError,
        UnimplementedError,
        InternalError,
    )
}


def error_for(
    code: grpc.StatusCode,
    message: str,
    *,
    details: ErrorDetails | None = None,
    request_id: str | None = None,
    offset: int | None = None,
) -> EmbeddingError:
    """The exception class for ``code`` (EmbeddingError itself for the rest)."""
    facts = details or ErrorDetails()
    cls = ERROR_CLASSES.get(code, EmbeddingError)
    return cls(
        message,
        code,
        request_id=facts.request_id or request_id,
        offset=offset,
        reason=facts.reason,
        field=facts.field,
        index=facts.index,
        retry_after=facts.retry_after,
    )


def from_rpc_error(error: grpc.RpcError) -> EmbeddingError:
    """A typed exception for a failed call (sync or asyncio), details read from its trailers."""
    status = status_of(error)
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return from_status(status, request_id=metadata_value(trailers))


def code_of(value: int) -> grpc.StatusCode:
    return _BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def from_status(
    status: status_pb2.Status, *, request_id: str | None = None, offset: int | None = None
) -> EmbeddingError:
    """A typed exception for a ``google.rpc.Status`` (a StreamEmbed reply's ``error``, or a call's)."""
    details = ErrorDetails.of(status)
    return error_for(
        code_of(status.code), status.message, details=details, request_id=request_id, offset=offset
    )
