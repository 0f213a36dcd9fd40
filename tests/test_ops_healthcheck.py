"""``embedding-healthcheck``, the container probe: exit 0 only for SERVING, one line always.

SERVING on a healthy server and NOT_SERVING during a drain are covered in
test_ops_shutdown.py, TLS and mTLS in test_ops_tls.py.
"""

from __future__ import annotations

import subprocess
import sys

from embedding_client.healthcheck import build_parser

from tests.support.server import free_port


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "embedding_client.healthcheck", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)


def test_nothing_listening_is_unhealthy_in_one_line():
    port = free_port()
    result = probe("--target", f"127.0.0.1:{port}", "--timeout", "2")
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"127.0.0.1:{port}: UNAVAILABLE"), lines
    assert "Traceback" not in result.stderr


def test_unknown_health_service_is_unhealthy(default_server):
    result = probe("--target", default_server.target, "--service", "no.such.Service")
    assert result.returncode == 1
    assert "unknown health service 'no.such.Service'" in result.stdout


def test_the_embedding_service_name_is_serving(default_server):
    result = probe("--target", default_server.target, "--service", "embedding.v1.EmbeddingService")
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"{default_server.target}: SERVING"


def test_defaults_follow_the_servers_environment():
    args = build_parser({"EMBEDDING_PORT": "6000"}).parse_args([])
    assert args.target == "127.0.0.1:6000" and args.service == "" and not args.tls
    assert build_parser({}).parse_args([]).target == "127.0.0.1:50051"
    env = {"EMBEDDING_HEALTHCHECK_TARGET": "10.0.0.1:1", "EMBEDDING_HEALTHCHECK_TLS_CA": "/ca.pem"}
    args = build_parser(env).parse_args([])
    assert args.target == "10.0.0.1:1" and args.tls_ca == "/ca.pem"
    assert build_parser(env).parse_args(["--target", "h:2"]).target == "h:2"  # the flag wins


def test_bad_flag_is_one_line_exit_2():
    result = probe("--timeout", "soon")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
