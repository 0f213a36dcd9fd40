"""embed_stream over StreamEmbed on a real server: order, errors, bounded input, retries, asyncio."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import numpy as np
import pytest
from embedding_client import (
    AsyncEmbeddingClient,
    EmbeddingClient,
    InvalidArgumentError,
    StreamRetry,
)
from embedding_client.proto import embedding_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from tests.support.replies import raw_dense
from tests.support.server import RunningServer, start_server
from tests.support.texts import sentence


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [sentence(i) for i in range(240)]


@pytest.fixture(scope="module")
def expected(default_server: RunningServer, texts: list[str]) -> np.ndarray:
    """The server's own answer for every text, from unary calls on the raw stub."""
    stub = default_server.stub()
    parts = [stub.Embed(pb.EmbedRequest(inputs=texts[i : i + 60]), timeout=120) for i in range(0, 240, 60)]
    return np.concatenate([raw_dense(part) for part in parts])


def test_stream_results_equal_unary_calls_in_input_order(default_server, texts, expected):
    # Small requests of very different lengths on three streams finish out of order;
    # the client must put them back.
    with EmbeddingClient(default_server.target) as c:
        items = list(c.embed_stream(iter(texts), batch_size=3, window=6, streams=3))
    assert [item.index for item in items] == list(range(len(texts)))
    np.testing.assert_allclose(np.stack([item.dense for item in items]), expected, atol=1e-6)


def test_batches_carry_offsets_and_stats(default_server, texts, expected):
    with EmbeddingClient(default_server.target) as c:
        run = c.embed_stream_batches(texts, batch_size=7, window=3)
        batches = list(run)
    assert [b.offset for b in batches] == list(range(0, len(texts), 7))
    np.testing.assert_allclose(np.concatenate([b.dense for b in batches]), expected, atol=1e-6)
    assert run.stats.requests_sent == len(batches) and run.stats.requests_resent == 0
    assert run.stats.peak_outstanding <= 3


def test_a_bad_request_raises_at_its_position(default_server, texts):
    broken = [*texts[:20], "", *texts[20:40]]
    seen = []
    with EmbeddingClient(default_server.target) as c, pytest.raises(InvalidArgumentError) as error:
        for item in c.embed_stream(broken, batch_size=4):
            seen.append(item.index)
    assert seen == list(range(20))  # everything before the bad request came out first
    assert error.value.offset == 20 and "inputs[0]" in error.value.message
    assert (error.value.reason, error.value.index, error.value.input_index) == ("EMPTY_INPUT", 0, 20)
    assert error.value.request_id  # the stream call's id on the server (RequestInfo)


def test_on_error_yield_reports_the_failed_request_and_goes_on(default_server, texts, expected):
    broken = [*texts[:10], "", *texts[10:30]]
    with EmbeddingClient(default_server.target) as c:
        batches = list(c.embed_stream_batches(broken, batch_size=5, on_error="yield"))
    failed = [b for b in batches if b.error is not None]
    assert [(b.offset, b.count) for b in failed] == [(10, 5)]
    assert failed[0].error.code == grpc.StatusCode.INVALID_ARGUMENT
    good = [b for b in batches if b.error is None]
    assert sum(b.count for b in good) == 26
    np.testing.assert_allclose(good[0].dense, expected[:5], atol=1e-6)
    np.testing.assert_allclose(good[2].dense, expected[14:19], atol=1e-6)  # broken[15:20] is texts[14:19]


def test_a_100k_generator_is_pulled_only_a_bounded_window_ahead(default_server):
    """The input is never materialized: at every result, pulled - handed out <= the window bound.

    The stream runs on a 100k-item generator and is left after 3,000 results
    (the whole 100k would take minutes on a 2-core CI box; the bound is the
    same at any point of the run). Leaving must stop the pulling at once.
    """
    total, stop_after, batch_size, window = 100_000, 3_000, 50, 4
    pulled = 0

    def generator() -> Iterator[str]:
        nonlocal pulled
        for i in range(total):
            pulled += 1
            yield f"w{i % 97}"

    bound = 2 * window * batch_size  # max_ahead (2 * window * streams) batches of batch_size texts
    handed_out = 0
    worst = 0
    with EmbeddingClient(default_server.target) as c:
        run = c.embed_stream_batches(generator(), batch_size=batch_size, window=window)
        for batch in run:
            handed_out += batch.count
            worst = max(worst, pulled - handed_out)
            assert pulled - handed_out <= bound
            if handed_out >= stop_after:
                break
        run.close()
    pulled_at_close = pulled
    assert handed_out == stop_after
    assert 0 < worst <= bound
    assert run.stats.peak_outstanding <= window
    assert pulled_at_close <= stop_after + bound < total
    assert pulled == pulled_at_close  # nothing pulled after close


