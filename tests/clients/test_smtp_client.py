"""The reference SMTP client over real loopback sockets (asyncio and uvloop).

Its peers are the reference server and :class:`WireServer`, a hand-driven
server made of asyncio streams plus a sans-I/O engine (no adapter), whose
every reply, segment, close_notify and FIN is the test's decision.  Every
misbehaving mode is shown breaking its rule on the wire, next to the
strict client keeping it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, List, Optional, Sequence, Tuple

import pytest
from aiosmtplib import SMTPReadTimeoutError, SMTPSenderRefused, SMTPServerDisconnected
from starttls_harness.clients.smtp import (
    BEHAVIOURS,
    RuleViolation,
    SMTPClient,
    StopTLSNotSupported,
    TLSRequiredError,
)
from starttls_harness.servers.base import RunningServer, ServerConfig
from starttls_harness.servers.smtp import start_server
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import (
    CloseNotifyReceived,
    ClosureComplete,
    Connection,
    Event,
    HandshakeComplete,
    PlaintextData,
    Rule,
    TLSData,
    Violation,
)

Run = Callable[[Callable[[], Awaitable[None]]], None]

STEP = 5.0  # bound of every single wait, in seconds
USER, PASSWORD = "tester", "correct horse"


# ---------------------------------------------------------------- helpers


class WireServer:
    """One accepted connection of a hand-driven SMTP server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.engine = Connection()
        self.events: List[Event] = []
        self.app = b""
        self.eof = False

    def flush(self) -> None:
        out = self.engine.data_to_send()
        if out and not self.writer.is_closing():
            self.writer.write(out)

    def send(self, data: bytes) -> None:
        self.engine.send_data(data)
        self.flush()

    def send_raw(self, data: bytes) -> None:
        self.engine.send_raw(data)
        self.flush()

    async def read_more(self) -> None:
        data = await asyncio.wait_for(self.reader.read(65536), STEP)
        events = self.engine.receive_data(data)
        self.events += events
        for event in events:
            if isinstance(event, (PlaintextData, TLSData)):
                self.app += event.data
        self.flush()
        if not data:
            self.eof = True

    async def until(self, predicate: Callable[[], bool]) -> bool:
        while not predicate() and not self.eof:
            await self.read_more()
        return predicate()

    async def line(self) -> bytes:
        """The next command line, or b"" when the client closed."""
        await self.until(lambda: b"\n" in self.app)
        if b"\n" not in self.app:
            return b""
        line, self.app = self.app.split(b"\n", 1)
        return line + b"\n"

    def saw(self, kind: type) -> bool:
        return any(isinstance(e, kind) for e in self.events)

    @property
    def violations(self) -> List[Violation]:
        return [e for e in self.events if isinstance(e, Violation)]

    async def accept_starttls(self, pki: Pki, version: str, preface: bytes) -> bool:
        """Answer STARTTLS with ``preface`` and switch; True once handshaken."""
        self.engine.send_data(preface)
        self.events += self.engine.start_tls(pki.server_context(version), server_side=True)
        self.flush()
        return await self.until(lambda: self.saw(HandshakeComplete))

    def close(self) -> None:
        self.writer.close()


