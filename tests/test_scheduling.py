"""Priorities, fairness, memory budget and engine lifecycle, in-process with real ONNX Runtime.

Behaviour, not timing: runs are held at a gate (tests/support/instrumented.py)
so work piles up in a known state, then the order the session saw is read back.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time

import grpc
import httpx
import numpy as np
import openai
import pytest
from embedding_client import AsyncEmbeddingClient
from embedding_client.errors import ResourceExhaustedError
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc
from embedding_server.engine import batcher as batcher_module
from embedding_server.engine.embedder import INLINE_TOKENIZE_CHARS
from embedding_server.engine.gather import AMORTIZE, LoopGather
from embedding_server.engine.jobs import EmbedJob, EmbedResult
from embedding_server.engine.memory import MemoryBudget, ModelShape
from embedding_server.engine.run_cost import RunCost
from embedding_server.errors import NotServing, Overloaded
from embedding_server.grpc_api.interceptors import InFlight
from embedding_server.models.loader import BUILTIN_MODEL, ModelSpec, load
from embedding_server.models.refusals import InputTooLong
from embedding_server.models.sessions import SessionPool
from embedding_server.models.types import Priority
from embedding_server.rest.app import build_app
from embedding_server.rest.local import LocalBackend
from tokenizers import Tokenizer

from tests.support.engine import make_embedder, sentence, started
from tests.support.inprocess import serve_in_process
from tests.support.observer import RecordingObserver
from tests.support.polling import until

BATCH = Priority.BATCH
INTERACTIVE = Priority.INTERACTIVE


def ids_of(builtin, text: str) -> tuple[int, ...]:
    return tuple(builtin.model.tokenize([text], 0, False)[0].tolist())


def job(texts: list[str], priority: Priority, flow: object = None) -> EmbedJob:
    return EmbedJob(inputs=texts, priority=priority, flow=flow)


async def hold_one_run(embedder, sessions, text: str, priority: Priority) -> asyncio.Task:
    """Hold the gate and start one request whose run is stuck there."""
    sessions.hold()
    blocker = asyncio.create_task(embedder.embed(job([text], priority)))
    await asyncio.to_thread(sessions.entered.acquire)
    return blocker


async def test_interactive_queued_behind_batch_work_runs_first(builtin):
    embedder, sessions = make_embedder(builtin, interactive_slot=False)
    await started(embedder, sessions)
    batcher = embedder.batchers[BUILTIN_MODEL]
    blocker = await hold_one_run(embedder, sessions, "a bulk run holds the only slot", BATCH)
    bulk = [asyncio.create_task(embedder.embed(job([sentence(i)], BATCH, "corpus"))) for i in range(8)]
    await until(lambda: batcher.queue.depth(BATCH) == 8, "the bulk work queued")
    query = asyncio.create_task(embedder.embed(job(["where is my query"], INTERACTIVE)))
    await until(lambda: batcher.queue.depth(INTERACTIVE) == 1, "the query queued after the bulk work")
    sessions.release()
    await asyncio.gather(blocker, query, *bulk)
    await embedder.close()
    assert sessions.runs[1].rows == [ids_of(builtin, "where is my query")]  # first after the held run


async def test_a_query_does_not_wait_for_a_long_bulk_run(builtin):
    """Every regular slot holds a bulk run: the query gets the extra slot and runs at once."""
    embedder, sessions = make_embedder(builtin)
    await started(embedder, sessions)
    blocker = await hold_one_run(embedder, sessions, "a long bulk run", BATCH)
    query = asyncio.create_task(embedder.embed(job(["urgent query"], INTERACTIVE)))
    await asyncio.to_thread(sessions.entered.acquire)  # a second run started while the bulk one is held
    assert sessions.runs[1].rows == [ids_of(builtin, "urgent query")]
    assert not blocker.done()
    sessions.release()
    await asyncio.gather(blocker, query)
    await embedder.close()


async def test_batch_work_is_not_starved_by_endless_queries(builtin):
    """With queries always waiting, one bulk run still goes every ``batch_share`` query runs."""
    embedder, sessions = make_embedder(builtin, interactive_slot=False, max_batch_size=1, batch_share=4)
    await started(embedder, sessions)
    batcher = embedder.batchers[BUILTIN_MODEL]
    blocker = await hold_one_run(embedder, sessions, "held", INTERACTIVE)
    bulk = asyncio.create_task(embedder.embed(job(["bulk text that must not starve"], BATCH)))
    queries = [asyncio.create_task(embedder.embed(job([f"query {i}"], INTERACTIVE))) for i in range(20)]
    await until(
        lambda: batcher.queue.depth(INTERACTIVE) == 20 and batcher.queue.depth(BATCH) == 1, "all queued"
    )
    sessions.release()
    await asyncio.gather(blocker, bulk, *queries)
    await embedder.close()
    order = [run.rows[0] for run in sessions.runs]
    position = order.index(ids_of(builtin, "bulk text that must not starve"))
    assert position == 1 + 4  # the held run, four queries, then the bulk run (15 queries still waited)


async def test_two_flows_share_runs_fairly_whatever_their_request_sizes(builtin):
    """Flow A sends short texts, flow B texts ~5x longer; served padded tokens stay level."""
    embedder, sessions = make_embedder(builtin, interactive_slot=False, max_batch_tokens=256)
    await started(embedder, sessions)
    batcher = embedder.batchers[BUILTIN_MODEL]
    blocker = await hold_one_run(embedder, sessions, "held", BATCH)
    short = [f"alpha {i}" for i in range(120)]
    long = [" ".join(["beta"] * 20) + f" {i}" for i in range(40)]
    a = asyncio.create_task(embedder.embed(job(short, BATCH, "a")))
    b = asyncio.create_task(embedder.embed(job(long, BATCH, "b")))
    await until(lambda: batcher.queue.depth(BATCH) == 160, "both flows queued")
    sessions.release()
    await asyncio.gather(blocker, a, b)
    await embedder.close()
    alpha, beta = ids_of(builtin, "alpha")[1], ids_of(builtin, "beta")[1]
    served = {alpha: 0, beta: 0}
    gaps = []
    left = {alpha: 120, beta: 40}
    for run in sessions.runs[1:]:
        word = run.rows[0][1]
        served[word] += max(map(len, run.rows)) * len(run.rows)
        left[word] -= len(run.rows)
        if left[alpha] and left[beta]:  # both still had work waiting
            gaps.append(abs(served[alpha] - served[beta]))
    assert gaps and max(gaps) <= 256  # never more than one run's tokens apart
    assert {len(run.rows) for run in sessions.runs[1:] if run.rows[0][1] == alpha} != {1}  # batched


async def test_streams_of_one_connection_are_one_flow(builtin):
    """Fair shares are per client connection: many streams on one channel count once."""
    embedder, sessions = make_embedder(builtin, interactive_slot=False)
    async with serve_in_process(embedder) as server:
        batcher = embedder.batchers[BUILTIN_MODEL]
        blocker = await hold_one_run(embedder, sessions, "held", BATCH)
        # A second connection (channels of one process share connections unless told not to).
        other = grpc.aio.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
        calls = [server.stub.StreamEmbed(iter([pb.EmbedRequest(inputs=[f"one {i}"])])) for i in range(4)]
        calls.append(
            embedding_pb2_grpc.EmbeddingServiceStub(other).StreamEmbed(
                iter([pb.EmbedRequest(inputs=["two"])])
            )
        )
        await until(lambda: batcher.queue.depth(BATCH) == 5, "five streamed requests queued")
        assert batcher.queue.flows == 2  # four streams of one channel, one of another
        sessions.release()
        for call in calls:
            assert [len(r.embeddings) async for r in call] == [1]
        await blocker
        await other.close()


async def test_a_sequence_over_the_memory_budget_is_refused_and_the_engine_keeps_serving(builtin):
    shape = ModelShape(hidden=384, heads=12)
    budget = MemoryBudget(shape, run_bytes=shape.run_bytes(1, 64), queue_tokens=10_000)
    embedder, sessions = make_embedder(builtin, memory=budget)
    async with serve_in_process(embedder) as server:
        long_text = " ".join(["memory"] * 150)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await server.stub.Embed(pb.EmbedRequest(inputs=["short", long_text]), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details().startswith("inputs[1]: ")
        assert "memory budget" in info.value.details()
        assert sessions.runs == []  # nothing of the refused request ran
        reply = await server.stub.Embed(pb.EmbedRequest(inputs=["still serving"] * 8), timeout=30)
        assert len(reply.embeddings) == 8
    # and batches were cut to the budget: every run fits it
    assert all(budget.fits(len(run.rows), max(map(len, run.rows))) for run in sessions.runs)


async def test_a_sequence_over_the_memory_budget_is_sent_once_by_retrying_clients(builtin):
    """MEMORY_LIMIT fails the same way every time. The client's retry policy retries RESOURCE_EXHAUSTED
    (a full queue) and the openai client retries 429: each sent it again and again (5 and 3 times).
    Now it carries no RetryInfo, a trailer that stops gRPC's retries, and is 413 over REST."""
    shape = ModelShape(hidden=384, heads=12)
    budget = MemoryBudget(shape, run_bytes=shape.run_bytes(1, 64), queue_tokens=10_000)
    observed = RecordingObserver()
    embedder, sessions = make_embedder(builtin, observer=observed, memory=budget)
    long_text = " ".join(["memory"] * 150)
    async with serve_in_process(embedder) as server:
        async with AsyncEmbeddingClient(server.target) as client:
            with pytest.raises(ResourceExhaustedError) as info:
                await client.embed(["short", long_text])
        assert (info.value.reason, info.value.field, info.value.index) == ("MEMORY_LIMIT", "inputs", 1)
        assert info.value.retry_after is None
        assert observed.refused == {(BUILTIN_MODEL, Priority.INTERACTIVE, "MEMORY_LIMIT"): 1}  # sent once

        backend = LocalBackend(server.servicer, InFlight())
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=build_app(backend)), base_url="http://shim"
        )
        async with http, openai.AsyncOpenAI(base_url="http://shim/v1", api_key="-", http_client=http) as rest:
            with pytest.raises(openai.APIStatusError) as rest_info:
                await rest.embeddings.create(model=BUILTIN_MODEL, input=["short", long_text])
        assert rest_info.value.status_code == 413
        assert rest_info.value.body == {
            "message": info.value.message.replace("inputs[1]", "input[1]"),
            "type": "invalid_request_error",
            "param": "input",
            "code": "memory_limit",
        }
        assert observed.total(observed.refused, "MEMORY_LIMIT") == 2  # sent once more, by the REST client
    assert sessions.runs == []


