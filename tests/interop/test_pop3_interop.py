"""Interoperability: the standard library's ``poplib`` against the reference POP3 server.

``poplib`` is blocking, so each session runs in a worker thread with socket
timeouts and an overall bound, while the server runs on the test's event
loop (asyncio or uvloop).  It is an independent implementation of RFC 1939
and RFC 2595's ``STLS``: its ``capa()`` parsing, ``stls()`` and dot-unstuffing
are checked against what the server writes.
"""

from __future__ import annotations

import asyncio
import poplib
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Dict, TypeVar

import pytest
from starttls_harness.servers.base import RunningServer, ServerConfig
from starttls_harness.servers.pop3 import Pop3Message, start_server
from starttls_harness.tls.certs import Pki

T = TypeVar("T")
USER, PASSWORD = "tester", "correct horse"
WAIT = 5.0
Runner = Callable[..., Any]


@asynccontextmanager
async def serving(pki: Pki, tls_version: str, behaviour: str = "strict") -> AsyncIterator[Any]:
    server = await start_server(ServerConfig(pki=pki, tls_version=tls_version, behaviour=behaviour))
    try:
        yield server
    finally:
        await server.close()


async def in_thread(work: Callable[[], T]) -> T:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, work), 4 * WAIT)


def _stored(server: RunningServer, body: bytes) -> None:
    server.messages.append(Pop3Message(body, tls=True))


def test_poplib_stls_session(pki: Pki, tls_version: str, run: Runner) -> None:
    body = b"From: a@example.org\r\nSubject: one\r\n\r\n.a dot-started line\r\nend\r\n"

    def session(host: str, port: int) -> Dict[str, Any]:
        seen: Dict[str, Any] = {}
        pop = poplib.POP3(host, port, timeout=WAIT)
        try:
            seen["welcome"] = pop.getwelcome()
            seen["plain-caps"] = pop.capa()
            with pytest.raises(poplib.error_proto, match="STLS"):
                pop.user(USER)
            seen["stls"] = pop.stls(context=pki.client_context(tls_version))
            seen["tls-caps"] = pop.capa()
            seen["user"] = pop.user(USER)
            seen["pass"] = pop.pass_(PASSWORD)
            seen["stat"] = pop.stat()
            seen["list"] = pop.list()
            seen["retr"] = pop.retr(1)
            seen["uidl"] = pop.uidl()
            seen["dele"] = pop.dele(1)
        finally:
            seen["quit"] = pop.quit()
        return seen

    async def main() -> None:
        async with serving(pki, tls_version) as server:
            _stored(server, body)
            host, port = server.address
            seen = await in_thread(lambda: session(host, port))
        assert seen["welcome"].startswith(b"+OK")
        assert "STLS" in seen["plain-caps"] and "USER" not in seen["plain-caps"]
        assert seen["stls"].startswith(b"+OK")
        assert "STLS" not in seen["tls-caps"]
        assert "STOPTLS" in seen["tls-caps"] and "USER" in seen["tls-caps"]
        assert seen["pass"].startswith(b"+OK")
        assert seen["stat"] == (1, len(body))
        assert seen["retr"][1] == body.rstrip(b"\r\n").split(b"\r\n")
        assert seen["quit"].startswith(b"+OK")

    run(main, 30)


def test_a_command_glued_to_stls_is_never_answered(pki: Pki, tls_version: str, run: Runner) -> None:
    """CAPA glued to STLS (CVE-2011-0411's class): the STLS answer, then the connection ends."""

    def session(host: str, port: int) -> Dict[str, Any]:
        seen: Dict[str, Any] = {}
        pop = poplib.POP3(host, port, timeout=WAIT)
        try:
            pop._putline(b"STLS\r\nCAPA")  # the injection needs the raw line
            seen["stls"] = pop._getresp()
            try:
                seen["next"] = pop._getline()[0]
            except (OSError, poplib.error_proto, EOFError) as ended:
                seen["next"] = ended
        finally:
            pop.close()
        return seen

    async def main() -> None:
        async with serving(pki, tls_version) as server:
            host, port = server.address
            seen = await in_thread(lambda: session(host, port))
        assert seen["stls"].startswith(b"+OK")
        # poplib reads b"" (EOF) or fails: never a plaintext CAPA answer.
        assert seen["next"] in (b"",) or isinstance(seen["next"], BaseException)

    run(main, 30)
