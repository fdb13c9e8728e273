"""The reference SMTP server over real loopback sockets (asyncio and uvloop).

Most tests drive the server with :class:`WirePeer`: asyncio streams plus a
sans-I/O engine and no adapter, so that every segment, close_notify and FIN
is the test's decision.  Every misbehaving mode is shown breaking its rule
on the wire, next to the strict server keeping it.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Awaitable, Callable, List, Optional, Tuple

import pytest
from starttls_harness.clients.smtp import SMTPClient
from starttls_harness.report.verdicts import Result
from starttls_harness.run.reference import reference_servers
from starttls_harness.run.server import RunSettings, run_server_target
from starttls_harness.scenarios.server import by_id
from starttls_harness.servers.base import Limits, RunningServer, ServerConfig, behaviour_named
from starttls_harness.servers.smtp import BEHAVIOURS, SMTPConnection, start_server
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import (
    AlertReceived,
    CloseNotifyReceived,
    CloseNotifySent,
    ClosureComplete,
    Connection,
    Event,
    HandshakeComplete,
    PlaintextData,
    Policy,
    Rule,
    TLSData,
    Violation,
)
from starttls_harness.tls.states import State

Run = Callable[[Callable[[], Awaitable[None]]], None]

STEP = 5.0  # bound of every single wait, in seconds
USER, PASSWORD = "tester", "correct horse"
FROM, TO = "a@example.org", ["b@example.org"]
#: What HELP lists: aiosmtpd's commands that carry help text, ours included
#: (the overridden EHLO, AUTH and DATA carry none, so HELP leaves them out).
HELP_COMMANDS = "HELO HELP MAIL NOOP QUIT RCPT RSET STARTTLS STOPTLS VRFY".split()


# ---------------------------------------------------------------- helpers


def final_line(line: bytes) -> bool:
    return line[3:4] != b"-"


class WirePeer:
    """A hand-driven SMTP client: streams + the engine, every byte explicit."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, policy: Optional[Policy]
    ) -> None:
        self.reader, self.writer = reader, writer
        self.engine = Connection(policy)
        self.events: List[Event] = []
        self.app = b""
        self.eof = False

    @classmethod
    async def connect(cls, server: RunningServer, policy: Optional[Policy] = None) -> WirePeer:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(server.host, server.port), STEP
        )
        return cls(reader, writer, policy)

    # sending
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

    def fin(self) -> None:
        """TCP FIN, whatever the TLS state (a truncation under TLS)."""
        self.writer.write_eof()

    def close(self) -> None:
        self.writer.close()

    # receiving
    async def read_more(self) -> None:
        data = await asyncio.wait_for(self.reader.read(65536), STEP)
        events = self.engine.receive_data(data)
        self.events += events
        for event in events:
            if isinstance(event, (PlaintextData, TLSData)):
                self.app += event.data
        self.flush()  # handshake messages, close_notify answers
        if not data:
            self.eof = True

    async def until(self, predicate: Callable[[], bool]) -> bool:
        """Read until ``predicate()`` holds or the peer closed; return it."""
        while not predicate() and not self.eof:
            await self.read_more()
        return predicate()

    def _split(self) -> Tuple[Optional[bytes], bytes]:
        pos = 0
        while True:
            nl = self.app.find(b"\n", pos)
            if nl < 0:
                return None, self.app
            line = self.app[pos : nl + 1]
            pos = nl + 1
            if final_line(line):
                return self.app[:pos], self.app[pos:]

    def has_reply(self) -> bool:
        return self._split()[0] is not None

    async def reply(self) -> bytes:
        await self.until(self.has_reply)
        reply, self.app = self._split()
        assert reply is not None, f"connection ended without a reply: {self.events}"
        return reply

    async def command(self, line: bytes) -> bytes:
        self.send(line)
        return await self.reply()

    def saw(self, kind: type) -> bool:
        return any(isinstance(e, kind) for e in self.events)

    def index(self, kind: type) -> int:
        return next(i for i, e in enumerate(self.events) if isinstance(e, kind))

    @property
    def violations(self) -> List[Violation]:
        return [e for e in self.events if isinstance(e, Violation)]

    # STARTTLS / STOPTLS
    async def starttls(self, pki: Pki, version: str) -> None:
        self.engine.hold_after(final_line, once=True)
        assert (await self.command(b"STARTTLS\r\n")).startswith(b"220 ")
        self.events += self.engine.start_tls(
            pki.client_context(version), server_side=False, server_hostname="localhost"
        )
        self.flush()
        assert await self.until(lambda: self.saw(HandshakeComplete)), self.events

    async def unwrap(self) -> None:
        self.events += self.engine.unwrap()
        self.flush()
        await self.until(lambda: self.saw(ClosureComplete))


