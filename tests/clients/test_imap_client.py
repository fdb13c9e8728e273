"""The reference IMAP client over real loopback sockets (asyncio and uvloop).

Against the reference server: three STARTTLS/STOPTLS cycles with the state
reset visible after each transition.  Against :class:`FakeImap`, a scripted
server built on :class:`test_imap_server.RawPeer` (streams + engine), every
client behaviour is shown breaking its rule on the wire, next to the strict
client that does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from typing import AsyncIterator, List, Optional, Tuple

import pytest
import starttls_harness.clients.imap
from starttls_harness.clients.imap import (
    BEHAVIOURS,
    CommandError,
    ImapClient,
    LoginDisabled,
    StartTLSError,
    StopTLSNotSupported,
    TLSRequired,
)
from starttls_harness.tls.aio import ConnectionEnded
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import ClosureComplete, Policy, Rule
from starttls_harness.tls.states import State
from test_imap_server import WAIT, RawPeer, Runner, serving

USER, PASSWORD = "tester", "correct horse"


async def connect(address: Tuple[str, int], pki: Pki, tls_version: str, **kw: object) -> ImapClient:
    return await ImapClient.connect(
        address[0],
        address[1],
        ssl_context=pki.client_context(tls_version),
        server_hostname="localhost",
        timeout=WAIT,
        **kw,  # type: ignore[arg-type]
    )


# ----------------------------------------------------- against the reference


def test_three_cycles_with_state_reset(pki: Pki, tls_version: str, run: Runner) -> None:
    """client.stoptls-cycle / state-reset against the reference server.

    "Every phase where that's allowed": APPEND and FETCH need a LOGIN, which
    the server refuses in plaintext (LOGINDISABLED) and the client never
    sends there (R9), so each plaintext phase shows the reset instead --
    capabilities re-read (STARTTLS, no STOPTLS) and SELECT refused as not
    authenticated -- and each TLS phase appends one message and fetches all.
    """

    async def body() -> None:
        async with serving(pki, tls_version) as server:
            client = await connect(server.address, pki, tls_version)
            sent: List[bytes] = []
            for cycle in (1, 2, 3):
                # Plaintext phase.
                assert not client.transport.tls_active and not client.authenticated
                assert client.capabilities is not None
                assert {"STARTTLS", "LOGINDISABLED"} <= client.capabilities
                assert "STOPTLS" not in client.capabilities
                refused = await client.command("SELECT", "INBOX", check=False)
                assert refused.status == "BAD" and "authenticated" in refused.text.lower()
                with pytest.raises(TLSRequired):
                    await client.login(USER, PASSWORD)  # never sent in plaintext
                # TLS phase.
                assert await client.starttls() is True
                assert client.transport.tls_version == f"TLSv{tls_version}"
                assert client.capabilities is not None
                assert "STOPTLS" in client.capabilities
                assert not {"STARTTLS", "LOGINDISABLED"} & client.capabilities
                assert not client.authenticated
                refused = await client.command("SELECT", "INBOX", check=False)
                assert refused.status == "BAD"  # reset: the earlier login is gone
                await client.login(USER, PASSWORD)
                mailbox = await client.select()
                assert mailbox.exists == cycle - 1 and not mailbox.read_only
                message = b"Subject: cycle %d\r\n\r\nsent in TLS phase %d\r\n" % (cycle, cycle)
                sent.append(message)
                await client.append(message, flags=["\\Flagged"])
                fetched = await client.fetch("1:*", "(FLAGS RFC822)")
                assert [f.body for f in fetched] == sent
                assert "\\Flagged" in fetched[-1].flags and "\\Seen" in fetched[-1].flags
                await client.stoptls()
                assert client.greeting is not None
                assert client.greeting.raw.startswith(b"* OK [CAPABILITY")
            assert [(m.data, m.tls, m.cycle) for m in server.messages] == [
                (m, True, c) for c, m in enumerate(sent, 1)
            ]
            response = await client.logout()
            assert response.ok and response.untagged[0].keyword == "BYE"
            assert not client.transport.violations
            conn = server.connections[0]
            assert not conn.transport.violations

    run(body)


@pytest.mark.parametrize(
    ("behaviour", "rule"), [("early-plaintext", "R4"), ("no-close-notify-reply", "R5")]
)
def test_strict_client_refuses_broken_closures(
    pki: Pki, tls_version: str, run: Runner, behaviour: str, rule: str
) -> None:
    """The strict client against misbehaving reference servers: STOPTLS fails
    with the rule the server broke, and nothing is read as plaintext."""

    async def body() -> None:
        async with serving(pki, tls_version, behaviour) as server:
            client = await connect(server.address, pki, tls_version)
            await client.starttls()
            with pytest.raises(ConnectionEnded) as ended:
                await client.stoptls()
            assert ended.value.rule == rule
            assert client.greeting is not None and b"resumed" not in client.greeting.raw

    run(body)


def test_failed_handshake_is_fatal(pki: Pki, tls_version: str, run: Runner) -> None:
    """R9: a STARTTLS that cannot be completed never falls back to plaintext."""

    async def body() -> None:
        async with serving(pki, tls_version) as server:
            client = await connect(server.address, pki, tls_version)
            untrusted = ssl.create_default_context()  # does not know the test CA
            with pytest.raises(TLSRequired) as failed:
                await client.starttls(untrusted)
            assert isinstance(failed.value.__cause__, ConnectionError)
            assert client.transport.is_closing()
            with pytest.raises(TLSRequired):
                await client.login(USER, PASSWORD)

    run(body)


def test_errors_and_guards(pki: Pki, tls_version: str, run: Runner) -> None:
    async def body() -> None:
        async with serving(pki, tls_version) as server:
            client = await connect(server.address, pki, tls_version, require_tls=False)
            with pytest.raises(LoginDisabled):
                await client.login(USER, PASSWORD)
            with pytest.raises(starttls_harness.clients.imap.ImapError):
                await client.stoptls()  # not under TLS
            with pytest.raises(ValueError):
                await client.command("STARTTLS")
            await client.starttls()
            with pytest.raises(CommandError) as failed:
                await client.login(USER, "wrong")
            assert failed.value.response.status == "NO"
            with pytest.raises(CommandError):
                await client.select("Elsewhere")
            await client.login(USER, PASSWORD)
            assert (await client.select(readonly=True)).read_only
            with pytest.raises(CommandError):
                await client.fetch("1:*", "(FLAGS)")  # the mailbox is empty
            await client.aclose()

    run(body)


# -------------------------------------------------------- the scripted server


@dataclass
class FakeImap:
    """A one-connection scripted IMAP server; records what the client sends."""

    pki: Pki
    tls_version: str
    plain_caps: bytes = b"IMAP4rev1 STARTTLS LOGINDISABLED"
    tls_caps: bytes = b"IMAP4rev1 STOPTLS"
    starttls_reply: bytes = b"OK Begin TLS negotiation now"
    #: Sent after the STARTTLS answer, in the same segment (R1 injection)...
    inject: bytes = b""
    #: ... or in a segment of its own, before the handshake.
    inject_split: bool = False
    #: Answer CAPABILITY under TLS with plaintext bytes (R2 injection).
    plaintext_in_tls: bool = False
    #: Answer NOOP under TLS with a close_notify of our own (R5 probe).
    close_on_noop: bool = False
    policy: Optional[Policy] = None
    commands: List[Tuple[str, bytes]] = field(default_factory=list)
    peer: Optional[RawPeer] = None
    done: Optional[asyncio.Future[None]] = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Tuple[str, int]]:
        self.done = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield server.sockets[0].getsockname()[:2]
        finally:
            server.close()
            if self.peer is not None:
                await self.peer.close()
            await server.wait_closed()

    async def finished(self) -> RawPeer:
        assert self.done is not None
        await asyncio.wait_for(asyncio.shield(self.done), WAIT)
        assert self.peer is not None
        return self.peer

    async def expect(self, entry: Tuple[str, bytes]) -> None:
        """Wait (bounded) until the client has sent ``entry``."""
        while entry not in self.commands:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), WAIT)

    def phase(self) -> str:
        assert self.peer is not None
        return "tls" if self.peer.engine.tls_active else "plain"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peer = RawPeer(reader, writer, self.policy)
        try:
            await self._serve(self.peer)
        except (AssertionError, ConnectionError, asyncio.TimeoutError):
            pass  # the client went away; the test judges from the record
        finally:
            writer.close()
            assert self.done is not None
            if not self.done.done():
                self.done.set_result(None)

    async def _serve(self, peer: RawPeer) -> None:
        peer.send(b"* OK [CAPABILITY " + self.plain_caps + b"] fake ready\r\n")
        while True:
            line = await peer.line()
            self.commands.append((self.phase(), line))
            self.arrived.set()
            tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
            verb = rest.split(b" ", 1)[0].upper()
            tls = peer.engine.tls_active
            if verb == b"CAPABILITY":
                caps = self.tls_caps if tls else self.plain_caps
                answer = b"* CAPABILITY " + caps + b"\r\n" + tag + b" OK done\r\n"
                if tls and self.plaintext_in_tls:
                    peer.send_raw(b"* CAPABILITY IMAP4rev1 INJECTED\r\n" + tag + b" OK done\r\n")
                else:
                    peer.send(answer)
            elif verb == b"STARTTLS" and not tls:
                peer.engine.send_data(tag + b" " + self.starttls_reply + b"\r\n")
                if self.inject_split:
                    peer.flush()
                peer.engine.send_raw(self.inject)
                if not self.starttls_reply.startswith(b"OK"):
                    peer.flush()
                    continue
                context = self.pki.server_context(self.tls_version)
                if not await peer.starttls(context, server_side=True):
                    return
            elif verb == b"STOPTLS" and tls:
                peer.send(tag + b" OK Begin TLS closure\r\n")
                peer.record(peer.engine.accept_unwrap())
                before = peer.closures()

                def settled(peer: RawPeer = peer, before: int = before) -> bool:
                    return peer.closures() > before or peer.engine.state is State.BROKEN

                await peer.until(settled, "the client's close_notify")
                if peer.engine.state is State.BROKEN:
                    return
                peer.send(b"* OK [CAPABILITY " + self.plain_caps + b"] plaintext again\r\n")
            elif verb == b"NOOP" and tls and self.close_on_noop:
                peer.record(peer.engine.send_close_notify())
                await peer.wait_eof()
                return
            elif verb == b"LOGOUT":
                peer.send(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                return
            elif verb in (b"LOGIN", b"NOOP"):
                peer.send(tag + b" OK done\r\n")
            else:
                peer.send(tag + b" BAD unknown\r\n")


# ------------------------------------------------------------ misbehaviours

INJECTED = b"* CAPABILITY IMAP4rev1 STOPTLS INJECTED\r\na2 OK CAPABILITY completed\r\n"


@pytest.mark.parametrize("segments", ["coalesced", "split"])
@pytest.mark.parametrize("behaviour", ["strict", "accept-injected-response"])
def test_r1_response_injection(
    pki: Pki, tls_version: str, run: Runner, behaviour: str, segments: str
) -> None:
    """client.response-injection: plaintext after the STARTTLS answer."""

    async def body() -> None:
        fake = FakeImap(pki, tls_version, inject=INJECTED, inject_split=segments == "split")
        async with fake.running() as address:
            client = await connect(address, pki, tls_version, behaviour=behaviour)
            if behaviour == "strict":
                with pytest.raises(StartTLSError) as refused:
                    await client.starttls()
                cause = refused.value.__cause__
                assert isinstance(cause, ConnectionEnded) and cause.rule == "R1"
                peer = await fake.finished()
                # Nothing was sent under TLS: the upgrade never happened.
                assert [phase for phase, _ in fake.commands] == ["plain"]
                assert peer.eof
            else:
                await client.starttls()
                # The injected plaintext answered the client's CAPABILITY a2 in TLS.
                assert client.capabilities is not None and "INJECTED" in client.capabilities
                await fake.expect(("tls", b"a2 CAPABILITY\r\n"))
                (violation,) = client.transport.violations
                assert violation.rule is Rule.R1 and violation.data == INJECTED
                assert not violation.enforced
            client.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "plaintext-in-tls"])
def test_r2_plaintext_in_tls(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    """client.plaintext-in-tls: the CAPABILITY answer comes in plaintext."""

    async def body() -> None:
        fake = FakeImap(pki, tls_version, plaintext_in_tls=True)
        async with fake.running() as address:
            client = await connect(address, pki, tls_version, behaviour=behaviour)
            if behaviour == "strict":
                with pytest.raises(ConnectionEnded) as ended:
                    await client.starttls()
                assert ended.value.rule == "R2"
            else:
                await client.starttls()
                assert client.capabilities == frozenset({"IMAP4REV1", "INJECTED"})
            client.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "one-sided-close"])
def test_r4_one_sided_close(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    """client.one-sided-close: does the client wait for our close_notify?"""

    async def body() -> None:
        fake = FakeImap(pki, tls_version, tls_caps=b"IMAP4rev1 STOPTLS")
        async with fake.running() as address:
            client = await connect(address, pki, tls_version, behaviour=behaviour)
            await client.starttls()
            if behaviour == "strict":
                await client.stoptls()
                assert not client.transport.tls_active
                assert fake.commands[-1] == ("plain", b"a4 CAPABILITY\r\n")
                await client.logout()
                peer = await fake.finished()
                assert not peer.violations
            else:
                with pytest.raises(ConnectionError):
                    await client.stoptls()
                peer = await fake.finished()
                # close_notify and the next command arrived together.
                (violation,) = peer.violations
                assert violation.rule is Rule.R4
                assert violation.data == b"a4 CAPABILITY\r\n"
            client.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "no-close-notify-reply"])
def test_r5_close_notify_reply(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    """client.close-notify-reply: the server closes TLS first."""

    async def body() -> None:
        fake = FakeImap(pki, tls_version, close_on_noop=True)
        async with fake.running() as address:
            client = await connect(address, pki, tls_version, behaviour=behaviour)
            await client.starttls()
            with pytest.raises(ConnectionError):
                await client.noop()
            peer = await fake.finished()
            if behaviour == "strict":
                assert any(isinstance(e, ClosureComplete) for e in peer.events)
                assert not peer.violations
            else:
                (violation,) = peer.violations
                assert violation.rule is Rule.R5  # TCP FIN, no close_notify
            client.close()

    run(body)


@pytest.mark.parametrize("behaviour", ["strict", "no-state-reset"])
def test_r8_capabilities_discarded(pki: Pki, tls_version: str, run: Runner, behaviour: str) -> None:
    """client.state-reset: STOPTLS is offered in plaintext only (injected)."""

    async def body() -> None:
        fake = FakeImap(
            pki, tls_version, plain_caps=b"IMAP4rev1 STARTTLS STOPTLS", tls_caps=b"IMAP4rev1"
        )
        async with fake.running() as address:
            client = await connect(address, pki, tls_version, behaviour=behaviour)
            await client.starttls()
            tls_commands = [line for phase, line in fake.commands if phase == "tls"]
            if behaviour == "strict":
                assert tls_commands == [b"a2 CAPABILITY\r\n"]  # re-read at once
                with pytest.raises(StopTLSNotSupported):
                    await client.stoptls()
                await client.logout()
                assert not any(b"STOPTLS" in line for _, line in fake.commands)
            else:
                assert tls_commands == []  # nothing re-read
                await client.stoptls()
                # It acted on the plaintext list inside TLS.
                assert ("tls", b"a2 STOPTLS\r\n") in fake.commands
            client.close()

    run(body)


@pytest.mark.parametrize("offer", ["not-offered", "refused"])
@pytest.mark.parametrize("behaviour", ["strict", "downgrade"])
def test_r9_no_downgrade(
    pki: Pki, tls_version: str, run: Runner, behaviour: str, offer: str
) -> None:
    """client.starttls-stripped / client.starttls-refused with require_tls."""

    async def body() -> None:
        if offer == "not-offered":
            fake = FakeImap(pki, tls_version, plain_caps=b"IMAP4rev1")
        else:
            fake = FakeImap(
                pki, tls_version, plain_caps=b"IMAP4rev1 STARTTLS", starttls_reply=b"NO not today"
            )
        async with fake.running() as address:
            client = await connect(address, pki, tls_version, behaviour=behaviour)
            if behaviour == "strict":
                with pytest.raises(TLSRequired):
                    await client.starttls()
                with pytest.raises(TLSRequired):
                    await client.login(USER, PASSWORD)
                await fake.finished()
                assert not any(b"LOGIN" in line for _, line in fake.commands)
            else:
                assert await client.starttls() is False
                await client.login(USER, PASSWORD)
                # The password crossed in clear.
                assert any(
                    phase == "plain" and line.endswith(b' LOGIN tester "correct horse"\r\n')
                    for phase, line in fake.commands
                )
            client.close()

    run(body)


COVERAGE = {
    "accept-injected-response": test_r1_response_injection,
    "plaintext-in-tls": test_r2_plaintext_in_tls,
    "one-sided-close": test_r4_one_sided_close,
    "no-close-notify-reply": test_r5_close_notify_reply,
    "no-state-reset": test_r8_capabilities_discarded,
    "downgrade": test_r9_no_downgrade,
}


def test_every_behaviour_is_documented_and_tested() -> None:
    doc = starttls_harness.clients.imap.__doc__ or ""
    for name, behaviour in BEHAVIOURS.items():
        if name == "strict":
            continue
        assert behaviour.rule is not None
        assert f"``{name}`` ({behaviour.rule.value})" in doc, name
        assert name in COVERAGE, f"no wire test for {name}"


def test_unknown_behaviour_is_refused(pki: Pki, run: Runner) -> None:
    async def body() -> None:
        with pytest.raises(ValueError, match="choose one of"):
            await ImapClient.connect("127.0.0.1", 1, behaviour="nonsense")

    run(body)
