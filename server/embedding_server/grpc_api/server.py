"""Assembling the grpc.aio server: the service, health, reflection and options."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from embedding_client.proto import embedding_pb2 as pb
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .servicer import EmbeddingServicer, safe_parser

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def embedding_handler(servicer: EmbeddingServicer) -> grpc.GenericRpcHandler:
    """Method handlers with parsers that turn undecodable bytes into INVALID_ARGUMENT, not INTERNAL,
    and a serializer that sends a reply already written as bytes (convert.encoded_response) as it is."""
    serialize = lambda message: message if isinstance(message, bytes) else message.SerializeToString()  # noqa: E731
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Embed": grpc.unary_unary_rpc_method_handler(servicer.Embed, safe_parser(pb.EmbedRequest), serialize),
        "StreamEmbed": grpc.stream_stream_rpc_method_handler(
            servicer.StreamEmbed, safe_parser(pb.EmbedRequest), serialize
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, safe_parser(pb.ListModelsRequest), serialize
        ),
        "Tokenize": grpc.unary_unary_rpc_method_handler(
            servicer.Tokenize, safe_parser(pb.TokenizeRequest), serialize
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def build_server(
    servicer: EmbeddingServicer,
    health_servicer: health.aio.HealthServicer,
    max_message_bytes: int,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # accept 10 s client keepalives
        ],
    )
    server.add_generic_rpc_handlers([embedding_handler(servicer)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    return server


async def set_health(health_servicer: health.aio.HealthServicer, status: int) -> None:
    for service in HEALTH_SERVICES:
        await health_servicer.set(service, status)