async def test_batches_are_cut_to_the_memory_budget(builtin):
    shape = ModelShape(hidden=384, heads=12)
    budget = MemoryBudget(shape, run_bytes=shape.run_bytes(4, 40), queue_tokens=100_000)
    embedder, sessions = make_embedder(builtin, memory=budget)
    await started(embedder, sessions)
    texts = [" ".join(["cut"] * 30) + f" {i}" for i in range(32)]
    result = await embedder.embed(EmbedJob(inputs=texts))
    await embedder.close()
    assert len(result.vectors) == 32
    assert max(len(run.rows) for run in sessions.runs) <= 4 < 32


async def test_refused_requests_are_never_tokenized(builtin, monkeypatch):
    embedder, sessions = make_embedder(builtin, max_queue_requests=1)
    await started(embedder, sessions)
    tokenized: list[list[str]] = []
    real_tokenize = builtin.model.tokenize

    def counting(texts, task, truncate):
        tokenized.append(list(texts))
        return real_tokenize(texts, task, truncate)

    monkeypatch.setattr(builtin.model, "tokenize", counting)
    blocker = await hold_one_run(embedder, sessions, "admitted", INTERACTIVE)
    assert tokenized == [["admitted"]]  # the counter sees the tokenizer's calls
    for priority in (INTERACTIVE, BATCH):
        with pytest.raises(Overloaded) as info:
            await embedder.embed(job(["refused before any work"], priority))
        assert info.value.reason == "QUEUE_FULL"
    assert tokenized == [["admitted"]]  # the refused requests never reached the tokenizer
    sessions.release()
    await blocker
    await embedder.close()


