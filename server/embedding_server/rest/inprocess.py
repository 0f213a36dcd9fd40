"""The REST shim inside ``embedding-server`` (``--rest-port``, on unless 0).

The shim calls the servicer's embed step in this process (rest/local.py
``LocalBackend``): no socket between them, the request and the reply are
serialized once (JSON), and the key, the metrics, the access log and the
trace span are done once per call, by the REST layer. Each HTTP client
connection is its own fair-share flow, as each gRPC connection is. A REST
call counts in flight like a gRPC one, so a drain waits for it; /health
reads the process's ServingState, so it turns 503 the moment a drain starts.

Until the hop was cut (a grpc.aio call over a private Unix socket) a REST
call cost about +2 ms over gRPC on an idle server (bench/mixed.py).

``EmbeddingApp`` calls ``start()`` once gRPC listens and ``stop()`` after the gRPC drain.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from starlette.routing import BaseRoute

from ..auth import ApiKeys
from ..errors import StartupError
from ..grpc_api.interceptors import InFlight
from ..grpc_api.servicer import EmbeddingServicer
from ..settings import Settings
from ..tls import TlsFiles
from ..tracing import Tracing
from .app import Observer, build_app
from .local import LocalBackend
from .serving import RestServer, bind

log = logging.getLogger(__name__)


class InProcessShim:
    """uvicorn on ``--rest-port`` in the server's own loop, calling its engine."""

    def __init__(
        self,
        settings: Settings,
        servicer: EmbeddingServicer,
        in_flight: InFlight,
        api_keys: ApiKeys,
        tls: TlsFiles | None,
        routes: Sequence[BaseRoute] = (),
        observe: Observer | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.backend = LocalBackend(servicer, in_flight)
        self.api_keys = api_keys  # checked by EmbeddingApp already, like the TLS files
        self.tls = tls
        self.routes = routes
        self.observe = observe
        self.tracing = tracing
        self.server: RestServer | None = None

    async def start(self) -> None:
        """Bind ``--rest-port`` and serve; raises StartupError with a one-line reason."""
        settings = self.settings
        address = f"{settings.host}:{settings.rest_port}"
        try:
            sock = bind(settings.host, settings.rest_port)
        except OSError as exc:
            raise StartupError(f"--rest-port: cannot listen on {address} ({exc.strerror or exc})") from exc
        app = build_app(
            self.backend,
            self.api_keys,
            max_body_bytes=int(settings.rest_max_body_mb * 1024 * 1024),
            routes=self.routes,
            observe=self.observe,
            auto_truncate=settings.auto_truncate,
            tracing=self.tracing,
        )
        tls = self.tls
        try:
            self.server = RestServer(app, sock, tls)
            await self.server.start()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            sock.close()
            raise StartupError(f"--rest-port: cannot serve on {address}: {exc}") from exc
        log.info("REST shim listening on %s%s", address, " (TLS)" if tls else "")

    async def stop(self) -> None:
        """After the gRPC drain: close the listener and finish what is in flight."""
        if self.server is not None:
            await self.server.stop()
