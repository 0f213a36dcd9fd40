"""``--help`` as an operator reads it: every default shown, no source markup.

The commands run as installed (``.venv/bin/embedding-server --help``), so the test sees exactly the
text a terminal shows; the parser is consulted only to know which flags have a default.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
from embedding_server.settings import build_parser, shown_default

BIN = Path(sys.executable).parent


def help_text(command: str) -> str:
    result = subprocess.run([str(BIN / command), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def option_helps(text: str) -> dict[str, str]:
    """``--flag`` → its help paragraph (whitespace joined), from argparse's options listing."""
    options = text.split("\noptions:\n", 1)[1]
    entries: dict[str, list[str]] = {}
    flag = None
    for line in options.splitlines():
        head = re.match(r"^  (-{1,2}[\w-]+)", line)
        if head:
            flag = head.group(1)
            entries[flag] = [line]
        elif flag is not None and line.startswith("    "):
            entries[flag].append(line)
    return {flag: " ".join(" ".join(lines).split()) for flag, lines in entries.items()}


@pytest.fixture(scope="module")
def server_helps() -> dict[str, str]:
    return option_helps(help_text("embedding-server"))


def flags_with_defaults(parser: argparse.ArgumentParser) -> dict[str, object]:
    return {
        action.option_strings[0]: action.default
        for action in parser._actions
        if action.option_strings
        and action.default not in (None, argparse.SUPPRESS, [])
        and action.dest != "help"
    }


def test_option_parser_reads_every_entry():
    sample = (
        "usage: x\n\noptions:\n  -h, --help  show\n  --port PORT  the port\n                (default: 1)\n"
    )
    assert option_helps(sample) == {"-h": "-h, --help show", "--port": "--port PORT the port (default: 1)"}


def test_server_help_shows_every_default(server_helps):
    helps = server_helps
    with_defaults = flags_with_defaults(build_parser())
    assert {"--max-batch-tokens", "--max-queue-requests", "--stream-window", "--grace-period"} <= set(
        with_defaults
    )
    missing = {flag: helps.get(flag) for flag in with_defaults if "default" not in helps.get(flag, "")}
    assert not missing, f"flags whose --help does not show the default: {missing}"


@pytest.mark.parametrize(
    ("flag", "shown"),
    [
        ("--max-batch-tokens", "(default: 16384)"),
        ("--max-batch-size", "(default: 128)"),
        ("--max-batch-wait-ms", "(default: 0)"),
        ("--max-queue-requests", "(default: 1024)"),
        ("--max-queue-tokens", "(default: 4000000)"),
        ("--stream-window", "(default: 32)"),
        ("--grace-period", "(default: 30)"),
        ("--max-message-mb", "(default: 64)"),
        ("--log-json", "(default: off)"),
    ],
)
def test_the_flags_that_had_none_show_their_value(server_helps, flag, shown):
    assert shown in server_helps[flag]


def test_shown_default_is_what_an_operator_types():
    assert [shown_default(v) for v in (64.0, 0.5, True, False, "info", "50%")] == [
        "64",
        "0.5",
        "on",
        "off",
        "info",
        "50%%",  # argparse %-formats help strings
    ]


def test_download_help_is_plain_text():
    text = help_text("embedding-download")
    assert "``" not in text and ":class:" not in text and "`" not in text
    assert text.startswith("usage: embedding-download")
    assert "embedding-download jina-v3 models/jina-v3" in text  # the example, indented as printed
    assert "pip install" in text  # what the command needs besides the server
