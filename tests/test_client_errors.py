"""The client's core: typed errors read from status details, request ids, settings merging, timeouts.

Errors are provoked on a real server; what the client reports is checked
against the raw call's own details (grpc_status), never against the message.
"""

from __future__ import annotations

import pickle

import grpc
import pytest
from embedding_client import (
    USE_CLIENT_DEFAULT,
    AsyncEmbeddingClient,
    ChannelSettings,
    EmbeddingClient,
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
)
from embedding_client.errors import ErrorDetails, from_status, status_of
from embedding_client.proto import embedding_pb2 as pb
from google.rpc import status_pb2

from tests.support.keyed import KEY
from tests.support.server import RunningServer


def raw_details(server: RunningServer, request: pb.EmbedRequest) -> ErrorDetails:
    """What the server's own status details say for this request (read without the client)."""
    with pytest.raises(grpc.RpcError) as info:
        server.stub().Embed(request, timeout=30)
    return ErrorDetails.of(status_of(info.value))


# --- errors as data -------------------------------------------------------------------------------


def test_unary_errors_expose_reason_field_index_and_request_id(default_server):
    with EmbeddingClient(default_server.target) as client:
        with pytest.raises(InvalidArgumentError) as bad:
            client.embed(["fine", "word " * 300])
        with pytest.raises(NotFoundError) as missing:
            client.tokenize(["x"], model="no-such-model")
    error = bad.value
    assert (error.reason, error.field, error.index, error.input_index) == ("INPUT_TOO_LONG", "inputs", 1, 1)
    assert error.request_id and len(error.request_id) == 32  # the server's fresh id for the call
    assert default_server.logged(f"[request_id={error.request_id}]")  # the same id the logs carry
    raw = raw_details(default_server, pb.EmbedRequest(inputs=["fine", "word " * 300]))
    assert (raw.reason, raw.field, raw.index) == (error.reason, error.field, error.index)
    assert (missing.value.reason, missing.value.field, missing.value.index) == (
        "UNKNOWN_MODEL",
        "model",
        None,
    )


async def test_async_errors_expose_the_same_details(default_server):
    async with AsyncEmbeddingClient(default_server.target, batch_size=2) as client:
        with pytest.raises(InvalidArgumentError) as bad:
            await client.embed(["a", "b", "c", ""])  # the second request's inputs[1]
        with pytest.raises(InvalidArgumentError) as dims:
            await client.embed(["a"], dimensions=10_000)
    error = bad.value
    assert (error.reason, error.field, error.index, error.offset, error.input_index) == (
        "EMPTY_INPUT",
        "inputs",
        1,
        2,
        3,
    )
    assert error.request_id and "(input #3 of the call)" in str(error)
    assert (dims.value.reason, dims.value.field, dims.value.index) == ("BAD_DIMENSIONS", "dimensions", None)


def test_stream_errors_expose_details(default_server):
    texts = ["a", "b", "c", "d", "e", "", "g"]
    with EmbeddingClient(default_server.target) as client:
        batches = list(client.embed_stream_batches(texts, batch_size=3, on_error="yield"))
    (failed,) = [b for b in batches if b.error is not None]
    error = failed.error
    assert (error.reason, error.field, error.index, error.input_index) == ("EMPTY_INPUT", "inputs", 2, 5)
    assert error.request_id


def test_unauthenticated_reasons(keyed_server):
    with EmbeddingClient(keyed_server.target) as anonymous, pytest.raises(UnauthenticatedError) as missing:
        anonymous.list_models()
    with (
        EmbeddingClient(keyed_server.target, api_key="wrong") as wrong,
        pytest.raises(UnauthenticatedError) as bad,
    ):
        wrong.tokenize("x")
    assert (missing.value.reason, bad.value.reason) == ("MISSING_API_KEY", "INVALID_API_KEY")


def test_a_status_without_details_has_no_reason_whatever_its_message():
    status = status_pb2.Status(
        code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="inputs[3]: looks parseable"
    )
    error = from_status(status)
    assert isinstance(error, InvalidArgumentError)
    assert (error.reason, error.field, error.index, error.request_id) == (None, None, None, None)


def test_errors_pickle_with_their_details(default_server):
    with EmbeddingClient(default_server.target) as client, pytest.raises(InvalidArgumentError) as bad:
        client.embed(["", "x"])
    copy = pickle.loads(pickle.dumps(bad.value))
    fields = ("code", "message", "reason", "field", "index", "request_id", "retry_after", "offset")
    assert [getattr(copy, f) for f in fields] == [getattr(bad.value, f) for f in fields]


# --- request ids on results -----------------------------------------------------------------------


def test_results_carry_the_servers_request_ids(default_server):
    with EmbeddingClient(default_server.target, batch_size=2) as client:
        one = client.embed(["a"])
        split = client.embed(["a", "b", "c", "d", "e"])
    assert one.request_id and default_server.logged(f"[request_id={one.request_id}]")
    assert len(split.request_ids) == 3 and len(set(split.request_ids)) == 3
    assert split.request_id == split.request_ids[0]


