"""The server's own path against a bare grpc.aio service of the same contract, side by side.

    python bench/serving_path.py
    python bench/serving_path.py --seconds 5 --rounds 3 --server-args "--sessions 2"
    python bench/serving_path.py --profile /tmp/profiles   # py-spy each load on our server and the bare one
    python bench/serving_path.py --before /tmp/old-checkout  # and that checkout's server, side by side

Two servers, each its own process on a loopback port:

- **ours**: ``embedding-server`` on a tiny synthetic bge-m3 (the aapot export
  of tests/support/synthetic.py, hidden 24): a model run costs ~0.1 ms, so what
  is measured is everything else (gRPC, protobuf, validation, tokenizing,
  admission, batching, the finish step, Python);
- **bare**: ``grpc.aio`` in one process, the same ``EmbeddingService`` stubs,
  answering every input with a constant dense vector of the same size (the
  floor a Python gRPC service of this contract cannot go below).

Each load runs in alternating rounds on both servers (which goes first
alternates too) from one client process (grpc.aio, like a service's stubs),
over 3,000 short sentences; the clients decode every reply to float32 arrays.
It prints texts/s (calls/s for single-input calls) of each, ours / bare, the
server's CPU time per text (user + system, every thread, from /proc: the
figure that matters when the client shares the cores), the cores its busiest
thread used and the client used, and each server's peak RSS. The client shares
the machine: both servers pay that equally. A busiest thread near 1.00 with
the client well under the rest of the machine says the server's one event
loop (which holds the GIL) is the limit, not the cores: only less work on
that thread makes it faster, and work moved to another thread helps only
where it runs without the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from common import free_port, peak_rss_mb, start_server  # noqa: E402
from embedding_client.proto import embedding_pb2 as pb  # noqa: E402
from embedding_client.proto import embedding_pb2_grpc  # noqa: E402

TEXTS = 3000


def short_texts(count: int = TEXTS, seed: int = 3) -> list[str]:
    """Short sentences (3-12 words) from the synthetic tokenizer's vocabulary (one word, one token)."""
    import random

    from tests.support.synthetic import WORDS

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(count)]


# --- the bare service ------------------------------------------------------------------------------


class BareService(embedding_pb2_grpc.EmbeddingServiceServicer):
    """Every input answered with one constant dense vector; nothing else."""

    def __init__(self, dimensions: int) -> None:
        self.values = [0.125] * dimensions

    def _reply(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        reply = pb.EmbedResponse(request_id=request.request_id, model="bare")
        for index in range(len(request.inputs)):
            reply.embeddings.add(index=index).dense.values.extend(self.values)
        return reply

    async def Embed(self, request: pb.EmbedRequest, context: object) -> pb.EmbedResponse:  # type: ignore[override]
        return self._reply(request)

    async def StreamEmbed(self, requests, context):  # type: ignore[no-untyped-def,override]
        async for request in requests:
            yield self._reply(request)


async def serve_bare(port: int, dimensions: int) -> None:
    server = grpc.aio.server()
    embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(BareService(dimensions), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


class BareProcess:
    def __init__(self, dimensions: int) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, __file__, "--bare", str(self.port), str(dimensions)])
        channel = grpc.insecure_channel(self.target)
        grpc.channel_ready_future(channel).result(timeout=60)
        channel.close()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


class Server(Protocol):
    process: subprocess.Popen[bytes]

    @property
    def target(self) -> str: ...

    def peak_rss_mb(self) -> float: ...

    def stop(self) -> None: ...


class Group:
    """Processes of one server that clients are spread over, as SO_REUSEPORT would spread connections
    (round-robin here: the kernel's hash only approaches that with many connections)."""

    def __init__(self, members: list[Server]) -> None:
        self.members = members
        self.process = members[0].process  # the one --profile samples
        self.targets = [member.target for member in members]
        self.pids = [member.process.pid for member in members]

    def peak_rss_mb(self) -> float:
        return sum(member.peak_rss_mb() for member in self.members)

    def stop(self) -> None:
        for member in self.members:
            member.stop()


# --- the loads -----------------------------------------------------------------------------------

Stubs = list[embedding_pb2_grpc.EmbeddingServiceStub]
#: ``load(stubs, texts, seconds)``: unary client ``c`` calls ``stubs[c % len(stubs)]``; a stream, the first.
Load = Callable[[Stubs, list[str], float], Awaitable[int]]


def _decoded(reply: pb.EmbedResponse) -> int:
    if reply.HasField("error"):
        raise RuntimeError(f"a reply failed: {reply.error.message}")
    for embedding in reply.embeddings:
        np.asarray(embedding.dense.values, dtype=np.float32)
    return len(reply.embeddings)


