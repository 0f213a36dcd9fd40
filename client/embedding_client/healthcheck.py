"""``embedding-healthcheck``: ask a server's grpc.health.v1 service whether it is SERVING.

Made for container health checks (Docker ``HEALTHCHECK``, Kubernetes exec
probes where native gRPC probes cannot be used, e.g. with TLS): one line
on stdout, exit status 0 when SERVING and 1 otherwise (NOT_SERVING, unknown
service, unreachable, timeout), as Docker expects.

The target defaults to ``127.0.0.1:$EMBEDDING_PORT`` (50051 when unset), so
inside the server's container it needs no arguments. Every flag can also be
set as ``EMBEDDING_HEALTHCHECK_<FLAG>`` (e.g. ``EMBEDDING_HEALTHCHECK_TLS_CA``).
Health needs no API key.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .envflags import OneLineParser, apply_environment, parse_value, port_number

ENV_PREFIX = "EMBEDDING_HEALTHCHECK_"
EXIT_SERVING = 0
EXIT_UNHEALTHY = 1


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="embedding-healthcheck",
        description="Exit 0 when the embedding server's gRPC health service answers SERVING, else 1. "
        f"Flags can also be set as {ENV_PREFIX}<FLAG>.",
    )
    p.add_argument("--target", help="gRPC address (default 127.0.0.1:$EMBEDDING_PORT, or :50051)")
    p.add_argument(
        "--service", default="", help='health service name: "" (the server) or embedding.v1.EmbeddingService'
    )
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    p.add_argument("--tls-ca", help="PEM CA bundle to verify the server")
    p.add_argument("--tls-cert", help="PEM client certificate (mTLS)")
    p.add_argument("--tls-key", help="PEM client key (mTLS)")
    p.add_argument(
        "--tls-server-name",
        help="name to verify in the server certificate, when it differs from the target host",
    )
    try:  # the server's own port variable, so that the probe needs no flag in its container
        port = parse_value("EMBEDDING_PORT", environ.get("EMBEDDING_PORT", "50051"), port_number)
    except ValueError as exc:
        p.error(str(exc))
    p.set_defaults(target=f"127.0.0.1:{port}")
    apply_environment(p, environ, ENV_PREFIX)
    return p


def _read(flag: str, path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(_say(f"{flag} {path}: cannot read it ({exc.strerror or exc})")) from None


def _say(line: str) -> int:
    print(line, flush=True)
    return EXIT_UNHEALTHY


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to ``args.target``, plaintext or TLS as the flags say."""
    if not (args.tls or args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.target)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit(_say("--tls-cert and --tls-key go together"))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read("--tls-ca", args.tls_ca),
        private_key=_read("--tls-key", args.tls_key),
        certificate_chain=_read("--tls-cert", args.tls_cert),
    )
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.target, credentials, options=options)


def check(args: argparse.Namespace) -> int:
    """Ask once; print the status (or why there is none) and return the exit status."""
    with open_channel(args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            # types-grpcio-health-checking declares no methods on HealthStub (its __init__ sets them).
            reply = stub.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else None
            if code == grpc.StatusCode.NOT_FOUND:
                return _say(f"{args.target}: unknown health service {args.service!r}")
            detail = error.details() if hasattr(error, "details") else str(error)
            name = code.name if code is not None else "ERROR"
            return _say(f"{args.target}: {name}: {(detail or '').splitlines()[0] if detail else name}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}", flush=True)
    return EXIT_SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_UNHEALTHY


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser(os.environ if environ is None else environ).parse_args(argv)
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
