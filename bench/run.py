"""Server throughput and latency against the in-process ceiling, side by side, in one run.

    python bench/run.py            # or: make bench
    python bench/run.py --seconds 3 --concurrency 1 16 --server-args "--sessions 2"
    python bench/run.py --before /tmp/old-checkout   # and another checkout's server, load by load

For the default model it prints:
- the in-process ceiling: the same ONNX file and tokenizer, length-sorted
  batches of 32, no server (tokenize + run + pool), in sequences/s;
- for each load (concurrent clients x inputs per request, mixed 5-60 word
  texts, then a long-document mix): the server's throughput, its ratio to the
  ceiling, p50/p99 request latency, and padding efficiency (real tokens /
  padded tokens, from the server's metrics);
- idle single-request latency: server p50 against the in-process p50;
- peak RSS of the server with --sessions 1 and --sessions 2.
With ``--before CHECKOUT`` a second server runs that checkout's ``server/`` and
``client/`` code (its own default model) beside this one; each load runs on
both, one after the other (alternating which goes first), and the table adds
its throughput and this/before.
The client runs on the same machine and takes CPU from the server: the
ratios are a lower bound of what a separate client machine would see.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import metric_sum, percentile, sentences, start_server
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc

CEILING_BATCH = 32


def load_builtin():
    from embedding_server.models.loader import BUILTIN_MODEL, ModelSpec, load

    return load(ModelSpec(BUILTIN_MODEL, None), sessions=1, threads=os.cpu_count() or 1)


def embed_in_process(loaded, texts: list[str]) -> np.ndarray:
    """What a caller without a server would do: tokenize, sort, batch, run, pool."""
    from embedding_server.engine.work import WorkItem, pad
    from embedding_server.models.base import RowRequest
    from embedding_server.models.pooling import normalize

    model = loaded.model
    encoded = model.tokenize(texts, 0, True)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = np.empty((len(texts), model.description.dimensions), np.float32)
    for start in range(0, len(order), CEILING_BATCH):
        chunk = order[start : start + CEILING_BATCH]
        items = [WorkItem(encoded[i], RowRequest(0, frozenset()), 0, 0, None, None) for i in chunk]  # type: ignore[arg-type]
        padded = pad(items, model.tokenizer.pad_id)
        outputs = loaded.sessions.run(
            0, model.output_names, model.feeds(padded.input_ids, padded.attention_mask, 0)
        )
        states = model.token_states(outputs)
        mask = padded.attention_mask[..., None].astype(np.float32)
        out[chunk] = normalize((states * mask).sum(1) / mask.sum(1))
    return out


def ceiling(loaded, texts: list[str], seconds: float) -> float:
    embed_in_process(loaded, texts[:64])
    done, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        embed_in_process(loaded, texts)
        done += len(texts)
    return done / (time.monotonic() - started)


def in_process_latency(loaded, text: str, repeats: int = 200) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        embed_in_process(loaded, [text])
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def drive(target: str, texts: list[str], concurrency: int, per_request: int, seconds: float):
    """Closed loop: ``concurrency`` clients, each sending its next request when the last returns."""
    requests = [pb.EmbedRequest(inputs=texts[i : i + per_request]) for i in range(0, len(texts), per_request)]
    latencies: list[float] = []
    done = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        await stub.Embed(requests[0])
        stop = time.monotonic() + seconds

        async def client(k: int) -> None:
            nonlocal done
            i = k
            while time.monotonic() < stop:
                request = requests[i % len(requests)]
                started = time.perf_counter()
                await stub.Embed(request, timeout=120)
                latencies.append((time.perf_counter() - started) * 1000)
                done += len(request.inputs)
                i += concurrency

        started = time.monotonic()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        elapsed = time.monotonic() - started
    return done / elapsed, latencies


def padding_efficiency(before: str, after: str) -> float:
    real = metric_sum(after, "embedding_tokens_total") - metric_sum(before, "embedding_tokens_total")
    padded = metric_sum(after, "embedding_padded_tokens_total") - metric_sum(
        before, "embedding_padded_tokens_total"
    )
    return real / padded if padded else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5, help="per load")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--per-request", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--server-args", default="", help="extra embedding-server flags")
    parser.add_argument("--before", type=Path, default=None, help="another checkout to compare with")
    parser.add_argument("--skip-rss", action="store_true", help="skip the --sessions 1 vs 2 RSS comparison")
    args = parser.parse_args()

    mixed = sentences(2048, 5, 60, seed=1)
    long_docs = sentences(256, 120, 180, seed=2)
    loaded = load_builtin()
    ceilings = {
        "mixed": ceiling(loaded, mixed, args.seconds),
        "long": ceiling(loaded, long_docs, args.seconds),
    }
    idle_in_process = in_process_latency(loaded, mixed[3])
    del loaded

    server = start_server(*shlex.split(args.server_args))
    before = None
    if args.before is not None:
        before = start_server(*shlex.split(args.server_args), checkout=args.before.resolve())
    print(f"cores={os.cpu_count()} server args: {args.server_args or '(defaults)'}; {args.seconds}s per load")
    print(f"in-process ceiling: mixed {ceilings['mixed']:.1f} seq/s, long docs {ceilings['long']:.1f} seq/s")
    header = f"{'load':<6} {'clients':>7} {'in/req':>6} {'server/s':>9} {'ceiling/s':>9} {'ratio':>6} "
    header += f"{'p50 ms':>8} {'p99 ms':>8} {'pad eff':>7}"
    print(header + (f" {'before/s':>9} {'this/before':>11}" if before else ""))
    try:
        loads = [("mixed", c, n) for n in args.per_request for c in args.concurrency]
        loads += [("long", c, 1) for c in (1, max(args.concurrency))]
        for k, (name, clients, per_request) in enumerate(loads):
            texts = mixed if name == "mixed" else long_docs
            order = [server, before] if before is None or k % 2 == 0 else [before, server]
            results = {}
            for each in order:
                if each is not None:
                    start = each.metrics()
                    throughput, latencies = asyncio.run(
                        drive(each.target, texts, clients, per_request, args.seconds)
                    )
                    results[id(each)] = (throughput, latencies, padding_efficiency(start, each.metrics()))
            throughput, latencies, efficiency = results[id(server)]
            line = (
                f"{name:<6} {clients:>7} {per_request:>6} {throughput:9.1f} {ceilings[name]:9.1f} "
                f"{throughput / ceilings[name]:6.2f} {percentile(latencies, 50):8.1f} "
                f"{percentile(latencies, 99):8.1f} {efficiency:7.2f}"
            )
            if before is not None:
                then = results[id(before)][0]
                line += f" {then:9.1f} {throughput / then:11.2f}"
            print(line, flush=True)
        _, idle = asyncio.run(drive(server.target, [mixed[3]], 1, 1, min(args.seconds, 3)))
        idle_server = percentile(idle, 50)
        print(
            f"idle single request p50: server {idle_server:.2f} ms, in-process {idle_in_process:.2f} ms, "
            f"overhead {idle_server - idle_in_process:+.2f} ms"
        )
        print(f"server peak RSS: {server.peak_rss_mb():.0f} MiB")
        if before is not None:
            print(f"before's server peak RSS: {before.peak_rss_mb():.0f} MiB")
    finally:
        server.stop()
        if before is not None:
            before.stop()

    if not args.skip_rss:
        peaks = {}
        for sessions in (1, 2):
            probe = start_server("--sessions", str(sessions), rest=False)
            try:
                asyncio.run(drive(probe.target, mixed, 16, 8, min(args.seconds, 3)))
                peaks[sessions] = probe.peak_rss_mb()
            finally:
                probe.stop()
        print(
            f"peak RSS under load: --sessions 1 {peaks[1]:.0f} MiB, --sessions 2 {peaks[2]:.0f} MiB, "
            f"ratio {peaks[2] / peaks[1]:.2f}"
        )


if __name__ == "__main__":
    main()
