"""Interoperability: the standard library's ``imaplib`` against the reference server.

``imaplib`` is blocking, so each session runs in a worker thread
(``run_in_executor``) with socket timeouts and an overall bound, while the
server runs on the test's event loop (asyncio or uvloop).
"""

from __future__ import annotations

import asyncio
import imaplib
from typing import Any, Callable, List, Tuple, TypeVar

import pytest
from starttls_harness.servers.base import Limits
from starttls_harness.tls.certs import Pki
from test_imap_server import WAIT, Runner, serving

T = TypeVar("T")
USER, PASSWORD = "tester", "correct horse"


async def in_thread(work: Callable[[], T]) -> T:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, work), 4 * WAIT)


def test_imaplib_starttls_session(pki: Pki, tls_version: str, run: Runner) -> None:
    messages = [
        b"From: a@example.org\r\nSubject: one\r\n\r\nfirst body\r\n",
        b"From: b@example.org\r\nSubject: two\r\n\r\nsecond body\r\nwith two lines\r\n",
    ]

    def session(host: str, port: int) -> List[Tuple[str, Any]]:
        seen: List[Tuple[str, Any]] = []
        imap = imaplib.IMAP4(host, port, timeout=WAIT)
        try:
            seen.append(("plain-caps", imap.capabilities))
            with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
                imap.login(USER, PASSWORD)
            seen.append(("starttls", imap.starttls(ssl_context=pki.client_context(tls_version))))
            seen.append(("tls-caps", imap.capabilities))
            seen.append(("login", imap.login(USER, PASSWORD)))
            seen.append(("select", imap.select("INBOX")))
            for message in messages:
                seen.append(("append", imap.append("INBOX", "(\\Flagged)", None, message)))
            seen.append(("noop", imap.noop()))
            seen.append(("fetch", imap.fetch("1:2", "(RFC822)")))
            seen.append(("peek", imap.fetch("2", "(BODY.PEEK[HEADER] RFC822.SIZE FLAGS)")))
            seen.append(("uid", imap.uid("FETCH", "1", "(BODY[TEXT])")))
        finally:
            seen.append(("logout", imap.logout()))
        return seen

    async def body() -> None:
        async with serving(pki, tls_version) as server:
            host, port = server.address
            seen = dict(await in_thread(lambda: session(host, port)))
            assert "STARTTLS" in seen["plain-caps"] and "LOGINDISABLED" in seen["plain-caps"]
            assert seen["starttls"][0] == "OK"
            assert "STOPTLS" in seen["tls-caps"] and "STARTTLS" not in seen["tls-caps"]
            assert seen["login"][0] == "OK"
            # imaplib keeps appending later EXISTS responses to the same list.
            assert seen["select"][0] == "OK" and seen["select"][1][:3] == [b"0", b"1", b"2"]
            status, data = seen["fetch"]
            assert status == "OK"
            bodies = [part[1] for part in data if isinstance(part, tuple)]
            assert bodies == messages
            status, data = seen["peek"]
            header, rest = data[0], data[1]
            assert header[1] == messages[1][: messages[1].index(b"\r\n\r\n") + 4]
            assert b"RFC822.SIZE %d" % len(messages[1]) in rest
            assert b"\\Flagged" in rest
            status, data = seen["uid"]
            assert data[0][1] == b"first body\r\n"
            assert seen["logout"][0] == "BYE"
            assert [(m.data, m.tls, m.cycle) for m in server.messages] == [
                (m, True, 1) for m in messages
            ]
            assert all(m.flags >= {"\\Flagged"} for m in server.messages)
            conn = server.connections[0]
            await asyncio.wait_for(asyncio.shield(conn.finished), WAIT)
            # imaplib never sends close_notify: at most a truncation after LOGOUT.
            assert {v.rule.value for v in conn.transport.violations} <= {"R6"}

    run(body)


def test_imaplib_without_tls_cannot_log_in(pki: Pki, tls_version: str, run: Runner) -> None:
    def session(host: str, port: int) -> str:
        imap = imaplib.IMAP4(host, port, timeout=WAIT)
        try:
            imap.login(USER, PASSWORD)
        except imaplib.IMAP4.error as exc:
            return str(exc)
        finally:
            imap.logout()
        return "logged in"

    async def body() -> None:
        async with serving(pki, tls_version) as server:
            host, port = server.address
            answer = await in_thread(lambda: session(host, port))
            assert "PRIVACYREQUIRED" in answer

    run(body)


def test_imaplib_sees_bye_when_the_server_is_full(pki: Pki, tls_version: str, run: Runner) -> None:
    def session(host: str, port: int) -> str:
        try:
            imaplib.IMAP4(host, port, timeout=WAIT)
        except imaplib.IMAP4.error as exc:
            return str(exc)
        return "connected"

    async def body() -> None:
        async with serving(pki, tls_version, limits=Limits(max_connections=1)) as server:
            host, port = server.address
            first = await in_thread(lambda: imaplib.IMAP4(host, port, timeout=WAIT))
            try:
                answer = await in_thread(lambda: session(host, port))
                assert "Too many connections" in answer
            finally:
                await in_thread(first.logout)

    run(body)
