"""jina-v3 and bge-m3 at their real size: load, memory and speed, per engine and precision, side by side.

    python bench/full_size.py                       # both families, every candidate this CPU runs
    python bench/full_size.py --family jina-v3 --candidates onnxruntime:fp32 --late-tokens 32768
    python bench/full_size.py --int8                # also time embedding-quantize on the 2.2 GB model
    python bench/full_size.py --shapes 1x512,4x512,1x8192 --candidates onnxruntime:fp32
                                                    # in-process: what one run adds, next to the plan

The models are the full-size synthetic exports of tests/support/xlmr.py (24
layers, hidden 1024, 16 heads, vocabulary 250,002, 8194 positions; random
weights, so no fidelity figure means anything here, but every shape and
operator is the real one), built once into the cache. Each candidate runs in a
real ``embedding-server`` process under ``--memory-limit`` (default: what
deploy/ gives these models), one after the other; for each the table has:

  load s        start to SERVING (graph read, fused or compiled, warm-up)
  idle MiB      RSS once serving and idle
  q/s           32-token queries, 4 concurrent Embed calls of one input
  q ms          one 32-token query alone (median of 5)
  p/s           512-token passages, 2 concurrent Embed calls of 2 inputs
  8192 s        one 8192-token window (one Embed call of one input)
  q|corpus ms   one query's latency (median, max) while a passage stream runs
  late s        late chunking of a --late-tokens document (0: skipped) in windows
  peak MiB      the process's peak RSS (VmHWM) over all of the above

Ratios are to the first candidate. Each number is one process on this machine;
say which CPU (printed first) gave them.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import ServerProcess, start_server  # noqa: E402
from embedding_client.proto import embedding_pb2 as pb  # noqa: E402
from embedding_client.proto import embedding_pb2_grpc  # noqa: E402
from embedding_server.models.engines import ONNXRUNTIME, OPENVINO, cpu_flags, cpu_name  # noqa: E402
from embedding_server.models.openvino_pool import native_bf16  # noqa: E402

from tests.support.synthetic import WORDS  # noqa: E402
from tests.support.xlmr import deployed, full_size_dir  # noqa: E402

FAMILIES = ("jina-v3", "bge-m3")
#: What deploy/ gives these models (docker/compose.large.yaml, kubernetes/models/): the bench runs
#: under that limit with those flags (ONNX Runtime, one session of every CPU's threads), except
#: --engine/--precision, which each candidate sets.
LIMIT_MIB, _FLAGS = deployed()
DEFAULT_LIMIT = f"{LIMIT_MIB}MiB"


def _without_engine(flags: list[str]) -> list[str]:
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in ("--engine", "--precision"):
            skip = True
        else:
            kept.append(flag)
    return kept


DEPLOY_FLAGS = tuple(_without_engine(_FLAGS))


@dataclass
class Row:
    candidate: str
    numbers: dict[str, float] = field(default_factory=dict)
    refusals: list[str] = field(default_factory=list)


def refused_or(row: Row, call: Callable[[], float]) -> float:
    """The call's seconds, or NaN when the server's memory budget refuses it (the reason is kept)."""
    try:
        return call()
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        row.refusals.append(str(error.details()))
        return float("nan")


def candidates() -> list[str]:
    found = [f"{ONNXRUNTIME}:fp32", f"{OPENVINO}:fp32"]
    return found + ([f"{OPENVINO}:bf16"] if native_bf16() else [])


def text_of(stub: embedding_pb2_grpc.EmbeddingServiceStub, tokens: int, seed: int = 0) -> str:
    """A text of exactly ``tokens`` tokens with its two special tokens (one synthetic word is one token)."""
    words = [WORDS[(seed * 31 + i * 7) % len(WORDS)] for i in range(tokens)]
    low, high = 1, len(words)
    while low < high:
        middle = (low + high + 1) // 2
        reply = stub.Tokenize(pb.TokenizeRequest(inputs=[" ".join(words[:middle])]), timeout=60)
        low, high = (middle, high) if len(reply.results[0].ids) <= tokens else (low, middle - 1)
    return " ".join(words[:low])


def embed(stub: embedding_pb2_grpc.EmbeddingServiceStub, inputs: list[str], **fields: object) -> float:
    started = time.perf_counter()
    reply = stub.Embed(pb.EmbedRequest(inputs=inputs, **fields), timeout=3600)  # type: ignore[arg-type]
    assert len(reply.embeddings) == len(inputs)  # late chunking: one vector per chunk
    return time.perf_counter() - started


def throughput(stub: embedding_pb2_grpc.EmbeddingServiceStub, calls: list[list[str]], workers: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda inputs: embed(stub, inputs), calls))
    return sum(map(len, calls)) / (time.perf_counter() - started)


def measure(family: str, candidate: str, args: argparse.Namespace) -> Row:
    engine, precision = candidate.split(":")
    flags = ["--model", f"{family}={full_size_dir(family)}", "--engine", engine, "--precision", precision]
    flags += ["--memory-limit", args.memory_limit, "--max-message-mb", "64", *args.server_flag]
    started = time.perf_counter()
    server: ServerProcess = start_server(*flags, rest=False, timeout=1800)
    row = Row(candidate, {"load s": time.perf_counter() - started})
    try:
        channel = grpc.insecure_channel(
            server.target, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        query = text_of(stub, 32)
        passage = text_of(stub, 512, seed=1)
        embed(stub, [query])
        row.numbers["idle MiB"] = server.rss_mb()
        row.numbers["q/s"] = throughput(stub, [[text_of(stub, 32, seed=i)] for i in range(2, 18)], 4)
        row.numbers["q ms"] = statistics.median(embed(stub, [query]) for _ in range(5)) * 1000
        row.numbers["p/s"] = throughput(stub, [[passage, passage]] * 4, 2)
        window = text_of(stub, 8192, seed=2)
        row.numbers["8192 s"] = refused_or(row, lambda: embed(stub, [window]))
        latencies: list[float] = []
        done = threading.Event()

        def corpus() -> None:
            for _ in range(4):
                embed(stub, [passage] * 4, priority=pb.PRIORITY_BATCH)
            done.set()

        job = threading.Thread(target=corpus)
        job.start()
        time.sleep(1.0)  # the corpus's first batch is running
        while not done.is_set() and len(latencies) < 8:
            latencies.append(embed(stub, [query]) * 1000)
        job.join()
        row.numbers["q|corpus ms"] = statistics.median(latencies) if latencies else float("nan")
        row.numbers["q|corpus max"] = max(latencies, default=float("nan"))
        if args.late_tokens:
            words = text_of(stub, args.late_tokens, seed=3).split()  # tokens beyond the window: all fine
            chunks = [" ".join(words[i : i + 200]) for i in range(0, len(words), 200)]
            row.numbers["late s"] = refused_or(row, lambda: embed(stub, chunks, late_chunking=True))
        row.numbers["peak MiB"] = server.peak_rss_mb()
        channel.close()
    finally:
        server.stop()
    return row


def shapes(family: str, candidate: str, wanted: str) -> None:
    """In-process, one pool of 2 threads: each run's growth over the RSS before it (VmHWM reset,
    freed memory trimmed), next to ``ModelShape.run_bytes``. A padded batch pads its rows after
    the first to half length; each shape runs twice (a first run of a shape costs more)."""
    import numpy as np
    from embedding_server.engine.memory import MIB, ModelShape, current_rss, release_freed_memory
    from embedding_server.models.engines import Candidate, open_pool

    engine, precision = candidate.split(":")
    started = time.perf_counter()
    pool = open_pool(Candidate(engine, precision), full_size_dir(family) / "onnx" / "model.onnx", 1, 2)
    print(
        f"{family} {candidate}: opened in {time.perf_counter() - started:.1f} s, {pool.attention} attention"
    )
    plan = ModelShape(1024, 16, pool.attention)
    names = list(pool.signature.outputs)[:1]
    for count, length in (tuple(map(int, item.split("x"))) for item in wanted.split(",")):
        ids = np.full((count, length), 5, np.int64)
        mask = np.ones_like(ids)
        ids[1:, length // 2 :], mask[1:, length // 2 :] = 1, 0
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "task_id" in pool.signature.inputs:
            feeds["task_id"] = np.array(1, np.int64)
        for attempt in (1, 2):
            release_freed_memory()
            before = current_rss()
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            started = time.perf_counter()
            pool.run(0, names, feeds)
            seconds = time.perf_counter() - started
            status = Path("/proc/self/status").read_text()
            peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
            print(
                f"  {count} x {length} (run {attempt}): {seconds:.1f} s, +{(peak - before) / MIB:.0f} MiB, "
                f"planned {plan.run_bytes(count, length) / MIB:.0f} MiB",
                flush=True,
            )


def quantize(family: str) -> dict[str, float]:
    """embedding-quantize on the full-size model: wall time and the child's peak RSS."""
    with tempfile.TemporaryDirectory(prefix="full-int8-") as out:
        started = time.perf_counter()
        command = [
            sys.executable,
            "-m",
            "embedding_server.quantize.cli",
            str(full_size_dir(family)),
            out,
            "--force",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
    return {"quantize s": seconds, "quantize peak MiB": peak, "exit": done.returncode}


COLUMNS = (
    "load s",
    "idle MiB",
    "q/s",
    "q ms",
    "p/s",
    "8192 s",
    "q|corpus ms",
    "q|corpus max",
    "late s",
    "peak MiB",
)
#: Higher is better for these; the ratio column shows first / this for the others (times, memory).
FASTER_HIGHER = ("q/s", "p/s")


def report(family: str, rows: list[Row]) -> None:
    print(f"\n## {family} (full size), --memory-limit as given")
    print("| candidate | " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * (len(COLUMNS) + 1))
    first = rows[0].numbers
    for row in rows:
        cells = []
        for column in COLUMNS:
            value = row.numbers.get(column)
            if value is None:
                cells.append("-")
                continue
            base = first.get(column)
            ratio = ""
            if row is not rows[0] and base:
                ratio = f" ({value / base if column in FASTER_HIGHER else base / value:.2f}x)"
            digits = 2 if value < 10 else 1 if value < 1000 else 0
            cells.append(f"{value:.{digits}f}{ratio}")
        print(f"| {row.candidate} | " + " | ".join(cells) + " |", flush=True)
    for row in rows:
        for refusal in row.refusals:
            print(f"{row.candidate}: refused: {refusal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, action="append", help="default: both")
    parser.add_argument("--candidates", default=",".join(candidates()), help="ENGINE:PRECISION,...")
    parser.add_argument("--memory-limit", default=DEFAULT_LIMIT)
    parser.add_argument(
        "--server-flag", action="append", default=list(DEPLOY_FLAGS), help="passed to the server (repeat)"
    )
    parser.add_argument("--late-tokens", type=int, default=32768, help="0: no late chunking")
    parser.add_argument("--int8", action="store_true", help="also time embedding-quantize")
    parser.add_argument("--shapes", default="", help="in-process run memory of BxT,...; no server")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; flags {' '.join(cpu_flags())}")
    if args.shapes:
        for family in args.family or FAMILIES:
            for candidate in args.candidates.split(","):
                shapes(family, candidate, args.shapes)
        return
    for family in args.family or FAMILIES:
        rows = [measure(family, candidate, args) for candidate in args.candidates.split(",")]
        report(family, rows)
        if args.int8:
            print(f"int8 ({family}):", quantize(family), flush=True)


if __name__ == "__main__":
    main()