async def start(
    pki: Pki, version: str, behaviour: str = "strict", limits: Optional[Limits] = None
) -> RunningServer:
    config = ServerConfig(
        pki=pki, tls_version=version, behaviour=behaviour, user=USER, password=PASSWORD
    )
    if limits is not None:
        config.limits = limits
    return await start_server(config)


async def greeted(server: RunningServer, policy: Optional[Policy] = None) -> WirePeer:
    peer = await WirePeer.connect(server, policy)
    assert (await peer.reply()).startswith(b"220 ")
    return peer


async def in_tls(server: RunningServer, pki: Pki, version: str) -> WirePeer:
    """A peer that said EHLO, upgraded, and said EHLO again."""
    peer = await greeted(server)
    assert (await peer.command(b"EHLO peer.invalid\r\n")).startswith(b"250-")
    await peer.starttls(pki, version)
    assert (await peer.command(b"EHLO peer.invalid\r\n")).startswith(b"250-")
    return peer


async def stop(server: RunningServer, *peers: WirePeer) -> None:
    """Close the peers and the server; let every connection's handler finish."""
    for peer in peers:
        peer.close()
    await server.close()
    for record in server.connections:
        await ended(record)
    await asyncio.sleep(0)  # one turn: cancelled handler tasks unwind


async def ended(record: SMTPConnection) -> SMTPConnection:
    await asyncio.wait_for(record.closed.wait(), STEP)
    return record


def keywords(reply: bytes) -> List[str]:
    return [line[4:].strip().split(b" ")[0].decode() for line in reply.splitlines()[1:]]


def rules(violations: List[Violation]) -> List[Tuple[Rule, bool]]:
    return [(v.rule, v.enforced) for v in violations]


def forged_alert(peer: WirePeer) -> bytes:
    """A genuine fatal alert from the peer's OpenSSL (bad_record_mac).

    A garbage application-data record makes the peer's TLS stack fail and
    queue an encrypted alert; the peer's engine is broken afterwards, so
    the test reads the answer as raw bytes.
    """
    peer.engine.receive_data(b"\x17\x03\x03\x00\x30" + os.urandom(0x30))
    alert = peer.engine.data_to_send()
    assert alert[:1] in (b"\x15", b"\x17"), alert
    return alert


# --------------------------------------------------------- the positive path


def test_behaviour_catalogue() -> None:
    assert BEHAVIOURS["strict"].rule is None
    broken = {b.rule for b in BEHAVIOURS.values() if b.rule is not None}
    assert broken == {Rule(f"R{i}") for i in range(1, 9)}
    with pytest.raises(ValueError, match="choose one of"):
        behaviour_named(BEHAVIOURS, "nope")


