"""Served names: any model, the built-in one included, under one or more names; --auto-truncate for REST.

One real server serves the built-in model as ``text-embedding-3-small`` (the name OpenAI tools
hard-code) with two aliases, and a synthetic sentence-transformers model under two ``--model``
names of one directory plus an alias. Vectors are checked against numpy references computed from
the same weights, so a name that reached the wrong model (or a model loaded wrongly) fails.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
from embedding_client import EmbeddingClient
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.compose import ServedModels
from embedding_server.settings import parse_settings

from tests.support import minilm_reference as ref
from tests.support.error_details import call_status, check_error_info
from tests.support.reference import SentenceTransformersReference
from tests.support.server import RunningServer, free_port, server_command, start_server
from tests.support.synthetic import SentenceTransformersDir, make_sentence_transformers

OPENAI_NAME = "text-embedding-3-small"
#: every served name, in ListModels order: each loaded model, then its other names
SERVED = [OPENAI_NAME, "minilm", "all-minilm-l6-v2", "st", "st-again", "st-alias"]
MINILM_NAMES = SERVED[:3]
ST_NAMES = SERVED[3:]
MAX_TOKENS = 256
TEXTS = ["A man is playing a guitar.", "The quick brown fox jumps over the lazy dog."]
LONG_TEXT = " ".join(["the printing press spread across Europe within a few decades"] * 40)


@pytest.fixture(scope="module")
def st_model(tmp_path_factory) -> SentenceTransformersDir:
    return make_sentence_transformers(tmp_path_factory.mktemp("st") / "st", pooling="mean", normalize=True)


@pytest.fixture(scope="module")
def server(st_model) -> Iterator[RunningServer]:
    running = start_server(
        "--model", f"{OPENAI_NAME}=all-minilm-l6-v2",
        "--model", f"st={st_model.path}",
        "--model", f"st-again={st_model.path}",  # the same directory: one model, two names
        "--model-alias", f"minilm={OPENAI_NAME}",
        "--model-alias", f"all-minilm-l6-v2={OPENAI_NAME}",
        "--model-alias", "st-alias=st-again",
        "--auto-truncate",
        "--sessions", "1",
        rest=True,
    )  # fmt: skip
    yield running
    running.stop()


def dense(reply: pb.EmbedResponse) -> np.ndarray:
    return np.array([e.dense.values for e in reply.embeddings], dtype=np.float32)


def test_every_name_is_listed_as_a_model_of_its_own(server):
    models = server.stub().ListModels(pb.ListModelsRequest(), timeout=30).models
    assert [m.name for m in models] == SERVED
    assert [m.is_default for m in models] == [True] + [False] * (len(SERVED) - 1)  # the default's own name
    minilm = {(m.family, m.dimensions, m.max_tokens) for m in models if m.name in MINILM_NAMES}
    assert minilm == {("sentence-transformers", 384, MAX_TOKENS)}
    st = {(m.family, m.dimensions) for m in models if m.name in ST_NAMES}
    assert len(st) == 1 and st != minilm
    rest = httpx.get(f"{server.rest_url}/v1/models", timeout=30).json()
    assert [m["id"] for m in rest["data"]] == SERVED
    assert [m["is_default"] for m in rest["data"]] == [m.is_default for m in models]


def test_each_source_is_loaded_once(server):
    """Aliases and a second --model of one directory share the loaded model (one set of sessions)."""
    log = server.log()
    assert log.count("loaded model ") == 2, log
    assert f"loaded model {OPENAI_NAME} " in log and "loaded model st " in log


@pytest.mark.parametrize("name", ["", *MINILM_NAMES])
def test_every_name_of_the_builtin_model_embeds_with_it(server, name):
    reply = server.stub().Embed(pb.EmbedRequest(inputs=TEXTS, model=name), timeout=60)
    assert reply.model == (name or OPENAI_NAME)  # the response names the model as the request did
    cosine = (dense(reply) * ref.embed(TEXTS)).sum(-1)
    assert cosine.min() >= 0.9999


@pytest.mark.parametrize("name", ST_NAMES)
def test_every_name_of_a_directory_model_embeds_with_it(server, st_model, name):
    reply = server.stub().Embed(pb.EmbedRequest(inputs=TEXTS, model=name), timeout=60)
    expected = SentenceTransformersReference(st_model)
    for vector, text in zip(dense(reply), TEXTS, strict=True):
        np.testing.assert_allclose(vector, expected.dense(text), atol=2e-5)
    assert reply.model == name


def test_stream_and_tokenize_take_every_name(server, st_model):
    requests = [pb.EmbedRequest(request_id=name, inputs=TEXTS[:1], model=name) for name in SERVED]
    replies = {r.request_id: r for r in server.stub().StreamEmbed(iter(requests), timeout=60)}
    assert sorted(replies) == sorted(SERVED)
    for name, reply in replies.items():
        assert not reply.HasField("error") and reply.model == name
        expected = ref.embed(TEXTS[:1])[0] if name in MINILM_NAMES else None
        if expected is not None:
            assert float(dense(reply)[0] @ expected) >= 0.9999
        else:
            np.testing.assert_allclose(
                dense(reply)[0], SentenceTransformersReference(st_model).dense(TEXTS[0]), atol=2e-5
            )
    stub = server.stub()
    by_name = {
        name: [
            list(r.ids)
            for r in stub.Tokenize(pb.TokenizeRequest(model=name, inputs=TEXTS), timeout=30).results
        ]
        for name in SERVED
    }
    assert all(by_name[name] == [ref.tokenize(t).ids for t in TEXTS] for name in MINILM_NAMES)
    assert by_name["st"] == by_name["st-again"] == by_name["st-alias"]


def test_the_client_and_rest_take_an_alias(server):
    with EmbeddingClient(server.target, model="minilm") as client:
        result = client.embed(TEXTS)
    assert result.model == "minilm"
    assert (result.dense * ref.embed(TEXTS)).sum(-1).min() >= 0.9999
    body = {"input": TEXTS, "model": OPENAI_NAME, "encoding_format": "float"}
    reply = httpx.post(f"{server.rest_url}/v1/embeddings", json=body, timeout=60).json()
    assert reply["model"] == OPENAI_NAME
    vectors = np.array([item["embedding"] for item in reply["data"]], dtype=np.float32)
    assert (vectors * ref.embed(TEXTS)).sum(-1).min() >= 0.9999


def test_an_unknown_name_is_not_found_listing_every_served_name(server):
    with pytest.raises(grpc.RpcError) as info:
        server.stub().Embed(pb.EmbedRequest(inputs=["x"], model="text-embedding-ada-002"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details().startswith("model: 'text-embedding-ada-002' is not served here")
    assert info.value.details().endswith(f"(models: {', '.join(SERVED)})")
    check_error_info(call_status(info.value), "UNKNOWN_MODEL", "model")
    reply = httpx.post(f"{server.rest_url}/v1/embeddings", json={"input": "x", "model": "nope"}, timeout=30)
    assert reply.status_code == 404 and reply.json()["error"]["param"] == "model"


# --- --auto-truncate -----------------------------------------------------------------------------------


def test_auto_truncate_cuts_a_rest_input_without_the_field(server):
    assert len(ref.tokenize(LONG_TEXT).ids) > MAX_TOKENS
    body = {"input": [LONG_TEXT], "model": OPENAI_NAME, "encoding_format": "float"}
    reply = httpx.post(f"{server.rest_url}/v1/embeddings", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] == MAX_TOKENS  # the cut shows in usage, as with truncate
    vector = np.array(reply.json()["data"][0]["embedding"], dtype=np.float32)
    assert float(vector @ ref.embed([LONG_TEXT], MAX_TOKENS)[0]) >= 0.9999


def test_an_explicit_false_still_refuses_over_rest(server):
    body = {"input": ["fine", LONG_TEXT], "truncate": False}
    reply = httpx.post(f"{server.rest_url}/v1/embeddings", json=body, timeout=60)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "input" and reply.json()["error"]["message"].startswith(
        "input[1]: "
    )


def test_grpc_truncate_false_still_refuses(server):
    """gRPC's bool has no presence: false is the contract's "an over-long input is an error"."""
    with pytest.raises(grpc.RpcError) as info:
        server.stub().Embed(pb.EmbedRequest(inputs=["fine", LONG_TEXT]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs[1]" in info.value.details()
    reply = server.stub().Embed(pb.EmbedRequest(inputs=[LONG_TEXT], truncate=True), timeout=60)
    assert reply.usage.prompt_tokens == MAX_TOKENS


# --- bad flags: one line before anything loads ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model-alias", "a=nope"],
            "--model-alias a=nope: no model is served as 'nope' (served: all-minilm-l6-v2)",
        ),
        (
            ["--model-alias", "all-minilm-l6-v2=all-minilm-l6-v2"],
            "'all-minilm-l6-v2' is already a served name",
        ),
        (["--model-alias", "justaname"], "--model-alias 'justaname': expected ALIAS=NAME"),
        (
            ["--model", "x=all-minilm-l6-v2", "--model", "x=all-minilm-l6-v2"],
            "--model: name 'x' is used twice",
        ),
        (["--model", "=all-minilm-l6-v2"], "expected [NAME=]PATH"),
    ],
)
def test_bad_names_are_refused(args, message):
    with pytest.raises(ValueError) as info:
        ServedModels.from_settings(parse_settings(args, environ={}))
    assert message in str(info.value)


def test_aliases_from_the_environment():
    settings = parse_settings(
        [], environ={"EMBEDDING_MODEL_ALIAS": "text-embedding-3-small=all-minilm-l6-v2,ada=all-minilm-l6-v2"}
    )
    served = ServedModels.from_settings(settings)
    assert [s.name for s in served.specs] == ["all-minilm-l6-v2"]
    assert served.aliases == {"text-embedding-3-small": "all-minilm-l6-v2", "ada": "all-minilm-l6-v2"}


def test_a_bad_alias_stops_the_server_with_one_line():
    command = server_command(
        ["--host", "127.0.0.1", "--port", str(free_port()), "--rest-port", "0", "--model-alias", "a=nope"]
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1
    assert lines[-1].endswith("--model-alias a=nope: no model is served as 'nope' (served: all-minilm-l6-v2)")
    assert not any("loaded model" in line for line in lines)  # refused before loading anything


def test_auto_truncate_is_the_rest_default_only_where_the_body_is_silent():
    """The in-process shim's and ``embedding-rest``'s flag, from the flag or the environment."""
    from embedding_server.rest import schema, standalone, translate

    for body, flag, expected in [
        ({"input": "x"}, True, True),
        ({"input": "x", "truncate": None}, True, True),
        ({"input": "x", "truncate": False}, True, False),
        ({"input": "x"}, False, False),
        ({"input": "x", "truncate": True}, False, True),
    ]:
        message, _ = translate.to_embed_request(schema.parse_body(body), flag)
        assert message.truncate is expected, (body, flag)
    assert parse_settings(["--auto-truncate"], environ={}).auto_truncate
    assert parse_settings([], environ={"EMBEDDING_AUTO_TRUNCATE": "true"}).auto_truncate
    assert not parse_settings([], environ={}).auto_truncate
    assert standalone.parse_args(["--target", "h:1", "--auto-truncate"], environ={}).auto_truncate
    assert standalone.parse_args(
        ["--target", "h:1"], environ={"EMBEDDING_REST_AUTO_TRUNCATE": "1"}
    ).auto_truncate
