"""What tracing costs: idle Embed latency with tracing off, off on main, and on, side by side.

    python bench/tracing.py [--rounds 9] [--calls 200] [--main /work/main]

Three real servers on the built-in model, one short input per call, one call at
a time (an idle server: the latency a query sees), every call carrying a W3C
``traceparent`` as a traced microservice sends it:

- **off**: this checkout, nothing configured (no provider, no interceptor);
- **main** (when ``--main`` points at a checkout without tracing): the code
  before tracing, so off/main shows what the disabled path costs;
- **on**: this checkout with ``--otlp-endpoint`` to a collector in this process
  that accepts and drops the spans (the export is real OTLP/gRPC).

Calls go to the servers in turn (so each sees the same load from the rest of
the machine), the order shifting every round; each round's per-call median,
then the median over rounds. Prints the ratios and each server's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ServerProcess, start_server
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

TRACEPARENT = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)


class DroppingCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """Accepts OTLP trace exports and counts the spans."""

    def __init__(self) -> None:
        self.spans = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(1))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: object) -> object:
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


REQUEST = pb.EmbedRequest(inputs=["how long does one traced query take"])


def call_ms(stub: embedding_pb2_grpc.EmbeddingServiceStub) -> float:
    started = time.perf_counter()
    stub.Embed(REQUEST, metadata=TRACEPARENT, timeout=30)
    return (time.perf_counter() - started) * 1000


def round_medians(
    stubs: dict[str, embedding_pb2_grpc.EmbeddingServiceStub], calls: int, shift: int
) -> dict[str, float]:
    """One call to each server in turn, ``calls`` times: every server sees the same machine load."""
    names = list(stubs)
    order = names[shift % len(names) :] + names[: shift % len(names)]
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(calls):
        for name in order:
            times[name].append(call_ms(stubs[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def start_main(checkout: Path) -> ServerProcess:
    """The server of another checkout (read only: its sources on PYTHONPATH, this interpreter)."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{checkout / 'server'}:{checkout / 'client'}"
    try:
        return start_server(rest=False)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--main", type=Path, default=None, help="a checkout without tracing, for off/main")
    args = parser.parse_args()

    collector = DroppingCollector()
    servers: dict[str, ServerProcess] = {}
    try:
        servers["off"] = start_server(rest=False)
        if args.main is not None:
            servers["main"] = start_main(args.main)
        servers["on"] = start_server("--otlp-endpoint", f"http://127.0.0.1:{collector.port}", rest=False)
        channels = {name: grpc.insecure_channel(s.target) for name, s in servers.items()}
        stubs = {name: embedding_pb2_grpc.EmbeddingServiceStub(c) for name, c in channels.items()}
        round_medians(stubs, 50, 0)  # warm up
        samples: dict[str, list[float]] = {name: [] for name in stubs}
        for round_ in range(args.rounds):
            for name, median in round_medians(stubs, args.calls, round_).items():
                samples[name].append(median)
        names = list(stubs)
        ms = {name: statistics.median(values) for name, values in samples.items()}
        print(f"idle Embed, 1 short input, {args.rounds} rounds x {args.calls} calls (median ms per call)")
        for name in names:
            print(f"  {name:5} {ms[name]:7.3f} ms   peak RSS (VmHWM) {servers[name].peak_rss_mb():6.0f} MiB")
        print(f"on / off:   {ms['on'] / ms['off']:.3f}")
        if "main" in ms:
            print(f"off / main: {ms['off'] / ms['main']:.3f}")
        print(f"spans the collector received from 'on': {collector.spans}")
        for channel in channels.values():
            channel.close()
    finally:
        for server in servers.values():
            server.stop()
        collector.server.stop(None)


if __name__ == "__main__":
    main()
