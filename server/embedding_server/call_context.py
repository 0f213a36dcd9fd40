"""What one incoming call carries through the layers: its request id and its timings.

The API layer (gRPC interceptor, REST middleware) opens a ``CallContext`` for
each call; code underneath (the servicer, log records) finds it through a
context variable instead of an extra parameter on every function. The engine
does not touch it: its per-job timings travel in ``EmbedResult.timings`` and
the servicer records them here. asyncio
copies context variables into tasks a handler starts, and they all point at
the same ``CallContext``, so a StreamEmbed call sums the time of its requests.
"""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class CallContext:
    """One call: the id its log lines carry and the engine time it used."""

    request_id: str
    queue_seconds: float = 0.0  # waiting for a session to take the work
    inference_seconds: float = 0.0  # from the first session run to the last vector

    def add_engine_time(self, queue_seconds: float, inference_seconds: float) -> None:
        self.queue_seconds += queue_seconds
        self.inference_seconds += inference_seconds


#: A call's id and timings, as gRPC trailers and as the REST shim's response headers (TEI's x-* headers).
REQUEST_ID_KEY = "x-request-id"
QUEUE_TIME_KEY = "x-queue-time-ms"
INFERENCE_TIME_KEY = "x-inference-time-ms"
TOTAL_TIME_KEY = "x-total-time-ms"
TIMING_KEYS = (REQUEST_ID_KEY, QUEUE_TIME_KEY, INFERENCE_TIME_KEY, TOTAL_TIME_KEY)


def timing_headers(call: CallContext, started: float) -> tuple[tuple[str, str], ...]:
    """``call``'s id and engine time, and the time since ``started`` (``time.perf_counter()``)."""
    return (
        (REQUEST_ID_KEY, call.request_id),
        (QUEUE_TIME_KEY, f"{call.queue_seconds * 1000:.3f}"),
        (INFERENCE_TIME_KEY, f"{call.inference_seconds * 1000:.3f}"),
        (TOTAL_TIME_KEY, f"{(time.perf_counter() - started) * 1000:.3f}"),
    )


_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("embedding_call", default=None)

REQUEST_ID_MAX = 128


def new_request_id() -> str:
    return os.urandom(16).hex()  # 128 random bits, like a uuid4, at a fraction of the cost


def clean_request_id(offered: str | None) -> str:
    """A client's request id if it is short printable ASCII, else a fresh one (logs stay one line)."""
    if offered and len(offered) <= REQUEST_ID_MAX and offered.isascii() and offered.isprintable():
        return offered
    return new_request_id()


def current() -> CallContext | None:
    return _current.get()


def current_request_id() -> str | None:
    call = _current.get()
    return call.request_id if call else None


def record_engine_time(queue_seconds: float, inference_seconds: float) -> None:
    """Called by the API layer with each embedding job's ``EmbedResult.timings``; a no-op outside a call."""
    call = _current.get()
    if call is not None:
        call.add_engine_time(queue_seconds, inference_seconds)


def enter_call(call: CallContext) -> contextvars.Token[CallContext | None]:
    """Make ``call`` current; give the token to ``leave_call`` (the interceptor's fast path)."""
    return _current.set(call)


def leave_call(token: contextvars.Token[CallContext | None]) -> None:
    _current.reset(token)


@contextmanager
def call_scope(request_id: str) -> Iterator[CallContext]:
    """Make a fresh CallContext current for the code inside the block."""
    call = CallContext(request_id)
    token = _current.set(call)
    try:
        yield call
    finally:
        _current.reset(token)