async def test_batch_work_cannot_fill_the_admission_queries_need(builtin):
    embedder, sessions = make_embedder(builtin, max_queue_requests=4)
    await started(embedder, sessions)
    blocker = await hold_one_run(embedder, sessions, "held", BATCH)
    bulk = [asyncio.create_task(embedder.embed(job([sentence(i)], BATCH))) for i in range(2)]
    batcher = embedder.batchers[BUILTIN_MODEL]
    await until(lambda: batcher.admission.admitted == 3, "bulk work admitted")
    with pytest.raises(Overloaded):  # batch work may hold 3 of the 4 places
        await embedder.embed(job(["one bulk request too many"], BATCH))
    query = asyncio.create_task(embedder.embed(job(["a query still gets in"], INTERACTIVE)))
    await until(lambda: batcher.admission.admitted == 4, "the query admitted")
    sessions.release()
    await asyncio.gather(blocker, query, *bulk)
    await embedder.close()


async def test_close_fails_waiting_work_instead_of_leaving_it_hanging(builtin):
    embedder, sessions = make_embedder(builtin, interactive_slot=False)
    await started(embedder, sessions)
    blocker = await hold_one_run(embedder, sessions, "running", INTERACTIVE)
    waiting = asyncio.create_task(embedder.embed(job(["waiting"], INTERACTIVE)))
    batcher = embedder.batchers[BUILTIN_MODEL]
    await until(lambda: batcher.queue.total == 1, "the second request queued")
    closing = asyncio.create_task(embedder.close())
    await until(waiting.done, "the waiting request answered")
    assert isinstance(waiting.exception(), NotServing)
    sessions.release()
    await closing
    assert len((await blocker).vectors) == 1  # the run in progress finished


