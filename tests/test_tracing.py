"""OpenTelemetry tracing: a client's trace continues into ours, with the engine's stages as children.

The client side is a tracer provider of the test's own (another service), whose
span's W3C ``traceparent`` goes out in gRPC metadata or an HTTP header. The
server side is the real EmbeddingApp (gRPC, interceptors, in-process REST shim,
engine, ONNX Runtime) on a tiny synthetic model, its spans caught by the SDK's
InMemorySpanExporter; the live-process tests run ``embedding-server`` exporting
over OTLP/gRPC to a collector the test runs on loopback, so the flag and the
OTEL_* variables are proven in the real process.
"""

from __future__ import annotations

import ast
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc
from embedding_server.app import EmbeddingApp
from embedding_server.errors import StartupError
from embedding_server.settings import Settings, parse_settings
from embedding_server.tracing import (
    STAGES,
    STREAM_REQUEST_SPAN,
    Tracing,
    configure,
    exporter_names,
    new_provider,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import propagate, trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.support.polling import until, until_sync
from tests.support.server import RunningServer, free_port, start_server
from tests.support.standalone import Standalone
from tests.support.synthetic import make_sentence_transformers

ROOT = Path(__file__).resolve().parent.parent
EMBED_SPAN = "/embedding.v1.EmbeddingService/Embed"
STREAM_SPAN = "/embedding.v1.EmbeddingService/StreamEmbed"
REST_SPAN = "POST /v1/embeddings"
OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "EMBEDDING_OTLP_ENDPOINT",
)


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the CI machine sets, each test says itself what is configured."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sentence_transformers(
        tmp_path_factory.mktemp("st") / "st", pooling="mean", normalize=True
    ).path


# --- the client: another service's span -----------------------------------------------------


class ClientService:
    """A microservice of its own tracer provider; ``traceparent`` is what it sends on."""

    def __init__(self) -> None:
        self.provider = TracerProvider()
        self.tracer = self.provider.get_tracer("client-service")

    def span(self, name: str = "client call") -> tuple[trace.Span, dict[str, str]]:
        span = self.tracer.start_span(name, kind=SpanKind.CLIENT)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        assert set(carrier) >= {"traceparent"}
        return span, carrier


# --- finding spans --------------------------------------------------------------------------


def in_trace(spans: list[ReadableSpan], trace_id: int) -> list[ReadableSpan]:
    return [s for s in spans if s.context is not None and s.context.trace_id == trace_id]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def only(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    named = [s for s in spans if s.name == name]
    assert len(named) == 1, f"{len(named)} spans named {name!r} in {[s.name for s in spans]}"
    return named[0]


def assert_stages_under(spans: list[ReadableSpan], parent: ReadableSpan) -> None:
    """tokenize, queue, run and pool are children of ``parent``, in that order in time, none negative."""
    stages = {s.name: s for s in children(spans, parent) if s.name in STAGES}
    assert sorted(stages) == sorted(STAGES), [s.name for s in children(spans, parent)]
    times = [(stages[name].start_time, stages[name].end_time) for name in STAGES]
    for start, end in times:
        assert start is not None and end is not None and start <= end
    tokenize, queue, run, pool = times
    assert tokenize[1] <= queue[0]  # queued after its tokens were ready
    assert queue[1] == run[0]  # the queue ends when a session takes the work
    assert run[1] == pool[0]  # pooling starts when the run returns


# --- the server in this process with an in-memory exporter ---------------------------------


class Traced:
    def __init__(self, app: EmbeddingApp, exporter: InMemorySpanExporter) -> None:
        self.app = app
        self.exporter = exporter

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    async def of_trace(
        self, trace_id: int, complete: Callable[[list[ReadableSpan]], bool], what: str
    ) -> list[ReadableSpan]:
        """The trace's spans once ``complete`` holds (an exporter may get the last just after the reply)."""
        await until(lambda: complete(in_trace(self.spans(), trace_id)), what)
        return in_trace(self.spans(), trace_id)


@pytest.fixture
async def traced(model_dir: Path) -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = new_provider()  # the server's own resource (service.name), the test's processor
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(
        host="127.0.0.1",
        port=free_port(),
        rest_port=free_port(),
        models=[f"st={model_dir}"],
        memory_limit=8 << 30,
    )
    app = EmbeddingApp(settings, tracing=Tracing(provider))
    await app.start()
    try:
        yield Traced(app, exporter)
    finally:
        await app.shutdown()


def has(*names: str) -> Callable[[list[ReadableSpan]], bool]:
    def check(spans: list[ReadableSpan]) -> bool:
        return all(any(s.name == name for s in spans) for name in names)

    return check


async def test_grpc_embed_continues_the_clients_trace(traced: Traced) -> None:
    client = ClientService()
    span, carrier = client.span()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{traced.app.bound_port}") as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        reply = await stub.Embed(
            pb.EmbedRequest(request_id="q-1", inputs=["a cat sat", "the dog"]),
            metadata=tuple(carrier.items()),
        )
    span.end()
    assert len(reply.embeddings) == 2
    trace_id = span.get_span_context().trace_id
    spans = await traced.of_trace(trace_id, has(EMBED_SPAN, *STAGES), "Embed and its stages")
    rpc = only(spans, EMBED_SPAN)
    assert rpc.kind == SpanKind.SERVER
    assert rpc.parent is not None and rpc.parent.span_id == span.get_span_context().span_id
    assert rpc.parent.is_remote
    assert_stages_under(spans, rpc)
    assert rpc.attributes is not None and rpc.attributes["embedding.model"] == "st"
    assert rpc.attributes["embedding.inputs"] == 2
    assert rpc.attributes["embedding.request_id"] == "q-1"
    assert rpc.status.status_code != StatusCode.ERROR
    assert rpc.resource.attributes["service.name"] == "embedding-server"


