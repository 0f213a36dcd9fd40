"""Errors as data over the wire (docs/contract.md "Error details", docs/errors.md).

Every failure of every RPC carries google.rpc details: ErrorInfo (reason,
domain, field and index), RequestInfo (the request id), BadRequest for
INVALID_ARGUMENT and RetryInfo for a full queue; StreamEmbed carries the same
in ``EmbedResponse.error.details``. Details are parsed with grpc_status, as a
client in any language would. An exception nobody expected is INTERNAL on
every RPC, with details too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from embedding_client.proto import embedding_pb2 as pb

from tests.support.engine import make_embedder, sentence
from tests.support.error_details import call_status, check_error_info, unpack
from tests.support.inprocess import serve_in_process
from tests.support.instrumented import CountingSessions
from tests.support.server import RunningServer, start_server


def failed(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.fixture(scope="module")
def small_server() -> Iterator[RunningServer]:
    server = start_server("--max-inputs", "2")
    yield server
    server.stop()


# (request fields, reason, field, index)
EMBED_CASES = {
    "no inputs": ({}, "EMPTY_INPUT", "inputs", None),
    "empty input": ({"inputs": ["a", "b", ""]}, "EMPTY_INPUT", "inputs", 2),
    "too long": ({"inputs": ["a", "word " * 300]}, "INPUT_TOO_LONG", "inputs", 1),
    "bad dimensions": ({"inputs": ["a"], "dimensions": 385}, "BAD_DIMENSIONS", "dimensions", None),
    "unknown task": ({"inputs": ["a"], "task": 99}, "UNKNOWN_TASK", "task", None),
    "unknown output": (
        {"inputs": ["a"], "outputs": [pb.OUTPUT_TYPE_DENSE, 42]},
        "UNKNOWN_OUTPUT",
        "outputs",
        1,
    ),
    "duplicate output": (
        {"inputs": ["a"], "outputs": [pb.OUTPUT_TYPE_BINARY, pb.OUTPUT_TYPE_BINARY]},
        "DUPLICATE_OUTPUT",
        "outputs",
        1,
    ),
    "sparse on MiniLM": (
        {"inputs": ["a"], "outputs": [pb.OUTPUT_TYPE_DENSE, pb.OUTPUT_TYPE_SPARSE]},
        "UNSUPPORTED_OUTPUT",
        "outputs",
        1,
    ),
    "blank late chunk": ({"inputs": ["a", " "], "late_chunking": True}, "EMPTY_CHUNK", "inputs", 1),
    "late document too long": (
        {"inputs": ["word " * 2100, "word " * 2100], "late_chunking": True},  # over 16 windows of 256
        "DOCUMENT_TOO_LONG",
        "inputs",
        None,
    ),
    "unknown model": ({"inputs": ["a"], "model": "nope"}, "UNKNOWN_MODEL", "model", None),
}


@pytest.mark.parametrize("case", list(EMBED_CASES), ids=list(EMBED_CASES))
def test_embed_errors_carry_details(default_server, case):
    fields, reason, field, index = EMBED_CASES[case]
    error = failed(lambda: default_server.stub().Embed(pb.EmbedRequest(**fields), timeout=30))
    check_error_info(call_status(error), reason, field, index)


def test_request_info_is_the_call_request_id(default_server):
    metadata = (("x-request-id", "trace-me-7"),)
    error = failed(lambda: default_server.stub().Embed(pb.EmbedRequest(), metadata=metadata, timeout=30))
    details = unpack(call_status(error))
    assert details["RequestInfo"].request_id == "trace-me-7"
    assert ("x-request-id", "trace-me-7") in error.trailing_metadata()


def test_tokenize_and_too_many_inputs_carry_details(small_server):
    stub = small_server.stub()
    error = failed(lambda: stub.Tokenize(pb.TokenizeRequest(inputs=["a", "b", "c"]), timeout=30))
    check_error_info(call_status(error), "TOO_MANY_INPUTS", "inputs")
    error = failed(lambda: stub.Tokenize(pb.TokenizeRequest(inputs=["a"], model="nope"), timeout=30))
    check_error_info(call_status(error), "UNKNOWN_MODEL", "model")


def test_malformed_request_names_the_field(default_server):
    call = default_server.channel().unary_unary(
        "/embedding.v1.EmbeddingService/Embed", request_serializer=bytes, response_deserializer=bytes
    )
    bad_second_input = b"\x1a\x01a" + b"\x1a\x02\xff\xfe"  # inputs[0] = "a", inputs[1] = bad UTF-8
    error = failed(lambda: call(bad_second_input, timeout=10))
    check_error_info(call_status(error), "MALFORMED_REQUEST", "inputs", 1)


def test_stream_errors_carry_details(default_server):
    requests = [
        pb.EmbedRequest(request_id="empty", inputs=["a", ""]),
        pb.EmbedRequest(request_id="model", inputs=["a"], model="nope"),
        pb.EmbedRequest(request_id="ok", inputs=["a"]),
    ]
    metadata = (("x-request-id", "stream-call-1"),)
    replies = {r.request_id: r for r in default_server.stub().StreamEmbed(iter(requests), metadata=metadata)}
    details = check_error_info(replies["empty"].error, "EMPTY_INPUT", "inputs", 1)
    assert details["RequestInfo"].request_id == "stream-call-1"
    check_error_info(replies["model"].error, "UNKNOWN_MODEL", "model")
    assert replies["ok"].error.code == 0 and not replies["ok"].error.details


def test_not_serving_and_unauthenticated_carry_details():
    server = start_server("--api-key", "sesame")
    try:
        stub = server.stub()
        for call in (
            lambda: stub.Embed(pb.EmbedRequest(inputs=["a"]), timeout=10),
            lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10),
            lambda: stub.Tokenize(pb.TokenizeRequest(inputs=["a"]), timeout=10),
            lambda: list(stub.StreamEmbed(iter([pb.EmbedRequest(inputs=["a"])]), timeout=10)),
        ):
            error = failed(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            check_error_info(call_status(error), "MISSING_API_KEY")
        wrong = (("authorization", "Bearer nope"),)
        error = failed(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=wrong, timeout=10))
        check_error_info(call_status(error), "INVALID_API_KEY")
    finally:
        server.stop()


async def test_not_serving_is_unavailable_with_details(builtin):
    from embedding_server.grpc_api.state import Phase

    embedder, _ = make_embedder(builtin)
    async with serve_in_process(embedder, observed=True) as server:
        server.state.phase = Phase.DRAINING
        for call in (
            server.stub.Embed(pb.EmbedRequest(inputs=["a"]), timeout=10),
            server.stub.ListModels(pb.ListModelsRequest(), timeout=10),
            server.stub.Tokenize(pb.TokenizeRequest(inputs=["a"]), timeout=10),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            check_error_info(call_status(info.value), "NOT_SERVING")
        replies = [
            r async for r in server.stub.StreamEmbed(iter([pb.EmbedRequest(request_id="1", inputs=["a"])]))
        ]
        assert replies[0].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        check_error_info(replies[0].error, "NOT_SERVING")
        server.state.phase = Phase.SERVING


async def test_queue_full_carries_retry_info(builtin):
    embedder, sessions = make_embedder(builtin, max_queue_requests=1)
    async with serve_in_process(embedder, observed=True) as server:
        sessions.hold()
        admitted = asyncio.ensure_future(server.stub.Embed(pb.EmbedRequest(inputs=[sentence(1)]), timeout=30))
        await asyncio.to_thread(sessions.entered.acquire)  # the one admitted request is running
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await server.stub.Embed(pb.EmbedRequest(inputs=["excess"]), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = check_error_info(call_status(info.value), "QUEUE_FULL")
        assert details["RetryInfo"].retry_delay.ToNanoseconds() > 0
        replies = [
            r
            async for r in server.stub.StreamEmbed(iter([pb.EmbedRequest(request_id="x", inputs=["excess"])]))
        ]
        assert "RetryInfo" in check_error_info(replies[0].error, "QUEUE_FULL")
        sessions.release()
        await admitted


def test_deadline_in_queue_maps_to_details():
    """Over the wire the caller's own deadline fires first; the mapping itself is checked here."""
    from embedding_server.errors import DeadlineExpired
    from embedding_server.grpc_api.status import to_rpc_status

    status = to_rpc_status(DeadlineExpired("deadline exceeded while queued"), request_id="r-1")
    assert status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    details = check_error_info(status, "DEADLINE_EXCEEDED_IN_QUEUE")
    assert details["RequestInfo"].request_id == "r-1" and "RetryInfo" not in details


