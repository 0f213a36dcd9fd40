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
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health

from .auth import ApiKeys
from .cpus import ThreadBudget, available_cpus
from .download import fetched
from .engine.batcher import BatchSettings
from .engine.embedder import Embedder, EngineSettings
from .engine.memory import (
    DEFAULT_MEMORY_LIMIT,
    MIB,
    MemoryBudget,
    ModelShape,
    cgroup_memory_limit,
    current_rss,
    model_shares,
    release_freed_memory,
)
from .errors import ModelLoadError, StartupError
from .grpc_api.interceptors import AuthInterceptor, InFlight, ObservingInterceptor
from .grpc_api.server import NOT_SERVING, SERVING, build_server, set_health
from .grpc_api.servicer import EmbeddingServicer
from .grpc_api.state import Phase, ServingState
from .metrics import Metrics, MetricsHttpServer, metrics_route
from .models.files import locate
from .models.loaded import LoadedModel
from .models.loader import BUILTIN_MODEL, ModelSpec, load, model_files
from .ports import PortUnavailable, ensure_free, grpc_address
from .rest.inprocess import InProcessShim
from .selection.measure import Plan, choose_candidate
from .settings import Settings
from .tls import TlsConfigError, TlsFiles, grpc_credentials, load_tls
from .tracing import Tracing, configure

log = logging.getLogger("embedding_server")

FLUSH_SECONDS = 1.0  # after the drain: time for the last replies to leave before the server stops
#: The drain ends only after this long without a new call, so calls sent the moment another returned
#: get UNAVAILABLE from the servicer instead of CANCELLED from a stopping gRPC server.
QUIET_SECONDS = 0.25


def thread_budget(settings: Settings) -> ThreadBudget:
    """Every thread count, from the CPUs this process may use and --sessions/--threads-per-session."""
    return ThreadBudget.plan(available_cpus(), settings.sessions, settings.threads_per_session)


def engine_settings(settings: Settings, threads: ThreadBudget | None = None) -> EngineSettings:
    """``threads``: the budget the models were loaded with (None: planned from ``settings``)."""
    return EngineSettings(
        threads=threads or thread_budget(settings),
        max_inputs=settings.max_inputs,
        batch=BatchSettings(
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_padding_waste=settings.max_padding_waste,
            max_wait_ms=settings.max_batch_wait_ms,
            max_queue_requests=settings.max_queue_requests,
            max_queue_tokens=settings.max_queue_tokens,
        ),
        late_chunking_overlap=settings.late_chunking_overlap,
        max_document_tokens=settings.max_document_tokens,
    )


#: Memory the warm-up and the first calls add to the process after loading (measured: ~40 MiB).
WARM_ALLOWANCE = 64 * MIB


def memory_limit(settings: Settings) -> int:
    """--memory-limit, else the container's limit, else DEFAULT_MEMORY_LIMIT."""
    return settings.memory_limit or cgroup_memory_limit() or DEFAULT_MEMORY_LIMIT


def batch_settings(settings: Settings, models: list[LoadedModel], baseline: int) -> dict[str, BatchSettings]:
    """Each model's batch limits from the memory budget; StartupError when the models alone exceed it."""
    limit = memory_limit(settings)
    base = engine_settings(settings).batch
    planned = {}
    sized: dict[str, tuple[ModelShape, int]] = {}  # shape, concurrent runs (bulk + query slots)
    for loaded in models:
        model = loaded.model
        shape = ModelShape.from_config(model.files.config("config.json"), model.description.dimensions)
        sized[model.name] = (shape, loaded.sessions.size * (2 if base.interactive_slot else 1))
    share = model_shares(sized)
    for loaded in models:
        model = loaded.model
        shape, runs = sized[model.name]
        budget = MemoryBudget.plan(shape, limit, baseline + WARM_ALLOWANCE, runs, share[model.name])
        if budget.run_bytes <= 0 or budget.longest_single() < 16:
            raise StartupError(
                f"--memory-limit {limit // MIB}MiB: the models alone take {baseline // MIB}MiB, "
                "too little is left to run them; raise the limit"
            )
        longest = budget.longest_single()
        if longest < model.description.max_tokens:
            log.warning(
                "model %s: within --memory-limit %dMiB a sequence may have at most %d tokens "
                "(the model takes %d); longer inputs get RESOURCE_EXHAUSTED",
                model.name,
                limit // MIB,
                longest,
                model.description.max_tokens,
            )
        planned[model.name] = replace(
            base, memory=budget, max_queue_tokens=max(1, min(base.max_queue_tokens, budget.queue_tokens))
        )
    return planned


