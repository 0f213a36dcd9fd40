"""N concurrent OpenVINO runs over one model file: the second engine behind ``models/engines.py``.

OpenVINO reads the same ONNX files ONNX Runtime does (com.microsoft
MultiHeadAttention and Gelu included) and compiles them once per model for
this CPU; ``INFERENCE_PRECISION_HINT`` bf16 runs the matrix work on AMX or
AVX-512 BF16 where the CPU has them (``native_bf16``).

Slots. A compiled model runs one request per *stream* at a time, and OpenVINO
caps its streams at the number of cores: with 2 streams on 2 cores, a query
waited behind two bulk runs (bench/mixed.py: p99 266 ms under a corpus job). A
single-stream, single-thread compiled model runs its request on the calling
thread itself (its thread CPU time equals its wall time), so the batcher's
threads keep their roles: a bulk run executes on a niced ``bulk-`` thread and a
query on its ``run-`` thread, as with ONNX Runtime, and no hand-off to a worker
thread is paid (measured, 9-token query: 1.90 ms inline, 3.33 ms through a
2-stream model). So a model of at most ``SLOTS_MAX_BYTES`` gets one
single-stream compiled model per concurrent run the batcher may start
(``sessions`` bulk runs and as many interactive ones), each with ``threads``
threads; each copy costs its converted weights (built-in model: +31 MiB a copy
in bf16). A larger model gets one compiled model with ``sessions`` streams that
share its weights, and requests beyond them wait inside OpenVINO.

Memory: a compiled model keeps the intermediate buffers of the largest shape it
ran (its high-water mark, like ONNX Runtime's arena), so under load the pool
holds at most one run's working set per concurrent run, which the memory budget
plans for. Once the pool has been idle for ``IDLE_RELEASE_SECONDS`` after runs
of at least ``RELEASE_AFTER_TOKENS`` padded tokens, ``release_memory`` gives the
buffers back (measured on the built-in model: a 64 x 256 run left 315 MiB held,
9 ms to release, small runs after it no slower). Not after every long run: under
a corpus job that re-allocated every batch's buffers and, releasing under the
pool's lock, held up the queries beside it (p99 77 ms).

No wide session: on 2 cores one thread ran a 9-token bf16 query in 1.90 ms and
two threads in 2.02 ms.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from .base import SessionSignature
from .sessions import model_bytes

ENGINE = "openvino"
#: A run of at least this many padded tokens makes the pool release its buffers once idle.
RELEASE_AFTER_TOKENS = 2048
#: How long the pool must stay idle before it releases those buffers.
IDLE_RELEASE_SECONDS = 1.0

_core: Any = None
_core_lock = threading.Lock()


def core() -> Any:
    """The process's one ``openvino.Core`` (imported on first use: ONNX Runtime users never load it)."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino

            _core = openvino.Core()
        return _core


def native_bf16() -> bool:
    """Whether OpenVINO runs bf16 natively on this CPU (AMX or AVX-512 BF16), not emulated."""
    capabilities = core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in capabilities


def version() -> str:
    import openvino

    return str(openvino.__version__)


_OV_TYPES = {
    "f32": "tensor(float)",
    "f16": "tensor(float16)",
    "bf16": "tensor(bfloat16)",
    "i64": "tensor(int64)",
}


def _dims(port: Any) -> list[Any]:
    """A port's shape as ONNX Runtime writes it: ints for static dimensions, names for dynamic ones."""
    shape = port.get_partial_shape()
    return [d.get_length() if d.is_static else f"d{i}" for i, d in enumerate(shape)]


def _type_name(port: Any) -> str:
    name = port.get_element_type().get_type_name()
    return _OV_TYPES.get(name, f"tensor({name})")


#: Largest model (graph and external weights) served by one compiled copy per run slot.
SLOTS_MAX_BYTES = 256 * 1024 * 1024


@dataclass
class _Compiled:
    """One compiled model, the requests it has handed out, and its held buffers' high-water mark."""

    model: Any
    ports: dict[str, Any] = field(default_factory=dict)  # output name -> this model's output port
    running: int = 0
    largest: int = 0  # padded tokens of the largest run since its buffers were last released


@dataclass
class _Slot:
    compiled: _Compiled
    request: Any


