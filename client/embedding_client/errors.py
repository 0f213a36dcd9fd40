"""Typed exceptions for gRPC failures, each carrying the status code and message.

Callers catch what they can act on (``except InvalidArgumentError``) instead of
inspecting ``grpc.RpcError.code()``. The same classes serve unary calls
(:func:`from_rpc_error`) and the per-request ``error`` of a StreamEmbed reply
(:func:`from_status`), so both paths look alike to the caller.
"""

from __future__ import annotations

import re

import grpc
from google.rpc import status_pb2

_INPUT_INDEX = re.compile(r"\binputs\[(\d+)\]")
_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


class EmbeddingError(Exception):
    """A call to the embedding service failed.

    ``code`` is the :class:`grpc.StatusCode`, ``message`` the server's text.
    For one request of a split or streamed call, ``offset`` is the position
    of its first input in the whole call and ``indices[k]`` the position of
    its ``inputs[k]`` (with ``length_sort`` a request holds inputs from all
    over a block: then only ``indices`` is set); ``request_id`` is its
    StreamEmbed id.
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
    ) -> None:
        if code is not None:
            self.code = code
        self.message = message
        self.request_id = request_id
        self.offset = offset
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}{self._where()}"

    def _where(self) -> str:
        """Where in the whole call the failed input is, when the call was split or streamed."""
        named = _INPUT_INDEX.search(self.message)
        if named and self.indices is not None and int(named.group(1)) < len(self.indices):
            return f" (input #{self.indices[int(named.group(1))]} of the call)"
        if self.offset is not None:
            return f" (in the request starting at input #{self.offset})"
        return ""

    def __reduce__(self):  # picklable across processes, keyword-only fields included
        state = (type(self), self.message, self.code.name, self.request_id, self.offset, self.indices)
        return (_rebuild, state)


def _rebuild(
    cls: type[EmbeddingError],
    message: str,
    code: str,
    request_id: str | None,
    offset: int | None,
    indices: list[int] | None,
) -> EmbeddingError:
    error = cls(message, grpc.StatusCode[code], request_id=request_id, offset=offset)
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
    code: grpc.StatusCode, message: str, *, request_id: str | None = None, offset: int | None = None
) -> EmbeddingError:
    """The exception class for ``code`` (EmbeddingError itself for the rest)."""
    cls = ERROR_CLASSES.get(code, EmbeddingError)
    return cls(message, code, request_id=request_id, offset=offset)


def from_rpc_error(error: grpc.RpcError) -> EmbeddingError:
    """A typed exception for a failed call (sync or asyncio)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "")


def code_of(value: int) -> grpc.StatusCode:
    return _BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def from_status(
    status: status_pb2.Status, *, request_id: str | None = None, offset: int | None = None
) -> EmbeddingError:
    """A typed exception for a StreamEmbed reply's ``error`` field."""
    return error_for(code_of(status.code), status.message, request_id=request_id, offset=offset)
