"""OpenAI-shaped errors and the gRPC status code → HTTP status mapping.

Every failure the shim reports has the body OpenAI clients parse:
``{"error": {"message", "type", "param", "code"}}``. The gRPC status decides
the HTTP status, so the shim never has to know *why* the server refused.

``DEADLINE_EXCEEDED`` becomes 504, not 408: the time ran out in the server's
queue behind the gateway, while 408 (RFC 9110) means the client was too slow
to send its request. Both make the ``openai`` client retry.
"""

from __future__ import annotations

import re

import grpc

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

# gRPC's own wording when a message is over grpc.max_receive_message_length.
_TOO_LARGE = re.compile(r"larger than max", re.IGNORECASE)
# The engine's messages start with the field: "inputs[3]: must not be empty".
_FIELD = re.compile(r"^(?P<field>[a-z_]+)(?P<index>\[\d+\])?:")
_OUTPUT_NAME = re.compile(r"OUTPUT_TYPE_([A-Z]+)")
#: Which output kind each REST flag asks for (the dense kind depends on embedding_type).
OUTPUT_FIELD_KINDS = {"return_sparse": "SPARSE", "return_colbert": "COLBERT"}


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


def from_grpc(code: grpc.StatusCode, details: str, output_fields: list[str] | None = None) -> RestError:
    """The REST error for a gRPC failure; the message is rewritten to name REST fields.

    ``output_fields[i]`` is the REST field that asked for ``EmbedRequest.outputs[i]``,
    so "outputs[1]: model ... does not produce OUTPUT_TYPE_SPARSE" names ``return_sparse``.
    """
    details = details or code.name
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE.search(details):
        return RestError(413, f"request too large: {details}", code="request_too_large")
    status, kind, error_code = GRPC_TO_HTTP.get(code, FALLBACK)
    message, param = _rest_field(details, output_fields or [])
    if code is grpc.StatusCode.NOT_FOUND:
        param = "model"
    return RestError(status, message, param=param, code=error_code, type=kind)


def _rest_field(details: str, output_fields: list[str]) -> tuple[str, str | None]:
    match = _FIELD.match(details)
    if not match:
        return details, None
    field, index, rest = match["field"], match["index"] or "", details[match.end() :]
    if field == "inputs":
        return f"input{index}:{rest}", "input"
    if field == "outputs":
        param = _output_param(index, rest, output_fields)
        return (f"{param}:{rest}", param) if param else (details, None)
    return details, field


def _output_param(index: str, rest: str, output_fields: list[str]) -> str | None:
    """The REST field behind ``outputs[i]``, or behind the first output kind the message names."""
    if index:
        position = int(index[1:-1])
        return output_fields[position] if position < len(output_fields) else None
    named = _OUTPUT_NAME.search(rest)
    if named:
        for field in output_fields:
            if OUTPUT_FIELD_KINDS.get(field) == named[1] or (
                field in ("return_dense", "embedding_type") and named[1] in ("DENSE", "BINARY")
            ):
                return field
    return None
