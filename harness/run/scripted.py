"""The scripted server's one connection: the client's acts, in wire order.

Everything the client does becomes an :class:`Act` in an inbox: a complete
command (cut by the dialect's framer, literals inline, a message body as one
unit -- the dialect's scripted server says where those are), its
close_notify, the handshake completing, or the connection ending (how and
why).  The steps in :mod:`starttls_harness.run.client` read the inbox with
a bound and write through :meth:`ScriptedConnection.send` (in the current
phase) or :meth:`ScriptedConnection.inject` (around every rule).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from dataclasses import dataclass
from typing import Deque, List, Optional

from starttls_harness.dialects import Dialect
from starttls_harness.dialects.roles import Command
from starttls_harness.report.verdicts import Evidence
from starttls_harness.run.outcomes import RemoteEnded, WaitTimeout
from starttls_harness.tls.aio import ConnectionEnded, SwitchableTransport
from starttls_harness.tls.engine import (
    AlertReceived,
    CloseNotifyReceived,
    CloseNotifySent,
    ClosureComplete,
    Event,
    HandshakeComplete,
    HandshakeFailed,
    PeerEOF,
    PlaintextData,
    Rule,
    TLSData,
    Violation,
)
from starttls_harness.tls.states import State

__all__ = [
    "MAX_LINE",
    "MAX_UNIT",
    "Act",
    "Gone",
    "Refuser",
    "ScriptTimeout",
    "ScriptedConnection",
    "act_for_violation",
]

#: Longest command line the scripted server buffers; largest literal / body.
MAX_LINE = 8192
MAX_UNIT = 1 << 20


@dataclass(frozen=True)
class Act:
    """One thing the client did, in wire order.

    ``kind`` is ``command``, ``close_notify``, ``handshake`` or ``gone``;
    for ``gone``, ``how`` says in which way the connection ended: ``eof``
    (a clean FIN), ``truncated`` (FIN/RST while TLS was up, no close_notify),
    ``unanswered`` (FIN after our close_notify, R5), ``violation`` (the client
    broke ``rule``), ``alert``, ``handshake-failed``, ``reset``, ``oversize``,
    ``tls-hello`` (a ClientHello where a plaintext command belongs; never
    answered) or ``closed-by-us``.
    """

    kind: str
    command: Optional[Command] = None
    how: str = ""
    rule: Optional[Rule] = None
    detail: str = ""


class Gone(RemoteEnded):
    """The client ended the connection (the act says how, and which rule it broke)."""

    def __init__(self, act: Act) -> None:
        super().__init__(act.how, act.detail, act.rule)
        self.act = act


class ScriptTimeout(WaitTimeout):
    pass


class ScriptedConnection(asyncio.Protocol):
    """The one accepted connection: parses commands, queues acts, records evidence."""

    def __init__(self, dialect: Dialect, evidence: Evidence) -> None:
        self.dialect = dialect.scripted_server()
        #: A bare closure is the client's return to plaintext (LDAP) while
        #: the server offers it (:meth:`offer_removal`).
        self.return_by_closure = dialect.return_by_closure
        self.removal_offered = False
        self.framer = dialect.framer()
        #: A second framer for the hold gate (it keeps its own stream state).
        self.gate_framer = dialect.framer()
        self.evidence = evidence
        self.transport: Optional[SwitchableTransport] = None
        self.connected = asyncio.get_running_loop().create_future()
        self.acts: Deque[Act] = collections.deque()
        self.gone: Optional[Act] = None
        self.changed = asyncio.Event()
        self.closing = False
        #: Set while a STOPTLS closure we accepted is under way: the client's
        #: close_notify then belongs to it and is not an act of its own.
        self.in_closure = False
        self.tls_sessions = 0
        #: Our TCP FIN went out (a truncation): nothing more leaves, not even
        #: the close_notify the engine answers the client's with.
        self.fin_sent = False
        self._rx_tls = False
        self._buf = bytearray()
        self._unit = bytearray()
        self._literal_left = 0
        self.body_mode = False
        #: Raw mode: bytes are collected in ``raw`` instead of parsed (used to
        #: see the ClientHello before the server's TLS starts).
        self.raw_mode = False
        self.raw = bytearray()

    # -------------------------------------------------------- asyncio API

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SwitchableTransport)
        self.transport = transport
        self.evidence.wires.append(transport.wire)  # real bytes, for --capture
        transport.hold_after(self._is_starttls_line, framer=self.gate_framer)
        if not self.connected.done():
            self.connected.set_result(None)

    def _is_starttls_line(self, line: bytes) -> bool:
        """Hold-gate predicate: a STARTTLS command line (not message content)."""
        if self.body_mode or self._literal_left:
            return False
        return self.dialect.parse(line, False).kind == "starttls"

    def engine_event(self, event: Event) -> None:
        if isinstance(event, (TLSData, PlaintextData)):
            self._rx_tls = isinstance(event, TLSData)
            if not self.raw_mode:  # raw bytes are recorded by their reader
                self.evidence.add("c2s", "tls" if self._rx_tls else "plaintext", event.data)
        elif isinstance(event, HandshakeComplete):
            self.tls_sessions += 1
            self.evidence.note(f"TLS up: {event.version} {event.cipher}")
            self._push(Act("handshake", detail=event.version))
            if self.removal_offered and self.transport is not None:
                self.transport.engine.accept_unwrap()  # either side may end TLS
        elif isinstance(event, CloseNotifyReceived):
            self.evidence.add("c2s", "close_notify")
            if not self.in_closure:
                self._push(self._closure_act())
        elif isinstance(event, CloseNotifySent):
            if self.fin_sent:  # the ladder shows only what went on the wire
                self.evidence.note("no close_notify from us: our FIN had already gone")
            else:
                self.evidence.add("s2c", "close_notify")
        elif isinstance(event, ClosureComplete):
            self.in_closure = False
            if not self.fin_sent:
                state = "plaintext resumes" if event.resumed else "the connection ends"
                self.evidence.note(f"TLS closed both ways; {state}")
        elif isinstance(event, Violation):
            self.evidence.add("c2s", "note", event.data, f"{event.rule.value}: {event.message}")
            if event.enforced:
                self._end(act_for_violation(event))
        elif isinstance(event, AlertReceived):
            self.evidence.add("c2s", "alert", note=event.description)
            self._end(Act("gone", how="alert", detail=f"client sent alert {event.description}"))
        elif isinstance(event, HandshakeFailed):
            side = "client alert" if event.remote else "local"
            self._end(
                Act(
                    "gone",
                    how="handshake-failed",
                    detail=f"handshake failed ({side}): {event.reason}",
                )
            )
        elif isinstance(event, PeerEOF):
            self.evidence.add("c2s", "eof")
            self._end(Act("gone", how="eof", detail="the client closed the connection"))

    def offer_removal(self, offered: bool) -> None:
        """Where a bare closure is the return to plaintext (LDAP), offer it or not:
        armed now if TLS is up, and after every later handshake."""
        self.removal_offered = offered and self.return_by_closure
        t = self.transport
        if self.removal_offered and t is not None and t.engine.state is State.TLS:
            t.engine.accept_unwrap()

    def _closure_act(self) -> Act:
        """The client's close_notify; where a bare closure is the return to
        plaintext (LDAP) and it has returned, the client's STOPTLS command."""
        t = self.transport
        if self.removal_offered and t is not None and t.engine.state is State.PLAINTEXT:
            return Act("command", command=Command(b"", True, "stoptls", "removal of TLS"))
        return Act("close_notify")

    def data_received(self, data: bytes) -> None:
        if self.raw_mode:
            self.raw += data
            self._wake()
            return
        self._buf += data
        self._parse()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.gone is None:
            if isinstance(exc, ConnectionEnded):
                event = exc.event
                if isinstance(event, Violation):
                    self._end(act_for_violation(event))
                else:
                    self._end(Act("gone", how="reset", detail=str(exc)))
            elif self.closing:
                self._end(Act("gone", how="closed-by-us", detail="the server closed"))
            elif exc is None:
                self.evidence.add("c2s", "eof")
                self._end(Act("gone", how="eof", detail="the client closed the connection"))
            else:
                self.evidence.add("c2s", "eof", note=f"reset: {exc}")
                self._end(Act("gone", how="reset", detail=f"connection lost: {exc}"))
        self._wake()

    # ----------------------------------------------------------- parsing

    def _parse(self) -> None:
        """Cut the buffer into commands (literals inline, message bodies whole).

        Lines are the dialect's framer's units; the scripted server says
        which line announces a literal and which command opens a body.
        """
        buf = self._buf
        while buf and self.gone is None:
            if self.body_mode:
                if not self._take_body():
                    return
                continue
            if self._literal_left:
                take = min(self._literal_left, len(buf))
                self._unit += buf[:take]
                del buf[:take]
                self._literal_left -= take
                continue
            if self._client_hello_in_plaintext(buf):
                return
            units, _used = self.framer.split(bytes(buf[: MAX_LINE + 1]))
            if not units:
                if len(buf) > MAX_LINE:
                    self._oversize()
                return
            line = units[0]
            del buf[: len(line)]
            if len(line) > MAX_LINE:
                self._oversize()
                return
            self._unit += line
            literal = self.dialect.literal_after(line)
            if literal is not None:
                size, synchronizing = literal
                if size > MAX_UNIT:
                    self._oversize()
                    return
                self._literal_left = size
                if synchronizing:
                    self.send(self.dialect.literal_prompt())
                continue
            unit = bytes(self._unit)
            self._unit.clear()
            self._push(Act("command", command=self.dialect.parse(unit, self._rx_tls)))

    def _client_hello_in_plaintext(self, buf: bytearray) -> bool:
        """A TLS handshake record where a plaintext command belongs.

        The client started TLS although no STARTTLS was accepted (after a
        refusal, say).  Its bytes are never answered as commands: the act is
        ``gone`` (``tls-hello``) and the connection is closed.
        """
        if self._unit or self.transport is None or self.transport.tls_active:
            return False
        if bytes(buf[:2]) != b"\x16\x03":
            return False
        self.evidence.add("c2s", "tls-wire", bytes(buf[:64]), "a ClientHello, not a command")
        buf.clear()
        self._end(
            Act(
                "gone",
                how="tls-hello",
                detail="the client began a TLS handshake the server had not accepted",
            )
        )
        self.abort()
        return True

    def _take_body(self) -> bool:
        """A message body up to its end (the dialect says where); False if incomplete."""
        data = bytes(self._unit) + bytes(self._buf)
        end = self.dialect.body_end(data)
        if end is None:
            self._unit[:] = data
            self._buf.clear()
            if len(self._unit) > MAX_UNIT:
                self._oversize()
            return False
        size, used = end
        body, rest = data[:size], data[used:]
        self._unit.clear()
        self._buf[:] = rest
        self.body_mode = False
        self._push(Act("command", command=self.dialect.parse_body(body, self._rx_tls)))
        return True

    def _oversize(self) -> None:
        self.evidence.note("the client sent more than the fake server buffers")
        self._end(Act("gone", how="oversize", detail="client data exceeded the bound"))
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------ inbox

    def _push(self, act: Act) -> None:
        self.acts.append(act)
        self._wake()

    def _end(self, act: Act) -> None:
        if self.gone is None:
            self.gone = act
        self._wake()

    def _wake(self) -> None:
        self.changed.set()

    async def next_act(self, timeout: float) -> Act:
        """The client's next act (``gone`` for ever once it is gone); bounded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.acts:
                return self.acts.popleft()
            if self.gone is not None:
                return self.gone
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ScriptTimeout(f"the client did nothing decisive within {timeout:g} s")
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def raw_record(self, timeout: float) -> bytes:
        """Wait (in raw mode) for one complete TLS record, e.g. the ClientHello."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            raw = self.raw
            if raw[:1] and raw[:1] != b"\x16":
                return bytes(raw)  # not TLS: the caller decides
            if len(raw) >= 5 and len(raw) >= 5 + ((raw[3] << 8) | raw[4]):
                return bytes(raw)
            if self.gone is not None:
                raise Gone(self.gone)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ScriptTimeout("no ClientHello arrived")
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    # ------------------------------------------------------------ output

    def t(self) -> SwitchableTransport:
        assert self.transport is not None
        return self.transport

    def send(self, data: bytes) -> None:
        """Send in the current phase (plaintext, or under TLS)."""
        t = self.t()
        if t.is_closing() or not data:
            return
        self.evidence.add("s2c", "tls" if t.tls_active else "plaintext", data)
        t.write(data)

    def inject(self, data: bytes, note: str) -> None:
        """Bytes around every rule, marked as injected in the evidence."""
        t = self.t()
        if t.is_closing():
            return
        self.evidence.add("s2c", "injected", data, note)
        t.write_raw(data)

    def handle(self, events: List[Event]) -> None:
        """Engine events of an operation the script did on the engine itself."""
        t = self.t()
        t.events.extend(events)
        for event in events:
            self.engine_event(event)
            if isinstance(event, HandshakeFailed) or (
                isinstance(event, Violation) and event.enforced
            ):
                t.abort()

    def close(self) -> None:
        """Close as a conforming server (close_notify first under TLS)."""
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()


def act_for_violation(event: Violation) -> Act:
    if event.rule is Rule.R6:
        return Act("gone", how="truncated", rule=event.rule, detail=event.message)
    if event.rule is Rule.R5:
        return Act("gone", how="unanswered", rule=event.rule, detail=event.message)
    return Act(
        "gone",
        how="violation",
        rule=event.rule,
        detail=f"the client broke {event.rule.value}: {event.message}",
    )


class Refuser(asyncio.Protocol):
    """Any connection after the first: closed at once (one client, one connection)."""

    def __init__(self, evidence: Evidence) -> None:
        self.evidence = evidence

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.evidence.note("a further connection from the client was refused")
        transport.close()
