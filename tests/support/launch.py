"""A server on ports the test chose, started without waiting, and the wait for it to serve.

tests.support.server.start_server picks its own ports and waits; tests that restart a server on
the same port, or start several at once, launch and wait apart.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from tests.support.server import RunningServer, server_command


def launch(port: int, rest_port: int = 0, *args: str) -> RunningServer:
    """A server on a chosen port, not waited for (start_server picks its own port and waits)."""
    log_path = Path(tempfile.mkstemp(prefix="embedding-server-", suffix=".log")[1])
    flags = ["--host", "127.0.0.1", "--port", str(port), "--rest-port", str(rest_port), *args]
    command = server_command(flags)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return RunningServer(process, port, rest_port, log_path)


def wait_serving(server: RunningServer, timeout: float = 120) -> RunningServer:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited:\n{server.log()}")
        try:
            if server.health() == health_pb2.HealthCheckResponse.SERVING:
                return server
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    raise TimeoutError(server.log())