@dataclass(frozen=True)
class ServedModels:
    """What ``--model`` and ``--model-alias`` ask for: the models to load, and the other names they get.

    Two ``--model`` of one source are one model (loaded once) under both names; the first
    name is the model's own (metrics, logs), the others are aliases like ``--model-alias``.
    """

    specs: list[ModelSpec]  # one per source, in --model order; the first is the default
    aliases: dict[str, str]  # another served name → the loaded model's name

    @classmethod
    def from_settings(cls, settings: Settings) -> ServedModels:
        """ValueError with one line naming the flag for a name used twice or an alias of nothing."""
        given = [ModelSpec.parse(text) for text in settings.models] or [ModelSpec(BUILTIN_MODEL, None)]
        specs: dict[str, ModelSpec] = {}  # by source
        names: dict[str, str] = {}  # every served name → the loaded model's name
        for spec in given:
            if spec.name in names:
                raise ValueError(f"--model: name {spec.name!r} is used twice")
            first = specs.setdefault(spec.source, spec)
            names[spec.name] = first.name
        for text in settings.model_aliases:
            alias, sep, target = text.partition("=")
            if not (sep and alias and target):
                raise ValueError(f"--model-alias {text!r}: expected ALIAS=NAME")
            if alias in names:
                raise ValueError(f"--model-alias {text}: {alias!r} is already a served name")
            if target not in names:
                raise ValueError(
                    f"--model-alias {text}: no model is served as {target!r} (served: {', '.join(names)})"
                )
            names[alias] = names[target]
        return cls(list(specs.values()), {name: model for name, model in names.items() if name != model})


def load_models(
    settings: Settings, metrics: Metrics | None = None, threads: ThreadBudget | None = None
) -> list[LoadedModel]:
    """Every --model on ``threads``' sessions (None: planned from ``settings``)."""
    threads = threads or thread_budget(settings)
    loaded = []
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else None
    for spec in ServedModels.from_settings(settings).specs:
        started = time.monotonic()
        spec = fetched(spec, cache_dir, label=f"--model {spec.name}={spec.hub}")
        files = model_files(spec, cache_dir)
        plan = Plan(threads.sessions, threads.threads_per_session, settings.session_layout)
        choice = choose_candidate(
            spec.name, files, settings.engine, settings.precision, settings.fidelity_floor, plan, cache_dir
        )
        if choice.candidate.precision == "int8":
            from .quantize.cache import int8_files  # onnx and the quantizer: only when asked for

            files = int8_files(spec.name, files, cache_dir)
        loaded.append(
            load(
                spec,
                sessions=threads.sessions,
                threads=threads.threads_per_session,
                layout=settings.session_layout,
                cache_dir=cache_dir,
                files=files,
                candidate=choice.candidate,
            )
        )
        loaded[-1].sessions.add_wide(threads.wide_threads)  # lone interactive runs use every core
        description = loaded[-1].model.description
        log.info(
            "loaded model %s (%s) on %s %s in %.1fs",
            spec.name,
            loaded[-1].model.family,
            description.engine,
            description.precision,
            time.monotonic() - started,
        )
        if metrics is not None:
            metrics.model_loaded(
                spec.name, time.monotonic() - started, description.engine, description.precision
            )
    return loaded


