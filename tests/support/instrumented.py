"""A real session pool wrapped to count runs and, on demand, hold them at a gate.

Not a mock: every run still goes through ONNX Runtime. The wrapper records
what the batcher sent (batch sizes, the ids of each row) and can block runs
so tests can pile up work, let deadlines pass, or cancel callers while the
model is busy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
from embedding_server.models.sessions import SessionPool


@dataclass
class RunRecord:
    batch_size: int
    rows: list[tuple[int, ...]]  # the real (unpadded) ids of each row


@dataclass
class CountingSessions:
    """Wraps a SessionPool: same interface, plus ``runs`` and a ``gate``."""

    inner: SessionPool
    runs: list[RunRecord] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    def __post_init__(self) -> None:
        self.gate.set()

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def first(self):
        return self.inner.first

    def hold(self) -> None:
        """Runs that start from now on wait until ``release``."""
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    @property
    def has_wide(self) -> bool:
        return self.inner.has_wide

    def run(
        self, slot: int, output_names: list[str], feeds: dict[str, np.ndarray], wide: bool = False
    ) -> dict[str, np.ndarray]:
        mask = feeds["attention_mask"]
        rows = [tuple(ids[: int(m.sum())].tolist()) for ids, m in zip(feeds["input_ids"], mask, strict=True)]
        self.runs.append(RunRecord(batch_size=len(rows), rows=rows))
        self.entered.release()
        self.gate.wait(timeout=60)
        return self.inner.run(slot, output_names, feeds, wide=wide)