def test_stream_results_carry_the_stream_calls_request_id(default_server):
    with EmbeddingClient(default_server.target) as client:
        batches = list(client.embed_stream_batches(["a", "b", "c"], batch_size=2))
    ids = {b.request_id for b in batches}
    assert len(ids) == 1 and None not in ids  # one call, one id, on every batch
    assert default_server.logged(f"[request_id={ids.pop()}]")


async def test_async_stream_results_carry_request_ids(default_server):
    async with AsyncEmbeddingClient(default_server.target) as client:
        batches = [b async for b in client.embed_stream_batches(["a", "b", "c"], batch_size=2)]
    assert all(b.request_id for b in batches) and len({b.request_id for b in batches}) == 1


async def test_async_results_carry_request_ids(default_server):
    async with AsyncEmbeddingClient(default_server.target, batch_size=2) as client:
        result = await client.embed(["a", "b", "c"])
    assert len(result.request_ids) == 2 and all(
        default_server.logged(f"[request_id={i}]") for i in result.request_ids
    )


# --- settings merging -----------------------------------------------------------------------------


def test_settings_and_a_conflicting_argument_are_refused():
    with pytest.raises(ValueError, match="api_key"):
        EmbeddingClient("localhost:1", api_key="a", settings=ChannelSettings(api_key="b"))
    with pytest.raises(ValueError, match="server_name"):
        AsyncEmbeddingClient("localhost:1", server_name="x", settings=ChannelSettings(server_name="y"))


def test_an_api_key_beside_settings_is_kept_and_sent(keyed_server):
    settings = ChannelSettings(retry=None, health_check=False)
    with EmbeddingClient(keyed_server.target, api_key=KEY, settings=settings) as client:
        assert client.settings.api_key == KEY and client.settings.retry is None
        assert client.embed(["x"]).dense.shape == (1, 384)  # was UNAUTHENTICATED: settings= dropped the key
    same = ChannelSettings(api_key=KEY)
    with EmbeddingClient(keyed_server.target, api_key=KEY, settings=same) as client:  # the same value twice
        assert client.list_models()


# --- timeouts -------------------------------------------------------------------------------------


class RecordTimeouts(grpc.UnaryUnaryClientInterceptor):
    """Records the deadline each call goes out with (None: no deadline), on a real channel."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    def intercept_unary_unary(self, continuation, client_call_details, request):
        self.timeouts.append(client_call_details.timeout)
        return continuation(client_call_details, request)


class AsyncRecordTimeouts(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        self.timeouts.append(client_call_details.timeout)
        return await continuation(client_call_details, request)


def test_timeout_sentinel_and_none_mean_the_same_on_every_method(default_server):
    recorder = RecordTimeouts()
    channel = grpc.intercept_channel(grpc.insecure_channel(default_server.target), recorder)
    with EmbeddingClient(default_server.target, timeout=7.0, channel=channel) as client:
        for timeout in (USE_CLIENT_DEFAULT, None, 3.0):
            client.embed(["x"], timeout=timeout)
            client.list_models(timeout=timeout)
            client.tokenize("x", timeout=timeout)
        client.embed(["x"])  # the default is the client's timeout
    assert recorder.timeouts == [7.0] * 3 + [None] * 3 + [3.0] * 3 + [7.0]
    with EmbeddingClient(default_server.target, timeout=None, channel=channel) as no_deadline:
        no_deadline.embed(["x"])
        no_deadline.list_models()
    assert recorder.timeouts[-2:] == [None, None]
    channel.close()


async def test_async_timeouts(default_server):
    recorder = AsyncRecordTimeouts()
    channel = grpc.aio.insecure_channel(default_server.target, interceptors=[recorder])
    async with AsyncEmbeddingClient(default_server.target, timeout=5.0, channel=channel) as client:
        await client.embed(["x"])
        await client.embed(["x"], timeout=None)
        await client.list_models(timeout=2.0)
        await client.tokenize("x", timeout=None)
    assert recorder.timeouts == [5.0, None, 2.0, None]
    await channel.close()


@pytest.mark.parametrize("bad", [0, -1.0, True])
def test_a_timeout_must_be_positive_or_none(bad):
    with pytest.raises(ValueError, match="timeout"):
        EmbeddingClient("localhost:1", timeout=bad)
    with EmbeddingClient("localhost:1") as client, pytest.raises(ValueError, match="timeout"):
        client.embed(["x"], timeout=bad)


@pytest.mark.parametrize("message", ["Received message larger than max", "queue full", ""])
def test_stream_retry_reads_the_reason_not_the_message(message):
    from embedding_client.errors import error_for
    from embedding_client.retry import stream_error_is_retryable

    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not stream_error_is_retryable(error_for(exhausted, message))  # gRPC's size limit: no details
    assert stream_error_is_retryable(error_for(exhausted, message, details=ErrorDetails(reason="QUEUE_FULL")))
    assert stream_error_is_retryable(error_for(grpc.StatusCode.UNAVAILABLE, message))
