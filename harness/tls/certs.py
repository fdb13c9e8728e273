"""Throwaway certificates and the TLS contexts the harness uses.

Every run gets its own CA from ``trustme`` (ECDSA P-256 by default: cheap
handshakes keep scenarios fast).  Private keys only touch the disk through
:func:`write_private`, which creates the file with mode 0600 before a byte
is written.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import trustme
from starttls_harness.tls.engine import clear_ignore_unexpected_eof

__all__ = [
    "TLS_VERSIONS",
    "Pki",
    "client_context",
    "make_pki",
    "parse_tls_version",
    "server_context",
    "write_private",
]

#: The versions the harness speaks, by their user-facing names.
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

#: Environment variable that picks the TLS version the test suite runs under.
TLS_ENV = "STARTTLS_HARNESS_TLS"


def parse_tls_version(value: Union[str, ssl.TLSVersion]) -> ssl.TLSVersion:
    """``"1.2"``/``"1.3"`` (or a ``TLSVersion``) to ``ssl.TLSVersion``."""
    if isinstance(value, ssl.TLSVersion):
        return value
    try:
        return TLS_VERSIONS[str(value).strip()]
    except KeyError:
        raise ValueError(f"unknown TLS version {value!r}; use 1.2 or 1.3") from None


def write_private(path: Union[str, Path], data: bytes) -> Path:
    """Write secret material to ``path`` with mode 0600 from the start."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


@dataclass
class Pki:
    """A CA and one server certificate, in memory and (optionally) on disk."""

    ca: trustme.CA
    server_cert: trustme.LeafCert
    hostnames: Sequence[str]
    cafile: Optional[Path] = None
    certfile: Optional[Path] = None
    keyfile: Optional[Path] = None

    def server_context(
        self,
        tls_version: Union[str, ssl.TLSVersion, None] = None,
        keylog: Optional[Union[str, Path]] = None,
    ) -> ssl.SSLContext:
        ctx = server_context(tls_version, keylog)
        self.server_cert.configure_cert(ctx)
        return ctx

    def client_context(
        self,
        tls_version: Union[str, ssl.TLSVersion, None] = None,
        keylog: Optional[Union[str, Path]] = None,
        verify: bool = True,
    ) -> ssl.SSLContext:
        ctx = client_context(tls_version, keylog, verify=verify)
        if verify:
            self.ca.configure_trust(ctx)
        return ctx

    def write(self, directory: Union[str, Path]) -> Pki:
        """Write ``ca.pem`` (public), ``server.pem`` and ``server.key`` (0600)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.cafile = directory / "ca.pem"
        self.cafile.write_bytes(self.ca.cert_pem.bytes())
        self.certfile = directory / "server.pem"
        self.certfile.write_bytes(b"".join(b.bytes() for b in self.server_cert.cert_chain_pems))
        self.keyfile = write_private(
            directory / "server.key", self.server_cert.private_key_pem.bytes()
        )
        return self


def make_pki(
    hostnames: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    *,
    rsa: bool = False,
    directory: Union[str, Path, None] = None,
) -> Pki:
    """A fresh CA and server certificate (ECDSA P-256 unless ``rsa``)."""
    key_type = trustme.KeyType.RSA if rsa else trustme.KeyType.ECDSA
    ca = trustme.CA(key_type=key_type)
    cert = ca.issue_cert(*hostnames, key_type=key_type)
    pki = Pki(ca, cert, tuple(hostnames))
    if directory is not None:
        pki.write(directory)
    return pki


def _pin(ctx: ssl.SSLContext, tls_version: Union[str, ssl.TLSVersion, None]) -> None:
    if tls_version is None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return
    version = parse_tls_version(tls_version)
    ctx.minimum_version = version
    ctx.maximum_version = version


def server_context(
    tls_version: Union[str, ssl.TLSVersion, None] = None,
    keylog: Optional[Union[str, Path]] = None,
) -> ssl.SSLContext:
    """A server context pinned to ``tls_version`` (None: 1.2 and 1.3)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _pin(ctx, tls_version)
    clear_ignore_unexpected_eof(ctx)
    if keylog is not None:
        ctx.keylog_filename = str(keylog)
    return ctx


def client_context(
    tls_version: Union[str, ssl.TLSVersion, None] = None,
    keylog: Optional[Union[str, Path]] = None,
    *,
    verify: bool = True,
    cafile: Optional[Union[str, Path]] = None,
) -> ssl.SSLContext:
    """A client context; ``verify=False`` for targets whose CA is unknown."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _pin(ctx, tls_version)
    clear_ignore_unexpected_eof(ctx)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif cafile is not None:
        ctx.load_verify_locations(cafile=str(cafile))
    if keylog is not None:
        ctx.keylog_filename = str(keylog)
    return ctx