def test_three_cycles_with_mail_in_every_phase(pki: Pki, tls_version: str, run: Run) -> None:
    """Plaintext, TLS, plaintext, TLS... on one connection, state reset each time."""

    async def body() -> None:
        server = await start(pki, tls_version)
        client = SMTPClient(
            server.host,
            server.port,
            tls_context=pki.client_context(tls_version),
            server_hostname="localhost",
        )
        await client.connect()
        await client.ehlo()
        for cycle in range(1, 4):
            await client.sendmail(FROM, TO, f"Subject: plain {cycle}\r\n\r\nx\r\n")
            await client.starttls(ehlo=False)
            # R8: a new EHLO is required after STARTTLS.
            assert (await client.execute_command(b"MAIL", b"FROM:<a@example.org>")).code == 503
            await client.ehlo()
            assert "stoptls" in client.extensions and "starttls" not in client.extensions
            # AUTH state was reset: logging in again succeeds (no 503).
            assert (await client.login(USER, PASSWORD)).code == 235
            await client.sendmail(FROM, TO, f"Subject: tls {cycle}\r\n\r\nx\r\n")
            greeting = await client.stoptls(ehlo=False)
            assert greeting.code == 220 and not client.tls_active
            assert (await client.execute_command(b"MAIL", b"FROM:<a@example.org>")).code == 503
            await client.ehlo()
            assert "starttls" in client.extensions and "auth" not in client.extensions
        await client.sendmail(FROM, TO, b"Subject: plain 4\r\n\r\nx\r\n")
        assert (await client.quit()).code == 221
        record = await ended(server.connections[0])
        assert record.error is None and not record.violations and not client.violations
        assert record.tls_cycles == 3
        phases = [(m.tls, m.cycle, m.auth_user) for m in server.messages]
        assert phases == [
            (False, 0, None),
            (True, 1, USER),
            (False, 1, None),
            (True, 2, USER),
            (False, 2, None),
            (True, 3, USER),
            (False, 3, None),
        ]
        version = {"1.2": "TLSv1.2", "1.3": "TLSv1.3"}[tls_version]
        assert {m.tls_version for m in server.messages if m.tls} == {version}
        assert server.messages[1].content == b"Subject: tls 1\r\n\r\nx\r\n"
        await stop(server)

    run(body)


def test_keywords_and_auth_by_phase(pki: Pki, tls_version: str, run: Run) -> None:
    async def body() -> None:
        server = await start(pki, tls_version)
        peer = await greeted(server)
        plain = await peer.command(b"EHLO peer.invalid\r\n")
        assert "STARTTLS" in keywords(plain)
        assert not {"STOPTLS", "AUTH"} & set(keywords(plain))
        assert (await peer.command(b"AUTH PLAIN AHRlc3RlcgB4\r\n")).startswith(b"538 ")
        assert (await peer.command(b"STOPTLS\r\n")).startswith(b"503 ")
        # The command table is found once per class (ReferenceSMTP.__dir__):
        # every command is still there, ours included.
        help_reply = await peer.command(b"HELP\r\n")
        assert help_reply.startswith(b"250 Supported commands: ")
        assert help_reply[24:].decode().split() == HELP_COMMANDS
        await peer.starttls(pki, tls_version)
        tls = await peer.command(b"EHLO peer.invalid\r\n")
        assert {"STOPTLS", "AUTH"} <= set(keywords(tls)) and "STARTTLS" not in keywords(tls)
        assert b"250-AUTH PLAIN\r\n" in tls
        assert (await peer.command(b"STARTTLS\r\n")).startswith(b"503 ")
        assert (await peer.command(b"AUTH PLAIN AHRlc3RlcgB3cm9uZw==\r\n")).startswith(b"535 ")
        assert (await peer.command(b"AUTH PLAIN AHRlc3RlcgBjb3JyZWN0IGhvcnNl\r\n")).startswith(
            b"235 "
        )
        assert (await peer.command(b"AUTH PLAIN AHRlc3RlcgBjb3JyZWN0IGhvcnNl\r\n")).startswith(
            b"503 "
        )
        peer.close()
        await stop(server, peer)

    run(body)


