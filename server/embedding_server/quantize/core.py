"""Quantize a model directory to int8, gated by fidelity to fp32.

1. Every weight MatMul becomes per-row int8 (rewrite.py).
2. The int8 graph is compared with fp32 on the calibration texts, per output.
   Before that, SmoothQuant: per input channel, activation outliers measured on the
   calibration texts are moved into the weights (X / s, s * W), which quantize better.
3. Below the floor: each MatMul's own damage is measured (that one alone int8,
   on a subset), and the most damaging are kept fp32 one by one until the
   floor holds or ``max_fp32`` is reached; then the model is refused unless
   forced, naming the worst output and its cosine.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError

from ..cache_dir import file_digest
from ..models.base import EmbeddingModel
from ..models.files import ModelFiles, external_data_extents
from ..models.loader import build_model
from ..models.sessions import open_session, session_options
from .fidelity import Floor, OutputStats, as_dict, compare, reference_vectors, tasks_of, vectors, worst
from .report import write_report
from .rewrite import (
    matmul_inputs,
    name_nodes,
    quantize_matmuls,
    quantize_tables,
    smoothing_factors,
    weight_matmuls,
    with_outputs,
)

METHOD = (
    "per-row int8 activations (uint8, zero point 128, one scale per token row: batch-independent), "
    "per-output-channel symmetric int8 weights (stored uint8 + 128 where the int8 kernel saturates), "
    "SmoothQuant input-channel factors from calibration, "
    "MatMulIntegerToFloat"
)
SENSITIVITY_TEXTS = 32
#: SmoothQuant's migration strength: measured on all-MiniLM-L6-v2 (200 texts, all MatMuls int8)
#: min cosine 0.9838 without, 0.9894 at 0.3, 0.9918 at 0.5, 0.9915 at 0.7.
DEFAULT_SMOOTH_ALPHA = 0.5
SMOOTHING_TEXTS = 64
PROVIDERS = ["CPUExecutionProvider"]
DEFAULT_FLOOR = Floor()
#: ONNX's protobuf limit; bigger graphs keep their weights in an external data file.
INLINE_LIMIT = 1_800_000_000
WEIGHT_SUFFIXES = (".onnx", ".onnx_data", ".safetensors", ".bin", ".h5", ".msgpack", ".ot")


class QuantizeRefused(Exception):
    """The int8 model misses the floor even with the allowed fp32 nodes."""


@dataclass
class Candidate:
    kept: list[str]
    outputs: dict[str, OutputStats]
    graph: onnx.ModelProto
    session: Any

    def passes(self, floor: Floor) -> bool:
        return all(s.passes(floor) for s in self.outputs.values())


def source_digest(files: ModelFiles) -> str:
    """The graph file's hash, and its external weight files' (a changed weight is a new model)."""
    parts = [file_digest(files.onnx)] + [
        file_digest(path, 8) for path, _ in external_data_extents(files.onnx)
    ]
    return "-".join(parts)


def inline_bytes(model: onnx.ModelProto) -> int:
    """The model's size as one protobuf; past protobuf's 2 GiB limit (jina-v3 and bge-m3 at full
    size: 2.27 GB in fp32) ``ByteSize`` raises instead of answering, and this says "too big"."""
    try:
        return int(model.ByteSize())
    except EncodeError:
        return 1 << 31


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if inline_bytes(model) > INLINE_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}_data")
    else:
        onnx.save_model(model, str(path))


def runner(session: Any) -> Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]:
    return lambda names, feeds: session.run(names, feeds)


def timed(session: Any, model: EmbeddingModel, texts: list[str]) -> float:
    """Best of 3 runs of one batch, in ms (the speed cost of kept nodes, for the report)."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        vectors(model, runner(session), texts, tasks_of(model)[0])
        best = min(best, time.perf_counter() - started)
    return best * 1000


