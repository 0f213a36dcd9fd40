"""A failed call's rich status (google.rpc details, read with grpc_status as any client would)."""

from __future__ import annotations

import grpc
from embedding_server.errors import ERROR_DOMAIN
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def unpack(status: status_pb2.Status) -> dict[str, object]:
    """The details of a status by type name (each type at most once)."""
    kinds = {
        "ErrorInfo": error_details_pb2.ErrorInfo,
        "RequestInfo": error_details_pb2.RequestInfo,
        "BadRequest": error_details_pb2.BadRequest,
        "RetryInfo": error_details_pb2.RetryInfo,
    }
    found: dict[str, object] = {}
    for packed in status.details:
        for name, kind in kinds.items():
            if packed.Is(kind.DESCRIPTOR):
                message = kind()
                packed.Unpack(message)
                assert name not in found, f"{name} twice"
                found[name] = message
    assert set(found) <= set(kinds) and len(found) == len(status.details), status
    return found


def call_status(error: grpc.RpcError) -> status_pb2.Status:
    status = rpc_status.from_call(error)
    assert status is not None, f"no grpc-status-details-bin on {error.code()}: {error.details()}"
    assert status.code == error.code().value[0] and status.message == error.details()
    return status


def check_error_info(
    status: status_pb2.Status, reason: str, field: str | None = None, index: int | None = None
):
    details = unpack(status)
    info = details["ErrorInfo"]
    assert (info.reason, info.domain) == (reason, ERROR_DOMAIN), status
    assert info.metadata.get("field") == field
    assert info.metadata.get("index") == (None if index is None else str(index))
    assert details["RequestInfo"].request_id
    if status.code == INVALID.value[0] and field is not None:
        (violation,) = details["BadRequest"].field_violations
        assert violation.field == (field if index is None else f"{field}[{index}]")
        assert violation.reason == reason
    else:
        assert "BadRequest" not in details
    return details
