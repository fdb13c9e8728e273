"""The LMTP reference peers: LHLO, per-recipient answers, STOPTLS, and smtplib.LMTP."""

from __future__ import annotations

import asyncio
import smtplib
from typing import Any, Callable, List, Tuple

from starttls_harness.clients.lmtp import LMTPClient
from starttls_harness.dialects import dialect_named
from starttls_harness.servers.base import RunningServer, ServerConfig
from starttls_harness.servers.lmtp import start_server
from starttls_harness.tls.aio import Timeouts
from starttls_harness.tls.certs import Pki

Run = Callable[..., Any]
STEP = 5.0
MESSAGE = "From: a@example.org\r\nTo: b@localhost\r\nSubject: lmtp\r\n\r\nhello\r\n"


async def _server(pki: Pki, version: str) -> RunningServer:
    return await start_server(ServerConfig(pki=pki, tls_version=version))


def _client(pki: Pki, version: str, port: int) -> LMTPClient:
    return LMTPClient(
        "127.0.0.1",
        port,
        tls_context=pki.client_context(version),
        server_hostname="localhost",
        require_tls=True,
        timeout=STEP,
        timeouts=Timeouts(handshake=STEP, closure=STEP),
    )


def test_the_dialect_says_lhlo_and_refuses_ehlo_as_a_hello() -> None:
    lmtp = dialect_named("lmtp")
    assert lmtp.hello() == b"LHLO harness.invalid\r\n" and lmtp.default_port == 24
    scripted = lmtp.scripted_server()
    assert scripted.parse(b"LHLO x\r\n", False).kind == "hello"
    assert scripted.parse(b"EHLO x\r\n", False).kind == "other"
    assert scripted.greeting().startswith(b"220 ") and b"LMTP" in scripted.greeting()


def test_lhlo_starttls_stoptls_and_one_answer_per_recipient(
    pki: Pki, tls_version: str, run: Run
) -> None:
    async def body() -> None:
        server = await _server(pki, tls_version)
        client = _client(pki, tls_version, server.port)
        try:
            await client.connect()  # LHLO, STARTTLS, LHLO
            assert client.tls_active
            assert "stoptls" in client.extensions and "starttls" not in client.extensions
            await client.stoptls()  # closure, greeting, LHLO
            assert not client.tls_active and "starttls" in client.extensions
            await client.starttls()
            errors, _ = await client.sendmail(
                "a@example.org", ["b@localhost", "c@localhost"], MESSAGE
            )
            assert errors == {}
            reply = await client.execute_command(b"EHLO", b"x")
            assert reply.code == 500  # not an LMTP command
            await client.quit()
        finally:
            client.close()
            await server.close()
        (message,) = server.messages
        assert message.tls and message.cycle == 2
        assert message.rcpt_tos == ("b@localhost", "c@localhost")

    run(body)


def test_reference_server_with_smtplib_lmtp(pki: Pki, tls_version: str, run: Run) -> None:
    async def body() -> None:
        server = await _server(pki, tls_version)
        context = pki.client_context(tls_version)

        def send() -> Tuple[List[str], int]:
            lmtp = smtplib.LMTP("localhost", server.port, timeout=STEP)
            try:
                lmtp.ehlo()  # smtplib.LMTP says LHLO
                assert lmtp.has_extn("starttls") and not lmtp.has_extn("stoptls")
                lmtp.starttls(context=context)
                lmtp.ehlo()
                seen = sorted(lmtp.esmtp_features)
                lmtp.sendmail("a@example.org", ["b@localhost"], MESSAGE)
                code, _ = lmtp.noop()
                lmtp.quit()
                return seen, code
            finally:
                lmtp.close()

        try:
            seen, code = await asyncio.wait_for(asyncio.to_thread(send), 2 * STEP)
        finally:
            await server.close()
        assert "stoptls" in seen and "starttls" not in seen and code == 250
        (message,) = server.messages
        assert message.tls and message.content == MESSAGE.encode()

    run(body)
