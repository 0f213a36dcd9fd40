"""The default thread split follows the container's CPU limit, not the host's core count; one budget."""

from __future__ import annotations

import os

import pytest
from embedding_server.cpus import ThreadBudget, available_cpus


def affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_cgroup_v2_quota_caps_the_count(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert available_cpus(tmp_path) == min(affinity(), 2)


def test_cgroup_v2_unlimited_uses_the_affinity_mask(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == affinity()


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 1


def test_no_cgroup_files_and_garbage_fall_back_to_affinity(tmp_path):
    assert available_cpus(tmp_path) == affinity()
    (tmp_path / "cpu.max").write_text("garbage")
    assert available_cpus(tmp_path) == affinity()


# --- the thread budget: every thread count, decided in one place ------------------------------


@pytest.mark.parametrize(
    ("cpus", "sessions", "per_session", "expected"),
    [
        # cpus, --sessions, --threads-per-session -> sessions, intra-op, tokenizer, run, bulk, wide
        (1, None, 0, (1, 1, 1, 2, 1, 1)),  # wide = a slot's threads: sessions.add_wide opens none
        (2, None, 0, (2, 1, 2, 3, 2, 2)),
        (3, None, 0, (3, 1, 3, 4, 3, 3)),
        (8, None, 0, (4, 2, 4, 5, 4, 8)),  # at most 4 sessions, the CPUs split between them
        (64, 2, 0, (2, 32, 4, 3, 2, 64)),
        (8, 1, 1, (1, 1, 4, 2, 1, 8)),  # both flags win over the split
    ],
)
def test_thread_budget(cpus, sessions, per_session, expected):
    budget = ThreadBudget.plan(cpus, sessions, per_session)
    got = (
        budget.sessions,
        budget.threads_per_session,
        budget.tokenizer_threads,
        budget.interactive_run_threads,
        budget.bulk_run_threads,
        budget.wide_threads,
    )
    assert got == expected
    assert budget.finish_threads == 1
    assert budget.as_dict()["sessions"] == expected[0]


def test_thread_budget_reads_the_cpus_this_process_may_use():
    assert ThreadBudget.plan().cpus == available_cpus()
