"""``--engine auto`` / ``--precision auto``: measure each candidate on this CPU, once, and remember.

At a model's first start every candidate this CPU runs natively is opened
with the thread plan it will serve with and measured (``rule.Measured``):
texts per second on a fixed short batch (32 one-sentence texts) and a fixed
long batch (8 texts at the model's window, at most 512 tokens), and the
quantizer's fidelity statistics against ONNX Runtime fp32 on calibration
texts (every output, every jina-v3 task). ``rule.choose`` picks from the
table. The table is cached under ``--cache-dir/engine-choice/`` keyed by the
model's hash, the CPU (model name and flags), the engines' versions and the
thread plan, so a later start decides without measuring; the floor is not in
the key (the rule is applied again to the cached table).

The measuring runs in a child process (spawned, not forked: the gRPC server
is already up), one candidate after another: the server's memory baseline,
taken after loading, holds nothing of it (measured in-process, the three
compiled models' leftovers cut the built-in model's run budget from 92 to
70 MiB), and the child never holds more than one copy of the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache_dir import atomic_write, default_cache_dir, writable_cache
from ..errors import ModelLoadError, StartupError
from ..models.base import EmbeddingModel
from ..models.engines import (
    ENGINES,
    OPENVINO,
    Candidate,
    RunPool,
    cpu_flags,
    cpu_name,
    open_pool,
    unsupported,
    versions,
)
from ..models.files import ModelFiles
from ..models.loader import build_model
from ..models.openvino_pool import native_bf16
from ..quantize.calibration import default_texts, sentences
from ..quantize.core import source_digest
from ..quantize.fidelity import Runner, compare, padded, reference_vectors, tasks_of
from .rule import REFERENCE, Measured, choose, describe

log = logging.getLogger("embedding_server.selection")

AUTO = "auto"
#: Cache format: a change to what is measured makes old tables stale.
CACHE_VERSION = "3"
SHORT_BATCH = 32
LONG_BATCH = 8
LONG_TOKENS = 512
#: Timed runs of each batch (after one warm-up run), fewer when a batch takes long.
ROUNDS = 3
ROUND_SECONDS = 2.0


@dataclass(frozen=True)
class Choice:
    """What serves a model, and the table it was chosen from (None: asked for, not measured)."""

    candidate: Candidate
    table: tuple[Measured, ...] | None = None
    cached: bool = False


@dataclass(frozen=True)
class Plan:
    """The thread plan the candidates are measured with: the one they will serve with."""

    sessions: int = 1
    threads: int = 1
    layout: str = "shared"


def candidates(engine: str, precision: str) -> list[Candidate]:
    """The candidates ``--engine`` and ``--precision`` allow on this CPU.

    An explicit choice this machine cannot run is a StartupError in one line; under ``auto``
    candidates the CPU would only emulate (bf16 without AMX or AVX-512 BF16) are left out.
    int8 is never tried under ``auto``: it rewrites the graph (minutes for a large model) and
    its fidelity (min cosine ~0.99) is below the default floor; ask for it with ``--precision int8``.
    """
    engines = list(ENGINES) if engine == AUTO else [engine]
    if precision == AUTO:
        precisions = ["fp32", "bf16"] if OPENVINO in engines and native_bf16() else ["fp32"]
    else:
        precisions = [precision]
    wanted = [Candidate(e, p) for e in engines for p in precisions]
    possible = [c for c in wanted if unsupported(c) is None]
    if not possible:
        reasons = {unsupported(c) for c in wanted}
        why = "; ".join(sorted(map(str, reasons)))
        raise StartupError(f"--engine {engine} --precision {precision}: {why}")
    return possible


def choose_candidate(
    name: str,
    files: ModelFiles,
    engine: str,
    precision: str,
    floor: float,
    plan: Plan,
    cache_dir: Path | None = None,
) -> Choice:
    """The engine and precision to serve ``files`` with; measured (or read from the cache) when
    more than one candidate is allowed."""
    allowed = candidates(engine, precision)
    if len(allowed) == 1:
        return Choice(allowed[0])
    key = cache_key(name, files, plan)
    path = (cache_dir or default_cache_dir()) / "engine-choice" / f"{key}.json"
    table = read_table(path, [REFERENCE, *allowed])
    cached = table is not None
    if table is None:
        started = time.monotonic()
        log.info("model %s: measuring %s on this CPU (%s)", name, ", ".join(map(str, allowed)), cpu_name())
        table = measure_in_child(name, files, allowed, plan)
        log.info("model %s: measured in %.1fs", name, time.monotonic() - started)
        write_table(writable_cache(cache_dir, "engine-choice") / f"{key}.json", table)
    chosen = choose(table, floor, allowed)
    log.info(
        "model %s: serving on %s (fastest at min cosine >= %s to onnxruntime fp32%s): %s",
        name,
        chosen.candidate,
        floor,
        ", measured earlier on this CPU" if cached else "",
        describe(table, floor),
    )
    return Choice(chosen.candidate, tuple(table), cached)


def cache_key(name: str, files: ModelFiles, plan: Plan) -> str:
    """What the measured table depends on, hashed: the model, this CPU, the engines, the threads."""
    identity = {
        "model": source_digest(files),
        "cpu": cpu_name(),
        "flags": cpu_flags(),
        "versions": versions(),
        "plan": [plan.sessions, plan.threads, plan.layout],
        "version": CACHE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{name}-{digest}"


def read_table(path: Path, allowed: Sequence[Candidate]) -> list[Measured] | None:
    """The cached table when it holds every allowed candidate; None when missing or unreadable."""
    try:
        rows = [Measured.from_dict(row) for row in json.loads(path.read_text())["table"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    measured = {row.candidate for row in rows}
    return rows if all(c in measured for c in allowed) else None


def write_table(path: Path, table: Sequence[Measured]) -> None:
    data = {"cpu": cpu_name(), "versions": versions(), "table": [row.as_dict() for row in table]}
    try:
        atomic_write(path, json.dumps(data, indent=2).encode())
    except OSError as exc:  # a read-only cache: measured again next time, not fatal
        log.warning("cannot cache the engine choice at %s: %s", path, exc)


def measure_in_child(
    name: str, files: ModelFiles, allowed: Sequence[Candidate], plan: Plan
) -> list[Measured]:
    """``measure`` in a child interpreter (``python -m embedding_server.selection.measure``).

    A fresh interpreter, so nothing of the measuring stays in the server's memory. The
    arguments and the result (the table, or the ModelLoadError that names a broken file)
    travel pickled over the pipes; a child that dies otherwise is a StartupError with its
    last line of stderr.
    """
    done = subprocess.run(
        [sys.executable, "-m", __name__],
        input=pickle.dumps((name, files, list(allowed), plan)),
        capture_output=True,
        check=False,
    )
    if done.returncode == 0:
        result = pickle.loads(done.stdout)
        if isinstance(result, Exception):
            raise result
        return list(result)
    last = (done.stderr.decode(errors="replace").strip().splitlines() or [f"exit {done.returncode}"])[-1]
    raise StartupError(f"model {name}: measuring the engines failed ({last})")


def _child_main() -> None:
    """The child's side: read the arguments, measure, write the table (or a load error) back."""
    name, files, allowed, plan = pickle.loads(sys.stdin.buffer.read())
    try:
        result: object = measure(name, files, allowed, plan)
    except ModelLoadError as exc:
        result = exc
    sys.stdout.buffer.write(pickle.dumps(result))