async def test_a_failed_dispatcher_fails_waiting_work_and_refuses_new_work(builtin):
    failures: list[BaseException] = []
    embedder, sessions = make_embedder(builtin, on_failure=failures.append, interactive_slot=False)
    await started(embedder, sessions)
    batcher = embedder.batchers[BUILTIN_MODEL]
    blocker = await hold_one_run(embedder, sessions, "running", INTERACTIVE)

    def broken(priority: Priority) -> list:
        raise RuntimeError("injected fault in batch selection")

    batcher.queue.take = broken  # type: ignore[method-assign]  # fault injection: the next dispatch raises
    waiting = asyncio.create_task(embedder.embed(job(["waiting"], INTERACTIVE)))
    sessions.release()  # the held run ends; the dispatcher takes the next batch and fails
    with pytest.raises(NotServing) as info:
        await waiting
    assert info.value.reason == "ENGINE_FAILED" and "injected fault" in info.value.message
    assert [str(f) for f in failures] == ["injected fault in batch selection"]
    with pytest.raises(NotServing):
        await embedder.embed(job(["after the failure"], INTERACTIVE))
    await blocker
    await embedder.close()


async def test_list_models_and_tokenize_never_wait_behind_embedding_work(builtin):
    embedder, sessions = make_embedder(builtin, interactive_slot=False)
    async with serve_in_process(embedder) as server:
        blocker = await hold_one_run(embedder, sessions, "held", BATCH)
        queued = [
            asyncio.ensure_future(server.stub.Embed(pb.EmbedRequest(inputs=[sentence(i)] * 8), timeout=60))
            for i in range(4)
        ]
        batcher = embedder.batchers[BUILTIN_MODEL]
        await until(lambda: batcher.queue.total == 32, "embedding work queued behind the held run")
        models = await server.stub.ListModels(pb.ListModelsRequest(), timeout=30)
        tokens = await server.stub.Tokenize(pb.TokenizeRequest(inputs=["count me"]), timeout=30)
        assert not blocker.done() and batcher.queue.total == 32  # answered while the work still waits
        assert models.models[0].name == BUILTIN_MODEL and tokens.results[0].tokens
        sessions.release()
        await asyncio.gather(blocker, *queued)


async def test_a_failed_engine_turns_the_server_not_serving():
    """The whole server: a dispatcher failure turns health NOT_SERVING and calls get UNAVAILABLE."""
    from embedding_server.app import EmbeddingApp
    from embedding_server.settings import Settings
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.support.server import free_port

    # A generous --memory-limit: the budget starts from this process's RSS, which holds the test's models too.
    app = EmbeddingApp(Settings(host="127.0.0.1", port=free_port(), rest_port=0, memory_limit=8 << 30))
    await app.start()
    try:
        batcher = app.state.embedder.batchers[BUILTIN_MODEL]  # type: ignore[union-attr]

        def broken(priority: Priority) -> list:
            raise RuntimeError("injected fault in batch selection")

        batcher.queue.take = broken  # type: ignore[method-assign]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.bound_port}") as channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Embed(pb.EmbedRequest(inputs=["x"]), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "engine failed" in info.value.details()
            health = health_pb2_grpc.HealthStub(channel)
            await until_async_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        await app.shutdown()


async def until_async_health(stub, status: int) -> None:
    from grpc_health.v1 import health_pb2

    for _ in range(3000):
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        if reply.status == status:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"health never became {status}")


