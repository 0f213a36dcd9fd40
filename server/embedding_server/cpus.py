"""How many CPUs this process may really use, and the one thread budget sized from them.

``os.cpu_count()`` sees the whole host; inside a container the CPU limit
(cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) and the affinity mask are
what count. Oversubscribing ONNX Runtime threads on a 2-CPU pod of a 64-core
node costs more than it gains.

Every thread count the server uses is decided in ``ThreadBudget``; the
session pool, the batchers and the tokenizer pools read it, and start-up logs
it (app.py). The table of threads is in docs/architecture.md, "Threads".
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_quota(root: Path) -> float | None:
    """CPUs allowed by the cgroup's quota, None when unlimited or unknown."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file, period_file = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if quota_file.is_file() and period_file.is_file():
            quota_us = int(quota_file.read_text())
            return None if quota_us <= 0 else quota_us / int(period_file.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The affinity mask's size, capped by the cgroup quota (rounded up), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


#: --sessions by default: one concurrent run per CPU, at most this many.
MAX_AUTO_SESSIONS = 4
#: Threads per tokenizer pool (one for queries, one for batch work): one per CPU, at most this many.
MAX_TOKENIZER_THREADS = 4


@dataclass(frozen=True)
class ThreadBudget:
    """Every thread the engine starts, sized once from the CPUs and ``--sessions``/``--threads-per-session``.

    Per model: ``sessions`` concurrent ONNX runs (run slots) of
    ``threads_per_session`` intra-op threads each, plus, for a model small
    enough to hold twice, a wide session of ``wide_threads`` (every CPU) for a
    lone query on an idle server; ``interactive_run_threads`` run queries (one
    per slot, and one more: a query pools on its run thread while the next one
    runs), ``bulk_run_threads`` run batch work and ``finish_threads`` finish it,
    both at a lower CPU priority. Per process: two tokenizer pools (queries,
    batch work) of ``tokenizer_threads`` each.

    Why these defaults: on CPU a run's cost is nearly linear in padded tokens,
    and one intra-op thread per run scales better than several threads on one
    run (all-MiniLM-L6-v2, batch 4 x 40 tokens: 165 us/token on 1 thread, 125
    on 2), so concurrent single-thread runs of length-homogeneous batches win;
    past 4 sessions, long documents would get too few threads each.
    """

    cpus: int
    sessions: int
    threads_per_session: int
    tokenizer_threads: int
    finish_threads: int = 1

    @classmethod
    def plan(
        cls, cpus: int | None = None, sessions: int | None = None, threads_per_session: int = 0
    ) -> ThreadBudget:
        """``cpus`` None: ``available_cpus()``; ``sessions`` None, ``threads_per_session`` 0: the defaults."""
        cpus = cpus or available_cpus()
        sessions = sessions or min(cpus, MAX_AUTO_SESSIONS)
        return cls(
            cpus=cpus,
            sessions=sessions,
            threads_per_session=threads_per_session or max(1, cpus // sessions),
            tokenizer_threads=max(1, min(MAX_TOKENIZER_THREADS, cpus)),
        )

    @property
    def wide_threads(self) -> int:
        """The wide session's intra-op threads; it is opened only when that is more than a slot has."""
        return self.cpus

    @property
    def interactive_run_threads(self) -> int:
        return self.sessions + 1

    @property
    def bulk_run_threads(self) -> int:
        return self.sessions

    def as_dict(self) -> dict[str, int]:
        """For the start-up log line."""
        return {
            "cpus": self.cpus,
            "sessions": self.sessions,
            "threads_per_session": self.threads_per_session,
            "wide_threads": self.wide_threads,
            "interactive_run_threads": self.interactive_run_threads,
            "bulk_run_threads": self.bulk_run_threads,
            "finish_threads": self.finish_threads,
            "tokenizer_threads": self.tokenizer_threads,
        }
