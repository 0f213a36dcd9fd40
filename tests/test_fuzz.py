"""Random requests against a real server: a contract status every time, never UNKNOWN/INTERNAL.

Hypothesis builds EmbedRequests from any values the wire allows (out-of-range
enum numbers, huge dimensions, empty and very long texts, odd model names)
and also feeds raw bytes. Successful replies are checked for shape; failed
ones for a status the contract lists. Afterwards the server is still SERVING.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from embedding_client.proto import embedding_pb2 as pb
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

MODEL = "all-minilm-l6-v2"
#: What a request may end in; UNKNOWN, INTERNAL and anything unexpected fail.
CONTRACT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

int32 = st.integers(-(2**31), 2**31 - 1)


def mostly(valid: st.SearchStrategy, anything: st.SearchStrategy) -> st.SearchStrategy:
    """Valid values three times in four, so that successful replies get checked too."""
    return st.integers(0, 3).flatmap(lambda k: valid if k else anything)


enum_value = mostly(st.integers(0, 5), int32)
words = st.builds(lambda piece, n: piece * n, st.text(min_size=1, max_size=6), st.integers(1, 600))
texts = st.one_of(
    st.text(min_size=1, max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=200),
    st.sampled_from(["hi", " ", "\n\t", "\u200b", "🙂" * 50, "a" * 3000, "東京 " * 300]),
    words,
)
requests = st.builds(
    pb.EmbedRequest,
    request_id=st.text(max_size=12),
    model=mostly(st.sampled_from(["", MODEL]), st.text(max_size=20)),
    inputs=mostly(
        st.lists(texts, min_size=1, max_size=6), st.lists(st.one_of(st.just(""), texts), max_size=6)
    ),
    task=enum_value,
    dimensions=mostly(st.sampled_from([0, 384]) | st.integers(1, 384), st.integers(0, 2**32 - 1)),
    late_chunking=st.booleans(),
    outputs=mostly(
        st.lists(st.sampled_from([0, 1, 4]), unique=True, max_size=2),
        st.lists(mostly(st.integers(0, 4), int32), max_size=4),
    ),
    truncate=st.booleans(),
)


def check_reply(request: pb.EmbedRequest, reply: pb.EmbedResponse) -> None:
    """A successful reply has one embedding per input and output, of the right size."""
    outputs = list(request.outputs) or [pb.OUTPUT_TYPE_DENSE]
    assert reply.request_id == request.request_id
    assert reply.model == MODEL
    assert len(reply.embeddings) == len(request.inputs) * len(outputs)
    size = request.dimensions or 384
    for embedding in reply.embeddings:
        kind = embedding.WhichOneof("vector")
        if kind == "dense":
            values = np.array(embedding.dense.values)
            assert values.shape == (size,)
            assert np.isfinite(values).all()
            assert abs(np.linalg.norm(values) - 1.0) < 1e-3
        else:
            assert kind == "binary"
            assert embedding.binary.dimensions == size
            assert len(embedding.binary.bits) == (size + 7) // 8
    assert reply.usage.prompt_tokens >= 2 * (1 if request.late_chunking else len(request.inputs))


@pytest.fixture(scope="module")
def stub(default_server):
    return default_server.stub()


@FUZZ
@given(request=requests)
def test_embed_answers_with_a_contract_status(stub, request):
    try:
        reply = stub.Embed(request, timeout=60)
    except grpc.RpcError as error:
        assert error.code() in CONTRACT_CODES, (error.code(), error.details(), request)
        event(f"{error.code().name}")
        assert error.details(), "an error must say what is wrong"
        return
    event("OK")
    check_reply(request, reply)


@settings(FUZZ, max_examples=20)
@given(batch=st.lists(requests, min_size=1, max_size=5))
def test_stream_embed_answers_every_request(stub, batch):
    for i, request in enumerate(batch):
        request.request_id = f"r{i}"
    replies = list(stub.StreamEmbed(iter(batch), timeout=60))
    assert sorted(r.request_id for r in replies) == sorted(r.request_id for r in batch)
    by_id = {r.request_id: r for r in replies}
    for request in batch:
        reply = by_id[request.request_id]
        if reply.HasField("error"):
            assert reply.error.code in {c.value[0] for c in CONTRACT_CODES}, reply.error
        else:
            check_reply(request, reply)


@settings(FUZZ, max_examples=30)
@given(
    request=st.builds(
        pb.TokenizeRequest,
        model=st.one_of(st.just(""), st.text(max_size=8)),
        inputs=st.lists(texts, max_size=4),
        task=enum_value,
    )
)
def test_tokenize_answers_with_a_contract_status(stub, request):
    try:
        reply = stub.Tokenize(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() in CONTRACT_CODES, (error.code(), error.details())
        return
    assert len(reply.results) == len(request.inputs)
    for result in reply.results:
        assert len(result.ids) == len(result.tokens) >= 2


@settings(FUZZ, max_examples=60)
@given(data=st.binary(max_size=200))
def test_raw_bytes_never_crash_the_parser(default_server, data):
    call = default_server.channel().unary_unary(
        "/embedding.v1.EmbeddingService/Embed",
        request_serializer=lambda b: b,
        response_deserializer=pb.EmbedResponse.FromString,
    )
    try:
        call(data, timeout=30)
    except grpc.RpcError as error:
        assert error.code() in CONTRACT_CODES, (error.code(), error.details(), data)


def test_server_still_serving_after_fuzzing(default_server):
    assert default_server.process.poll() is None
    assert default_server.health() == health_pb2.HealthCheckResponse.SERVING
    assert default_server.health("embedding.v1.EmbeddingService") == health_pb2.HealthCheckResponse.SERVING
    reply = default_server.stub().Embed(pb.EmbedRequest(inputs=["after the storm"]), timeout=30)
    assert len(reply.embeddings[0].dense.values) == 384
