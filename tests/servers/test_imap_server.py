"""The reference IMAP server over real loopback sockets (asyncio and uvloop).

The server is driven by :class:`RawPeer`: asyncio streams plus one sans-I/O
engine, so every test decides each byte and each TCP segment and sees the
server's answers as they arrive on the wire.  Every misbehaving mode is
shown to break its rule on the wire, next to the strict mode that does not.

``RawPeer`` and the server helpers are also used by ``test_imap_client.py``
and ``test_imap_interop.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Dict,
    List,
    Optional,
    Tuple,
)

import pytest
import starttls_harness.servers.imap
from starttls_harness.servers.base import Limits, RunningServer, ServerConfig
from starttls_harness.servers.imap import BEHAVIOURS, ImapServerProtocol, start_server
from starttls_harness.servers.imapsyntax import (
    Literal,
    ParseError,
    StartTLSLine,
    is_starttls_line,
    tokenize,
)
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import (
    AlertReceived,
    ClosureComplete,
    Connection,
    Event,
    HandshakeComplete,
    HandshakeFailed,
    PlaintextData,
    Policy,
    Rule,
    TLSData,
    Violation,
)
from starttls_harness.tls.states import State

Runner = Callable[..., Any]
WAIT = 5.0
USER, PASSWORD = "tester", "correct horse"
LOGIN = b'LOGIN tester "correct horse"'


# --------------------------------------------------------------- raw peer


class RawPeer:
    """A hand-driven peer: asyncio streams + one engine (both roles).

    ``data`` is application data not consumed yet, ``received`` all of it
    (with the phase it came in), ``wire`` every raw byte received.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        policy: Optional[Policy] = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.engine = Connection(policy)
        self.data = bytearray()
        self.received: List[Tuple[str, bytes]] = []
        self.wire = bytearray()
        self.events: List[Event] = []
        self.eof = False
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    async def connect(cls, address: Tuple[str, int], policy: Optional[Policy] = None) -> RawPeer:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), WAIT)
        return cls(reader, writer, policy)

    # ------------------------------------------------------------ sending

    def flush(self) -> None:
        """Everything the engine queued, in ONE write (one TCP segment)."""
        out = self.engine.data_to_send()
        if out and not self.writer.is_closing():
            self.writer.write(out)

    def send(self, data: bytes) -> None:
        self.engine.send_data(data)
        self.flush()

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are, whatever the phase (the attacker's pen)."""
        self.engine.send_raw(data)
        self.flush()

    def record(self, events: List[Event]) -> None:
        for event in events:
            self.events.append(event)
            if isinstance(event, (PlaintextData, TLSData)):
                self.data += event.data
                phase = "tls" if isinstance(event, TLSData) else "plain"
                self.received.append((phase, event.data))
        self.flush()

    # ---------------------------------------------------------- receiving

    async def pump(self) -> None:
        try:
            chunk = await asyncio.wait_for(self.reader.read(65536), WAIT)
        except ConnectionResetError:
            chunk = b""  # RST: the peer closed with our bytes unread
        self.wire += chunk
        if not chunk:
            self.eof = True
        self.record(self.engine.receive_data(chunk))

    async def until(self, done: Callable[[], bool], what: str = "condition") -> None:
        while not done():
            if self.eof:
                raise AssertionError(f"EOF while waiting for {what}; got {bytes(self.wire)!r}")
            await self.pump()

    async def line(self) -> bytes:
        await self.until(lambda: b"\n" in self.data, "a line")
        end = self.data.index(b"\n") + 1
        line = bytes(self.data[:end])
        del self.data[:end]
        return line

    async def response(self, tag: bytes) -> bytes:
        """All lines up to and including the tagged completion for ``tag``."""
        lines = bytearray()
        while True:
            line = await self.line()
            lines += line
            if line.startswith(tag + b" "):
                return bytes(lines)

    async def command(self, tag: bytes, text: bytes) -> bytes:
        self.send(tag + b" " + text + b"\r\n")
        return await self.response(tag)

    async def wait_eof(self) -> None:
        while not self.eof:
            await self.pump()

    async def starttls(
        self, context: ssl.SSLContext, *, server_side: bool, hostname: Optional[str] = None
    ) -> bool:
        """Handshake; False if it failed or the connection broke."""
        before = len(self.events)
        self.record(
            self.engine.start_tls(context, server_side=server_side, server_hostname=hostname)
        )
        while not any(isinstance(e, HandshakeComplete) for e in self.events[before:]):
            if self.engine.state in (State.BROKEN, State.DONE) or self.eof:
                return False
            if any(isinstance(e, HandshakeFailed) for e in self.events[before:]):
                return False
            await self.pump()
        return True

    def closures(self) -> int:
        """How many times both close_notify alerts have crossed."""
        return sum(isinstance(e, ClosureComplete) for e in self.events)

    @property
    def violations(self) -> List[Violation]:
        return [e for e in self.events if isinstance(e, Violation)]

    def closed_cleanly(self) -> bool:
        return self.closures() > 0

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), WAIT)


