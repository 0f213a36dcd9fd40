"""Engines and precisions side by side, in-process and served, on the built-in model.

    python bench/engines.py                  # in-process and served, 3 rounds
    python bench/engines.py --int8           # also ONNX Runtime int8 (quantized once, cached)
    python bench/engines.py --skip-served

In-process: the built-in all-MiniLM-L6-v2 graph the server builds, loaded by the
server's own loader on each candidate (one run at a time, every CPU's threads),
length-sorted batches of 32: short sentences (5-15 words) and long texts (cut to
256 tokens). Rounds alternate between candidates; medians. "min cos" is the
lowest cosine over all texts to plain numpy from the fp32 safetensors
(tests/support/minilm_reference.py), not to any engine.

Served: real ``embedding-server`` processes, the default (no flags, so
``--engine auto --precision auto``) beside ``--engine onnxruntime --precision
fp32``; 8 concurrent ``Embed`` calls of 32 texts, rounds alternating between
the servers; texts/s, ratio to the ONNX Runtime fp32 server, min cosine to numpy
over the default server's replies, each server's peak RSS (VmHWM), and the
idle latency of one short query at a time (client side, rounds alternating).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import percentile, sentences, start_server  # noqa: E402
from embedding_client import EmbeddingClient  # noqa: E402
from embedding_server.cpus import available_cpus  # noqa: E402
from embedding_server.engine.memory import current_rss  # noqa: E402
from embedding_server.models.engines import ONNXRUNTIME, OPENVINO, Candidate, cpu_flags, cpu_name  # noqa: E402
from embedding_server.models.loader import BUILTIN_MODEL, ModelSpec, builtin_files, load  # noqa: E402
from embedding_server.models.openvino_pool import native_bf16  # noqa: E402

from tests.support import minilm_reference as numpy_ref  # noqa: E402

BATCH = 32
QUERY = "how do I reset my password"
LONG_TOKENS = 256


def workloads(count_short: int, count_long: int) -> dict[str, list[str]]:
    short = sentences(count_short, 5, 15, seed=1)
    long = [" ".join(sentences(40, 10, 20, seed=100 + i)) for i in range(count_long)]
    return {"short": short, "long": long}


def numpy_vectors(texts: list[str]) -> np.ndarray:
    """The independent expectation: numpy from the safetensors, normalized, in batches."""
    rows = []
    for start in range(0, len(texts), 16):
        ids = [numpy_ref.tokenize(t, LONG_TOKENS).ids for t in texts[start : start + 16]]
        rows.append(numpy_ref.normalize(numpy_ref.pooled(ids)))
    return np.concatenate(rows)


def min_cosine(got: np.ndarray, want: np.ndarray) -> float:
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    return float((got * want).sum(1).min())


class InProcess:
    """One candidate through the server's loader and the family's feeds and pooling."""

    def __init__(self, candidate: Candidate, threads: int, int8_files=None) -> None:
        self.candidate = candidate
        before = current_rss()
        self.loaded = load(
            ModelSpec(BUILTIN_MODEL, None), sessions=1, threads=threads, candidate=candidate, files=int8_files
        )
        self.rss_mb = (current_rss() - before) / 2**20

    def embed(self, texts: list[str]) -> np.ndarray:
        model, pool = self.loaded.model, self.loaded.sessions
        tokenized = model.tokenize(texts, 0, truncate=True)
        order = sorted(range(len(texts)), key=lambda i: len(tokenized[i]))
        out = np.zeros((len(texts), model.description.dimensions), np.float32)
        for start in range(0, len(order), BATCH):
            rows = order[start : start + BATCH]
            longest = max(len(tokenized[i]) for i in rows)
            ids = np.full((len(rows), longest), model.tokenizer.pad_id, np.int64)
            mask = np.zeros_like(ids)
            for r, i in enumerate(rows):
                ids[r, : len(tokenized[i])], mask[r, : len(tokenized[i])] = tokenized[i], 1
            states = pool.run(0, model.output_names, model.feeds(ids, mask, 0))[model.output_names[0]]
            m = mask[..., None].astype(np.float32)
            out[rows] = (states * m).sum(1) / m.sum(1)
        return out


Loads = dict[str, list[str]]


def in_process(
    args: argparse.Namespace, loads: dict[str, list[str]], expected: dict[str, np.ndarray]
) -> None:
    threads = available_cpus()
    candidates = [Candidate(ONNXRUNTIME, "fp32"), Candidate(OPENVINO, "fp32")]
    if native_bf16():
        candidates.append(Candidate(OPENVINO, "bf16"))
    int8 = None
    if args.int8:
        from embedding_server.quantize.cache import int8_files

        int8 = int8_files(BUILTIN_MODEL, builtin_files())
        candidates.append(Candidate(ONNXRUNTIME, "int8"))
    engines = {c: InProcess(c, threads, int8 if c.precision == "int8" else None) for c in candidates}
    times: dict[tuple[Candidate, str], list[float]] = {}
    cosines: dict[Candidate, float] = {c: 1.0 for c in candidates}
    for c, engine in engines.items():  # warm-up: every shape's first run, and the fidelity
        for name, texts in loads.items():
            cosines[c] = min(cosines[c], min_cosine(engine.embed(texts), expected[name]))
    for _ in range(args.rounds):
        for c, engine in engines.items():
            for name, texts in loads.items():
                started = time.perf_counter()
                engine.embed(texts)
                times.setdefault((c, name), []).append(time.perf_counter() - started)
    print(f"\nin-process, {threads} threads, batches of {BATCH}, medians of {args.rounds} alternating rounds")
    print(f"{'candidate':<20} {'short texts/s':>14} {'ratio':>6} {'long texts/s':>13} {'ratio':>6} "
          f"{'min cos (numpy)':>16} {'RSS added':>10}")  # fmt: skip
    base = candidates[0]
    for c in candidates:
        rates = {n: len(loads[n]) / statistics.median(times[(c, n)]) for n in loads}
        ratios = {n: rates[n] / (len(loads[n]) / statistics.median(times[(base, n)])) for n in loads}
        print(f"{c!s:<20} {rates['short']:>14.1f} {ratios['short']:>5.2f}x {rates['long']:>13.1f} "
              f"{ratios['long']:>5.2f}x {cosines[c]:>16.5f} {engines[c].rss_mb:>7.0f} MiB")  # fmt: skip


def served(args: argparse.Namespace, loads: Loads, expected: dict[str, np.ndarray]) -> None:
    cache = tempfile.mkdtemp(prefix="bench-engines-")
    configs = {
        "default (auto)": ["--cache-dir", cache],
        "onnxruntime fp32": ["--engine", "onnxruntime", "--precision", "fp32"],
    }
    started = time.monotonic()
    servers = {name: start_server(*flags, rest=False, timeout=300) for name, flags in configs.items()}
    print(f"\nserved: started in {time.monotonic() - started:.0f}s (the default measured its candidates)")
    try:
        clients = {name: EmbeddingClient(s.target) for name, s in servers.items()}
        models = {name: c.list_models()[0] for name, c in clients.items()}
        times: dict[tuple[str, str], list[float]] = {}
        cosines: dict[str, float] = {}

        def run(client: EmbeddingClient, texts: list[str]) -> np.ndarray:
            chunks = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
            with ThreadPoolExecutor(8) as pool:
                parts = list(pool.map(lambda chunk: client.embed(chunk, truncate=True).dense, chunks))
            return np.concatenate(parts)

        for name, client in clients.items():  # warm-up and fidelity
            cosines[name] = min(min_cosine(run(client, texts), expected[n]) for n, texts in loads.items())
        idle: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(args.rounds * 2):  # one query at a time, idle servers, alternating
            for name, client in clients.items():
                for i in range(60):
                    t0 = time.perf_counter()
                    client.embed(QUERY)
                    if i >= 10:
                        idle[name].append((time.perf_counter() - t0) * 1000)
        for _ in range(args.rounds):
            for name, client in clients.items():
                for load_name, texts in loads.items():
                    t0 = time.perf_counter()
                    run(client, texts)
                    times.setdefault((name, load_name), []).append(time.perf_counter() - t0)
        print("8 concurrent Embed calls of 32 texts, medians of alternating rounds")
        print(f"{'server':<18} {'runs on':<18} {'short texts/s':>14} {'ratio':>6} {'long texts/s':>13} "
              f"{'ratio':>6} {'min cos (numpy)':>16} {'peak RSS':>9} {'idle query p50/p99':>19}")  # fmt: skip
        base = "onnxruntime fp32"
        for name in servers:
            rates = {n: len(loads[n]) / statistics.median(times[(name, n)]) for n in loads}
            ratio = {
                n: statistics.median(times[(base, n)]) / statistics.median(times[(name, n)]) for n in loads
            }
            runs_on = f"{models[name].engine} {models[name].precision}"
            print(f"{name:<18} {runs_on:<18} {rates['short']:>14.1f} {ratio['short']:>5.2f}x "
                  f"{rates['long']:>13.1f} {ratio['long']:>5.2f}x {cosines[name]:>16.5f} "
                  f"{servers[name].peak_rss_mb():>5.0f} MiB "
                  f"{percentile(idle[name], 50):>9.2f}/{percentile(idle[name], 99):.2f} ms")  # fmt: skip
        for client in clients.values():
            client.close()
    finally:
        for server in servers.values():
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--short", type=int, default=512, help="short sentences per round")
    parser.add_argument("--long", type=int, default=64, help="long texts per round")
    parser.add_argument("--int8", action="store_true", help="also ONNX Runtime int8 (in-process)")
    parser.add_argument("--skip-served", action="store_true")
    parser.add_argument("--skip-in-process", action="store_true")
    args = parser.parse_args()
    bf16 = [f for f in cpu_flags() if "bf16" in f or f.startswith("amx")]
    print(f"CPU: {cpu_name()}, {available_cpus()} CPUs, bf16/AMX flags: {' '.join(bf16) or 'none'}")
    loads = workloads(args.short, args.long)
    expected = {name: numpy_vectors(texts) for name, texts in loads.items()}
    if not args.skip_in_process:
        in_process(args, loads, expected)
    if not args.skip_served:
        served(args, loads, expected)


if __name__ == "__main__":
    main()
