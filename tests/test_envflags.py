"""Every command reads its flags from the environment one way (embedding_client.envflags).

A value that does not parse ends the command with exit status 2 and one line that names the
variable and its value, never Python's wording ("invalid literal for int()") or a traceback.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from unittest import mock

import pytest
from embedding_client.cli import build_parser as client_parser
from embedding_client.envflags import apply_environment, parse_boolean, variable_name
from embedding_client.healthcheck import build_parser as healthcheck_parser
from embedding_server.rest.standalone import parse_args as rest_args
from embedding_server.settings import parse_settings

COMMANDS: dict[str, Callable[[Mapping[str, str]], object]] = {
    "server": lambda environ: parse_settings([], environ),
    "rest": lambda environ: rest_args(["--target", "h:1"], environ),
    "healthcheck": lambda environ: healthcheck_parser(environ).parse_args([]),
    "client": lambda environ: _client_args(environ),
}


def _client_args(environ: Mapping[str, str]) -> argparse.Namespace:
    with mock.patch.dict(os.environ, environ, clear=True):  # embedding-client reads os.environ
        return client_parser().parse_args(["models"])


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        ("server", "EMBEDDING_PORT", "xyz"),
        ("server", "EMBEDDING_PORT", "99999"),
        ("server", "EMBEDDING_MAX_INPUTS", "many"),
        ("server", "EMBEDDING_LOG_JSON", "maybe"),
        ("rest", "EMBEDDING_REST_PORT", "xyz"),
        ("rest", "EMBEDDING_REST_MAX_BODY_MB", "big"),
        ("rest", "EMBEDDING_REST_TARGET_TLS", "maybe"),
        ("rest", "EMBEDDING_REST_LOG_LEVEL", "loud"),
        ("healthcheck", "EMBEDDING_PORT", "xyz"),
        ("healthcheck", "EMBEDDING_HEALTHCHECK_TIMEOUT", "soon"),
        ("healthcheck", "EMBEDDING_HEALTHCHECK_TLS", "maybe"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(capsys, command, variable, value):
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[command]({variable: value})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{variable}={value!r}" in err
    assert "invalid literal" not in err and "could not convert" not in err


def test_the_client_reads_target_and_api_key_only():
    args = _client_args({"EMBEDDING_TARGET": "h:9", "EMBEDDING_API_KEY": "k", "EMBEDDING_TIMEOUT": "x"})
    assert (args.target, args.api_key, args.timeout) == ("h:9", "k", 60.0)


@pytest.mark.parametrize("command", ["server", "rest", "healthcheck"])
def test_good_values_become_defaults(command):
    prefix = {"server": "EMBEDDING_", "rest": "EMBEDDING_REST_", "healthcheck": "EMBEDDING_HEALTHCHECK_"}
    flag = {"server": "port", "rest": "port", "healthcheck": "timeout"}[command]
    parsed = COMMANDS[command]({variable_name(prefix[command], flag): "4321"})
    assert getattr(parsed, flag) == 4321


def test_helper_types_lists_switches_and_choices():
    parser = argparse.ArgumentParser()
    parser.add_argument("--key", dest="keys", action="append", default=[])
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--json", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--level", choices=["a", "b"], default="a")
    parser.add_argument("--other-thing", default="x")
    env = {"P_KEY": " k1, ,k2 ", "P_TLS": "Yes", "P_JSON": "off", "P_LEVEL": "b", "P_OTHER_THING": "y"}
    apply_environment(parser, env, "P_", only=["keys", "tls", "json", "level"])
    args = parser.parse_args([])
    assert (args.keys, args.tls, args.json, args.level) == (["k1", "k2"], True, False, "b")
    assert args.other_thing == "x"  # not in ``only``
    assert parser.parse_args(["--level", "a"]).level == "a"  # the command line wins


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("ON", True), (" no ", False), ("", False)])
def test_boolean_words(raw, value):
    assert parse_boolean(raw) is value


def test_boolean_refuses_other_words():
    with pytest.raises(ValueError, match="expected one of"):
        parse_boolean("maybe")
