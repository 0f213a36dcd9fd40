"""A REST client that hangs up cancels its gRPC call: abandoned work does not keep the model busy."""

from __future__ import annotations

import json
import socket
import time
import urllib.request


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
        time.sleep(0.5)  # the call is queued or running: ~65k tokens, seconds of work
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and cancelled_embeds(default_server.rest_url) == before:
        time.sleep(0.1)
    assert cancelled_embeds(default_server.rest_url) == before + 1
    # and the server still answers
    with urllib.request.urlopen(f"{default_server.rest_url}/health", timeout=10) as response:
        assert response.status == 200
