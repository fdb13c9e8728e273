"""The sans-I/O STARTTLS/closure engine.

Theory of operation
===================

One :class:`Connection` follows one TCP connection through any number of
plaintext -> TLS -> plaintext cycles.  It owns no socket and no event loop:
the caller feeds it the bytes read from the network (:meth:`receive_data`,
``b""`` for EOF), writes out what :meth:`data_to_send` returns, and acts on the
:class:`Event` objects the engine hands back.  The asyncio adapter
(:mod:`starttls_harness.tls.aio`) and the tests' in-memory pairs are such callers.

TLS itself is OpenSSL through ``ssl.SSLObject`` with two ``ssl.MemoryBIO``.
The engine never lets OpenSSL see the raw stream directly: it cuts incoming
bytes into TLS records itself and feeds them **one record at a time**.  That
is what makes the closure rules checkable:

* the record header is checked before OpenSSL sees it, so plaintext that
  arrives while TLS is up (R2), before the peer's close_notify (R3) or between
  STARTTLS and the ClientHello (R1) is recognised as such, byte exact, instead
  of surfacing as an OpenSSL "wrong version number";
* after the record that carried the peer's close_notify, every remaining byte
  is known to be *after* the closure: the engine hands those trailing bytes
  back (never leaves them in a BIO or clears them) and decides whether they
  are legitimate plaintext (both close_notify alerts crossed, R3) or a peer
  that did not wait for our answer (R4);
* EOF is judged by the engine's state, not by OpenSSL: TCP EOF while TLS is up
  is a truncation (R6) whatever ``OP_IGNORE_UNEXPECTED_EOF`` says, which
  also makes Python 3.9 (whose default context sets that option) behave
  like the others.

Plaintext in the STARTTLS phase passes through a *hold gate*: the dialect
arms it with a predicate over complete lines (``STARTTLS`` on a server, the
final line of the ``220``/``OK`` answer on a client).  Once a line matches,
later bytes are held back from the application, so that when it calls
:meth:`Connection.start_tls` the engine knows exactly which plaintext was
already received at the upgrade (R1) -- no reaching into anyone's buffer.

Every rule is enforced by default; a :class:`Policy` relaxes single rules
on purpose to build the misbehaving reference peers.  Violations by the peer
are :class:`Violation` events (with the rule id and the offending bytes);
misuse by the local application raises :class:`LocalProtocolError`.  All
state changes go through the table in :mod:`starttls_harness.tls.states`.
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass, field
from typing import Callable, FrozenSet, Iterable, List, Optional, Union

from starttls_harness.tls.framing import Framer, LineFramer
from starttls_harness.tls.records import check_header
from starttls_harness.tls.states import Input, State, TransitionError, transition

__all__ = [
    "AlertReceived",
    "CloseNotifyReceived",
    "CloseNotifySent",
    "ClosureComplete",
    "Connection",
    "Event",
    "HandshakeComplete",
    "HandshakeFailed",
    "LocalProtocolError",
    "PeerEOF",
    "PlaintextData",
    "Policy",
    "Role",
    "Rule",
    "Segment",
    "TLSData",
    "TransitionError",
    "Violation",
    "clear_ignore_unexpected_eof",
]


class Rule(str, enum.Enum):
    """The closure rules of ``docs/rules.md``."""

    R1 = "R1"
    R2 = "R2"
    R3 = "R3"
    R4 = "R4"
    R5 = "R5"
    R6 = "R6"
    R7 = "R7"
    R8 = "R8"
    R9 = "R9"

    @property
    def summary(self) -> str:
        return RULE_TITLES[self]


RULE_TITLES = {
    Rule.R1: "discard plaintext received before the TLS upgrade",
    Rule.R2: "nothing plaintext inside TLS",
    Rule.R3: "plaintext resumes only after a bidirectional close_notify",
    Rule.R4: "the closure initiator waits for the peer's close_notify",
    Rule.R5: "the responder answers close_notify at once",
    Rule.R6: "truncation is not closure",
    Rule.R7: "alerts other than close_notify are not closure",
    Rule.R8: "protocol state is reset after every transition",
    Rule.R9: "no downgrade when TLS is required",
}


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True)
class Policy:
    """Which rules the engine enforces.  Strict (the default) enforces all.

    Relaxing a rule makes the engine misbehave in the way real software has:

    * R1: plaintext received before the upgrade is delivered after the
      handshake as if it had arrived inside TLS (CVE-2011-0411's class);
    * R2: non-TLS bytes while TLS is up are delivered as application data;
    * R3: plaintext before the bidirectional closure resumes plaintext; the
      application may also write plaintext after a final closure;
    * R4: the application may write right after its own close_notify, and
      bytes following the peer's close_notify are accepted as plaintext;
    * R5: the peer's close_notify is not answered automatically;
    * R6: TCP EOF while TLS is up is reported as a clean :class:`PeerEOF`;
    * R7: a fatal alert is taken for a closure and plaintext resumes.
    """

    relaxed: FrozenSet[Rule] = frozenset()

    @classmethod
    def strict(cls) -> Policy:
        return cls()

    @classmethod
    def relaxing(cls, *rules: Union[Rule, str]) -> Policy:
        return cls(frozenset(Rule(r) for r in rules))

    def enforces(self, rule: Rule) -> bool:
        return rule not in self.relaxed


class LocalProtocolError(RuntimeError):
    """The local application asked for something the rules forbid."""


# --------------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    """Base class of everything :meth:`Connection.receive_data` reports."""


@dataclass(frozen=True)
class PlaintextData(Event):
    data: bytes


@dataclass(frozen=True)
class TLSData(Event):
    """Application data received under TLS.

    ``protected`` is False only under a relaxed policy, for bytes that did not
    really come through TLS (leftover plaintext, R1; plaintext in TLS, R2).
    """

    data: bytes
    protected: bool = True


@dataclass(frozen=True)
class HandshakeComplete(Event):
    version: str
    cipher: str


@dataclass(frozen=True)
class HandshakeFailed(Event):
    reason: str
    #: True when the peer sent the alert that ended the handshake.
    remote: bool


@dataclass(frozen=True)
class CloseNotifyReceived(Event):
    pass


@dataclass(frozen=True)
class CloseNotifySent(Event):
    pass


@dataclass(frozen=True)
class ClosureComplete(Event):
    """Both close_notify alerts have crossed.

    ``resumed`` says whether plaintext resumes on this connection.  The
    ``trailing`` bytes (received after the peer's close_notify) are reported
    here for evidence and are *also* delivered as the :class:`PlaintextData`
    events that follow, so an application only needs to handle the latter.
    """

    resumed: bool
    trailing: bytes = b""


@dataclass(frozen=True)
class AlertReceived(Event):
    description: str


@dataclass(frozen=True)
class PeerEOF(Event):
    """The peer closed TCP at a point where that is not a truncation."""


@dataclass(frozen=True)
class Violation(Event):
    """The peer broke ``rule``; ``data`` holds the offending bytes.

    ``enforced`` is True when the engine refused the bytes (the connection is
    then BROKEN and must be closed); False when a relaxed policy let them in.
    """

    rule: Rule
    message: str
    data: bytes = b""
    enforced: bool = True


@dataclass(frozen=True)
class Segment:
    """One entry of the transcript: bytes in one direction, in order.

    Outgoing ``kind`` is ``plaintext``, ``tls`` (wire bytes of TLS records)
    or ``raw`` (written around the rules by a fault-injecting peer).
    Incoming ``kind`` is the state the engine was in when the bytes
    arrived (``plaintext``, ``tls``, ``close-sent``...); ``b""`` is EOF.
    """

    direction: str  # "in" or "out"
    kind: str
    data: bytes


# ------------------------------------------------------------------- helpers

#: ``SSL_OP_IGNORE_UNEXPECTED_EOF`` (OpenSSL 3); Python 3.9's ``ssl`` may lack
#: the name although its default context sets the bit.
OP_IGNORE_UNEXPECTED_EOF: int = int(getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 1 << 7))

_READ_SIZE = 1 << 16


def clear_ignore_unexpected_eof(context: ssl.SSLContext) -> ssl.SSLContext:
    """Make ``context`` strict about EOF without close_notify (principle 3)."""
    context.options &= ~OP_IGNORE_UNEXPECTED_EOF
    return context


def _header_problem(buf: Union[bytes, bytearray]) -> Optional[str]:
    """Why ``buf`` cannot start a TLS record, or None if it may.

    Looks at as many header bytes as there are, so a short plaintext
    command is recognised without waiting for five bytes (the one header
    check of the project: :func:`starttls_harness.tls.records.check_header`).
    """
    return check_header(bytes(buf[:5]))


def _tls_resumes_at(data: bytes, framer: Framer) -> int:
    """Where a TLS handshake record starts after whole plaintext units (cut by
    the dialect's ``framer``, e.g. lines), or len(data)."""
    framer.reset()
    start = 0
    for unit in framer.split(data)[0]:
        start += len(unit)
        if data[start : start + 1] == b"\x16" and _header_problem(data[start : start + 5]) is None:
            return start
    return len(data)


def _is_peer_alert(exc: ssl.SSLError) -> bool:
    reason = getattr(exc, "reason", None) or ""
    return "ALERT" in reason and (
        reason.startswith("SSLV3_ALERT") or reason.startswith("TLSV1") or "ALERT_" in reason
    )


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else str(exc)


#: A predicate over one complete plaintext unit (a line, a message...).
UnitPredicate = Callable[[bytes], bool]
LinePredicate = UnitPredicate  # the mail dialects' units are lines


class _HoldGate:
    """Delivers plaintext eagerly but holds everything after a trigger unit.

    Units are cut by the dialect's framer (:mod:`starttls_harness.tls.framing`);
    bytes of an incomplete unit are delivered at once but also kept, so the
    predicate sees the unit whole when its end arrives.
    """

    def __init__(self) -> None:
        self.predicate: Optional[UnitPredicate] = None
        self.once = False
        self.framer: Framer = LineFramer()
        self.line = bytearray()  # current incomplete unit, for the predicate
        self.held = bytearray()
        self.holding = False

    def feed(self, data: bytes) -> bytes:
        """Return the part of ``data`` to deliver now; hold the rest."""
        if self.holding:
            self.held += data
            return b""
        if self.predicate is None:
            return data
        before = len(self.line)
        self.line += data
        units, _used = self.framer.split(bytes(self.line))
        end = 0
        for unit in units:
            end += len(unit)
            if self.predicate(unit):
                self.holding = True
                cut = end - before  # offset in ``data`` just after the unit
                self.held += data[cut:]
                self.line.clear()
                if self.once:
                    self.predicate = None
                return data[:cut]
        del self.line[:end]
        return data

    def take(self) -> bytes:
        held = bytes(self.held)
        self.held.clear()
        self.holding = False
        self.line.clear()
        return held


# --------------------------------------------------------------- connection


class Connection:
    """One TCP connection's journey between plaintext and TLS (sans-I/O).

    All operations return the events they caused; :meth:`receive_data`
    returns the events caused by the bytes it was given.
    """

    def __init__(self, policy: Optional[Policy] = None, *, record: bool = True) -> None:
        self.policy = policy or Policy.strict()
        self.state = State.PLAINTEXT
        self.role: Optional[Role] = None
        #: Completed TLS sessions on this connection (increments at closure).
        self.cycles = 0
        #: Every byte in and out, in order, when ``record`` is true.
        self.transcript: List[Segment] = []
        self._record = record
        self._ssl: Optional[ssl.SSLObject] = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._outgoing = bytearray()
        self._rx = bytearray()
        self._gate = _HoldGate()
        self._resume = False
        self._tls_bytes_seen = False
        self._relaxed_leftover = b""
        self._peer_data_after_our_close = False
        self._close_notify_unflushed = False
        #: A fatal alert ended TLS and no byte has followed it yet: the first
        #: ones to come are reported (R7) whichever read they arrive in.
        self._after_alert = False
        self._events: List[Event] = []

    # ------------------------------------------------------------ properties

    @property
    def tls_active(self) -> bool:
        return self.state in (State.HANDSHAKING, State.TLS, State.CLOSE_SENT, State.CLOSE_RECEIVED)

    @property
    def ssl_object(self) -> Optional[ssl.SSLObject]:
        return self._ssl

    @property
    def tls_version(self) -> Optional[str]:
        return self._ssl.version() if self._ssl is not None else None

    @property
    def held(self) -> bytes:
        """Plaintext kept back by the hold gate, not yet given to anyone."""
        return bytes(self._gate.held)

    # ------------------------------------------------------------ plaintext

    def hold_after(
        self,
        predicate: Optional[UnitPredicate],
        *,
        once: bool = False,
        framer: Optional[Framer] = None,
    ) -> None:
        """Hold received plaintext after the first complete unit that matches.

        A server arms it with "is this unit STARTTLS"; a client, just before
        sending STARTTLS, with "is this the final unit of the answer".  Units
        are cut by ``framer`` (the dialect's; CRLF lines when not given).
        ``None`` disarms the gate (held bytes stay held until released).
        """
        if self._gate.held:
            raise LocalProtocolError(
                "held plaintext is pending: call start_tls() or release_held() first"
            )
        self._gate.predicate = predicate
        self._gate.once = once
        self._gate.framer = framer if framer is not None else LineFramer()
        self._gate.holding = False
        self._gate.line.clear()

    def release_held(self) -> List[Event]:
        """Deliver held plaintext after all (the application did not upgrade)."""
        if self.state is not State.PLAINTEXT:
            raise TransitionError(self.state, Input.START_TLS)
        held = self._gate.take()
        if held:
            self._deliver_plaintext(held)
        return self._drain_events()

    # ------------------------------------------------------------ operations

    def start_tls(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: Optional[str] = None,
        leftover: bytes = b"",
        session: Optional[ssl.SSLSession] = None,
    ) -> List[Event]:
        """Switch from plaintext to TLS (STARTTLS accepted / answered).

        ``leftover`` is plaintext the application itself had buffered beyond
        the STARTTLS exchange; together with what the hold gate kept back it
        is the R1 leftover, reported and (strict) refused.
        """
        self.state = transition(self.state, Input.START_TLS)
        clear_ignore_unexpected_eof(context)
        self.role = Role.SERVER if server_side else Role.CLIENT
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._in,
            self._out,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        self._resume = False
        self._tls_bytes_seen = False
        self._peer_data_after_our_close = False
        self._close_notify_unflushed = False
        self._after_alert = False
        pending = self._gate.take() + bytes(leftover)
        if pending:
            enforced = self.policy.enforces(Rule.R1)
            self._events.append(
                Violation(
                    Rule.R1,
                    "plaintext received before the TLS upgrade",
                    pending,
                    enforced,
                )
            )
            if enforced:
                self._fail()
                return self._drain_events()
            self._relaxed_leftover = pending
        if not server_side:
            self._step_handshake()
        return self._drain_events()

    def send_data(self, data: bytes) -> None:
        """Send application bytes in whatever protection the phase requires."""
        if not data:
            return
        state = self.state
        if state is State.PLAINTEXT:
            self._queue_out("plaintext", data)
        elif state is State.TLS or (
            state is State.CLOSE_RECEIVED and not self.policy.enforces(Rule.R5)
        ):
            assert self._ssl is not None
            self._ssl.write(data)
            self._flush_bio()
        elif state is State.CLOSE_SENT and not self.policy.enforces(Rule.R4):
            # The one-sided closure: plaintext straight after our close_notify.
            self._queue_out("raw", data)
        elif state in (State.CLOSED, State.CLOSE_SENT, State.CLOSE_RECEIVED) and not (
            self.policy.enforces(Rule.R3)
        ):
            self.state = transition(self.state, Input.FORCED_RESUME)
            self._queue_out("raw", data)
        elif state is State.CLOSE_SENT:
            raise LocalProtocolError(
                "R4: nothing may be sent after our close_notify until the peer's has arrived"
            )
        elif state in (State.CLOSED, State.CLOSE_RECEIVED):
            raise LocalProtocolError(
                "R3: plaintext may not be written before a bidirectional close_notify"
                f" on a connection that resumes (state {state.value})"
            )
        else:
            raise LocalProtocolError(f"cannot send application data in state {state.value!r}")

    def send_raw(self, data: bytes) -> None:
        """Put ``data`` on the wire as is, whatever the phase (fault injection)."""
        self._queue_out("raw", data)

    def send_close_notify(self) -> List[Event]:
        """One-way close: send close_notify; TCP is to be closed afterwards."""
        return self._close(resume=False)

    def unwrap(self) -> List[Event]:
        """Start a bidirectional closure that returns to plaintext (initiator).

        Completes with :class:`ClosureComplete` once the peer's close_notify
        has arrived; until then nothing else may be sent (R4).
        """
        return self._close(resume=True)

    def accept_unwrap(self) -> List[Event]:
        """As responder: the peer's coming close_notify returns to plaintext.

        Call it when the application has agreed to end TLS (STOPTLS answered).
        If the close_notify already arrived (relaxed R5), answer it now.
        """
        if self.state is State.CLOSE_RECEIVED:
            self._resume = True
            self._answer_close_notify()
        elif self.state is State.TLS:
            self._resume = True
        else:
            raise TransitionError(self.state, Input.RECV_CLOSE_NOTIFY)
        return self._drain_events()

    def close(self) -> None:
        """The application closes the TCP connection."""
        self.state = transition(self.state, Input.LOCAL_CLOSE)

    def data_to_send(self) -> bytes:
        """Bytes to write to the network now, in order."""
        if self._close_notify_unflushed:
            self._close_notify_unflushed = False
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    # -------------------------------------------------------------- receive

    def receive_data(self, data: bytes) -> List[Event]:
        """Feed bytes read from the network; ``b""`` means EOF."""
        if self._record:
            self.transcript.append(Segment("in", self.state.value, bytes(data)))
        if not data:
            self._on_eof()
            return self._drain_events()
        self._dispatch(data)
        return self._drain_events()

    def _dispatch(self, data: bytes) -> None:
        state = self.state
        if self._after_alert:
            self._bytes_after_alert(data)
            return
        if state is State.PLAINTEXT:
            self._deliver_plaintext(data)
        elif state in (State.HANDSHAKING, State.TLS, State.CLOSE_SENT):
            self._rx += data
            self._process_records()
        elif state is State.CLOSE_RECEIVED:
            # Our answer is not sent: the peer did not wait for it (R4).
            self._bytes_after_peer_close(bytes(data))
        elif state is State.CLOSED:
            if self.policy.enforces(Rule.R3):
                self._events.append(
                    Violation(
                        Rule.R3,
                        "plaintext after the TLS closure on a connection that does not resume",
                        bytes(data),
                    )
                )
                self._fail()
            else:
                self.state = transition(self.state, Input.FORCED_RESUME)
                self._deliver_plaintext(data)
        # BROKEN, DONE: nothing is interpreted any more (the transcript
        # already holds the bytes, marked with the state they arrived in).

    def _deliver_plaintext(self, data: bytes) -> None:
        if self._close_notify_unflushed:
            # Our close_notify was queued but not yet written when these
            # bytes arrived: the peer spoke before it could have seen it.
            self._bytes_after_peer_close(bytes(data))
            return
        now = self._gate.feed(bytes(data))
        if now:
            self._events.append(PlaintextData(now))

    def _process_records(self) -> None:
        """Cut ``_rx`` into records and feed OpenSSL one record at a time."""
        while self._rx and self.tls_active:
            problem = _header_problem(self._rx[:5])
            if problem is not None:
                self._not_tls(problem)
                return
            if len(self._rx) < 5:
                return
            size = 5 + ((self._rx[3] << 8) | self._rx[4])
            if len(self._rx) < size:
                return
            record = bytes(self._rx[:size])
            del self._rx[:size]
            self._tls_bytes_seen = True
            self._in.write(record)
            if self.state is State.HANDSHAKING:
                self._step_handshake()
            else:
                self._step_read()

    def _not_tls(self, problem: str) -> None:
        """Bytes at a record boundary are not TLS: R1, R2 or R3 by phase."""
        data = bytes(self._rx)
        self._rx.clear()
        if self.state is State.HANDSHAKING and not self._tls_bytes_seen:
            rule, what = Rule.R1, "plaintext after STARTTLS, before the TLS handshake"
        elif self.state is State.CLOSE_SENT:
            rule, what = Rule.R3, "plaintext before the peer's close_notify"
        else:
            rule, what = Rule.R2, "bytes that are not TLS records while TLS is up"
        enforced = self.policy.enforces(rule)
        if not enforced and rule is Rule.R1:
            # Misbehaving peer: the plaintext runs after the handshake, as if it
            # had come through TLS; a ClientHello glued to it goes on to OpenSSL.
            cut = _tls_resumes_at(data, self._gate.framer)
            data, self._rx[:] = data[:cut], data[cut:]
            self._events.append(Violation(rule, f"{what} ({problem})", data, enforced))
            self._relaxed_leftover += data
            self._process_records()
            return
        self._events.append(Violation(rule, f"{what} ({problem})", data, enforced))
        if enforced:
            self._fail()
        elif rule is Rule.R3:
            self.state = transition(self.state, Input.FORCED_RESUME)
            self._deliver_plaintext(data)
        else:
            self._events.append(TLSData(data, protected=False))

    def _step_handshake(self) -> None:
        assert self._ssl is not None
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_bio()
            return
        except ssl.SSLError as exc:
            self._flush_bio()
            self._events.append(HandshakeFailed(_reason(exc), remote=_is_peer_alert(exc)))
            self._fail()
            return
        self._flush_bio()
        self.state = transition(self.state, Input.HANDSHAKE_DONE)
        self._events.append(
            HandshakeComplete(self._ssl.version() or "", (self._ssl.cipher() or ("",))[0])
        )
        if self._relaxed_leftover:
            self._events.append(TLSData(self._relaxed_leftover, protected=False))
            self._relaxed_leftover = b""
        # TLS 1.3: application data may sit in the same record batch.
        self._step_read()

    def _step_read(self) -> None:
        assert self._ssl is not None
        while True:
            try:
                chunk = self._ssl.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                self._flush_bio()
                return
            except ssl.SSLZeroReturnError:
                # close_notify after we sent ours (read() returns b"" when
                # the peer's arrives first): both mean the same here.
                chunk = b""
            except ssl.SSLError as exc:
                self._flush_bio()
                self._on_ssl_error(exc)
                return
            self._flush_bio()
            if not chunk:
                self._on_close_notify()
                return
            if self.state is State.CLOSE_SENT:
                self._peer_data_after_our_close = True
            self._events.append(TLSData(chunk))

    def _on_ssl_error(self, exc: ssl.SSLError) -> None:
        if _is_peer_alert(exc):
            self._events.append(AlertReceived(_reason(exc)))
            after = bytes(self._rx) + self._in.read()
            self._rx.clear()
            if self.policy.enforces(Rule.R7):
                self._fail()
            else:
                self.state = transition(self.state, Input.FORCED_RESUME)
            # Whether the bytes that follow came in this read or a later one
            # must not change the report (tests/test_properties.py).
            self._after_alert = True
            if after:
                self._bytes_after_alert(after)
            return
        self._events.append(
            Violation(Rule.R2, f"invalid TLS record ({_reason(exc)})", bytes(self._rx), True)
        )
        self._rx.clear()
        self._fail()

    def _bytes_after_alert(self, data: bytes) -> None:
        """The first bytes after a fatal alert (R7): refused, or (relaxed) resumed."""
        self._after_alert = False
        if self.policy.enforces(Rule.R7):
            self._events.append(Violation(Rule.R7, "bytes after a fatal alert", data, True))
            return
        self._events.append(
            Violation(Rule.R7, "plaintext resumed after a fatal alert", data, False)
        )
        self._dispatch(data)

    def _on_close_notify(self) -> None:
        """The peer's close_notify was in the record just fed."""
        assert self._ssl is not None
        self._events.append(CloseNotifyReceived())
        trailing = bytes(self._rx) + self._in.read()
        self._rx.clear()
        if self.state is State.CLOSE_SENT:
            self._finish_closure(trailing)
            return
        self.state = transition(self.state, Input.RECV_CLOSE_NOTIFY)
        if trailing:
            # Sent by the peer before it could have seen an answer from us.
            self._bytes_after_peer_close(trailing)
            return
        if self.policy.enforces(Rule.R5):
            self._answer_close_notify()

    def _answer_close_notify(self) -> None:
        assert self._ssl is not None
        try:
            self._ssl.unwrap()
        except ssl.SSLError as exc:  # pragma: no cover - OpenSSL refuses to close
            self._flush_bio()
            self._events.append(HandshakeFailed(_reason(exc), remote=False))
            self._fail()
            return
        self._flush_bio()
        self._close_notify_unflushed = True
        self._events.append(CloseNotifySent())
        self._finish_closure(b"")

    def _bytes_after_peer_close(self, data: bytes) -> None:
        """Bytes after the peer's close_notify, before ours was sent (R4)."""
        if self.policy.enforces(Rule.R4):
            self._events.append(
                Violation(
                    Rule.R4,
                    "peer sent bytes after its close_notify without waiting for ours",
                    data,
                )
            )
            self._fail()
            return
        self._events.append(
            Violation(Rule.R4, "bytes after close_notify accepted as plaintext", data, False)
        )
        if self.state is State.CLOSE_RECEIVED and self.policy.enforces(Rule.R5):
            self._answer_close_notify()  # resumes (or closes) the connection
        if self.state is not State.PLAINTEXT:
            self.state = transition(self.state, Input.FORCED_RESUME)
        self._close_notify_unflushed = False
        self._deliver_plaintext(data)

    def _finish_closure(self, trailing: bytes) -> None:
        """Both close_notify alerts crossed: resume plaintext or close."""
        self.cycles += 1
        if self._resume:
            self.state = transition(self.state, Input.CLOSURE_RESUME)
            self._events.append(ClosureComplete(resumed=True, trailing=trailing))
            if trailing:
                self._deliver_plaintext(trailing)
        else:
            self.state = transition(self.state, Input.CLOSURE_FINAL)
            self._events.append(ClosureComplete(resumed=False, trailing=trailing))
            if trailing:
                self._dispatch(trailing)

    def _close(self, *, resume: bool) -> List[Event]:
        if self.state is State.CLOSE_RECEIVED:
            # Late answer (relaxed R5 peers, or a responder that closes).
            self._resume = resume
            self._answer_close_notify()
            return self._drain_events()
        self.state = transition(self.state, Input.SEND_CLOSE_NOTIFY)
        assert self._ssl is not None
        self._resume = resume
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass
        self._flush_bio()
        self._events.append(CloseNotifySent())
        # Records that arrived before our close_notify may already wait.
        if self._rx:
            self._process_records()
        return self._drain_events()

    def _on_eof(self) -> None:
        state = self.state
        if state is State.PLAINTEXT or state is State.CLOSED or state is State.CLOSE_RECEIVED:
            self.state = transition(state, Input.PEER_EOF)
            self._events.append(PeerEOF())
            return
        if state in (State.BROKEN, State.DONE):
            self.state = transition(state, Input.PEER_EOF)
            return
        pending = bytes(self._rx)
        self._rx.clear()
        self._in.write_eof()
        if state is State.CLOSE_SENT and not self._peer_data_after_our_close and not pending:
            # We closed; the peer hung up instead of answering (TLS 1.2: warn).
            self._events.append(
                Violation(
                    Rule.R5,
                    "peer closed TCP without answering our close_notify",
                    b"",
                    self.policy.enforces(Rule.R5),
                )
            )
            self.state = transition(state, Input.PEER_EOF)
            return
        if self.policy.enforces(Rule.R6):
            self._events.append(
                Violation(
                    Rule.R6,
                    f"TCP EOF while TLS is up ({state.value}) without close_notify",
                    pending,
                )
            )
        else:
            self._events.append(PeerEOF())
        self.state = transition(state, Input.PEER_EOF)

    # ------------------------------------------------------------ internals

    def _fail(self) -> None:
        self.state = transition(self.state, Input.FAILURE)

    def _flush_bio(self) -> None:
        out = self._out.read()
        if out:
            self._queue_out("tls", out)

    def _queue_out(self, kind: str, data: bytes) -> None:
        if self._record:
            self.transcript.append(Segment("out", kind, bytes(data)))
        self._outgoing += data

    def _drain_events(self) -> List[Event]:
        events = self._events
        self._events = []
        return events


def violations(events: Iterable[Event]) -> List[Violation]:
    """The :class:`Violation` events among ``events`` (test convenience)."""
    return [e for e in events if isinstance(e, Violation)]


@dataclass
class Pair:
    """Two engines wired back to back in memory (tests, benchmarks, docs).

    :meth:`pump` moves bytes until both sides are quiet; ``chunking`` lets a
    test force a segmentation (``None`` = each side's output as one lump).
    """

    client: Connection
    server: Connection
    client_events: List[Event] = field(default_factory=list)
    server_events: List[Event] = field(default_factory=list)

    def pump(self, chunk: Optional[int] = None) -> None:
        for _ in range(1000):
            moved = False
            for src, dst, sink in (
                (self.client, self.server, self.server_events),
                (self.server, self.client, self.client_events),
            ):
                data = src.data_to_send()
                if not data:
                    continue
                moved = True
                step = chunk or len(data)
                for i in range(0, len(data), step):
                    sink.extend(dst.receive_data(data[i : i + step]))
            if not moved:
                return
        raise RuntimeError("pump did not settle")  # pragma: no cover
