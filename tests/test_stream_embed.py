"""StreamEmbed: one reply per request, errors on the stream, backpressure, cancel."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.models.loader import BUILTIN_MODEL

from tests.support.engine import make_embedder, sentence
from tests.support.inprocess import serve_in_process
from tests.support.polling import until


def vectors(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([e.dense.values for e in response.embeddings], dtype=np.float32)


def test_stream_replies_equal_unary_replies(default_server):
    stub = default_server.stub()
    requests = [
        pb.EmbedRequest(request_id=f"r{i}", inputs=[sentence(i), sentence(i + 100)][: 1 + i % 2])
        for i in range(40)
    ]
    bad = pb.EmbedRequest(request_id="bad", inputs=[])
    replies = list(stub.StreamEmbed(iter([*requests[:20], bad, *requests[20:]]), timeout=60))
    by_id = {reply.request_id: reply for reply in replies}
    assert len(replies) == 41 and len(by_id) == 41  # each request answered exactly once
    assert by_id["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "inputs" in by_id["bad"].error.message
    for request in requests:
        unary = stub.Embed(request, timeout=30)
        streamed = by_id[request.request_id]
        assert not streamed.HasField("error")
        assert streamed.model == unary.model and streamed.usage == unary.usage
        np.testing.assert_allclose(vectors(streamed), vectors(unary), atol=1e-6)


async def test_stream_backpressure_bounds_work_in_flight(builtin):
    embedder, sessions = make_embedder(builtin)
    async with serve_in_process(embedder, stream_window=4) as server:
        batcher = embedder.batchers[BUILTIN_MODEL]
        sessions.hold()  # nothing completes: the window fills and the server must stop reading
        sent = 0

        async def requests():
            nonlocal sent
            for i in range(200):
                sent += 1
                yield pb.EmbedRequest(request_id=str(i), inputs=[sentence(i)])

        call = server.stub.StreamEmbed(requests())
        try:
            await until(
                lambda: sent == 200 and batcher.admission.admitted == 4,
                "the client sent all, the window filled",
            )
            for _ in range(100):  # the server has every chance to read on: it must not
                await asyncio.sleep(0)
            # Never more than the window admitted, although the client has long sent
            # everything (grpc's client buffers the writes): the server stops reading.
            assert batcher.admission.admitted == 4
        finally:
            sessions.release()
        ids = [reply.request_id async for reply in call]
    assert sorted(ids, key=int) == [str(i) for i in range(200)]


async def test_cancelled_stream_drops_its_queued_work(builtin):
    embedder, sessions = make_embedder(builtin)
    async with serve_in_process(embedder, stream_window=16) as server:
        batcher = embedder.batchers[BUILTIN_MODEL]
        sessions.hold()
        requests = [pb.EmbedRequest(request_id=str(i), inputs=[sentence(i)]) for i in range(16)]
        call = server.stub.StreamEmbed(iter(requests))
        await until(lambda: batcher.admission.admitted == 16, "the stream's requests admitted")
        runs_before = len(sessions.runs)
        call.cancel()
        await until(
            lambda: batcher.queue.total == 0 and not batcher.admission.busy, "the cancelled work dropped"
        )
        sessions.release()
        # The server still serves; a request after the cancel runs behind anything still queued.
        reply = await server.stub.Embed(pb.EmbedRequest(inputs=["still here"]), timeout=10)
        assert len(reply.embeddings) == 1
        assert len(sessions.runs) == runs_before + 1  # only that request ran after the cancel


async def test_unary_deadline_in_queue_is_deadline_exceeded(builtin):
    embedder, sessions = make_embedder(builtin)
    async with serve_in_process(embedder) as server:
        sessions.hold()
        blocker = asyncio.ensure_future(server.stub.Embed(pb.EmbedRequest(inputs=["blocker"]), timeout=30))
        await asyncio.to_thread(sessions.entered.acquire)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await server.stub.Embed(pb.EmbedRequest(inputs=["late"]), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        sessions.release()
        await blocker
        assert all(("late" not in str(run.rows)) for run in sessions.runs)
        assert len(sessions.runs) == 1


async def test_overload_is_resource_exhausted_over_the_wire(builtin):
    embedder, sessions = make_embedder(builtin, max_queue_requests=2)
    async with serve_in_process(embedder) as server:
        sessions.hold()
        admitted = [
            asyncio.ensure_future(server.stub.Embed(pb.EmbedRequest(inputs=[sentence(i)]), timeout=30))
            for i in range(2)
        ]
        await asyncio.to_thread(sessions.entered.acquire)
        batcher = embedder.batchers[BUILTIN_MODEL]
        await until(lambda: batcher.admission.admitted == 2, "both requests admitted")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await server.stub.Embed(pb.EmbedRequest(inputs=["excess"]), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded" in info.value.details()
        sessions.release()
        assert all(len(r.embeddings) == 1 for r in await asyncio.gather(*admitted))