class FailingSessions(CountingSessions):
    """A real pool whose runs raise: a bug the servicer did not expect."""

    def run(self, slot, output_names, feeds, wide=False):
        self.runs.append(None)  # type: ignore[arg-type]  # proves the failing path ran
        raise RuntimeError("injected failure")


async def test_unexpected_exception_is_internal_everywhere(builtin, caplog):
    from embedding_server.engine.embedder import Embedder
    from embedding_server.engine.tuning import BatchSettings, EngineSettings
    from embedding_server.models.loader import LoadedModel

    sessions = FailingSessions(builtin.sessions)
    loaded = LoadedModel(model=builtin.model, sessions=sessions)  # type: ignore[arg-type]
    embedder = Embedder([loaded], EngineSettings(batch=BatchSettings()))  # type: ignore[arg-type]
    async with serve_in_process(embedder, observed=True) as server:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await server.stub.Embed(pb.EmbedRequest(inputs=["a"]), metadata=(("x-request-id", "bug-1"),))
        assert info.value.code() == grpc.StatusCode.INTERNAL  # not UNKNOWN
        assert "RuntimeError" in info.value.details() and "injected" not in info.value.details()
        details = check_error_info(call_status(info.value), "INTERNAL")
        assert details["RequestInfo"].request_id == "bug-1"
        replies = [
            r async for r in server.stub.StreamEmbed(iter([pb.EmbedRequest(request_id="s", inputs=["b"])]))
        ]
        assert replies[0].error.code == grpc.StatusCode.INTERNAL.value[0]
        check_error_info(replies[0].error, "INTERNAL")
    assert len(sessions.runs) >= 2
    logged = [r for r in caplog.records if r.exc_info and getattr(r, "request_id", None) == "bug-1"]
    assert logged and "injected failure" in str(logged[0].exc_info[1])
