"""One query at a time on an idle server: in-process, gRPC ``Embed`` and REST, side by side.

    python bench/idle_latency.py
    python bench/idle_latency.py --before /tmp/old-checkout --rounds 4

The issue's latency targets, measured in one run: gRPC p50 ≤ in-process +
0.5 ms and REST p50 ≤ gRPC + 0.5 ms. In-process is the same query tokenized,
run on every core and pooled with no server (bench/mixed.py's reference).
Each server (this checkout, and ``--before``'s) runs the default model with
default flags; each round runs in-process, the bare service, then each
server's gRPC and REST (the servers' order swapped every round), so a VM's
slow moments fall on every column alike. Each round is
``--calls`` queries after 20 warm-up calls; the table gives the median of the
round p50s and the range. The REST client is ``http.client`` on one
keep-alive connection (its own cost is a fraction of a millisecond).

Where a gRPC call's time goes: each server's ``x-total-time-ms``,
``x-queue-time-ms`` and ``x-inference-time-ms`` trailers split the wall time
into outside the handler (the client, the wire, grpc's C core and the event
loop), queue, inference (run and finish) and the rest of the handler; a bare
``grpc.aio`` service of the same contract (bench/serving_path.py) gives the
floor of the first part, a round trip that does no work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentile, start_server
from embedding_client.proto import embedding_pb2 as pb
from mixed import QUERY, in_process_latency, private_stub, rest_idle_latency
from serving_path import BareProcess

#: wall, server total, queue, inference (ms) of one call
Split = tuple[float, float, float, float]


def grpc_calls(target: str, count: int) -> list[Split]:
    """``count`` idle Embed calls after 20 warm-up ones: the client's wall time and the call's trailers."""
    stub = private_stub(target)
    request = pb.EmbedRequest(inputs=[QUERY])
    for _ in range(20):
        stub.Embed(request, timeout=30)
    out = []
    for _ in range(count):
        started = time.perf_counter()
        _, call = stub.Embed.with_call(request, timeout=30)
        wall = (time.perf_counter() - started) * 1000
        trailers = dict(call.trailing_metadata() or ())
        timings = [
            float(trailers.get(key, "nan"))
            for key in ("x-total-time-ms", "x-queue-time-ms", "x-inference-time-ms")
        ]
        out.append((wall, timings[0], timings[1], timings[2]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=Path, default=None, help="another checkout's server beside this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    variants: list[tuple[str, Path | None]] = [("this", None)]
    if args.before is not None:
        variants.append((f"before ({args.before})", args.before.resolve()))
    servers = {name: start_server(rest=True, checkout=checkout) for name, checkout in variants}
    bare = BareProcess(384)
    p50s: dict[str, list[float]] = {"in-process": [], "bare": []}
    splits: dict[str, list[Split]] = {name: [] for name in servers}
    try:
        for round_ in range(args.rounds):
            p50s["in-process"].append(percentile(in_process_latency(args.calls), 50))
            p50s["bare"].append(percentile([c[0] for c in grpc_calls(bare.target, args.calls)], 50))
            order = list(servers.items())
            for name, server in order if round_ % 2 == 0 else order[::-1]:  # neither always goes first
                calls = grpc_calls(server.target, args.calls)
                splits[name] += calls
                p50s.setdefault(f"{name} gRPC", []).append(percentile([c[0] for c in calls], 50))
                p50s.setdefault(f"{name} REST", []).append(
                    percentile(rest_idle_latency(server.rest_port, args.calls), 50)
                )
            print(
                f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in p50s.items()), flush=True
            )
        peaks = {name: server.peak_rss_mb() for name, server in servers.items()}
    finally:
        bare.stop()
        for server in servers.values():
            server.stop()
    base = statistics.median(p50s["in-process"])
    print(f"\nidle single-query p50, {args.rounds} rounds of {args.calls} calls (median of rounds, range)")
    print(f"  {'in-process':28s}{base:6.2f} ms  ({span(p50s['in-process'])})")
    floor = statistics.median(p50s["bare"])
    print(f"  {'bare grpc.aio round trip':28s}{floor:6.2f} ms  ({span(p50s['bare'])})")
    for name in servers:
        grpc_p50 = statistics.median(p50s[f"{name} gRPC"])
        rest_p50 = statistics.median(p50s[f"{name} REST"])
        print(f"  [{name}] peak RSS {peaks[name]:.0f} MiB")
        grpc_range, rest_range = span(p50s[f"{name} gRPC"]), span(p50s[f"{name} REST"])
        print(
            f"    {'gRPC Embed':26s}{grpc_p50:6.2f} ms  ({grpc_range})  in-process {grpc_p50 - base:+.2f} ms"
        )
        over = rest_p50 - grpc_p50
        print(f"    {'REST /v1/embeddings':26s}{rest_p50:6.2f} ms  ({rest_range})  gRPC {over:+.2f} ms")
        calls = splits[name]
        outside = statistics.median(c[0] - c[1] for c in calls)
        queue = statistics.median(c[2] for c in calls)
        inference = statistics.median(c[3] for c in calls)
        rest_of_handler = statistics.median(c[1] - c[2] - c[3] for c in calls)
        print(
            f"    gRPC split (medians)      outside the handler {outside:.2f}, queue {queue:.2f}, "
            f"inference {inference:.2f}, rest of the handler {rest_of_handler:.2f} ms"
        )


def span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


if __name__ == "__main__":
    main()
