"""TLS for the gRPC port and the metrics port (the REST shim reads the same flags), from PEM files.

``--tls-cert`` / ``--tls-key`` turn TLS on; ``--tls-client-ca`` also requires
client certificates signed by that CA (mTLS). The files are read and checked
with Python's ``ssl`` at start, so a wrong path, a key that does not match
the certificate, or a file that is not PEM stops the server with one line
naming the flag, instead of a C-core error on the first handshake.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsConfigError(Exception):
    """A TLS file is missing, unreadable or not what its flag says; the message is one line."""


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files (paths and contents) of the server's TLS settings."""

    cert_path: str
    key_path: str
    client_ca_path: str | None
    cert: bytes
    key: bytes
    client_ca: bytes | None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


def _read(flag: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise TlsConfigError(f"{flag} {path}: no such file") from None
    except OSError as exc:
        raise TlsConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{flag} {path}: not a PEM file") from None
    return data


def load_tls(cert: str | None, key: str | None, client_ca: str | None) -> TlsFiles | None:
    """The checked TLS files, or None when TLS is off."""
    if not cert and not key:
        if client_ca:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not cert or not key:
        raise TlsConfigError("--tls-cert and --tls-key go together")
    files = TlsFiles(
        cert_path=cert,
        key_path=key,
        client_ca_path=client_ca,
        cert=_read("--tls-cert", cert),
        key=_read("--tls-key", key),
        client_ca=_read("--tls-client-ca", client_ca) if client_ca else None,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"--tls-cert {cert} / --tls-key {key}: not a usable certificate and matching key ({exc.reason})"
        ) from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise TlsConfigError(f"--tls-client-ca {client_ca}: not a PEM CA bundle ({exc.reason})") from None
    return files


def grpc_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(files.key, files.cert)],
        root_certificates=files.client_ca,
        require_client_auth=files.mutual,
    )