def unary(clients: int, per_call: int) -> Load:
    async def run(stubs: Stubs, texts: list[str], seconds: float) -> int:
        stop = time.monotonic() + seconds
        done = 0

        async def client(offset: int) -> None:
            nonlocal done
            stub = stubs[(offset // per_call) % len(stubs)]
            at = offset
            while time.monotonic() < stop:
                batch = [texts[(at + i) % len(texts)] for i in range(per_call)]
                at += per_call * clients
                reply = await stub.Embed(pb.EmbedRequest(inputs=batch))
                done += _decoded(reply)  # not `done += f(await ...)`: that reads `done` before the await

        await asyncio.gather(*(client(c * per_call) for c in range(clients)))
        return done

    return run


def stream(per_request: int, in_flight: int) -> Load:
    async def run(stubs: Stubs, texts: list[str], seconds: float) -> int:
        stop = time.monotonic() + seconds
        window = asyncio.Semaphore(in_flight)

        async def requests():  # type: ignore[no-untyped-def]
            at = 0
            while time.monotonic() < stop:
                await window.acquire()
                yield pb.EmbedRequest(
                    request_id=str(at), inputs=[texts[(at + i) % len(texts)] for i in range(per_request)]
                )
                at += per_request

        done = 0
        async for reply in stubs[0].StreamEmbed(requests()):
            done += _decoded(reply)
            window.release()
        return done

    return run


LOADS: list[tuple[str, str, Load]] = [
    ("16 concurrent Embed calls of 8 inputs", "texts/s", unary(16, 8)),
    ("16 concurrent Embed calls of 1 input", "calls/s", unary(16, 1)),
    ("one StreamEmbed, 8 inputs a request, 32 in flight", "texts/s", stream(8, 32)),
]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (/proc/PID/stat)."""
    return _stat_seconds(Path(f"/proc/{pid}/stat"))


def thread_seconds(pid: int) -> dict[str, float]:
    """User + system CPU time of each thread of a process, by thread id (/proc/PID/task/TID/stat)."""
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            seconds[task.name] = _stat_seconds(task / "stat")
    return seconds


def _stat_seconds(stat: Path) -> float:
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Measured:
    """One round of one load on one server."""

    rate: float  # texts (calls) per second
    cpu_per_text: float  # the servers' CPU microseconds per text, every thread
    busiest_thread: float  # cores the busiest server thread used (its event loop): near 1, it is the limit
    client: float  # cores this client process used: what the server left it


async def measure(
    targets: list[str], pids: list[int], load: Load, texts: list[str], seconds: float, channels: int
) -> Measured:
    """Texts (or calls) per second, the servers' CPU per text (summed over processes), the busiest
    server thread's and this client's cores.

    ``channels``: how many client connections (each its own channel), spread round-robin over
    ``targets``; 1 is one shared channel, as one client service has.
    """
    options = [("grpc.use_local_subchannel_pool", 1)]
    opened = [grpc.aio.insecure_channel(targets[i % len(targets)], options=options) for i in range(channels)]
    try:
        stubs = [embedding_pb2_grpc.EmbeddingServiceStub(channel) for channel in opened]
        await load(stubs, texts, min(1.0, seconds / 4))  # warm: connections, caches, the batcher
        threads = [thread_seconds(pid) for pid in pids]
        started, cpu, client = time.monotonic(), sum(map(cpu_seconds, pids)), time.process_time()
        done = await load(stubs, texts, seconds)
        elapsed, cpu = time.monotonic() - started, sum(map(cpu_seconds, pids)) - cpu
        client = time.process_time() - client
        busiest = max(
            now - before.get(tid, 0.0)
            for pid, before in zip(pids, threads, strict=True)
            for tid, now in thread_seconds(pid).items()
        )
        return Measured(done / elapsed, cpu / done * 1e6, busiest / elapsed, client / elapsed)
    finally:
        for channel in opened:
            await channel.close()


def profile(pid: int, path: Path, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy on ``pid`` for ``seconds``, sampling the thread that holds the GIL (``--gil``): collapsed
    stacks (``--format raw``), one file per load, for bench/profile_top.py."""
    return subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(path),
            "--nonblocking",
            "--threads",
            "--gil",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="per round, per server")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--server-args", default="", help="extra flags for our server")
    parser.add_argument("--loads", default="1,2,3", help="which loads, by number (1-3)")
    parser.add_argument("--before", type=Path, help="another checkout's server beside ours (same flags)")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy our server and the bare one under each load here (loadN.txt, loadN-bare.txt)",
    )
    parser.add_argument(
        "--default-model",
        action="store_true",
        help="serve the built-in MiniLM instead of the tiny bge-m3 (the model's cost, not only the path's)",
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="also N processes of our server, clients spread over them"
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=None,
        help="client connections for the unary loads (default 1, shared; 16 with --processes)",
    )
    parser.add_argument("--bare", nargs=2, type=int, metavar=("PORT", "DIMENSIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        asyncio.run(serve_bare(*args.bare))
        return

    from tests.support.synthetic import BGE_M3_HIDDEN, make_bge_m3_aapot

    texts = short_texts()
    wanted = [n for n in range(len(LOADS)) if str(n + 1) in args.loads.split(",")]
    with tempfile.TemporaryDirectory(prefix="serving-path-") as work:
        if args.default_model:
            model_flags: tuple[str, ...] = ()
            dimensions = 384  # all-MiniLM-L6-v2
        else:
            model_flags = ("--model", f"bge-m3={make_bge_m3_aapot(Path(work) / 'bge-m3').path}")
            dimensions = BGE_M3_HIDDEN
        flags = (*model_flags, *shlex.split(args.server_args))
        channels = args.channels or (16 if args.processes > 1 else 1)
        servers: dict[str, Group] = {"ours": Group([start_server(*flags, rest=False)])}
        if args.processes > 1:
            servers[f"ours x{args.processes}"] = Group(
                [start_server(*flags, rest=False) for _ in range(args.processes)]
            )
        if args.before:  # another checkout's server code, same flags
            servers["before"] = Group([start_server(*flags, rest=False, checkout=args.before)])
        servers["bare"] = Group([BareProcess(dimensions)])
        names = list(servers)
        try:
            print(
                f"ours: embedding-server {args.server_args}"
                + (f"; before: {args.before}" if args.before else "")
                + f"; bare: grpc.aio; {args.rounds} rounds of {args.seconds:g} s per load and server; "
                f"{len(texts)} sentences of 3-12 words; unary clients on {channels} connection(s)",
                flush=True,
            )
            print()
            header = [*names, *(f"{n} / bare" for n in names if n != "bare")]
            print(
                f"| load | {' | '.join(header)} | server CPU per text, {' / '.join(names)} "
                f"| cores of the busiest server thread, of the client: {' / '.join(names)} |"
            )
            print("|---" * (len(header) + 3) + "|")
            for number in wanted:
                name, unit, load = LOADS[number]
                rates: dict[str, list[float]] = {n: [] for n in names}
                cpu: dict[str, list[float]] = {n: [] for n in names}
                loops: dict[str, list[float]] = {n: [] for n in names}
                clients: dict[str, list[float]] = {n: [] for n in names}
                for round_ in range(args.rounds):
                    for who in names if round_ % 2 == 0 else names[::-1]:
                        server = servers[who]
                        spy = None
                        if args.profile and who in ("ours", "bare") and round_ == 0:
                            args.profile.mkdir(parents=True, exist_ok=True)
                            suffix = "" if who == "ours" else "-bare"
                            path = args.profile / f"load{number + 1}{suffix}.txt"
                            spy = profile(server.process.pid, path, args.seconds)
                        measured = asyncio.run(
                            measure(
                                server.targets,
                                server.pids,
                                load,
                                texts,
                                args.seconds,
                                1 if number == 2 else channels,  # a stream is one connection
                            )
                        )
                        rates[who].append(measured.rate)
                        cpu[who].append(measured.cpu_per_text)
                        loops[who].append(measured.busiest_thread)
                        clients[who].append(measured.client)
                        if spy is not None:
                            spy.wait(30)
                cells = [f"{span(rates[n])} {unit if n == 'ours' else ''}".rstrip() for n in names]
                for n in names:
                    if n != "bare":
                        ratios = [o / b for o, b in zip(rates[n], rates["bare"], strict=True)]
                        cells.append(
                            f"{min(ratios):.2f}-{max(ratios):.2f} (median {statistics.median(ratios):.2f})"
                        )
                costs = " / ".join(f"{statistics.median(cpu[n]):.0f}" for n in names)
                cores = " / ".join(
                    f"{statistics.median(loops[n]):.2f}, {statistics.median(clients[n]):.2f}" for n in names
                )
                print(f"| {name} | {' | '.join(cells)} | {costs} us | {cores} |", flush=True)
            print()
            print("peak RSS: " + ", ".join(f"{n} {servers[n].peak_rss_mb():.0f} MiB" for n in names))
        finally:
            for server in servers.values():
                server.stop()


def span(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}"


if __name__ == "__main__":
    main()
