"""The NNTP reference peers: STARTTLS -> 382, CAPABILITIES re-read, STOPTLS, POST, and nntplib."""

from __future__ import annotations

import asyncio
import sys
import warnings
from typing import Any, Callable, List, Tuple

import pytest
from starttls_harness.clients.nntp import NntpClient, StopTLSNotSupported, TLSRequired
from starttls_harness.dialects import dialect_named
from starttls_harness.dialects.nntp import NEWSGROUP, article
from starttls_harness.servers.base import RunningServer, ServerConfig
from starttls_harness.servers.nntp import start_server
from starttls_harness.tls.aio import Timeouts
from starttls_harness.tls.certs import Pki

Run = Callable[..., Any]
STEP = 5.0
USER, PASSWORD = "tester", "correct horse"
ARTICLE = article(NEWSGROUP, "interop", b"hello\r\n.dot-stuffed line\r\n")


async def _server(pki: Pki, version: str) -> RunningServer:
    return await start_server(
        ServerConfig(pki=pki, tls_version=version, user=USER, password=PASSWORD)
    )


async def _client(pki: Pki, version: str, port: int, **kw: Any) -> NntpClient:
    return await NntpClient.connect(
        "127.0.0.1",
        port,
        ssl_context=pki.client_context(version),
        server_hostname="localhost",
        timeout=STEP,
        timeouts=Timeouts(handshake=STEP, closure=STEP),
        **kw,
    )


def test_the_dialect_reads_multiline_answers_and_capabilities() -> None:
    nntp = dialect_named("nntp")
    buf = b"101 Capability list:\r\nVERSION 2\r\nSTARTTLS\r\n.\r\n111 20260101000000\r\n"
    reply, rest = nntp.split_reply(buf)
    assert reply is not None and reply.ok and reply.key == "101"
    assert nntp.capabilities(reply) == {"VERSION", "STARTTLS"}
    assert rest == b"111 20260101000000\r\n"
    sentinel, rest = nntp.split_reply(rest)
    assert sentinel is not None and nntp.is_sentinel_reply(sentinel) and rest == b""
    assert nntp.split_reply(b"101 Capability list:\r\nVERSION 2\r\n")[0] is None
    refused, _ = nntp.split_reply(b"500 Unknown command\r\n")
    assert refused is not None and nntp.is_injected_reply(refused) and not refused.ok
    assert nntp.final_line_of(nntp.starttls())(b"382 Continue with TLS negotiation\r\n")
    assert not nntp.final_line_of(nntp.hello())(b"101 Capability list:\r\n")


def test_starttls_stoptls_login_and_post(pki: Pki, tls_version: str, run: Run) -> None:
    async def body() -> None:
        server = await _server(pki, tls_version)
        client = await _client(pki, tls_version, server.port)
        try:
            caps = await client.capability()
            assert "STARTTLS" in caps and "STOPTLS" not in caps and "AUTHINFO" not in caps
            await client.starttls()  # CAPABILITIES re-read
            assert "STOPTLS" in (client.capabilities or {})
            assert "STARTTLS" not in (client.capabilities or {})
            await client.login(USER, PASSWORD)
            assert (await client.select()).code == 211
            await client.stoptls()
            assert not client.transport.tls_active and not client.authenticated
            with pytest.raises(TLSRequired):
                await client.login(USER, PASSWORD)  # never in plaintext
            await client.starttls()
            assert (await client.post(ARTICLE)).code == 240
            await client.quit()
        finally:
            client.close()
            await server.close()
        (posted,) = server.messages
        assert posted.tls and posted.cycle == 2 and posted.data == ARTICLE

    run(body)


def test_the_server_forgets_the_login_at_each_transition(
    pki: Pki, tls_version: str, run: Run
) -> None:
    async def body() -> Tuple[int, int]:
        server = await _server(pki, tls_version)
        client = await _client(pki, tls_version, server.port)
        try:
            await client.starttls()
            await client.login(USER, PASSWORD)
            await client.stoptls()
            client._write(f"GROUP {NEWSGROUP}\r\n".encode())
            plain = (await client._read_response()).code
            client._write(b"AUTHINFO USER tester\r\n")
            refused = (await client._read_response()).code
            return plain, refused
        finally:
            client.close()
            await server.close()

    assert run(body) == (480, 483)  # login gone; credentials refused in plaintext


def test_stoptls_needs_the_extension(pki: Pki, tls_version: str, run: Run) -> None:
    async def body() -> None:
        server = await _server(pki, tls_version)
        client = await _client(pki, tls_version, server.port)
        try:
            await client.starttls()
            assert client.capabilities is not None
            del client.capabilities["STOPTLS"]
            with pytest.raises(StopTLSNotSupported):
                await client.stoptls()
        finally:
            client.close()
            await server.close()

    run(body)


@pytest.mark.skipif(
    sys.version_info >= (3, 13), reason="nntplib was removed from the standard library in 3.13"
)
def test_reference_server_with_nntplib(pki: Pki, tls_version: str, run: Run) -> None:
    with warnings.catch_warnings():  # "deprecated, removed in 3.13": known, see the skip
        warnings.simplefilter("ignore", DeprecationWarning)
        nntplib = pytest.importorskip("nntplib")

    async def body() -> None:
        server = await _server(pki, tls_version)
        context = pki.client_context(tls_version)

        def session() -> Tuple[List[str], List[str], str]:
            with nntplib.NNTP("localhost", server.port, timeout=STEP) as news:
                before = sorted(news.getcapabilities())
                news.starttls(context=context)  # re-reads CAPABILITIES
                after = sorted(news.getcapabilities())
                news.login(USER, PASSWORD)
                answer = news.post(ARTICLE.split(b"\r\n"))
                return before, after, answer

        try:
            before, after, answer = await asyncio.wait_for(asyncio.to_thread(session), 2 * STEP)
        finally:
            await server.close()
        assert "STARTTLS" in before and "STOPTLS" not in before
        assert "STOPTLS" in after and "STARTTLS" not in after
        assert answer.startswith("240")
        (posted,) = server.messages
        assert posted.tls and posted.user == USER

    run(body)
