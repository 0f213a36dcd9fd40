"""Several replicas behind one target, and replicas that die, drain or are still starting.

Evidence of where work went comes from each server's own Prometheus numbers
(sequences it ran, calls it answered), not from the client. Results are
checked against one server's raw unary answers.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from embedding_client import ChannelSettings, EmbeddingClient, RetryPolicy, StreamRetry, UnavailableError
from embedding_client.proto import embedding_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from tests.support.launch import launch, wait_serving
from tests.support.replies import raw_dense
from tests.support.server import RunningServer, free_port, start_server
from tests.support.texts import sentence

MODEL = "all-minilm-l6-v2"
N = 300


def samples(server: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.rest_url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sequences_run(server: RunningServer) -> float:
    """Inputs this server has run through its model (warm-up included)."""
    return samples(server).get(("embedding_batch_size_sum", (("model", MODEL),)), 0.0)


def calls(server: RunningServer, method: str, code: str) -> float:
    return samples(server).get(("embedding_requests_total", (("code", code), ("method", method))), 0.0)


def in_flight(server: RunningServer) -> float:
    return samples(server).get(("embedding_in_flight_requests", ()), 0.0)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [sentence(i) for i in range(N)]


@pytest.fixture(scope="module")
def expected(default_server: RunningServer, texts: list[str]) -> np.ndarray:
    stub = default_server.stub()
    parts = [stub.Embed(pb.EmbedRequest(inputs=texts[i : i + 100]), timeout=120) for i in range(0, N, 100)]
    return np.concatenate([raw_dense(part) for part in parts])


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[RunningServer]]:
    servers = [start_server(rest=True), start_server(rest=True)]
    yield servers
    for server in servers:
        server.stop()


def both(servers: list[RunningServer]) -> str:
    return "ipv4:" + ",".join(server.target for server in servers)


def replace(servers: list[RunningServer], victim: RunningServer | None) -> None:
    """Put a fresh replica where a test killed, drained or froze one (the pair is module-scoped)."""
    if victim is not None and victim in servers:
        victim.stop(signal.SIGKILL)
        servers[servers.index(victim)] = start_server(rest=True)


def test_two_replicas_both_receive_stream_and_unary_work(replicas, texts, expected):
    before = [sequences_run(s) for s in replicas]
    embeds_before = [calls(s, "Embed", "OK") for s in replicas]
    with EmbeddingClient(both(replicas), batch_size=10, max_concurrency=4) as c:
        run = c.embed_stream_batches(texts, batch_size=10, window=4, streams=2, rotate_after=0.5)
        streamed = np.concatenate([b.dense for b in run])
        unary = c.embed(texts[:200]).dense
    np.testing.assert_allclose(streamed, expected, atol=1e-6)
    np.testing.assert_allclose(unary, expected[:200], atol=1e-6)
    ran = [sequences_run(s) - b for s, b in zip(replicas, before, strict=True)]
    assert all(count > 0 for count in ran), ran  # each replica ran part of the work
    assert sum(ran) == N + 200 + 10 * run.stats.requests_resent  # and nothing twice, beyond resends
    embeds = [calls(s, "Embed", "OK") - b for s, b in zip(replicas, embeds_before, strict=True)]
    assert all(count > 0 for count in embeds) and sum(embeds) == 20, embeds


def test_a_replica_killed_mid_stream_leaves_the_run_complete_and_correct(replicas, texts, expected):
    servers = replicas
    victim = None
    try:
        with EmbeddingClient(both(servers)) as c:
            run = c.embed_stream_batches(texts, batch_size=5, window=4, streams=2, rotate_after=0.5)
            out: list[np.ndarray] = []
            for batch in run:
                out.append(batch.dense)
                if victim is None and len(out) * 5 >= N // 4:
                    busy = [s for s in servers if in_flight(s) > 0]
                    if busy:  # kill one that is serving our stream right now
                        victim = busy[0]
                        victim.process.send_signal(signal.SIGKILL)
            dense = np.concatenate(out)
        assert victim is not None and victim.process.wait(10) == -signal.SIGKILL
        np.testing.assert_allclose(dense, expected, atol=1e-6)  # every row, in order, once
        assert run.stats.broken_attempts >= 1  # the victim's stream did break and was replaced
    finally:
        replace(servers, victim)


def test_a_draining_replica_hands_its_work_to_the_other(replicas, texts, expected):
    """SIGTERM: the replica answers UNAVAILABLE for new work and leaves rotation; nothing is lost."""
    servers = replicas
    drained = None
    try:
        with EmbeddingClient(both(servers)) as c:
            run = c.embed_stream_batches(texts, batch_size=5, window=4, streams=2, rotate_after=0.5)
            out: list[np.ndarray] = []
            for batch in run:
                out.append(batch.dense)
                if drained is None and len(out) * 5 >= N // 4:
                    busy = [s for s in servers if in_flight(s) > 0]
                    if busy:
                        drained = busy[0]
                        drained.process.send_signal(signal.SIGTERM)
            dense = np.concatenate(out)
        assert drained is not None and drained.process.wait(60) == 0
        np.testing.assert_allclose(dense, expected, atol=1e-6)
    finally:
        replace(servers, drained)


def test_unary_calls_are_retried_by_the_service_config_while_a_server_starts():
    """grpc-core retries UNAVAILABLE per the policy: the server counts every attempt.

    The call is made while the server is bound but still loading ("starting
    up": UNAVAILABLE). Either it fails after exactly ``max_attempts`` attempts,
    or it succeeds after at least one refused attempt; without the policy it
    would fail after one.
    """
    port, rest_port = free_port(), free_port()
    server = launch(port, rest_port, "--sessions", "4")  # four ONNX sessions: a longer loading window
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not port_open(port):  # bound first, then loading
            time.sleep(0.002)
        probes = 0
        # Client-side health checking would refuse a NOT_SERVING backend without calling it:
        # off here, so that every attempt reaches the server and is counted there.
        no_retry = ChannelSettings(retry=None, health_check=False)
        with EmbeddingClient(f"127.0.0.1:{port}", settings=no_retry, timeout=5) as probe:
            try:
                probe.list_models()
            except UnavailableError as error:
                probes = int("starting up" in error.message)
        if not probes:
            pytest.skip("the server finished loading before a refused attempt could be seen")
        policy = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.02)
        retrying = ChannelSettings(retry=policy, health_check=False)
        with EmbeddingClient(f"127.0.0.1:{port}", settings=retrying, timeout=30) as c:
            try:
                c.list_models()
                succeeded = True
            except UnavailableError:
                succeeded = False
        wait_serving(server)
        refused = calls(server, "ListModels", "UNAVAILABLE") - probes
        ok = calls(server, "ListModels", "OK")
        if succeeded:
            assert refused >= 1 and ok == 1  # refused, retried, then answered: all in one call
        else:
            assert refused == 4 and ok == 0
    finally:
        server.stop()


def test_a_restarted_server_on_the_same_port_resumes_the_stream(texts, expected):
    port = free_port()
    first = wait_serving(launch(port))
    second: RunningServer | None = None
    try:
        with EmbeddingClient(f"127.0.0.1:{port}") as c:
            run = c.embed_stream_batches(texts, batch_size=5, window=4)
            out: list[np.ndarray] = []
            for batch in run:
                out.append(batch.dense)
                if second is None and len(out) * 5 >= N // 3:
                    first.process.send_signal(signal.SIGKILL)
                    first.process.wait(10)
                    second = launch(port)  # comes up while the client backs off and retries
            dense = np.concatenate(out)
        np.testing.assert_allclose(dense, expected, atol=1e-6)
        assert run.stats.broken_attempts >= 1 and run.stats.requests_resent >= 1
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_frozen_replica_is_detected_and_its_requests_go_elsewhere(replicas, texts, expected):
    """SIGSTOP: the connection stays open but nothing is answered; the stall watchdog moves the work."""
    servers = replicas
    frozen = None
    try:
        retry = StreamRetry(stall_timeout=1.0, initial_backoff=0.05, max_backoff=0.5)
        with EmbeddingClient(both(servers), stream_retry=retry) as c:
            run = c.embed_stream_batches(texts, batch_size=5, window=4, streams=2, rotate_after=None)
            out: list[np.ndarray] = []
            for batch in run:
                out.append(batch.dense)
                if frozen is None and len(out) * 5 >= N // 4:
                    busy = [s for s in servers if in_flight(s) > 0]
                    if busy:
                        frozen = busy[0]
                        frozen.process.send_signal(signal.SIGSTOP)
            dense = np.concatenate(out)
        assert frozen is not None
        np.testing.assert_allclose(dense, expected, atol=1e-6)
        assert run.stats.stalled_attempts >= 1
    finally:
        if frozen is not None:
            frozen.process.send_signal(signal.SIGCONT)
        replace(servers, frozen)
