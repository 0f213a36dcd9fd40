"""Running the ASGI app with uvicorn as a task on the caller's asyncio loop.

We bind the listening socket ourselves, so a taken port is an ``OSError``
the caller turns into a one-line startup error (uvicorn would log and call
``sys.exit``), and we leave SIGTERM/SIGINT to the host process, which drains
gRPC first and stops this server after.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from ..tls import TlsFiles


def bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket for ``host:port`` (IPv4 or IPv6); OSError when taken or not allowed."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # restart over TIME_WAIT, not over a listener
        sock.bind(address)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


class _HostedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the host process owns the signals


class RestServer:
    """uvicorn serving ``app`` on an already bound socket, as a task."""

    def __init__(self, app: ASGIApp, sock: socket.socket, tls: TlsFiles | None = None) -> None:
        """``tls``: files tls.load_tls has checked; a client CA requires client certificates (mTLS)."""
        self.sock = sock
        config = uvicorn.Config(
            app,
            lifespan="off",
            access_log=False,
            log_config=None,  # keep the host's logging setup
            timeout_graceful_shutdown=5,
            ssl_certfile=tls.cert_path if tls else None,
            ssl_keyfile=tls.key_path if tls else None,
            ssl_ca_certs=tls.client_ca_path if tls else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.mutual else ssl.CERT_NONE,
        )
        config.load()  # TLS files are read here: errors surface before serving
        self.server = _HostedServer(config)
        self.task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started and not self.task.done():
            await asyncio.sleep(0.01)
        if self.task.done():
            self.task.result()  # raises what stopped it
            raise OSError("REST server stopped while starting")

    async def stop(self) -> None:
        """Close the listener, let requests in flight finish (bounded), then return."""
        if self.task is None:
            self.sock.close()
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout=10)
        except asyncio.TimeoutError:
            self.server.force_exit = True
            await self.task
        self.sock.close()
