"""Production channel settings: keepalive, message limits, retries, balancing, TLS, API key.

Retries of unary calls and load balancing live in the gRPC *service config*,
so grpc-core does them (with jittered exponential backoff) for sync and asyncio
channels alike. StreamEmbed is left out of the retry policy: grpc can only
replay a stream before its first reply, so the stream driver re-sends the
unanswered requests itself (see ``stream_sync`` / ``stream_async``).

``round_robin`` spreads calls over every address a target resolves to
(``ipv4:10.0.0.1:50051,10.0.0.2:50051``, ``dns:///svc:50051``), and client-side
health checking (``healthCheckConfig``) takes a replica out of rotation as soon
as its health service says NOT_SERVING, e.g. while it drains on SIGTERM.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

SERVICE = "embedding.v1.EmbeddingService"
UNARY_METHODS = ("Embed", "ListModels", "Tokenize")
MiB = 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """grpc-core's retry policy for unary calls (gRFC A6)."""

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")

    def as_config(self) -> dict[str, object]:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff}s",
            "maxBackoff": f"{self.max_backoff}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(self.retryable_codes),
        }


@dataclass(frozen=True)
class ChannelSettings:
    """Everything about the connection, apart from the target."""

    tls: bool = False
    root_certificates: bytes | str | Path | None = None  # PEM; None: the system's roots
    client_certificate: bytes | str | Path | None = None  # mTLS chain, PEM
    client_key: bytes | str | Path | None = None  # mTLS key, PEM
    server_name: str | None = None  # TLS name to verify when it differs from the target's host
    api_key: str | None = None
    max_message_bytes: int = 256 * MiB  # a 2048-input bge-m3 ColBERT reply is large
    keepalive_time_ms: int = 30_000  # >= the server's 10 s minimum ping interval
    keepalive_timeout_ms: int = 10_000
    load_balancing: str = "round_robin"
    health_check: bool = True
    retry: RetryPolicy | None = RetryPolicy()
    extra_options: tuple[tuple[str, object], ...] = ()

    def service_config(self) -> str:
        config: dict[str, object] = {"loadBalancingConfig": [{self.load_balancing: {}}]}
        if self.retry is not None:
            config["methodConfig"] = [
                {
                    "name": [{"service": SERVICE, "method": m} for m in UNARY_METHODS],
                    "retryPolicy": self.retry.as_config(),
                }
            ]
        if self.health_check:
            config["healthCheckConfig"] = {"serviceName": SERVICE}
        return json.dumps(config)

    def options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.enable_retries", 1 if self.retry is not None else 0),
            ("grpc.service_config", self.service_config()),
            # Fail fast and let our backoff decide when a dead replica is tried again.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        options.extend(self.extra_options)
        return options

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for plaintext."""
        if not (self.tls or self.root_certificates or self.client_certificate):
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.client_key),
            certificate_chain=_pem(self.client_certificate),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer token, when there is one.

        Sent as metadata rather than call credentials so that it also works on
        plaintext channels inside a cluster.
        """
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


def _pem(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes from bytes, PEM text, or a file path."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and "-----BEGIN" in value:
        return value.encode()
    return Path(value).read_bytes()


def sync_channel(target: str, settings: ChannelSettings) -> grpc.Channel:
    credentials = settings.credentials()
    if credentials is None:
        return grpc.insecure_channel(target, options=settings.options())
    return grpc.secure_channel(target, credentials, options=settings.options())


def aio_channel(target: str, settings: ChannelSettings) -> grpc.aio.Channel:
    credentials = settings.credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=settings.options())
    return grpc.aio.secure_channel(target, credentials, options=settings.options())


def count_addresses(target: str) -> int | None:
    """How many addresses a target lists explicitly (``ipv4:a,b`` → 2); None when a resolver decides."""
    scheme, sep, rest = target.partition(":")
    if sep and scheme in ("ipv4", "ipv6", "unix"):
        return len([a for a in rest.split(",") if a.strip()])
    if "://" in target or target.startswith(("dns:", "xds:")):
        return None
    return 1


def join_metadata(*parts: Sequence[tuple[str, str]] | None) -> tuple[tuple[str, str], ...]:
    return tuple(item for part in parts if part for item in part)
