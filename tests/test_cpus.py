"""The default thread split follows the container's CPU limit, not the host's core count."""

from __future__ import annotations

import os

from embedding_server.cpus import available_cpus


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
