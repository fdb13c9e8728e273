"""Throwaway certificates and the TLS contexts the harness uses.

Every run gets its own CA from ``trustme`` (ECDSA P-256 by default: cheap
handshakes keep scenarios fast).  Private keys only touch the disk through
:func:`write_private`, which creates the file with mode 0600 before a byte
is written.

Contexts are cached per :class:`Pki`: building one costs a key and chain
written to temporary files and parsed again (``trustme``'s
``configure_cert``), which was a sixth of a path-role scenario run.
:meth:`Pki.server_context` and :meth:`Pki.client_context` build a context
once per (TLS version, verify) and hand the same object out again; nothing on
the wire changes, because a client context never resumes a session unless it
is given one, and the engine only ever *clears* an option on a context
(``OP_IGNORE_UNEXPECTED_EOF``, cleared here already).  A caller that means to
change a context asks for its own with ``shared=False``.

Contexts with a **key log are never cached**: CPython opens the key-log file
when ``keylog_filename`` is set and keeps it open (appending) for the life of
the context.  Key-log paths are per scenario, so a cache keyed by path would
never be hit within a run, would hold one open file per scenario run (the
resource checks count file descriptors) and would keep writing into files the
caller considers finished.  Runs with a key log collect evidence and are not
the hot path.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import trustme
from starttls_harness.tls.engine import clear_ignore_unexpected_eof

__all__ = [
    "TLS_VERSIONS",
    "Pki",
    "client_context",
    "make_pki",
    "parse_tls_version",
    "server_context",
    "shared_client_context",
    "system_client_context",
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

    _contexts: Dict[Tuple[str, Optional[ssl.TLSVersion], bool], ssl.SSLContext] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def server_context(
        self,
        tls_version: Union[str, ssl.TLSVersion, None] = None,
        keylog: Optional[Union[str, Path]] = None,
        *,
        shared: bool = True,
    ) -> ssl.SSLContext:
        """A server context with this certificate, pinned to ``tls_version``.

        Without ``keylog`` the context is shared: built once per TLS version
        (``None``: 1.2 and 1.3), the same object on every call; do not change
        it (``shared=False`` gives a new one).  With ``keylog`` it is always
        new (see the module docstring).
        """
        version = None if tls_version is None else parse_tls_version(tls_version)
        key = ("server", version, True)
        if keylog is None and shared:
            cached = self._contexts.get(key)
            if cached is not None:
                return cached
        ctx = server_context(version, keylog)
        self.server_cert.configure_cert(ctx)
        if keylog is None and shared:
            self._contexts[key] = ctx
        return ctx

    def client_context(
        self,
        tls_version: Union[str, ssl.TLSVersion, None] = None,
        keylog: Optional[Union[str, Path]] = None,
        verify: bool = True,
        *,
        shared: bool = True,
    ) -> ssl.SSLContext:
        """A client context trusting this CA (``verify=False``: trusting none).

        Shared per (TLS version, ``verify``) unless ``keylog`` is given or
        ``shared=False``, as :meth:`server_context`.
        """
        version = None if tls_version is None else parse_tls_version(tls_version)
        key = ("client", version, verify)
        if keylog is None and shared:
            cached = self._contexts.get(key)
            if cached is not None:
                return cached
        ctx = client_context(version, keylog, verify=verify)
        if verify:
            self.ca.configure_trust(ctx)
        if keylog is None and shared:
            self._contexts[key] = ctx
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
    """A fresh CA and server certificate (ECDSA P-256 unless ``rsa``).

    The subject CN is the first DNS name among ``hostnames`` (``localhost``)
    besides the SANs: several real clients match only the CN or DNS names,
    and could not be run with certificate checking otherwise.
    """
    key_type = trustme.KeyType.RSA if rsa else trustme.KeyType.ECDSA
    ca = trustme.CA(key_type=key_type)
    names = [h for h in hostnames if not _is_ip(h)]
    cert = ca.issue_cert(*hostnames, common_name=names[0] if names else None, key_type=key_type)
    pki = Pki(ca, cert, tuple(hostnames))
    if directory is not None:
        pki.write(directory)
    return pki


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


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


def system_client_context(
    tls_version: Union[str, ssl.TLSVersion, None] = None,
) -> ssl.SSLContext:
    """A client context trusting the system's CAs, shared (one per TLS version).

    Loading the system store parses every CA certificate on the machine; a
    reference client given no context would do that per connection.  Shared:
    do not change it (:func:`client_context` gives a new one).
    """
    return _system_client_context(None if tls_version is None else parse_tls_version(tls_version))


@functools.cache
def _system_client_context(version: Optional[ssl.TLSVersion]) -> ssl.SSLContext:
    ctx = client_context(version)
    ctx.load_default_certs()
    return ctx


def shared_client_context(
    tls_version: Union[str, ssl.TLSVersion, None] = None,
    cafile: Optional[Union[str, Path]] = None,
    *,
    verify: bool = True,
) -> ssl.SSLContext:
    """A client context shared per (CA file as it is now, TLS version, ``verify``).

    For callers that have a CA *file* rather than a :class:`Pki` (a target's
    ``cafile``): the file's path, modification time and size are part of the
    key, so a rewritten file gets a new context.  ``verify=False`` trusts
    nothing and checks no name; no ``cafile`` with ``verify`` means the
    system's CAs.  Shared: do not change it.  No key log (see the module
    docstring): ask :func:`client_context` for a context of your own.
    """
    version = None if tls_version is None else parse_tls_version(tls_version)
    if not verify:
        return _shared_client_context(None, (0, 0), version, False)
    if cafile is None:
        return system_client_context(version)
    stat = os.stat(cafile)
    return _shared_client_context(str(cafile), (stat.st_mtime_ns, stat.st_size), version, True)


@functools.lru_cache(maxsize=64)
def _shared_client_context(
    cafile: Optional[str],
    stamp: Tuple[int, int],
    version: Optional[ssl.TLSVersion],
    verify: bool,
) -> ssl.SSLContext:
    return client_context(version, verify=verify, cafile=cafile)
