"""Shared fixtures: the real default-model server, started once per test session, and the
fixtures several test modules use (each module-scoped: one per test module that asks, as when
each module imported its own copy).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.support.keyed import KEY
from tests.support.server import RunningServer, start_server

if TYPE_CHECKING:
    from embedding_server.models.loaded import LoadedModel


#: Every server a test starts runs on ONNX Runtime (at the file's precision) unless the test names
#: an engine (a flag beats the environment): the tests compare with numpy at fp32 tolerances, and
#: --engine auto would pick bf16 on one machine and fp32 on another. tests/test_engines.py runs
#: OpenVINO at every precision and the auto choice; the family tests run both engines at fp32.
os.environ.setdefault("EMBEDDING_ENGINE", "onnxruntime")


@pytest.fixture(scope="session")
def default_server() -> Iterator[RunningServer]:
    """embedding-server on the built-in all-minilm-l6-v2, gRPC and REST on loopback."""
    server = start_server(rest=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def builtin() -> LoadedModel:
    """The built-in model loaded in this process (one session, one thread), once per test module.

    The in-process engine tests wrap its sessions with tests.support.engine.make_embedder.
    """
    # Imported here: every test run loads this conftest, and most modules never load a model.
    from embedding_server.models.loader import BUILTIN_MODEL, ModelSpec, load

    return load(ModelSpec(BUILTIN_MODEL, None), sessions=1, threads=1)


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[RunningServer]:
    """A default-model server that wants tests.support.keyed.KEY, once per test module.

    tests/test_ops_auth.py defines its own keyed_server (other keys), which wins there.
    """
    server = start_server("--api-key", KEY)
    yield server
    server.stop()
