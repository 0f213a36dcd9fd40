"""EmbeddingClient / AsyncEmbeddingClient against real servers: results, options, errors, channel.

Expectations come from the raw generated stub (what the server itself says
for the same request) or from plain numpy on those numbers, never from the
client under test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from embedding_client import (
    AsyncEmbeddingClient,
    ChannelSettings,
    DeadlineExceededError,
    EmbeddingClient,
    EmbeddingError,
    InvalidArgumentError,
    NotFoundError,
    Output,
    Task,
    UnauthenticatedError,
    UnavailableError,
)
from embedding_client.proto import embedding_pb2 as pb

from tests.support.keyed import KEY
from tests.support.replies import raw_dense
from tests.support.server import RunningServer, free_port, start_server
from tests.support.synthetic import make_bge_m3_aapot, make_jina_v3
from tests.support.texts import sentence


@pytest.fixture(scope="module")
def client(default_server: RunningServer) -> Iterator[EmbeddingClient]:
    with EmbeddingClient(default_server.target) as c:
        yield c


# --- results -------------------------------------------------------------------------------------


def test_embed_equals_the_raw_unary_call(client, default_server):
    texts = [sentence(i) for i in range(12)]
    result = client.embed(texts)
    raw = default_server.stub().Embed(pb.EmbedRequest(inputs=texts), timeout=60)
    assert result.dense.dtype == np.float32 and result.dense.shape == (12, 384)
    np.testing.assert_array_equal(result.dense, raw_dense(raw))
    assert result.model == raw.model == "all-minilm-l6-v2"
    assert result.prompt_tokens == raw.usage.prompt_tokens
    np.testing.assert_array_equal(np.asarray(result), result.dense)
    assert len(result) == 12 and result[3].index == 3
    np.testing.assert_array_equal(result[3].dense, raw_dense(raw)[3])


def test_a_lone_string_is_one_text(client):
    assert client.embed("hello world").dense.shape == (1, 384)


def test_a_long_list_is_split_and_reassembled_in_order(default_server):
    texts = [sentence(i) for i in range(150)]
    raw = raw_dense(default_server.stub().Embed(pb.EmbedRequest(inputs=texts), timeout=120))
    with EmbeddingClient(default_server.target, batch_size=16, max_concurrency=3) as c:
        result = c.embed(texts)
        np.testing.assert_allclose(result.dense, raw, atol=1e-6)
        # The split is real: an empty text in the third request is reported there.
        broken = list(texts)
        broken[40] = ""
        with pytest.raises(InvalidArgumentError) as error:
            c.embed(broken)
    assert error.value.offset == 32  # requests start at 0, 16, 32: input 40 is inputs[8] of the third
    assert (error.value.field, error.value.index, error.value.input_index) == ("inputs", 8, 40)


def test_binary_rows_are_the_packed_signs_of_the_dense_rows(client):
    result = client.embed([sentence(i) for i in range(5)], outputs=["dense", Output.BINARY])
    assert result.binary.dtype == np.uint8 and result.binary.shape == (5, 48)
    np.testing.assert_array_equal(result.binary, np.packbits(result.dense > 0, axis=1))


def test_dimensions_truncate_then_normalize(client):
    texts = [sentence(i) for i in range(4)]
    full = client.embed(texts).dense
    small = client.embed(texts, dimensions=64).dense
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    assert small.shape == (4, 64)
    np.testing.assert_allclose(small, expected, atol=1e-5)


def test_list_models_and_tokenize_match_the_raw_calls(client, default_server):
    stub = default_server.stub()
    raw_models = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
    models = client.list_models()
    assert [(m.name, m.family, m.dimensions, m.max_tokens, m.is_default) for m in models] == [
        (m.name, m.family, m.dimensions, m.max_tokens, m.is_default) for m in raw_models
    ]
    assert models[0].outputs == (Output.DENSE, Output.BINARY)
    raw_tokens = stub.Tokenize(pb.TokenizeRequest(inputs=["hello world", "a cat"]), timeout=30).results
    tokens = client.tokenize(["hello world", "a cat"])
    assert [t.ids for t in tokens] == [list(r.ids) for r in raw_tokens]
    assert tokens[0].tokens == ["[CLS]", "hello", "world", "[SEP]"]


async def test_async_client_equals_the_sync_client(default_server):
    texts = [sentence(i) for i in range(70)]
    with EmbeddingClient(default_server.target) as sync:
        expected = sync.embed(texts).dense
        models = sync.list_models()
    async with AsyncEmbeddingClient(default_server.target, batch_size=16, max_concurrency=2) as c:
        result, listed, tokens = await asyncio.gather(c.embed(texts), c.list_models(), c.tokenize("hello"))
        np.testing.assert_allclose(result.dense, expected, atol=1e-6)
        assert listed == models
        assert tokens[0].tokens == ["[CLS]", "hello", "[SEP]"]
        with pytest.raises(InvalidArgumentError):
            await c.embed(["fine", ""])


# --- tasks and other outputs (synthetic jina-v3 and bge-m3 models) ----------------------------------


@pytest.fixture(scope="module")
def family_server(tmp_path_factory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("client-models")
    jina = make_jina_v3(root / "jina")
    bge = make_bge_m3_aapot(root / "bge")
    server = start_server("--model", f"jina={jina.path}", "--model", f"bge={bge.path}")
    yield server
    server.stop()


@pytest.mark.parametrize(
    "task", ["retrieval.passage", Task.RETRIEVAL_PASSAGE, pb.TASK_RETRIEVAL_PASSAGE, "RETRIEVAL_PASSAGE"]
)
def test_a_task_by_enum_or_by_jina_name_reaches_the_server(family_server, task):
    texts = ["a query about cats", "dogs"]
    stub = family_server.stub()
    passage = raw_dense(
        stub.Embed(pb.EmbedRequest(model="jina", inputs=texts, task=pb.TASK_RETRIEVAL_PASSAGE), timeout=60)
    )
    query = raw_dense(
        stub.Embed(pb.EmbedRequest(model="jina", inputs=texts, task=pb.TASK_RETRIEVAL_QUERY), timeout=60)
    )
    assert not np.allclose(passage, query)  # the task matters for this model, so the test can fail
    with EmbeddingClient(family_server.target, model="jina") as c:
        np.testing.assert_array_equal(c.embed(texts, task=task).dense, passage)


def test_unknown_task_names_fail_on_the_client_with_the_choices():
    with EmbeddingClient("127.0.0.1:1") as c, pytest.raises(ValueError, match=r"retrieval\.query"):
        c.embed(["x"], task="retrieval.querry")


def test_sparse_and_colbert_outputs_as_numpy(family_server):
    texts = ["the cat and the dog and the bird saw the cat", "cats", "Paris is the capital of France."]
    kinds = [pb.OUTPUT_TYPE_DENSE, pb.OUTPUT_TYPE_SPARSE, pb.OUTPUT_TYPE_COLBERT, pb.OUTPUT_TYPE_BINARY]
    raw = family_server.stub().Embed(pb.EmbedRequest(model="bge", inputs=texts, outputs=kinds), timeout=60)
    per_input = [raw.embeddings[i * 4 : i * 4 + 4] for i in range(len(texts))]
    with EmbeddingClient(family_server.target) as c:
        result = c.embed(texts, model="bge", outputs=["dense", "sparse", "colbert", "binary"])
    for i, (dense, sparse, colbert, binary) in enumerate(per_input):
        np.testing.assert_array_equal(result.dense[i], np.array(dense.dense.values, np.float32))
        assert result.sparse[i].ids.dtype == np.uint32
        assert result.sparse[i].ids.tolist() == list(sparse.sparse.indices)
        np.testing.assert_array_equal(result.sparse[i].weights, np.array(sparse.sparse.values, np.float32))
        rows = np.array(colbert.colbert.values, np.float32).reshape(-1, colbert.colbert.dimensions)
        assert result.colbert[i].shape == rows.shape and rows.shape[0] > 1
        np.testing.assert_array_equal(result.colbert[i], rows)
        assert result.binary[i].tobytes() == binary.binary.bits
    assert result[1].sparse.to_dict() == dict(
        zip(per_input[1][1].sparse.indices, per_input[1][1].sparse.values, strict=True)
    )


# --- typed errors ------------------------------------------------------------------------------------


def test_grpc_errors_become_typed_exceptions_with_code_and_message(client):
    with pytest.raises(InvalidArgumentError) as bad:
        client.embed(["fine", ""])
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and "inputs[1]" in bad.value.message
    with pytest.raises(NotFoundError) as missing:
        client.embed(["x"], model="no-such-model")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND and "no-such-model" in missing.value.message
    with pytest.raises(InvalidArgumentError, match="dimensions"):
        client.embed(["x"], dimensions=10_000)
    with pytest.raises(DeadlineExceededError):
        client.embed([sentence(i) for i in range(64)], timeout=0.0001)
    assert issubclass(InvalidArgumentError, EmbeddingError)


def test_nothing_listening_is_unavailable():
    no_retries = ChannelSettings(retry=None)
    nowhere = f"127.0.0.1:{free_port()}"
    with EmbeddingClient(nowhere, settings=no_retries) as c, pytest.raises(UnavailableError) as error:
        c.list_models()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


# --- API key and TLS -------------------------------------------------------------------------------


def test_api_key_is_sent_on_unary_and_stream_calls(keyed_server):
    with EmbeddingClient(keyed_server.target, api_key=KEY) as c:
        assert c.embed(["x"]).dense.shape == (1, 384)
        assert sum(len(b) for b in c.embed_stream_batches(["a", "b", "c"], batch_size=2)) == 3
    with EmbeddingClient(keyed_server.target) as anonymous:
        with pytest.raises(UnauthenticatedError):
            anonymous.embed(["x"])
        with pytest.raises(UnauthenticatedError):
            list(anonymous.embed_stream(["a", "b"]))
    with EmbeddingClient(keyed_server.target, api_key="wrong") as wrong, pytest.raises(UnauthenticatedError):
        wrong.list_models()


def test_mutual_tls(tmp_path_factory):
    from tests.support.certs import make_pki
    from tests.support.tls import start_tls_server

    pki = make_pki(tmp_path_factory.mktemp("client-pki"))
    server = start_tls_server(pki, mutual=True)
    try:
        with EmbeddingClient(
            server.target,
            root_certificates=pki.ca.cert,
            client_certificate=pki.client.cert,
            client_key=pki.client.key,
        ) as c:
            assert c.embed(["over mTLS"]).dense.shape == (1, 384)
        no_cert = ChannelSettings(tls=True, root_certificates=pki.ca.cert_bytes, retry=None)
        with EmbeddingClient(server.target, settings=no_cert) as c, pytest.raises(UnavailableError):
            c.embed(["x"])
    finally:
        server.stop()


# --- the service config ------------------------------------------------------------------------------


def test_service_config_names_the_retry_policy_and_balancing():
    import json

    config = json.loads(ChannelSettings().service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert {n["method"] for n in method["name"]} == {"Embed", "ListModels", "Tokenize"}  # not StreamEmbed
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert config["healthCheckConfig"] == {"serviceName": "embedding.v1.EmbeddingService"}


def test_the_client_needs_nothing_from_the_server_side():
    """A microservice installs only the base dependencies: the client must import without the rest."""
    import subprocess
    import sys

    guard = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "SERVER = {'embedding_server', 'onnxruntime', 'tokenizers', 'starlette', 'uvicorn',\n"
        "          'prometheus_client', 'grpc_health', 'grpc_reflection', 'orjson', 'httpx'}\n"
        "def guarded(name, *args, **kwargs):\n"
        "    if name.split('.')[0] in SERVER:\n"
        "        raise ImportError('server-side module imported: ' + name)\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = guarded\n"
        "import embedding_client, embedding_client.aio, embedding_client.cli, embedding_client.corpus\n"
        "embedding_client.cli.build_parser()\n"
    )
    done = subprocess.run([sys.executable, "-c", guard], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
