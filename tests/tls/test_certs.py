"""Certificates and the contexts cached per Pki (harness/tls/certs.py)."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path
from typing import List, Tuple

from starttls_harness.tls.certs import (
    Pki,
    make_pki,
    shared_client_context,
    system_client_context,
)


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> Tuple[bool, str]:
    """One full handshake in memory; (session reused?, version)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (client, server):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if client.version() and server.version():
            try:
                client.do_handshake()
                server.do_handshake()
                break
            except ssl.SSLWantReadError:
                continue
    return client.session_reused, str(client.version())


def secrets(path: Path) -> List[str]:
    """The key-log lines of ``path`` (OpenSSL writes a comment line on open)."""
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


def test_contexts_are_shared_per_version_and_verify(tls_version: str) -> None:
    pki = make_pki()
    server = pki.server_context(tls_version)
    assert pki.server_context(tls_version) is server
    assert pki.server_context(ssl.TLSVersion[f"TLSv1_{tls_version[-1]}"]) is server
    other = "1.3" if tls_version == "1.2" else "1.2"
    assert pki.server_context(other) is not server
    assert pki.server_context(None) is not server
    client = pki.client_context(tls_version)
    assert pki.client_context(tls_version) is client
    assert pki.client_context(tls_version, verify=False) is not client
    assert pki.client_context(tls_version, verify=False).verify_mode == ssl.CERT_NONE
    assert pki.client_context(tls_version, shared=False) is not client
    assert pki.server_context(tls_version, shared=False) is not server
    # Another Pki (another CA) never gets these.
    assert make_pki().server_context(tls_version) is not server


def test_shared_contexts_change_nothing_on_the_wire(tls_version: str) -> None:
    """Each handshake through the shared contexts is a full one, verified."""
    pki = make_pki()
    for _ in range(3):
        reused, version = handshake(
            pki.client_context(tls_version), pki.server_context(tls_version)
        )
        assert not reused
        assert version == f"TLSv1.{tls_version[-1]}"


def test_keylog_contexts_are_never_cached(tls_version: str, tmp_path: Path) -> None:
    """A key-log context is new on every call and logs only its own handshakes."""
    pki = make_pki()
    first, second = tmp_path / "a.keys", tmp_path / "b.keys"
    ctx_a = pki.client_context(tls_version, first)
    ctx_b = pki.client_context(tls_version, second)
    assert ctx_a is not ctx_b
    assert pki.client_context(tls_version) not in (ctx_a, ctx_b)
    assert pki.server_context(tls_version, first) is not pki.server_context(tls_version, first)
    handshake(ctx_a, pki.server_context(tls_version))
    assert secrets(first) and not secrets(second)
    assert ctx_a.keylog_filename == str(first)
    assert pki.client_context(tls_version).keylog_filename is None


def test_written_key_is_private(tmp_path: Path) -> None:
    pki: Pki = make_pki(directory=tmp_path)
    assert pki.keyfile is not None
    assert stat.S_IMODE(pki.keyfile.stat().st_mode) == 0o600
    pki.server_context("1.3")  # the cache touches nothing on disk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem", "server.key", "server.pem"]


def test_system_client_context_is_built_once() -> None:
    ctx = system_client_context()
    assert system_client_context() is ctx
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_shared_client_context_follows_the_ca_file(tls_version: str, tmp_path: Path) -> None:
    pki = make_pki(directory=tmp_path / "one")
    assert pki.cafile is not None
    ctx = shared_client_context(tls_version, pki.cafile)
    assert shared_client_context(tls_version, str(pki.cafile)) is ctx
    assert handshake(ctx, pki.server_context(tls_version)) == (False, f"TLSv1.{tls_version[-1]}")
    # The same path rewritten with another CA: a new context that trusts it.
    other = make_pki(directory=tmp_path / "two")
    assert other.cafile is not None
    pki.cafile.write_bytes(other.cafile.read_bytes() + b"\n")
    fresh = shared_client_context(tls_version, pki.cafile)
    assert fresh is not ctx
    assert handshake(fresh, other.server_context(tls_version))[1] == f"TLSv1.{tls_version[-1]}"
    loose = shared_client_context(tls_version, verify=False)
    assert loose is shared_client_context(tls_version, pki.cafile, verify=False)
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname
    assert shared_client_context(tls_version) is system_client_context(tls_version)