# ------------------------------------------------------------ server helpers


@contextlib.asynccontextmanager
async def serving(
    pki: Pki, tls_version: str, behaviour: str = "strict", limits: Optional[Limits] = None
) -> AsyncIterator[RunningServer]:
    config = ServerConfig(pki=pki, tls_version=tls_version, behaviour=behaviour)
    if limits is not None:
        config.limits = limits
    server = await start_server(config)
    try:
        yield server
    finally:
        await server.close()


def connection(server: RunningServer, index: int = 0) -> ImapServerProtocol:
    conn = server.connections[index]
    assert isinstance(conn, ImapServerProtocol)
    return conn


async def finished(server: RunningServer, index: int = 0) -> ImapServerProtocol:
    """The server-side connection, once its session is over (bounded wait)."""
    conn = connection(server, index)
    await asyncio.wait_for(asyncio.shield(conn.finished), WAIT)
    return conn


async def greeted(server: RunningServer, policy: Optional[Policy] = None) -> RawPeer:
    peer = await RawPeer.connect(server.address, policy)
    greeting = await peer.line()
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    return peer


async def upgrade(peer: RawPeer, pki: Pki, tls_version: str, tag: bytes = b"s1") -> None:
    answer = await peer.command(tag, b"STARTTLS")
    assert answer == tag + b" OK Begin TLS negotiation now\r\n"
    ok = await peer.starttls(
        pki.client_context(tls_version), server_side=False, hostname="localhost"
    )
    assert ok, peer.events


async def downgrade(peer: RawPeer, tag: bytes = b"s9") -> bytes:
    """STOPTLS with the full closure; returns the new greeting."""
    assert await peer.command(tag, b"STOPTLS") == tag + b" OK Begin TLS closure\r\n"
    before = peer.closures()
    peer.record(peer.engine.unwrap())
    await peer.until(lambda: peer.closures() > before, "the server's close_notify")
    assert peer.engine.state is State.PLAINTEXT
    greeting = await peer.line()
    assert greeting.startswith(b"* OK [CAPABILITY ")
    return greeting


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll a condition of the server under test (bounded; the server gives
    no signal on the wire for what is checked)."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


# ------------------------------------------------------------------ syntax


def test_starttls_predicate_is_literal_aware() -> None:
    assert is_starttls_line(b"a1 STARTTLS\r\n") and is_starttls_line(b"X starttls\n")
    assert not is_starttls_line(b"a1 STARTTLS x\r\n") and not is_starttls_line(b"* STARTTLS\r\n")
    predicate = StartTLSLine()
    assert not predicate(b"a1 APPEND INBOX {20}\r\n")
    assert not predicate(b"a2 STARTTLS\r\n")  # 13 of the 20 literal bytes
    assert not predicate(b"1234567 a3 STARTTLS\r\n")  # literal ends, command continues
    assert predicate(b"a4 STARTTLS\r\n")
    assert not predicate(b"a5 APPEND INBOX {5+}\r\n")
    predicate.cancel_literal()
    assert predicate(b"a6 STARTTLS\r\n")


def test_tokenizer() -> None:
    tokens = tokenize(
        b'a1 APPEND INBOX (\\Seen) "x \\"y\\"" {3}\r\nabc BODY[HEADER.FIELDS (A B)]\r\n'
    )
    assert tokens == [
        b"a1",
        b"APPEND",
        b"INBOX",
        [b"\\Seen"],
        b'x "y"',
        b"abc",
        b"BODY[HEADER.FIELDS (A B)]",
    ]
    assert isinstance(tokens[5], Literal)
    for bad in (b"a1 (x\r\n", b"a1 x)\r\n", b'a1 "x\r\n', b"a1 {9}\r\nab\r\n"):
        with pytest.raises(ParseError):
            tokenize(bad)