async def test_small_requests_tokenize_on_the_loop_larger_ones_on_tokenizer_threads(builtin, monkeypatch):
    """A thread hop costs more than tokenizing a small request of either class; a larger query goes
    to the interactive tokenizer threads, a larger batch request to the niced ones."""
    embedder, sessions = make_embedder(builtin)
    await started(embedder, sessions)
    calls: list[str] = []
    real_tokenize = builtin.model.tokenize

    def recording(texts, task, truncate):
        calls.append(threading.current_thread().name)
        return real_tokenize(texts, task, truncate)

    monkeypatch.setattr(builtin.model, "tokenize", recording)
    longer = ["a longer question " * 20] * 3  # 1080 characters
    assert sum(map(len, longer)) > INLINE_TOKENIZE_CHARS
    await embedder.embed(job(["a short query"], INTERACTIVE))
    await embedder.embed(job(["a short passage of a corpus"], BATCH))
    await embedder.embed(job(longer, INTERACTIVE))
    await embedder.embed(job(longer, BATCH))
    await embedder.close()
    loop_thread = threading.current_thread().name
    assert calls[0] == calls[1] == loop_thread
    assert calls[2].startswith("tokenize-interactive_")
    assert calls[3].startswith("tokenize_")


@pytest.fixture(scope="module")
def two_sessions():
    """The built-in model on two one-thread sessions: two runs of one class may run at once."""
    return load(ModelSpec(BUILTIN_MODEL, None), sessions=2, threads=1)


async def test_a_few_queries_wait_for_the_run_in_flight_enough_start_a_second_run(two_sessions):
    """Under many small requests a run per request pays a run's fixed cost per request: fewer than
    min_parallel_batch waiting sequences go in the next batch instead of a second run beside it."""
    embedder, sessions = make_embedder(two_sessions, min_parallel_batch=3)
    await started(embedder, sessions)
    batcher = embedder.batchers[BUILTIN_MODEL]
    blocker = await hold_one_run(embedder, sessions, "the run in flight", INTERACTIVE)
    waiting = [asyncio.create_task(embedder.embed(job([f"query {i}"], INTERACTIVE))) for i in range(2)]
    await until(lambda: batcher.queue.depth(INTERACTIVE) == 2, "two queries waiting")
    for _ in range(5):
        await asyncio.sleep(0)  # the dispatcher has seen them
    assert len(sessions.runs) == 1 and batcher.queue.depth(INTERACTIVE) == 2  # a free slot, unused
    waiting.append(asyncio.create_task(embedder.embed(job(["query 2"], INTERACTIVE))))
    await asyncio.to_thread(sessions.entered.acquire)  # the third one makes a batch worth a second run
    assert sorted(sessions.runs[1].rows) == sorted(ids_of(two_sessions, f"query {i}") for i in range(3))
    sessions.release()
    await asyncio.gather(blocker, *waiting)
    await embedder.close()


async def test_with_min_parallel_batch_1_a_query_starts_beside_the_run_in_flight(two_sessions):
    embedder, sessions = make_embedder(two_sessions, min_parallel_batch=1)
    await started(embedder, sessions)
    blocker = await hold_one_run(embedder, sessions, "the run in flight", INTERACTIVE)
    query = asyncio.create_task(embedder.embed(job(["a lone query"], INTERACTIVE)))
    await asyncio.to_thread(sessions.entered.acquire)
    assert sessions.runs[1].rows == [ids_of(two_sessions, "a lone query")]
    sessions.release()
    await asyncio.gather(blocker, query)
    await embedder.close()


def test_tokenizing_gives_the_files_own_tokens_and_refusals(builtin):
    """The batch call without offsets gives the ids the tokenizer file's own one-text encode gives,
    cut to the model's maximum when asked, refused with the first too-long input's index if not."""
    model = builtin.model
    texts = ["a short query", "naïve café, 3 émojis 🙂🙂🙂", "word " * 400]
    with pytest.raises(InputTooLong) as refused:
        model.tokenize(texts, 0, False)
    assert refused.value.index == 2
    reference = Tokenizer.from_file(str(model.files.path("tokenizer.json")))
    reference.no_padding()
    reference.no_truncation()
    cut = model.tokenize(texts, 0, True)
    limit = model.tokenizer.max_tokens
    assert len(cut[2]) == limit
    for text, ids in zip(texts, cut, strict=True):
        expected = reference.encode(text).ids
        if len(expected) > limit:  # the cut keeps [CLS] ... [SEP]
            expected = [*expected[: limit - 1], expected[-1]]
        assert ids.dtype == np.int64
        assert ids.tolist() == expected
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"  # the library's own pool stays off


