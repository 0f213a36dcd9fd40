"""The memory budget: how much a run, a queued token and a reply may cost, from ``--memory-limit``.

Peak memory must not depend on what users send. A session run's working set
is its intermediate tensors: per layer a few ``B x T x hidden`` activations
(the feed-forward block is 4 x hidden wide) and the attention scores
``B x heads x T x T``, which grow with the square of the sequence length. The
model's weights, the runtime and the interpreter are the baseline, measured
after loading. What is left goes to the runs that may be in flight at once
and to the queue (token ids, texts, and replies not yet sent). A batch is cut
so its estimated cost fits one run's share; a single sequence that cannot fit
is refused (``RESOURCE_EXHAUSTED``, reason ``MEMORY_LIMIT``) rather than grown into.

The constants are measured (``bench/memory_budget.py shapes``, ONNX Runtime's
arena off, all-minilm-l6-v2 int8): one run of 256 x 32 grew the process by
526 MiB (~64 KiB a token: ~170 bytes per hidden unit, the feed-forward block
and its GELU's elementwise copies), 16 x 512 by 1034 MiB (the rest: ~2.8
float copies of the attention scores); small batches grew it by 20-100 MiB
more than that, whatever their size (``RUN_FIXED_BYTES_PER_HIDDEN`` covers part of it,
the 15 % of the limit left unplanned the rest).

The scores term depends on the engine's attention (``ModelShape.attention``):
``plain`` holds every head's scores at once; ``fused`` (ONNX Runtime's graph
rewritten by models/attention.py) only in runs with padding, an unpadded run
taking the flash kernel; ``blocked`` (OpenVINO's own attention) never. A long
sequence runs alone, so on the last two its cost grows linearly.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cpus import CGROUP_ROOT

MIB = 1024 * 1024
#: The limit when the container sets none: the default model fits in it with every input mix.
DEFAULT_MEMORY_LIMIT = 1024 * MIB
#: Fraction of the limit the budget plans for: the rest absorbs allocator fragmentation.
PLANNED_FRACTION = 0.85
#: Fraction of the working memory (limit less baseline) kept for queued requests and replies.
QUEUE_FRACTION = 0.2
#: Bytes per token and hidden unit a run holds at its peak (measured: ~164).
ACTIVATION_BYTES = 168
#: Bytes per attention score (B x heads x T x T) a run holds at its peak (measured: ~11).
ATTENTION_BYTES = 12
#: What a run holds at any shape, per hidden unit of the model (measured on MiniLM, 384 wide:
#: 20-100 MiB beyond the per-token terms; 64 KiB x 384 = 24 MiB, the rest is left unplanned).
RUN_FIXED_BYTES_PER_HIDDEN = 64 * 1024
#: A queued token: its id (int64), its text (a few UTF-8/str bytes), bookkeeping.
QUEUED_TOKEN_BYTES = 48


def cgroup_memory_limit(root: Path = CGROUP_ROOT) -> int | None:
    """The container's memory limit in bytes (cgroup v2 ``memory.max``, v1 ``limit_in_bytes``), or None."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            return None
        return None if value >= 1 << 60 else value  # v1 writes "unlimited" as a huge number
    return None