# -------------------------------------------------------- basic behaviour


def test_plaintext_session_rules(pki: Pki, tls_version: str, run: Runner) -> None:
    async def body() -> None:
        async with serving(pki, tls_version) as server:
            peer = await greeted(server)
            caps = await peer.command(b"a1", b"CAPABILITY")
            assert caps.startswith(b"* CAPABILITY IMAP4rev1 LITERAL+ STARTTLS LOGINDISABLED\r\n")
            assert b"STOPTLS" not in caps
            assert (await peer.command(b"a2", LOGIN)).startswith(b"a2 NO [PRIVACYREQUIRED]")
            assert (await peer.command(b"a3", b"FROBNICATE")).startswith(b"a3 BAD")
            assert (await peer.command(b"a4", b"SELECT INBOX")).startswith(b"a4 BAD")
            assert (await peer.command(b"a5", b"STOPTLS")).startswith(b"a5 BAD")
            assert (await peer.command(b"a6", b"AUTHENTICATE PLAIN")).startswith(b"a6 NO")
            peer.send(b"(not a tag\r\n")
            assert (await peer.line()).startswith(b"* BAD")
            assert await peer.command(b"a7", b"NOOP") == b"a7 OK NOOP completed\r\n"
            await upgrade(peer, pki, tls_version, b"a8")
            caps = await peer.command(b"a9", b"CAPABILITY")
            assert caps.startswith(b"* CAPABILITY IMAP4rev1 LITERAL+ STOPTLS\r\n")
            assert b"STARTTLS" not in caps and b"LOGINDISABLED" not in caps
            assert (await peer.command(b"b1", b"STARTTLS")).startswith(b"b1 BAD")
            assert (await peer.command(b"b2", b"LOGIN tester wrong")).startswith(b"b2 NO")
            # STOPTLS with a command pipelined behind it is refused; both run in TLS.
            peer.send(b"b3 STOPTLS\r\nb4 NOOP\r\n")
            assert (await peer.response(b"b3")).startswith(b"b3 BAD")
            assert await peer.response(b"b4") == b"b4 OK NOOP completed\r\n"
            bye = await peer.command(b"b5", b"LOGOUT")
            assert bye == b"* BYE Logging out\r\nb5 OK LOGOUT completed\r\n"
            await peer.wait_eof()
            # The server closed TLS with close_notify (answered by our engine).
            assert peer.closed_cleanly() and not peer.violations
            assert not connection(server).transport.violations  # type: ignore[union-attr]
            await peer.close()

    run(body)


def test_commands_sent_during_stoptls_end_the_connection(
    pki: Pki, tls_version: str, run: Runner
) -> None:
    async def body() -> None:
        async with serving(pki, tls_version) as server:
            peer = await greeted(server)
            await upgrade(peer, pki, tls_version)
            assert await peer.command(b"a2", b"STOPTLS") == b"a2 OK Begin TLS closure\r\n"
            peer.send(b"a3 NOOP\r\n")  # under TLS, before our close_notify
            peer.record(peer.engine.unwrap())
            await peer.until(peer.closed_cleanly, "the closure")
            assert await peer.line() == b"* BYE Commands were pipelined after STOPTLS\r\n"
            await peer.wait_eof()
            assert b"a3 " not in bytes(peer.data)
            await peer.close()

    run(body)