def measure(name: str, files: ModelFiles, allowed: Sequence[Candidate], plan: Plan) -> list[Measured]:
    """Each candidate's row, the reference first; one pool open at a time."""
    texts = default_texts()[::4]  # 50 texts: single sentences and compositions up to the window
    table: list[Measured] = []
    expected = None
    model: EmbeddingModel | None = None
    for candidate in [REFERENCE, *[c for c in allowed if c != REFERENCE]]:
        pool = open_pool(candidate, files.onnx, plan.sessions, plan.threads, plan.layout)
        model = model or build_model(name, files, pool.signature)
        run = runner(pool)
        short, long = speed_batches(model)
        short_per_s, long_per_s = throughput(model, run, short), throughput(model, run, long)
        if expected is None:
            expected = reference_vectors(model, run, texts)
            table.append(Measured(candidate, short_per_s, long_per_s, 1.0, ""))
        else:
            outputs = compare(model, expected, run, texts)
            worst_name, worst_stats = min(outputs.items(), key=lambda item: item[1].min)
            table.append(Measured(candidate, short_per_s, long_per_s, worst_stats.min, worst_name))
        del pool, run
    return table


def runner(pool: RunPool) -> Runner:
    def run(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = pool.run(0, names, feeds)
        return [outputs[n] for n in names]

    return run


def speed_batches(model: EmbeddingModel) -> tuple[list[str], list[str]]:
    """The fixed short and long batches (the long texts are cut to the window by the tokenizer)."""
    base = sentences()
    short = [base[i % len(base)] for i in range(SHORT_BATCH)]
    words = " ".join(base).split()
    tokens = min(model.description.max_tokens, LONG_TOKENS)
    long = [" ".join(words[i * 7 :] + words[: i * 7])[: tokens * 8] for i in range(LONG_BATCH)]
    return short, long


def throughput(model: EmbeddingModel, run: Runner, texts: list[str]) -> float:
    """Texts per second of one padded batch of ``texts``: the median of up to ROUNDS timed runs."""
    task = tasks_of(model)[0]
    _, ids, mask = padded(model, texts, task)
    ids, mask = ids[:, : min(ids.shape[1], LONG_TOKENS)], mask[:, : min(mask.shape[1], LONG_TOKENS)]
    feeds = model.feeds(ids, mask, task)
    run(model.output_names, feeds)  # warm-up: first-shape compilation and allocation
    times: list[float] = []
    deadline = time.monotonic() + ROUND_SECONDS
    while len(times) < ROUNDS and (not times or time.monotonic() < deadline):
        started = time.perf_counter()
        run(model.output_names, feeds)
        times.append(time.perf_counter() - started)
    return len(texts) / statistics.median(times)


if __name__ == "__main__":
    _child_main()
