"""API keys: bearer-token auth shared by the gRPC interceptor and the REST shim.

Keys come from ``--api-key`` (repeatable), ``EMBEDDING_API_KEY`` (comma
separated) and ``--api-key-file`` (one per line, ``#`` comments). Comparison is
constant-time, and keys never appear in logs or error messages.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

BEARER = "bearer "


class ApiKeys:
    """The accepted keys; empty means auth is off."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [key.encode() for key in keys if key]

    @classmethod
    def from_sources(cls, keys: Iterable[str], key_file: str | None) -> ApiKeys:
        collected = [key.strip() for key in keys]
        if key_file:
            for line in Path(key_file).read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    collected.append(line)
        return cls(collected)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def accepts(self, authorization: str | None) -> bool:
        """Whether an ``authorization`` header/metadata value carries a valid bearer key."""
        if not self.enabled:
            return True
        if not authorization or not authorization[: len(BEARER)].lower() == BEARER:
            return False
        offered = authorization[len(BEARER) :].strip().encode()
        # Compare against every key without stopping early: timing reveals nothing.
        matches = [hmac.compare_digest(offered, key) for key in self._keys]
        return any(matches)

    def __repr__(self) -> str:  # never print the keys themselves
        return f"ApiKeys({len(self._keys)} keys)"