def test_three_stoptls_cycles_raw(pki: Pki, tls_version: str, run: Runner) -> None:
    """Positive control (server.stoptls-cycle) driven byte by byte.

    Plaintext phases: LOGIN is disabled, so nothing can be appended; they
    show the reset (SELECT refused: not authenticated).  TLS phases: state
    reset (SELECT refused before LOGIN), then LOGIN, SELECT, APPEND (a
    synchronizing literal, or LITERAL+ in odd cycles), FETCH.
    """

    async def body() -> None:
        async with serving(pki, tls_version) as server:
            peer = await greeted(server)
            for cycle in (1, 2, 3):
                t = b"c%d" % cycle
                assert (await peer.command(t + b"a", b"SELECT INBOX")).startswith(t + b"a BAD")
                assert b"STARTTLS" in await peer.command(t + b"b", b"CAPABILITY")
                await upgrade(peer, pki, tls_version, t + b"c")
                assert b"STOPTLS" in await peer.command(t + b"d", b"CAPABILITY")
                assert (await peer.command(t + b"e", b"SELECT INBOX")).startswith(t + b"e BAD")
                assert (await peer.command(t + b"f", LOGIN)).startswith(t + b"f OK")
                selected = await peer.command(t + b"g", b"SELECT INBOX")
                assert b"* %d EXISTS\r\n" % (cycle - 1) in selected
                message = b"Subject: cycle %d\r\n\r\nbody %d\r\n" % (cycle, cycle)
                if cycle % 2:
                    peer.send(t + b"h APPEND INBOX (\\Flagged) {%d+}\r\n" % len(message))
                    peer.send(message + b"\r\n")
                else:
                    peer.send(t + b"h APPEND INBOX {%d}\r\n" % len(message))
                    assert (await peer.line()).startswith(b"+ ")
                    peer.send(message + b"\r\n")
                appended = await peer.response(t + b"h")
                assert appended.endswith(b"OK APPEND completed (UID %d)\r\n" % cycle)
                fetched = await peer.command(t + b"i", b"FETCH %d (RFC822)" % cycle)
                assert b"RFC822 {%d}\r\n" % len(message) + message in fetched
                assert b"\\Seen" in fetched
                await downgrade(peer, t + b"j")
            assert [(m.data[:16], m.tls, m.cycle) for m in server.messages] == [
                (b"Subject: cycle %d" % c, True, c) for c in (1, 2, 3)
            ]
            assert server.messages[0].flags == {"\\Flagged", "\\Seen"}
            assert not peer.violations
            assert not connection(server).transport.violations  # type: ignore[union-attr]
            await peer.close()

    run(body)


def test_fetch_items(pki: Pki, tls_version: str, run: Runner) -> None:
    async def body() -> None:
        async with serving(pki, tls_version) as server:
            peer = await greeted(server)
            await upgrade(peer, pki, tls_version)
            await peer.command(b"a1", LOGIN)
            message = b"Subject: x\r\nFrom: a@example.org\r\n\r\nline 1\r\nline 2\r\n"
            peer.send(b"a2 APPEND INBOX {%d+}\r\n" % len(message) + message + b"\r\n")
            await peer.response(b"a2")
            assert b"READ-ONLY" in await peer.command(b"a3", b"EXAMINE INBOX")
            out = await peer.command(
                b"a4", b"FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER] BODY[TEXT]<2.4>)"
            )
            assert b"UID 1 FLAGS () RFC822.SIZE %d" % len(message) in out
            header = message[: message.index(b"\r\n\r\n") + 4]
            assert b"BODY[HEADER] {%d}\r\n" % len(header) + header in out
            assert b"BODY[TEXT]<2> {4}\r\nne 1" in out
            assert b"\\Seen" not in out  # EXAMINE is read-only
            await peer.command(b"a5", b"SELECT INBOX")
            out = await peer.command(b"a6", b"UID FETCH 1 (BODY[])")
            assert out.startswith(b"* 1 FETCH (FLAGS (\\Seen) UID 1 BODY[] {%d}" % len(message))
            assert b"INTERNALDATE" in await peer.command(b"a7", b"FETCH 1 FAST")
            for bad in (b"FETCH 2 FLAGS", b"FETCH 0 FLAGS", b"FETCH 1 ENVELOPE", b"FETCH 1 ()"):
                assert b"a8 BAD" in await peer.command(b"a8", bad)
            assert b"a9 NO [TRYCREATE]" in await peer.command(b"a9", b"APPEND Other {0+}\r\n")
            assert b"b1 NO [NONEXISTENT]" in await peer.command(b"b1", b"SELECT Other")
            await peer.close()

    run(body)


# ------------------------------------------------------------------ limits


def test_starttls_inside_a_literal_is_data(pki: Pki, tls_version: str, run: Runner) -> None:
    """The hold gate's predicate skips literals (synchronizing and LITERAL+)."""

    async def body() -> None:
        async with serving(pki, tls_version) as server:
            peer = await greeted(server)
            peer.send(b"a1 APPEND INBOX {13}\r\n")
            assert (await peer.line()).startswith(b"+ ")
            peer.send(b"a2 STARTTLS\r\n\r\n")
            assert (await peer.response(b"a1")).startswith(b"a1 BAD")  # not authenticated
            peer.send(b"a3 APPEND INBOX {13+}\r\na2 STARTTLS\r\n\r\na4 CAPABILITY\r\n")
            assert (await peer.response(b"a3")).startswith(b"a3 BAD")
            assert (await peer.response(b"a4")).startswith(b"* CAPABILITY")
            assert not peer.violations
            await upgrade(peer, pki, tls_version, b"a5")  # the gate still works
            await peer.close()

    run(body)


