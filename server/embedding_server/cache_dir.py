"""The on-disk cache (``--cache-dir``): where it is, how files get into it, how entries are keyed.

Its own module, below ``models``, ``quantize`` and ``download``, because all three write
into the cache (the built MiniLM graph, int8 copies, hub snapshots) and none should import
another's builder to find it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def file_digest(path: Path, length: int = 16) -> str:
    """sha256 of a file (streamed), shortened: the cache key of anything built from it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/embedding-service, or ~/.cache/embedding-service."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedding-service"


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so concurrent starts never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def writable_cache(cache_dir: Path | None, subdir: str) -> Path:
    """``cache_dir/subdir`` if it can be written, else a fresh temporary directory (read-only installs)."""
    directory = (cache_dir or default_cache_dir()) / subdir
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return directory
    except OSError:
        return Path(tempfile.mkdtemp(prefix=f"embedding-service-{subdir.replace('/', '-')}-"))
