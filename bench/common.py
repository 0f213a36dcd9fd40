"""Shared by the benchmarks: workloads, a real server process, RSS and metrics readers."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week "
    "case point government company number group problem fact be have do say get make go know "
    "take see come think look want give use find tell ask seem feel try leave call good new "
    "first last long great little own other old right big high different small large next "
    "early young important few public bad same able to of in for on with at by from up about "
    "into over after embedding vector search query document retrieval semantic model server "
    "latency throughput batch token queue session kernel memory network cluster replica"
).split()


def sentences(count: int, low: int = 5, high: int = 60, seed: int = 0) -> list[str]:
    """Deterministic English-like texts of ``low``..``high`` words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) + "." for _ in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    """VmHWM: a process's peak resident set, in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    rest_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.process.pid)

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]

    def metrics(self) -> str:
        """The Prometheus text from /metrics on the REST port ("" if unavailable)."""
        if not self.rest_port:
            return ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.rest_port}/metrics", timeout=5) as response:
                return response.read().decode()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def checkout_env(checkout: Path | None) -> dict[str, str]:
    """This process's environment; with ``checkout``, that checkout's ``server/`` and ``client/`` code
    first on the path (what a server or a client of another version runs with)."""
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = f"{checkout / 'server'}:{checkout / 'client'}"
    return env


def start_server(
    *args: str, rest: bool = True, timeout: float = 120, checkout: Path | None = None
) -> ServerProcess:
    """A server of this checkout, or (``checkout``) of another one's ``server/`` and ``client/`` code."""
    port, rest_port = free_port(), (free_port() if rest else 0)
    log = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False)  # noqa: SIM115
    command = [sys.executable, "-m", "embedding_server.cli", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--rest-port", str(rest_port), "--log-level", "warning", *args]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=checkout_env(checkout))
    server = ServerProcess(process, port, rest_port)
    channel = grpc.insecure_channel(server.target)
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {Path(log.name).read_text()}")
        try:
            if (
                stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                channel.close()
                return server
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    server.stop()
    raise TimeoutError("server did not start")


def metric_sum(text: str, name: str) -> float:
    """Sum of every sample of a metric (all label sets) in Prometheus text format."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]
