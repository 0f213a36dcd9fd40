"""Which engine and precision serve a model: a pure function over a measured table.

Each candidate (engine x precision) is measured once on this CPU
(``measure.py``): its speed on a fixed short batch and a fixed long batch, and
its fidelity to ONNX Runtime fp32 (the worst output's lowest cosine). The
fastest candidate whose lowest cosine is at least the floor wins; speed is
the geometric mean of its two speed-ups over ONNX Runtime fp32, so a
candidate that is fast only on short texts does not win by that alone. The
reference (ONNX Runtime fp32, cosine 1 by definition) is always in the table,
so a choice always exists, and it stays unless a candidate beats it by
``MIN_SPEEDUP``: one measurement on a shared machine moves by 5-10%, and the
reference is more than its throughput (its all-cores session serves a lone
query; OpenVINO has none). Measured on a 2-CPU AMD EPYC: OpenVINO fp32 came
out 1.03x, won, and served an idle query in 6.7 ms where ONNX Runtime took
3.3-3.7 ms (bench/idle_latency.py).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..models.engines import ONNXRUNTIME, Candidate

#: The reference every candidate is compared with.
REFERENCE = Candidate(ONNXRUNTIME, "fp32")
#: --fidelity-floor by default: our exactness goal for a precision chosen without being asked.
DEFAULT_FLOOR = 0.9999
#: How much faster than the reference another candidate must measure to be chosen over it.
MIN_SPEEDUP = 1.15


@dataclass(frozen=True)
class Measured:
    """One candidate's row: texts per second on the two batches, and its fidelity to the reference."""

    candidate: Candidate
    short_per_s: float
    long_per_s: float
    min_cosine: float  # the worst output's lowest cosine to the reference (1.0 for the reference)
    worst_output: str = ""

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["candidate"] = {"engine": self.candidate.engine, "precision": self.candidate.precision}
        return row

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Measured:
        return cls(
            candidate=Candidate(str(row["candidate"]["engine"]), str(row["candidate"]["precision"])),
            short_per_s=float(row["short_per_s"]),
            long_per_s=float(row["long_per_s"]),
            min_cosine=float(row["min_cosine"]),
            worst_output=str(row.get("worst_output", "")),
        )


def speedup(row: Measured, reference: Measured) -> float:
    """Geometric mean of the short and long speed-ups over ``reference``."""
    return math.sqrt((row.short_per_s / reference.short_per_s) * (row.long_per_s / reference.long_per_s))


def choose(table: Sequence[Measured], floor: float, allowed: Collection[Candidate] | None = None) -> Measured:
    """The fastest row among ``allowed`` (None: all) at or above ``floor``; the reference unless
    that row is ``MIN_SPEEDUP`` faster.

    The reference always passes. When ``allowed`` leaves it out (``--engine openvino``) and no
    allowed row reaches the floor, the most faithful allowed row: an explicit choice is honoured.
    """
    reference = next(row for row in table if row.candidate == REFERENCE)
    rows = [row for row in table if allowed is None or row.candidate in allowed]
    passing = [row for row in rows if row.min_cosine >= floor or row.candidate == REFERENCE]
    if not passing:
        return max(rows, key=lambda row: row.min_cosine)
    fastest = max(passing, key=lambda row: speedup(row, reference))  # a tie is within the margin
    if reference in passing and speedup(fastest, reference) < MIN_SPEEDUP:
        return reference
    return fastest


def describe(table: Sequence[Measured], floor: float) -> str:
    """The table in one log line: each candidate's speed-up, fidelity, and whether it passed."""
    reference = next(row for row in table if row.candidate == REFERENCE)
    parts = []
    for row in table:
        verdict = "" if row.min_cosine >= floor or row.candidate == REFERENCE else f" < floor {floor}"
        parts.append(
            f"{row.candidate} {speedup(row, reference):.2f}x "
            f"({row.short_per_s:.0f} short / {row.long_per_s:.1f} long texts/s), "
            f"min cos {row.min_cosine:.5f}{verdict}"
        )
    return "; ".join(parts)
