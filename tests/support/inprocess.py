"""A real grpc.aio server on a loopback port, inside the test's event loop.

Used where a test must look inside while it talks over the wire (how many
requests the batcher admitted, what the session ran). The wire, the servicer,
the batcher and ONNX Runtime are all real.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from embedding_client.proto import embedding_pb2_grpc
from embedding_server.engine.embedder import Embedder
from embedding_server.grpc_api.interceptors import InFlight, ObservingInterceptor
from embedding_server.grpc_api.server import SERVING, build_server, set_health
from embedding_server.grpc_api.servicer import DEFAULT_STREAM_WINDOW, EmbeddingServicer
from embedding_server.grpc_api.state import Phase, ServingState
from grpc_health.v1 import health


@dataclass
class InProcessServer:
    embedder: Embedder
    state: ServingState
    channel: grpc.aio.Channel
    servicer: EmbeddingServicer
    target: str = ""

    @property
    def stub(self) -> embedding_pb2_grpc.EmbeddingServiceStub:
        return embedding_pb2_grpc.EmbeddingServiceStub(self.channel)


@asynccontextmanager
async def serve_in_process(
    embedder: Embedder,
    stream_window: int = DEFAULT_STREAM_WINDOW,
    observed: bool = False,
) -> AsyncIterator[InProcessServer]:
    """``observed``: with the production ObservingInterceptor (request ids, trailers). The servicer
    is there for the in-process REST shim's backend (rest/local.py)."""
    state = ServingState()
    health_servicer = health.aio.HealthServicer()
    interceptors = [ObservingInterceptor(InFlight())] if observed else []
    servicer = EmbeddingServicer(state, stream_window=stream_window)
    server = build_server(servicer, health_servicer, 64 << 20, interceptors)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for batcher in embedder.batchers.values():
        batcher.start()
    state.embedder, state.phase = embedder, Phase.SERVING
    await set_health(health_servicer, SERVING)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield InProcessServer(embedder, state, channel, servicer, f"127.0.0.1:{port}")
    finally:
        await channel.close()
        await server.stop(grace=None)
        await embedder.close()
