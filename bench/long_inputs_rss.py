"""Peak RSS (VmHWM) of the default server after long inputs: the numbers the README quotes.

Each case runs on a fresh server at default flags (peak RSS is per process), the cases one after
the other, ``--rounds`` times in alternation; medians side by side, with the ratio to the idle
server:

  idle            started, warmed up, one short request
  4 x 128 x 256   four concurrent Embed calls of 128 passages cut to 256 tokens (truncate)
  REST 2048 long  one REST call of 2048 passages of ~256 tokens (the most inputs a request takes)
  late 4096       a late-chunked document at the built-in model's max_document_tokens, 3 calls
  all of it       the three above, one after the other, on one server

    python bench/long_inputs_rss.py [--rounds 2] [--memory-limit 1GiB] [--case 'all of it' ...]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ServerProcess, sentences, start_server
from late_chunking import document

Stub = embedding_pb2_grpc.EmbeddingServiceStub


def short(server: ServerProcess, stub: Stub) -> None:
    stub.Embed(pb.EmbedRequest(inputs=["a short text"]), timeout=60)


def four_calls(server: ServerProcess, stub: Stub) -> None:
    texts = sentences(128, 300, 320, seed=7)
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(
                lambda _: stub.Embed(pb.EmbedRequest(inputs=texts, truncate=True), timeout=600), range(4)
            )
        )


def rest_2048(server: ServerProcess, stub: Stub) -> None:
    body = {"input": sentences(2048, 180, 220, seed=3), "truncate": True}
    reply = httpx.post(f"http://127.0.0.1:{server.rest_port}/v1/embeddings", json=body, timeout=600)
    reply.raise_for_status()


def late_4096(server: ServerProcess, stub: Stub) -> None:
    (info,) = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    chunks = document(stub, info.max_document_tokens - 2, seed=11)
    for _ in range(3):
        stub.Embed(pb.EmbedRequest(inputs=chunks, late_chunking=True), timeout=600)


def everything(server: ServerProcess, stub: Stub) -> None:
    for case in (four_calls, rest_2048, late_4096):
        case(server, stub)


CASES: dict[str, Callable[[ServerProcess, Stub], None]] = {
    "idle": short,
    "4 x 128 x 256": four_calls,
    "REST 2048 long": rest_2048,
    "late 4096": late_4096,
    "all of it": everything,
}


def measure(case: Callable[[ServerProcess, Stub], None], server_args: list[str]) -> float:
    server = start_server(*server_args)
    channel = grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 1 << 30)])
    try:
        case(server, embedding_pb2_grpc.EmbeddingServiceStub(channel))
        return server.peak_rss_mb()
    finally:
        channel.close()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-limit", default="", help="server --memory-limit (default: its own)")
    parser.add_argument("--case", action="append", choices=list(CASES), help="only these cases (repeatable)")
    parser.add_argument("--server-flags", default="", help='more server flags, e.g. "--engine onnxruntime"')
    args = parser.parse_args()
    server_args = ["--memory-limit", args.memory_limit] if args.memory_limit else []
    server_args += shlex.split(args.server_flags)
    cases = {name: CASES[name] for name in args.case or CASES}
    peaks: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, case in cases.items():
            peaks[name].append(measure(case, server_args))
            print(f"  {name:<15} {peaks[name][-1]:6.0f} MiB", flush=True)
    idle = statistics.median(peaks["idle"]) if "idle" in peaks else float("nan")
    flags = " ".join(server_args) or "default"
    print(f"peak RSS (VmHWM), medians of {args.rounds} fresh servers per case, flags {flags}:")
    for name, values in peaks.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"  {name:<15} {median:6.0f} MiB  ({median / idle:4.2f} x idle)  runs {runs}")


if __name__ == "__main__":
    main()