def test_stoptls_gets_no_pipelining(pki: Pki, tls_version: str, run: Run) -> None:
    """Commands pipelined after STOPTLS are refused, never run in plaintext."""

    async def body() -> None:
        server = await start(pki, tls_version)
        peer = await in_tls(server, pki, tls_version)
        peer.send(b"STOPTLS\r\nMAIL FROM:<a@example.org>\r\n")
        assert (await peer.reply()).startswith(b"554 ")
        await peer.until(lambda: False)
        assert not peer.has_reply() and not server.messages
        await stop(server, peer)

    run(body)


def test_connection_limit(pki: Pki, tls_version: str, run: Run) -> None:
    async def body() -> None:
        server = await start(pki, tls_version, limits=Limits(max_connections=2))
        first, second = await greeted(server), await greeted(server)
        extra = await WirePeer.connect(server)
        assert (await extra.reply()).startswith(b"421 ")
        assert not await extra.until(lambda: False) and extra.eof
        first.close()
        await ended(server.connections[0])
        again = await greeted(server)  # a slot is free again
        await stop(server, first, second, extra, again)

    run(body)


def test_line_and_message_limits(pki: Pki, tls_version: str, run: Run) -> None:
    async def body() -> None:
        limits = Limits(max_line=1024, max_message=2000)
        server = await start(pki, tls_version, limits=limits)
        peer = await greeted(server)
        assert (await peer.command(b"EHLO peer.invalid\r\n")).startswith(b"250-")
        assert (await peer.command(b"NOOP " + b"x" * 600 + b"\r\n")).startswith(b"500 ")
        assert (await peer.command(b"NOOP " + b"x" * 5000 + b"\r\n")).startswith(b"500 ")
        assert (await peer.command(b"MAIL FROM:<a@example.org>\r\n")).startswith(b"250 ")
        assert (await peer.command(b"RCPT TO:<b@example.org>\r\n")).startswith(b"250 ")
        assert (await peer.command(b"DATA\r\n")).startswith(b"354 ")
        too_much = b"y" * 500 + b"\r\n" * 8 + b"z\r\n" * 800 + b".\r\n"
        assert (await peer.command(too_much)).startswith(b"552 ")
        assert (await peer.command(b"NOOP\r\n")).startswith(b"250 ")  # still in step
        assert not server.messages
        peer.close()
        await stop(server, peer)

    run(body)


def test_data_lexer_and_its_documented_limit(pki: Pki, tls_version: str, run: Run) -> None:
    """STARTTLS inside a DATA body is mail; after a rejected DATA it is refused."""

    async def body() -> None:
        server = await start(pki, tls_version)
        peer = await greeted(server)
        assert (await peer.command(b"EHLO peer.invalid\r\n")).startswith(b"250-")
        peer.send(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            b"STARTTLS\r\nbody\r\n.\r\n"
        )
        for code in (b"250", b"250", b"354", b"250"):
            assert (await peer.reply()).startswith(code)
        assert server.messages[0].content == b"STARTTLS\r\nbody\r\n"
        # DATA without recipients is rejected, but the lexer takes the
        # pipelined STARTTLS for body text: it is refused, not half-done.
        peer.send(b"DATA\r\nSTARTTLS\r\n")
        assert (await peer.reply()).startswith(b"503 ")
        assert (await peer.reply()).startswith(b"454 ")
        await peer.starttls(pki, tls_version)  # sent again: works
        assert (await peer.command(b"EHLO peer.invalid\r\n")).startswith(b"250-")
        assert not peer.violations and not server.connections[0].violations
        peer.close()
        await stop(server, peer)

    run(body)


# ------------------------------------------- each behaviour breaks its rule


INJECTION = (
    b"EHLO evil.invalid\r\nMAIL FROM:<attacker@evil.invalid>\r\n"
    b"RCPT TO:<victim@example.org>\r\nDATA\r\nSubject: injected\r\n\r\nowned\r\n.\r\n"
)


