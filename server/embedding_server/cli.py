"""``embedding-server``: parse settings, configure logging, serve."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from .app import StartupError, serve
from .settings import parse_settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(serve(settings))
    except StartupError as exc:
        print(f"embedding-server: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
