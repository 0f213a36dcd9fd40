"""Settings: every flag, its EMBEDDING_<FLAG> variable, precedence, and bad values (exit 2).

parse_settings gets an explicit environ, so the tests never depend on (or touch)
the real process environment; one test runs the real CLI to see the wiring.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess

import pytest
from embedding_server.compose import engine_settings
from embedding_server.cpus import ThreadBudget
from embedding_server.engine.tuning import BatchSettings, EngineSettings, knob_fields
from embedding_server.grpc_api.servicer import DEFAULT_STREAM_WINDOW
from embedding_server.rest.standalone import parse_args
from embedding_server.settings import (
    DEFAULTS,
    ENV_PREFIX,
    Settings,
    build_parser,
    parse_settings,
    shown_default,
)

from tests.support.server import server_command

#: Flags that only make sense with others (cross-checked by parse_settings).
COMPANIONS = {
    "tls_key": ["--tls-cert", "cert.pem"],
    "tls_cert": ["--tls-key", "key.pem"],
    "tls_client_ca": ["--tls-cert", "cert.pem", "--tls-key", "key.pem"],
}


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def option_actions() -> list[argparse.Action]:
    return [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]


def parse_error(capsys, argv: list[str], environ: dict[str, str] | None = None) -> str:
    """Parse, expect argparse's exit status 2, and return what it wrote to stderr."""
    with pytest.raises(SystemExit) as info:
        parse_settings(argv, environ or {})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err
    return err


# --- defaults and flags ------------------------------------------------------------------


def test_defaults_match_the_contract(monkeypatch):
    monkeypatch.setenv("EMBEDDING_PORT", "1")  # an explicit environ means os.environ is not read
    settings = parse_settings([], {})
    assert settings.host == "0.0.0.0"
    assert settings.port == 50051
    assert settings.rest_port == 8000
    assert settings.models == []
    assert settings.tuning.max_inputs == 2048
    assert settings.api_keys == []


def test_parser_defaults_agree_with_the_dataclass():
    parsed = parse_settings([], {})
    assert parsed == Settings()


def test_the_engine_gets_its_own_defaults_from_default_flags():
    """The engine's defaults are the source: flags left alone hand the engine exactly those."""
    threads = ThreadBudget.plan(2)
    assert engine_settings(parse_settings([], {}), threads) == EngineSettings(threads=threads)
    assert parse_settings([], {}).stream_window == DEFAULT_STREAM_WINDOW


def _knobs() -> list[tuple[str, str]]:
    """(settings class name, field name) of every knob engine/tuning.py declares."""
    return [(cls.__name__, f.name) for cls in (EngineSettings, BatchSettings) for f in knob_fields(cls)]


def _knob_value(settings: Settings, owner: str, name: str) -> object:
    engine = engine_settings(settings, ThreadBudget.plan(2))
    return getattr(engine.batch if owner == "BatchSettings" else engine, name)


@pytest.mark.parametrize(("owner", "name"), _knobs())
def test_every_engine_knob_is_a_flag_and_a_variable_that_reach_the_engine(owner, name):
    """Declared once (engine/tuning.py): its flag, variable, help and plan field follow from that."""
    default = _knob_value(parse_settings([], {}), owner, name)
    value = type(default)(default + 3)  # a value no default has
    flag = "--" + name.replace("_", "-")
    assert _knob_value(parse_settings([flag, str(value)], {}), owner, name) == value
    help_text = " ".join(build_parser().format_help().split())
    assert f"{flag} " in help_text and f"(default: {shown_default(default)})" in help_text


def test_knobs_are_found():
    """The parametrization above is not empty: it covers the batch limits and the request limits."""
    names = {name for _, name in _knobs()}
    assert {"max_batch_tokens", "max_batch_wait_ms", "max_queue_tokens", "max_inputs"} <= names