@pytest.mark.parametrize("behaviour", ["strict", "keep-buffer"])
def test_r1_pipelined_after_starttls(pki: Pki, tls_version: str, run: Run, behaviour: str) -> None:
    async def body() -> None:
        server = await start(pki, tls_version, behaviour)
        peer = await greeted(server)
        assert (await peer.command(b"EHLO peer.invalid\r\n")).startswith(b"250-")
        peer.engine.hold_after(final_line, once=True)
        peer.send(b"STARTTLS\r\n" + INJECTION)  # one segment: CVE-2011-0411
        assert (await peer.reply()).startswith(b"220 ")
        record = server.connections[0]
        if behaviour == "strict":
            await ended(record)
            assert rules(record.violations) == [(Rule.R1, True)]
            assert record.violations[0].data == INJECTION  # caught by the hold gate
            assert not server.messages
            await peer.until(lambda: False)
            assert peer.eof and not peer.app  # nothing was answered
        else:
            peer.events += peer.engine.start_tls(
                pki.client_context(tls_version), server_side=False, server_hostname="localhost"
            )
            peer.flush()
            # Five replies arrive under TLS although the peer sent nothing.
            replies = [await peer.reply() for _ in range(5)]
            assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250"]
            assert rules(record.violations) == [(Rule.R1, False)]
            message = server.messages[0]
            assert message.tls and message.mail_from == "attacker@evil.invalid"
            peer.close()
        await stop(server, peer)

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "plaintext-in-tls"])
def test_r2_plaintext_inside_tls(pki: Pki, tls_version: str, run: Run, behaviour: str) -> None:
    async def body() -> None:
        server = await start(pki, tls_version, behaviour)
        peer = await in_tls(server, pki, tls_version)
        peer.send_raw(b"NOOP plaintext\r\n")
        record = server.connections[0]
        if behaviour == "strict":
            await ended(record)
            assert rules(record.violations) == [(Rule.R2, True)]
            await peer.until(lambda: False)
            assert not peer.app
        else:
            # Answered, under TLS, as if it had come through TLS.
            assert (await peer.reply()) == b"250 OK\r\n"
            assert rules(record.violations) == [(Rule.R2, False)]  # let in, not refused
            assert server.connections[0].received_in("tls").endswith(b"NOOP plaintext\r\n")
            peer.close()
        await stop(server, peer)

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "early-plaintext"])
def test_r3_plaintext_only_after_both_close_notify(
    pki: Pki, tls_version: str, run: Run, behaviour: str
) -> None:
    async def body() -> None:
        server = await start(pki, tls_version, behaviour)
        peer = await in_tls(server, pki, tls_version)
        assert (await peer.command(b"STOPTLS\r\n")) == b"220 2.0.0 Ready to end TLS\r\n"
        if behaviour == "strict":
            assert not peer.saw(CloseNotifyReceived)  # the server waits for us
            await peer.unwrap()
            assert peer.index(CloseNotifySent) < peer.index(CloseNotifyReceived)
            assert (await peer.reply()).startswith(b"220 localhost")
            assert not peer.violations
            assert (await peer.command(b"EHLO peer.invalid\r\n")).startswith(b"250-")
            peer.close()
        else:
            await peer.until(lambda: peer.engine.state is State.BROKEN)
            # close_notify, then plaintext, before we sent our close_notify.
            assert peer.saw(CloseNotifyReceived) and not peer.saw(CloseNotifySent)
            assert rules(peer.violations) == [(Rule.R4, True)]
            assert peer.violations[0].data.startswith(b"220 localhost")
        await stop(server, peer)

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "one-sided-resume"])
def test_r4_plaintext_right_after_client_close_notify(
    pki: Pki, tls_version: str, run: Run, behaviour: str
) -> None:
    async def body() -> None:
        server = await start(pki, tls_version, behaviour)
        peer = await in_tls(server, pki, tls_version)
        assert (await peer.command(b"STOPTLS\r\n")).startswith(b"220 ")
        # Our close_notify and a plaintext command in one segment.
        peer.events += peer.engine.unwrap()
        peer.engine.send_raw(b"EHLO early.invalid\r\n")
        peer.flush()
        record = server.connections[0]
        if behaviour == "strict":
            await ended(record)
            assert rules(record.violations) == [(Rule.R4, True)]
            assert record.violations[0].data == b"EHLO early.invalid\r\n"
            await peer.until(lambda: False)
            assert not peer.app and not peer.saw(CloseNotifyReceived)
        else:
            assert (await peer.reply()).startswith(b"220 localhost")
            assert (await peer.reply()).startswith(b"250-localhost")  # the early EHLO answered
            assert rules(record.violations) == [(Rule.R4, False)]
            assert record.received_in("plaintext").endswith(b"EHLO early.invalid\r\n")
            peer.close()
        await stop(server, peer)

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "no-close-notify-reply"])
def test_r5_close_notify_answered(pki: Pki, tls_version: str, run: Run, behaviour: str) -> None:
    async def body() -> None:
        server = await start(pki, tls_version, behaviour)
        peer = await in_tls(server, pki, tls_version)
        assert (await peer.command(b"STOPTLS\r\n")).startswith(b"220 ")
        await peer.unwrap()
        if behaviour == "strict":
            assert peer.saw(ClosureComplete) and not peer.violations
            assert (await peer.reply()).startswith(b"220 ")
            peer.close()
        else:
            assert not peer.saw(CloseNotifyReceived) and peer.eof
            assert rules(peer.violations) == [(Rule.R5, True)]
            assert "without answering" in peer.violations[0].message
        await stop(server, peer)

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "no-close-notify-reply"])
def test_r5_close_notify_without_stoptls(
    pki: Pki, tls_version: str, run: Run, behaviour: str
) -> None:
    """A bare close_notify: answered, then TCP closed (SMTP has no return)."""

    async def body() -> None:
        server = await start(pki, tls_version, behaviour)
        peer = await in_tls(server, pki, tls_version)
        peer.events += peer.engine.send_close_notify()
        peer.flush()
        await peer.until(lambda: False)
        if behaviour == "strict":
            assert peer.saw(ClosureComplete) and not peer.violations and not peer.app
        else:
            assert not peer.saw(CloseNotifyReceived)
            assert rules(peer.violations) == [(Rule.R5, True)]
        await stop(server, peer)

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "ignore-truncation"])
def test_r6_truncated_data_body(pki: Pki, tls_version: str, run: Run, behaviour: str) -> None:
    async def body() -> None:
        server = await start(pki, tls_version, behaviour)
        peer = await in_tls(server, pki, tls_version)
        for line in (b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.org>\r\n"):
            assert (await peer.command(line)).startswith(b"250 ")
        assert (await peer.command(b"DATA\r\n")).startswith(b"354 ")
        peer.send(b"Subject: cut\r\n\r\nfirst line\r\npartial")
        peer.fin()  # TCP FIN, no close_notify, no final dot
        record = await ended(server.connections[0])
        if behaviour == "strict":
            assert rules(record.violations) == [(Rule.R6, True)]
            assert not server.messages
        else:
            assert rules(record.violations) == []
            message = server.messages[0]
            assert message.tls
            assert message.content == b"Subject: cut\r\n\r\nfirst line\r\npartial\r\n"
        await stop(server, peer)

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "alert-as-close"])
def test_r7_fatal_alert_is_not_closure(
    pki: Pki, tls_version: str, run: Run, behaviour: str
) -> None:
    async def body() -> None:
        server = await start(pki, tls_version, behaviour)
        peer = await in_tls(server, pki, tls_version)
        alert = forged_alert(peer)
        mark = len(peer.engine.transcript)
        peer.send_raw(alert + b"EHLO after-alert.invalid\r\n")
        record = server.connections[0]

        def wire() -> bytes:  # what arrived after the alert, as raw bytes
            return b"".join(s.data for s in peer.engine.transcript[mark:] if s.direction == "in")

        def answered() -> bool:
            return b"250-" in wire()

        if behaviour == "strict":
            await ended(record)
            assert isinstance(record.violations[0], Violation)
            assert any(isinstance(e, AlertReceived) for e in record.transport.events)
            assert not await peer.until(answered)
        else:
            # Plaintext greeting and EHLO answer, right after a fatal alert.
            assert await peer.until(answered)
            assert wire().startswith(b"220 localhost") and b"250-localhost" in wire()
            assert rules(record.violations) == [(Rule.R7, False)]
            peer.close()
        await stop(server, peer)

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "no-state-reset"])
def test_r8_state_reset(pki: Pki, tls_version: str, run: Run, behaviour: str) -> None:
    async def body() -> None:
        server = await start(pki, tls_version, behaviour)
        peer = await greeted(server)
        assert (await peer.command(b"EHLO peer.invalid\r\n")).startswith(b"250-")
        await peer.starttls(pki, tls_version)
        # No EHLO under TLS yet: plaintext knowledge must not count.
        mail = await peer.command(b"MAIL FROM:<a@example.org>\r\n")
        if behaviour == "strict":
            assert mail.startswith(b"503 ")
            assert (await peer.command(b"EHLO peer.invalid\r\n")).startswith(b"250-")
            assert (await peer.command(b"MAIL FROM:<a@example.org>\r\n")).startswith(b"250 ")
        else:
            assert mail.startswith(b"250 ")
        auth = b"AUTH PLAIN AHRlc3RlcgBjb3JyZWN0IGhvcnNl\r\n"
        assert (await peer.command(b"RCPT TO:<b@example.org>\r\n")).startswith(b"250 ")
        assert (await peer.command(b"RSET\r\n")).startswith(b"250 ")
        assert (await peer.command(auth)).startswith(b"235 ")
        assert (await peer.command(b"STOPTLS\r\n")).startswith(b"220 ")
        await peer.unwrap()
        assert (await peer.reply()).startswith(b"220 ")
        mail = await peer.command(b"MAIL FROM:<a@example.org>\r\n")
        if behaviour == "strict":
            assert mail.startswith(b"503 ")
        else:
            # EHLO and AUTH from the TLS session survive into plaintext.
            assert mail.startswith(b"250 ")
            for line in (b"RCPT TO:<b@example.org>\r\n", b"DATA\r\n"):
                assert (await peer.command(line))[:1] in (b"2", b"3")
            assert (await peer.command(b"x\r\n.\r\n")).startswith(b"250 ")
            message = server.messages[0]
            assert not message.tls and message.auth_user == USER
        peer.close()
        await stop(server, peer)

    run(body)


