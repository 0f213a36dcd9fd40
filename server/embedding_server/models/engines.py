"""The engine seam: what runs a model's graph, and at which precision.

Two engines read the same ONNX files: ONNX Runtime's CPU provider
(``sessions.py``: fp32, and the quantizer's int8 graphs) and OpenVINO
(``openvino_pool.py``: fp32, and bf16 where the CPU runs it natively). Both
give the batcher the same ``RunPool``: ``run(slot, output_names, feeds)`` from
several threads at once, and the session signature the families check at
load. Which one serves a model is chosen by measurement (``selection/``)
unless ``--engine`` / ``--precision`` say.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from . import openvino_pool
from .base import SessionSignature
from .openvino_pool import OpenVinoPool, native_bf16
from .sessions import SessionPool

ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
ENGINES = (ONNXRUNTIME, OPENVINO)
PRECISIONS = ("fp32", "bf16", "int8")


class RunPool(Protocol):
    """Concurrent runs over one model, whatever runs them."""

    engine: str
    precision: str
    path: Path
    threads: int
    layout: str
    wide_threads: int
    signature: SessionSignature
    #: How a run holds attention scores (engine/memory.py ATTENTION_KINDS): plain, fused, blocked.
    attention: str

    @property
    def size(self) -> int: ...

    @property
    def has_wide(self) -> bool: ...

    def add_wide(self, threads: int) -> bool: ...

    def run(
        self, slot: int, output_names: list[str], feeds: dict[str, np.ndarray], wide: bool = False
    ) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class Candidate:
    """One way to serve a model: an engine at a precision."""

    engine: str
    precision: str

    def __str__(self) -> str:
        return f"{self.engine} {self.precision}"


def unsupported(candidate: Candidate) -> str | None:
    """Why this CPU or engine cannot run ``candidate`` (None: it can), in words for a startup line."""
    if candidate.engine == ONNXRUNTIME and candidate.precision == "bf16":
        return "ONNX Runtime's CPU provider has no bf16 kernels; bf16 runs on --engine openvino"
    if candidate.engine == OPENVINO and candidate.precision == "int8":
        return (
            "OpenVINO does not run the quantizer's int8 graphs (MatMulIntegerToFloat); "
            "int8 runs on --engine onnxruntime"
        )
    if candidate.precision == "bf16" and not native_bf16():
        return (
            f"this CPU ({cpu_name()}) has no native bf16 (AMX or AVX-512 BF16): "
            "bf16 would be emulated and slow"
        )
    return None


def open_pool(
    candidate: Candidate, path: Path, sessions: int = 1, threads: int = 1, layout: str = "shared"
) -> RunPool:
    """The run pool of ``candidate`` over the graph at ``path``; ModelLoadError on a bad file."""
    if candidate.engine == OPENVINO:
        return OpenVinoPool(path, sessions=sessions, threads=threads, precision=candidate.precision)
    return SessionPool(path, sessions=sessions, threads=threads, layout=layout)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what Python knows."""
    match = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def cpu_flags() -> list[str]:
    """The CPU flags that decide which candidate is fast: vector widths, bf16, AMX, VNNI."""
    match = re.search(r"^flags\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    flags = match.group(1).split() if match else []
    return sorted(f for f in set(flags) if f.startswith(("avx", "amx", "fma", "f16c")))


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def versions() -> dict[str, str]:
    """The engines' library versions: a new one may change which candidate is fastest."""
    return {ONNXRUNTIME: ort.__version__, OPENVINO: openvino_pool.version()}
