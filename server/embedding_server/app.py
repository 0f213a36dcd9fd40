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

import grpc
from grpc_health.v1 import health

from .auth import ApiKeys
from .compose import build_embedder, check_models
from .errors import StartupError
from .grpc_api.interceptors import AuthInterceptor, InFlight, ObservingInterceptor
from .grpc_api.server import NOT_SERVING, SERVING, build_server, set_health
from .grpc_api.servicer import EmbeddingServicer
from .grpc_api.state import Phase, ServingState
from .metrics import Metrics, MetricsHttpServer, metrics_route
from .ports import PortUnavailable, ensure_free, grpc_address
from .rest.inprocess import InProcessShim
from .settings import Settings
from .tls import TlsConfigError, TlsFiles, grpc_credentials, load_tls
from .tracing import Tracing, configure

log = logging.getLogger("embedding_server")

FLUSH_SECONDS = 1.0  # after the drain: time for the last replies to leave before the server stops
#: The drain ends only after this long without a new call, so calls sent the moment another returned
#: get UNAVAILABLE from the servicer instead of CANCELLED from a stopping gRPC server.
QUIET_SECONDS = 0.25


def api_keys(settings: Settings) -> ApiKeys:
    """--api-key, EMBEDDING_API_KEY and --api-key-file together; StartupError if the file is unreadable."""
    try:
        return ApiKeys.from_sources(settings.api_keys, settings.api_key_file)
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise StartupError(f"--api-key-file {settings.api_key_file}: cannot read it ({reason})") from None
    except ValueError as exc:
        raise StartupError(str(exc)) from None


def tls_files(settings: Settings) -> TlsFiles | None:
    try:
        return load_tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except TlsConfigError as exc:
        raise StartupError(str(exc)) from None


def check_ports(settings: Settings) -> None:
    """Every port this process will listen on, tried before anything binds or loads."""
    ports = [
        ("--port", settings.port),
        ("--rest-port", settings.rest_port),
        ("--metrics-port", settings.metrics_port),
    ]
    taken: dict[int, str] = {}
    for flag, port in ports:
        if port and port in taken:
            raise StartupError(f"{flag} {port}: the same port as {taken[port]}")
        taken[port] = flag
        try:
            ensure_free(settings.host, port, flag)
        except PortUnavailable as exc:
            raise StartupError(str(exc)) from None


