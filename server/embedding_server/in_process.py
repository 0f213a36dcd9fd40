"""The server's engine inside another process: Ray's in-process mode (``EmbedBatches(engine_args=...)``).

``embedding-client`` finds this class through the ``embedding_client.engines``
entry point this distribution declares, so the client never imports the
server. The engine is built by :func:`compose.build_embedder`, as the server's
is: the same models, aliases, thread plan, memory budget and batch limits from
the same flags; the budget counts what the engine adds to the host process, not
what the host held before. A request runs the server's path minus the wire: ``to_job`` →
``Embedder`` → ``to_response`` → the client's decoder. A refused request
raises the client's typed error (``EmbeddingError``, with its ``reason`` and
``field``), the same one a service call raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

from embedding_client.errors import from_status
from embedding_client.requests import EmbedOptions, batches
from embedding_client.results import Embeddings, decode_embeddings

from .compose import build_embedder
from .engine.memory import current_rss
from .errors import ServiceError
from .grpc_api.convert import to_job, to_response
from .grpc_api.status import to_rpc_status
from .settings import parse_settings

#: At most this many requests of one batch queued in the engine at a time.
IN_PROCESS_WINDOW = 32


class InProcessEngine:
    """The engine, driven by an event loop of its own.

    The loop runs only inside :meth:`run` (``run_until_complete``): Ray calls
    a map_batches actor from one thread, and the engine's batchers and session
    threads need a running loop only while there is work.
    """

    def __init__(self, engine_args: Sequence[str]) -> None:
        """``engine_args``: ``embedding-server`` flags (the environment is not read: a worker's is not
        the user's); a bad flag exits like the server does, a model that cannot load raises StartupError."""
        settings = parse_settings(list(engine_args), environ={})
        self.loop = asyncio.new_event_loop()
        # The host's own memory (a Ray worker's data, its libraries) is not the engine's to budget:
        # --memory-limit bounds what loading the models and running them adds.
        self.embedder = build_embedder(settings, host_bytes=current_rss())
        self.loop.run_until_complete(self.embedder.start())

    def run(self, options: EmbedOptions, items: list[Any], batch_size: int) -> Iterator[Embeddings]:
        """One result per request: ``batch_size`` texts each, or one document each for late chunking."""
        requests = [[item] for item in items] if options.late_chunking else list(batches(items, batch_size))
        return iter(self.loop.run_until_complete(self._embed_all(options, requests)))

    async def _embed_all(self, options: EmbedOptions, requests: list[list[Any]]) -> list[Embeddings]:
        slots = asyncio.Semaphore(IN_PROCESS_WINDOW)

        async def one(inputs: list[Any]) -> Embeddings:
            async with slots:
                return await self._embed(options, inputs)

        return list(await asyncio.gather(*(one(inputs) for inputs in requests)))

    async def _embed(self, options: EmbedOptions, inputs: list[Any]) -> Embeddings:
        texts = inputs[0] if options.late_chunking else inputs
        try:
            result = await self.embedder.embed(to_job(options.request(list(texts)), deadline=None))
        except ServiceError as exc:  # as a service call would raise it: the same status mapping
            raise from_status(to_rpc_status(exc)) from None
        return decode_embeddings(to_response("", result), len(texts), options.outputs)

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.run_until_complete(self.embedder.close())
            self.loop.close()
