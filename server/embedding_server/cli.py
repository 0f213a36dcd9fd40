"""``embedding-server``: parse settings, configure logging, serve."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

# Before gRPC is imported: this process never forks a child that uses gRPC, and gRPC's fork
# handlers print a line of their own ("skipping fork() handlers") whenever a library forks
# while the server's threads are in gRPC (OpenVINO's Core does, once, at first use).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from .app import serve
from .errors import StartupError
from .logging_setup import configure
from .settings import parse_settings


def loop_runner(choice: str) -> Callable[[Coroutine[Any, Any, int]], int]:
    """What runs the server's coroutine for ``--event-loop``: ``uvloop.run`` or ``asyncio.run``.

    uvloop runs the loop's own work (callbacks, futures, the self-pipe wake-ups
    of thread hops) in C: bench/serving_path.py measured 10-25% less server CPU
    per call. ``auto`` takes it where it is installed (every Linux install of
    this distribution); ``uvloop`` insists on it.
    """
    if choice == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise StartupError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
        return asyncio.run
    return uvloop.run


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure(settings.log_level, json_lines=settings.log_json)
    try:
        return loop_runner(settings.event_loop)(serve(settings))
    except StartupError as exc:
        print(f"embedding-server: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