def log_plan(
    threads: ThreadBudget, limit: int, models: list[LoadedModel], planned: dict[str, BatchSettings]
) -> None:
    """One INFO line with the threads, memory and batch limits start-up chose (JSON: its ``plan``)."""
    per_model: dict[str, dict[str, object]] = {}
    for loaded in models:
        batch = planned[loaded.model.name]
        memory = batch.memory
        per_model[loaded.model.name] = {
            "sessions": loaded.sessions.size,
            "layout": loaded.sessions.layout,
            "threads_per_session": loaded.sessions.threads,
            "wide_threads": loaded.sessions.wide_threads,  # 0: no wide session (model too big, or 1 CPU)
            "max_batch_tokens": batch.max_batch_tokens,
            "max_batch_size": batch.max_batch_size,
            "max_padding_waste": batch.max_padding_waste,
            "max_batch_wait_ms": batch.max_wait_ms,
            "max_queue_requests": batch.max_queue_requests,
            "max_queue_tokens": batch.max_queue_tokens,
            "run_memory_mib": memory.run_bytes // MIB if memory else None,
            "longest_input_tokens": memory.longest_single() if memory else None,
        }
    plan = {"threads": threads.as_dict(), "memory_limit_mib": limit // MIB, "models": per_model}
    models_text = "; ".join(
        f"model {name}: {m['sessions']} sessions ({m['layout']}) x {m['threads_per_session']} "
        f"intra-op threads, wide session {m['wide_threads'] or 'none'}, "
        f"batches <= {m['max_batch_tokens']} tokens / {m['max_batch_size']} sequences, "
        f"{m['run_memory_mib']} MiB a run (inputs <= {m['longest_input_tokens']} tokens), "
        f"queue <= {m['max_queue_requests']} requests / {m['max_queue_tokens']} tokens"
        for name, m in per_model.items()
    )
    log.info(
        "start-up plan: %d CPUs; per model %d interactive + %d bulk run threads and %d pooling thread; "
        "tokenizer threads %d for queries + %d for batch work; memory limit %d MiB; %s",
        threads.cpus,
        threads.interactive_run_threads,
        threads.bulk_run_threads,
        threads.pool_threads,
        threads.tokenizer_threads,
        threads.tokenizer_threads,
        limit // MIB,
        models_text,
        extra={"plan": plan},
    )


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


def check_model_paths(settings: Settings) -> None:
    """The quick checks of every --model (names, directory, ONNX file, tokenizer) before any port opens.

    A hub model (``hf:``) is fetched after the ports are bound, so health answers meanwhile.
    """
    try:
        for spec in ServedModels.from_settings(settings).specs:
            if spec.path is not None:
                locate(spec.path)
    except (ModelLoadError, ValueError) as exc:
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


def load_failure(exc: Exception) -> str:
    """One line for a model that failed to load in a way the loader did not foresee."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"cannot load the model: {type(exc).__name__}: {first_line}"


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
            AuthInterceptor(self.api_keys, protect_reflection=settings.auth_reflection),
        ]
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
        check_model_paths(self.settings)
        check_ports(self.settings)
        address = grpc_address(self.settings.host, self.settings.port)
        try:
            if self.tls is not None:
                self.bound_port = self.server.add_secure_port(address, grpc_credentials(self.tls))
            else:
                self.bound_port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise StartupError(f"--port: cannot listen on {address} (in use or not allowed)") from exc
        if self.settings.rest_port:  # adds the shim's private Unix-socket port: before server.start()
            self.rest = InProcessShim(
                self.settings,
                self.server,
                self.state,
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
        threads = thread_budget(self.settings)
        try:
            models = await asyncio.to_thread(load_models, self.settings, self.metrics, threads)
        except (ModelLoadError, ValueError) as exc:
            raise StartupError(str(exc)) from exc
        except StartupError:
            raise
        except Exception as exc:  # e.g. a tokenizer file the library cannot parse: still one line
            log.debug("model load failed", exc_info=True)
            raise StartupError(load_failure(exc)) from None
        release_freed_memory()  # what building or quantizing at load freed is not the models' size
        planned = batch_settings(self.settings, models, current_rss())
        log_plan(threads, memory_limit(self.settings), models, planned)
        embedder = Embedder(
            models,
            engine_settings(self.settings, threads),
            observer=self.metrics,
            batch_settings=planned,
            aliases=ServedModels.from_settings(self.settings).aliases,
        )
        embedder.on_failure(self._engine_failed)
        await embedder.start()
        self.metrics.watch_queues(embedder)
        self.state.embedder = embedder
        self.state.phase = Phase.SERVING
        self.metrics.serving.set(1)
        await set_health(self.health, SERVING)
        log.info(
            "serving %s (default %s)",
            ", ".join(d.name for d in embedder.descriptions()),
            embedder.default_model,
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
