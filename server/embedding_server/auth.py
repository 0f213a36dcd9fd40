"""API keys: bearer-token auth shared by the gRPC interceptor and the REST shim.

Keys come from ``--api-key`` (repeatable), ``EMBEDDING_API_KEY`` (comma
separated) and ``--api-key-file`` (one per line, ``#`` comments): several
keys at once let operators rotate one without downtime. Comparison is
constant-time over SHA-256 digests (equal lengths, so not even a key's
length leaks), every key is compared, and keys never appear in logs, reprs
or error messages.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

BEARER = "bearer "


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class ApiKeys:
    """The accepted keys; empty means auth is off."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(key) for key in keys if key]

    @classmethod
    def from_sources(cls, keys: Iterable[str], key_file: str | None) -> ApiKeys:
        """Keys from flags/environment plus a file; OSError when the file cannot be read,
        ValueError when it holds no key (auth meant to be on must not silently be off)."""
        collected = [key.strip() for key in keys]
        if key_file:
            from_file = [
                line.strip()
                for line in Path(key_file).read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.strip().startswith("#")
            ]
            if not from_file:
                raise ValueError(f"--api-key-file {key_file}: holds no key (one key a line)")
            collected.extend(from_file)
        return cls(collected)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, authorization: str | bytes | None) -> bool:
        """Whether an ``authorization`` header/metadata value carries a valid bearer key."""
        if not self.enabled:
            return True
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        if not authorization or authorization[: len(BEARER)].lower() != BEARER:
            return False
        offered = _digest(authorization[len(BEARER) :].strip())
        # Compare against every key without stopping early: timing reveals nothing.
        matches = [hmac.compare_digest(offered, key) for key in self._digests]
        return any(matches)

    def __repr__(self) -> str:  # never print the keys themselves
        return f"ApiKeys({len(self._digests)} keys)"
