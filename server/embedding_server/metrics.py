"""Prometheus metrics: one registry per server, the instruments, and the engine observer.

Names (the operators' dashboards and alerts are written against them):

- ``embedding_requests_total{method,code}``: calls by gRPC method (``Embed``...)
  and status code name (``OK``, ``INVALID_ARGUMENT``...); REST calls as
  ``method="POST /v1/embeddings"`` with the HTTP status as ``code``. The shim
  calls the server over gRPC, so a REST call also counts once under the gRPC
  method it made (sum by ``method`` with that in mind).
- ``embedding_request_seconds{method}``: whole-call latency.
- ``embedding_queue_seconds{model,priority}``: per embedding job, the wait until a
  session first took its work (admission queue + batching); ``priority`` is
  ``interactive`` or ``batch``: alert on the interactive class.
- ``embedding_inference_seconds{model,priority}``: per batch, one ONNX Runtime run.
- ``embedding_refused_total{model,priority,reason}``: requests refused with
  RESOURCE_EXHAUSTED (``QUEUE_FULL``, ``MEMORY_LIMIT``), never tokenized or run.
- ``embedding_dropped_total{model,priority,reason}``: queued sequences dropped
  before they ran, because their caller went away (``cancelled``) or their
  deadline passed (``deadline``).
- ``embedding_wide_runs_total{model}``: runs on the all-cores session (a lone
  query on an idle server).
- ``embedding_batch_size{model}``, ``embedding_batch_tokens{model}`` (real
  tokens), ``embedding_batch_padded_tokens{model}`` (what the session computes).
- ``embedding_tokens_total{model}``, ``embedding_padded_tokens_total{model}``.
- ``embedding_queue_depth{model,priority}``: sequences waiting for a session, read at scrape time.
- ``embedding_in_flight_requests``: calls being served (what shutdown waits for).
- ``embedding_model_load_seconds{model}``, ``embedding_model_info{model,engine,precision}`` (1: what
  runs each model), ``embedding_serving`` (1 when SERVING).
- the standard ``process_*`` and ``python_*`` collectors.

The standalone ``embedding-rest`` exports only the call series and the process
collectors (``CallMetrics``): it has no models, queues or health of its own.

A private registry (not prometheus_client's global one) keeps one server's
numbers apart from anything else in the process, tests included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .auth import ApiKeys
from .models.types import Priority

if TYPE_CHECKING:
    from .engine.embedder import Embedder
    from .tls import TlsFiles

log = logging.getLogger(__name__)

# Seconds: from sub-millisecond health checks to multi-second large batches.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class CallMetrics:
    """Calls by method and code, their latency, and the process collectors, in a registry of their own.

    All that a process without models exports: the standalone ``embedding-rest`` counts its REST
    calls with these, under the same names as the in-process shim.
    """

    def __init__(self, registry: CollectorRegistry | None = None, process_collectors: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        if process_collectors:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.requests = Counter(
            "embedding_requests_total", "Calls by method and status code.", ["method", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "embedding_request_seconds",
            "Whole-call latency by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._request_children: dict[tuple[str, str], Any] = {}
        self._latency_children: dict[str, Any] = {}

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        # labels() validates and locks on every call; the children are cached instead.
        counter = self._request_children.get((method, code))
        if counter is None:
            counter = self._request_children[(method, code)] = self.requests.labels(method, code)
        histogram = self._latency_children.get(method)
        if histogram is None:
            histogram = self._latency_children[method] = self.request_seconds.labels(method)
        counter.inc()
        histogram.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RunSeries(NamedTuple):
    """The children ``on_batch`` updates for one model and class."""

    batch_size: Histogram
    batch_tokens: Histogram
    batch_padded_tokens: Histogram
    tokens: Counter
    padded_tokens: Counter
    inference_seconds: Histogram
    wide_runs: Counter


class Metrics(CallMetrics):
    """Every instrument of one server process: the calls, and the engine's queues, batches and models."""

    def __init__(self, registry: CollectorRegistry | None = None, process_collectors: bool = True) -> None:
        super().__init__(registry, process_collectors)
        r = self.registry
        self._run_series: dict[tuple[str, Priority], _RunSeries] = {}
        self._queue_series: dict[tuple[str, Priority], Any] = {}
        self.queue_seconds = Histogram(
            "embedding_queue_seconds",
            "Per embedding job: time until a session first took its work.",
            ["model", "priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "embedding_inference_seconds",
            "Per batch: one ONNX Runtime session run.",
            ["model", "priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "embedding_batch_size", "Sequences per session run.", ["model"], buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "embedding_batch_tokens",
            "Real (unpadded) tokens per session run.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_padded_tokens = Histogram(
            "embedding_batch_padded_tokens",
            "Padded tokens (sequences x longest) per session run.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "embedding_tokens_total", "Real tokens run through the model.", ["model"], registry=r
        )
        self.padded_tokens = Counter(
            "embedding_padded_tokens_total", "Padded tokens run through the model.", ["model"], registry=r
        )
        self.queue_depth = Gauge(
            "embedding_queue_depth", "Sequences waiting for a session.", ["model", "priority"], registry=r
        )
        self.refused = Counter(
            "embedding_refused",
            "Requests refused with RESOURCE_EXHAUSTED before any work, by class and reason.",
            ["model", "priority", "reason"],
            registry=r,
        )
        self.dropped = Counter(
            "embedding_dropped",
            "Queued sequences dropped before they ran: their caller went away (reason cancelled) "
            "or their deadline passed (reason deadline).",
            ["model", "priority", "reason"],
            registry=r,
        )
        self.wide_runs = Counter(
            "embedding_wide_runs",
            "Session runs on the all-cores session (a lone query on an idle server).",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge("embedding_in_flight_requests", "Calls being served.", registry=r)
        self.model_load_seconds = Gauge(
            "embedding_model_load_seconds", "Time to load a model at start.", ["model"], registry=r
        )
        self.model_info = Gauge(
            "embedding_model_info",
            "1 for each model, labelled with the engine and precision that run it.",
            ["model", "engine", "precision"],
            registry=r,
        )
        self.serving = Gauge("embedding_serving", "1 while the server is SERVING, else 0.", registry=r)

    # --- the API layers ----------------------------------------------------------------

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        self.in_flight.set_function(count)

    # --- the engine (the batcher and the Embedder call these) ----------------------------

    def on_batch(
        self,
        model: str,
        size: int,
        real_tokens: int,
        padded_tokens: int,
        seconds: float,
        priority: Priority = Priority.INTERACTIVE,
        wide: bool = False,
    ) -> None:
        series = self._run_series.get((model, priority))
        if series is None:  # labels() validates and locks each time: 17 us a run, 9-12 with the children kept
            series = self._run_series[(model, priority)] = _RunSeries(
                self.batch_size.labels(model),
                self.batch_tokens.labels(model),
                self.batch_padded_tokens.labels(model),
                self.tokens.labels(model),
                self.padded_tokens.labels(model),
                self.inference_seconds.labels(model, _class(priority)),
                self.wide_runs.labels(model),
            )
        series.batch_size.observe(size)
        series.batch_tokens.observe(real_tokens)
        series.batch_padded_tokens.observe(padded_tokens)
        series.tokens.inc(real_tokens)
        series.padded_tokens.inc(padded_tokens)
        series.inference_seconds.observe(seconds)
        if wide:
            series.wide_runs.inc()

    def on_request(
        self,
        model: str,
        queue_seconds: float,
        inference_seconds: float,
        priority: Priority = Priority.INTERACTIVE,
    ) -> None:
        series = self._queue_series.get((model, priority))
        if series is None:  # labels() validates and locks each time: the child is kept instead
            series = self._queue_series[(model, priority)] = self.queue_seconds.labels(
                model, _class(priority)
            )
        series.observe(queue_seconds)

    def on_refused(self, model: str, priority: Priority, reason: str) -> None:
        self.refused.labels(model, _class(priority), reason).inc()

    def on_dropped(self, model: str, priority: Priority, reason: str, count: int) -> None:
        self.dropped.labels(model, _class(priority), reason).inc(count)

    def watch_queues(self, embedder: Embedder) -> None:
        """Queue depth is read from each batcher's per-class counters (plain ints) when Prometheus scrapes."""
        for name, batcher in embedder.batchers.items():
            for priority in (Priority.INTERACTIVE, Priority.BATCH):
                self.queue_depth.labels(name, _class(priority)).set_function(
                    partial(batcher.queue.depth, priority)
                )

    def model_loaded(self, model: str, seconds: float, engine: str, precision: str) -> None:
        self.model_load_seconds.labels(model).set(seconds)
        self.model_info.labels(model, engine, precision).set(1)


def _class(priority: Priority) -> str:
    return "batch" if priority == Priority.BATCH else "interactive"


def metrics_route(metrics: CallMetrics, api_keys: ApiKeys) -> Route:
    """``GET /metrics`` for the REST port. Like every REST route but /health, it needs the key when
    auth is on (Prometheus: ``authorization: {credentials_file: ...}``); ``--metrics-port`` serves
    the same numbers without auth, for a port only the scraper can reach."""

    async def scrape(request: Request) -> Response:
        if api_keys.enabled and not api_keys.accepts(request.headers.get("authorization")):
            body = {
                "error": {
                    "message": "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
            return JSONResponse(body, status_code=401, headers={"www-authenticate": "Bearer"})
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    return Route("/metrics", scrape, methods=["GET"])


class MetricsHttpServer:
    """``/metrics`` on its own port (``--metrics-port``), in a daemon thread, optionally over TLS."""

    def __init__(self, metrics: Metrics, host: str, port: int, tls: TlsFiles | None = None) -> None:
        self._httpd, self._thread = start_http_server(
            port,
            host,
            registry=metrics.registry,
            certfile=tls.cert_path if tls else None,
            keyfile=tls.key_path if tls else None,
            client_cafile=tls.client_ca_path if tls else None,
            client_auth_required=bool(tls and tls.client_ca_path),
        )
        self.port = int(self._httpd.server_port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
