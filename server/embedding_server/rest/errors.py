"""OpenAI-shaped errors and the gRPC status → HTTP status mapping.

Every failure the shim reports has the body OpenAI clients parse:
``{"error": {"message", "type", "param", "code"}}``. The gRPC status code
decides the HTTP status; ``param`` and ``code`` come from the status's
``google.rpc`` details (ErrorInfo ``reason``, ``field``, ``index``), never
from its message, whose wording is free to change.

``DEADLINE_EXCEEDED`` becomes 504, not 408: the time ran out in the server's
queue behind the gateway, while 408 (RFC 9110) means the client was too slow
to send its request. Both make the ``openai`` client retry.
"""

from __future__ import annotations

import grpc
from embedding_client.errors import ErrorDetails, code_of
from google.rpc import status_pb2

#: HTTP status, OpenAI error ``type`` and ``code`` for each gRPC status a request can end with.
GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "invalid_request_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "deadline_exceeded"),
    grpc.StatusCode.CANCELLED: (503, "server_error", "cancelled"),
}
#: A status a user cannot cause (UNKNOWN, INTERNAL, ...): a server bug, reported as such.
FALLBACK = (500, "server_error", "internal_error")

#: Reasons whose HTTP status differs from their gRPC status's: MEMORY_LIMIT is RESOURCE_EXHAUSTED
#: like a full queue, but fails the same way every time, so not 429 (which clients retry).
REASON_HTTP: dict[str, tuple[int, str, str | None]] = {
    "MEMORY_LIMIT": (413, "invalid_request_error", "memory_limit"),
}
#: OpenAI ``code`` for reasons with a better one than their status's (OpenAI's own word if it has one).
REASON_CODES: dict[str, str] = {
    "INPUT_TOO_LONG": "context_length_exceeded",
    "DOCUMENT_TOO_LONG": "context_length_exceeded",
}
#: REST parameter for each EmbedRequest field (``outputs`` is looked up per request: see from_grpc).
REST_PARAMS = {"inputs": "input", "model": "model", "dimensions": "dimensions", "task": "task"}


class RestError(Exception):
    """A request failed; carries everything the OpenAI error body needs."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",  # OpenAI's field name
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> RestError:
    return RestError(400, message, param=param, code=code)


def from_grpc(status: status_pb2.Status, output_fields: list[str] | None = None) -> RestError:
    """The REST error for a failed gRPC call's ``google.rpc.Status``.

    ``output_fields[i]`` is the REST field that asked for ``EmbedRequest.outputs[i]``,
    so a violation of ``outputs[1]`` names ``return_sparse``. A message that
    starts with the violated gRPC field (``inputs[3]: ...``) is re-labelled with
    the REST one (``input[3]: ...``); that prefix is built from the details too.
    """
    code = code_of(status.code)
    details = ErrorDetails.of(status)
    message = status.message or code.name
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and details.reason is None:
        # Not the service's QUEUE_FULL (that carries ErrorInfo): gRPC's own message size limit.
        return RestError(413, f"request too large: {message}", code="request_too_large")
    status_code, kind, error_code = REASON_HTTP.get(details.reason or "") or GRPC_TO_HTTP.get(code, FALLBACK)
    param = _rest_param(details, output_fields or [])
    if param is not None and details.field is not None:
        message = _relabel(message, details.field, details.index, param)
    return RestError(
        status_code, message, param=param, code=REASON_CODES.get(details.reason or "", error_code), type=kind
    )


def _rest_param(details: ErrorDetails, output_fields: list[str]) -> str | None:
    if details.field == "outputs":
        index = details.index
        return output_fields[index] if index is not None and index < len(output_fields) else None
    return REST_PARAMS.get(details.field or "", details.field)


def _relabel(message: str, field: str, index: int | None, param: str) -> str:
    """``inputs[3]: ...`` → ``input[3]: ...``: the gRPC field path the details name, in REST words."""
    grpc_path = field if index is None else f"{field}[{index}]"
    if not message.startswith(f"{grpc_path}:"):
        return message
    rest_path = param if index is None or field == "outputs" else f"{param}[{index}]"
    return rest_path + message[len(grpc_path) :]
