"""``embedding-server``: parse settings, configure logging, serve."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

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
