"""The engine's knobs, each declared once: name, type, default and help, beside the field it sets.

A knob is a field of :class:`BatchSettings` or :class:`EngineSettings` made
with :func:`knob`. Everything else derives from that declaration: the
``embedding-server`` flag (``--max-batch-tokens`` for ``max_batch_tokens``),
its environment variable (``EMBEDDING_MAX_BATCH_TOKENS``, by the flag's
name), the ``Settings`` value (``settings.tuning``), the lower bound checked
at parsing, and the start-up plan line. Adding a knob is one line here.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any

from ..cpus import ThreadBudget
from ..models.late_chunking import DEFAULT_OVERLAP
from .memory import MemoryBudget

KNOB = "knob"  # the dataclass field metadata key


@dataclass(frozen=True)
class Knob:
    """What the flag says about a field: its help text and the smallest value it accepts."""

    help: str
    at_least: int = 0  # 1 where 0 would refuse every request or hang


def knob(default: int | float, help: str, *, at_least: int = 0) -> Any:
    """A dataclass field that is also an ``embedding-server`` flag (``Any``: the field's own type)."""
    return field(default=default, metadata={KNOB: Knob(help, at_least)})


def knob_fields(cls: type) -> list[Field[Any]]:
    """The knobs of a settings class, in declaration order."""
    return [f for f in fields(cls) if KNOB in f.metadata]


def knob_of(declared: Field[Any]) -> Knob:
    knob_info: Knob = declared.metadata[KNOB]
    return knob_info


def knob_values(settings: object) -> dict[str, Any]:
    """Every knob's value, by name (the plan line's fields)."""
    return {f.name: getattr(settings, f.name) for f in knob_fields(type(settings))}


@dataclass(frozen=True)
class BatchSettings:
    """How batches form and how much may wait."""

    max_batch_tokens: int = knob(16384, "padded tokens per session run", at_least=1)
    max_batch_size: int = knob(128, "sequences per session run", at_least=1)
    max_padding_waste: int = knob(
        16,
        "padding tokens one more sequence may add to a session run; beyond it, it waits for a run "
        "of its own length (CPU cost is linear in padded tokens; 0: no limit)",
    )
    max_batch_wait_ms: float = knob(0.0, "extra wait in ms for a batch to fill when a run slot is free")
    batch_gather_ms: float = knob(
        1.0,
        "most ms a batch waits, while the event loop is busy, for the requests it is still reading "
        "in (an idle loop: no wait); after a run made on the loop, up to 16 times the cheapest such "
        "run (measured) while the batch keeps growing; 0: take what waits at once",
    )
    min_parallel_batch: int = knob(
        1,
        "interactive sequences that must wait before a run of them starts beside another interactive "
        "run; fewer wait for that run to end and go in the next batch (a run's fixed cost is paid "
        "once for them, not per request); 1: start at once. Higher helps a model whose runs cost "
        "less than their overhead (a tiny model: 1.37x calls/s at 8) and costs one whose runs "
        "dominate (MiniLM, 16 single-input clients: -8 to -12%% at 8), hence 1",
        at_least=1,
    )
    inline_run_ms: float = knob(
        0.5,
        "a session run this model's runs so far say costs at most this many ms runs on the event "
        "loop, not a run thread: the thread hop and the GIL hand-offs around it cost ~0.5 ms of "
        "CPU, more than such a run (a tiny model: 1.3-1.4x calls/s); 0: always on a run thread",
    )
    max_queue_requests: int = knob(
        1024, "requests admitted and not yet answered before RESOURCE_EXHAUSTED", at_least=1
    )
    max_queue_tokens: int = knob(4_000_000, "tokens admitted and not yet answered before RESOURCE_EXHAUSTED")
    interactive_slot: bool = True  # extra run slots only interactive work may use, while bulk runs
    batch_share: int = 4  # when both classes wait, one batch run per this many interactive runs
    memory: MemoryBudget | None = None  # None: no memory cut (tests)


@dataclass(frozen=True)
class EngineSettings:
    """What the Embedder checks per request, and each model's batching (``batch``)."""

    max_inputs: int = knob(2048, "most inputs per request", at_least=1)
    late_chunking_overlap: int = knob(
        DEFAULT_OVERLAP,
        "late chunking of a document longer than the model's window: tokens each window repeats "
        "from the one before as context, at most half a window (more context per token, more CPU)",
    )
    max_document_tokens: int = knob(
        0,
        "longest late-chunked document in tokens (special tokens included); longer is "
        "INVALID_ARGUMENT. 0: 16 times the model's max tokens, e.g. 4096 for a 256-token model",
    )
    batch: BatchSettings = field(default_factory=BatchSettings)
    threads: ThreadBudget | None = None  # None: planned from the CPUs and each model's session pool
