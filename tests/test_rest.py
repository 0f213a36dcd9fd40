"""The REST shim of a real server process: the official ``openai`` client and raw HTTP.

Vectors are compared with what gRPC ``Embed`` returns for the same inputs on
the same server (the gRPC path itself is checked against a numpy reference
elsewhere); error paths are checked for status, OpenAI's error shape and the
field named.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.rest import openapi, schema

MODEL = "all-minilm-l6-v2"
TEXTS = ["The cat sat on the mat.", "Embeddings map text to vectors.", "ß, 東京, and emoji 🙂 too"]


@pytest.fixture(scope="module")
def http(default_server):
    with httpx.Client(base_url=default_server.rest_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def client(default_server):
    return openai.OpenAI(base_url=default_server.rest_url + "/v1", api_key="unused", max_retries=0)


def grpc_vectors(server, texts, **fields) -> tuple[np.ndarray, pb.EmbedResponse]:
    response = server.stub().Embed(pb.EmbedRequest(inputs=texts, **fields), timeout=30)
    return np.array([e.dense.values for e in response.embeddings], dtype=np.float32), response


def assert_same_vectors(rest: np.ndarray, grpc: np.ndarray) -> None:
    assert rest.shape == grpc.shape
    cosine = (rest * grpc).sum(1) / np.linalg.norm(rest, axis=1) / np.linalg.norm(grpc, axis=1)
    assert cosine.min() >= 0.99999
    np.testing.assert_allclose(rest, grpc, atol=1e-5)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# --- the openai client ---------------------------------------------------------------------------


def test_openai_client_default_base64_equals_grpc(default_server, client):
    result = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64
    expected, response = grpc_vectors(default_server, TEXTS)
    assert [item.index for item in result.data] == [0, 1, 2]
    assert_same_vectors(np.array([item.embedding for item in result.data], dtype=np.float32), expected)
    assert result.model == MODEL
    assert result.usage.prompt_tokens == response.usage.prompt_tokens > 0
    assert result.usage.total_tokens == response.usage.total_tokens


def test_openai_client_float_equals_grpc(default_server, client):
    result = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    expected, _ = grpc_vectors(default_server, TEXTS)
    assert_same_vectors(np.array([item.embedding for item in result.data], dtype=np.float32), expected)


def test_openai_client_single_string_and_dimensions(default_server, client):
    single = client.embeddings.create(model=MODEL, input="hello world")
    assert len(single.data) == 1 and len(single.data[0].embedding) == 384
    short = client.embeddings.create(model=MODEL, input=["hello world"], dimensions=128)
    expected, _ = grpc_vectors(default_server, ["hello world"], dimensions=128)
    vector = np.array(short.data[0].embedding, dtype=np.float32)
    assert vector.shape == (128,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    assert_same_vectors(vector[None], expected)


def test_openai_client_errors_are_typed(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, input=[[101, 2023, 102]])  # token ids
    assert caught.value.code == "token_ids_not_supported" and "text" in caught.value.message


def test_openai_client_lists_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


# --- raw HTTP: outputs ---------------------------------------------------------------------------


def test_base64_is_little_endian_float32(default_server, http):
    body = http.post("/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "base64"}).json()
    vectors = np.array(
        [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in body["data"]]
    )
    expected, _ = grpc_vectors(default_server, TEXTS[:2])
    assert_same_vectors(vectors, expected)
    as_type = http.post("/v1/embeddings", json={"input": TEXTS[:2], "embedding_type": "base64"}).json()
    assert [item["embedding"] for item in as_type["data"]] == [item["embedding"] for item in body["data"]]


def test_binary_and_ubinary_are_the_packed_sign_bits(default_server, http):
    floats = http.post("/v1/embeddings", json={"input": TEXTS}).json()
    dense = np.array([item["embedding"] for item in floats["data"]], dtype=np.float32)
    expected_bits = np.packbits(dense > 0, axis=1)  # MSB first, computed here from the float vectors
    unsigned = http.post("/v1/embeddings", json={"input": TEXTS, "embedding_type": "ubinary"}).json()
    signed = http.post(
        "/v1/embeddings", json={"input": TEXTS, "embedding_type": "binary", "encoding_format": "base64"}
    ).json()
    u = np.array([item["embedding"] for item in unsigned["data"]])
    s = np.array([item["embedding"] for item in signed["data"]])
    assert u.shape == (3, 48) and u.min() >= 0 and u.max() <= 255
    assert s.min() >= -128 and s.max() <= 127
    np.testing.assert_array_equal(u, expected_bits)
    np.testing.assert_array_equal(s.astype(np.int8).view(np.uint8), expected_bits)


def test_binary_with_dimensions(default_server, http):
    body = http.post(
        "/v1/embeddings", json={"input": "hi", "embedding_type": "ubinary", "dimensions": 64}
    ).json()
    _, response = grpc_vectors(default_server, ["hi"], dimensions=64, outputs=[pb.OUTPUT_TYPE_BINARY])
    assert body["data"][0]["embedding"] == list(response.embeddings[0].binary.bits)


@pytest.mark.parametrize("task", list(schema.TASKS))
def test_task_names_accepted(default_server, http, task):
    """MiniLM has no task adapters: every task is accepted and ignored (contract)."""
    body = http.post("/v1/embeddings", json={"input": "query text", "task": task})
    assert body.status_code == 200, body.text
    expected, _ = grpc_vectors(default_server, ["query text"], task=schema.TASKS[task])
    assert_same_vectors(np.array([body.json()["data"][0]["embedding"]], dtype=np.float32), expected)


def test_alias_route_user_and_nulls(http):
    body = http.post(
        "/embeddings",
        json={"input": ["a"], "model": MODEL, "user": "someone", "dimensions": None, "encoding_format": None},
    )
    assert body.status_code == 200, body.text
    assert body.json()["object"] == "list" and body.json()["data"][0]["object"] == "embedding"


def test_truncate(http):
    long_text = "word " * 1000  # over MiniLM's 256 tokens
    assert_error(http.post("/v1/embeddings", json={"input": ["ok", long_text]}), 400, "input")
    body = http.post("/v1/embeddings", json={"input": ["ok", long_text], "truncate": True})
    assert body.status_code == 200 and body.json()["usage"]["prompt_tokens"] >= 256


def test_content_type_is_not_required(http):
    body = http.post("/v1/embeddings", content=b'{"input": "plain curl -d"}')
    assert body.status_code == 200, body.text


# --- raw HTTP: every error path ------------------------------------------------------------------

BAD_BODIES = [
    pytest.param(b"{not json", 400, None, "invalid_json", id="invalid-json"),
    pytest.param(b"", 400, None, "invalid_json", id="empty-body"),
    pytest.param(b'{"input": "caf\xe9"}', 400, None, "invalid_json", id="invalid-utf8"),
    pytest.param(b'{"input": "\\ud800"}', 400, None, "invalid_json", id="lone-surrogate"),
    pytest.param(b'["input"]', 400, None, "invalid_type", id="not-an-object"),
    pytest.param(b"{}", 400, "input", "missing_required", id="missing-input"),
    pytest.param(b'{"input": 42}', 400, "input", "invalid_type", id="input-number"),
    pytest.param(b'{"input": [1, 2, 3]}', 400, "input", "token_ids_not_supported", id="token-ids"),
    pytest.param(b'{"input": [[1, 2], [3]]}', 400, "input", "token_ids_not_supported", id="token-id-lists"),
    pytest.param(b'{"input": []}', 400, "input", "invalid_value", id="empty-list"),
    pytest.param(b'{"input": ["a", ""]}', 400, "input", "invalid_value", id="empty-string"),
    pytest.param(b'{"input": ["a", null]}', 400, "input", "invalid_type", id="null-item"),
    pytest.param(b'{"input": "a", "model": "nope"}', 404, "model", "model_not_found", id="unknown-model"),
    pytest.param(b'{"input": "a", "task": "query"}', 400, "task", "invalid_value", id="unknown-task"),
    pytest.param(
        b'{"input": "a", "dimension": 8}', 400, "dimension", "unknown_parameter", id="unknown-field"
    ),
    pytest.param(b'{"input": "a", "dimensions": "8"}', 400, "dimensions", "invalid_type", id="dims-string"),
    pytest.param(b'{"input": "a", "dimensions": 0}', 400, "dimensions", "invalid_value", id="dims-zero"),
    pytest.param(
        b'{"input": "a", "dimensions": 4096}', 400, "dimensions", "invalid_value", id="dims-too-big"
    ),
    pytest.param(b'{"input": "a", "dimensions": 1e300}', 400, "dimensions", "invalid_value", id="dims-huge"),
    pytest.param(b'{"input": "a", "dimensions": 2.5}', 400, "dimensions", "invalid_type", id="dims-float"),
    pytest.param(b'{"input": "a", "dimensions": 1e400}', 400, None, "invalid_json", id="dims-inf"),
    pytest.param(b'{"input": "a", "encoding_format": "hex"}', 400, "encoding_format", None, id="bad-format"),
    pytest.param(b'{"input": "a", "embedding_type": "int4"}', 400, "embedding_type", None, id="bad-type"),
    pytest.param(b'{"input": "a", "truncate": "yes"}', 400, "truncate", "invalid_type", id="bool-string"),
    pytest.param(b'{"input": "a", "return_sparse": true}', 400, "return_sparse", None, id="no-sparse-here"),
    pytest.param(
        b'{"input": "a", "return_colbert": true}', 400, "return_colbert", None, id="no-colbert-here"
    ),
    pytest.param(b'{"input": "a", "return_dense": false}', 400, "return_dense", None, id="nothing-to-return"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_BODIES)
def test_bad_requests_get_openai_errors(http, body, status, param, code):
    response = http.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert_error(response, status, param, code)


def test_too_many_inputs_is_400_naming_input(http):
    assert_error(http.post("/v1/embeddings", json={"input": ["x"] * 2049}), 400, "input")


def test_wrong_method_and_path(http):
    assert_error(http.get("/v1/embeddings"), 405, code="method_not_allowed")
    assert_error(http.post("/v1/nothing", json={}), 404, code="not_found")


def test_server_still_serves_after_bad_requests(http):
    for case in BAD_BODIES:
        http.post("/v1/embeddings", content=case.values[0])
    assert http.get("/health").status_code == 200
    assert http.post("/v1/embeddings", json={"input": "still here"}).status_code == 200


# --- models, health, openapi ---------------------------------------------------------------------


def test_models_route(http):
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == MODEL and model["object"] == "model" and model["owned_by"]
    assert model["dimensions"] == 384 and model["is_default"] is True
    assert http.get("/models").json() == body


def test_health(http):
    response = http.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "serving"}


def test_openapi_document(http):
    document = http.get("/openapi.json").json()
    assert document == openapi.document(auth=False)
    assert document["openapi"].startswith("3.")
    request = document["components"]["schemas"]["EmbeddingsRequest"]
    assert set(request["properties"]) == set(schema.FIELDS)
    assert {"/v1/embeddings", "/embeddings", "/v1/models", "/health"} <= set(document["paths"])


def test_rest_calls_are_counted_in_metrics(http):
    http.post("/v1/embeddings", json={"input": "counted"})
    http.post("/v1/embeddings", json={"input": "a", "model": "nope"})
    text = http.get("/metrics").text
    assert 'embedding_requests_total{code="200",method="POST /v1/embeddings"}' in text
    assert 'embedding_requests_total{code="404",method="POST /v1/embeddings"}' in text


def test_late_chunking_equals_grpc(default_server, http):
    chunks = ["Berlin is the capital of Germany.", "It has about 3.8 million people.", "The city is green."]
    body = http.post("/v1/embeddings", json={"input": chunks, "late_chunking": True})
    assert body.status_code == 200, body.text
    rest = np.array([item["embedding"] for item in body.json()["data"]], dtype=np.float32)
    expected, _ = grpc_vectors(default_server, chunks, late_chunking=True)
    assert_same_vectors(rest, expected)
    plain, _ = grpc_vectors(default_server, chunks)
    assert np.abs(rest - plain).max() > 1e-3  # late chunking did change the vectors