class WireServers:
    """A listening socket whose connections are handed to the test."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[WireServer] = asyncio.Queue()
        self.server: Optional[asyncio.AbstractServer] = None
        self.peers: List[WireServer] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = WireServer(reader, writer)
        self.peers.append(peer)
        await self.accepted.put(peer)

    async def next(self) -> WireServer:
        return await asyncio.wait_for(self.accepted.get(), STEP)

    async def stop(self) -> None:
        for peer in self.peers:
            peer.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def ehlo_reply(*keywords: str) -> bytes:
    lines = [b"250-wire.invalid"] + [b"250-" + k.encode() for k in keywords]
    lines[-1] = b"250 " + lines[-1][4:]
    return b"".join(line + b"\r\n" for line in lines)


def client_for(port: int, pki: Pki, version: str, **kwargs: Any) -> SMTPClient:
    return SMTPClient(
        "127.0.0.1",
        port,
        tls_context=pki.client_context(version),
        server_hostname="localhost",
        timeout=STEP,
        **kwargs,
    )


async def step(
    peer: WireServer, call: Awaitable[Any], expect: bytes, answer: bytes
) -> asyncio.Future[Any]:
    """Start a client call, check the command it sends, answer it."""
    task = asyncio.ensure_future(call)
    line = await peer.line()
    assert line.startswith(expect), (line, expect)
    peer.send(answer)
    return task


async def greet(
    servers: WireServers, client: SMTPClient, keywords: Sequence[str] = ("STARTTLS",)
) -> WireServer:
    """Connect the client, greet it and answer its EHLO."""
    connecting = asyncio.ensure_future(client.connect())
    peer = await servers.next()
    peer.send(b"220 wire.invalid ESMTP\r\n")
    await connecting
    await (await step(peer, client.ehlo(), b"EHLO ", ehlo_reply(*keywords)))
    return peer


async def upgraded(servers: WireServers, client: SMTPClient, pki: Pki, version: str) -> WireServer:
    """Connect, EHLO, STARTTLS, EHLO under TLS (STOPTLS and AUTH offered)."""
    peer = await greet(servers, client)
    starting = asyncio.ensure_future(client.starttls())
    assert await peer.line() == b"STARTTLS\r\n"
    assert await peer.accept_starttls(pki, version, b"220 go ahead\r\n")
    assert (await peer.line()).startswith(b"EHLO ")
    peer.send(ehlo_reply("STOPTLS", "AUTH PLAIN"))
    await starting
    return peer


async def start_reference(pki: Pki, version: str, behaviour: str = "strict") -> RunningServer:
    config = ServerConfig(pki=pki, tls_version=version, behaviour=behaviour)
    config.user, config.password = USER, PASSWORD
    return await start_server(config)


async def stop_reference(server: RunningServer) -> None:
    await server.close()
    for record in server.connections:
        await asyncio.wait_for(record.closed.wait(), STEP)
    await asyncio.sleep(0)  # one turn: cancelled handler tasks unwind


def rules(violations: Sequence[Violation]) -> List[Tuple[Rule, bool]]:
    return [(v.rule, v.enforced) for v in violations]


# ------------------------------------------------------------------ basics


def test_behaviour_catalogue() -> None:
    assert BEHAVIOURS["strict"].rule is None
    broken = {b.rule for b in BEHAVIOURS.values() if b.rule is not None}
    assert broken == {Rule(r) for r in ("R1", "R2", "R4", "R5", "R6", "R8", "R9")}
    with pytest.raises(ValueError, match="choose one of"):
        SMTPClient("127.0.0.1", 25, behaviour="nope")


def test_reply_wait_is_bounded(pki: Pki, tls_version: str, run: Run) -> None:
    async def body() -> None:
        servers = WireServers()
        port = await servers.start()
        client = client_for(port, pki, tls_version)
        client.timeout = 0.2
        connecting = asyncio.ensure_future(client.connect())
        peer = await servers.next()
        peer.send(b"220 wire.invalid\r\n")
        await connecting
        with pytest.raises(SMTPReadTimeoutError):
            await client.ehlo()  # never answered
        assert (await peer.line()).startswith(b"EHLO")
        await servers.stop()

    run(body)


def test_stoptls_refused_or_missing(pki: Pki, tls_version: str, run: Run) -> None:
    async def body() -> None:
        servers = WireServers()
        port = await servers.start()
        client = client_for(port, pki, tls_version)
        peer = await upgraded(servers, client, pki, tls_version)
        stopping = await step(peer, client.stoptls(), b"STOPTLS", b"502 5.5.1 not here\r\n")
        with pytest.raises(StopTLSNotSupported, match="refused STOPTLS: 502"):
            await stopping
        await (await step(peer, client.ehlo(), b"EHLO", ehlo_reply("AUTH PLAIN")))
        with pytest.raises(StopTLSNotSupported, match="does not offer STOPTLS"):
            await client.stoptls()
        client.close()
        await servers.stop()

    run(body)


def test_strict_client_says_ehlo_first_after_every_transition(
    pki: Pki, tls_version: str, run: Run
) -> None:
    async def body() -> None:
        server = await start_reference(pki, tls_version)
        client = client_for(server.port, pki, tls_version, require_tls=True)
        await client.connect()  # require_tls: EHLO, STARTTLS, EHLO
        assert client.tls_active and "stoptls" in client.extensions
        await client.login(USER, PASSWORD)
        await client.sendmail("a@example.org", "b@example.org", "Subject: one\r\n\r\nx\r\n")
        await client.stoptls()
        # R9: TLS is required, so nothing secret goes out in plaintext.
        with pytest.raises(TLSRequiredError, match="refusing to send mail in plaintext"):
            await client.sendmail("a@example.org", "b@example.org", "x")
        with pytest.raises(TLSRequiredError, match="credentials"):
            await client.login(USER, PASSWORD)
        await client.starttls()
        await client.quit()
        record = server.connections[0]
        await asyncio.wait_for(record.closed.wait(), STEP)
        phases = [(phase, data.split(b" ")[0]) for phase, data in record.received]
        firsts = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1][0] != p[0]]
        assert firsts == [
            ("plaintext", b"EHLO"),
            ("tls", b"EHLO"),
            ("plaintext", b"EHLO"),
            ("tls", b"EHLO"),
        ]
        assert b"MAIL" not in record.received_in("plaintext")
        assert b"AUTH" not in record.received_in("plaintext")
        assert [m.tls for m in server.messages] == [True]
        await stop_reference(server)

    run(body)


# ------------------------------------------- each behaviour breaks its rule


INJECTED = b"250-injected.invalid\r\n250 INJECTED\r\n"


@pytest.mark.parametrize("behaviour", ["strict", "accept-injected-response"])
def test_r1_response_injected_after_starttls_answer(
    pki: Pki, tls_version: str, run: Run, behaviour: str
) -> None:
    async def body() -> None:
        servers = WireServers()
        port = await servers.start()
        client = client_for(port, pki, tls_version, behaviour=behaviour)
        peer = await greet(servers, client)
        starting = asyncio.ensure_future(client.starttls())
        assert await peer.line() == b"STARTTLS\r\n"
        # The 220 and a forged EHLO answer in one plaintext segment.
        handshaken = await peer.accept_starttls(pki, tls_version, b"220 go ahead\r\n" + INJECTED)
        if behaviour == "strict":
            with pytest.raises(RuleViolation) as caught:
                await starting
            assert caught.value.rule is Rule.R1
            assert rules(client.violations) == [(Rule.R1, True)]
            assert client.violations[0].data == INJECTED  # held by the gate
            assert not handshaken and peer.eof
        else:
            assert handshaken
            assert (await peer.line()).startswith(b"EHLO ")
            peer.send(ehlo_reply("STOPTLS", "AUTH PLAIN"))
            await starting
            # The plaintext forgery was taken as the answer to EHLO under TLS.
            assert client.extensions == {"injected": ""}
            assert client.smtp.last_ehlo_response is not None
            assert client.smtp.last_ehlo_response.message == "injected.invalid\nINJECTED"
            client.close()
        await servers.stop()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "plaintext-in-tls"])
def test_r2_plaintext_reply_inside_tls(
    pki: Pki, tls_version: str, run: Run, behaviour: str
) -> None:
    async def body() -> None:
        servers = WireServers()
        port = await servers.start()
        client = client_for(port, pki, tls_version, behaviour=behaviour)
        peer = await upgraded(servers, client, pki, tls_version)
        noop = asyncio.ensure_future(client.execute_command(b"NOOP"))
        assert await peer.line() == b"NOOP\r\n"
        peer.send_raw(b"250 plaintext-answer\r\n")
        if behaviour == "strict":
            with pytest.raises(RuleViolation) as caught:
                await noop
            assert caught.value.rule is Rule.R2
            await peer.until(lambda: False)
            assert peer.eof
        else:
            reply = await noop
            assert (reply.code, reply.message) == (250, "plaintext-answer")
            assert rules(client.violations) == [(Rule.R2, False)]
            client.close()
        await servers.stop()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "one-sided-close"])
def test_r4_client_waits_for_close_notify(
    pki: Pki, tls_version: str, run: Run, behaviour: str
) -> None:
    async def body() -> None:
        server = await start_reference(pki, tls_version)
        client = client_for(server.port, pki, tls_version, behaviour=behaviour)
        await client.connect()
        await client.starttls()
        record = server.connections[0]
        if behaviour == "strict":
            greeting = await client.stoptls()
            assert greeting.code == 220 and "starttls" in client.extensions
            assert not record.violations and not client.violations
            await client.quit()
        else:
            with pytest.raises(SMTPServerDisconnected):
                await client.stoptls()
            await asyncio.wait_for(record.closed.wait(), STEP)
            # close_notify and EHLO arrived together: refused by the server.
            assert rules(record.violations) == [(Rule.R4, True)]
            assert record.violations[0].data == b"EHLO client.invalid\r\n"
        await stop_reference(server)

    run(body)


def test_r4_one_sided_client_against_one_sided_server(pki: Pki, tls_version: str, run: Run) -> None:
    """Two wrongs: the early EHLO is answered in plaintext (evidence both ways)."""

    async def body() -> None:
        server = await start_reference(pki, tls_version, "one-sided-resume")
        client = client_for(server.port, pki, tls_version, behaviour="one-sided-close")
        await client.connect()
        await client.starttls()
        assert (await client.stoptls()).code == 220
        assert "starttls" in client.extensions  # from the answer to the early EHLO
        assert rules(server.connections[0].violations) == [(Rule.R4, False)]
        await client.quit()
        await stop_reference(server)

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "no-close-notify-reply"])
def test_r5_client_answers_close_notify(
    pki: Pki, tls_version: str, run: Run, behaviour: str
) -> None:
    async def body() -> None:
        servers = WireServers()
        port = await servers.start()
        client = client_for(port, pki, tls_version, behaviour=behaviour)
        peer = await upgraded(servers, client, pki, tls_version)
        quitting = asyncio.ensure_future(client.quit())
        assert await peer.line() == b"QUIT\r\n"
        peer.engine.send_data(b"221 bye\r\n")
        peer.events += peer.engine.send_close_notify()  # same segment as the 221
        peer.flush()
        assert (await quitting).code == 221
        await peer.until(lambda: peer.saw(ClosureComplete))
        if behaviour == "strict":
            assert peer.saw(ClosureComplete) and not peer.violations
        else:
            assert not peer.saw(CloseNotifyReceived) and peer.eof
            assert rules(peer.violations) == [(Rule.R5, True)]
        await servers.stop()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "ignore-truncation"])
def test_r6_truncated_reply(pki: Pki, tls_version: str, run: Run, behaviour: str) -> None:
    async def body() -> None:
        servers = WireServers()
        port = await servers.start()
        client = client_for(port, pki, tls_version, behaviour=behaviour)
        peer = await greet(servers, client)
        starting = asyncio.ensure_future(client.starttls())
        assert await peer.line() == b"STARTTLS\r\n"
        assert await peer.accept_starttls(pki, tls_version, b"220 go ahead\r\n")
        assert (await peer.line()).startswith(b"EHLO ")
        peer.send(b"250-wire.invalid\r\n250-AUTH PLAIN\r\n")  # no final line...
        peer.writer.write_eof()  # ...and TCP FIN without close_notify
        if behaviour == "strict":
            with pytest.raises(RuleViolation) as caught:
                await starting
            assert caught.value.rule is Rule.R6
        else:
            await starting  # the cut reply was taken as the whole answer
            assert client.extensions == {"auth": "PLAIN"}
            assert not client.violations
        await servers.stop()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "no-state-reset"])
def test_r8_client_forgets_after_starttls(
    pki: Pki, tls_version: str, run: Run, behaviour: str
) -> None:
    async def body() -> None:
        server = await start_reference(pki, tls_version)
        client = client_for(server.port, pki, tls_version, behaviour=behaviour)
        await client.connect()
        await client.ehlo()
        await client.starttls()
        record = server.connections[0]
        if behaviour == "strict":
            assert "stoptls" in client.extensions and "starttls" not in client.extensions
            await client.sendmail("a@example.org", "b@example.org", "Subject: x\r\n\r\nx\r\n")
            assert record.received_in("tls").startswith(b"EHLO client.invalid\r\n")
        else:
            assert "starttls" in client.extensions  # plaintext knowledge kept
            with pytest.raises(SMTPSenderRefused) as refused:
                await client.sendmail("a@example.org", "b@example.org", "x")
            assert refused.value.code == 503
            assert record.received_in("tls").startswith(b"MAIL FROM:")
        await client.quit()
        await stop_reference(server)

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "downgrade"])
@pytest.mark.parametrize("how", ["stripped", "refused"])
def test_r9_no_downgrade(pki: Pki, tls_version: str, run: Run, behaviour: str, how: str) -> None:
    async def body() -> None:
        servers = WireServers()
        port = await servers.start()
        client = client_for(port, pki, tls_version, behaviour=behaviour, require_tls=True)
        connecting = asyncio.ensure_future(client.connect())
        peer = await servers.next()
        peer.send(b"220 wire.invalid\r\n")
        assert (await peer.line()).startswith(b"EHLO ")
        if how == "stripped":
            peer.send(ehlo_reply("AUTH PLAIN"))  # an attacker removed STARTTLS
        else:
            peer.send(ehlo_reply("STARTTLS", "AUTH PLAIN"))
            assert await peer.line() == b"STARTTLS\r\n"
            peer.send(b"454 4.7.0 TLS not available\r\n")
        if behaviour == "strict":
            with pytest.raises(TLSRequiredError, match="TLS is required"):
                await connecting
            assert await peer.line() == b""  # closed: nothing else was sent
        else:
            await connecting
            login = await step(
                peer, client.login(USER, PASSWORD), b"AUTH PLAIN ", b"235 2.7.0 ok\r\n"
            )
            await login
            sending = asyncio.ensure_future(client.sendmail("a@example.org", "b@example.org", "x"))
            for expect, answer in (
                (b"MAIL FROM:<a@example.org>", b"250 ok\r\n"),
                (b"RCPT TO:<b@example.org>", b"250 ok\r\n"),
                (b"DATA", b"354 go\r\n"),
            ):
                assert (await peer.line()).startswith(expect)
                peer.send(answer)
            assert await peer.line() == b"x\r\n" and await peer.line() == b".\r\n"
            peer.send(b"250 queued\r\n")
            await sending
            assert not peer.engine.tls_active  # credentials and mail went in plaintext
            client.close()
        await servers.stop()

    run(body)
