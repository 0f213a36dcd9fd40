"""``embedding-rest``: the REST shim as its own process, in front of a remote gRPC server.

Use it to scale HTTP termination apart from the models, or to put the shim
next to clients while the servers run elsewhere. Flags (each also an
environment variable ``EMBEDDING_REST_<FLAG>``, e.g. ``EMBEDDING_REST_TARGET``):

- ``--target HOST:PORT``: the gRPC server (anything gRPC takes, ``dns:///...`` too);
- ``--host`` / ``--port``: where to listen (default ``0.0.0.0:8000``);
- ``--api-key`` (repeatable) / ``--api-key-file``: keys the shim itself
  requires, checked before any gRPC call; the client's ``Authorization`` header
  is passed on to the target as gRPC metadata either way;
- ``--target-api-key``: send this key to the target instead of the client's header;
- ``--target-tls`` / ``--target-ca FILE``: TLS to the target (system roots or this CA);
- ``--tls-cert`` / ``--tls-key``: serve HTTPS;
- ``--max-body-mb``: largest request body (413 above);
- ``--otlp-endpoint URL``: OpenTelemetry traces, as in ``embedding-server``
  (the OTEL_* variables work too); the trace context goes on to the target.

/health asks the target's ``grpc.health.v1`` service, and answers 503 once
SIGTERM has started the drain. /metrics has the REST call series the in-process
shim exports (``embedding_requests_total{method="POST /v1/embeddings",code}``,
``embedding_request_seconds``) and the process collectors, behind the same key.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from embedding_client.envflags import OneLineParser, apply_environment, port_number

from ..auth import ApiKeys
from ..errors import StartupError
from ..metrics import CallMetrics, metrics_route
from ..settings import DEFAULTS, LOG_LEVELS, DefaultsShown
from ..tls import TlsConfigError, load_tls
from ..tracing import Tracing, configure
from .app import build_app
from .serving import RestServer, bind
from .upstream import Upstream

ENV_PREFIX = "EMBEDDING_REST_"
log = logging.getLogger("embedding_rest")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="embedding-rest",
        formatter_class=DefaultsShown,
        description="OpenAI-compatible REST shim in front of an embedding-server gRPC target. "
        f"Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG>.",
    )
    add = p.add_argument
    add("--target", required=False, help="gRPC target of the embedding server, e.g. 10.0.0.5:50051")
    add("--host", default=DEFAULTS.host, help="address to listen on")
    add("--port", type=port_number, default=DEFAULTS.rest_port, help="port to listen on")
    add("--api-key", dest="api_keys", action="append", default=[], help="require this key; repeatable")
    add("--api-key-file", default=None, help="file with accepted API keys, one per line")
    add("--target-api-key", default=None, help="key sent to the target (default: the client's header)")
    add("--target-tls", action=argparse.BooleanOptionalAction, default=False, help="TLS to the target")
    add("--target-ca", default=None, help="PEM CA bundle for the target's certificate (implies --target-tls)")
    add("--tls-cert", default=None, help="PEM certificate chain: serve HTTPS")
    add("--tls-key", default=None, help="PEM private key for --tls-cert")
    add(
        "--max-body-mb",
        type=float,
        default=DEFAULTS.rest_max_body_mb,
        help="largest request body in MiB; more is 413",
    )
    add(
        "--auto-truncate",
        action=argparse.BooleanOptionalAction,
        default=DEFAULTS.auto_truncate,
        help="requests without a truncate field cut over-long inputs instead of a 400",
    )
    add(
        "--otlp-endpoint",
        default=None,
        metavar="URL",
        help="send OpenTelemetry traces over OTLP/gRPC to this collector, e.g. http://otel-collector:4317 "
        "(default: off, unless OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_TRACES_EXPORTER ask for it)",
    )
    add(
        "--log-level",
        default=DEFAULTS.log_level,
        choices=LOG_LEVELS,
        help="log level",
    )
    return p


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    apply_environment(parser, os.environ if environ is None else environ, ENV_PREFIX)
    args = parser.parse_args(argv)
    if not args.target:
        parser.error("--target is required (or EMBEDDING_REST_TARGET)")
    if args.max_body_mb <= 0:
        parser.error("--max-body-mb: must be positive")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    return args


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if args.target_ca:
        return grpc.ssl_channel_credentials(root_certificates=Path(args.target_ca).read_bytes())
    return grpc.ssl_channel_credentials() if args.target_tls else None


def _prepare(args: argparse.Namespace, tracing: Tracing | None) -> tuple[Upstream, RestServer]:
    try:
        api_keys = ApiKeys.from_sources(args.api_keys, args.api_key_file)
    except OSError as exc:
        raise StartupError(
            f"--api-key-file: cannot read {args.api_key_file} ({exc.strerror or exc})"
        ) from exc
    try:
        credentials = _credentials(args)
    except OSError as exc:
        raise StartupError(f"--target-ca: cannot read {args.target_ca} ({exc.strerror or exc})") from exc
    upstream = Upstream(
        args.target, credentials=credentials, target_api_key=args.target_api_key, tracing=tracing
    )
    metrics = CallMetrics()
    app = build_app(
        upstream,
        api_keys,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        routes=[metrics_route(metrics, api_keys)],
        observe=metrics.observe_call,
        auto_truncate=args.auto_truncate,
        tracing=tracing,
    )
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        raise StartupError(
            f"--port: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})"
        ) from exc
    try:
        tls = load_tls(args.tls_cert, args.tls_key, None)
    except TlsConfigError as exc:
        sock.close()
        raise StartupError(str(exc)) from None
    try:
        return upstream, RestServer(app, sock, tls)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        sock.close()
        raise StartupError(f"--tls-cert/--tls-key: cannot serve HTTPS ({exc})") from exc


async def run(args: argparse.Namespace) -> int:
    tracing = configure(args.otlp_endpoint, service_name="embedding-rest")
    try:
        return await _serve(args, tracing)
    finally:
        if tracing is not None:
            tracing.shutdown()  # export what is buffered


async def _serve(args: argparse.Namespace, tracing: Tracing | None) -> int:
    upstream, server = _prepare(args, tracing)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    log.info("REST shim on %s:%d -> gRPC %s", args.host, server.port, args.target)
    await stop.wait()
    upstream.draining = True  # /health says 503 from now on
    log.info("shutting down: finishing requests in flight")
    await server.stop()
    await upstream.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return asyncio.run(run(args))
    except StartupError as exc:
        print(f"embedding-rest: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
