"""Is int8 on OpenVINO worth serving? NNCF's post-training int8 against OpenVINO bf16, in one run.

    .venv/bin/pip install nncf     # not a dependency: this bench decides whether it should be
    python bench/openvino_int8.py

The built-in model's fp32 graph (the one the server builds) is quantized by NNCF
(``nncf.quantize``, ``ModelType.TRANSFORMER``: static int8 activations and
weights, calibrated on the server's calibration texts), then compiled by
OpenVINO with the rest in bf16 (AMX int8 and bf16 where the CPU has them).
Side by side with OpenVINO bf16 and fp32 and ONNX Runtime fp32 and int8
(``--quantize int8``), in alternating rounds: texts/s on short sentences and on
256-token texts, and min / mean cosine to numpy from the fp32 safetensors.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from embedding_server.cpus import available_cpus  # noqa: E402
from embedding_server.models.engines import cpu_flags, cpu_name  # noqa: E402
from embedding_server.models.loader import BUILTIN_MODEL, build_model, builtin_files  # noqa: E402
from embedding_server.models.openvino_pool import core  # noqa: E402
from embedding_server.models.sessions import open_session  # noqa: E402
from embedding_server.quantize.cache import int8_files  # noqa: E402
from embedding_server.quantize.calibration import default_texts  # noqa: E402
from embedding_server.quantize.fidelity import padded  # noqa: E402
from engines import BATCH, numpy_vectors, workloads  # noqa: E402

ROUNDS = 3


def main() -> None:
    import nncf

    threads = available_cpus()
    flags = " ".join(f for f in cpu_flags() if "amx" in f or "bf16" in f)
    print(f"CPU: {cpu_name()}, {threads} CPUs, flags: {flags}")
    files = builtin_files()
    ort_fp32 = open_session(files.onnx, threads)
    model = build_model(BUILTIN_MODEL, files, ort_fp32)
    ort_int8 = open_session(int8_files(BUILTIN_MODEL, files).onnx, threads)

    calibration = [model.feeds(*padded(model, [t], 0)[1:], 0) for t in default_texts(300)]
    started = time.monotonic()
    quantized = nncf.quantize(
        core().read_model(str(files.onnx)),
        nncf.Dataset(calibration),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=300,
    )
    print(f"NNCF int8: quantized in {time.monotonic() - started:.0f}s on 300 calibration texts")
    config = {"NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads), "ENABLE_CPU_PINNING": "NO"}

    def ov(graph, precision: str):
        compiled = core().compile_model(graph, "CPU", {**config, "INFERENCE_PRECISION_HINT": precision})
        request = compiled.create_infer_request()
        port = compiled.outputs[0]
        return lambda feeds: request.infer(feeds)[port]

    runners = {
        "onnxruntime fp32": lambda feeds: ort_fp32.run(model.output_names, feeds)[0],
        "onnxruntime int8 (--quantize int8)": lambda feeds: ort_int8.run(model.output_names, feeds)[0],
        "openvino fp32": ov(core().read_model(str(files.onnx)), "f32"),
        "openvino bf16": ov(core().read_model(str(files.onnx)), "bf16"),
        "openvino int8 (NNCF) + bf16": ov(quantized, "bf16"),
    }
    loads = workloads(512, 64)
    expected = {name: numpy_vectors(texts) for name, texts in loads.items()}

    def embed(run, texts: list[str]) -> np.ndarray:
        tokenized = model.tokenize(texts, 0, truncate=True)
        order = sorted(range(len(texts)), key=lambda i: len(tokenized[i]))
        out = np.zeros((len(texts), model.description.dimensions), np.float32)
        for start in range(0, len(order), BATCH):
            rows = order[start : start + BATCH]
            _, ids, mask = padded(model, [texts[i] for i in rows], 0)
            states = np.asarray(run(model.feeds(ids, mask, 0)))
            m = mask[..., None].astype(np.float32)
            pooled = (states * m).sum(1) / m.sum(1)
            out[rows] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out

    fidelity = {}
    for name, run in runners.items():
        cos = np.concatenate([(embed(run, loads[n]) * expected[n]).sum(1) for n in loads])
        fidelity[name] = (float(cos.min()), float(cos.mean()))
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(ROUNDS):
        for name, run in runners.items():
            for load, texts in loads.items():
                t0 = time.perf_counter()
                embed(run, texts)
                times.setdefault((name, load), []).append(time.perf_counter() - t0)
    print(f"\n{threads} threads, batches of {BATCH}, medians of {ROUNDS} alternating rounds")
    print(
        f"{'':36} {'short/s':>8} {'vs bf16':>8} {'long/s':>8} {'vs bf16':>8} {'min cos':>8} {'mean cos':>9}"
    )
    for name in runners:
        rate = {n: len(loads[n]) / statistics.median(times[(name, n)]) for n in loads}
        vs = {
            n: statistics.median(times[("openvino bf16", n)]) / statistics.median(times[(name, n)])
            for n in loads
        }
        print(f"{name:36} {rate['short']:8.1f} {vs['short']:7.2f}x {rate['long']:8.1f} {vs['long']:7.2f}x "
              f"{fidelity[name][0]:8.5f} {fidelity[name][1]:9.6f}")  # fmt: skip


if __name__ == "__main__":
    main()
