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
    """Where one request's engine time went (seconds), for trailing metadata and metrics.

    ``queue_seconds``: from admission until a session first took some of its
    work; ``inference_seconds``: from then until its last vector was ready.
    """

    queue_seconds: float
    inference_seconds: float


@dataclass(frozen=True)
class TokenizedResult:
    ids: list[int]
    tokens: list[str]