@pytest.mark.parametrize(
    ("behaviour", "scenario", "verdict"),
    [
        ("resume-without-stoptls", "server.plaintext-after-close", "fail"),
        ("one-sided-bare-resume", "server.one-sided-close", "fail"),
        ("accept-stoptls-in-plaintext", "server.stoptls-outside-tls", "warn"),
        ("accept-starttls-in-tls", "server.starttls-in-tls", "warn"),
        ("plaintext-goodbye", "server.plaintext-after-close", "fail"),
        ("plaintext-goodbye", "server.data-after-close-notify", "fail"),
        ("strict", "server.data-after-close-notify", "pass"),
        ("strict", "server.plaintext-after-close", "pass"),
        ("strict", "server.one-sided-close", "pass"),
        ("strict", "server.stoptls-outside-tls", "pass"),
        ("strict", "server.starttls-in-tls", "pass"),
    ],
)
def test_bare_closure_and_misplaced_commands(
    behaviour: str, scenario: str, verdict: str, tls_version: str, run: Any
) -> None:
    """The misbehaviours added so every server scenario fails against some peer."""

    async def body() -> List[Result]:
        async with reference_servers(("smtp",), behaviour=behaviour) as (target,):
            return await run_server_target(
                [by_id(scenario)],
                target,
                RunSettings(reply_timeout=2.0),
                tls_versions=(tls_version,),
            )

    (r,) = run(body, 30.0)
    assert r.verdict.value == verdict, r.summary