async def test_in_process_rest_call_is_one_span_with_its_stages(traced: Traced) -> None:
    """No gRPC hop inside the server: the REST span is the call's only server span."""
    client = ClientService()
    span, carrier = client.span()
    rest_url = f"http://127.0.0.1:{traced.app.settings.rest_port}"
    async with httpx.AsyncClient() as http:
        for probe in ("/health", "/metrics"):  # probes and scrapes are not traced
            assert (await http.get(rest_url + probe, headers=carrier)).status_code == 200
        reply = await http.post(
            f"{rest_url}/v1/embeddings", json={"input": ["hello"], "model": "st"}, headers=carrier
        )
    span.end()
    assert reply.status_code == 200, reply.text
    trace_id = span.get_span_context().trace_id
    spans = await traced.of_trace(trace_id, has(REST_SPAN, *STAGES), "REST → stages")
    rest = only(spans, REST_SPAN)
    assert rest.kind == SpanKind.SERVER
    assert rest.parent is not None and rest.parent.span_id == span.get_span_context().span_id
    assert_stages_under(spans, rest)
    assert rest.attributes is not None and rest.attributes["embedding.inputs"] == 1
    assert reply.headers["x-request-id"] == rest.attributes["embedding.request_id"]
    assert not [s for s in spans if s.name == EMBED_SPAN]
    assert not [s for s in spans if "/health" in s.name or "/metrics" in s.name]


