"""The server with TLS (and mutual TLS) on, waited for over TLS, and stubs that talk to it."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
from embedding_client.proto import embedding_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.certs import Pem, Pki
from tests.support.server import RunningServer, free_port, server_command

SERVING = health_pb2.HealthCheckResponse.SERVING


def credentials(ca: Pem, client: Pem | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert_bytes,
        private_key=client.key_bytes if client else None,
        certificate_chain=client.cert_bytes if client else None,
    )


class TlsServer(RunningServer):
    metrics_port: int

    def secure_stub(self, creds: grpc.ChannelCredentials) -> embedding_pb2_grpc.EmbeddingServiceStub:
        channel = grpc.secure_channel(self.target, creds)
        self.channels.append(channel)
        return embedding_pb2_grpc.EmbeddingServiceStub(channel)

    def secure_health(self, creds: grpc.ChannelCredentials) -> int:
        channel = grpc.secure_channel(self.target, creds)
        self.channels.append(channel)
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.rest_port}"


def start_tls_server(pki: Pki, mutual: bool) -> TlsServer:
    """The server with --tls-cert/--tls-key (and --tls-client-ca), waited for over TLS."""
    port, rest_port, metrics_port = free_port(), free_port(), free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--rest-port", str(rest_port)]
    args += ["--metrics-port", str(metrics_port)]
    args += ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    if mutual:
        args += ["--tls-client-ca", str(pki.ca.cert)]
    log_path = Path(tempfile.mkstemp(prefix="embedding-server-tls-", suffix=".log")[1])
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            server_command(args), stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
    server = TlsServer(process, port, rest_port, log_path)
    server.metrics_port = metrics_port
    creds = credentials(pki.ca, pki.client if mutual else None)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if server.secure_health(creds) == SERVING:
                return server
        except grpc.RpcError:
            time.sleep(0.1)
    server.stop()
    raise TimeoutError(server.log())
