"""Every status code of the contract that a client can provoke here, each naming the field.

After all of them the servers still serve: a bad request never takes the process down.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from embedding_client.proto import embedding_pb2 as pb
from grpc_health.v1 import health_pb2

from tests.support.server import RunningServer, start_server

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MAX_INPUTS = 4
MAX_MESSAGE_MB = 1


@pytest.fixture(scope="module")
def small_server() -> Iterator[RunningServer]:
    """A server with tight limits: 4 inputs per request, 1 MiB messages."""
    server = start_server("--max-inputs", str(MAX_INPUTS), "--max-message-mb", str(MAX_MESSAGE_MB))
    yield server
    server.stop()


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def embed_error(server: RunningServer, **fields) -> grpc.RpcError:
    return rpc_error(lambda: server.stub().Embed(pb.EmbedRequest(**fields), timeout=30))


# (request fields, expected code, text the message must contain)
EMBED_CASES = {
    "empty inputs": ({}, INVALID, "inputs"),
    "empty input at an index": ({"inputs": ["a", "b", ""]}, INVALID, "inputs[2]"),
    "dimensions too big": ({"inputs": ["a"], "dimensions": 385}, INVALID, "dimensions"),
    "dimensions huge": ({"inputs": ["a"], "dimensions": 2**32 - 1}, INVALID, "dimensions"),
    "sparse on MiniLM": ({"inputs": ["a"], "outputs": [pb.OUTPUT_TYPE_SPARSE]}, INVALID, "outputs[0]"),
    "colbert on MiniLM": (
        {"inputs": ["a"], "outputs": [pb.OUTPUT_TYPE_DENSE, pb.OUTPUT_TYPE_COLBERT]},
        INVALID,
        "outputs[1]",
    ),
    "unknown task": ({"inputs": ["a"], "task": 99}, INVALID, "task"),
    "unknown output": ({"inputs": ["a"], "outputs": [pb.OUTPUT_TYPE_DENSE, 42]}, INVALID, "outputs[1]"),
    "negative output": ({"inputs": ["a"], "outputs": [-1]}, INVALID, "outputs[0]"),
    "duplicate outputs": (
        {"inputs": ["a"], "outputs": [pb.OUTPUT_TYPE_BINARY, pb.OUTPUT_TYPE_BINARY]},
        INVALID,
        "outputs[1]",
    ),
    "unspecified and dense are the same output": (
        {"inputs": ["a"], "outputs": [pb.OUTPUT_TYPE_UNSPECIFIED, pb.OUTPUT_TYPE_DENSE]},
        INVALID,
        "outputs[1]",
    ),
    "over-long input": ({"inputs": ["a", "word " * 300]}, INVALID, "inputs[1]"),
    "whitespace-only late chunk": ({"inputs": ["a", "  "], "late_chunking": True}, INVALID, "inputs[1]"),
    "late-chunked document over max_document_tokens": (
        {"inputs": ["word " * 2100, "word " * 2100], "late_chunking": True},
        INVALID,
        "inputs: late chunking",
    ),
    "unknown model": ({"inputs": ["a"], "model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "model"),
}


@pytest.mark.parametrize("case", list(EMBED_CASES), ids=list(EMBED_CASES))
def test_embed_error(default_server, case):
    fields, code, needle = EMBED_CASES[case]
    error = embed_error(default_server, **fields)
    assert error.code() == code, error.details()
    assert needle in error.details()
    assert len(error.details()) < 500  # one clear line, not a traceback


def test_unknown_model_message_lists_the_served_models(default_server):
    error = embed_error(default_server, inputs=["a"], model="no-such-model")
    assert "'no-such-model'" in error.details()
    assert "all-minilm-l6-v2" in error.details()


def test_tokenize_errors(default_server):
    stub = default_server.stub()
    error = rpc_error(lambda: stub.Tokenize(pb.TokenizeRequest(inputs=["a"], model="nope"), timeout=10))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "model" in error.details()
    error = rpc_error(lambda: stub.Tokenize(pb.TokenizeRequest(inputs=["a"], task=1234), timeout=10))
    assert error.code() == INVALID and "task" in error.details()


def test_stream_embed_reports_errors_in_band(default_server):
    requests = [
        pb.EmbedRequest(request_id="bad", inputs=[""]),
        pb.EmbedRequest(request_id="missing", inputs=["a"], model="nope"),
        pb.EmbedRequest(request_id="good", inputs=["a"]),
    ]
    replies = {r.request_id: r for r in default_server.stub().StreamEmbed(iter(requests), timeout=30)}
    assert set(replies) == {"bad", "missing", "good"}
    assert replies["bad"].error.code == INVALID.value[0]
    assert "inputs[0]" in replies["bad"].error.message
    assert replies["missing"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert replies["good"].error.code == 0 and len(replies["good"].embeddings) == 1


def test_too_many_inputs(small_server):
    error = embed_error(small_server, inputs=["a"] * (MAX_INPUTS + 1))
    assert error.code() == INVALID
    assert "inputs" in error.details() and str(MAX_INPUTS) in error.details()
    ok = small_server.stub().Embed(pb.EmbedRequest(inputs=["a"] * MAX_INPUTS), timeout=30)
    assert len(ok.embeddings) == MAX_INPUTS


def test_tokenize_too_many_inputs(small_server):
    stub = small_server.stub()
    error = rpc_error(lambda: stub.Tokenize(pb.TokenizeRequest(inputs=["a"] * (MAX_INPUTS + 1)), timeout=10))
    assert error.code() == INVALID and "inputs" in error.details()


def test_message_too_large(small_server):
    big = "word " * (MAX_MESSAGE_MB * 1024 * 1024 // 5 + 1000)
    error = embed_error(small_server, inputs=[big])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "message" in error.details().lower()
    # Just under the limit is not refused for its size (it is too long in tokens instead).
    under = embed_error(small_server, inputs=["word " * 1000])
    assert under.code() == INVALID


def raw_call(server: RunningServer, method: str) -> grpc.UnaryUnaryMultiCallable:
    """A call that sends bytes as they are, so the request can be something protobuf would never write."""
    return server.channel().unary_unary(
        f"/embedding.v1.EmbeddingService/{method}",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )


def string_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) with a one-byte length."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


BAD_UTF8 = b"ok \xff\xfe"


@pytest.mark.parametrize(
    ("method", "data", "field"),
    [
        ("Embed", string_field(3, b"fine") + string_field(3, BAD_UTF8), "inputs"),
        ("Embed", string_field(2, BAD_UTF8), "model"),
        ("Embed", string_field(1, BAD_UTF8) + string_field(3, b"fine"), "request_id"),
        ("Tokenize", string_field(2, BAD_UTF8), "inputs"),
    ],
    ids=["embed-inputs", "embed-model", "embed-request_id", "tokenize-inputs"],
)
def test_invalid_utf8_is_invalid_argument_naming_the_field(default_server, method, data, field):
    error = rpc_error(lambda: raw_call(default_server, method)(data, timeout=10))
    assert error.code() == INVALID, error.details()
    assert field in error.details()
    assert "UTF-8" in error.details()


def test_corrupt_bytes_are_invalid_argument(default_server):
    error = rpc_error(lambda: raw_call(default_server, "Embed")(b"\xff\xff\xff\xff", timeout=10))
    assert error.code() == INVALID, error.details()
    assert "EmbedRequest" in error.details()


def test_valid_raw_bytes_still_work(default_server):
    reply = pb.EmbedResponse.FromString(raw_call(default_server, "Embed")(string_field(3, b"hi"), timeout=10))
    assert len(reply.embeddings[0].dense.values) == 384


def test_servers_still_serve_after_every_error(default_server, small_server):
    """Runs last in this module (pytest keeps file order): nothing above broke either server."""
    for server in (default_server, small_server):
        assert server.process.poll() is None
        assert server.health() == health_pb2.HealthCheckResponse.SERVING
        reply = server.stub().Embed(pb.EmbedRequest(inputs=["still here"]), timeout=30)
        assert len(reply.embeddings[0].dense.values) == 384
        assert "Traceback" not in server.log()