def parse_size(text: str) -> int:
    """``1GiB``, ``768Mi``, ``2G``, ``1073741824`` → bytes (binary units; a bare number is bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB]?)\s*", text)
    if not match:
        raise ValueError(f"expected a size like 1GiB, 768MiB or a number of bytes, got {text!r}")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** " KMGT".index(unit or " "))


def release_freed_memory() -> None:
    """Hand memory that Python and the allocator freed back to the OS before RSS becomes a baseline.

    Building or quantizing a model at load frees hundreds of MiB that glibc
    keeps in its arenas (measured: 560 MiB resident after ``--quantize int8``
    of the built-in model, 127 MiB after ``malloc_trim``); counted as the
    models' size, they would shrink the batch budget for nothing.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def current_rss() -> int:
    """This process's resident set in bytes (0 where /proc is missing)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) * 1024 if match else 0


#: How a run holds attention scores (see the module doc), as the run pools report it.
ATTENTION_KINDS = ("plain", "fused", "blocked")


@dataclass(frozen=True)
class ModelShape:
    """What a run's working set scales with."""

    hidden: int
    heads: int
    attention: str = "plain"

    @classmethod
    def from_config(cls, config: Any, dimensions: int, attention: str = "plain") -> ModelShape:
        """From a Hugging Face ``config.json`` when there is one, else a BERT-like guess (64 per head)."""
        config = config if isinstance(config, dict) else {}
        hidden = int(config.get("hidden_size") or dimensions or 768)
        heads = int(config.get("num_attention_heads") or max(1, hidden // 64))
        return cls(hidden, heads, attention)

    def holds_scores(self, count: int) -> bool:
        """Whether a run of ``count`` sequences holds all heads' scores at once."""
        return self.attention == "plain" or (self.attention == "fused" and count > 1)

    def run_bytes(self, count: int, longest: int) -> int:
        """Estimated peak working memory of one run of ``count`` sequences padded to ``longest``."""
        activations = count * longest * self.hidden * ACTIVATION_BYTES
        scores = count * self.heads * longest * longest * ATTENTION_BYTES if self.holds_scores(count) else 0
        return self.fixed_bytes + activations + scores

    @property
    def fixed_bytes(self) -> int:
        return RUN_FIXED_BYTES_PER_HIDDEN * self.hidden


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes one run may use, and tokens the queue may hold, for one model."""

    shape: ModelShape
    run_bytes: int  # per concurrent run
    queue_tokens: int  # tokens admitted and unanswered
    baseline: int = 0  # what the plan left out of the limit: models, runtime, interpreter
    runs: int = 1
    share: float = 1.0
    #: longest → the most rows a run of it may hold: batch selection asks ``fits`` for every
    #: neighbour it weighs, and the estimate costs more than the lookup (one entry per length).
    _rows: dict[int, int] = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def plan(
        cls, shape: ModelShape, limit: int, baseline: int, runs: int, share: float = 1.0
    ) -> MemoryBudget:
        """Split ``limit`` (planned at PLANNED_FRACTION) less ``baseline`` over ``runs`` concurrent runs
        and the queue; ``share``: this model's part of it when several are served (``model_shares``)."""
        working = int(max(0, int(limit * PLANNED_FRACTION) - baseline) * share)
        queue = int(working * QUEUE_FRACTION)
        runs = max(1, runs)
        return cls(shape, (working - queue) // runs, queue // QUEUED_TOKEN_BYTES, baseline, runs, share)

    def limit_for(self, longest: int) -> int:
        """The memory limit whose plan lets one sequence of ``longest`` tokens run (``plan`` inverted)."""
        working = self.shape.run_bytes(1, longest) * self.runs / (1 - QUEUE_FRACTION) / self.share
        return math.ceil((working + self.baseline) / PLANNED_FRACTION)

    def fits(self, count: int, longest: int) -> bool:
        rows = self._rows.get(longest)
        if rows is None:
            rows = self._rows[longest] = self._rows_that_fit(longest)
        return count <= rows

    def _rows_that_fit(self, longest: int) -> int:
        """The largest count whose run estimate is within ``run_bytes`` (the estimate grows with count)."""
        low, high = 0, self.run_bytes // max(1, longest * self.shape.hidden * ACTIVATION_BYTES) + 1
        while low < high:  # ``low`` rows fit; more than ``high`` do not
            middle = (low + high + 1) // 2
            if self.shape.run_bytes(middle, longest) <= self.run_bytes:
                low = middle
            else:
                high = middle - 1
        return low

    def longest_single(self) -> int:
        """The longest sequence a run may hold alone."""
        a = self.shape.heads * ATTENTION_BYTES if self.shape.holds_scores(1) else 0
        b = self.shape.hidden * ACTIVATION_BYTES
        room = self.run_bytes - self.shape.fixed_bytes
        if room <= 0:
            return 0
        return int((-b + math.sqrt(b * b + 4 * a * room)) / (2 * a)) if a else room // b


#: The sequence length the working memory is shared at between models served side by side.
SHARE_AT_TOKENS = 512


def model_shares(models: dict[str, tuple[ModelShape, int]]) -> dict[str, float]:
    """Each model's part of the working memory, from its shape and its concurrent runs.

    In proportion to what its runs cost at ``SHARE_AT_TOKENS`` tokens, so every
    model may take sequences of the same length: an equal split gave a large
    model beside two tiny ones a third of the memory, and inputs it refused
    while the tiny ones' share went unused.
    """
    costs = {name: shape.run_bytes(1, SHARE_AT_TOKENS) * runs for name, (shape, runs) in models.items()}
    total = sum(costs.values())
    return {name: cost / total for name, cost in costs.items()}
