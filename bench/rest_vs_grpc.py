"""REST shim throughput against gRPC ``Embed``: same server, same load, same inputs, one run.

    python bench/rest_vs_grpc.py
    python bench/rest_vs_grpc.py --seconds 5 --loads 16x1 16x16 8x64 --standalone

One real ``embedding-server`` (default model, REST shim in-process). For each
load (concurrent clients x inputs per request, mixed 5-60 word texts) it runs
alternating rounds of gRPC ``Embed`` (grpc.aio) and ``POST /v1/embeddings``
(httpx, keep-alive, one connection per client) and prints inputs/s of each
and REST/gRPC. REST is measured with ``encoding_format`` ``base64`` (what the
``openai`` client sends) and ``float``, and once more with a minimal HTTP/1.1
client ("light"). Every client decodes the replies to float32 arrays, as a
caller would. ``--standalone`` adds ``embedding-rest`` as a separate process
in front of the same server.

The clients run on the server's machine and take CPU from it. httpx costs
the client process much more CPU per request than grpc's C core, which on a
2-core machine shows up as lower REST throughput when requests are tiny; the
light client's column is the shim's own cost, without that.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, sentences, start_server
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc

Call = Callable[[list[str]], Awaitable[int]]


def grpc_caller(stub: embedding_pb2_grpc.EmbeddingServiceStub) -> Call:
    async def call(texts: list[str]) -> int:
        reply = await stub.Embed(pb.EmbedRequest(inputs=texts))
        vectors = [np.asarray(e.dense.values, dtype=np.float32) for e in reply.embeddings]
        return len(vectors)

    return call


def decode(content: bytes, encoding: str) -> int:
    data = orjson.loads(content)["data"]
    if encoding == "base64":
        vectors = [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in data]
    else:
        vectors = [np.asarray(item["embedding"], dtype=np.float32) for item in data]
    return len(vectors)


def rest_caller(client: httpx.AsyncClient, encoding: str) -> Call:
    async def call(texts: list[str]) -> int:
        response = await client.post(
            "/v1/embeddings", content=orjson.dumps({"input": texts, "encoding_format": encoding})
        )
        response.raise_for_status()
        return decode(response.content, encoding)

    return call


class LightHttp:
    """A minimal HTTP/1.1 keep-alive client (asyncio streams, one connection per caller in flight).

    It costs the benchmark process far less CPU per request than httpx, so on
    a small machine its column shows the shim's own cost apart from the client's.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> bytes:
        if self.idle:
            try:
                return await self._post(*self.idle.pop(), path, body)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the server closed an idle keep-alive connection (uvicorn: after 5 s)
        return await self._post(*await asyncio.open_connection("127.0.0.1", self.port), path, body)

    async def _post(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes
    ) -> bytes:
        head = f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        writer.write(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
        headers = await reader.readuntil(b"\r\n\r\n")
        status = int(headers.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in headers.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        content = await reader.readexactly(length)
        self.idle.append((reader, writer))
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {content[:200]!r}")
        return content

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


def light_caller(client: LightHttp, encoding: str) -> Call:
    async def call(texts: list[str]) -> int:
        content = await client.post(
            "/v1/embeddings", orjson.dumps({"input": texts, "encoding_format": encoding})
        )
        return decode(content, encoding)

    return call


async def drive(call: Call, texts: list[str], concurrency: int, per_request: int, seconds: float) -> float:
    """Inputs per second with ``concurrency`` clients each sending requests back to back."""
    stop_at = time.monotonic() + seconds
    done = 0

    async def client(offset: int) -> None:
        nonlocal done
        position = offset
        while time.monotonic() < stop_at:
            batch = [texts[(position + i) % len(texts)] for i in range(per_request)]
            position += per_request * concurrency
            embedded = await call(batch)  # not `done += await ...`: that reads `done` before awaiting
            done += embedded

    started = time.monotonic()
    await asyncio.gather(*(client(i * per_request) for i in range(concurrency)))
    return done / (time.monotonic() - started)


def start_standalone(target: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "embedding_server.rest.standalone", "--target", target]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    process.kill()
    raise TimeoutError("embedding-rest did not start")


TEXTS = {"short": (2, 6), "mixed": (5, 60)}  # words per text


async def measure(
    callers: dict[str, Call], texts: list[str], concurrency: int, per_request: int, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean inputs/s per caller, and the median over rounds of each REST caller's ratio to gRPC.

    Rounds alternate the callers (order reversed every other round) so that
    load from other processes falls on all of them alike; each round's ratio
    compares neighbours in time.
    """
    for call in callers.values():  # warm connections and caches
        await drive(call, texts, concurrency, per_request, 0.5)
    rates: dict[str, list[float]] = {name: [] for name in callers}
    names = list(callers)
    for round_number in range(args.rounds):
        for name in names if round_number % 2 == 0 else names[::-1]:
            rates[name].append(await drive(callers[name], texts, concurrency, per_request, args.seconds))
    mean = {name: sum(values) / len(values) for name, values in rates.items()}
    ratio = {
        name: float(np.median([r / g for r, g in zip(values, rates["grpc"], strict=True)]))
        for name, values in rates.items()
    }
    return mean, ratio


async def main(args: argparse.Namespace) -> None:
    server = start_server(*args.server_args.split())
    standalone = None
    try:
        rest_url = f"http://127.0.0.1:{server.rest_port}"
        if args.standalone:
            standalone, standalone_url = start_standalone(server.target)
        print(f"cores: {os.cpu_count()}, default model, {args.rounds} alternating rounds of {args.seconds}s")
        print("inputs/s (mean over rounds); ratio = median over rounds of REST / gRPC")
        header = (
            f"{'load':>14} {'gRPC':>7} {'REST b64':>9} {'ratio':>6} {'REST float':>11} {'ratio':>6} "
            f"{'light b64':>10} {'ratio':>6}"
        )
        if standalone:
            header += f" {'standalone b64':>15} {'ratio':>6}"
        print(header)
        for load in args.loads:
            shape, _, kind = load.partition(":")
            concurrency, per_request = map(int, shape.split("x"))
            low, high = TEXTS[kind or "mixed"]
            texts = sentences(4096, low, high, seed=1)
            limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
            light = LightHttp(server.rest_port)
            async with (
                grpc.aio.insecure_channel(server.target) as channel,
                httpx.AsyncClient(base_url=rest_url, limits=limits, timeout=120) as http,
                httpx.AsyncClient(
                    base_url=standalone_url if standalone else rest_url, limits=limits, timeout=120
                ) as side,
            ):
                callers: dict[str, Call] = {
                    "grpc": grpc_caller(embedding_pb2_grpc.EmbeddingServiceStub(channel)),
                    "b64": rest_caller(http, "base64"),
                    "float": rest_caller(http, "float"),
                    "light": light_caller(light, "base64"),
                }
                if standalone:
                    callers["standalone"] = rest_caller(side, "base64")
                rate, ratio = await measure(callers, texts, concurrency, per_request, args)
                light.close()
            line = (
                f"{load:>14} {rate['grpc']:>7.0f} {rate['b64']:>9.0f} {ratio['b64']:>6.2f} "
                f"{rate['float']:>11.0f} {ratio['float']:>6.2f} {rate['light']:>10.0f} {ratio['light']:>6.2f}"
            )
            if standalone:
                line += f" {rate['standalone']:>15.0f} {ratio['standalone']:>6.2f}"
            print(line, flush=True)
    finally:
        if standalone is not None:
            standalone.send_signal(signal.SIGTERM)
            standalone.wait(30)
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one round of one client kind")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per load")
    parser.add_argument(
        "--loads",
        nargs="+",
        default=["16x1:short", "16x1:mixed", "16x16:mixed", "4x64:mixed"],
        help="CONCURRENCYxINPUTS_PER_REQUEST[:short|mixed] (texts of 2-6 or 5-60 words)",
    )
    parser.add_argument("--standalone", action="store_true", help="also measure embedding-rest in front")
    parser.add_argument("--server-args", default="", help="extra embedding-server flags")
    asyncio.run(main(parser.parse_args()))