async def test_stream_embed_has_a_span_per_request_with_its_stages(traced: Traced) -> None:
    client = ClientService()
    span, carrier = client.span()
    requests = [pb.EmbedRequest(request_id=f"r{i}", inputs=[f"text number {i}"]) for i in range(3)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{traced.app.bound_port}") as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        call = stub.StreamEmbed(iter(requests), metadata=tuple(carrier.items()))
        replies = [r async for r in call]
        stream_id = dict(await call.initial_metadata())["x-request-id"]
    span.end()
    assert sorted(r.request_id for r in replies) == ["r0", "r1", "r2"]
    trace_id = span.get_span_context().trace_id

    def complete(spans: list[ReadableSpan]) -> bool:
        return has(STREAM_SPAN)(spans) and sum(s.name == "finish" for s in spans) == 3

    spans = await traced.of_trace(trace_id, complete, "StreamEmbed and 3 requests")
    rpc = only(spans, STREAM_SPAN)
    assert rpc.parent is not None and rpc.parent.span_id == span.get_span_context().span_id
    per_request = [s for s in children(spans, rpc) if s.name == STREAM_REQUEST_SPAN]
    assert sorted(str((s.attributes or {})["embedding.stream_request_id"]) for s in per_request) == [
        "r0",
        "r1",
        "r2",
    ]
    # the call's request id (its log line, its x-request-id) on each, to go from the trace to the logs
    assert {(s.attributes or {})["embedding.request_id"] for s in per_request} == {stream_id}
    for request_span in per_request:
        assert_stages_under(spans, request_span)


async def test_a_failed_call_is_an_error_span_and_probes_are_not_traced(traced: Traced) -> None:
    client = ClientService()
    span, carrier = client.span()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{traced.app.bound_port}") as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Embed(pb.EmbedRequest(inputs=["x"], model="nope"), metadata=tuple(carrier.items()))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(), metadata=tuple(carrier.items()))
        # a bad request inside a stream: that request's span is the error, the stream goes on
        bad = [pb.EmbedRequest(request_id="bad", inputs=["x"], model="nope")]
        replies = [r async for r in stub.StreamEmbed(iter(bad), metadata=tuple(carrier.items()))]
        assert replies[0].HasField("error")
    span.end()
    trace_id = span.get_span_context().trace_id
    spans = await traced.of_trace(
        trace_id, has(EMBED_SPAN, STREAM_SPAN, STREAM_REQUEST_SPAN), "the failed calls"
    )
    rpc = only(spans, EMBED_SPAN)
    assert rpc.status.status_code == StatusCode.ERROR
    assert "NOT_FOUND" in (rpc.status.description or "")
    assert not [s for s in children(spans, rpc) if s.name in STAGES]  # it never reached the engine
    assert only(spans, STREAM_REQUEST_SPAN).status.status_code == StatusCode.ERROR
    assert not [s for s in traced.spans() if "grpc.health" in s.name]


# --- the engine's stage stamps (what the stage spans are drawn from) ------------------------


async def test_engine_stamps_are_ordered_for_plain_and_late_chunked_jobs(tmp_path: Path) -> None:
    """tokenize → enqueue → run → finish, consistent with the trailer timings; a late-chunked
    document over several windows ends after its last run (its chunks are pooled after)."""
    from embedding_server.engine.embedder import Embedder
    from embedding_server.engine.jobs import EmbedJob
    from embedding_server.engine.tuning import BatchSettings, EngineSettings
    from embedding_server.models.loader import ModelSpec, load

    from tests.support.observer import RecordingObserver
    from tests.support.synthetic import WORDS, make_jina_v3

    model = make_jina_v3(tmp_path / "jina", seed=21, max_tokens=16)
    one_per_run = EngineSettings(batch=BatchSettings(max_batch_size=1))  # every job split over runs
    observed = RecordingObserver()
    embedder = Embedder(
        [load(ModelSpec("jina", model.path), sessions=1, threads=1)], one_per_run, observer=observed
    )
    for batcher in embedder.batchers.values():
        batcher.start()
    try:
        document = [" ".join(WORDS[i : i + 6]) for i in range(0, 60, 6)]  # ~60 tokens: several windows
        for job in (
            EmbedJob(inputs=["one query", "and another"], model="jina", task=3),
            EmbedJob(inputs=document, model="jina", task=3, late_chunking=True),
        ):
            result = await embedder.embed(job)
            t = result.timings
            stamps = [t.tokenize_start, t.tokenize_end, t.enqueued, t.run_start, t.run_end, t.finished]
            assert all(stamps) and stamps == sorted(stamps), stamps
            assert t.queue_seconds == pytest.approx(t.run_start - t.enqueued, abs=1e-9)
            assert len(t.runs) >= 2 and t.runs[0][0] == t.run_start and t.runs[-1][1] == t.run_end
            for (_, first_end), (second_start, _) in zip(t.runs, t.runs[1:], strict=False):
                assert first_end <= second_start  # one session: one run after the other
            if job.late_chunking:
                assert len(result.vectors) == len(document)
                assert observed.sequences("jina") >= 2 + 2  # 2 queries, 2+ windows
                assert len(t.runs) == observed.sequences("jina") - 2  # a run per window
                assert t.finished > t.run_end
            else:
                assert t.inference_seconds == pytest.approx(t.finished - t.run_start, abs=1e-9)
    finally:
        await embedder.close()


def test_a_job_split_over_runs_has_a_run_span_for_each() -> None:
    """The engine's ``runs`` stamps become one ``run`` span each, between ``queue`` and ``finish``."""
    from embedding_server.engine.jobs import EmbedResult, StageTimings

    exporter = InMemorySpanExporter()
    provider = new_provider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    timings = StageTimings(
        queue_seconds=1.0, inference_seconds=4.0, tokenize_start=10.0, tokenize_end=10.5,
        enqueued=11.0, run_start=12.0, run_end=15.0, finished=16.0, runs=((12.0, 13.0), (14.0, 15.0)),
    )  # fmt: skip
    with tracing.tracer.start_as_current_span("call"):
        tracing.record_stages(EmbedResult("m", (), [], 0, timings=timings))
    spans = {span.name: span for span in exporter.get_finished_spans() if span.name != "call"}
    finished = exporter.get_finished_spans()
    runs = sorted((s for s in finished if s.name == "run"), key=lambda s: s.start_time or 0)
    assert set(spans) == set(STAGES) and len(runs) == 2
    assert [((s.end_time or 0) - (s.start_time or 0)) // 10**6 for s in runs] == [1000, 1000]  # 1 s each
    assert (runs[1].start_time or 0) - (runs[0].end_time or 0) == pytest.approx(10**9, abs=10**3)


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "environ", "expected"),
    [
        (None, {}, []),
        ("http://collector:4317", {}, ["otlp"]),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ["otlp"]),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, ["otlp"]),
        (None, {"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        (None, {"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        (None, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, []),
        ("http://collector:4317", {"OTEL_SDK_DISABLED": "true"}, []),
        (None, {"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, []),
        ("https://collector:4317", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ["otlp"]),
        (None, {"OTEL_SERVICE_NAME": "embeddings"}, []),  # naming the service alone turns nothing on
    ],
)
def test_tracing_is_off_unless_configured(
    endpoint: str | None, environ: dict[str, str], expected: list[str]
) -> None:
    assert exporter_names(endpoint, environ) == expected
    if not expected:
        assert configure(endpoint, environ) is None


@pytest.mark.parametrize(
    ("endpoint", "environ", "message"),
    [
        ("collector:4317", {}, "--otlp-endpoint collector:4317: give a URL"),
        (None, {"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER=zipkin: 'zipkin' is not available"),
        (
            None,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf: this server exports OTLP over gRPC only",
        ),
    ],
)
def test_a_setting_that_cannot_be_honoured_stops_the_start(
    endpoint: str | None, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(StartupError, match=message.replace("/", ".").replace("+", ".")):
        exporter_names(endpoint, environ)


def test_otlp_endpoint_flag_and_environment_variable() -> None:
    assert parse_settings([], {}).otlp_endpoint is None
    assert parse_settings([], {"EMBEDDING_OTLP_ENDPOINT": "http://c:4317"}).otlp_endpoint == "http://c:4317"
    assert parse_settings(["--otlp-endpoint", "http://d:4317"], {}).otlp_endpoint == "http://d:4317"


async def test_off_builds_no_interceptor_and_no_provider(model_dir: Path) -> None:
    """Off costs nothing: no OpenTelemetry interceptor, middleware or provider exists."""
    app = EmbeddingApp(Settings(host="127.0.0.1", port=free_port(), rest_port=0, models=[f"st={model_dir}"]))
    assert app.tracing is None and app.servicer.tracing is None
    assert [type(i).__name__ for i in app.interceptors] == ["ObservingInterceptor"]  # no keys: no auth layer
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)  # nothing set a global one either


def test_the_engine_does_not_import_opentelemetry() -> None:
    """Layering: the engine records timestamps; only the API layer (tracing.py) knows OpenTelemetry."""
    offenders = []
    for package in ("engine", "models"):
        for path in sorted((ROOT / "server" / "embedding_server" / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                offenders += [f"{path.name}: {n}" for n in names if n.startswith("opentelemetry")]
    assert not offenders


# --- the real process, exporting over OTLP to a collector on loopback ------------------------


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """The smallest OTLP/gRPC trace collector: keeps every span it is sent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[str, ProtoSpan]] = []  # (service.name, opentelemetry.proto Span)
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: object) -> object:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [(service, span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: int) -> list[tuple[str, ProtoSpan]]:
        with self.lock:
            return [(svc, s) for svc, s in self.spans if int.from_bytes(s.trace_id, "big") == trace_id]

    def stop(self) -> None:
        self.server.stop(None)


@pytest.fixture
def collector() -> Iterator[Collector]:
    running = Collector()
    yield running
    running.stop()


def proto_tree_ok(spans: list[ProtoSpan], rpc_name: str, parent_id: bytes) -> None:
    """In exported protos: the RPC span's parent is ``parent_id``, the four stages its children, in order."""
    by_name: dict[str, list[ProtoSpan]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    (rpc,) = by_name[rpc_name]
    assert rpc.parent_span_id == parent_id
    stages = [by_name[name][0] for name in STAGES]
    for stage in stages:
        assert stage.parent_span_id == rpc.span_id
        assert stage.start_time_unix_nano <= stage.end_time_unix_nano
    tokenize, queue, run, pool = stages
    assert tokenize.end_time_unix_nano <= queue.start_time_unix_nano
    assert queue.end_time_unix_nano == run.start_time_unix_nano
    assert run.end_time_unix_nano == pool.start_time_unix_nano


FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}  # ms between batch exports (default 5 s)


def embed_with_trace(server: RunningServer, client: ClientService) -> tuple[int, bytes]:
    span, carrier = client.span()
    reply = server.stub().Embed(
        pb.EmbedRequest(inputs=["a traced text"]), metadata=tuple(carrier.items()), timeout=30
    )
    span.end()
    assert len(reply.embeddings) == 1
    context = span.get_span_context()
    return context.trace_id, context.span_id.to_bytes(8, "big")


def exported(collector: Collector, trace_id: int, count: int, what: str) -> list[ProtoSpan]:
    """The spans of one trace once the collector has ``count`` of them."""
    until_sync(lambda: len(collector.of_trace(trace_id)) >= count, what)
    return [span for _, span in collector.of_trace(trace_id)]


def check_rest_tree(collector: Collector, base_url: str, client: ClientService, hop: bool) -> set[str]:
    """POST /v1/embeddings with a traceparent: client → REST span → (over a gRPC ``hop``: Embed span →)
    stages; the services."""
    span, carrier = client.span()
    reply = httpx.post(f"{base_url}/v1/embeddings", json={"input": "over REST"}, headers=carrier, timeout=30)
    span.end()
    assert reply.status_code == 200, reply.text
    trace_id = span.get_span_context().trace_id
    spans = exported(collector, trace_id, 6 if hop else 5, f"the spans of a REST call to {base_url}")
    client_span = span.get_span_context().span_id.to_bytes(8, "big")
    if hop:
        (rest,) = [s for s in spans if s.name == REST_SPAN]
        assert rest.parent_span_id == client_span
        proto_tree_ok(spans, EMBED_SPAN, rest.span_id)
    else:
        proto_tree_ok(spans, REST_SPAN, client_span)
        assert EMBED_SPAN not in {s.name for s in spans}
    return {service for service, _ in collector.of_trace(trace_id)}


def test_live_server_exports_to_the_otlp_endpoint_flag(collector: Collector, model_dir: Path) -> None:
    """gRPC, the in-process REST shim, and a standalone embedding-rest in front: one trace each."""
    flag = ("--otlp-endpoint", collector.endpoint)
    server = start_server("--model", f"st={model_dir}", *flag, rest=True, env=FAST_EXPORT)
    shim = None
    try:
        client = ClientService()
        trace_id, parent = embed_with_trace(server, client)
        proto_tree_ok(exported(collector, trace_id, 5, "the gRPC call's spans"), EMBED_SPAN, parent)
        assert {service for service, _ in collector.of_trace(trace_id)} == {"embedding-server"}

        assert check_rest_tree(collector, server.rest_url, client, hop=False) == {"embedding-server"}

        shim = Standalone(*flag, env={**FAST_EXPORT, "EMBEDDING_REST_TARGET": server.target})
        # the standalone shim's span goes out from its process, the rest from the server's
        assert check_rest_tree(collector, shim.url, client, hop=True) == {
            "embedding-rest",
            "embedding-server",
        }
    finally:
        if shim is not None:
            assert shim.stop() == 0, shim.log.read_text()
        assert server.stop() == 0, server.log()
    assert "tracing on: otlp to " + collector.endpoint in server.log()


def test_live_server_follows_the_standard_otel_variables(collector: Collector, model_dir: Path) -> None:
    env = {
        **FAST_EXPORT,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_SERVICE_NAME": "embeddings-eu",
    }
    server = start_server("--model", f"st={model_dir}", env=env)
    try:
        trace_id, parent = embed_with_trace(server, ClientService())
        proto_tree_ok(exported(collector, trace_id, 5, "the call's spans"), EMBED_SPAN, parent)
        assert {svc for svc, _ in collector.of_trace(trace_id)} == {"embeddings-eu"}
    finally:
        assert server.stop() == 0, server.log()


def test_live_server_with_the_sdk_disabled_exports_nothing(collector: Collector, model_dir: Path) -> None:
    """OTEL_SDK_DISABLED wins over an endpoint: calls, a clean exit (which would flush), and nothing came."""
    env = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_SDK_DISABLED": "true"}
    server = start_server("--model", f"st={model_dir}", "--otlp-endpoint", collector.endpoint, env=env)
    try:
        embed_with_trace(server, ClientService())
    finally:
        assert server.stop() == 0, server.log()
    assert collector.spans == []
    assert "tracing on" not in server.log()


def test_an_unreachable_collector_does_not_hold_up_the_exit(model_dir: Path) -> None:
    """The exporter would retry for 60 s; SIGTERM still exits 0 within 30 s, and says what it dropped."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_TIMEOUT": "60"}
    server = start_server("--model", f"st={model_dir}", "--otlp-endpoint", dead, env=env)
    try:
        embed_with_trace(server, ClientService())
        assert server.logged("Transient error")  # the exporter is retrying now
    finally:
        assert server.stop(timeout=30) == 0, server.log()
    assert "spans still unexported after 3s at shutdown" in server.log()
