"""An in-process Embedder over the built-in model whose session runs are counted.

Shared by the in-process engine tests (test_batching, test_scheduling,
test_stream_embed, test_error_details); the model itself is the module-scoped
``builtin`` fixture in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable

from embedding_server.engine.embedder import Embedder
from embedding_server.engine.observer import EngineObserver
from embedding_server.engine.tuning import BatchSettings, EngineSettings
from embedding_server.models.loaded import LoadedModel

from tests.support.instrumented import CountingSessions

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
    "matches",
]


def sentence(i: int) -> str:
    """A deterministic sentence of 3..40 words."""
    n = 3 + (i * 7) % 38
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)) + f" {i}"


def make_embedder(
    builtin: LoadedModel,
    *,
    observer: EngineObserver | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
    **batch: object,
) -> tuple[Embedder, CountingSessions]:
    """``batch``: BatchSettings fields; ``observer`` (e.g. tests.support.observer.RecordingObserver).

    Runs are on run threads unless a test asks (``inline_run_ms``): a test that holds a run in its
    session would hold the event loop too, were the run made there. A run takes what waits at once
    unless a test asks (``batch_gather_ms``): the batches a test expects are the ones it queued."""
    batch.setdefault("inline_run_ms", 0)
    batch.setdefault("batch_gather_ms", 0)
    sessions = CountingSessions(builtin.sessions)
    loaded = LoadedModel(model=builtin.model, sessions=sessions)  # type: ignore[arg-type]
    settings = EngineSettings(batch=BatchSettings(**batch))  # type: ignore[arg-type]
    return Embedder([loaded], settings, observer=observer, on_failure=on_failure), sessions


async def started(embedder: Embedder, sessions: CountingSessions) -> Embedder:
    for batcher in embedder.batchers.values():
        batcher.start()
    return embedder
