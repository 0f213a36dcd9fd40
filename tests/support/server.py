"""Start a real ``embedding-server`` process on loopback ports and wait until it serves."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from embedding_client.proto import embedding_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

#: The flags of each engine at fp32, for a module-scoped server fixture parametrized over them: the
#: family tests (jina-v3, bge-m3, sentence-transformers layouts) run on both at fp32 tolerances.
ENGINES_AT_FP32 = {"onnxruntime": (), "openvino": ("--engine", "openvino", "--precision", "fp32")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    """A server subprocess; ``target`` is its gRPC address, ``rest_url`` its REST base URL."""

    process: subprocess.Popen[bytes]
    port: int
    rest_port: int
    log_path: Path
    channels: list[grpc.Channel] = field(default_factory=list)
    metrics_port: int = 0  # --metrics-port, for a server without the REST shim

    def metrics(self) -> Samples:
        """The server's own Prometheus samples, from the REST port or else ``metrics_port``."""
        port = self.rest_port or self.metrics_port
        assert port, "this server serves no /metrics (no REST port, no --metrics-port)"
        reply = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        reply.raise_for_status()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(reply.text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """One sample (0 when absent), e.g. ``metric("embedding_in_flight_requests")``."""
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def channel(self) -> grpc.Channel:
        channel = grpc.insecure_channel(self.target)
        self.channels.append(channel)
        return channel

    def stub(self) -> embedding_pb2_grpc.EmbeddingServiceStub:
        return embedding_pb2_grpc.EmbeddingServiceStub(self.channel())

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel())
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logged(self, text: str, timeout: float = 30) -> bool:
        """Whether ``text`` appears in the log within ``timeout`` s (access lines are written
        when a call ends on the server, which may be just after the client saw its reply)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        for channel in self.channels:
            channel.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def server_command(args: Sequence[str], program: Sequence[str] | None = None) -> list[str]:
    """``program`` (default: this interpreter's ``embedding_server.cli``; tests/test_install.py
    passes another environment's ``embedding-server``) followed by ``args``."""
    return [*(program or (sys.executable, "-m", "embedding_server.cli")), *args]


def start_server(
    *args: str,
    rest: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    program: Sequence[str] | None = None,
) -> RunningServer:
    """Launch ``embedding-server --host 127.0.0.1`` with fresh ports and wait for SERVING."""
    port = free_port()
    rest_port = free_port() if rest else 0
    log_path = Path(tempfile.mkstemp(prefix="embedding-server-", suffix=".log")[1])
    command = server_command(
        ["--host", "127.0.0.1", "--port", str(port), "--rest-port", str(rest_port), *args], program
    )
    environment = {**os.environ, **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    server = RunningServer(process, port, rest_port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if server.health() == health_pb2.HealthCheckResponse.SERVING:
                return server
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise TimeoutError(f"server not SERVING after {timeout}s:\n{server.log()}")
