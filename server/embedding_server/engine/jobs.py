"""Requests and results in engine terms, independent of gRPC and JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.types import Output, Priority, SequenceVectors, Task


@dataclass(frozen=True)
class EmbedJob:
    """A validated-shape embedding request (validation of values happens in the Embedder)."""

    inputs: list[str]
    model: str = ""
    task: int = 0
    dimensions: int = 0
    late_chunking: bool = False
    outputs: list[int] = field(default_factory=list)
    truncate: bool = False
    deadline: float | None = None  # time.monotonic()
    priority: Priority = Priority.INTERACTIVE  # resolved by the API layer (never UNSPECIFIED here)
    flow: object = None  # batch work: whose fair share it counts against (the client connection)


@dataclass
class EmbedResult:
    """One vector set per input, in input order."""

    model: str
    outputs: tuple[Output, ...]
    vectors: list[SequenceVectors]
    prompt_tokens: int
    task: Task = Task.UNSPECIFIED
    timings: StageTimings = field(default_factory=lambda: StageTimings(0.0, 0.0))


@dataclass(frozen=True)
class StageTimings:
    """Where one request's engine time went (seconds), for trailing metadata, metrics and traces.

    ``queue_seconds``: from admission until a session first took some of its
    work; ``inference_seconds``: from then until its last vector was ready.
    The stamps are ``time.monotonic()`` instants (0.0: not recorded), from which
    the API layer draws the trace's stage spans (tracing.py); a request split
    over several runs spans from its first run's start to its last run's end,
    and ``runs`` has each of them (a ``run`` span each).
    """

    queue_seconds: float
    inference_seconds: float
    tokenize_start: float = 0.0  # asked for a tokenizer (batch work: a place in the tokenizer backlog)
    tokenize_end: float = 0.0  # token ids ready
    enqueued: float = 0.0  # its work joined the queue
    run_start: float = 0.0  # a session first took some of it
    run_end: float = 0.0  # its last session run returned
    finished: float = 0.0  # its last vector was ready (pooled, normalized; late chunking: chunks pooled)
    runs: tuple[tuple[float, float], ...] = ()  # each session run that took some of it: (start, end)


@dataclass(frozen=True)
class TokenizedResult:
    ids: list[int]
    tokens: list[str]
