"""The drain race: a client that sends again the moment its previous call returns, during a drain.

The contract: every call that reaches the server during a drain ends OK
(admitted before it) or UNAVAILABLE (after), never CANCELLED, which no retry
policy retries. The race is at the end of the drain: when the last call in
flight finishes, the server stops, and calls gRPC has accepted but not yet
handed to the application must still get UNAVAILABLE.
"""

from __future__ import annotations

import signal
import threading

import grpc
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc

from tests.support.polling import until_sync
from tests.support.server import start_server

LOOPS = 8


class EagerClient:
    """Sends one Embed the moment the previous one returns, on its own connection, until one is not OK.

    When the drain begins, each client's call in flight finishes OK and its
    next call arrives at once: the last of those arrives just as the server
    is ready to stop.
    """

    def __init__(self, target: str) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]  # its own connection, as separate clients have
        self.channel = grpc.insecure_channel(target, options=options)
        self.stub = embedding_pb2_grpc.EmbeddingServiceStub(self.channel)
        self.codes: list[grpc.StatusCode] = []
        self.details: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.stub.Embed(pb.EmbedRequest(inputs=["again and again"]), timeout=30)
                self.codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                self.codes.append(error.code())
                self.details.append(error.details() or "")
                return  # a real client now goes to another replica


def test_calls_during_a_drain_end_ok_or_unavailable_never_cancelled():
    server = start_server("--grace-period", "60")
    clients = [EagerClient(server.target) for _ in range(LOOPS)]
    try:
        for client in clients:
            client.thread.start()
        until_sync(lambda: all(len(c.codes) >= 20 for c in clients), "every client's calls answered")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        for client in clients:
            client.thread.join(timeout=60)
    finally:
        for client in clients:
            client.stop.set()
        server.stop()
    codes = [code for client in clients for code in client.codes]
    assert grpc.StatusCode.OK in codes
    assert all(c.codes[-1] != grpc.StatusCode.OK for c in clients)  # every client met the drain
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, {
        code: codes.count(code) for code in set(codes)
    }