def test_rest_flags_share_the_server_defaults():
    args = parse_args(["--target", "x:1"], {})
    assert (args.host, args.port, args.max_body_mb, args.auto_truncate, args.log_level) == (
        DEFAULTS.host,
        DEFAULTS.rest_port,
        DEFAULTS.rest_max_body_mb,
        DEFAULTS.auto_truncate,
        DEFAULTS.log_level,
    )


def test_flags():
    settings = parse_settings(
        [
            "--host", "127.0.0.1",
            "--port", "6000",
            "--rest-port", "0",
            "--model", "all-minilm-l6-v2",
            "--model", "jina=/models/jina",
            "--max-inputs", "16",
            "--max-batch-wait-ms", "2.5",
            "--api-key", "k1",
            "--api-key", "k2",
            "--log-level", "debug",
            "--log-json",
        ],
        {},
    )  # fmt: skip
    assert settings.host == "127.0.0.1"
    assert settings.port == 6000
    assert settings.rest_port == 0
    assert settings.models == ["all-minilm-l6-v2", "jina=/models/jina"]
    assert settings.tuning.max_inputs == 16
    assert settings.tuning.batch.max_batch_wait_ms == 2.5
    assert settings.api_keys == ["k1", "k2"]
    assert settings.log_level == "debug"
    assert settings.log_json is True
    assert parse_settings(["--no-log-json"], {"EMBEDDING_LOG_JSON": "true"}).log_json is False


def test_api_keys_are_not_in_the_repr():
    settings = parse_settings(["--api-key", "s3cret-value"], {})
    assert "s3cret-value" not in repr(settings)


# --- environment variables ------------------------------------------------------------------


def test_environment_variables():
    settings = parse_settings(
        [],
        {
            "EMBEDDING_HOST": "::1",
            "EMBEDDING_PORT": "7000",
            "EMBEDDING_REST_PORT": "0",
            "EMBEDDING_MODEL": "a=/m/a, b=/m/b",
            "EMBEDDING_MAX_INPUTS": "3",
            "EMBEDDING_API_KEY": "k1,k2",
            "EMBEDDING_LOG_JSON": "true",
            "EMBEDDING_GRACE_PERIOD": "1.5",
            "UNRELATED": "x",
        },
    )
    assert settings.host == "::1"
    assert settings.port == 7000
    assert settings.rest_port == 0
    assert settings.models == ["a=/m/a", "b=/m/b"]
    assert settings.tuning.max_inputs == 3
    assert settings.api_keys == ["k1", "k2"]
    assert settings.log_json is True
    assert settings.grace_period == 1.5


@pytest.mark.parametrize(
    ("raw", "value"), [("1", True), ("yes", True), ("ON", True), ("0", False), ("false", False)]
)
def test_boolean_environment_values(raw, value):
    assert parse_settings([], {"EMBEDDING_LOG_JSON": raw}).log_json is value


def example_value(action: argparse.Action) -> tuple[str, object]:
    """A raw environment value for the flag, and what parse_settings should make of it."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return "true", not action.default
    if isinstance(action, argparse._AppendAction):
        return "one,two", ["one", "two"]
    if action.choices:
        choice = next(c for c in action.choices if c != action.default)
        return str(choice), choice
    if action.type is None:
        return "some-value", "some-value"
    if action.dest == "fidelity_floor":  # a cosine: at most 1
        return "0.999", 0.999
    kind = float if isinstance(action.default, float) else int
    return "7", kind(7)


@pytest.mark.parametrize("action", option_actions(), ids=lambda a: a.option_strings[0])
def test_every_flag_has_an_environment_variable(action):
    raw, expected = example_value(action)
    assert expected != action.default, "the example must differ from the default"
    companions = COMPANIONS.get(action.dest, [])
    settings = parse_settings(companions, {env_name(action.option_strings[0]): raw})
    assert value_of(settings, action.dest) == expected


def value_of(settings: Settings, name: str) -> object:
    """A setting by its flag's name: on ``Settings``, or an engine knob in ``settings.tuning``."""
    for holder in (settings, settings.tuning, settings.tuning.batch):
        if hasattr(holder, name):
            return getattr(holder, name)
    raise AttributeError(name)