def finish_threads(monkeypatch) -> list[str]:
    """The name of the thread each finish step runs on, in order, from now on."""
    names: list[str] = []
    real_finish = batcher_module.finish_batch

    def recording(*args, **kwargs):
        names.append(threading.current_thread().name)
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(batcher_module, "finish_batch", recording)
    return names


def run_thread_hops(monkeypatch, batcher) -> list[object]:
    """Each function handed to one of the batcher's run threads (either class), from now on."""
    hops: list[object] = []
    for lane in batcher._lanes.values():

        def counting(fn, *args, real_submit=lane.run.submit):
            hops.append(fn)
            return real_submit(fn, *args)

        monkeypatch.setattr(lane.run, "submit", counting)
    return hops


async def test_a_query_is_finished_on_its_run_thread_bulk_work_on_the_finish_thread(builtin, monkeypatch):
    """One thread hop per query; bulk runs hand their finish step to the niced finish thread."""
    embedder, sessions = make_embedder(builtin)
    await started(embedder, sessions)
    threads = finish_threads(monkeypatch)
    hops = run_thread_hops(monkeypatch, embedder.batchers[BUILTIN_MODEL])
    await embedder.embed(job(["a query"], INTERACTIVE))
    assert len(hops) == 1  # run and finish in one hop
    await embedder.embed(job(["a passage"], BATCH))
    await embedder.close()
    assert threads[0].startswith(f"run-{BUILTIN_MODEL}_")
    assert threads[1].startswith(f"finish-{BUILTIN_MODEL}_")
    assert sessions.runs[0].rows and sessions.runs[1].rows  # both went through the session


@pytest.mark.parametrize(("limit", "on_loop"), [(60_000.0, True), (1e-6, False)])  # a real run > 1 ns
async def test_a_cheap_run_is_made_on_the_event_loop(builtin, monkeypatch, limit, on_loop):
    """No thread hop for a run predicted (from the model's own runs) within ``inline_run_ms``; the
    first run, with nothing measured yet, and a run over the limit go to the run threads."""
    embedder, sessions = make_embedder(builtin, inline_run_ms=limit)
    await started(embedder, sessions)
    batcher = embedder.batchers[BUILTIN_MODEL]
    finished_on = finish_threads(monkeypatch)
    hops = run_thread_hops(monkeypatch, batcher)
    first = await embedder.embed(job(["a query"], INTERACTIVE))
    assert len(hops) == 1 and batcher._cost.cheapest < 60  # measured on its run thread
    again = await embedder.embed(job(["a query"], INTERACTIVE))
    await embedder.embed(job(["a passage"], BATCH))
    await embedder.close()
    loop_thread = threading.current_thread().name
    assert len(sessions.runs) == 3  # every one went through the session
    assert finished_on[0].startswith(f"run-{BUILTIN_MODEL}_")
    if on_loop:
        assert len(hops) == 1
        assert finished_on[1:] == [loop_thread, loop_thread]  # bulk work's finish step too
    else:
        assert len(hops) == 3
        assert finished_on[1].startswith(f"run-{BUILTIN_MODEL}_")
        assert finished_on[2].startswith(f"finish-{BUILTIN_MODEL}_")
    np.testing.assert_allclose(again.vectors[0].dense, first.vectors[0].dense, atol=1e-6)


@pytest.mark.parametrize(("gather_ms", "runs"), [(60_000.0, 1), (0.0, 2)])
async def test_a_run_gathers_the_requests_the_loop_is_still_reading_in(builtin, gather_ms, runs):
    """Six queries reach the queue one loop iteration apart (as gRPC hands a server its calls): with
    the gather on, the dispatcher waits out the loop's work and runs them together; without it, the
    first runs alone the moment it lands and the others make the next run."""
    embedder, sessions = make_embedder(builtin, batch_gather_ms=gather_ms)
    await started(embedder, sessions)
    queue = embedder.batchers[BUILTIN_MODEL].queue

    async def query(steps: int) -> EmbedResult:
        for _ in range(steps):
            await asyncio.sleep(0)
        return await embedder.embed(job([f"query {steps}"], INTERACTIVE))

    sessions.hold()  # the first run waits in its session until every query has landed
    queries = asyncio.gather(*(query(steps) for steps in range(6)))
    await until(lambda: sessions.runs and queue.total + len(sessions.runs[0].rows) == 6, "six queued or run")
    sessions.release()
    results = await queries
    await embedder.close()
    assert len(sessions.runs) == runs
    assert sorted(len(run.rows) for run in sessions.runs) == ([6] if runs == 1 else [1, 5])
    assert all(result.vectors[0].dense is not None for result in results)