def in_flight(server: RunningServer) -> float:
    """The server's own count of calls being served (Prometheus, on the REST port)."""
    text = httpx.get(f"{server.rest_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "embedding_in_flight_requests":
                return sample.value
    raise AssertionError("no embedding_in_flight_requests in /metrics")


def test_leaving_a_stream_early_ends_its_calls_on_the_server(default_server):
    with EmbeddingClient(default_server.target) as c:
        run = c.embed_stream_batches((f"w{i}" for i in range(100_000)), batch_size=20, window=4, streams=2)
        batches = iter(run)
        for _ in range(5):
            next(batches)
        assert in_flight(default_server) >= 1  # the streams are open while we iterate
        batches.close()  # what leaving a for loop early does
        deadline = time.monotonic() + 10
        while in_flight(default_server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight(default_server) == 0


def test_late_chunking_documents_stream_one_request_each(default_server):
    documents = [["The city lies on a river.", "It has three bridges."], ["One chunk only."], ["a", "b", "c"]]
    stub = default_server.stub()
    replies = [stub.Embed(pb.EmbedRequest(inputs=doc, late_chunking=True), timeout=60) for doc in documents]
    expected = [raw_dense(reply) for reply in replies]
    with EmbeddingClient(default_server.target) as c:
        batches = list(c.embed_stream_batches(iter(documents), late_chunking=True))
    assert [b.count for b in batches] == [2, 1, 3]
    for batch, want in zip(batches, expected, strict=True):
        np.testing.assert_allclose(batch.dense, want, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_queue_server() -> Iterator[RunningServer]:
    """One request admitted at a time: a stream with more in flight gets RESOURCE_EXHAUSTED replies."""
    server = start_server("--max-queue-requests", "1")
    yield server
    server.stop()


def test_resource_exhausted_replies_are_retried_until_every_request_succeeds(tiny_queue_server, texts):
    requests = [pb.EmbedRequest(request_id=str(i), inputs=texts[i * 4 : i * 4 + 4]) for i in range(15)]
    replies = list(tiny_queue_server.stub().StreamEmbed(iter(requests), timeout=120))
    exhausted = [r for r in replies if r.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
    assert exhausted  # the raw stream really is refused some of the time
    unary = raw_dense(tiny_queue_server.stub().Embed(pb.EmbedRequest(inputs=texts[:60]), timeout=120))
    retry = StreamRetry(initial_backoff=0.01, max_backoff=0.2, timeout=60)
    with EmbeddingClient(tiny_queue_server.target, stream_retry=retry) as c:
        run = c.embed_stream_batches(texts[:60], batch_size=4, window=8)
        dense = np.concatenate([b.dense for b in run])
    np.testing.assert_allclose(dense, unary, atol=1e-6)
    assert run.stats.requests_resent > 0


# --- asyncio -------------------------------------------------------------------------------------


async def test_async_stream_from_an_async_generator_keeps_order(default_server, texts, expected):
    async def source() -> AsyncIterator[str]:
        for text in texts:
            yield text

    async with AsyncEmbeddingClient(default_server.target) as c:
        items = [item async for item in c.embed_stream(source(), batch_size=3, window=6, streams=3)]
    assert [item.index for item in items] == list(range(len(texts)))
    np.testing.assert_allclose(np.stack([item.dense for item in items]), expected, atol=1e-6)


async def test_async_stream_bounded_input_and_errors(default_server, texts):
    pulled = 0

    def generator() -> Iterator[str]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield f"w{i % 97}"

    async with AsyncEmbeddingClient(default_server.target) as c:
        run = c.embed_stream_batches(generator(), batch_size=10, window=2)
        handed_out = 0
        async with run:
            async for batch in run:
                handed_out += batch.count
                assert pulled - handed_out <= 2 * 2 * 10
                if handed_out >= 300:
                    break
        broken = c.embed_stream_batches([*texts[:6], "", *texts[6:9]], batch_size=3)
        seen = 0
        with pytest.raises(InvalidArgumentError) as error:
            async with broken:
                async for batch in broken:
                    seen += batch.count
    assert seen == 6 and error.value.offset == 6


def test_a_failing_input_raises_after_every_text_before_it(default_server, texts, expected):
    def source() -> Iterator[str]:
        yield from texts[:23]
        raise OSError("disk gone")

    got = []
    with EmbeddingClient(default_server.target) as c, pytest.raises(OSError, match="disk gone"):
        for item in c.embed_stream(source(), batch_size=5, window=2):
            got.append(item.dense)
    assert len(got) == 23  # including the partial batch 20..22
    np.testing.assert_allclose(np.stack(got), expected[:23], atol=1e-6)
    with EmbeddingClient(default_server.target) as c, pytest.raises(TypeError, match=r"inputs\[7\]"):
        list(c.embed_stream([*texts[:7], b"bytes"], batch_size=5))


def test_length_sorted_requests_come_back_in_input_order(default_server, texts, expected):
    with EmbeddingClient(default_server.target) as c:
        blocks = list(c.embed_stream_batches(iter(texts), batch_size=7, length_sort=50, streams=2))
        items = list(c.embed_stream(texts[:60], batch_size=4, length_sort=16))
    # each reply hands out the consecutive inputs it finished: contiguous chunks, in order, covering all
    assert [b.offset for b in blocks] == [sum(b.count for b in blocks[:i]) for i in range(len(blocks))]
    assert sum(b.count for b in blocks) == 240 and all(b.count > 0 for b in blocks)
    assert len(blocks) >= 240 // 7  # every reply finishes its oldest input, so each one hands out rows
    np.testing.assert_allclose(np.concatenate([b.dense for b in blocks]), expected, atol=1e-6)
    np.testing.assert_allclose(np.stack([i.dense for i in items]), expected[:60], atol=1e-6)
    assert [i.index for i in items] == list(range(60))


def test_a_bad_input_in_a_sorted_block_is_reported_at_its_real_position(default_server, texts):
    broken = list(texts[:40])
    broken[27] = ""  # the shortest text: sorted first in its block
    with EmbeddingClient(default_server.target) as c, pytest.raises(InvalidArgumentError) as error:
        list(c.embed_stream_batches(broken, batch_size=5, length_sort=20))
    assert (error.value.reason, error.value.field) == ("EMPTY_INPUT", "inputs")  # from the status details
    assert error.value.indices[error.value.index] == 27 and error.value.input_index == 27
    assert "(input #27 of the call)" in str(error.value)


async def test_async_length_sorted_stream(default_server, texts, expected):
    async def source() -> AsyncIterator[str]:
        for text in texts:
            yield text

    async with AsyncEmbeddingClient(default_server.target) as c:
        items = [item async for item in c.embed_stream(source(), batch_size=6, length_sort=64, streams=2)]
    assert [item.index for item in items] == list(range(len(texts)))
    np.testing.assert_allclose(np.stack([item.dense for item in items]), expected, atol=1e-6)


def test_streaming_on_a_closed_client_raises_instead_of_hanging(default_server):
    """The README once reused a client its ``with`` block had closed: the stream waited forever."""
    with EmbeddingClient(default_server.target) as client:
        client.embed(["open"])
    with pytest.raises(ValueError, match="Channel closed"):
        list(client.embed_stream_batches(["a", "b"], batch_size=1))
    with pytest.raises(ValueError, match="Channel closed"):
        list(client.embed_stream(["a", "b"], batch_size=1))


async def test_async_streaming_on_a_closed_client_raises_instead_of_hanging(default_server):
    async with AsyncEmbeddingClient(default_server.target) as client:
        await client.embed(["open"])
    with pytest.raises(grpc.aio.UsageError, match="Channel is closed"):
        async for _ in client.embed_stream_batches(["a", "b"], batch_size=1):
            pass
