"""Errors as types: each carries the gRPC status code a client will see.

The engine raises these; the gRPC layer turns them into statuses and the REST
shim into OpenAI-style HTTP errors. Anything else escaping a handler is a bug.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A request failed for a reason the client should be told about."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """The request itself is wrong; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ServiceError):
    """The request names a model this server does not serve."""

    code = grpc.StatusCode.NOT_FOUND


class Overloaded(ServiceError):
    """The queue is full: retry later, elsewhere, or with less."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExpired(ServiceError):
    """The call's deadline passed while it waited; the model never ran it."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotServing(ServiceError):
    """The server is starting up or shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class ModelLoadError(Exception):
    """A model directory cannot be served; the message is one line naming the file."""
