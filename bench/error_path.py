"""What errors as data cost: the error path and the client core, side by side with their baselines.

    python bench/error_path.py [--rounds 7] [--calls 300]

Alternating rounds on one real server, medians per call:

- an Embed refused with full details (ErrorInfo, RequestInfo, BadRequest) vs
  a successful one-input Embed (the error path must stay cheaper than work);
- ``EmbeddingClient.embed`` (request-id trailer, typed result) vs the raw
  generated stub on the same request (the client core's overhead);
- a client error (details parsed into a typed exception) vs the raw stub's
  RpcError;
- in process: ``to_rpc_status`` (details packed) vs a bare
  ``google.rpc.Status`` (what the server built before).

Prints the ratios and the server's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import start_server
from embedding_client import EmbeddingClient, InvalidArgumentError
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc
from embedding_server.errors import InvalidArgument
from embedding_server.grpc_api.status import to_rpc_status
from google.rpc import status_pb2


def per_call_us(action: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        action()
    return (time.perf_counter() - started) / calls * 1e6


def refused(call: Callable[[], object], kind: type[BaseException]) -> Callable[[], None]:
    def run() -> None:
        try:
            call()
        except kind:
            return
        raise AssertionError("expected a failure")

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()

    server = start_server(rest=False)
    try:
        channel = grpc.insecure_channel(server.target)
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        client = EmbeddingClient(server.target)
        good = pb.EmbedRequest(inputs=["hello world"])
        bad = pb.EmbedRequest(inputs=["hello", ""])
        error = InvalidArgument("inputs[1]: must not be empty", field="inputs", index=1, reason="EMPTY_INPUT")
        pairs: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
            "Embed refused (details) / Embed ok": (
                refused(lambda: stub.Embed(bad, timeout=30), grpc.RpcError),
                lambda: stub.Embed(good, timeout=30),
            ),
            "client.embed / raw stub": (
                lambda: client.embed(["hello world"]),
                lambda: stub.Embed(good, timeout=30),
            ),
            "client error / raw RpcError": (
                refused(lambda: client.embed(["hello", ""]), InvalidArgumentError),
                refused(lambda: stub.Embed(bad, timeout=30), grpc.RpcError),
            ),
            "to_rpc_status / bare Status (in process)": (
                lambda: to_rpc_status(error, "req-1"),
                lambda: status_pb2.Status(code=3, message=error.message),
            ),
        }
        for first, second in pairs.values():  # warm up
            per_call_us(first, 20)
            per_call_us(second, 20)
        samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in pairs}
        for round_ in range(args.rounds):
            for name, (first, second) in pairs.items():
                order = [(0, first), (1, second)] if round_ % 2 == 0 else [(1, second), (0, first)]
                calls = args.calls * (20 if "in process" in name else 1)
                for slot, action in order:
                    samples[name][slot].append(per_call_us(action, calls))
        print(f"{'pair':45} {'first us':>10} {'second us':>10} {'ratio':>7}")
        for name, (a, b) in samples.items():
            first_us, second_us = statistics.median(a), statistics.median(b)
            print(f"{name:45} {first_us:10.1f} {second_us:10.1f} {first_us / second_us:7.2f}")
        print(f"server peak RSS (VmHWM): {server.peak_rss_mb():.0f} MiB")
        client.close()
        channel.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
