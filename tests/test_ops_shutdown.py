"""Graceful shutdown of a real process: SIGTERM while a long request runs.

What an operator (and Kubernetes) relies on: health turns NOT_SERVING at once
and keeps answering, new work gets UNAVAILABLE, the work in flight completes,
and the process exits 0. Past ``--grace-period`` the work left is cancelled
and the process still exits 0.

The long request is sized from a measured run on this machine (``--max-batch-size 1``
makes it many short session runs), so the test holds on fast and slow machines.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc
from grpc_health.v1 import health_pb2

from tests.support.server import RunningServer, start_server

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 12
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def seconds_per_input(server: RunningServer) -> float:
    stub = server.stub()
    stub.Embed(pb.EmbedRequest(inputs=[TEXT], truncate=True), timeout=60)
    started = time.perf_counter()
    stub.Embed(pb.EmbedRequest(inputs=[TEXT] * 4, truncate=True), timeout=60)
    return (time.perf_counter() - started) / 4


class LongCall:
    """An Embed of ``count`` inputs on its own thread and channel."""

    def __init__(self, server: RunningServer, count: int) -> None:
        self.result: pb.EmbedResponse | None = None
        self.error: grpc.RpcError | None = None
        self.finished_at: float | None = None
        channel = grpc.insecure_channel(server.target)  # its own channel: closed by this test, not stop()
        self._stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        self._channel = channel
        self._request = pb.EmbedRequest(inputs=[TEXT] * count, truncate=True)
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            self.result = self._stub.Embed(self._request, timeout=300)
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.finished_at = time.monotonic()

    def start(self) -> LongCall:
        self._thread.start()
        return self

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        self._channel.close()


def wait_in_flight(server: RunningServer, timeout: float = 30) -> None:
    """Until the server's own metrics show the long call running with work queued behind it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.rest_url}/metrics", timeout=5).text
        lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        depth = float(lines.get('embedding_queue_depth{model="all-minilm-l6-v2",priority="interactive"}', 0))
        if float(lines.get("embedding_in_flight_requests", 0)) >= 1 and depth > 0:
            return
        time.sleep(0.01)
    raise AssertionError("the long call never showed up in flight")


def probe(server: RunningServer) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "embedding_client.healthcheck", "--target", server.target]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def test_sigterm_drains_work_in_flight_then_exits_0():
    server = start_server("--max-batch-size", "1", "--grace-period", "120", rest=True)
    try:
        count = max(8, int(4.0 / seconds_per_input(server)))  # about 4 s of work
        long_call = LongCall(server, count).start()
        wait_in_flight(server)

        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # Health keeps answering, NOT_SERVING, for both names, while the long call runs.
        deadline = time.monotonic() + 5
        while server.health() != NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.005)
        assert server.health("") == NOT_SERVING
        assert server.health("embedding.v1.EmbeddingService") == NOT_SERVING
        # New work: UNAVAILABLE with a reason, on gRPC and through the REST shim.
        with pytest.raises(grpc.RpcError) as info:
            server.stub().Embed(pb.EmbedRequest(inputs=["too late"]), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in info.value.details()
        with httpx.Client(base_url=server.rest_url, timeout=10) as http:
            assert http.get("/health").status_code == 503
            assert http.post("/v1/embeddings", json={"input": "too late"}).status_code == 503
        assert not long_call.done(), "the long call ended before the checks: make it longer"
        assert server.process.poll() is None, "the process must wait for the work in flight"
        # The probe command says NOT_SERVING and exits 1 (what Docker's HEALTHCHECK sees).
        checked = probe(server)
        assert checked.returncode == 1
        if not long_call.done():
            assert checked.stdout.strip().endswith("NOT_SERVING"), checked

        long_call.join(timeout=120)
        assert long_call.error is None, long_call.error
        assert long_call.result is not None and len(long_call.result.embeddings) == count
        assert server.process.wait(timeout=30) == 0
        assert long_call.finished_at is not None and long_call.finished_at > signalled
    finally:
        code = server.stop()
    assert code == 0
    assert "stopped" in server.log()


def test_grace_period_cancels_what_is_left_and_still_exits_0():
    server = start_server("--max-batch-size", "1", "--grace-period", "1", rest=True)
    try:
        count = max(16, int(8.0 / seconds_per_input(server)))  # about 8 s of work: far past the grace
        long_call = LongCall(server, count).start()
        wait_in_flight(server)
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)  # Ctrl-C takes the same path as SIGTERM
        assert server.process.wait(timeout=30) == 0
        stopped_after = time.monotonic() - started
        long_call.join(timeout=30)
    finally:
        server.stop()
    assert long_call.error is not None, "the long call should have been cut off"
    assert long_call.error.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert stopped_after < 8.0
    assert "grace period over" in server.log()


def test_probe_answers_serving_on_a_healthy_server(default_server):
    checked = probe(default_server)
    assert checked.returncode == 0, checked
    assert checked.stdout.strip() == f"{default_server.target}: SERVING"


def test_a_second_signal_stops_waiting():
    """An operator's second Ctrl-C (or SIGTERM) cancels the drain instead of waiting out the grace."""
    server = start_server("--max-batch-size", "1", "--grace-period", "120", rest=True)
    try:
        count = max(16, int(8.0 / seconds_per_input(server)))
        long_call = LongCall(server, count).start()
        wait_in_flight(server)
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while server.health() != NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.005)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        assert time.monotonic() - started < 6.0
        long_call.join(timeout=30)
    finally:
        server.stop()
    assert long_call.error is not None
    assert "second stop signal" in server.log()
