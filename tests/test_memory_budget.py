"""The memory budget: --memory-limit, the cgroup limit, and how the budget is split and checked."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from embedding_server import compose
from embedding_server.compose import batch_settings, memory_limit
from embedding_server.engine.memory import (
    DEFAULT_MEMORY_LIMIT,
    MIB,
    MemoryBudget,
    ModelShape,
    cgroup_memory_limit,
    model_shares,
    parse_size,
)
from embedding_server.errors import StartupError
from embedding_server.models.loader import BUILTIN_MODEL, ModelSpec, load
from embedding_server.settings import Settings, parse_settings

MINILM = ModelShape(hidden=384, heads=12)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1GiB", 1 << 30),
        ("768MiB", 768 << 20),
        ("768Mi", 768 << 20),
        ("2G", 2 << 30),
        ("4096", 4096),
        ("1.5GiB", 3 << 29),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "1 PiB", "-1GiB"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(text)


def test_the_flag_and_its_environment_variable():
    assert parse_settings([], environ={}).memory_limit == 0  # auto
    assert parse_settings(["--memory-limit", "768MiB"], environ={}).memory_limit == 768 << 20
    assert parse_settings([], environ={"EMBEDDING_MEMORY_LIMIT": "1073741824"}).memory_limit == 1 << 30
    with pytest.raises(SystemExit) as info:
        parse_settings(["--memory-limit", "lots"], environ={})
    assert info.value.code == 2


def test_cgroup_limits(tmp_path: Path):
    assert cgroup_memory_limit(tmp_path) is None  # no cgroup files
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(tmp_path) is None  # v2, unlimited
    (tmp_path / "memory.max").write_text("1073741824\n")
    assert cgroup_memory_limit(tmp_path) == 1 << 30
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    assert cgroup_memory_limit(v1) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text("536870912\n")
    assert cgroup_memory_limit(v1) == 512 << 20


def test_long_sequences_get_fewer_rows_than_short_ones():
    budget = MemoryBudget.plan(MINILM, limit=1 << 30, baseline=300 * MIB, runs=3)
    rows = {
        length: max(n for n in range(1, 4096) if budget.fits(n, length) or n == 1) for length in (32, 512)
    }
    assert rows[32] * 32 > rows[512] * 512  # attention is quadratic: fewer tokens per run when long
    longest = budget.longest_single()
    assert budget.fits(1, longest) and not budget.fits(1, longest + 1)
    assert budget.queue_tokens > 0


XLMR_LARGE = {"hidden_size": 1024, "num_attention_heads": 16}


def test_an_attention_that_never_holds_all_scores_lets_a_window_run_alone():
    """jina-v3's 8192-token window: with the scores held at once (plain ops) it needs ~14 GiB a run;
    with the fused or blocked kernel its cost is linear, and only a padded batch (fused) pays them."""
    plain, fused, blocked = (
        ModelShape.from_config(XLMR_LARGE, 1024, kind) for kind in ("plain", "fused", "blocked")
    )
    assert plain.run_bytes(1, 8192) > 12 << 30  # 16 heads x 8192^2 x 12 bytes
    assert fused.run_bytes(1, 8192) == blocked.run_bytes(1, 8192) < 2 << 30
    assert fused.run_bytes(2, 4096) == plain.run_bytes(2, 4096) > blocked.run_bytes(2, 4096)
    budgets = {
        shape.attention: MemoryBudget.plan(shape, limit=8 << 30, baseline=2600 * MIB, runs=2)
        for shape in (plain, fused, blocked)
    }
    assert not budgets["plain"].fits(1, 8192) and budgets["plain"].longest_single() < 4096
    for kind in ("fused", "blocked"):
        longest = budgets[kind].longest_single()
        assert budgets[kind].fits(1, longest) and not budgets[kind].fits(1, longest + 1)
        assert longest > 8192
    assert not budgets["fused"].fits(2, 4096) and budgets["blocked"].fits(2, 4096)


@pytest.mark.parametrize("kind", ["plain", "fused", "blocked"])
def test_fits_answers_as_the_run_estimate_does(kind: str):
    """``fits`` looks up the most rows per length; its answers are the estimate's, run by run."""
    shape = ModelShape.from_config(XLMR_LARGE, 1024, kind)
    budget = MemoryBudget.plan(shape, limit=3 << 30, baseline=600 * MIB, runs=2)
    for longest in (1, 7, 64, 500, 2048, budget.longest_single(), budget.longest_single() + 1, 9000):
        for count in (*range(0, 40), 100, 1000, 5000):
            assert budget.fits(count, longest) == (shape.run_bytes(count, longest) <= budget.run_bytes)
    smaller = replace(budget, run_bytes=budget.run_bytes // 4)  # a copy does not share the lookups
    assert smaller.fits(1, 512) == (shape.run_bytes(1, 512) <= smaller.run_bytes)
    assert [n for n in range(1, 300) if smaller.fits(n, 512)] != [
        n for n in range(1, 300) if budget.fits(n, 512)
    ]


@pytest.mark.parametrize("kind", ["plain", "fused"])
def test_the_limit_a_refused_sequence_needs_is_the_plan_inverted(kind: str):
    shape = ModelShape.from_config(XLMR_LARGE, 1024, kind)
    budget = MemoryBudget.plan(shape, limit=1 << 30, baseline=600 * MIB, runs=4, share=0.5)
    length = 3 * budget.longest_single()
    needed = budget.limit_for(length)
    assert MemoryBudget.plan(shape, needed, 600 * MIB, runs=4, share=0.5).fits(1, length)
    assert not MemoryBudget.plan(shape, needed - 16 * MIB, 600 * MIB, runs=4, share=0.5).fits(1, length)


def test_the_engines_limit_leaves_out_what_its_host_holds(monkeypatch: pytest.MonkeyPatch):
    """In-process (a Ray worker), the host's own memory is not the engine's: a container limit is
    shared with it, an explicit --memory-limit is the engine's alone."""
    monkeypatch.setattr(compose, "cgroup_memory_limit", lambda: None)
    assert memory_limit(Settings(), host_bytes=5 << 30) == DEFAULT_MEMORY_LIMIT
    monkeypatch.setattr(compose, "cgroup_memory_limit", lambda: 8 << 30)
    assert memory_limit(Settings()) == 8 << 30
    assert memory_limit(Settings(), host_bytes=5 << 30) == 3 << 30
    assert memory_limit(Settings(), host_bytes=9 << 30) == 0  # then too little to run: a StartupError
    assert memory_limit(Settings(memory_limit=512 << 20), host_bytes=5 << 30) == 512 << 20


def test_a_limit_the_models_alone_exceed_is_a_startup_error():
    loaded = [load(ModelSpec(BUILTIN_MODEL, None))]
    with pytest.raises(StartupError, match="--memory-limit 512MiB: the models alone take 600MiB"):
        batch_settings(Settings(memory_limit=512 << 20), loaded, baseline=600 * MIB, limit=512 << 20)
    planned = batch_settings(Settings(), loaded, baseline=300 * MIB, limit=1 << 30)[BUILTIN_MODEL]
    assert planned.memory is not None and planned.memory.longest_single() >= 256
    assert planned.max_queue_tokens <= planned.memory.queue_tokens


def test_models_side_by_side_share_the_memory_by_what_their_runs_cost():
    """A large model beside a tiny one gets most of the memory: both can take the same long sequence."""
    tiny = ModelShape(hidden=32, heads=2)
    parts = model_shares({"minilm": (MINILM, 4), "tiny": (tiny, 4)})
    assert parts["minilm"] + parts["tiny"] == pytest.approx(1.0)
    assert parts["minilm"] > 0.85  # by cost (~95 MB against ~11 MB at 512 tokens), not 1/2 each
    budgets = {
        name: MemoryBudget.plan(shape, limit=1 << 30, baseline=300 * MIB, runs=4, share=parts[name])
        for name, shape in (("minilm", MINILM), ("tiny", tiny))
    }
    longest = {name: budget.longest_single() for name, budget in budgets.items()}
    assert abs(longest["minilm"] - longest["tiny"]) <= 0.02 * longest["minilm"]  # the same length each
    equal = MemoryBudget.plan(MINILM, limit=1 << 30, baseline=300 * MIB, runs=4, share=0.5)
    assert longest["minilm"] > equal.longest_single()
    assert budgets["minilm"].run_bytes * 4 + budgets["tiny"].run_bytes * 4 <= (1 << 30) - 300 * MIB
