"""``embedding-server``: parse settings, configure logging, serve."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

# Before gRPC is imported: this process never forks a child that uses gRPC, and gRPC's fork
# handlers print a line of their own ("skipping fork() handlers") whenever a library forks
# while the server's threads are in gRPC (OpenVINO's Core does, once, at first use).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from .app import serve
from .errors import StartupError
from .logging_setup import configure
from .settings import parse_settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure(settings.log_level, json_lines=settings.log_json)
    try:
        return asyncio.run(serve(settings))
    except StartupError as exc:
        print(f"embedding-server: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
