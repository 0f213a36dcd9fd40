"""The REST shim inside ``embedding-server`` (``--rest-port``, on unless 0).

The shim reaches the gRPC server of its own process through a private Unix
socket added to that server (a fresh 0700 directory): it works whatever
``--host`` is and whether or not gRPC's TCP port uses TLS, and it goes
through the same interceptors (auth, metrics) as any gRPC client. /health
reads the process's ServingState directly, so it turns 503 the moment a
drain starts.

``EmbeddingApp`` calls: ``InProcessShim(...)`` before ``server.start()`` (a
port can only be added then), ``start()`` after it, ``stop()`` after the
gRPC drain.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc
from starlette.routing import BaseRoute

from ..auth import ApiKeys
from ..errors import StartupError
from ..grpc_api.state import ServingState
from ..settings import Settings
from ..tls import TlsFiles
from ..tracing import Tracing
from .app import Observer, build_app
from .serving import RestServer, bind
from .upstream import Upstream

log = logging.getLogger(__name__)


class InProcessShim:
    """uvicorn on ``--rest-port`` in the server's own loop, talking to its gRPC server."""

    def __init__(
        self,
        settings: Settings,
        grpc_server: grpc.aio.Server,
        state: ServingState,
        api_keys: ApiKeys,
        tls: TlsFiles | None,
        routes: Sequence[BaseRoute] = (),
        observe: Observer | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.api_keys = api_keys  # checked by EmbeddingApp already, like the TLS files
        self.tls = tls
        self.routes = routes
        self.observe = observe
        self.tracing = tracing
        self._dir = Path(tempfile.mkdtemp(prefix="embedding-rest-"))  # mode 0700: this user only
        self.grpc_target = f"unix:{self._dir / 'grpc.sock'}"
        grpc_server.add_insecure_port(self.grpc_target)
        self.upstream: Upstream | None = None
        self.server: RestServer | None = None

    async def _serving(self) -> bool:
        return self.state.serving

    async def start(self) -> None:
        """Bind ``--rest-port`` and serve; raises StartupError with a one-line reason."""
        settings = self.settings
        address = f"{settings.host}:{settings.rest_port}"
        try:
            sock = bind(settings.host, settings.rest_port)
        except OSError as exc:
            raise StartupError(f"--rest-port: cannot listen on {address} ({exc.strerror or exc})") from exc
        self.upstream = Upstream(self.grpc_target, serving=self._serving, tracing=self.tracing)
        app = build_app(
            self.upstream,
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
        """After the gRPC drain: close the listener, finish what is in flight, drop the socket dir."""
        if self.server is not None:
            await self.server.stop()
        if self.upstream is not None:
            await self.upstream.close()
        shutil.rmtree(self._dir, ignore_errors=True)
