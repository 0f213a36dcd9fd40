"""When a broken StreamEmbed is worth re-establishing, and how long to wait.

grpc-core retries unary calls from the service config; a stream that broke
after replies began cannot be replayed by grpc, so the stream drivers use
these rules to reconnect and re-send the unanswered requests themselves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from .errors import EmbeddingError

#: A stream that ended with one of these is re-established (the server went
#: away, restarted, drained, or shed load); anything else is the caller's
#: problem and is raised.
RETRYABLE_STREAM_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,  # a server that stops cancels its calls; our own cancels never get here
    }
)
#: A StreamEmbed reply whose ``error`` has one of these codes may be sent again:
#: UNAVAILABLE (that server is draining: the request goes to a new stream),
#: RESOURCE_EXHAUSTED as QUEUE_FULL (the request waits out a backoff); see
#: ``reply_is_retryable``.
RETRYABLE_REPLY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def _not_a_lasting_refusal(error: EmbeddingError) -> bool:
    """RESOURCE_EXHAUSTED is "not now" only as the service's QUEUE_FULL (its ErrorInfo says so).

    MEMORY_LIMIT (a sequence too long for the memory budget) and gRPC's
    message size limit (no details) fail the same way every time.
    """
    return error.code != grpc.StatusCode.RESOURCE_EXHAUSTED or error.reason == "QUEUE_FULL"


def stream_error_is_retryable(error: EmbeddingError) -> bool:
    """Whether a stream that ended with ``error`` is worth re-establishing."""
    return error.code in RETRYABLE_STREAM_CODES and _not_a_lasting_refusal(error)


def reply_is_retryable(error: EmbeddingError) -> bool:
    """Whether a request whose reply carries ``error`` is sent again (else it fails at its position)."""
    return error.code in RETRYABLE_REPLY_CODES and _not_a_lasting_refusal(error)


@dataclass
class StreamRetry:
    """Backoff between attempts and the bound on a run of failures.

    ``timeout`` bounds how long the stream keeps failing without a single
    successful reply before it gives up; a long corpus can thus live through
    any number of separate server restarts, but not a server that never
    comes back.
    """

    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    timeout: float = 120.0
    #: A call with a request unanswered this long is taken for stuck (a hung
    #: server, a half-open connection keepalive has not caught yet): it is
    #: cancelled and its requests go to a new call. Each stall in a row with no
    #: reply in between multiplies the limit by ``multiplier`` (see
    #: ``stall_limit``), so a server that is slow but alive is waited for
    #: instead of being cancelled over and over until ``timeout``.
    stall_timeout: float = 300.0

    def stall_limit(self, stalls_in_a_row: int) -> float:
        """How long a request may go unanswered after ``stalls_in_a_row`` stalls without progress."""
        return self.stall_timeout * self.multiplier ** min(stalls_in_a_row, 16)

    def delay(self, failures: int) -> float:
        """Jittered exponential backoff for the ``failures``-th consecutive failure (0-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier**failures)
        return ceiling * random.uniform(0.5, 1.0)
