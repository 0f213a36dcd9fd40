"""OpenTelemetry traces: a span per gRPC call and per REST call, with the engine's stages as children.

Off unless configured (``--otlp-endpoint``, or the standard variables
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` /
``OTEL_TRACES_EXPORTER``; ``OTEL_SDK_DISABLED=true`` keeps it off). Off means
no tracer provider, no interceptor, no middleware: the API layer holds
``None`` instead of a ``Tracing`` and skips one ``is None`` test per call.

On, the pieces are:

- gRPC: the OpenTelemetry gRPC instrumentation's aio server interceptor (the
  outermost one) opens a SERVER span per call (``/embedding.v1.EmbeddingService/Embed``),
  continuing the W3C ``traceparent`` from the call's metadata; health and
  reflection calls are not traced;
- REST: the ASGI instrumentation's middleware opens ``POST /v1/embeddings``
  from the HTTP ``traceparent`` header; the shim's gRPC call to the server
  carries that context in its metadata (``inject``), so a REST call is one
  tree: REST span → gRPC server span → stages;
- stages: the engine records ``time.monotonic()`` stamps of each job
  (``engine.requests.StageTimings``; the engine never imports OpenTelemetry)
  and ``record_stages`` turns them into the child spans ``tokenize``,
  ``queue``, ``run`` and ``finish`` of the current span, with those start and
  end times; a StreamEmbed call has one ``StreamEmbed request`` span per
  request, with its stages under it.

Spans leave through a batch processor (``OTEL_BSP_*`` tune it) to the OTLP/gRPC
exporter (which reads the other ``OTEL_EXPORTER_OTLP_*`` variables: headers,
certificates, timeout), or to the console with ``OTEL_TRACES_EXPORTER=console``.
The resource is ``service.name=embedding-server`` unless ``OTEL_SERVICE_NAME``
or ``OTEL_RESOURCE_ATTRIBUTES`` names it; the sampler follows ``OTEL_TRACES_SAMPLER``
(default: parent-based, always on).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, Status, StatusCode

from .call_context import current_request_id
from .engine.jobs import EmbedResult, StageTimings
from .errors import StartupError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from starlette.types import ASGIApp

log = logging.getLogger(__name__)

SERVICE_NAME = "embedding-server"
TRACER_NAME = "embedding_server"
STREAM_REQUEST_SPAN = "StreamEmbed request"
#: The stage spans, in the order a job goes through them.
STAGES = ("tokenize", "queue", "run", "finish")
#: REST paths that are probes or scrapes, not work: no span.
UNTRACED_PATHS = "/health$,/metrics$,/openapi.json$"
EXPORTERS = ("otlp", "console")
#: At shutdown, the most seconds spent exporting what is buffered.
SHUTDOWN_SECONDS = 3.0

Metadata = tuple[tuple[str, str], ...]


def _flag(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip().lower()


def exporter_names(endpoint: str | None, environ: Mapping[str, str]) -> list[str]:
    """The exporters to build ([] = tracing off), from ``--otlp-endpoint`` and the OTEL_* variables.

    StartupError for a setting this server cannot honour, rather than silently not tracing.
    """
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise StartupError(
            f"--otlp-endpoint {endpoint}: give a URL, http://HOST:PORT (plain) or https://HOST:PORT (TLS)"
        )
    if _flag(environ, "OTEL_SDK_DISABLED") == "true":
        return []
    named = [name.strip() for name in _flag(environ, "OTEL_TRACES_EXPORTER").split(",") if name.strip()]
    unknown = [name for name in named if name not in (*EXPORTERS, "none")]
    if unknown:
        raise StartupError(
            f"OTEL_TRACES_EXPORTER={environ['OTEL_TRACES_EXPORTER']}: {unknown[0]!r} is not available "
            f"here (use {', '.join(EXPORTERS)} or none)"
        )
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = _flag(environ, variable)
        if protocol:
            if protocol != "grpc":
                raise StartupError(
                    f"{variable}={environ[variable]}: this server exports OTLP over gRPC only "
                    "(set it to grpc, and the endpoint to the collector's gRPC port, usually 4317)"
                )
            break
    if endpoint is not None:
        return ["otlp", *(name for name in named if name == "console")]
    if named:
        return [name for name in named if name != "none"]
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return ["otlp"]
    return []


def configure(
    endpoint: str | None, environ: Mapping[str, str] | None = None, service_name: str = SERVICE_NAME
) -> Tracing | None:
    """The process's tracing, or None when nothing asks for it (then nothing of the SDK is loaded)."""
    environ = os.environ if environ is None else environ
    names = exporter_names(endpoint, environ)
    if not names:
        return None
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter(endpoint=endpoint))
        else:
            exporters.append(ConsoleSpanExporter())
    tracing = Tracing(new_provider(service_name))
    for exporter in exporters:
        tracing.provider.add_span_processor(BatchSpanProcessor(exporter))
    where = (
        endpoint
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4317")
    )
    log.info("tracing on: %s", ", ".join(f"otlp to {where}" if n == "otlp" else n for n in names))
    return tracing


