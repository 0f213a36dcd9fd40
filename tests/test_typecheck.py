"""mypy strict on server/ and client/: CI runs ``make test``, so a type error fails CI here.

The configuration is ``[tool.mypy]`` in pyproject.toml (the generated ``embedding_client.proto``
is excluded from strictness); the cache lives in ``.mypy_cache/`` so a rerun checks only what changed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_ERROR = re.compile(r"^(?P<path>[^:\s]+\.py):\d+: error: ")


def test_mypy_strict_is_clean() -> None:
    """``mypy`` (strict, configured in pyproject.toml) finds no error in server/ or client/."""
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--no-pretty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [(m["path"], m.string) for m in map(_ERROR.match, proc.stdout.splitlines()) if m]
    # Exit status 1 means "type errors found"; anything else (2: bad config, crash) is a failure as such.
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    assert proc.returncode == 0 or errors, proc.stdout + proc.stderr
    assert not errors, f"{len(errors)} mypy errors:\n" + "\n".join(line for _, line in errors)


_IGNORE = re.compile(r"#\s*type:\s*ignore(\[[\w,\s-]+\])?(?P<after>.*)$")


def test_every_type_ignore_says_why() -> None:
    """A ``# type: ignore[code]`` carries a reason: a comment after it or on the line above."""
    unexplained = []
    for package in ("server/embedding_server", "client/embedding_client"):
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith("client/embedding_client/proto/"):
                continue
            lines = path.read_text().splitlines()
            for number, line in enumerate(lines):
                match = _IGNORE.search(line)
                if match is None:
                    continue
                reason_after = "#" in match["after"]
                reason_above = number > 0 and lines[number - 1].strip().startswith("#")
                if not (reason_after or reason_above):
                    unexplained.append(f"{relative}:{number + 1}: {line.strip()}")
    assert not unexplained, "type: ignore without a reason:\n" + "\n".join(unexplained)