class EmbeddingApp:
    """One server process: gRPC (and later the REST shim) around one Embedder."""

    def __init__(self, settings: Settings, tracing: Tracing | None = None) -> None:
        """``tracing``: given (tests: an in-memory exporter), else from --otlp-endpoint / OTEL_* (or off)."""
        self.settings = settings
        self.tracing = tracing if tracing is not None else configure(settings.otlp_endpoint)
        self.state = ServingState()
        self.health = health.aio.HealthServicer()
        self.servicer = EmbeddingServicer(
            self.state, stream_window=settings.stream_window, tracing=self.tracing
        )
        self.api_keys = api_keys(settings)
        self.tls = tls_files(settings)
        self.metrics = Metrics()
        self.in_flight = InFlight()
        self.metrics.watch_in_flight(lambda: self.in_flight.count)
        self.interceptors: list[grpc.aio.ServerInterceptor] = [
            ObservingInterceptor(self.in_flight, self.metrics),  # counts refused calls too
        ]
        if self.api_keys.enabled:  # the keys are fixed at start: without any, no layer to pass through
            self.interceptors.append(
                AuthInterceptor(self.api_keys, protect_reflection=settings.auth_reflection)
            )
        if self.tracing is not None:  # outermost: the call's span covers the others' work
            self.interceptors.insert(0, self.tracing.server_interceptor())
        self.server = build_server(
            self.servicer, self.health, settings.max_message_mb * 1024 * 1024, interceptors=self.interceptors
        )
        self.metrics_server: MetricsHttpServer | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self.rest: InProcessShim | None = None

    async def start(self) -> None:
        """Bind, then load and warm up; raises StartupError with a one-line reason."""
        await set_health(self.health, NOT_SERVING)
        served = check_models(self.settings)
        check_ports(self.settings)
        address = grpc_address(self.settings.host, self.settings.port)
        try:
            if self.tls is not None:
                self.bound_port = self.server.add_secure_port(address, grpc_credentials(self.tls))
            else:
                self.bound_port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise StartupError(f"--port: cannot listen on {address} (in use or not allowed)") from exc
        if self.settings.rest_port:
            self.rest = InProcessShim(
                self.settings,
                self.servicer,
                self.in_flight,
                self.api_keys,
                self.tls,
                routes=[metrics_route(self.metrics, self.api_keys)],
                observe=self.metrics.observe_call,
                tracing=self.tracing,
            )
        await self.server.start()
        if self.rest:
            await self.rest.start()
        if self.settings.metrics_port:
            try:
                self.metrics_server = MetricsHttpServer(
                    self.metrics, self.settings.host, self.settings.metrics_port, self.tls
                )
            except OSError as exc:
                raise StartupError(
                    f"--metrics-port {self.settings.metrics_port}: cannot listen ({exc.strerror or exc})"
                ) from None
        log.info("gRPC listening on %s%s; loading models", address, " (TLS)" if self.tls else "")
        embedder = await asyncio.to_thread(
            build_embedder, self.settings, self.metrics, served=served, on_failure=self._engine_failed
        )
        await embedder.start()
        self.metrics.watch_queues(embedder)
        self.state.embedder = embedder
        self.state.phase = Phase.SERVING
        self.metrics.serving.set(1)
        await set_health(self.health, SERVING)
        log.info(
            "serving %s (default %s; event loop %s)",
            ", ".join(d.name for d in embedder.descriptions()),
            embedder.default_model,
            type(asyncio.get_running_loop()).__module__.split(".")[0],
        )

    def _engine_failed(self, error: BaseException) -> None:
        """A batcher's dispatcher died: stop taking traffic (its waiting work already failed)."""
        log.error("engine failure: health turns NOT_SERVING (%s: %s)", type(error).__name__, error)
        self.metrics.serving.set(0)
        asyncio.get_running_loop().create_task(set_health(self.health, NOT_SERVING))

    def request_stop(self) -> None:
        """First signal: drain. A second one: stop waiting for work in flight."""
        if self._stop.is_set():
            log.warning("second stop signal: cancelling work in flight now")
            self._force.set()
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Drain: NOT_SERVING at once, refuse new work, finish what runs within the grace period.

        grpc.aio's ``server.stop(grace)`` would refuse every new call at once,
        health checks included, so the server stays fully up while it drains:
        health answers NOT_SERVING, the servicer answers UNAVAILABLE to new
        work (phase DRAINING), and the interceptor counts the calls still in
        flight. Only when none is left and none has started for
        ``QUIET_SECONDS`` (or the grace period is over) does the gRPC server
        stop, so every call that reached it ends OK or UNAVAILABLE, never
        CANCELLED; the short grace there flushes the last replies.
        """
        self.state.phase = Phase.DRAINING
        self.metrics.serving.set(0)
        await self.health.enter_graceful_shutdown()
        embedder = self.state.embedder
        drained = asyncio.ensure_future(
            self.in_flight.wait_settled(QUIET_SECONDS, self.settings.grace_period)
        )
        forced = asyncio.ensure_future(self._force.wait())
        await asyncio.wait({drained, forced}, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if not (drained.done() and drained.result()):
            drained.cancel()
            log.warning("grace period over: cancelling %d calls still in flight", self.in_flight.count)
        await self.server.stop(grace=FLUSH_SECONDS)
        if self.rest:
            await self.rest.stop()
        if embedder:
            await embedder.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.close_tracing()

    def close_tracing(self) -> None:
        """Export the spans still buffered (for at most tracing.SHUTDOWN_SECONDS) and stop the exporter."""
        if self.tracing is not None:
            self.tracing.shutdown()


async def serve(settings: Settings) -> int:
    app = EmbeddingApp(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, app.request_stop)
    try:
        await app.start()
    except StartupError:
        await app.server.stop(grace=None)
        if app.rest:
            await app.rest.stop()
        if app.metrics_server is not None:
            app.metrics_server.close()
        app.close_tracing()
        raise
    await app.wait()
    log.info("shutting down: draining work in flight (grace %.0fs)", settings.grace_period)
    await app.shutdown()
    log.info("stopped")
    return 0
