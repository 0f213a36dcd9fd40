"""TLS and mTLS on real processes: gRPC, the REST shim and the metrics port share one certificate.

The CA, the server certificate (for 127.0.0.1) and the client certificates
are made inside the test with ``cryptography``; clients verify against that
CA, so a success means the chain really checked out.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Iterator

import grpc
import httpx
import pytest
from embedding_client.proto import embedding_pb2 as pb

from tests.support.certs import Pem, Pki, make_pki
from tests.support.server import RunningServer
from tests.support.tls import TlsServer, credentials, start_tls_server


def https_context(ca: Pem, client: Pem | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


def probe(server: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "embedding_client.healthcheck", "--target", server.target, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> Pki:
    """Certificates from another CA: must be refused both ways."""
    return make_pki(tmp_path_factory.mktemp("stranger"), ca_name="someone else's CA")


@pytest.fixture(scope="module")
def tls_server(pki) -> Iterator[TlsServer]:
    server = start_tls_server(pki, mutual=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(pki) -> Iterator[TlsServer]:
    server = start_tls_server(pki, mutual=True)
    yield server
    server.stop()


# --- TLS --------------------------------------------------------------------------------------


def test_grpc_over_tls_verified_by_the_ca(tls_server, pki):
    reply = tls_server.secure_stub(credentials(pki.ca)).Embed(pb.EmbedRequest(inputs=["secret"]), timeout=30)
    assert len(reply.embeddings[0].dense.values) == 384


def test_plaintext_and_foreign_ca_are_refused(tls_server, stranger):
    with pytest.raises(grpc.RpcError) as plain:
        tls_server.stub().Embed(pb.EmbedRequest(inputs=["x"]), timeout=5)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as foreign:
        tls_server.secure_stub(credentials(stranger.ca)).Embed(pb.EmbedRequest(inputs=["x"]), timeout=5)
    assert foreign.value.code() == grpc.StatusCode.UNAVAILABLE


def test_rest_over_https(tls_server, pki):
    with httpx.Client(base_url=tls_server.https_url, verify=https_context(pki.ca), timeout=30) as http:
        assert http.get("/health").status_code == 200
        reply = http.post("/v1/embeddings", json={"input": ["over https"]})
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["data"][0]["embedding"]) == 384
        assert "embedding_requests_total" in http.get("/metrics").text
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_server.rest_port}/health", timeout=5)


def test_metrics_port_over_https(tls_server, pki):
    url = f"https://127.0.0.1:{tls_server.metrics_port}/metrics"
    reply = httpx.get(url, verify=https_context(pki.ca), timeout=10)
    assert reply.status_code == 200
    assert "embedding_model_load_seconds" in reply.text


def test_probe_speaks_tls(tls_server, pki):
    ok = probe(tls_server, "--tls-ca", str(pki.ca.cert))
    assert ok.returncode == 0, ok
    assert ok.stdout.strip().endswith("SERVING")
    assert probe(tls_server).returncode == 1  # plaintext against a TLS port


# --- mTLS -------------------------------------------------------------------------------------


def test_mtls_accepts_a_client_certificate_from_the_ca(mtls_server, pki):
    stub = mtls_server.secure_stub(credentials(pki.ca, pki.client))
    assert len(stub.Embed(pb.EmbedRequest(inputs=["mutual"]), timeout=30).embeddings) == 1
    context = https_context(pki.ca, pki.client)
    with httpx.Client(base_url=mtls_server.https_url, verify=context, timeout=30) as http:
        assert http.post("/v1/embeddings", json={"input": "mutual"}).status_code == 200


def test_mtls_refuses_no_certificate_and_a_foreign_one(mtls_server, pki, stranger):
    for creds in (credentials(pki.ca), credentials(pki.ca, stranger.client)):
        with pytest.raises(grpc.RpcError) as info:
            mtls_server.secure_stub(creds).Embed(pb.EmbedRequest(inputs=["x"]), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    for context in (https_context(pki.ca), https_context(pki.ca, stranger.client)):
        with pytest.raises(httpx.HTTPError):
            httpx.post(
                f"{mtls_server.https_url}/v1/embeddings", json={"input": "x"}, verify=context, timeout=5
            )


def test_probe_with_a_client_certificate(mtls_server, pki):
    args = ["--tls-ca", str(pki.ca.cert)]
    ok = probe(mtls_server, *args, "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key))
    assert ok.returncode == 0, ok
    refused = probe(mtls_server, *args)
    assert refused.returncode == 1
    assert "UNAVAILABLE" in refused.stdout
