"""N concurrent OpenVINO runs over one model file: the second engine behind ``models/engines.py``.

OpenVINO reads the same ONNX files ONNX Runtime does (com.microsoft
MultiHeadAttention and Gelu included) and compiles them once per model for
this CPU; ``INFERENCE_PRECISION_HINT`` bf16 runs the matrix work on AMX or
AVX-512 BF16 where the CPU has them (``native_bf16``).

One compiled model with one *stream* per concurrent run the batcher may start
(``sessions`` bulk runs plus as many interactive ones), each stream with
``threads`` threads: the streams share the weights, each holds its own
intermediate buffers, and a run never waits inside OpenVINO for a stream that
another run holds (a query beside two bulk runs gets a stream of its own).
Runs go through a free list of infer requests, one per concurrent caller.

Memory: a stream keeps the intermediate buffers of the largest shape it ran
(its high-water mark, like ONNX Runtime's arena). So the process does not stay
at a long batch's peak, ``release_memory`` gives them back whenever the pool
goes idle after a run of at least ``RELEASE_AFTER_TOKENS`` padded tokens
(measured on the built-in model: a 64 x 256 run left 315 MiB held, 9 ms to
release, small runs after it no slower). Concurrent runs still peak at one
run's working set per stream, which the memory budget plans for.

No wide session: one stream of 1 thread ran a 9-token query in 1.70 ms, all
2 cores in 1.59 ms (bf16, AMX): a second compiled copy is not worth its memory.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from .base import SessionSignature

ENGINE = "openvino"
#: A run of at least this many padded tokens makes the pool release its buffers once idle.
RELEASE_AFTER_TOKENS = 2048

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


class OpenVinoPool:
    """Concurrent runs of one compiled model; ``run`` may be called from any number of threads."""

    engine = ENGINE
    layout = "streams"
    wide_threads = 0
    has_wide = False

    def __init__(self, path: Path, sessions: int = 1, threads: int = 1, precision: str = "fp32") -> None:
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing")
        self.path = path
        self.threads = threads
        self.precision = precision
        self._sessions = sessions
        self.streams = 2 * sessions  # bulk runs, and as many interactive runs beside them
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "NUM_STREAMS": str(self.streams),
            "INFERENCE_NUM_THREADS": str(self.streams * threads),
            # In a container the cores a process may use are a quota, not a set: never pin.
            "ENABLE_CPU_PINNING": "NO",
        }
        try:
            model = core().read_model(str(path))
            self._compiled = core().compile_model(model, "CPU", config)
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
        self._ports = {name: self._compiled.output(name) for name in self.signature.outputs}
        del model  # the compiled model holds its own (converted) weights
        self._free: list[Any] = []
        self._lock = threading.Lock()
        self._running = 0
        self._largest = 0  # padded tokens of the largest run since the buffers were last released

    @property
    def size(self) -> int:
        return self._sessions

    def add_wide(self, threads: int) -> bool:
        """Never: see the module docstring."""
        return False

    def run(
        self, slot: int, output_names: list[str], feeds: dict[str, np.ndarray], wide: bool = False
    ) -> dict[str, np.ndarray]:
        """One run on a free stream (``slot`` and ``wide`` do not apply: streams are shared)."""
        with self._lock:
            request = self._free.pop() if self._free else self._compiled.create_infer_request()
            self._running += 1
        tokens = max((int(np.prod(v.shape[:2])) for v in feeds.values() if v.ndim >= 2), default=0)
        try:
            results = request.infer(feeds)  # releases the GIL; outputs are copies (share_outputs off)
            return {name: np.asarray(results[self._ports[name]]) for name in output_names}
        finally:
            with self._lock:
                self._free.append(request)
                self._running -= 1
                self._largest = max(self._largest, tokens)
                if self._running == 0 and self._largest >= RELEASE_AFTER_TOKENS:
                    self._compiled.release_memory()
                    self._largest = 0
