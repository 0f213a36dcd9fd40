"""What a late-chunked document longer than the window costs, on the built-in model (256-token window).

One idle server; in alternating rounds (medians printed side by side):

  1 window      a late-chunked document that just fills one window (254 content tokens)
  4 windows     a late-chunked document of exactly 4 windows (default overlap: 127 tokens)
  4 x 1 seq     four one-window documents, one call after the other
  4 x 1 conc    four one-window documents sent at once

then a document of the model's max_document_tokens (3 calls),
and the server's CPU seconds per call (utime + stime of the process), the
tokens the model ran per document token (the overlap's cost, measured from
/metrics and computed from the window plan for other overlaps), and peak RSS.

    python bench/late_chunking.py [--rounds 15] [--sessions N] [--max-batch-tokens T]

(``--max-batch-tokens 512`` splits the four windows into two runs, so both
session slots of a 2-core machine work on one document.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc
from embedding_server.models.late_chunking import content_windows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORDS, metric_sum, start_server

CHUNK_WORDS = 25


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def document(stub: embedding_pb2_grpc.EmbeddingServiceStub, content_tokens: int, seed: int) -> list[str]:
    """Chunks of 25 words: the most words whose joined text has at most ``content_tokens`` tokens."""
    words = [WORDS[(seed * 31 + i * 7) % len(WORDS)] for i in range(4 * content_tokens)]

    def tokens(count: int) -> int:
        reply = stub.Tokenize(pb.TokenizeRequest(inputs=[" ".join(words[:count])]), timeout=30)
        return len(reply.results[0].ids) - 2

    low, high = 1, len(words)
    while low < high:  # the most words whose tokens fit
        middle = (low + high + 1) // 2
        low, high = (middle, high) if tokens(middle) <= content_tokens else (low, middle - 1)
    kept = words[:low]
    return [" ".join(kept[i : i + CHUNK_WORDS]) for i in range(0, len(kept), CHUNK_WORDS)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sessions", type=int, default=0, help="server --sessions (0: its default)")
    parser.add_argument(
        "--max-batch-tokens", type=int, default=0, help="server --max-batch-tokens (0: its default)"
    )
    args = parser.parse_args()
    server_args = ["--sessions", str(args.sessions)] if args.sessions else []
    server_args += ["--max-batch-tokens", str(args.max_batch_tokens)] if args.max_batch_tokens else []
    server = start_server(*server_args)
    channel = grpc.insecure_channel(server.target)
    stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
    try:
        (info,) = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        capacity = info.max_tokens - 2
        overlap = min(256, capacity // 2)  # the server's default --late-chunking-overlap
        step = capacity - overlap
        one = [document(stub, capacity, seed) for seed in range(4)]
        four = document(stub, capacity + 3 * step, seed=9)
        four_tokens = stub.Embed(
            pb.EmbedRequest(inputs=four, late_chunking=True), timeout=60
        ).usage.prompt_tokens
        assert len(content_windows(four_tokens - 2, capacity, overlap)) == 4

        def call(chunks: list[str]) -> None:
            stub.Embed(pb.EmbedRequest(inputs=chunks, late_chunking=True), timeout=60)

        pool = ThreadPoolExecutor(4)
        cases = {
            "1 window": lambda: call(one[0]),
            "4 windows": lambda: call(four),
            "4 x 1 seq": lambda: [call(doc) for doc in one],
            "4 x 1 conc": lambda: list(pool.map(call, one)),
        }
        for run in cases.values():  # warm up
            run()
        times: dict[str, list[float]] = {name: [] for name in cases}
        cpu: dict[str, list[float]] = {name: [] for name in cases}
        pid = server.process.pid
        for _ in range(args.rounds):
            for name, run in cases.items():
                cpu_before, started = cpu_seconds(pid), time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
                cpu[name].append(cpu_seconds(pid) - cpu_before)

        before = metric_sum(server.metrics(), "embedding_tokens_total")
        call(four)
        run_tokens = metric_sum(server.metrics(), "embedding_tokens_total") - before

        print(
            f"model {info.name}: window {info.max_tokens} tokens, "
            f"max_document_tokens {info.max_document_tokens}"
        )
        print(
            f"sessions {args.sessions or '(default)'}, "
            f"max batch tokens {args.max_batch_tokens or '(default)'}, "
            f"cpus {os.cpu_count()}, rounds {args.rounds}"
        )
        base = statistics.median(times["1 window"])
        for name in cases:
            median = statistics.median(times[name])
            print(
                f"  {name:<11} p50 {median * 1000:7.1f} ms  ({median / base:4.2f} x 1 window)  "
                f"server CPU {statistics.median(cpu[name]) * 1000:6.0f} ms"
            )
        print(
            f"4-window document: {four_tokens} tokens, {int(run_tokens)} tokens run "
            f"(overlap cost {run_tokens / four_tokens:.2f}x); latency vs 4 x one window sequentially: "
            f"{statistics.median(times['4 windows']) / statistics.median(times['4 x 1 seq']):.2f}"
        )
        longest = document(stub, info.max_document_tokens - 2, seed=11)
        took, spent = [], []
        for _ in range(3):
            cpu_before, started = cpu_seconds(pid), time.perf_counter()
            reply = stub.Embed(pb.EmbedRequest(inputs=longest, late_chunking=True), timeout=300)
            took.append(time.perf_counter() - started)
            spent.append(cpu_seconds(pid) - cpu_before)
        windows = len(content_windows(reply.usage.prompt_tokens - 2, capacity, overlap))
        print(
            f"longest document ({reply.usage.prompt_tokens} tokens, {windows} windows, "
            f"{len(longest)} chunks): p50 {statistics.median(took) * 1000:.0f} ms, "
            f"server CPU {statistics.median(spent) * 1000:.0f} ms"
        )
        print("tokens run / document tokens by overlap (window plan, 4096-token document):")
        for value in (0, 32, 64, 127):
            windows = content_windows(4094, capacity, value)
            tokens = sum(end - start + 2 for start, end in windows)
            print(f"  overlap {value:>3}: {len(windows):>2} windows, {tokens / 4096:.2f}x")
        print(f"server peak RSS (VmHWM) {server.peak_rss_mb():.0f} MiB")
    finally:
        channel.close()
        server.stop()


if __name__ == "__main__":
    main()
