"""The in-process REST shim's backend: the servicer's embed step, in this process (rest/backend.py)."""

from __future__ import annotations

import time

from embedding_client.proto import embedding_pb2 as pb

from ..call_context import current, timing_headers
from ..grpc_api.interceptors import InFlight
from ..grpc_api.servicer import EmbeddingServicer
from ..grpc_api.status import as_service_error, to_rpc_status
from ..models.types import Priority
from .errors import from_grpc


class LocalBackend:
    """The REST shim's way into the Embedder of its own process."""

    def __init__(self, servicer: EmbeddingServicer, in_flight: InFlight) -> None:
        """``in_flight``: the calls a drain waits for, gRPC's and these alike."""
        self.servicer = servicer
        self.in_flight = in_flight

    async def embed(
        self,
        request: pb.EmbedRequest,
        authorization: str | None,
        output_fields: list[str],
        request_id: str | None = None,
        flow: str | None = None,
    ) -> tuple[pb.EmbedResponse, dict[str, str]]:
        """``authorization`` was checked by the REST layer, which made the call's ``CallContext``
        current (rest/app.py): the engine's time adds up there. ``request_id`` is that call's."""
        started = time.perf_counter()
        call = current()
        assert call is not None, "the REST layer (rest/app.py _observed) opens every call"
        self.in_flight.enter()
        try:
            reply = await self.servicer.embed_message(
                request, None, Priority.INTERACTIVE, None if flow is None else ("rest", flow)
            )
        except Exception as exc:
            error = as_service_error(exc, "REST embeddings")
            raise from_grpc(to_rpc_status(error, call.request_id), output_fields) from None
        finally:
            self.in_flight.leave()
        return reply, dict(timing_headers(call, started))

    async def list_models(self, authorization: str | None) -> pb.ListModelsResponse:
        try:
            return self.servicer.models_message()
        except Exception as exc:
            raise from_grpc(to_rpc_status(as_service_error(exc, "REST models"))) from None

    async def serving(self) -> bool:
        return self.servicer.state.serving

    async def close(self) -> None:
        """Nothing to close: the servicer belongs to the server."""