def test_bounded_lines_and_literals(pki: Pki, tls_version: str, run: Runner) -> None:
    async def body() -> None:
        limits = Limits(max_line=256, max_literal=1000)
        async with serving(pki, tls_version, limits=limits) as server:
            peer = await greeted(server)
            # A synchronizing literal over the limit is refused before it is sent...
            answer = await peer.command(b"a1", b"APPEND INBOX {1001}")
            assert answer == b"a1 NO [TOOBIG] Literal too large\r\n"
            # ... and the STARTTLS gate does not wait for it.
            await upgrade(peer, pki, tls_version, b"a2")
            # A non-synchronizing one cannot be refused: the connection ends.
            peer.send(b"a3 APPEND INBOX {1001+}\r\n")
            assert (await peer.line()).startswith(b"* BYE [TOOBIG]")
            await peer.wait_eof()
            await peer.close()

            peer = await greeted(server)
            peer.send(b"a1 NOOP " + b"x" * 300 + b"\r\n")
            assert await peer.line() == b"* BYE Line too long\r\n"
            await peer.wait_eof()
            await peer.close()

    run(body)


def test_bounded_connections(pki: Pki, tls_version: str, run: Runner) -> None:
    async def body() -> None:
        async with serving(pki, tls_version, limits=Limits(max_connections=1)) as server:
            first = await greeted(server)
            second = await RawPeer.connect(server.address)
            assert await second.line() == b"* BYE [UNAVAILABLE] Too many connections\r\n"
            await second.wait_eof()
            await second.close()
            await first.command(b"a1", b"LOGOUT")
            await first.wait_eof()
            await first.close()
            await finished(server, 0)
            third = await greeted(server)  # the slot is free again
            await third.close()

    run(body)


def test_idle_connections_are_closed(pki: Pki, tls_version: str, run: Runner) -> None:
    async def body() -> None:
        async with serving(pki, tls_version, limits=Limits(idle_timeout=0.2)) as server:
            peer = await greeted(server)
            assert (await peer.line()).startswith(b"* BYE Autologout")
            await peer.wait_eof()
            await peer.close()

    run(body)


# ------------------------------------------------------------ misbehaviours


@pytest.mark.parametrize("segments", ["coalesced", "split"])
@pytest.mark.parametrize("behaviour", ["strict", "keep-buffer"])
def test_r1_command_injection(
    pki: Pki, tls_version: str, run: Runner, behaviour: str, segments: str
) -> None:
    """server.command-injection(-split): a command pipelined after STARTTLS."""

    async def body() -> None:
        async with serving(pki, tls_version, behaviour) as server:
            peer = await greeted(server)
            if segments == "coalesced":
                peer.send(b"a1 STARTTLS\r\na2 CAPABILITY\r\n")  # one segment (CVE-2011-0411)
                assert await peer.line() == b"a1 OK Begin TLS negotiation now\r\n"
            else:
                peer.send(b"a1 STARTTLS\r\n")
                assert await peer.line() == b"a1 OK Begin TLS negotiation now\r\n"
                peer.send(b"a2 CAPABILITY\r\n")  # before our ClientHello
                conn = connection(server)
                assert conn.transport is not None
                events = conn.transport.events
                # Let the server read it alone before the ClientHello follows.
                await eventually(
                    lambda: any(isinstance(e, Violation) for e in events), "the server to read it"
                )
            context = pki.client_context(tls_version)
            ok = await peer.starttls(context, server_side=False, hostname="localhost")
            conn = await finished(server) if not ok else connection(server)
            if behaviour == "strict":
                assert not ok
                await peer.wait_eof()
                assert b"a2 " not in peer.wire  # never answered, not even encrypted
                assert conn.transport is not None
                assert [v.rule for v in conn.transport.violations] == [Rule.R1]
                assert conn.log[-1] == ("plain0", b"a1 STARTTLS")
            else:
                assert ok
                answer = await peer.response(b"a2")  # the injected command, answered in TLS
                assert answer.endswith(b"a2 OK CAPABILITY completed\r\n")
                assert peer.received[-1][0] == "tls"
                assert ("tls1", b"a2 CAPABILITY") in conn.log
            await peer.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "plaintext-in-tls"])