@pytest.mark.parametrize(("inline_ms", "one_run"), [(60_000.0, True), (0.0, False)])
async def test_a_batch_for_a_run_on_the_loop_gathers_longer_while_the_loop_is_busy(
    builtin, inline_ms, one_run
):
    """Runs on the loop: the batch waits ``AMORTIZE`` times the cheapest such run, and six queries
    reaching the queue over a busy spell far longer than ``batch_gather_ms`` make one run. Runs on
    a thread: the wait stays ``batch_gather_ms`` and the first query runs without the others."""
    embedder, sessions = make_embedder(builtin, batch_gather_ms=1.0, inline_run_ms=inline_ms)
    await started(embedder, sessions)
    gather = embedder.batchers[BUILTIN_MODEL]._gather
    for _ in range(2):  # the first run has no cost on record and goes to a thread; the second is cheap
        await embedder.embed(job(["a query"], INTERACTIVE))
    assert (gather.cheapest_loop_run < math.inf) is one_run  # what a run on the loop cost it, measured
    if one_run:
        assert gather.limit_for(on_loop=True) == max(0.001, AMORTIZE * gather.cheapest_loop_run)
        gather.cheapest_loop_run = 1.0  # as if such a run cost 1 s: the wait is 16 s, the test's spell 0.3 s
    assert gather.limit_for(on_loop=False) == 0.001
    before = len(sessions.runs)

    async def query(steps: int) -> EmbedResult:
        for _ in range(steps):  # the loop is busy: 20 ms of other work between this task's awaits
            time.sleep(0.02)
            await asyncio.sleep(0)
        return await embedder.embed(job([f"query {steps}"], INTERACTIVE))

    results = await asyncio.gather(*(query(steps) for steps in range(6)))
    await embedder.close()
    sizes = [len(run.rows) for run in sessions.runs[before:]]
    assert (sizes == [6]) if one_run else (len(sizes) > 1 and sizes[0] < 6), sizes
    assert all(result.vectors[0].dense is not None for result in results)


async def test_past_its_limit_the_gather_goes_on_only_while_the_batch_grows():
    """A run on the loop may wait ``AMORTIZE`` times longer, but each further ``limit`` must bring
    more work: a lone query on a loop busy with other work waits ``limit`` only."""
    gather = LoopGather(0.01)
    assert await gather.wait(lambda: False)  # idle: an empty iteration is measured
    gather.record_loop_run(1.0)  # a batch for a run on the loop may wait 16 s

    async def busy(steps: int, arrived: list[int]) -> None:  # 5 ms of other work between awaits
        for _ in range(steps):
            time.sleep(0.005)
            arrived[0] += 1
            await asyncio.sleep(0)

    loop = asyncio.get_running_loop()
    worker = loop.create_task(busy(1000, [0]))  # 5 s of work, none of it for this batch
    assert await gather.wait(lambda: False, on_loop=True, waiting=lambda: 1)
    assert not worker.done()  # back after about one limit: nothing more came
    worker.cancel()
    arrived = [0]
    feeder = loop.create_task(busy(20, arrived))  # a request every step, ten limits' worth of them
    assert await gather.wait(lambda: False, on_loop=True, waiting=lambda: arrived[0])
    assert feeder.done()  # it waited while the batch grew, then the idle loop ended it


def test_the_gather_limit_of_a_run_on_the_loop_is_amortize_times_its_cheapest_run():
    gather = LoopGather(0.001)
    assert gather.limit_for(on_loop=True) == 0.001  # nothing measured yet
    gather.record_loop_run(0.0005)
    gather.record_loop_run(0.002)  # a busy spell only adds: the least is kept
    assert gather.cheapest_loop_run == 0.0005
    assert gather.limit_for(on_loop=True) == AMORTIZE * 0.0005
    assert gather.limit_for(on_loop=False) == 0.001
    gather.record_loop_run(1e-6)
    assert gather.limit_for(on_loop=True) == 0.001  # never below batch_gather_ms
    off = LoopGather(0.0)
    off.record_loop_run(0.0005)
    assert off.limit_for(on_loop=True) == 0.0  # 0 switches the gather off, whatever was measured


