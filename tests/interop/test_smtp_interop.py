"""Interoperability with unmodified third-party SMTP software (real sockets).

* the reference server with unmodified aiosmtplib and with ``smtplib``
  (blocking, run in a worker thread with a bounded timeout);
* the reference client with unmodified aiosmtpd 1.4.6 (its own STARTTLS
  through ``tls_context``), which does not offer STOPTLS.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from typing import Any, Awaitable, Callable, Dict, List, Tuple

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtpd.smtp import AuthResult, Envelope, Session
from starttls_harness.clients.smtp import SMTPClient, StopTLSNotSupported
from starttls_harness.servers.base import RunningServer, ServerConfig
from starttls_harness.servers.smtp import start_server
from starttls_harness.tls.certs import Pki

Run = Callable[[Callable[[], Awaitable[None]]], None]

STEP = 5.0
USER, PASSWORD = "tester", "correct horse"
MESSAGE = "From: a@example.org\r\nTo: b@example.org\r\nSubject: interop\r\n\r\nhello\r\n"


async def reference_server(pki: Pki, version: str) -> RunningServer:
    return await start_server(
        ServerConfig(pki=pki, tls_version=version, user=USER, password=PASSWORD)
    )


async def stop(server: RunningServer) -> None:
    await server.close()
    for record in server.connections:
        await asyncio.wait_for(record.closed.wait(), STEP)
    await asyncio.sleep(0)  # one turn: cancelled handler tasks unwind


@pytest.mark.parametrize("trust", ["tls_context", "cert_bundle"])
def test_reference_server_with_aiosmtplib(pki: Pki, tls_version: str, run: Run, trust: str) -> None:
    async def body() -> None:
        server = await reference_server(pki, tls_version)
        options: Dict[str, Any] = (
            {"tls_context": pki.client_context(tls_version)}
            if trust == "tls_context"
            else {"cert_bundle": str(pki.cafile)}
        )
        smtp = aiosmtplib.SMTP(
            hostname="localhost", port=server.port, start_tls=True, timeout=STEP, **options
        )
        async with smtp:
            await smtp.ehlo()  # aiosmtplib forgot the plaintext EHLO after STARTTLS
            assert smtp.supports_extension("stoptls") and not smtp.supports_extension("starttls")
            await smtp.login(USER, PASSWORD)
            errors, _ = await smtp.sendmail("a@example.org", ["b@example.org"], MESSAGE)
            assert not errors
        await asyncio.wait_for(server.connections[0].closed.wait(), STEP)
        (message,) = server.messages
        assert message.tls and message.auth_user == USER
        assert message.content == MESSAGE.encode()
        if trust == "tls_context":
            assert message.tls_version == {"1.2": "TLSv1.2", "1.3": "TLSv1.3"}[tls_version]
        assert not server.connections[0].violations
        await stop(server)

    run(body)


def test_reference_server_with_smtplib(pki: Pki, tls_version: str, run: Run) -> None:
    async def body() -> None:
        server = await reference_server(pki, tls_version)
        context = pki.client_context(tls_version)

        def send() -> Tuple[int, bytes]:
            with smtplib.SMTP("localhost", server.port, timeout=STEP) as smtp:
                smtp.ehlo()
                assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
                smtp.starttls(context=context)
                smtp.ehlo()
                assert smtp.has_extn("stoptls") and not smtp.has_extn("starttls")
                smtp.login(USER, PASSWORD)
                smtp.sendmail("a@example.org", ["b@example.org"], MESSAGE)
                return smtp.noop()

        code, _ = await asyncio.wait_for(asyncio.to_thread(send), 2 * STEP)
        assert code == 250
        await asyncio.wait_for(server.connections[0].closed.wait(), STEP)
        (message,) = server.messages
        assert message.tls and message.auth_user == USER
        assert message.content == MESSAGE.encode()
        await stop(server)

    run(body)


class _Sink:
    """An aiosmtpd handler that keeps what it receives."""

    def __init__(self) -> None:
        self.messages: List[Tuple[str, bytes, bool]] = []

    async def handle_DATA(self, server: AiosmtpdSMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.messages.append((str(envelope.mail_from), bytes(content), session.ssl is not None))
        return "250 OK"


def _accept_tester(
    server: AiosmtpdSMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    return AuthResult(success=data.login == USER.encode() and data.password == PASSWORD.encode())


def test_reference_client_with_aiosmtpd(pki: Pki, tls_version: str, run: Run) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        sink = _Sink()
        server_context: ssl.SSLContext = pki.server_context(tls_version)
        aiosmtpd_server = await loop.create_server(
            lambda: AiosmtpdSMTP(
                sink,
                hostname="localhost",
                tls_context=server_context,
                require_starttls=True,
                authenticator=_accept_tester,
                loop=loop,
            ),
            "127.0.0.1",
            0,
        )
        port = aiosmtpd_server.sockets[0].getsockname()[1]
        client = SMTPClient(
            "127.0.0.1",
            port,
            tls_context=pki.client_context(tls_version),
            server_hostname="localhost",
            require_tls=True,
            timeout=STEP,
        )
        await client.connect()  # EHLO, STARTTLS (aiosmtpd's own), EHLO
        assert client.tls_active
        assert (await client.login(USER, PASSWORD)).code == 235
        await client.sendmail("a@example.org", ["b@example.org"], MESSAGE)
        assert sink.messages == [("a@example.org", MESSAGE.encode(), True)]
        with pytest.raises(StopTLSNotSupported, match="does not offer STOPTLS") as caught:
            await client.stoptls()
        assert "cannot return to plaintext" in str(caught.value)
        assert client.tls_active  # nothing was sent; still usable
        assert (await client.execute_command(b"NOOP")).code == 250
        assert (await client.quit()).code == 221
        assert not client.violations
        aiosmtpd_server.close()
        await aiosmtpd_server.wait_closed()

    run(body)
