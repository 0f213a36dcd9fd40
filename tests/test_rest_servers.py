"""REST shim setups beyond the default server: auth, limits, drain, taken ports, ``embedding-rest``.

Every server here is a real process on loopback ports.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import openai
import pytest
from embedding_client.proto import embedding_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from tests.support.polling import until_sync
from tests.support.server import RunningServer, free_port, server_command, start_server
from tests.support.standalone import Standalone

KEY = "test-key-0123"


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    return error


# --- auth ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server() -> Iterator[RunningServer]:
    server = start_server("--api-key", KEY, rest=True)
    yield server
    server.stop()


def test_auth_refuses_missing_and_wrong_keys(auth_server):
    with httpx.Client(base_url=auth_server.rest_url, timeout=30) as http:
        missing = http.post("/v1/embeddings", json={"input": "x"})
        assert_error(missing, 401, "invalid_api_key")
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = http.post("/v1/embeddings", json={"input": "x"}, headers={"authorization": "Bearer nope"})
        assert_error(wrong, 401, "invalid_api_key")
        assert KEY not in wrong.text
        assert_error(http.get("/v1/models"), 401, "invalid_api_key")


def test_auth_accepts_the_key(auth_server):
    with httpx.Client(base_url=auth_server.rest_url, timeout=30) as http:
        for scheme in ("Bearer", "bearer"):
            ok = http.post(
                "/v1/embeddings", json={"input": "x"}, headers={"authorization": f"{scheme} {KEY}"}
            )
            assert ok.status_code == 200, ok.text
        assert http.get("/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_health_and_openapi_are_open(auth_server):
    with httpx.Client(base_url=auth_server.rest_url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        document = http.get("/openapi.json").json()
        assert document["security"] == [{"bearer": []}]


def test_openai_client_with_and_without_the_key(auth_server):
    good = openai.OpenAI(base_url=auth_server.rest_url + "/v1", api_key=KEY, max_retries=0)
    assert len(good.embeddings.create(model="all-minilm-l6-v2", input=["a", "b"]).data) == 2
    bad = openai.OpenAI(base_url=auth_server.rest_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="all-minilm-l6-v2", input="a")


# --- limits: body size (shim and gRPC), overload -------------------------------------------------


@pytest.fixture(scope="module")
def limits_server() -> Iterator[RunningServer]:
    # The shim takes 2 MiB bodies but gRPC only 1 MiB messages (each limit for its own protocol);
    # one request at a time, each held >= 300 ms by the batcher's wait, so a second one is refused.
    server = start_server(
        "--rest-max-body-mb",
        "2",
        "--max-message-mb",
        "1",
        "--max-queue-requests",
        "1",
        "--max-batch-wait-ms",
        "300",
        rest=True,
    )
    yield server
    server.stop()


def test_body_over_the_shim_limit_is_413(limits_server):
    big = b'{"input": ["' + b"a" * (3 * 1024 * 1024) + b'"]}'
    with httpx.Client(base_url=limits_server.rest_url, timeout=30) as http:
        assert_error(http.post("/v1/embeddings", content=big), 413, "request_too_large")

        def chunks():  # no Content-Length: the shim counts while it reads
            for start in range(0, len(big), 256 * 1024):
                yield big[start : start + 256 * 1024]

        assert_error(http.post("/v1/embeddings", content=chunks()), 413, "request_too_large")
        assert http.post("/v1/embeddings", json={"input": "still serving"}).status_code == 200


def test_grpc_message_limit_binds_grpc_and_the_standalone_shim_not_the_in_process_one(limits_server):
    """About 1.5 MB: under the shim's 2 MiB body limit, over gRPC's 1 MiB. The in-process shim makes
    no gRPC call, so only its own body limit applies; embedding-rest in front of the same server
    makes one, and the target's limit comes back as 413."""
    texts = ["word " * 10_000] * 30  # few inputs, cut to the window: the bytes, not the model, matter
    body = {"input": texts, "truncate": True}
    with httpx.Client(base_url=limits_server.rest_url, timeout=120) as http:
        served = http.post("/v1/embeddings", json=body)
    assert served.status_code == 200, served.text
    assert len(served.json()["data"]) == 30
    with pytest.raises(grpc.RpcError) as info:
        limits_server.stub().Embed(pb.EmbedRequest(inputs=texts, truncate=True), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    shim = Standalone("--target", limits_server.target, "--max-body-mb", "2")
    try:
        with httpx.Client(base_url=shim.url, timeout=30) as http:
            assert_error(http.post("/v1/embeddings", json=body), 413, "request_too_large")
    finally:
        shim.stop()


def test_overload_is_429(limits_server):
    """--max-queue-requests 1: while one request waits in the batcher, others are refused with 429."""

    def post(i: int) -> httpx.Response:
        return httpx.post(limits_server.rest_url + "/v1/embeddings", json={"input": f"t{i}"}, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(post, range(4)))
    assert sorted(r.status_code for r in statuses)[0] == 200
    assert {r.status_code for r in statuses} == {200, 429}
    assert_error(next(r for r in statuses if r.status_code == 429), 429, "overloaded")


# --- drain and a taken port ----------------------------------------------------------------------


def test_sigterm_health_503_while_rest_work_in_flight_finishes():
    # The batcher holds every batch 3 s: the request is surely in flight when SIGTERM comes.
    server = start_server("--max-batch-wait-ms", "3000", "--grace-period", "60", rest=True)
    try:
        texts = ["first", "second"]
        with (
            httpx.Client(base_url=server.rest_url, timeout=120) as http,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            in_flight = pool.submit(http.post, "/v1/embeddings", json={"input": texts})
            until_sync(lambda: server.metric("embedding_in_flight_requests") >= 1, "the request in flight")
            assert not in_flight.done(), "the request finished too fast to test the drain"
            server.process.send_signal(signal.SIGTERM)
            health = None
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not in_flight.done():
                health = httpx.get(server.rest_url + "/health", timeout=5)
                if health.status_code == 503:
                    break
                time.sleep(0.05)
            assert health is not None and health.status_code == 503
            assert health.json() == {"status": "not_serving"}
            response = in_flight.result()
            assert response.status_code == 200 and len(response.json()["data"]) == 2
        assert server.process.wait(60) == 0
    finally:
        server.stop()


def test_rest_port_in_use_is_a_startup_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            server_command(["--host", "127.0.0.1", "--port", str(free_port()), "--rest-port", str(port)]),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "--rest-port" in result.stderr and str(port) in result.stderr


# --- standalone embedding-rest -------------------------------------------------------------------


def test_standalone_in_front_of_a_running_server(default_server):
    shim = Standalone(env={"EMBEDDING_REST_TARGET": default_server.target})
    try:
        with httpx.Client(base_url=shim.url, timeout=30) as http:
            assert http.get("/health").status_code == 200
            client = openai.OpenAI(base_url=shim.url + "/v1", api_key="unused", max_retries=0)
            texts = ["standalone shim", "same vectors as gRPC"]
            result = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
            grpc = default_server.stub().Embed(pb.EmbedRequest(inputs=texts), timeout=30)
            rest = np.array([item.embedding for item in result.data], dtype=np.float32)
            expected = np.array([e.dense.values for e in grpc.embeddings], dtype=np.float32)
            np.testing.assert_allclose(rest, expected, atol=1e-5)
            assert http.get("/v1/models").json()["data"][0]["id"] == "all-minilm-l6-v2"
            assert_error(
                http.post("/v1/embeddings", json={"input": "a", "model": "x"}), 404, "model_not_found"
            )
        assert shim.stop() == 0
    finally:
        shim.stop()


def test_standalone_serves_the_rest_call_metrics(default_server):
    """embedding-rest has /metrics: the REST series the in-process shim exports, counted in this
    fresh process only (so the counts are exact), and nothing that only a server with models has."""
    shim = Standalone("--target", default_server.target)
    try:
        with httpx.Client(base_url=shim.url, timeout=30) as http:
            assert http.post("/v1/embeddings", json={"input": ["counted"]}).status_code == 200
            assert http.post("/v1/embeddings", json={"input": "a", "model": "nope"}).status_code == 404
            assert http.get("/v1/models").status_code == 200
            reply = http.get("/metrics")
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(reply.text)
            for sample in family.samples
        }

        def calls(method: str, code: str) -> float:
            return samples.get(("embedding_requests_total", (("code", code), ("method", method))), 0.0)

        assert calls("POST /v1/embeddings", "200") == 1
        assert calls("POST /v1/embeddings", "404") == 1
        assert calls("GET /v1/models", "200") == 1
        latency = ("embedding_request_seconds_count", (("method", "POST /v1/embeddings"),))
        assert samples[latency] == 2
        assert ("process_resident_memory_bytes", ()) in samples
        names = {name for name, _ in samples}
        assert not names & {"embedding_serving", "embedding_in_flight_requests"}  # the target's to say
    finally:
        shim.stop()


def test_standalone_metrics_need_the_shims_key():
    shim = Standalone("--target", f"127.0.0.1:{free_port()}", "--api-key", "shim-key")
    try:
        assert_error(httpx.get(shim.url + "/metrics", timeout=30), 401, "invalid_api_key")
        good = httpx.get(shim.url + "/metrics", headers={"authorization": "Bearer shim-key"}, timeout=30)
        assert good.status_code == 200 and "embedding_requests_total" in good.text
    finally:
        shim.stop()


def test_standalone_with_a_dead_target_is_503():
    shim = Standalone("--target", f"127.0.0.1:{free_port()}", "--max-body-mb", "0.01")
    try:
        with httpx.Client(base_url=shim.url, timeout=30) as http:
            health = http.get("/health")
            assert health.status_code == 503 and health.json() == {"status": "not_serving"}
            assert_error(http.post("/v1/embeddings", json={"input": "a"}), 503, "unavailable")
            assert_error(http.post("/v1/embeddings", content=b"x" * 20_000), 413, "request_too_large")
    finally:
        shim.stop()


def test_standalone_forwards_the_client_key_or_its_own(auth_server):
    passthrough = Standalone("--target", auth_server.target)
    with_key = Standalone("--target", auth_server.target, "--target-api-key", KEY)
    checking = Standalone("--target", auth_server.target, "--api-key", "shim-key", "--target-api-key", KEY)
    try:
        body = {"input": "forwarded"}
        good = {"authorization": f"Bearer {KEY}"}
        assert httpx.post(passthrough.url + "/v1/embeddings", json=body, headers=good).status_code == 200
        # Refused by the gRPC server's auth, mapped from UNAUTHENTICATED.
        assert_error(httpx.post(passthrough.url + "/v1/embeddings", json=body), 401, "invalid_api_key")
        assert httpx.post(with_key.url + "/v1/embeddings", json=body).status_code == 200
        # The shim's own keys are checked before any gRPC call.
        assert_error(httpx.post(checking.url + "/v1/embeddings", json=body, headers=good), 401)
        shim_key = {"authorization": "Bearer shim-key"}
        assert httpx.post(checking.url + "/v1/embeddings", json=body, headers=shim_key).status_code == 200
    finally:
        for shim in (passthrough, with_key, checking):
            shim.stop()


def test_standalone_port_in_use_and_missing_target():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "embedding_server.rest.standalone", "--host", "127.0.0.1"]
        result = subprocess.run(
            [*command, "--target", "127.0.0.1:1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1 and "--port" in result.stderr
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, env={**os.environ})
    assert result.returncode == 2 and "--target" in result.stderr
