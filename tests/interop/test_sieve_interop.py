"""Interoperability: ``sievelib`` (PyPI) against the reference ManageSieve server.

``sievelib`` is an independent RFC 5804 client: after STARTTLS it reads the
capability list the server must re-issue under TLS (§2.2) without asking,
so a server that forgot to would hang it.  It is blocking and verifies the
certificate against the default trust store, so it runs in a worker thread
with ``SSL_CERT_FILE`` naming the test CA.  Skipped when it is not installed.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Dict, TypeVar

import pytest
from starttls_harness.servers.base import ServerConfig
from starttls_harness.servers.sieve import start_server
from starttls_harness.tls.certs import Pki

managesieve = pytest.importorskip("sievelib.managesieve")

T = TypeVar("T")
USER, PASSWORD = "tester", "correct horse"
WAIT = 5.0
Runner = Callable[..., Any]
SCRIPT = 'require "fileinto";\r\nif header :contains "subject" "x" { fileinto "x"; }\r\n'


@asynccontextmanager
async def serving(pki: Pki, tls_version: str) -> AsyncIterator[Any]:
    server = await start_server(ServerConfig(pki=pki, tls_version=tls_version))
    try:
        yield server
    finally:
        await server.close()


async def in_thread(work: Callable[[], T]) -> T:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, work), 4 * WAIT)


def test_sievelib_starttls_session(
    pki: Pki, tls_version: str, run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert pki.cafile is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.cafile))

    def session(host: str, port: int) -> Dict[str, Any]:
        seen: Dict[str, Any] = {}
        client = managesieve.Client(host, port, srvhostname="localhost")
        seen["connect"] = client.connect(USER, PASSWORD, starttls=True, authmech="PLAIN")
        seen["sasl"] = client.get_sasl_mechanisms()
        seen["tls"] = client.has_tls_support()
        seen["put"] = client.putscript("harness", SCRIPT)
        seen["list"] = client.listscripts()
        seen["get"] = client.getscript("harness")
        seen["logout"] = client.logout()
        return seen

    async def main() -> None:
        async with serving(pki, tls_version) as server:
            host, port = server.address
            seen = await in_thread(lambda: session(host, port))
            stored = [s.data for s in server.messages]
        assert seen["connect"] is True
        # The capabilities re-issued under TLS: SASL PLAIN, no STARTTLS.
        assert seen["sasl"] == ["PLAIN"] and seen["tls"] is False
        assert seen["put"] is True
        assert "harness" in seen["list"][1]
        # sievelib gives the script back as its lines joined by "\n".
        assert seen["get"] == "\n".join(SCRIPT.splitlines())
        assert stored == [SCRIPT.encode()]

    run(main, 30)
