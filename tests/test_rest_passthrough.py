"""What the shim passes through: call timings and request ids out, a client hang-up in."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

from tests.support.polling import until_sync


def cancelled_embeds(rest_url: str) -> float:
    with urllib.request.urlopen(f"{rest_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("embedding_requests_total{")
        and 'method="Embed"' in line
        and 'code="CANCELLED"' in line
    )


def test_hanging_up_cancels_the_grpc_call(default_server):
    before = cancelled_embeds(default_server.rest_url)
    long_text = " ".join(["embedding servers batch tokens"] * 80)
    body = json.dumps({"input": [f"{i} {long_text}" for i in range(256)], "truncate": True}).encode()
    with socket.create_connection(("127.0.0.1", default_server.rest_port)) as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        # the call reached the server (~65k tokens: seconds of work) before the client hangs up
        until_sync(lambda: default_server.metric("embedding_in_flight_requests") >= 1, "the call in flight")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and cancelled_embeds(default_server.rest_url) == before:
        time.sleep(0.1)
    assert cancelled_embeds(default_server.rest_url) == before + 1
    # and the server still answers
    with urllib.request.urlopen(f"{default_server.rest_url}/health", timeout=10) as response:
        assert response.status == 200


def post(rest_url: str, body: dict, headers: dict[str, str] | None = None):
    request = urllib.request.Request(
        f"{rest_url}/v1/embeddings",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    return urllib.request.urlopen(request, timeout=30)


def test_request_id_and_timings_come_back_as_headers(default_server):
    with post(default_server.rest_url, {"input": "hello"}, {"x-request-id": "trace-42"}) as response:
        assert response.headers["x-request-id"] == "trace-42"
        total = float(response.headers["x-total-time-ms"])
        inference = float(response.headers["x-inference-time-ms"])
        queue = float(response.headers["x-queue-time-ms"])
        assert 0 < inference <= total and 0 <= queue <= total
    with post(default_server.rest_url, {"input": "hello"}) as response:
        assert response.headers["x-request-id"]  # one is made up when the client sends none