def test_every_setting_has_a_flag():
    """Every ``Settings`` field, and every engine knob in ``Settings.tuning``, is a flag; no flag is
    left over."""
    dests = {a.dest for a in option_actions()}
    fields = {f.name for f in dataclasses.fields(Settings) if f.name != "tuning"}
    assert dests == fields | {name for _, name in _knobs()}


# --- precedence ------------------------------------------------------------------------------


def test_command_line_beats_environment():
    environ = {"EMBEDDING_PORT": "1111", "EMBEDDING_HOST": "10.0.0.1", "EMBEDDING_LOG_LEVEL": "error"}
    settings = parse_settings(["--port", "2222", "--log-level", "warning"], environ)
    assert settings.port == 2222
    assert settings.log_level == "warning"
    assert settings.host == "10.0.0.1"  # not on the command line: the environment's


def test_command_line_replaces_a_repeatable_flag_from_the_environment():
    environ = {"EMBEDDING_MODEL": "env=/from/env", "EMBEDDING_API_KEY": "env-key"}
    settings = parse_settings(["--model", "cli=/from/cli", "--api-key", "cli-key"], environ)
    assert settings.models == ["cli=/from/cli"]
    assert settings.api_keys == ["cli-key"]
    assert parse_settings([], environ).models == ["env=/from/env"]


# --- bad values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--port", "70000"], "--port"),
        (["--port", "abc"], "--port"),
        (["--rest-port", "-1"], "--rest-port"),
        (["--max-inputs", "0"], "--max-inputs"),
        (["--max-inputs", "-5"], "--max-inputs"),
        (["--sessions", "0"], "--sessions"),
        (["--stream-window", "0"], "--stream-window"),
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--max-batch-tokens", "0"], "--max-batch-tokens"),
        (["--max-message-mb", "0"], "--max-message-mb"),
        (["--max-queue-requests", "0"], "--max-queue-requests"),
        (["--grace-period", "soon"], "--grace-period"),
        (["--log-level", "loud"], "--log-level"),
        (["--tls-key", "key.pem"], "--tls-cert"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_flag_values_exit_2_naming_the_flag(capsys, argv, needle):
    assert needle in parse_error(capsys, argv)


@pytest.mark.parametrize(
    ("environ", "needle"),
    [
        ({"EMBEDDING_PORT": "abc"}, "EMBEDDING_PORT"),
        ({"EMBEDDING_PORT": "99999"}, "EMBEDDING_PORT"),
        ({"EMBEDDING_MAX_INPUTS": "-1"}, "EMBEDDING_MAX_INPUTS"),
        ({"EMBEDDING_LOG_LEVEL": "loud"}, "EMBEDDING_LOG_LEVEL"),
        ({"EMBEDDING_LOG_JSON": "maybe"}, "EMBEDDING_LOG_JSON"),
        ({"EMBEDDING_GRACE_PERIOD": "soon"}, "EMBEDDING_GRACE_PERIOD"),
    ],
)
def test_bad_environment_values_exit_2_naming_the_variable(capsys, environ, needle):
    err = parse_error(capsys, [], environ)
    assert needle in err
    assert repr(next(iter(environ.values()))) in err  # and shows the offending value


def test_the_real_cli_rejects_a_bad_value_before_loading_anything():
    result = subprocess.run(
        server_command(["--port", "not-a-port"]), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "--port" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_real_cli_reads_the_environment():
    env = {"EMBEDDING_MAX_INPUTS": "0", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(server_command([]), capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "EMBEDDING_MAX_INPUTS" in result.stderr or "--max-inputs" in result.stderr


def test_help_mentions_environment_variables():
    result = subprocess.run(server_command(["--help"]), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "EMBEDDING_" in result.stdout
