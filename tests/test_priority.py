"""Priorities reach the engine from every entry point: gRPC, the client library, the corpus CLI, REST.

Read back from the server's own per-class metrics (``embedding_queue_seconds_count``
counts each embedding job once under the class the engine ran it in).
"""

from __future__ import annotations

import json

import httpx
import pytest
from embedding_client import EmbeddingClient
from embedding_client.proto import embedding_pb2 as pb

from tests.support.corpus_cli import run_cli
from tests.support.server import RunningServer

MODEL = "all-minilm-l6-v2"


def jobs(server: RunningServer) -> dict[str, float]:
    """Embedding jobs run so far, by class."""
    text = httpx.get(f"{server.rest_url}/metrics", timeout=10).text
    counts = {"interactive": 0.0, "batch": 0.0}
    for line in text.splitlines():
        for priority in counts:
            if line.startswith(f'embedding_queue_seconds_count{{model="{MODEL}",priority="{priority}"}}'):
                counts[priority] = float(line.rsplit(" ", 1)[1])
    return counts


class Delta:
    def __init__(self, server: RunningServer) -> None:
        self.server = server

    def __enter__(self) -> dict[str, float]:
        self.before = jobs(self.server)
        self.result: dict[str, float] = {}
        return self.result

    def __exit__(self, *exc: object) -> None:
        after = jobs(self.server)
        self.result.update({k: after[k] - self.before[k] for k in after})


def test_grpc_defaults_and_explicit_priorities(default_server):
    stub = default_server.stub()
    with Delta(default_server) as unary:
        stub.Embed(pb.EmbedRequest(inputs=["a query"]), timeout=30)
    assert unary == {"interactive": 1, "batch": 0}  # Embed: unspecified is interactive
    with Delta(default_server) as unary_batch:
        stub.Embed(pb.EmbedRequest(inputs=["bulk"], priority=pb.PRIORITY_BATCH), timeout=30)
    assert unary_batch == {"interactive": 0, "batch": 1}
    with Delta(default_server) as stream:
        list(stub.StreamEmbed(iter([pb.EmbedRequest(inputs=["s"]) for _ in range(3)]), timeout=30))
    assert stream == {"interactive": 0, "batch": 3}  # StreamEmbed: unspecified is batch
    with Delta(default_server) as stream_interactive:
        request = pb.EmbedRequest(inputs=["s"], priority=pb.PRIORITY_INTERACTIVE)
        list(stub.StreamEmbed(iter([request]), timeout=30))
    assert stream_interactive == {"interactive": 1, "batch": 0}


def test_client_library_passes_priority(default_server):
    with EmbeddingClient(default_server.target) as client:
        with Delta(default_server) as default:
            client.embed(["a query"])
        with Delta(default_server) as batch:
            client.embed(["bulk"], priority="batch")
        with Delta(default_server) as streamed:
            list(client.embed_stream(["x", "y"], batch_size=1, priority="interactive"))
        with pytest.raises(ValueError, match="priority"):
            client.embed(["x"], priority="urgent")
    assert default == {"interactive": 1, "batch": 0}
    assert batch == {"interactive": 0, "batch": 1}
    assert streamed == {"interactive": 2, "batch": 0}


def test_corpus_cli_sends_batch_work(default_server, tmp_path):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": f"passage number {i}"}) + "\n" for i in range(10)))
    with Delta(default_server) as corpus:
        done = run_cli(
            "corpus", str(source), str(tmp_path / "out.npy"), "--target", default_server.target,
            "--batch-size", "5", "--no-progress",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert corpus == {"interactive": 0, "batch": 2}


def test_rest_priority_field(default_server):
    with httpx.Client(base_url=default_server.rest_url, timeout=30) as http:
        with Delta(default_server) as default:
            assert http.post("/v1/embeddings", json={"input": "q"}).status_code == 200
        with Delta(default_server) as batch:
            assert (
                http.post("/v1/embeddings", json={"input": ["a", "b"], "priority": "batch"}).status_code
                == 200
            )
        bad = http.post("/v1/embeddings", json={"input": "q", "priority": "urgent"})
        spec = http.get("/openapi.json").json()
    assert default == {"interactive": 1, "batch": 0}
    assert batch == {"interactive": 0, "batch": 1}
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"
    schemas = json.dumps(spec)
    assert '"interactive"' in schemas and '"batch"' in schemas
