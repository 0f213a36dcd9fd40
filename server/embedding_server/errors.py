"""Errors as data: plain Python types the engine raises, independent of any transport.

Each error carries what a client needs to act on it without reading the
message: a status ``code`` (named like gRPC's), a stable ``reason``
(AIP-193 ``ErrorInfo.reason``, e.g. ``INPUT_TOO_LONG``), and for a bad
request the ``field`` it is about (``inputs``, ``dimensions``) and the input
``index`` when there is one. One mapping per API turns them into a gRPC status
with ``google.rpc`` details (grpc_api) or an OpenAI-shaped HTTP error (rest).
Anything else escaping a handler is a bug and becomes INTERNAL.
"""

from __future__ import annotations

from enum import Enum
from typing import ClassVar


class Code(Enum):
    """Status codes the service uses; names equal grpc.StatusCode names."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"


ERROR_DOMAIN = "embedding.v1"  # google.rpc.ErrorInfo.domain


class ServiceError(Exception):
    """A request failed for a reason the client should be told about.

    ``field`` names the request field (``inputs``, ``dimensions``); with
    ``index`` the violation is about ``inputs[index]``. ``retry_after`` (seconds)
    is a hint for overload errors.
    """

    code: ClassVar[Code] = Code.INTERNAL
    default_reason: ClassVar[str] = "INTERNAL"
    default_retry_after: ClassVar[float | None] = None

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        index: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field = field
        self.index = index
        self.retry_after = self.default_retry_after if retry_after is None else retry_after

    @property
    def field_path(self) -> str | None:
        """The violated field as AIP-193 writes it: ``inputs[3]``, ``dimensions``."""
        if self.field is None:
            return None
        return self.field if self.index is None else f"{self.field}[{self.index}]"


class InvalidArgument(ServiceError):
    """The request itself is wrong; ``field`` (and ``index``) say where."""

    code = Code.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class ModelNotFound(ServiceError):
    """The request names a model this server does not serve."""

    code = Code.NOT_FOUND
    default_reason = "UNKNOWN_MODEL"


class Overloaded(ServiceError):
    """The queue is full: retry later, elsewhere, or with less."""

    code = Code.RESOURCE_EXHAUSTED
    default_reason = "QUEUE_FULL"
    default_retry_after = 0.5  # seconds; about one batch run, the time a queue slot takes to free up


class MemoryLimitExceeded(ServiceError):
    """One sequence cannot run alone within this server's memory budget.

    The same request fails the same way every time, so unlike a full queue it
    carries no retry hint, and the gRPC mapping tells clients' retry policies
    (which retry RESOURCE_EXHAUSTED for a full queue) not to retry it.
    """

    code = Code.RESOURCE_EXHAUSTED
    default_reason = "MEMORY_LIMIT"


class DeadlineExpired(ServiceError):
    """The call's deadline passed while it waited; the model never ran it."""

    code = Code.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED_IN_QUEUE"


class NotServing(ServiceError):
    """The server is starting up or shutting down."""

    code = Code.UNAVAILABLE
    default_reason = "NOT_SERVING"


class Unauthenticated(ServiceError):
    """Auth is on and the bearer key is missing or wrong."""

    code = Code.UNAUTHENTICATED
    default_reason = "INVALID_API_KEY"


class InternalError(ServiceError):
    """A bug: an exception no handler expected. The message names only its type."""

    code = Code.INTERNAL
    default_reason = "INTERNAL"


class ModelLoadError(Exception):
    """A model directory cannot be served; the message is one line naming the file."""


class StartupError(Exception):
    """A process cannot start with its settings (a port, a key file, TLS files): one line, exit 1.

    ``embedding-server`` (app.py, the in-process REST shim) and ``embedding-rest`` raise it.
    """
