"""The harness as a (misbehaving) client of a server under test.

A :class:`Probe` is one connection to the target.  It speaks the dialect
through the engine, records every byte each way as evidence, and turns the
target's reactions into exceptions the scenario interpreter can classify:
:class:`PeerClosed` (EOF, reset, alert, failed handshake, or a rule the
*target* broke and our strict engine caught) and :class:`ProbeTimeout`
(nothing decisive happened within the bound).  Every wait is bounded by
:attr:`ProbeSettings.reply_timeout`.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Callable, FrozenSet, Optional, Tuple

from starttls_harness.dialects import Dialect, Reply
from starttls_harness.dialects.base import LoginRefused, SessionLogin
from starttls_harness.report.verdicts import Evidence
from starttls_harness.run import pacing
from starttls_harness.run.outcomes import Observed, RemoteEnded, WaitTimeout
from starttls_harness.tls.aio import ConnectionEnded, SwitchableTransport, Timeouts, open_connection
from starttls_harness.tls.engine import (
    AlertReceived,
    CloseNotifyReceived,
    CloseNotifySent,
    Event,
    HandshakeFailed,
    PlaintextData,
    Policy,
    Rule,
    TLSData,
    Violation,
)

__all__ = ["NO_EXCHANGE", "PeerClosed", "Probe", "ProbeSettings", "ProbeTimeout"]


@dataclass(frozen=True)
class ProbeSettings:
    """Bounds of one probe connection (seconds)."""

    connect_timeout: float = 5.0
    reply_timeout: float = 5.0
    handshake_timeout: float = 5.0
    #: Largest reply the probe buffers before calling the target hostile.
    max_buffer: int = 1 << 20
    #: Most lines the probe buffers without a complete reply: a flood of
    #: short lines is cut off here instead of being re-parsed until the
    #: reply bound runs out (quadratic work; tests/test_hostile.py).
    max_lines: int = 1000


#: The reply to an exchange the dialect does not have (no greeting, no hello
#: before TLS): nothing is sent or read.
NO_EXCHANGE = Reply((), True, "")


class PeerClosed(RemoteEnded):
    """The target ended the connection; ``how`` says in which way.

    ``how`` is ``eof``, ``reset``, ``alert``, ``handshake`` or ``violation``
    (then ``rule`` names the rule the target broke, as seen by our engine),
    or ``overflow``: the *probe* hung up because the target sent more than
    the reply bound -- the target did not close anything.
    """

    def __init__(self, how: str, detail: str, rule: Optional[Rule] = None) -> None:
        super().__init__(how, detail, rule)


class ProbeTimeout(WaitTimeout):
    """Nothing decisive arrived within the bound."""


class _ProbeProtocol(asyncio.Protocol):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.probe._on_data(data)

    def eof_received(self) -> bool:
        self.probe._on_closed(None)
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.probe._on_closed(exc)

    def engine_event(self, event: Event) -> None:
        self.probe._on_event(event)


class Probe:
    """One scripted client connection to a server under test."""

    def __init__(
        self,
        dialect: Dialect,
        host: str,
        port: int,
        *,
        client_context: ssl.SSLContext,
        server_hostname: Optional[str],
        evidence: Evidence,
        settings: ProbeSettings = ProbeSettings(),
        policy: Optional[Policy] = None,
        credentials: Tuple[Optional[str], Optional[str]] = (None, None),
    ) -> None:
        self.dialect = dialect
        #: The test user and password, for a login the session start carries.
        self.credentials = credentials
        self._framer = dialect.framer()
        self.host = host
        self.port = port
        self.ctx = client_context
        self.server_hostname = server_hostname
        self.evidence = evidence
        self.settings = settings
        #: Strict by default: faults are *sent* with write_raw/inject, which
        #: bypass the rules, while everything *received* is judged strictly.
        self.policy = policy or Policy.strict()
        self.transport: Optional[SwitchableTransport] = None
        self.capabilities: FrozenSet[str] = frozenset()
        self._buf = b""
        self._changed = asyncio.Event()
        self._closed: Optional[PeerClosed] = None
        #: After our provoked alert the transport passes bytes through
        #: unread by the engine: they are recorded here, as bytes.
        self._raw = False
        #: We closed the connection ourselves (its end is not the target's).
        self._closed_by_us = False
        self._slot: Optional[pacing.Slot] = None

    # ------------------------------------------------------------ callbacks

    def _on_data(self, data: bytes) -> None:
        if self._raw:
            record = len(data) >= 3 and 0x14 <= data[0] <= 0x17 and data[1] == 3
            kind = "tls-wire" if record else "plaintext"
            self.evidence.add("s2c", kind, data, "after our alert")
        self._buf += data
        self._framer.reset()
        lines = len(self._framer.split(self._buf)[0])  # the dialect's units
        if self._closed is None and (
            len(self._buf) > self.settings.max_buffer or lines > self.settings.max_lines
        ):
            self._closed = PeerClosed(
                "overflow",
                f"target sent more than the reply bound ({len(self._buf)} bytes, "
                f"{lines} lines, no complete reply); the probe hung up",
            )
            self.evidence.add("c2s", "eof", note=self._closed.detail)
            if self.transport is not None:
                self.transport.abort()
        self._changed.set()

    def _on_event(self, event: Event) -> None:
        if isinstance(event, TLSData):
            self.evidence.add("s2c", "tls" if event.protected else "plaintext", event.data)
        elif isinstance(event, PlaintextData):
            self.evidence.add("s2c", "plaintext", event.data)
        elif isinstance(event, CloseNotifyReceived):
            self.evidence.add("s2c", "close_notify")
        elif isinstance(event, CloseNotifySent):
            if self._fin_sent():
                # Our engine answered, but our side of TCP is already shut:
                # nothing went on the wire, so nothing is listed.
                self.evidence.note("close_notify answered by our engine, not sent (after our FIN)")
            else:
                self.evidence.add("c2s", "close_notify")
        elif isinstance(event, AlertReceived):
            self.evidence.add("s2c", "alert", note=event.description)
        elif isinstance(event, Violation):
            self.evidence.add("s2c", "note", event.data, f"{event.rule.value}: {event.message}")
            if event.enforced and self._closed is None:
                # The adapter is closing the connection; decide now, not at
                # connection_lost, so no step acts on a broken engine.
                self._closed = self._classify(ConnectionEnded(event))
        self._changed.set()  # every event may be what a wait_until waits for

    def _on_closed(self, exc: Optional[BaseException]) -> None:
        if self._closed is None and self._closed_by_us:
            self._closed = PeerClosed("local", "the harness closed the connection")
            self.evidence.add("c2s", "eof", note="we closed the connection")
        pacing.release(self._slot)
        if self._closed is None:
            self._closed = self._classify(exc)
            self.evidence.add("s2c", "eof", note=self._closed.detail)
        self._changed.set()

    def _classify(self, exc: Optional[BaseException]) -> PeerClosed:
        if isinstance(exc, ConnectionEnded):
            event = exc.event
            if isinstance(event, Violation):
                if event.rule is Rule.R6:
                    return PeerClosed("eof", "target closed TCP while TLS was up", event.rule)
                if event.rule is Rule.R5:
                    return PeerClosed(
                        "eof", "target closed TCP without answering close_notify", event.rule
                    )
                return PeerClosed(
                    "violation", f"target broke {event.rule.value}: {event.message}", event.rule
                )
            if isinstance(event, AlertReceived):
                return PeerClosed("alert", f"target sent alert {event.description}")
            if isinstance(event, HandshakeFailed):
                return PeerClosed("handshake", f"TLS handshake failed: {event.reason}")
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            return PeerClosed("reset", "target reset the connection")
        if exc is not None:
            return PeerClosed("reset", f"connection lost: {exc}")
        return PeerClosed("eof", "target closed the connection")

    # ------------------------------------------------------------- actions

    async def connect(self) -> Reply:
        self._slot = await pacing.acquire(self.host, self.port)  # --max-connections, --rate
        try:
            self.transport, _ = await asyncio.wait_for(
                open_connection(
                    lambda: _ProbeProtocol(self),
                    self.host,
                    self.port,
                    policy=self.policy,
                    timeouts=Timeouts(
                        handshake=self.settings.handshake_timeout,
                        closure=self.settings.reply_timeout,
                        connect=self.settings.connect_timeout,
                    ),
                ),
                self.settings.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise PeerClosed(
                "refused", f"cannot connect to {self.host}:{self.port}: {exc}"
            ) from exc
        self.evidence.wires.append(self._t().wire)  # real bytes, for --capture
        if not self.dialect.server_greets:
            return NO_EXCHANGE  # the client speaks first (PostgreSQL, LDAP)
        return await self.reply(greeting=True)

    def write(self, data: bytes, kind: str = "") -> None:
        """Send ``data`` in the current phase (plaintext or under TLS)."""
        t = self._t()
        self.ensure_open()
        self.evidence.add("c2s", kind or ("tls" if t.tls_active else "plaintext"), data)
        t.write(data)

    def inject(self, data: bytes) -> None:
        """Bytes onto the wire around every rule (marked in the evidence)."""
        self.ensure_open()
        self.evidence.add("c2s", "injected", data)
        self._t().write_raw(data)

    async def reply(self, *, greeting: bool = False, tag: Optional[str] = None) -> Reply:
        """The next complete reply; raises PeerClosed or ProbeTimeout."""
        deadline = asyncio.get_running_loop().time() + self.settings.reply_timeout
        while True:
            expect = None if greeting else tag
            if not greeting and tag is None:
                expect = self.dialect.any_reply_tag  # e.g. IMAP: any tagged line
            reply, rest = self.dialect.split_reply(self._buf, expect)
            if reply is not None:
                self._buf = rest
                return reply
            if self._closed is not None:
                raise self._closed
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise ProbeTimeout(f"no complete reply within {self.settings.reply_timeout:g} s")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                continue

    async def command(self, data: bytes) -> Reply:
        if not data:
            return NO_EXCHANGE  # the dialect has no such command in this phase
        self.write(data)
        return await self.reply(tag=self.dialect.tag_of(data))

    def stoptls_refused(self, reply: Reply, optional: bool) -> None:
        """Judge a refused return to plaintext; return only where the scenario goes on.

        A dialect that tries it unlisted (FTP's CCC) names the refusals that
        mean "not offered": a ``skip``, or, for an optional step, the steps
        that need it are dropped.  Otherwise the refusal is an ``error``.
        """
        unoffered = self.dialect.stoptls_unoffered(reply)
        if unoffered is None:
            raise Observed("stoptls-refused", reply.text)
        if not optional:
            raise Observed("no-stoptls", unoffered)
        self.capabilities = self.capabilities - {"STOPTLS"}
        self.evidence.note(f"no return to plaintext: {unoffered}")

    async def hello(self) -> Reply:
        tls = self.transport is not None and self.transport.tls_active
        reply = await self.command(self.dialect.hello_for(tls))
        self.capabilities = self.dialect.capabilities(reply)
        return reply

    async def handshake(self) -> None:
        t = self._t()
        self.ensure_open()
        try:
            await t.start_tls(
                self.ctx,
                server_side=False,
                server_hostname=self.server_hostname,
                timeout=self.settings.handshake_timeout,
            )
        except asyncio.TimeoutError as exc:
            raise ProbeTimeout(str(exc)) from exc
        except (ConnectionError, OSError) as exc:
            raise self._closed or self._classify(exc) from exc
        self.evidence.note(f"TLS up: {t.tls_version}")
        login = self.dialect.session_login(*self.credentials)
        opening = login.opening() if login is not None else self.dialect.after_handshake()
        if opening:
            reply = await self.command(opening)
            if login is not None:
                reply = await self._log_in(login, reply)
            if not reply.ok and self.dialect.is_goodbye(reply):
                # e.g. PostgreSQL >= 14.1 on bytes injected before the handshake.
                self.evidence.note("the target ended the session at its start (a goodbye)")
                raise await self.wait_closed()
            if not reply.ok:
                raise Observed("unexpected-reply", f"the session start was refused: {reply.text}")

    async def _log_in(self, login: SessionLogin, reply: Reply) -> Reply:
        """Answer the session start's password requests (SCRAM takes two)."""
        for _ in range(4):
            try:
                step = login.answer(reply)
            except LoginRefused as exc:
                raise Observed("unexpected-reply", f"login refused: {exc}") from None
            if not step:
                return reply
            reply = await self.command(step)
        raise Observed("unexpected-reply", "login refused: the server kept asking")

    async def unwrap(self) -> None:
        self.ensure_open()
        try:
            await self._t().unwrap(timeout=self.settings.reply_timeout)
        except asyncio.TimeoutError as exc:
            raise ProbeTimeout("the target did not answer close_notify in time") from exc
        except (ConnectionError, OSError) as exc:
            raise self._closed or self._classify(exc) from exc
        self.evidence.note("TLS closed both ways; plaintext resumes")

    async def wait_closed(self) -> PeerClosed:
        """Wait (bounded) for the target to end the connection."""
        deadline = asyncio.get_running_loop().time() + self.settings.reply_timeout
        while self._closed is None:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise ProbeTimeout("the target kept the connection open")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                continue
        return self._closed

    async def wait_until(self, seen: Callable[[], bool]) -> bool:
        """Wait (bounded) until ``seen()`` holds or the connection ends.

        False when the bound ran out first: the target stayed open and said
        nothing decisive.  Unlike :meth:`wait_closed` this never raises, so
        a scenario can go on and probe a silent target.
        """
        deadline = asyncio.get_running_loop().time() + self.settings.reply_timeout
        while not seen() and self._closed is None:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                continue
        return True

    @property
    def closed(self) -> Optional[PeerClosed]:
        return self._closed

    @property
    def pending(self) -> bytes:
        return self._buf

    def close(self) -> None:
        pacing.release(self._slot)
        if self.transport is not None:
            self._closed_by_us = True
            self.transport.abort()

    def read_raw(self) -> None:
        """From now on the engine reads nothing (after our alert): record bytes as bytes."""
        self._raw = True

    def _fin_sent(self) -> bool:
        return any(e.direction == "c2s" and e.kind == "eof" for e in self.evidence.exchanges)

    def ensure_open(self) -> None:
        """Acting on a connection the target already ended is not allowed."""
        if self._closed is not None:
            raise self._closed

    def _t(self) -> SwitchableTransport:
        if self.transport is None:
            raise RuntimeError("probe is not connected")
        return self.transport