def test_r2_plaintext_in_tls(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    async def body() -> None:
        async with serving(pki, tls_version, behaviour) as server:
            peer = await greeted(server)
            await upgrade(peer, pki, tls_version)
            peer.send_raw(b"a2 CAPABILITY\r\n")  # plaintext while TLS is up
            if behaviour == "strict":
                await peer.wait_eof()
                assert b"a2 " not in bytes(peer.data)
                assert not peer.closed_cleanly()  # cut, no close_notify to plaintext
                conn = await finished(server)
                assert conn.transport is not None
                assert [v.rule for v in conn.transport.violations] == [Rule.R2]
            else:
                answer = await peer.response(b"a2")
                assert answer.endswith(b"a2 OK CAPABILITY completed\r\n")
                assert peer.received[-1][0] == "tls"  # answered inside TLS
            await peer.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "early-plaintext"])
def test_r3_plaintext_before_closure(
    pki: Pki, tls_version: str, run: Runner, behaviour: str
) -> None:
    async def body() -> None:
        async with serving(pki, tls_version, behaviour) as server:
            peer = await greeted(server)
            await upgrade(peer, pki, tls_version)
            mark = len(peer.wire)
            peer.send(b"a2 STOPTLS\r\n")
            if behaviour == "strict":
                assert await peer.line() == b"a2 OK Begin TLS closure\r\n"
                # The server waits for our close_notify before anything else.
                assert peer.engine.state is State.TLS and b"* OK" not in peer.wire[mark:]
                peer.record(peer.engine.unwrap())
                await peer.until(peer.closed_cleanly)
                assert (await peer.line()).startswith(b"* OK [CAPABILITY")
                assert not peer.violations
                assert peer.received[-1][0] == "plain"
            else:
                await peer.until(lambda: bool(peer.violations), "the violation")
                # OK, close_notify and the greeting came in one segment,
                # before we had sent our close_notify.
                (violation,) = peer.violations
                assert violation.rule is Rule.R4 and violation.data.startswith(b"* OK [CAP")
                assert b"a2 OK Begin TLS closure" in bytes(peer.data)
            await peer.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "one-sided-resume"])
def test_r4_one_sided_close(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    """server.one-sided-close: close_notify + plaintext in one segment."""

    async def body() -> None:
        async with serving(pki, tls_version, behaviour) as server:
            peer = await greeted(server)
            await upgrade(peer, pki, tls_version)
            assert await peer.command(b"a2", b"STOPTLS") == b"a2 OK Begin TLS closure\r\n"
            peer.events.extend(peer.engine.unwrap())  # queued, not flushed yet
            peer.send_raw(b"a3 CAPABILITY\r\n")  # same write as the close_notify
            conn = connection(server)
            assert conn.transport is not None
            if behaviour == "strict":
                await peer.wait_eof()
                assert b"a3 " not in peer.wire
                rules = [v.rule for v in conn.transport.violations]
                assert rules == [Rule.R4]
                # The server never answered our close_notify: it hung up.
                assert [v.rule for v in peer.violations] == [Rule.R5]
            else:
                answer = await peer.response(b"a3")
                assert answer.startswith(b"* OK [CAPABILITY")  # the greeting, then a3
                assert answer.endswith(b"a3 OK CAPABILITY completed\r\n")
                assert peer.received[-1][0] == "plain"
                (violation,) = conn.transport.violations
                assert violation.rule is Rule.R4 and not violation.enforced
            await peer.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "no-close-notify-reply"])
def test_r5_close_notify_reply(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    async def body() -> None:
        async with serving(pki, tls_version, behaviour) as server:
            peer = await greeted(server)
            await upgrade(peer, pki, tls_version)
            assert await peer.command(b"a2", b"STOPTLS") == b"a2 OK Begin TLS closure\r\n"
            mark = len(peer.wire)
            peer.record(peer.engine.unwrap())
            if behaviour == "strict":
                await peer.until(peer.closed_cleanly, "the server's close_notify")
                assert (await peer.line()).startswith(b"* OK")
                assert not peer.violations
            else:
                await peer.wait_eof()
                assert not peer.closed_cleanly()
                (violation,) = peer.violations
                assert violation.rule is Rule.R5 and b"* OK" not in peer.wire[mark:]
            await peer.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "ignore-truncation"])
