"""Shared fixtures: the real default-model server, started once per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.server import RunningServer, start_server


@pytest.fixture(scope="session")
def default_server() -> Iterator[RunningServer]:
    """embedding-server on the built-in all-minilm-l6-v2, gRPC and REST on loopback."""
    server = start_server(rest=True)
    yield server
    server.stop()
