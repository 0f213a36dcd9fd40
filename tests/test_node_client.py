"""A non-Python microservice: Node stubs generated from the contract call a live server.

The stubs come from the repository's own buf.gen.yaml (its protoc-gen-es
plugin, run by buf), the calls go through Connect-ES's gRPC transport and the
health check through @grpc/grpc-js with grpc-health-check, all installed from
npm by `make setup`. The vectors must equal what the Python stubs get.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from embedding_client.proto import embedding_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
NODE_CLIENT = ROOT / "clients" / "node"
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
INVALID_ARGUMENT = 3


def es_plugin(template: dict) -> dict:
    [plugin] = [p for p in template["plugins"] if "protoc-gen-es" in str(p.get("local", ""))]
    return plugin


def test_template_generates_go_and_typescript():
    template = yaml.safe_load((ROOT / "buf.gen.yaml").read_text())
    plugins = [p.get("remote") or p.get("local") for p in template["plugins"]]
    assert "buf.build/protocolbuffers/go" in plugins and "buf.build/grpc/go" in plugins
    assert es_plugin(template)["out"] == "gen/ts"
    assert (NODE_CLIENT / es_plugin(template)["local"].removeprefix("clients/node/")).exists()


@pytest.fixture(scope="module")
def generated() -> Path:
    """The shipped template's TypeScript plugin, run as plain JavaScript (+ .d.ts) for node."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (the README's setup needs Node and npm)")
    template = yaml.safe_load((ROOT / "buf.gen.yaml").read_text())
    out = NODE_CLIENT / "gen"  # inside the package, so the generated imports resolve its node_modules
    shutil.rmtree(out, ignore_errors=True)
    plugin = es_plugin(template)
    plugin["out"] = str(out.relative_to(ROOT))
    plugin["opt"] = ["target=js+dts" if o.startswith("target=") else o for o in plugin["opt"]]
    only_node = {**template, "plugins": [plugin]}
    only_node.pop("managed", None)  # Go package options only
    result = subprocess.run(
        [str(BUF), "generate", "--template", json.dumps(only_node)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "embedding" / "v1" / "embedding_pb.js").exists()
    return out


def test_node_client_embeds_streams_and_checks_health(default_server, generated):
    result = subprocess.run(
        ["node", "check.mjs", default_server.target, str(generated)],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)

    assert seen["health"] == {"": "SERVING", "embedding.v1.EmbeddingService": "SERVING"}

    stub = default_server.stub()
    texts = ["hello from node", "a second text"]
    expected = stub.Embed(
        pb.EmbedRequest(inputs=texts, outputs=[pb.OUTPUT_TYPE_DENSE, pb.OUTPUT_TYPE_BINARY]), timeout=30
    )
    embed = seen["embed"]
    assert embed["requestId"] == "node-1" and embed["model"] == expected.model
    assert embed["usage"]["promptTokens"] == expected.usage.prompt_tokens
    assert [e["index"] for e in embed["embeddings"]] == [e.index for e in expected.embeddings]
    for got, want in zip(embed["embeddings"], expected.embeddings, strict=True):
        if want.HasField("dense"):
            np.testing.assert_allclose(got["dense"], want.dense.values, atol=1e-6)
        else:
            assert bytes.fromhex(got["bits"]) == want.binary.bits

    replies = {reply["requestId"]: reply for reply in seen["stream"]}
    assert set(replies) == {"a", "bad", "b"}
    assert (
        replies["bad"]["error"]["code"] == INVALID_ARGUMENT
        and "inputs[0]" in replies["bad"]["error"]["message"]
    )
    for request_id, inputs in (("a", ["first streamed text"]), ("b", ["second streamed text", "third"])):
        assert replies[request_id]["error"] is None
        want = stub.Embed(pb.EmbedRequest(inputs=inputs), timeout=30)
        for got, vector in zip(replies[request_id]["dense"], want.embeddings, strict=True):
            np.testing.assert_allclose(got, vector.dense.values, atol=1e-6)
