"""Observability on a real process: Prometheus metrics, timing trailers, request ids in JSON logs.

The server runs with the REST shim off and ``--metrics-port``, as an operator
would run a gRPC-only replica; every number is checked as a difference between
two scrapes around calls this module makes, against counts it knows
independently (how many calls, inputs and tokens it sent).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.cpus import available_cpus
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.support.polling import until_sync
from tests.support.server import RunningServer, free_port, start_server

MODEL = "all-minilm-l6-v2"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def observed() -> Iterator[RunningServer]:
    port = free_port()
    server = start_server("--metrics-port", str(port), "--log-json", "--max-batch-size", "2")
    server.metrics_port = port  # type: ignore[attr-defined]
    yield server
    server.stop()


def scrape(server: RunningServer) -> Samples:
    reply = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)  # type: ignore[attr-defined]
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_requests_by_method_and_code(observed):
    stub = observed.stub()
    before = scrape(observed)
    for _ in range(3):
        stub.Embed(pb.EmbedRequest(inputs=["counting calls"]), timeout=30)
    stub.Tokenize(pb.TokenizeRequest(inputs=["x"]), timeout=30)
    for bad in (pb.EmbedRequest(inputs=[]), pb.EmbedRequest(inputs=["x"], model="no-such-model")):
        with pytest.raises(grpc.RpcError):
            stub.Embed(bad, timeout=30)
    after = scrape(observed)
    assert delta(before, after, "embedding_requests_total", method="Embed", code="OK") == 3
    assert delta(before, after, "embedding_requests_total", method="Tokenize", code="OK") == 1
    assert delta(before, after, "embedding_requests_total", method="Embed", code="INVALID_ARGUMENT") == 1
    assert delta(before, after, "embedding_requests_total", method="Embed", code="NOT_FOUND") == 1
    assert delta(before, after, "embedding_request_seconds_count", method="Embed") == 5
    assert delta(before, after, "embedding_request_seconds_sum", method="Embed") > 0


def test_batches_tokens_and_latencies(observed):
    stub = observed.stub()
    texts = ["the first text", "a second, somewhat longer text about embeddings", "third", "fourth one"]
    tokens = sum(len(r.ids) for r in stub.Tokenize(pb.TokenizeRequest(inputs=texts), timeout=30).results)
    before = scrape(observed)
    stub.Embed(pb.EmbedRequest(inputs=texts[:3]), timeout=30)
    stub.Embed(pb.EmbedRequest(inputs=texts[3:]), timeout=30)
    after = scrape(observed)
    m = {"model": MODEL}
    assert delta(before, after, "embedding_tokens_total", **m) == tokens
    assert delta(before, after, "embedding_batch_size_sum", **m) == len(texts)
    # --max-batch-size 2: three inputs need two runs, one input one run.
    batches = delta(before, after, "embedding_batch_size_count", **m)
    assert batches == 3
    assert delta(before, after, "embedding_batch_tokens_sum", **m) == tokens
    assert delta(before, after, "embedding_batch_tokens_count", **m) == batches
    assert delta(before, after, "embedding_padded_tokens_total", **m) >= tokens
    i = {**m, "priority": "interactive"}  # Embed's default class
    assert delta(before, after, "embedding_inference_seconds_count", **i) == batches
    assert delta(before, after, "embedding_inference_seconds_sum", **i) > 0
    assert delta(before, after, "embedding_queue_seconds_count", **i) == 2  # one per Embed
    # Histogram buckets are cumulative: the +Inf bucket holds every observation.
    assert delta(before, after, "embedding_batch_size_bucket", le="+Inf", **m) == batches
    assert delta(before, after, "embedding_batch_size_bucket", le="2.0", **m) == batches


def wide_threads_of(server: RunningServer) -> int:
    """The wide session the server planned for the model (0: none), from its start-up plan line."""
    (line,) = [json.loads(t) for t in server.log().splitlines() if '"message": "start-up plan:' in t]
    return int(line["plan"]["models"][MODEL]["wide_threads"])


def test_drops_and_wide_runs_are_series(observed):
    """Work dropped before it ran (its caller's deadline passed) and runs on the all-cores session
    are counted where they happen: the work queue and the dispatcher."""
    stub = observed.stub()
    before = scrape(observed)
    stub.Embed(pb.EmbedRequest(inputs=["a lone query on an idle server"]), timeout=30)
    after = scrape(observed)
    lone = delta(before, after, "embedding_batch_size_count", model=MODEL)
    assert lone == 1
    expected_wide = 1 if wide_threads_of(observed) else 0
    assert delta(before, after, "embedding_wide_runs_total", model=MODEL) == expected_wide

    # 128 long inputs at --max-batch-size 2 are 64 runs, far more than the call's 0.2 s allow.
    texts = [" ".join(f"word{i}-{j}" for j in range(40)) for i in range(128)]  # ~200 tokens each
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(inputs=texts), timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]

    def accounted() -> tuple[float, float]:
        """(inputs run, inputs dropped) since ``before``, the lone query left out."""
        now = scrape(observed)
        ran = delta(before, now, "embedding_batch_size_sum", model=MODEL) - 1
        i = {"model": MODEL, "priority": "interactive"}
        gone = sum(
            delta(before, now, "embedding_dropped_total", **i, reason=r) for r in ("cancelled", "deadline")
        )
        return ran, gone

    # Every input either ran or was dropped, none twice (runs in progress finish, then count).
    until_sync(lambda: sum(accounted()) == len(texts), "every abandoned input accounted for")
    ran, gone = accounted()
    assert gone > 0 and ran < len(texts)


def test_gauges_at_rest(observed):
    samples = scrape(observed)
    assert value(samples, "embedding_model_load_seconds", model=MODEL) > 0
    assert value(samples, "embedding_serving") == 1
    for priority in ("interactive", "batch"):
        assert ("embedding_queue_depth", (("model", MODEL), ("priority", priority))) in samples
        assert value(samples, "embedding_queue_depth", model=MODEL, priority=priority) == 0
    assert value(samples, "embedding_in_flight_requests") == 0
    assert value(samples, "process_resident_memory_bytes") > 0


def test_queue_depth_and_in_flight_under_load(observed):
    """One request of 16 inputs runs as 8 batches of 2: scrapes meanwhile see work waiting."""
    texts = [" ".join(f"word{i}-{j}" for j in range(30)) for i in range(16)]
    result: dict[str, object] = {}

    def call() -> None:
        result["reply"] = observed.stub().Embed(pb.EmbedRequest(inputs=texts), timeout=120)

    worker = threading.Thread(target=call)
    worker.start()
    depths, in_flight = [], []
    while worker.is_alive():
        samples = scrape(observed)
        depths.append(value(samples, "embedding_queue_depth", model=MODEL, priority="interactive"))
        in_flight.append(value(samples, "embedding_in_flight_requests"))
        time.sleep(0.01)
    worker.join()
    assert len(result["reply"].embeddings) == 16  # type: ignore[attr-defined]
    assert max(depths) >= 2, depths
    assert max(in_flight) == 1, in_flight
    assert value(scrape(observed), "embedding_queue_depth", model=MODEL, priority="interactive") == 0


def test_timing_trailers_and_request_id(observed):
    reply, call = observed.stub().Embed.with_call(
        pb.EmbedRequest(inputs=["time me"] * 3), metadata=[("x-request-id", "trace-0042")], timeout=30
    )
    trailers = dict(call.trailing_metadata())
    assert trailers["x-request-id"] == "trace-0042"
    queue, inference, total = (
        float(trailers[k]) for k in ("x-queue-time-ms", "x-inference-time-ms", "x-total-time-ms")
    )
    assert queue >= 0 and inference > 0
    assert queue + inference <= total + 0.01
    assert len(reply.embeddings) == 3


def test_request_id_falls_back_to_the_field_then_a_fresh_one(observed):
    stub = observed.stub()
    _, call = stub.Embed.with_call(pb.EmbedRequest(request_id="from-field", inputs=["x"]), timeout=30)
    assert dict(call.trailing_metadata())["x-request-id"] == "from-field"
    _, first = stub.Embed.with_call(pb.EmbedRequest(inputs=["x"]), timeout=30)
    _, second = stub.Embed.with_call(pb.EmbedRequest(inputs=["x"]), timeout=30)
    ids = [dict(c.trailing_metadata())["x-request-id"] for c in (first, second)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert ids[0] != ids[1]


def test_stream_embed_trailers_sum_its_requests(observed):
    replies = observed.stub().StreamEmbed(
        iter([pb.EmbedRequest(request_id=str(i), inputs=["streamed"]) for i in range(4)]),
        metadata=[("x-request-id", "stream-7")],
        timeout=30,
    )
    assert sorted(r.request_id for r in replies) == ["0", "1", "2", "3"]
    trailers = dict(replies.trailing_metadata())
    assert trailers["x-request-id"] == "stream-7"
    assert float(trailers["x-inference-time-ms"]) > 0


def test_json_logs_carry_the_request_id(observed):
    observed.stub().Embed(
        pb.EmbedRequest(inputs=["logged"]), metadata=[("x-request-id", "log-me-1")], timeout=30
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [line for line in observed.log().splitlines() if line.strip()]
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        access = [e for e in entries if e.get("request_id") == "log-me-1"]
        if access:
            break
        time.sleep(0.05)
    assert access, lines[-5:]
    entry = access[0]
    assert entry["logger"] == "embedding_server.access"
    assert entry["level"] == "info"
    assert entry["message"].startswith("Embed OK ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert any(e["message"].startswith("serving ") for e in entries)


def test_start_up_logs_the_threads_and_limits_it_chose(observed):
    """One JSON line (issue 12): sessions, intra-op, wide, run and tokenizer threads, memory, batch limits."""
    assert observed.logged('"message": "start-up plan:')
    (line,) = [
        json.loads(text) for text in observed.log().splitlines() if '"message": "start-up plan:' in text
    ]
    assert line["level"] == "info"
    plan = line["plan"]
    cpus = available_cpus()  # the server's defaults split these (tests/test_cpus.py checks the split)
    sessions = min(cpus, 4)
    assert plan["threads"] == {
        "cpus": cpus,
        "sessions": sessions,
        "threads_per_session": max(1, cpus // sessions),
        "wide_threads": cpus,
        "interactive_run_threads": sessions + 1,
        "bulk_run_threads": sessions,
        "finish_threads": 1,
        "tokenizer_threads": min(cpus, 4),
    }
    model = plan["models"][MODEL]
    assert model["sessions"] == sessions and model["layout"] == "shared"
    assert model["wide_threads"] == (cpus if cpus > model["threads_per_session"] else 0)
    assert (model["max_batch_size"], model["max_batch_tokens"]) == (2, 16384)  # --max-batch-size 2
    assert model["max_queue_requests"] == 1024
    assert 0 < model["max_queue_tokens"] <= 4_000_000  # cut to the memory budget
    assert plan["memory_limit_mib"] > 0 and model["run_memory_mib"] > 0 and model["longest_input_tokens"] > 0
    assert "/ 2 sequences" in line["message"]  # the text says the same as the fields


def test_rest_port_serves_metrics_too(default_server):
    reply = httpx.get(f"{default_server.rest_url}/metrics", timeout=10)
    assert reply.status_code == 200
    names = {f.name for f in text_string_to_metric_families(reply.text)}
    assert {"embedding_requests", "embedding_queue_depth", "embedding_model_load_seconds"} <= names


def test_a_cancelled_stream_leaves_the_in_flight_count(observed):
    """A client that stops reading, then walks away mid-stream: the call ends CANCELLED and leaves
    the in-flight count, so it cannot hold up a later drain. (The case where asyncio closes the
    reply generator from another context is exercised by test_client_stream.py.)"""
    requests = (pb.EmbedRequest(request_id=str(i), inputs=[f"text number {i}"] * 8) for i in range(3000))
    call = observed.stub().StreamEmbed(requests, timeout=60)
    before = scrape(observed)
    runs = value(before, "embedding_batch_size_count", model=MODEL)
    next(call)  # the stream is up and counted; now stop reading
    # Replies pile up unread: the server has answered 10 more requests (4 runs each at batch size 2).
    until_sync(
        lambda: value(scrape(observed), "embedding_batch_size_count", model=MODEL) >= runs + 44,
        "replies the client does not read",
    )
    assert value(scrape(observed), "embedding_in_flight_requests") == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while value(scrape(observed), "embedding_in_flight_requests") != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert value(scrape(observed), "embedding_in_flight_requests") == 0
    # this very call ended CANCELLED (a delta: the module's server has served other calls)
    assert (
        delta(before, scrape(observed), "embedding_requests_total", method="StreamEmbed", code="CANCELLED")
        == 1
    )


def test_a_closed_health_watch_counts_as_ok(observed):
    """Health/Watch runs until its client leaves (the Python client and load balancers keep one open
    per replica): closing it is the normal end of the call, so it counts as OK, not CANCELLED, and
    error-rate alerts stay quiet. A cancelled StreamEmbed still counts CANCELLED (test above)."""
    watch = "grpc.health.v1.Health/Watch"
    before = scrape(observed)
    call = health_pb2_grpc.HealthStub(observed.channel()).Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(call).status == health_pb2.HealthCheckResponse.SERVING  # the stream is up on the server
    call.cancel()  # what a client does when it is done watching
    until_sync(
        lambda: delta(before, scrape(observed), "embedding_request_seconds_count", method=watch) == 1,
        "the closed Watch to be counted",
    )
    after = scrape(observed)
    assert delta(before, after, "embedding_requests_total", method=watch, code="OK") == 1
    assert delta(before, after, "embedding_requests_total", method=watch, code="CANCELLED") == 0
