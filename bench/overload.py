"""Overload: offer 3x the server's capacity for 30 s and watch it stay healthy and honest.

    python bench/overload.py [--factor 3] [--seconds 30] [--server-args "--max-queue-requests 256"]

First measures capacity (closed loop, 16 clients), then sends requests open
loop at factor x capacity. Prints each second's RSS and the outcome counts:
every admitted request must be answered, the excess must be
RESOURCE_EXHAUSTED, nothing else, and RSS must stay flat.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sentences, start_server
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc
from run import drive


async def open_loop(
    target: str, texts: list[str], rate: float, seconds: float, server
) -> tuple[Counter, list]:
    outcomes: Counter[str] = Counter()
    rss: list[tuple[float, float]] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)

        async def one(text: str) -> None:
            try:
                await stub.Embed(pb.EmbedRequest(inputs=[text]), timeout=120)
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as error:
                outcomes[error.code().name] += 1

        tasks = []
        started = time.monotonic()
        next_sample = started
        sent = 0
        while (now := time.monotonic()) - started < seconds:
            due = int((now - started) * rate)
            while sent < due:
                tasks.append(asyncio.ensure_future(one(texts[sent % len(texts)])))
                sent += 1
            if now >= next_sample:
                rss.append((now - started, server.rss_mb()))
                next_sample += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
    return outcomes, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=float, default=3)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--server-args", default="--max-queue-requests 256")
    args = parser.parse_args()
    texts = sentences(1024, 5, 60, seed=3)
    server = start_server(*shlex.split(args.server_args), rest=False)
    try:
        capacity, _ = asyncio.run(drive(server.target, texts, 16, 1, 5))
        rate = capacity * args.factor
        print(f"capacity {capacity:.0f} req/s; offering {rate:.0f} req/s for {args.seconds:.0f}s")
        outcomes, rss = asyncio.run(open_loop(server.target, texts, rate, args.seconds, server))
        alive = server.process.poll() is None
        print("RSS MiB by second:", " ".join(f"{mb:.0f}" for _, mb in rss))
        third = max(1, len(rss) // 3)
        early, late = rss[third][1], rss[-1][1]
        print(f"RSS after warm-up {early:.0f} MiB, at the end {late:.0f} MiB ({late / early:.2f}x)")
        print(f"outcomes: {dict(outcomes)}; server alive: {alive}")
        unexpected = set(outcomes) - {"OK", "RESOURCE_EXHAUSTED"}
        print("PASS" if alive and not unexpected and outcomes["RESOURCE_EXHAUSTED"] else f"FAIL {unexpected}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