async def test_the_gather_waits_while_the_loop_is_busy_and_not_once_it_is_idle():
    gather = LoopGather(60.0)
    assert await asyncio.wait_for(gather.wait(lambda: False), 30)  # idle: back after a few iterations
    assert not await gather.wait(lambda: True)  # a whole batch waits: no yield at all

    async def busy(steps: int) -> None:  # another task's work between its awaits, 2 ms a step
        for _ in range(steps):
            time.sleep(0.002)
            await asyncio.sleep(0)

    worker = asyncio.get_running_loop().create_task(busy(20))
    await gather.wait(lambda: False)
    assert worker.done()  # it waited the busy task out
    worker = asyncio.get_running_loop().create_task(busy(1000))
    await LoopGather(0.02).wait(lambda: False)
    assert not worker.done()  # ... but not past its limit
    worker.cancel()


def test_run_cost_predicts_the_fixed_part_and_the_least_cost_per_token():
    cost = RunCost()
    assert cost.predict(10) == math.inf  # nothing measured: nothing is cheap
    cost.record(padded_tokens=10, seconds=0.002)  # 0.2 ms a token, the fixed part at most 2 ms
    cost.record(padded_tokens=400, seconds=0.020)  # 0.05 ms a token
    cost.record(padded_tokens=400, seconds=0.080)  # a busy spell: the least stays
    assert cost.predict(1) == pytest.approx(0.002)  # a small run pays the cheapest run's cost
    assert cost.predict(1000) == pytest.approx(0.050)


def test_only_the_wide_session_spins(builtin):
    """The slot sessions share the cores with everything else; the wide one runs only on an idle server."""
    pool = SessionPool(builtin.sessions.path, sessions=1, threads=1)
    assert pool.add_wide(2)
    key = "session.intra_op.allow_spinning"
    assert pool.first.get_session_options().get_session_config_entry(key) == "0"
    wide = pool._wide
    assert wide is not None and wide.get_session_options().get_session_config_entry(key) == "1"
    for session in (pool.first, wide):  # within a run only: no thread spins on after it returns
        assert session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"


async def test_rest_clients_are_a_flow_each_and_no_header_names_one(builtin, monkeypatch):
    """Batch work through the REST shim: each HTTP client connection is its own fair-share flow (as
    each gRPC connection is), so one client's four requests do not all run before another's one.
    The in-process shim hands the engine the HTTP client's address itself; a gRPC caller's flow is
    its connection, whatever metadata it sends (the header the old Unix-socket hop used)."""
    embedder, sessions = make_embedder(builtin, max_batch_size=1)  # a run per request: order visible
    flows: list[object] = []
    real_embed = embedder.embed

    async def recording(job):
        flows.append(job.flow)
        return await real_embed(job)

    monkeypatch.setattr(embedder, "embed", recording)
    async with serve_in_process(embedder) as served:
        app = build_app(LocalBackend(served.servicer, InFlight()))
        batcher = embedder.batchers[BUILTIN_MODEL]

        def http_client(port: int) -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app=app, client=("10.0.0.7", port))
            return httpx.AsyncClient(transport=transport, base_url="http://shim", timeout=60)

        async with http_client(1001) as a, http_client(1002) as b:
            blocker = await hold_one_run(embedder, sessions, "held", BATCH)

            def post(client: httpx.AsyncClient, text: str) -> asyncio.Task:
                body = {"input": text, "priority": "batch"}
                return asyncio.create_task(client.post("/v1/embeddings", json=body))

            from_a = [post(a, f"from a {i}") for i in range(4)]
            await until(lambda: batcher.queue.depth(BATCH) == 4, "client a's four requests queued")
            from_b = post(b, "from b")
            await until(lambda: batcher.queue.depth(BATCH) == 5, "client b's request queued after them")
            sessions.release()
            await blocker
            replies = await asyncio.gather(*from_a, from_b)
        claimed = (("x-embedding-flow", "10.0.0.7:1001"),)
        await served.stub.Embed(pb.EmbedRequest(inputs=["over tcp"]), metadata=claimed)
    assert all(reply.status_code == 200 for reply in replies)
    after_held = [run.rows for run in sessions.runs[1:6]]
    assert after_held.index([ids_of(builtin, "from b")]) <= 1  # second at the latest, not fifth
    assert flows[0] is None  # the held run, straight into the engine
    assert set(flows[1:6]) == {("rest", "10.0.0.7:1001"), ("rest", "10.0.0.7:1002")}
    assert isinstance(flows[6], str) and flows[6].startswith("ipv4:127.0.0.1:")  # the header ignored
