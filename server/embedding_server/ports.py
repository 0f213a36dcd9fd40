"""Checking at start that a port can be listened on, for a one-line error instead of library noise.

grpc's C core logs its own multi-line error when a bind fails, and uvicorn
exits the process from inside; trying the address with a plain socket first
lets the server name the flag and stop cleanly. (The real bind can still
lose a race; then the library's error is turned into one line too.)
"""

from __future__ import annotations

import errno
import socket


class PortUnavailable(Exception):
    """The address cannot be listened on; the message names the flag."""


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC wants it (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def ensure_free(host: str, port: int, flag: str) -> None:
    """Raise PortUnavailable when nothing could listen on ``host:port``; port 0 is always free."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise PortUnavailable(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
            try:
                probe.bind(address)
                probe.listen(1)
            except OSError as exc:
                reason = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
                raise PortUnavailable(f"{flag} {port}: cannot listen on {host}:{port} ({reason})") from None
