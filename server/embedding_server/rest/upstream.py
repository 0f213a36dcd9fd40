"""``embedding-rest``'s backend: one grpc.aio channel to a remote embedding server.

Every REST call is an ordinary gRPC call, so the server's interceptors
(auth, metrics) and validation apply to it exactly as to gRPC. (The shim
inside ``embedding-server`` calls its engine directly: rest/backend.py.)
"""

from __future__ import annotations

import grpc
from embedding_client.errors import status_of
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..call_context import TIMING_KEYS
from ..tracing import Tracing
from .errors import from_grpc

Metadata = tuple[tuple[str, str], ...]

CHANNEL_OPTIONS = [
    # Replies can be large (ColBERT: tokens x 1024 floats per input); requests are capped by the body limit.
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]


def _is_metadata_safe(value: str) -> bool:
    return value.isascii() and value.isprintable()


class Upstream:
    """A ``Backend`` (rest/backend.py): Embed, ListModels and health on the target; gRPC errors
    become RestError."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        target_api_key: str | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """``tracing``: pass the current trace context on in each call's metadata (``traceparent``)."""
        self.target = target
        self.tracing = tracing
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self.stub = embedding_pb2_grpc.EmbeddingServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._fixed_auth: Metadata | None = (
            (("authorization", f"Bearer {target_api_key}"),) if target_api_key else None
        )
        self.draining = False  # set by the standalone shim on SIGTERM

    def metadata(self, authorization: str | None) -> Metadata:
        """``--target-api-key`` when set, else the client's own Authorization header, passed on;
        and the trace context when tracing is on."""
        metadata: Metadata = ()
        if self._fixed_auth is not None:
            metadata = self._fixed_auth
        elif authorization and _is_metadata_safe(authorization):
            metadata = (("authorization", authorization),)
        if self.tracing is not None:
            metadata = self.tracing.inject(metadata)
        return metadata

    async def embed(
        self,
        request: pb.EmbedRequest,
        authorization: str | None,
        output_fields: list[str],
        request_id: str | None = None,
        flow: str | None = None,
    ) -> tuple[pb.EmbedResponse, dict[str, str]]:
        """The reply, and the call's trailers worth passing on as HTTP headers (request id, timings).

        ``flow`` is not sent: the server takes a caller's connection as its fair-share flow and
        trusts no header for it, so every client of this shim shares the shim's channel's share.
        """
        metadata = self.metadata(authorization)
        if request_id and _is_metadata_safe(request_id):
            metadata = (*metadata, ("x-request-id", request_id))
        call = self.stub.Embed(request, metadata=metadata)
        try:
            reply = await call
        except grpc.aio.AioRpcError as error:
            raise from_grpc(status_of(error), output_fields) from None
        trailers = await call.trailing_metadata() or ()
        return reply, {key: value for key, value in trailers if key in TIMING_KEYS}

    async def list_models(self, authorization: str | None) -> pb.ListModelsResponse:
        try:
            reply: pb.ListModelsResponse = await self.stub.ListModels(
                pb.ListModelsRequest(), metadata=self.metadata(authorization)
            )
            return reply
        except grpc.aio.AioRpcError as error:
            raise from_grpc(status_of(error)) from None

    async def serving(self) -> bool:
        """The target's grpc.health.v1 answer (no auth needed there), until the drain starts."""
        if self.draining:
            return False
        try:
            # types-grpcio-health-checking declares no methods on HealthStub (its __init__ sets them).
            check = self._health.Check  # type: ignore[attr-defined]
            reply: health_pb2.HealthCheckResponse = await check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self.channel.close()
