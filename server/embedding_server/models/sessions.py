"""N concurrent ONNX Runtime runs over one model file.

``run(slot, ...)`` lets N batches run at once, one per slot, each with
``threads`` intra-op threads (N x threads = cores by default).

Two layouts. ``shared`` (the default): one session, N concurrent ``Run``
calls (ONNX Runtime sessions are thread-safe); the weights and their
pre-packed copies exist once. ``separate``: N sessions, each with its own
weights and thread pool. Measured with bench/session_pool.py on the default
model (2 cores, N=2, batches of 16): shared 1.11x the throughput of a single
2-thread session at 1.16x its peak RSS; separate 0.65x at 1.35x. With
threads > 1 concurrent runs of one session share its thread pool, so large
machines with several threads per run may prefer ``separate``.

A third, optional session (``add_wide``) runs with every core's threads: an
interactive request on an idle server uses the whole machine instead of one
core. It holds its own copy of the weights, so it is opened only for models
small enough that the copy is cheap (``WIDE_MAX_BYTES``).

ONNX Runtime's CPU memory arena is off. The arena keeps the high-water mark
of every run's intermediate tensors and never gives it back: with it on the
memory after a run of 32 x 256 stays at its peak (+654 MiB), with it off it
goes back (bench/memory_budget.py); two concurrent runs of 32 x 256 and then
smaller batches peaked at 2472 MiB on, 1831 MiB off (with it on, a run's
arena growth adds to the memory the next run of another shape asks for).
Speed on 2 busy cores was within the noise (long batches slower off, short
ones faster); the memory budget (engine/memory.py) assumes it off.

Attention written as plain MatMul/Softmax ops is rewritten at open
(``attention.py``): runs without padding take ONNX Runtime's flash-attention
kernel, whose memory does not grow with the square of the sequence length.
The rewritten graph is checked against itself before it serves; where the
check fails, or nothing matches, the file is served as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import ModelLoadError
from . import attention
from .base import SessionSignature, signature_of
from .files import missing_external_data, truncated_external_data

ENGINE = "onnxruntime"
log = logging.getLogger(__name__)


def session_options(threads: int, spinning: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Fatal only: a file ORT cannot load raises, and open_session turns that into one line of ours
    # (at 3, errors, ORT also printed its own "[E:onnxruntime:...]" line for it on stderr).
    options.log_severity_level = 4
    # ORT's intra-op threads busy-wait between ops by default. In a server they
    # share the cores with the tokenizer threads and the event loop, and the
    # spinning starves them: measured on 2 cores with another process busy,
    # single-sequence runs went 2.3x faster and batches of 32 no slower with it off.
    # The wide session (``spinning``) is the exception: it runs only when nothing
    # else does, and there a lone query's threads that sleep between ops (a futex
    # wake-up per op) made it ~1.3x slower than threads that spin (bench/mixed.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # ... but only within a run: by default they go on spinning after it returns, and under a load of
    # many small runs the wide session's second thread burned 21-27% of the server's CPU doing
    # nothing (bench/serving_path.py, per-thread CPU from /proc).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_cpu_mem_arena = False  # see the module docstring: peak memory stays bounded
    return options


def open_session(
    path: Path, threads: int, spinning: bool = False, graph: bytes | None = None
) -> ort.InferenceSession:
    """One session, or a ModelLoadError naming the file that is missing or broken.

    ``graph``: a rewrite of the file's graph to run instead; its external weights are
    read from beside ``path``."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing")
    try:
        options = session_options(threads, spinning)
        if graph is not None:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(path.parent)
            )
            return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for any bad file
        missing = missing_external_data(path)  # diagnosed only on failure: it parses the graph
        if missing:
            raise ModelLoadError(f"{missing[0]}: missing external weights file referenced by {path}") from exc
        truncated = truncated_external_data(path)
        if truncated:
            short, size, needed = truncated[0]
            raise ModelLoadError(
                f"{short}: external weights file is truncated ({size} bytes, {path.name} needs {needed})"
            ) from exc
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load it ({first_line})") from exc


LAYOUTS = ("shared", "separate")
#: Largest ONNX file (with external weights) for which a wide session (a second copy) is opened.
WIDE_MAX_BYTES = 256 * 1024 * 1024


class SessionPool:
    """N run slots over one model; ``run`` may be called from N threads at once."""

    engine = ENGINE
    precision = "fp32"  # of the computation: an int8 graph's precision is its file's (loader.py)

    def __init__(self, path: Path, sessions: int = 1, threads: int = 1, layout: str = "shared") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"session layout must be one of {LAYOUTS}, not {layout!r}")
        self.path = path
        self.threads = threads
        self.layout = layout
        self._graph, self.fused_attention = self._fused()
        self.attention = "fused" if self.fused_attention else "plain"
        first = open_session(path, threads, graph=self._graph)
        self.signature: SessionSignature = signature_of(first)
        if layout == "shared":
            self._sessions = [first] * sessions
        else:
            self._sessions = [first] + [
                open_session(path, threads, graph=self._graph) for _ in range(sessions - 1)
            ]
        self._wide: ort.InferenceSession | None = None
        self.wide_threads = 0

    def _fused(self) -> tuple[bytes | None, int]:
        """The graph with its attention fused and how many cores were, or (None, 0): serve the file.

        The check's session is closed before the pool's open: the weights are never held twice.
        """
        fused = attention.fused_graph(self.path)
        if fused is None:
            return None, 0
        graph, count = fused
        try:
            check = open_session(self.path, 1, graph=graph)
        except ModelLoadError as exc:  # a broken file: opening it as it is names what is wrong
            log.warning("%s: attention left unfused (%s)", self.path, exc)
            return None, 0
        problem = attention.disagreement(check, signature_of(check))
        del check
        if problem:
            log.warning("%s: attention left unfused: %s", self.path, problem)
            return None, 0
        return graph, count

    def add_wide(self, threads: int) -> bool:
        """Open the all-cores session for lone interactive runs; False when not worth it.

        Not worth it when it would have no more threads than a slot, or the
        model is too big to hold twice.
        """
        if threads <= self.threads or model_bytes(self.path) > WIDE_MAX_BYTES:
            return False
        self._wide = open_session(self.path, threads, spinning=True, graph=self._graph)
        self.wide_threads = threads
        return True

    @property
    def has_wide(self) -> bool:
        return self._wide is not None

    @property
    def first(self) -> ort.InferenceSession:
        """The first slot's session (its options are what every slot session was opened with)."""
        return self._sessions[0]

    @property
    def size(self) -> int:
        return len(self._sessions)

    def run(
        self, slot: int, output_names: list[str], feeds: dict[str, np.ndarray], wide: bool = False
    ) -> dict[str, np.ndarray]:
        """One run on ``slot``'s session (a slot past ``size``, the batcher's interactive extra,
        shares a session: ONNX Runtime sessions take concurrent runs), or on the wide one."""
        session = (
            self._wide if wide and self._wide is not None else self._sessions[slot % len(self._sessions)]
        )
        outputs = session.run(output_names, feeds)
        return dict(zip(output_names, outputs, strict=True))


def model_bytes(path: Path) -> int:
    """The graph file and its external weights beside it (``model.onnx_data``, ``model.onnx.data``...)."""
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())