def test_r6_truncated_append(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    """server.truncation: TCP FIN in the middle of an APPEND literal under TLS."""

    async def body() -> None:
        async with serving(pki, tls_version, behaviour) as server:
            peer = await greeted(server)
            await upgrade(peer, pki, tls_version)
            await peer.command(b"a1", LOGIN)
            peer.send(b"a2 APPEND INBOX {100}\r\n")
            assert (await peer.line()).startswith(b"+ ")
            partial = b"Subject: cut\r\n\r\nonly some of the hundred bytes\r\n"
            peer.send(partial)
            peer.writer.write_eof()  # FIN, TLS still up, no close_notify
            await peer.wait_eof()
            conn = await finished(server)
            assert conn.transport is not None
            # What a later reader of the mailbox gets:
            reader = await greeted(server)
            await upgrade(reader, pki, tls_version)
            await reader.command(b"b1", LOGIN)
            selected = await reader.command(b"b2", b"SELECT INBOX")
            if behaviour == "strict":
                assert [v.rule for v in conn.transport.violations] == [Rule.R6]
                assert b"* 0 EXISTS" in selected and server.messages == []
            else:
                assert b"* 1 EXISTS" in selected
                fetched = await reader.command(b"b3", b"FETCH 1 (RFC822)")
                assert b"RFC822 {%d}\r\n" % len(partial) + partial in fetched
                assert not server.messages[0].complete
            await peer.close()
            await reader.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "alert-as-close"])
def test_r7_alert_is_not_closure(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    async def body() -> None:
        async with serving(pki, tls_version, behaviour) as server:
            peer = await greeted(server)
            await upgrade(peer, pki, tls_version)
            # Make our own TLS stack emit a fatal alert (bad_record_mac) by
            # feeding it a forged record, then follow the alert with plaintext.
            peer.engine.receive_data(b"\x17\x03\x03\x00\x20" + os.urandom(32))
            peer.engine.send_raw(b"a3 CAPABILITY\r\n")
            peer.flush()  # alert + plaintext, one segment
            conn = connection(server)
            assert conn.transport is not None
            if behaviour == "strict":
                await peer.wait_eof()
                assert b"a3 " not in peer.wire
                assert any(isinstance(e, AlertReceived) for e in conn.transport.events)
                assert [v.rule for v in conn.transport.violations] == [Rule.R7]
            else:
                await peer.until(lambda: b"a3 OK" in peer.wire, "the answer")
                plain = bytes(peer.wire[peer.wire.index(b"* OK") :])
                assert re.match(rb"\* OK \[CAPABILITY [^\]]*STARTTLS", plain)
                assert b"a3 OK CAPABILITY completed\r\n" in plain  # answered in plaintext
            await peer.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "no-state-reset"])
def test_r8_state_reset(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    """server.state-reset: is the TLS login still valid after STOPTLS?"""

    async def body() -> None:
        async with serving(pki, tls_version, behaviour) as server:
            peer = await greeted(server)
            await upgrade(peer, pki, tls_version)
            await peer.command(b"a1", LOGIN)
            message = b"Subject: secret\r\n\r\nsecret\r\n"
            await peer.command(b"a2", b"APPEND INBOX {%d+}\r\n" % len(message) + message)
            await downgrade(peer, b"a3")
            selected = await peer.command(b"a4", b"SELECT INBOX")
            fetched = await peer.command(b"a5", b"FETCH 1 (RFC822)")
            if behaviour == "strict":
                assert selected.startswith(b"a4 BAD") and fetched.startswith(b"a5 BAD")
                assert not any(b"secret" in d for phase, d in peer.received if phase == "plain")
            else:
                assert selected.endswith(b"a4 OK [READ-WRITE] SELECT completed\r\n")
                assert message in fetched  # the mail crossed in plaintext
                assert peer.received[-1][0] == "plain"
            await peer.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "resume-without-stoptls"])
def test_r3_bare_closure(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    """server.plaintext-after-close: a closure no STOPTLS asked for ends the connection."""

    async def body() -> None:
        async with serving(pki, tls_version, behaviour) as server:
            peer = await greeted(server)
            await upgrade(peer, pki, tls_version)
            # One exchange under TLS first: the server's side of a TLS 1.3
            # handshake ends only when our Finished has arrived.
            assert (await peer.command(b"a1", b"NOOP")).startswith(b"a1 OK")
            before = peer.closures()
            peer.record(peer.engine.unwrap())
            await peer.until(lambda: peer.closures() > before, "the server's close_notify")
            if behaviour == "strict":
                await peer.wait_eof()
                assert b"* OK" not in peer.wire.split(b"s1 OK", 1)[1]
            else:
                assert (await peer.line()).startswith(b"* OK")  # plaintext resumed
            await peer.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "one-sided-bare-resume"])
