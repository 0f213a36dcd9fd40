"""Waiting for state instead of sleeping a fixed time: a test proceeds as soon as the engine got there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

LIMIT = 60.0  # far beyond any healthy wait on one busy core: reaching it means the state never came


async def until(predicate: Callable[[], bool], what: str = "condition", limit: float = LIMIT) -> None:
    """Return once ``predicate()`` holds (polled on the event loop); AssertionError after ``limit`` s."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def until_sync(predicate: Callable[[], bool], what: str = "condition", limit: float = LIMIT) -> None:
    """``until`` for threads outside an event loop."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)
