"""The server process: bind, load and warm the models, serve, drain on SIGTERM.

Order matters for operators. The ports are bound first, so health checks get
an answer (NOT_SERVING) while models load. Health turns SERVING only after
every model has run once per task. On SIGTERM/SIGINT health turns
NOT_SERVING at once (and keeps answering), new work gets UNAVAILABLE, work in
flight gets the grace period, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from grpc_health.v1 import health

from .engine.batcher import BatchSettings
from .engine.embedder import Embedder, EngineSettings
from .errors import ModelLoadError
from .grpc_api.server import NOT_SERVING, SERVING, build_server, set_health
from .grpc_api.servicer import EmbeddingServicer
from .grpc_api.state import Phase, ServingState
from .models.loader import BUILTIN_MODEL, LoadedModel, ModelSpec, load
from .settings import Settings, threads_per_session

log = logging.getLogger("embedding_server")


class StartupError(Exception):
    """A configuration problem found at start: one line for the operator, exit 1."""


def engine_settings(settings: Settings) -> EngineSettings:
    return EngineSettings(
        max_inputs=settings.max_inputs,
        batch=BatchSettings(
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_batch_wait_ms,
            max_queue_requests=settings.max_queue_requests,
            max_queue_tokens=settings.max_queue_tokens,
        ),
    )


def load_models(settings: Settings) -> list[LoadedModel]:
    specs = [ModelSpec.parse(text) for text in settings.models] or [ModelSpec(BUILTIN_MODEL, None)]
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise StartupError(f"--model: name {duplicates[0]!r} is used twice")
    threads = threads_per_session(settings)
    loaded = []
    for spec in specs:
        started = time.monotonic()
        loaded.append(load(spec, sessions=settings.sessions, threads=threads))
        log.info(
            "loaded model %s (%s) in %.1fs", spec.name, loaded[-1].model.family, time.monotonic() - started
        )
    return loaded


class EmbeddingApp:
    """One server process: gRPC (and later the REST shim) around one Embedder."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = ServingState()
        self.health = health.aio.HealthServicer()
        self.servicer = EmbeddingServicer(self.state, stream_window=settings.stream_window)
        self.server = build_server(self.servicer, self.health, settings.max_message_mb * 1024 * 1024)
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Bind, then load and warm up; raises StartupError with a one-line reason."""
        await set_health(self.health, NOT_SERVING)
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            self.bound_port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise StartupError(f"--port: cannot listen on {address} (in use or not allowed)") from exc
        await self.server.start()
        log.info("gRPC listening on %s; loading models", address)
        try:
            models = await asyncio.to_thread(load_models, self.settings)
        except (ModelLoadError, ValueError) as exc:
            raise StartupError(str(exc)) from exc
        embedder = Embedder(models, engine_settings(self.settings))
        await embedder.start()
        self.state.embedder = embedder
        self.state.phase = Phase.SERVING
        await set_health(self.health, SERVING)
        log.info(
            "serving %s (default %s)",
            ", ".join(d.name for d in embedder.descriptions()),
            embedder.default_model,
        )

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Drain: NOT_SERVING at once, refuse new work, finish what runs within the grace period."""
        self.state.phase = Phase.DRAINING
        await self.health.enter_graceful_shutdown()
        embedder = self.state.embedder
        deadline = time.monotonic() + self.settings.grace_period
        while embedder and any(b.busy for b in embedder.batchers.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.server.stop(grace=max(0.0, min(1.0, deadline - time.monotonic())))
        if embedder:
            await embedder.close()


async def serve(settings: Settings) -> int:
    app = EmbeddingApp(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, app.request_stop)
    try:
        await app.start()
    except StartupError:
        await app.server.stop(grace=None)
        raise
    await app.wait()
    log.info("shutting down: draining work in flight (grace %.0fs)", settings.grace_period)
    await app.shutdown()
    log.info("stopped")
    return 0