def test_r4_bare_one_sided_close(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    """server.one-sided-close: close_notify + plaintext in one segment, no STOPTLS."""

    async def body() -> None:
        async with serving(pki, tls_version, behaviour) as server:
            peer = await greeted(server)
            await upgrade(peer, pki, tls_version)
            assert (await peer.command(b"a1", b"NOOP")).startswith(b"a1 OK")  # see above
            peer.events.extend(peer.engine.unwrap())  # queued, not flushed yet
            peer.send_raw(b"a3 CAPABILITY\r\n")  # same write as the close_notify
            if behaviour == "strict":
                await peer.wait_eof()
                assert b"a3 " not in peer.wire
            else:
                answer = await peer.response(b"a3")
                assert answer.endswith(b"a3 OK CAPABILITY completed\r\n")
            await peer.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "accept-stoptls-in-plaintext"])
def test_r3_stoptls_outside_tls(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    """server.stoptls-outside-tls: there is no TLS to end."""

    async def body() -> None:
        async with serving(pki, tls_version, behaviour) as server:
            peer = await greeted(server)
            answer = await peer.command(b"a1", b"STOPTLS")
            want = b"a1 BAD" if behaviour == "strict" else b"a1 OK Begin TLS closure"
            assert answer.startswith(want), answer
            await peer.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "accept-starttls-in-tls"])
def test_r8_starttls_in_tls(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    """server.starttls-in-tls: STARTTLS is not offered inside TLS."""

    async def body() -> None:
        async with serving(pki, tls_version, behaviour) as server:
            peer = await greeted(server)
            await upgrade(peer, pki, tls_version)
            answer = await peer.command(b"a2", b"STARTTLS")
            want = b"a2 BAD" if behaviour == "strict" else b"a2 OK Begin TLS negotiation"
            assert answer.startswith(want), answer
            await peer.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "plaintext-goodbye"])
def test_r3_plaintext_goodbye(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    """server.data-after-close-notify: nothing in plaintext after the closure."""

    async def body() -> None:
        async with serving(pki, tls_version, behaviour) as server:
            peer = await greeted(server)
            await upgrade(peer, pki, tls_version)
            assert (await peer.command(b"a1", b"NOOP")).startswith(b"a1 OK")
            before = peer.closures()
            peer.record(peer.engine.unwrap())
            await peer.until(lambda: peer.closures() > before, "the server's close_notify")
            await peer.wait_eof()
            tail = peer.wire.split(b"s1 OK", 1)[1]
            assert (b"* BYE TLS closed" in tail) is (behaviour == "plaintext-goodbye")
            await peer.close()

    run(body)


#: Which test shows which server behaviour breaking its rule.
COVERAGE: Dict[str, Callable[..., None]] = {
    "keep-buffer": test_r1_command_injection,
    "plaintext-in-tls": test_r2_plaintext_in_tls,
    "early-plaintext": test_r3_plaintext_before_closure,
    "one-sided-resume": test_r4_one_sided_close,
    "no-close-notify-reply": test_r5_close_notify_reply,
    "ignore-truncation": test_r6_truncated_append,
    "alert-as-close": test_r7_alert_is_not_closure,
    "no-state-reset": test_r8_state_reset,
    "resume-without-stoptls": test_r3_bare_closure,
    "one-sided-bare-resume": test_r4_bare_one_sided_close,
    "accept-stoptls-in-plaintext": test_r3_stoptls_outside_tls,
    "accept-starttls-in-tls": test_r8_starttls_in_tls,
    "plaintext-goodbye": test_r3_plaintext_goodbye,
}


def test_every_behaviour_is_documented_and_tested() -> None:
    doc = starttls_harness.servers.imap.__doc__ or ""
    for name, behaviour in BEHAVIOURS.items():
        if name == "strict":
            continue
        assert behaviour.rule is not None
        assert f"``{name}`` ({behaviour.rule.value})" in doc, name
        assert name in COVERAGE, f"no wire test for {name}"
