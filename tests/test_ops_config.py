"""Configuration checked at start: one clear line, a non-zero exit, no traceback.

Each case is a real ``embedding-server`` process; they run side by side to
keep the suite quick. (Model-file problems of every family are covered in
test_model_loading.py; here the ones an operator meets first.)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.certs import make_pki
from tests.support.server import free_port, server_command


@dataclass
class Case:
    args: list[str]
    expect: str  # a piece of the one error line
    status: int = 1  # 2: the flag parser refused it
    env: dict[str, str] | None = None
    lines: int | None = 1  # None: log lines may come first (the models load after the ports are up)


@pytest.fixture(scope="module")
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("config")
    pki = make_pki(root / "pki")
    other = make_pki(root / "other")
    empty_keys = root / "empty-keys.txt"
    empty_keys.write_text("# no key yet\n")
    not_pem = root / "not-pem.crt"
    not_pem.write_text("hello\n")
    broken_model = root / "broken-model"
    broken_model.mkdir()
    (broken_model / "model.onnx").write_bytes(b"definitely not an onnx graph\x00" * 8)
    from embedding_server.models.loader import builtin_files

    shutil.copy(builtin_files().root / "tokenizer.json", broken_model / "tokenizer.json")
    return {
        "cert": pki.server.cert,
        "key": pki.server.key,
        "other_key": other.server.key,
        "ca": pki.ca.cert,
        "empty_keys": empty_keys,
        "not_pem": not_pem,
        "broken_model": broken_model,
        "nowhere": root / "nowhere",
    }


def cases(f: Mapping[str, str], taken: int) -> dict[str, Case]:
    """Every case by name; ``f`` maps a file's role to its path."""
    tls = ["--tls-cert", f["cert"], "--tls-key", f["key"]]
    return {
        "port not a number": Case(
            ["--port", "http"], "argument --port: invalid port value: 'http'", status=2
        ),
        "port out of range": Case(["--port", "70000"], "not a port number: 70000", status=2),
        "negative grace": Case(["--grace-period", "-1"], "--grace-period", status=2),
        "bad log level": Case(["--log-level", "loud"], "--log-level", status=2),
        "bad env value": Case(
            [], "EMBEDDING_MAX_BATCH_SIZE='many'", status=2, env={"EMBEDDING_MAX_BATCH_SIZE": "many"}
        ),
        "grpc port in use": Case(
            ["--port", str(taken)], f"--port {taken}: cannot listen on 127.0.0.1:{taken} (already in use)"
        ),
        "rest port in use": Case(["--rest-port", str(taken)], f"--rest-port {taken}: cannot listen"),
        "metrics port in use": Case(["--metrics-port", str(taken)], f"--metrics-port {taken}: cannot listen"),
        "rest port is the grpc port": Case(["--rest-port", "{port}"], "the same port as --port"),
        "missing model dir": Case(["--model", f"m={f['nowhere']}"], "model directory does not exist"),
        "unreadable model": Case(
            ["--model", f"m={f['broken_model']}"], "ONNX Runtime cannot load it", lines=None
        ),
        "missing tls cert": Case(["--tls-cert", f["nowhere"], "--tls-key", f["key"]], "no such file"),
        "tls cert not pem": Case(["--tls-cert", f["not_pem"], "--tls-key", f["key"]], "not a PEM file"),
        "tls key of another cert": Case(
            ["--tls-cert", f["cert"], "--tls-key", f["other_key"]],
            "not a usable certificate and matching key",
        ),
        "tls key without cert": Case(
            ["--tls-key", f["key"]], "--tls-cert and --tls-key go together", status=2
        ),
        "client ca not pem": Case([*tls, "--tls-client-ca", f["not_pem"]], "--tls-client-ca"),
        "missing key file": Case(["--api-key-file", f["nowhere"]], "--api-key-file"),
        "empty key file": Case(["--api-key-file", f["empty_keys"]], "holds no key"),
    }


@pytest.fixture(scope="module")
def outcomes(files, taken_port) -> dict[str, tuple[Case, subprocess.CompletedProcess[str]]]:
    """Every case started at once, then collected."""
    running = {}
    for name, case in cases({k: str(v) for k, v in files.items()}, taken_port).items():
        port = free_port()
        args = [arg.replace("{port}", str(port)) for arg in case.args]
        base = ["--host", "127.0.0.1", "--port", str(port), "--rest-port", "0"]
        command = server_command([*base, *args])
        env = {**os.environ, **(case.env or {})}
        running[name] = (
            case,
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
            command,
        )
    done = {}
    for name, (case, process, command) in running.items():
        try:
            stdout, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        done[name] = (case, subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return done


class _Placeholders(dict):
    def __missing__(self, key: str) -> str:
        return "/placeholder"


CASE_NAMES = list(cases(_Placeholders(), 0))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_configuration_is_one_line_and_a_nonzero_exit(outcomes, name):
    case, result = outcomes[name]
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == case.status, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("embedding-server: error: ")]
    assert len(errors) == 1, lines
    assert errors[0] == lines[-1], lines
    if case.lines is not None:
        assert len(lines) == case.lines, lines
    assert case.expect in errors[0], errors[0]
    assert "usage:" not in output
