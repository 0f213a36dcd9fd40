"""What the shim passes through: call timings and request ids out, a client hang-up in."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from tests.support.polling import until_sync


def metric_total(rest_url: str, name: str, *labels: str) -> float:
    """The sum of ``name``'s series whose labels include every one of ``labels`` (``key="value"``)."""
    with urllib.request.urlopen(f"{rest_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(label in line for label in labels)
    )


def hung_up_calls(rest_url: str) -> float:
    return metric_total(rest_url, "embedding_requests_total", 'method="POST /v1/embeddings"', 'code="499"')


def dropped_sequences(rest_url: str) -> float:
    return metric_total(rest_url, "embedding_dropped_total", 'reason="cancelled"')


def test_hanging_up_cancels_the_queued_work(default_server):
    """The client goes away mid-call: the call is counted as 499 and its sequences still queued are
    dropped unrun (the in-process shim cancels the engine call itself)."""
    url = default_server.rest_url
    before, dropped_before = hung_up_calls(url), dropped_sequences(url)
    long_text = " ".join(["embedding servers batch tokens"] * 80)
    body = json.dumps({"input": [f"{i} {long_text}" for i in range(256)], "truncate": True}).encode()
    with socket.create_connection(("127.0.0.1", default_server.rest_port)) as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        # the call's sequences wait in the queue (~65k tokens: seconds of work) when the client hangs up
        until_sync(lambda: metric_total(url, "embedding_queue_depth") >= 1, "the call's work queued")
    until_sync(lambda: hung_up_calls(url) == before + 1, "the call counted as hung up (499)")
    until_sync(lambda: dropped_sequences(url) > dropped_before, "its queued sequences dropped")
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
    with pytest.raises(urllib.error.HTTPError) as failed:  # an error carries it too, as in the log
        post(default_server.rest_url, {"input": "hello", "model": "nope"}, {"x-request-id": "trace-43"})
    assert failed.value.code == 404 and failed.value.headers["x-request-id"] == "trace-43"
    assert default_server.logged("[request_id=trace-43]")


def test_a_rest_call_is_one_access_line_with_its_request_id(default_server):
    """Logged once, by the REST layer (no gRPC hop inside the server to log it a second time)."""
    with post(default_server.rest_url, {"input": "logged once"}, {"x-request-id": "rest-log-1"}):
        pass
    assert default_server.logged("[request_id=rest-log-1]")
    lines = [line for line in default_server.log().splitlines() if "request_id=rest-log-1" in line]
    assert len(lines) == 1, lines
    assert "embedding_server.access" in lines[0] and "POST /v1/embeddings 200 " in lines[0]