class OpenVinoPool:
    """Concurrent runs of one model on OpenVINO; ``run`` may be called from any number of threads."""

    engine = ENGINE
    wide_threads = 0
    has_wide = False
    #: Its CPU plugin runs MatMul/Softmax attention in blocks, padded or not (models/attention.py).
    attention = "blocked"

    def __init__(self, path: Path, sessions: int = 1, threads: int = 1, precision: str = "fp32") -> None:
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing")
        self.path = path
        self.threads = threads
        self.precision = precision
        self._sessions = sessions
        runs = 2 * sessions  # bulk runs, and as many interactive runs beside them
        per_slot = model_bytes(path) <= SLOTS_MAX_BYTES
        self.layout = "slots" if per_slot else "streams"
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "NUM_STREAMS": "1" if per_slot else str(sessions),
            "INFERENCE_NUM_THREADS": str(threads if per_slot else sessions * threads),
            # In a container the cores a process may use are a quota, not a set: never pin.
            "ENABLE_CPU_PINNING": "NO",
        }
        try:
            model = core().read_model(str(path))
            compiled = [
                _Compiled(core().compile_model(model, "CPU", config)) for _ in range(runs if per_slot else 1)
            ]
        except Exception as exc:  # openvino raises RuntimeError with a multi-line C++ trace
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelLoadError(f"{path}: OpenVINO cannot compile it ({first})") from exc
        # The names as the ONNX file has them: compiling may merge a tensor's names (bge-m3's
        # token_embeddings came back as "tanh_23"), so they are read before, and each output
        # is fetched by its port, which answers to every name it has.
        self.signature = SessionSignature(
            inputs={p.get_any_name(): _dims(p) for p in model.inputs},
            outputs={p.get_any_name(): _dims(p) for p in model.outputs},
            output_types={p.get_any_name(): _type_name(p) for p in model.outputs},
        )
        del model  # each compiled model holds its own (converted) weights
        for c in compiled:
            c.ports = {name: c.model.output(name) for name in self.signature.outputs}
        self._compiled = compiled
        self._free = [
            _Slot(c, c.model.create_infer_request()) for c in compiled for _ in range(1 if per_slot else runs)
        ]
        self._lock = threading.Lock()
        self._running = 0
        self._runs = 0  # runs started: a release waits for a moment with none since it was planned
        self._release_timer: threading.Timer | None = None

    @property
    def size(self) -> int:
        return self._sessions

    @property
    def holds_long_run_buffers(self) -> bool:
        """Whether a compiled model still holds the buffers of a run of RELEASE_AFTER_TOKENS or more."""
        with self._lock:
            return any(c.largest >= RELEASE_AFTER_TOKENS for c in self._compiled)

    def add_wide(self, threads: int) -> bool:
        """Never: see the module docstring."""
        return False

    def run(
        self, slot: int, output_names: list[str], feeds: dict[str, np.ndarray], wide: bool = False
    ) -> dict[str, np.ndarray]:
        """One run on a free slot, on this thread (``slot`` and ``wide`` do not apply: slots are shared)."""
        with self._lock:
            taken = self._free.pop()
            taken.compiled.running += 1
            self._running += 1
            self._runs += 1
        tokens = max((int(np.prod(v.shape[:2])) for v in feeds.values() if v.ndim >= 2), default=0)
        try:
            results = taken.request.infer(feeds)  # releases the GIL; outputs are copies (share_outputs off)
            return {name: np.asarray(results[taken.compiled.ports[name]]) for name in output_names}
        finally:
            compiled = taken.compiled
            with self._lock:
                compiled.running -= 1
                compiled.largest = max(compiled.largest, tokens)
                self._running -= 1
                self._free.append(taken)
                self._plan_release()

    def _plan_release(self) -> None:
        """Under the lock: when idle with buffers worth releasing, release them after a quiet second."""
        if self._running or self._release_timer is not None:
            return
        if all(c.largest < RELEASE_AFTER_TOKENS for c in self._compiled):
            return
        self._release_timer = threading.Timer(IDLE_RELEASE_SECONDS, self._release_if_quiet, [self._runs])
        self._release_timer.daemon = True
        self._release_timer.start()

    def _release_if_quiet(self, runs: int) -> None:
        """The timer's thread: release if no run started since it was planned, else plan again."""
        with self._lock:
            self._release_timer = None
            if self._running == 0 and self._runs == runs:
                for compiled in self._compiled:
                    if compiled.largest >= RELEASE_AFTER_TOKENS:
                        compiled.model.release_memory()
                        compiled.largest = 0
            self._plan_release()
