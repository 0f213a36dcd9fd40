"""Bearer-key auth on a real server: every RPC and REST route but health, keys from flag, file and env.

Reflection is open by default (operators' grpcurl) and closed with --auth-reflection.
Keys must never reach the log, whatever the log level.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.auth import ApiKeys
from grpc_health.v1 import health_pb2

from tests.support.server import RunningServer, start_server

FLAG_KEY = "flag-key-7f3a9c"
FILE_KEYS = ("file-key-one-41b2", "file-key-two-98de")
ENV_KEYS = ("env-key-a-5c1d", "env-key-b-e07f")
ALL_KEYS = (FLAG_KEY, *FILE_KEYS, *ENV_KEYS)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def grpcurl(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "grpcurl"
    command = [str(binary) if binary.exists() else shutil.which("grpcurl") or "grpcurl"]
    command += ["-plaintext", "-max-time", "30", *args[:-1], target, args[-1]]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory) -> Iterator[RunningServer]:
    """Keys from --api-key and --api-key-file; REST on; debug logging so a leak would show."""
    key_file = tmp_path_factory.mktemp("auth") / "keys.txt"
    key_file.write_text(f"# rotated monthly\n{FILE_KEYS[0]}\n\n  {FILE_KEYS[1]}  \n")
    server = start_server(
        "--api-key", FLAG_KEY, "--api-key-file", str(key_file), "--log-level", "debug", rest=True
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def env_keyed_server() -> Iterator[RunningServer]:
    """Keys from EMBEDDING_API_KEY (comma separated); reflection needs a key too."""
    server = start_server("--auth-reflection", env={"EMBEDDING_API_KEY": ",".join(ENV_KEYS)})
    yield server
    server.stop()


# --- gRPC -------------------------------------------------------------------------------------


def test_no_key_is_unauthenticated_with_a_clear_message(keyed_server):
    with pytest.raises(grpc.RpcError) as info:
        keyed_server.stub().Embed(pb.EmbedRequest(inputs=["hi"]), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in info.value.details()


def test_a_refused_call_is_observed_like_any_other(keyed_server):
    """The observing interceptor sits outside the auth layer: a refusal is counted, and its
    access-log line names the call's request id."""

    def refusals() -> float:
        reply = httpx.get(f"{keyed_server.rest_url}/metrics", headers=dict(bearer(FLAG_KEY)), timeout=10)
        reply.raise_for_status()
        wanted = 'embedding_requests_total{code="UNAUTHENTICATED",method="Tokenize"}'
        return sum(float(line.split()[-1]) for line in reply.text.splitlines() if line.startswith(wanted))

    counted = refusals()
    with pytest.raises(grpc.RpcError) as info:
        keyed_server.stub().Tokenize(
            pb.TokenizeRequest(inputs=["hi"]), metadata=[("x-request-id", "refused-7c2e")], timeout=10
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert keyed_server.logged("Tokenize UNAUTHENTICATED")
    line = next(line for line in keyed_server.log().splitlines() if "Tokenize UNAUTHENTICATED" in line)
    assert "refused-7c2e" in line
    assert refusals() == counted + 1


@pytest.mark.parametrize("value", ["Bearer not-a-key", f"Basic {FLAG_KEY}", FLAG_KEY, f"Bearer {FLAG_KEY}x"])
def test_wrong_key_or_scheme_is_unauthenticated(keyed_server, value):
    with pytest.raises(grpc.RpcError) as info:
        keyed_server.stub().Embed(
            pb.EmbedRequest(inputs=["hi"]), metadata=[("authorization", value)], timeout=10
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == "invalid API key"


@pytest.mark.parametrize("key", [FLAG_KEY, *FILE_KEYS])
def test_every_configured_key_works(keyed_server, key):
    reply = keyed_server.stub().Embed(pb.EmbedRequest(inputs=["hi"]), metadata=bearer(key), timeout=30)
    assert len(reply.embeddings) == 1


def test_scheme_is_case_insensitive(keyed_server):
    metadata = [("authorization", f"bearer {FLAG_KEY}")]
    assert keyed_server.stub().ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10).models


def test_every_rpc_is_protected(keyed_server):
    stub = keyed_server.stub()
    calls = {
        "ListModels": lambda md: stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10),
        "Tokenize": lambda md: stub.Tokenize(pb.TokenizeRequest(inputs=["hi"]), metadata=md, timeout=10),
        "StreamEmbed": lambda md: list(
            stub.StreamEmbed(iter([pb.EmbedRequest(request_id="1", inputs=["hi"])]), metadata=md, timeout=10)
        ),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as info:
            call(())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert call(bearer(FLAG_KEY)), name


def test_health_needs_no_key(keyed_server):
    assert keyed_server.health("") == health_pb2.HealthCheckResponse.SERVING
    assert keyed_server.health("embedding.v1.EmbeddingService") == health_pb2.HealthCheckResponse.SERVING


def test_reflection_is_open_by_default(keyed_server):
    result = grpcurl(keyed_server.target, "list")
    assert result.returncode == 0, result.stderr
    assert "embedding.v1.EmbeddingService" in result.stdout.split()


def test_env_keys_work_and_auth_reflection_closes_reflection(env_keyed_server):
    for key in ENV_KEYS:
        assert env_keyed_server.stub().ListModels(pb.ListModelsRequest(), metadata=bearer(key), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        env_keyed_server.stub().ListModels(pb.ListModelsRequest(), metadata=bearer(FLAG_KEY), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    refused = grpcurl(env_keyed_server.target, "list")
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr
    allowed = grpcurl(env_keyed_server.target, "-H", f"authorization: Bearer {ENV_KEYS[1]}", "list")
    assert allowed.returncode == 0, allowed.stderr
    assert "embedding.v1.EmbeddingService" in allowed.stdout.split()
    assert env_keyed_server.health() == health_pb2.HealthCheckResponse.SERVING


# --- REST -------------------------------------------------------------------------------------


def test_rest_routes_need_the_key_except_health(keyed_server):
    url = keyed_server.rest_url
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        for method, path, body in [
            ("GET", "/v1/models", None),
            ("POST", "/v1/embeddings", {"input": "hi"}),
            ("GET", "/metrics", None),
        ]:
            refused = http.request(method, path, json=body)
            assert refused.status_code == 401, path
            assert refused.json()["error"]["code"] == "invalid_api_key", path
            wrong = http.request(method, path, json=body, headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401, path
            allowed = http.request(
                method, path, json=body, headers={"authorization": f"Bearer {FILE_KEYS[1]}"}
            )
            assert allowed.status_code == 200, (path, allowed.text)


# --- the keys stay secret ----------------------------------------------------------------------


def test_keys_never_reach_the_log(keyed_server, env_keyed_server):
    # Runs after the tests above (file order): the log has seen good keys, bad keys and refusals.
    for server in (keyed_server, env_keyed_server):
        log = server.log()
        assert "UNAUTHENTICATED" in log or server is env_keyed_server
        for key in ALL_KEYS:
            assert key not in log


# --- ApiKeys itself -----------------------------------------------------------------------------


def test_api_keys_from_sources(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# comment\n\nalpha\n beta \n")
    keys = ApiKeys.from_sources([" gamma "], str(key_file))
    assert len(keys) == 3
    assert all(keys.accepts(f"Bearer {k}") for k in ("alpha", "beta", "gamma"))
    assert keys.accepts(b"Bearer alpha")
    assert not keys.accepts("Bearer # comment")
    assert not keys.accepts("Bearer ")
    assert not keys.accepts(None)
    assert "alpha" not in repr(keys) and "gamma" not in repr(keys)


def test_an_empty_key_file_is_an_error_not_auth_off(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# nothing here yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys.from_sources([], str(key_file))


def test_no_keys_means_auth_off():
    keys = ApiKeys([])
    assert not keys.enabled
    assert keys.accepts(None)