def new_provider(service_name: str = SERVICE_NAME) -> TracerProvider:
    """A tracer provider with this service's resource (OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    return TracerProvider(resource=resource, shutdown_on_exit=False)  # Tracing.shutdown, bounded


def _ns(monotonic: float, offset_ns: int) -> int:
    return int(monotonic * 1e9) + offset_ns


class Tracing:
    """One tracer provider and what the API layer needs from it."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(TRACER_NAME)

    def server_interceptor(self) -> grpc.aio.ServerInterceptor:
        """The gRPC instrumentation's SERVER span per call (not for health checks and reflection)."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        untraced = filters.any_of(
            filters.service_prefix("grpc.health"), filters.service_prefix("grpc.reflection")
        )
        # the instrumentation's factory has no annotations; it returns an aio ServerInterceptor
        interceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider, filter_=filters.negate(untraced)
        )
        return cast(grpc.aio.ServerInterceptor, interceptor)

    def asgi(self, app: ASGIApp) -> ASGIApp:
        """``app`` inside the ASGI instrumentation's middleware: a SERVER span per HTTP request."""
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        return cast(
            "ASGIApp",
            OpenTelemetryMiddleware(
                app,
                excluded_urls=UNTRACED_PATHS,
                tracer_provider=self.provider,
                exclude_spans=["receive", "send"],
            ),
        )

    @staticmethod
    def inject(metadata: Metadata) -> Metadata:
        """``metadata`` plus the current trace context (``traceparent``) for the next gRPC hop."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return (*metadata, *carrier.items())

    def record_stages(self, result: EmbedResult) -> None:
        """The job's ``tokenize``, ``queue``, ``run`` (one per session run) and ``finish`` spans, children
        of the current span."""
        timings: StageTimings = result.timings
        if not timings.finished:
            return  # not recorded (a job that never ran)
        parent = trace.get_current_span()
        parent.set_attributes(
            {
                "embedding.model": result.model,
                "embedding.inputs": len(result.vectors),
                "embedding.prompt_tokens": result.prompt_tokens,
            }
        )
        _tag_request_id(parent)
        offset = time.time_ns() - time.monotonic_ns()
        stages = (
            ("tokenize", timings.tokenize_start, timings.tokenize_end),
            ("queue", timings.enqueued, timings.run_start),
            # one span per session run the job was split over (a long request, a document's windows)
            *(("run", start, end) for start, end in timings.runs or ((timings.run_start, timings.run_end),)),
            ("finish", timings.run_end, timings.finished),
        )
        for name, start, end in stages:
            if start and end:
                span = self.tracer.start_span(name, start_time=_ns(start, offset))
                span.end(end_time=_ns(max(start, end), offset))

    @contextmanager
    def stream_request(self, request_id: str) -> Iterator[Span]:
        """The span of one request of a StreamEmbed call (its stages go under it)."""
        with self.tracer.start_as_current_span(
            STREAM_REQUEST_SPAN, attributes={"embedding.stream_request_id": request_id}
        ) as span:
            yield span

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> None:
        """Export what is still buffered and stop, waiting at most ``timeout`` s: an unreachable
        collector (the exporter retries for OTEL_EXPORTER_OTLP_TIMEOUT, 10 s) must not hold up the exit."""
        closing = threading.Thread(target=self.provider.shutdown, name="tracing-shutdown", daemon=True)
        closing.start()
        closing.join(timeout)
        if closing.is_alive():
            log.warning("tracing: spans still unexported after %.0fs at shutdown; dropping them", timeout)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def mark_failed(code: grpc.StatusCode | int, message: str, span: Span | None = None) -> None:
    """Error status on ``span`` (default: the current one); a no-op where nothing is traced.

    The gRPC instrumentation sees ``context.abort`` but not ``abort_with_status``,
    which is how this server ends a call (status details), so the servicer says it here.
    """
    span = trace.get_current_span() if span is None else span
    if span.is_recording():
        status = _CODES.get(code, grpc.StatusCode.UNKNOWN) if isinstance(code, int) else code
        span.set_attribute("rpc.grpc.status_code", status.value[0])
        span.set_status(Status(StatusCode.ERROR, f"{status.name}: {message}"))
        _tag_request_id(span)


def _tag_request_id(span: Span) -> None:
    """The call's request id (as in its log lines and ``x-request-id``), to go from a trace to the logs."""
    request_id = current_request_id()
    if request_id:
        span.set_attribute("embedding.request_id", request_id)