def activation_maxima(
    model: EmbeddingModel, fp32: onnx.ModelProto, names: list[str], texts: list[str]
) -> dict[str, np.ndarray]:
    """Each weight MatMul's input: max |value| per channel over ``texts`` (for SmoothQuant factors)."""
    inputs = matmul_inputs(fp32, names)
    values = list(dict.fromkeys(inputs.values()))
    probe = with_outputs(fp32, values)
    if inline_bytes(probe) >= INLINE_LIMIT:
        return {}  # too big to probe in memory: no smoothing
    session = ort.InferenceSession(probe.SerializeToString(), session_options(1), providers=PROVIDERS)
    maxima: dict[str, np.ndarray] = {}

    def capture(output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = session.run(output_names + values, feeds)
        for value, array in zip(values, results[len(output_names) :], strict=True):
            channel_max = np.abs(array).reshape(-1, array.shape[-1]).max(axis=0)
            maxima[value] = np.maximum(maxima.get(value, 0.0), channel_max)
        kept: list[np.ndarray] = results[: len(output_names)]
        return kept

    for task in tasks_of(model):
        vectors(model, capture, texts, task)
    return {name: maxima[inputs[name]] for name in names}


def quantize_directory(
    name: str,
    source: ModelFiles,
    destination: Path,
    texts: list[str],
    calibration_source: str,
    floor: Floor = DEFAULT_FLOOR,
    max_fp32: int | None = None,
    force: bool = False,
    smooth_alpha: float = DEFAULT_SMOOTH_ALPHA,
    quantize_embeddings: bool = True,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Write an int8 copy of ``source`` to ``destination`` with its report; QuantizeRefused below floor."""
    fp32 = onnx.load(str(source.onnx))
    name_nodes(fp32)
    candidates = weight_matmuls(fp32)
    if not candidates:
        raise QuantizeRefused(f"{source.onnx}: no MatMul with a constant weight matrix to quantize")
    limit = max(1, len(candidates) // 4) if max_fp32 is None else max_fp32
    reference_session = open_session(source.onnx, 1)
    model = build_model(name, source, reference_session)
    reference = runner(reference_session)
    staging = destination.parent / f".{destination.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    relative = (
        source.onnx.relative_to(source.root)
        if source.onnx.is_relative_to(source.root)
        else Path("model.onnx")
    )

    expected: dict[int, Any] = {}  # fp32 outputs per text list, computed once
    tables: list[str] = []

    smoothing = None
    if smooth_alpha > 0:
        maxima = activation_maxima(model, fp32, candidates, texts[:SMOOTHING_TEXTS])
        smoothing = smoothing_factors(fp32, maxima, smooth_alpha) if maxima else None

    def build(kept: list[str], sample: list[str], tag: str) -> Candidate:
        graph = quantize_matmuls(fp32, [c for c in candidates if c not in kept], smoothing)
        tables[:] = quantize_tables(graph) if quantize_embeddings else []
        if inline_bytes(graph) < INLINE_LIMIT:  # in memory: no file per trial
            session = ort.InferenceSession(graph.SerializeToString(), session_options(1), providers=PROVIDERS)
        else:
            save_graph(graph, staging / tag / relative)
            session = open_session(staging / tag / relative, 1)
        if id(sample) not in expected:
            expected[id(sample)] = reference_vectors(model, reference, sample)
        return Candidate(kept, compare(model, expected[id(sample)], runner(session), sample), graph, session)

    try:
        started = time.monotonic()
        best = all_int8 = build([], texts, "all")
        log(f"all {len(candidates)} MatMuls int8: " + summary(best.outputs))
        if not best.passes(floor) and limit > 0:
            sample = texts[:SENSITIVITY_TEXTS]
            damage: dict[str, float] = {}
            for index, node in enumerate(candidates):
                alone = build([c for c in candidates if c != node], sample, f"alone{index}")
                damage[node] = max(1 - s.mean for s in alone.outputs.values())
                shutil.rmtree(staging / f"alone{index}", ignore_errors=True)
            ranked = sorted(candidates, key=lambda c: -damage[c])
            log("most sensitive: " + ", ".join(f"{c} ({damage[c]:.2e})" for c in ranked[:limit]))
            for count in range(1, limit + 1):
                best = build(ranked[:count], texts, f"keep{count}")
                log(f"keeping {count} fp32: " + summary(best.outputs))
                if best.passes(floor):
                    break
        worst_name, worst_stats = worst(best.outputs, floor)
        passed = best.passes(floor)
        if not passed and not force:
            missed = "min" if worst_stats.min < floor.min else "mean"
            raise QuantizeRefused(
                f"int8 {name} is below the fidelity floor: worst output {worst_name} has {missed} cosine "
                f"{getattr(worst_stats, missed):.5f} (floor {getattr(floor, missed)}; "
                f"min {worst_stats.min:.5f}, mean {worst_stats.mean:.5f}) with {len(best.kept)} of "
                f"{len(candidates)} MatMuls kept fp32 "
                f"(at most {limit}); use --force to write it anyway"
            )
        speed_texts = texts[:BATCH_FOR_SPEED]
        fp32_ms = timed(reference_session, model, speed_texts)
        all_int8_ms = timed(all_int8.session, model, speed_texts)
        int8_ms = all_int8_ms if best is all_int8 else timed(best.session, model, speed_texts)
        speed: dict[str, object] = {
            "batch": f"{len(speed_texts)} calibration texts",
            "fp32_ms": fp32_ms,
            "all_int8_ms": all_int8_ms,
            "int8_ms": int8_ms,
            "speedup": fp32_ms / int8_ms,
            "kept_cost": int8_ms / all_int8_ms - 1,
        }
        report = {
            "model": name,
            "source": str(source.onnx),
            "source_sha256": source_digest(source),
            "method": METHOD,
            "smoothing_alpha": smooth_alpha if smoothing else 0.0,
            "floor": {"min": floor.min, "mean": floor.mean},
            "calibration": {"source": calibration_source, "texts": len(texts)},
            "outputs": as_dict(best.outputs),
            "passed": passed,
            "worst": {"output": worst_name, "min": worst_stats.min, "mean": worst_stats.mean},
            "quantized": [c for c in candidates if c not in best.kept],
            "kept_fp32": best.kept,
            "int8_embedding_tables": tables,
            "speed": speed,
            "seconds": round(time.monotonic() - started, 1),
        }
        save_graph(best.graph, staging / "final" / relative)
        write_directory(source, staging / "final" / relative, relative, destination, report)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


BATCH_FOR_SPEED = 32


def summary(outputs: dict[str, OutputStats]) -> str:
    return ", ".join(f"{n} min {s.min:.5f} mean {s.mean:.5f}" for n, s in outputs.items())


def write_directory(
    source: ModelFiles, graph: Path, relative: Path, destination: Path, report: dict[str, Any]
) -> None:
    """The model directory: the source's configs, tokenizer and heads, the int8 graph, the report."""
    building = destination.parent / f".{destination.name}.writing"
    shutil.rmtree(building, ignore_errors=True)
    external = {data for data, _ in external_data_extents(source.onnx)}
    for path in sorted(source.root.rglob("*")):
        inside = path.relative_to(source.root)
        if path.is_dir() or path.name.endswith(WEIGHT_SUFFIXES) or inside.parts[0].startswith("."):
            continue
        if path in external:
            continue
        (building / inside).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, building / inside)
    (building / relative).parent.mkdir(parents=True, exist_ok=True)
    for produced in graph.parent.iterdir():
        shutil.copy2(produced, building / relative.parent / produced.name)
    write_report(building, report)
    if destination.exists():
        shutil.rmtree(destination)
    building.rename(destination)
