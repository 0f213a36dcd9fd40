"""--event-loop: uvloop by default where installed, the standard loop on request; both serve."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.cli import loop_runner
from embedding_server.errors import StartupError

from tests.support.server import RunningServer, start_server


def test_auto_and_uvloop_take_uvloop_and_asyncio_takes_the_standard_loop() -> None:
    assert loop_runner("auto") is uvloop.run
    assert loop_runner("uvloop") is uvloop.run
    assert loop_runner("asyncio") is asyncio.run


def test_without_uvloop_auto_falls_back_and_uvloop_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert loop_runner("auto") is asyncio.run
    with pytest.raises(StartupError, match="uvloop is not installed"):
        loop_runner("uvloop")


def test_the_default_server_runs_on_uvloop(default_server: RunningServer) -> None:
    assert default_server.logged("event loop uvloop")


def test_a_server_on_the_standard_loop_serves() -> None:
    server = start_server("--event-loop", "asyncio")
    try:
        assert server.logged("event loop asyncio")
        reply = server.stub().Embed(pb.EmbedRequest(inputs=["on the standard loop"]), timeout=30)
        assert len(reply.embeddings[0].dense.values) == 384
    finally:
        assert server.stop() == 0
