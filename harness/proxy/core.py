"""The on-path fault injector: a TCP relay that follows STARTTLS and closure.

Theory of operation
===================

The proxy sits between a client and a server and relays bytes both ways.  It
is split like the engine (principle 1):

* :class:`Follower` is sans-I/O.  It is fed the bytes of each direction as
  they arrive (any chunking) and cuts them into *units*: complete plaintext
  lines, complete TLS records, EOF, RST.  It tracks the phase of the
  conversation -- plaintext, ``STARTTLS`` asked and answered, TLS, closure,
  plaintext again -- and tags each unit with the named protocol points
  (:class:`Point`) it marks, so that a fault can be aimed at "the client's
  close_notify" rather than at a byte offset.  Feeding the same stream in
  1-byte chunks or in one lump gives the same units.
* :class:`Proxy` / :class:`ProxyConnection` are the asyncio shell: they read
  from one socket, ask the follower for units, apply the configured
  :class:`Fault` objects to the units they match, and write each unit to the
  other socket as a separate ``transport.write`` (``TCP_NODELAY`` on both
  sockets), unless a fault declares otherwise (``coalesce``, ``split``,
  ``inject`` in the same segment).  Everything is logged as
  :class:`ProxyEvent` objects: every unit received, every fault applied,
  every byte injected, every write -- the evidence of a path scenario.

How the follower tells the phase
--------------------------------

Plaintext is line based (SMTP, IMAP).  The follower reads the dialect's
``STARTTLS`` command from the client (SMTP ``STARTTLS``; IMAP
``<tag> STARTTLS``) and the final line of the answer from the server (SMTP
``220``; IMAP ``<tag> OK``).  A positive answer starts a TLS *session*.

At every unit boundary the follower looks at the next bytes: if they can
start a TLS record header (:func:`starttls_harness.tls.records.check_header`) they are cut
as a record, otherwise as a plaintext line.  Mail text never starts with the
bytes 0x14-0x18 followed by 0x03, so this is unambiguous for the dialects
here, and it is what lets the proxy see plaintext where TLS is expected
(injection) and TLS where plaintext is expected.

Inside TLS the commands are encrypted.  ``STOPTLS`` and its answer travel
inside TLS, so the return to plaintext is found through the close_notify
alerts, identified in one of three ways -- each logged event says which in
``method``:

``record-type`` (TLS 1.2)
    Alerts keep their outer record type 21.  An alert record after a
    direction's ChangeCipherSpec is encrypted: it is taken to be close_notify.
    It could be a fatal alert instead (bad_record_mac ...): the record type
    cannot tell them apart.  Application records (type 23) are known, so the
    first one each way is ``handshake-done``.  ``STOPTLS`` cannot be read.
``keylog`` (TLS 1.3 with a key log)
    Records are decrypted with the secrets of the NSS key log
    (``SSLKEYLOGFILE``; :mod:`starttls_harness.tls.keylog`).  Alerts, handshake messages
    (Finished, NewSessionTicket, KeyUpdate) and application data are known
    exactly, and so are the ``STOPTLS`` command and its reply.  The server's
    first protected records pass before the client has logged the secrets
    for them: they are relayed at once and classified later (a note).  A
    client writes its secrets before it sends its Finished, so when a second
    client record still cannot be decrypted the key log lacks this
    connection: the session falls back to ``position`` (and says so).
``position`` (TLS 1.3 without a usable key log)
    Every protected record has outer type 23, so only order and size are
    left.  What can be told: the client's first protected record is its
    Finished (no client certificate assumed) and later ones are application
    records; a server record is post-handshake once the client's Finished has
    passed, but it may be a NewSessionTicket, so the server's
    ``handshake-done`` may be a ticket.  A record whose size is exactly that
    of an encrypted 2-byte alert (3 bytes plus the AEAD tag) is *assumed* to
    be close_notify when it passes (this is what faults at ``close-notify``
    act on); a 2-byte application record looks the same.  When plaintext
    follows records in a direction, the last record before it is taken to be
    that direction's close_notify (a note says so).  What cannot be told:
    a close_notify from a fatal alert, a closure from plaintext injected
    after application data (R2), a truncation after an application record
    from a closure, and ``STOPTLS`` or its reply (a note names the last
    server application record before the client's close_notify once
    plaintext resumes).

Faults
------

A :class:`Fault` names a direction, a protocol point, an action and its
parameters; it applies once, at the ``nth`` unit of that direction that marks
that point.  :func:`parse_fault` reads the command-line form, and
:data:`FAULT_NAMES` lists the ready-made names with one line each.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import (
    IO,
    Any,
    Callable,
    Deque,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
    cast,
)

from starttls_harness.tls.keylog import (
    C2S,
    DIRECTIONS,
    S2C,
    TLS13_VERSION,
    FollowedRecord,
    KeylogError,
    SecretsMapping,
    SecretsProvider,
    Tls13Follower,
    keylog_file_provider,
)
from starttls_harness.tls.records import (
    CLOSE_NOTIFY,
    CT_ALERT,
    CT_APPLICATION_DATA,
    CT_CHANGE_CIPHER_SPEC,
    CT_HANDSHAKE,
    HEADER_LEN,
    Record,
    alert_description_name,
    check_header,
    content_type_name,
)

__all__ = [
    "ACTIONS",
    "C2S",
    "DIRECTIONS",
    "FAULT_NAMES",
    "METHODS",
    "POINTS",
    "S2C",
    "EventNotSeen",
    "Fault",
    "Follower",
    "Point",
    "Proxy",
    "ProxyConnection",
    "ProxyEvent",
    "Unit",
    "format_event",
    "parse_fault",
    "run_proxy",
]

# ----------------------------------------------------------------- vocabulary


class Point(str, enum.Enum):
    """Named protocol points a fault can be aimed at (values are the names)."""

    STARTTLS_COMMAND = "starttls-command"
    STARTTLS_REPLY = "starttls-reply"
    CLIENT_HELLO = "client-hello"
    SERVER_HELLO = "server-hello"
    HANDSHAKE_DONE = "handshake-done"
    APPLICATION_DATA = "application-data"
    STOPTLS_COMMAND = "stoptls-command"
    STOPTLS_REPLY = "stoptls-reply"
    CLOSE_NOTIFY = "close-notify"
    AFTER_CLOSE_NOTIFY = "after-close-notify"
    PLAINTEXT_IN_TLS = "plaintext-in-tls"
    FIRST_PLAINTEXT_AFTER_TLS = "first-plaintext-after-tls"
    PLAINTEXT = "plaintext"
    RECORD = "record"
    EOF = "eof"
    RESET = "reset"


#: Every point with what marks it (one line each; ``starttls-harness`` prints it).
POINTS: Dict[str, str] = {
    Point.STARTTLS_COMMAND.value: "c2s: the STARTTLS command line",
    Point.STARTTLS_REPLY.value: "s2c: the final line of the positive answer to STARTTLS",
    Point.CLIENT_HELLO.value: "c2s: the record carrying the ClientHello",
    Point.SERVER_HELLO.value: "s2c: the record carrying the ServerHello",
    Point.HANDSHAKE_DONE.value: "the first application record of a TLS session, each way",
    Point.APPLICATION_DATA.value: "every application record (use nth= to pick one)",
    Point.STOPTLS_COMMAND.value: "c2s: the record carrying STOPTLS (TLS 1.3 with a key log only)",
    Point.STOPTLS_REPLY.value: "s2c: the record answering STOPTLS (TLS 1.3 with a key log only)",
    Point.CLOSE_NOTIFY.value: "the record carrying a close_notify alert, each way",
    Point.AFTER_CLOSE_NOTIFY.value: "the next unit after a close_notify in the same direction",
    Point.PLAINTEXT_IN_TLS.value: "a plaintext line while TLS is up in that direction",
    Point.FIRST_PLAINTEXT_AFTER_TLS.value: "the first plaintext line after a direction's TLS",
    Point.PLAINTEXT.value: "every plaintext line",
    Point.RECORD.value: "every TLS record",
    Point.EOF.value: "the sender's FIN",
    Point.RESET.value: "the sender's RST (or a socket error)",
}

METHOD_RECORD_TYPE = "record-type"
METHOD_KEYLOG = "keylog"
METHOD_POSITION = "position"
#: How a TLS record was classified (the ``method`` of events).
METHODS = (METHOD_RECORD_TYPE, METHOD_KEYLOG, METHOD_POSITION)

# Unit kinds: what the follower cut from a stream.
UNIT_PLAINTEXT = "plaintext"
UNIT_RECORD = "record"
UNIT_FRAGMENT = "fragment"  # incomplete line or record flushed at EOF / on a timer
UNIT_EOF = "eof"
UNIT_RESET = "reset"
UNIT_NOTE = "note"  # a classification learnt later; nothing to relay

# Event kinds added by the shell.
EV_FAULT = "fault"
EV_INJECTED = "injected"
EV_SENT = "sent"
EV_FIN_SENT = "fin-sent"
EV_RST_SENT = "rst-sent"
EV_CONNECT = "connect"
EV_ERROR = "error"
EV_CLOSED = "closed"

PHASE_PLAINTEXT = "plaintext"
PHASE_STARTTLS = "starttls-requested"
PHASE_TLS = "tls"
PHASE_CLOSING = "closing"

_HS_NAMES = {
    0: "hello_request",
    1: "client_hello",
    2: "server_hello",
    4: "new_session_ticket",
    5: "end_of_early_data",
    8: "encrypted_extensions",
    11: "certificate",
    12: "server_key_exchange",
    13: "certificate_request",
    14: "server_hello_done",
    15: "certificate_verify",
    16: "client_key_exchange",
    20: "finished",
    24: "key_update",
}
_HS_CLIENT_HELLO = 1
_HS_SERVER_HELLO = 2
# AEAD tag length by TLS 1.3 suite (TLS_AES_128_CCM_8_SHA256 has 8 bytes).
_TAG_LENGTH = {0x1305: 8}
# Records waiting for key log secrets before the key log is declared useless.
_MAX_PENDING = 32
_PENDING = "protected record, classification pending (key log has no secret yet)"


def _other(direction: str) -> str:
    return S2C if direction == C2S else C2S


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'c2s' or 's2c', not {direction!r}")


# ------------------------------------------------------------------- dialects


class _Dialect:
    """How the follower reads the few plaintext commands and answers it needs."""

    name = ""

    def command(self, line: bytes, verb: bytes) -> Optional[str]:
        """The tag if ``line`` is the ``verb`` command (``""`` for SMTP), else None."""
        raise NotImplementedError

    def answer(self, line: bytes, tag: str) -> Optional[bool]:
        """None if ``line`` is not the final answer line, else whether it says yes."""
        raise NotImplementedError


class _Smtp(_Dialect):
    name = "smtp"

    def command(self, line: bytes, verb: bytes) -> Optional[str]:
        return "" if line.strip().upper() == verb else None

    def answer(self, line: bytes, tag: str) -> Optional[bool]:
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b" ", b"\r", b"\n", b""):
            return None
        return line[:3] == b"220"


class _Imap(_Dialect):
    name = "imap"

    def command(self, line: bytes, verb: bytes) -> Optional[str]:
        parts = line.split()
        if len(parts) == 2 and parts[1].upper() == verb and parts[0] not in (b"*", b"+"):
            return parts[0].decode("latin-1")
        return None

    def answer(self, line: bytes, tag: str) -> Optional[bool]:
        parts = line.split(None, 2)
        if not parts or parts[0].decode("latin-1") != tag:
            return None
        return len(parts) > 1 and parts[1].upper() == b"OK"


_DIALECTS: Dict[str, _Dialect] = {"smtp": _Smtp(), "imap": _Imap()}
_STARTTLS = b"STARTTLS"
_STOPTLS = b"STOPTLS"


# ----------------------------------------------------------------- follower


@dataclass(frozen=True)
class Unit:
    """One thing the follower cut from a direction's stream.

    ``points`` are the :class:`Point` names the unit marks, most specific
    first; ``method`` says how a TLS record was classified; ``phase`` is the
    connection's phase when the unit arrived.  Notes (``kind == "note"``)
    carry classifications learnt after the fact and nothing to relay.
    """

    index: int
    direction: str
    kind: str
    data: bytes = b""
    points: Tuple[str, ...] = ()
    detail: str = ""
    method: str = ""
    phase: str = ""

    @property
    def point(self) -> str:
        return self.points[0] if self.points else ""

    @property
    def relayable(self) -> bool:
        return self.kind != UNIT_NOTE


@dataclass
class _SessionDir:
    """One direction of one TLS session."""

    records: int = 0
    protected: int = 0  # TLS 1.3 records with outer type 23
    hello_seen: bool = False
    app_seen: bool = False
    closed: bool = False
    last_record: Optional[int] = None  # unit index
    last_app_record: Optional[int] = None
    pending: Deque[int] = field(default_factory=collections.deque)


class _Session:
    """One TLS session (STARTTLS ... closure) on the connection."""

    def __init__(self, number: int, secrets: Union[SecretsProvider, SecretsMapping, None]) -> None:
        self.number = number
        self.keylog_given = secrets is not None
        self.keylog_ok = secrets is not None
        self.tls = Tls13Follower(secrets if secrets is not None else {})
        self.dirs: Dict[str, _SessionDir] = {d: _SessionDir() for d in DIRECTIONS}
        self.stoptls_tag: Optional[str] = None
        self.stoptls_reply_seen = False
        self.first_closer: Optional[str] = None
        self.server_app_before_client_close: Optional[int] = None

    @property
    def version(self) -> Optional[int]:
        return self.tls.version

    @property
    def is13(self) -> bool:
        return self.version is not None and self.version >= TLS13_VERSION

    @property
    def method(self) -> str:
        if self.version is None:
            return ""
        if not self.is13:
            return METHOD_RECORD_TYPE
        return METHOD_KEYLOG if self.keylog_ok else METHOD_POSITION

    @property
    def tag_length(self) -> int:
        return _TAG_LENGTH.get(self.tls.cipher_suite or 0, 16)

    @property
    def ended(self) -> bool:
        return all(d.closed for d in self.dirs.values())


class Follower:
    """Follow one proxied connection in both directions (sans-I/O).

    :meth:`feed` takes the bytes of one direction as they arrive and returns
    the :class:`Unit` objects completed by them, in order; :meth:`feed_eof`
    and :meth:`feed_reset` report the end of a direction.  ``keylog`` is a
    key log path, a secrets provider or a mapping (see
    :mod:`starttls_harness.tls.keylog`); without it TLS 1.3 is followed by position.
    """

    def __init__(
        self,
        dialect: str = "smtp",
        keylog: Union[str, os.PathLike[str], SecretsProvider, SecretsMapping, None] = None,
        *,
        max_line: int = 65536,
    ) -> None:
        try:
            self.dialect = _DIALECTS[dialect]
        except KeyError:
            raise ValueError(
                f"unknown dialect {dialect!r}; choose one of {', '.join(sorted(_DIALECTS))}"
            ) from None
        self._secrets: Union[SecretsProvider, SecretsMapping, None]
        if isinstance(keylog, (str, os.PathLike)):
            self._secrets = keylog_file_provider(keylog)
        else:
            self._secrets = keylog
        self.max_line = max_line
        self._buffers: Dict[str, bytearray] = {d: bytearray() for d in DIRECTIONS}
        self._ended: Dict[str, bool] = {d: False for d in DIRECTIONS}
        self._index = 0
        self._starttls_tag: Optional[str] = None
        self.session: Optional[_Session] = None
        self._last_session: Optional[_Session] = None
        #: Completed TLS sessions (both close_notify alerts seen).
        self.cycles = 0
        self._sessions = 0
        self._after_close: Dict[str, bool] = {d: False for d in DIRECTIONS}
        self._first_plain_after: Dict[str, bool] = {d: False for d in DIRECTIONS}
        self._retro_stoptls: Optional[Tuple[str, str]] = None  # (text, method)

    # --------------------------------------------------------------- state

    @property
    def phase(self) -> str:
        if self.session is None:
            return PHASE_STARTTLS if self._starttls_tag is not None else PHASE_PLAINTEXT
        if any(d.closed for d in self.session.dirs.values()):
            return PHASE_CLOSING
        return PHASE_TLS

    @property
    def method(self) -> str:
        """How the current (or last) TLS session's records are classified."""
        session = self.session or self._last_session
        return session.method if session is not None else ""

    def has_partial_plaintext(self, direction: str) -> bool:
        """True if ``direction`` buffers an incomplete line (not a record)."""
        buf = self._buffers[direction]
        return bool(buf) and check_header(bytes(buf[:HEADER_LEN])) is not None

    # --------------------------------------------------------------- input

    def feed(self, direction: str, data: bytes) -> List[Unit]:
        """Add bytes of ``direction``; return the units they complete."""
        _check_direction(direction)
        if self._ended[direction]:
            raise ValueError(f"{direction} already ended")
        buf = self._buffers[direction]
        buf.extend(data)
        out: List[Unit] = []
        while buf:
            reason = check_header(bytes(buf[:HEADER_LEN]))
            if reason is None:
                if len(buf) < HEADER_LEN:
                    break
                size = HEADER_LEN + struct.unpack_from("!H", buf, 3)[0]
                if len(buf) < size:
                    break
                raw = bytes(buf[:size])
                del buf[:size]
                record = Record(raw[0], (raw[1] << 8) | raw[2], raw[HEADER_LEN:], raw)
                out.extend(self._on_record(direction, record))
                continue
            newline = buf.find(b"\n")
            if newline < 0:
                if len(buf) >= self.max_line:
                    chunk = bytes(buf[: self.max_line])
                    del buf[: self.max_line]
                    out.extend(
                        self._on_plaintext(
                            direction, chunk, f"line longer than {self.max_line} bytes, cut"
                        )
                    )
                    continue
                break
            line = bytes(buf[: newline + 1])
            del buf[: newline + 1]
            out.extend(self._on_plaintext(direction, line))
        return out

    def flush(self, direction: str) -> List[Unit]:
        """Hand out an incomplete plaintext line (never half a record)."""
        if not self.has_partial_plaintext(direction):
            return []
        buf = self._buffers[direction]
        data = bytes(buf)
        buf.clear()
        return self._on_plaintext(direction, data, "incomplete line (no line end yet)")

    def feed_eof(self, direction: str) -> List[Unit]:
        """The sender of ``direction`` closed its side (TCP FIN)."""
        return self._end(direction, UNIT_EOF)

    def feed_reset(self, direction: str) -> List[Unit]:
        """The sender of ``direction`` reset the connection (or its socket failed)."""
        return self._end(direction, UNIT_RESET)

    # ----------------------------------------------------------- internals

    def _unit(
        self,
        direction: str,
        kind: str,
        data: bytes = b"",
        points: Sequence[str] = (),
        detail: str = "",
        method: str = "",
        phase: Optional[str] = None,
    ) -> Unit:
        self._index += 1
        return Unit(
            self._index,
            direction,
            kind,
            bytes(data),
            tuple(points),
            detail,
            method,
            self.phase if phase is None else phase,
        )

    def _take_after_close(self, direction: str, points: List[str]) -> None:
        if self._after_close[direction]:
            self._after_close[direction] = False
            points.append(Point.AFTER_CLOSE_NOTIFY.value)

    def _end(self, direction: str, kind: str) -> List[Unit]:
        _check_direction(direction)
        if self._ended[direction]:
            return []
        out: List[Unit] = []
        buf = self._buffers[direction]
        if buf:
            data = bytes(buf)
            buf.clear()
            what = "record" if check_header(data[:HEADER_LEN]) is None else "line"
            points: List[str] = []
            self._take_after_close(direction, points)
            out.append(
                self._unit(
                    direction,
                    UNIT_FRAGMENT,
                    data,
                    points,
                    f"incomplete {what} ({len(data)} bytes) before {kind.upper()}",
                )
            )
        self._ended[direction] = True
        phase = self.phase
        points = [Point.EOF.value if kind == UNIT_EOF else Point.RESET.value]
        self._take_after_close(direction, points)
        detail = "FIN" if kind == UNIT_EOF else "RST or socket error"
        method = ""
        session = self.session
        if session is not None:
            sd = session.dirs[direction]
            if sd.closed:
                detail += " after this direction's close_notify"
            elif sd.records == 0:
                detail += " after STARTTLS, before any TLS record in this direction"
            elif session.method == METHOD_POSITION:
                method = METHOD_POSITION
                detail += (
                    f" after TLS records; whether the last one (#{sd.last_record}) was "
                    "close_notify cannot be told without a key log (position)"
                )
            else:
                method = session.method
                detail += " while TLS is up, without close_notify in this direction: truncation"
        self._retro_stoptls = None
        out.append(self._unit(direction, kind, b"", points, detail, method, phase))
        return out

    # plaintext

    def _on_plaintext(self, direction: str, line: bytes, note: str = "") -> List[Unit]:
        out: List[Unit] = []
        phase = self.phase
        points: List[str] = []
        details: List[str] = [note] if note else []
        session = self.session
        if session is not None:
            sd = session.dirs[direction]
            if sd.records and not sd.closed:
                if session.method == METHOD_POSITION:
                    out.append(
                        self._mark_closed(
                            session,
                            direction,
                            f"close_notify inferred by position: record #{sd.last_record} was the "
                            f"last {direction} record before plaintext (cannot be told from "
                            "plaintext injected after application data without a key log)",
                        )
                    )
                    phase = self.phase
                else:
                    points.append(Point.PLAINTEXT_IN_TLS.value)
                    details.append(
                        "plaintext while TLS is up in this direction (no close_notify seen)"
                    )
            elif sd.records == 0 and not sd.closed:
                details.append(
                    "plaintext after the STARTTLS answer, before any TLS record in this direction"
                )
            if sd.closed and not session.dirs[_other(direction)].closed:
                details.append(
                    "plaintext after this direction's close_notify, before the peer's "
                    "(one-sided closure)"
                )
        if self._first_plain_after[direction] and Point.PLAINTEXT_IN_TLS.value not in points:
            self._first_plain_after[direction] = False
            points.append(Point.FIRST_PLAINTEXT_AFTER_TLS.value)
        if self.session is None and self._retro_stoptls is not None:
            text, method = self._retro_stoptls
            self._retro_stoptls = None
            out.append(self._unit(S2C, UNIT_NOTE, b"", (Point.STOPTLS_REPLY.value,), text, method))
        if self.session is None:
            if direction == C2S:
                tag = self.dialect.command(line, _STARTTLS)
                if self._starttls_tag is None and tag is not None:
                    self._starttls_tag = tag
                    points.insert(0, Point.STARTTLS_COMMAND.value)
                elif self._starttls_tag is not None:
                    details.append("pipelined after STARTTLS, before its answer")
            elif self._starttls_tag is not None:
                answer = self.dialect.answer(line, self._starttls_tag)
                if answer is True:
                    points.insert(0, Point.STARTTLS_REPLY.value)
                    self._start_session()
                elif answer is False:
                    details.append("STARTTLS refused")
                    self._starttls_tag = None
        self._take_after_close(direction, points)
        points.append(Point.PLAINTEXT.value)
        out.append(
            self._unit(direction, UNIT_PLAINTEXT, line, points, "; ".join(details), "", phase)
        )
        return out

    def _start_session(self) -> _Session:
        self._sessions += 1
        self.session = _Session(self._sessions, self._secrets)
        self._starttls_tag = None
        self._retro_stoptls = None
        return self.session

    # records

    def _on_record(self, direction: str, record: Record) -> List[Unit]:
        out: List[Unit] = []
        phase = self.phase
        session = self.session
        notes: List[str] = []
        if session is None:
            session = self._start_session()
            notes.append("TLS record without a STARTTLS exchange: new TLS session")
        sd = session.dirs[direction]
        if sd.closed:
            notes.append("record after this direction's close_notify")
        sd.records += 1
        points: List[str] = []
        protected = session.is13 and record.content_type == CT_APPLICATION_DATA
        if protected:
            sd.protected += 1
        if session.is13 and not session.keylog_ok:
            desc, method = self._without_keylog(session, direction, record, points)
        else:
            desc, method = self._with_follower(session, direction, record, points, out)
        # Numbered after any note its classification produced, so that
        # indices follow the order of the units.
        self._index += 1
        index = self._index
        sd.last_record = index
        if Point.APPLICATION_DATA.value in points:
            sd.last_app_record = index
        if desc.endswith(_PENDING):
            sd.pending.append(index)
        if self._first_plain_after[direction]:
            self._first_plain_after[direction] = False  # TLS again before any plaintext
        self._take_after_close(direction, points)
        points.append(Point.RECORD.value)
        if Point.CLOSE_NOTIFY.value in points:
            self._after_close[direction] = True
        detail = "; ".join([*notes, f"{desc} ({len(record.raw)} bytes)"] if desc else notes)
        unit = Unit(index, direction, UNIT_RECORD, record.raw, tuple(points), detail, method, phase)
        out.append(unit)
        if Point.CLOSE_NOTIFY.value in points:
            self._after_closed(session, direction)
        return out

    def _without_keylog(
        self, session: _Session, direction: str, record: Record, points: List[str]
    ) -> Tuple[str, str]:
        """TLS 1.3 without usable secrets: clear records are read, protected
        ones placed by position."""
        if record.content_type == CT_APPLICATION_DATA:
            return self._by_position(session, direction, record, points)
        clear = FollowedRecord(direction, record, record.content_type, record.payload, False)
        return self._classify(session, direction, clear, points)

    def _with_follower(
        self,
        session: _Session,
        direction: str,
        record: Record,
        points: List[str],
        out: List[Unit],
    ) -> Tuple[str, str]:
        """Classify through :class:`Tls13Follower` (TLS 1.2, or 1.3 with a key log)."""
        tls = session.tls
        try:
            if session.keylog_ok and any(tls.pending(d) for d in DIRECTIONS):
                for late in tls.poll():
                    out.extend(self._late(session, late))
            results = tls.feed(direction, record)
        except KeylogError as exc:
            out.append(self._give_up_keylog(session, direction, str(exc)))
            if session.is13:
                return self._without_keylog(session, direction, record, points)
            return f"{content_type_name(record.content_type)} record (not classified)", ""
        followed: Optional[FollowedRecord] = None
        for result in results:
            if result.record is record:
                followed = result
            else:
                out.extend(self._late(session, result))
        if followed is not None:
            return self._classify(session, direction, followed, points)
        # Queued until the key log has its secret.  A client logs its secrets
        # before it sends Finished, so a second client record still waiting
        # means the key log does not have this connection.
        if tls.pending(C2S) >= 2 or tls.pending(C2S) + tls.pending(S2C) > _MAX_PENDING:
            out.append(
                self._give_up_keylog(
                    session, direction, "key log has no secrets for this connection's records"
                )
            )
            return self._without_keylog(session, direction, record, points)
        return _PENDING, METHOD_KEYLOG

    def _classify(
        self, session: _Session, direction: str, fr: FollowedRecord, points: List[str]
    ) -> Tuple[str, str]:
        """Describe a record the TLS follower classified; add its points."""
        record = fr.record
        sd = session.dirs[direction]
        if not fr.encrypted:
            method = METHOD_RECORD_TYPE
            if record.content_type == CT_HANDSHAKE and record.payload:
                msg = record.payload[0]
                hello = _HS_CLIENT_HELLO if direction == C2S else _HS_SERVER_HELLO
                if msg == hello and not sd.hello_seen:
                    sd.hello_seen = True
                    points.append(
                        Point.CLIENT_HELLO.value if direction == C2S else Point.SERVER_HELLO.value
                    )
                return f"handshake: {_HS_NAMES.get(msg, str(msg))}", method
            if record.content_type == CT_CHANGE_CIPHER_SPEC:
                return "change_cipher_spec", method
            alert = fr.alert
            if alert is not None:
                if alert[1] == CLOSE_NOTIFY:
                    points.append(Point.CLOSE_NOTIFY.value)
                return f"clear alert: {alert_description_name(alert[1])}", method
            return f"clear {content_type_name(record.content_type)} record", method
        method = session.method
        ctype = fr.content_type
        if ctype == CT_APPLICATION_DATA:
            self._app_record(session, direction, points)
            desc = "application data" + (" (decrypted)" if fr.decrypted else "")
            if fr.plaintext is not None:
                self._stoptls(session, direction, fr.plaintext, points)
            return desc, method
        if ctype == CT_HANDSHAKE:
            if fr.plaintext:
                name = _HS_NAMES.get(fr.plaintext[0], str(fr.plaintext[0]))
                return f"protected handshake: {name}", method
            return "protected handshake (Finished)", method
        if ctype == CT_ALERT:
            if fr.close_notify_assumed:
                points.append(Point.CLOSE_NOTIFY.value)
                return (
                    "encrypted alert after ChangeCipherSpec: assumed close_notify (TLS 1.2 "
                    "cannot tell it from a fatal alert by the record type)",
                    method,
                )
            alert = fr.alert
            if alert is not None and alert[1] == CLOSE_NOTIFY:
                points.append(Point.CLOSE_NOTIFY.value)
                return "alert: close_notify (decrypted)", method
            name = alert_description_name(alert[1]) if alert is not None else "unreadable"
            return f"alert: {name} (decrypted; not a closure)", method
        return f"protected {content_type_name(ctype)}", method

    def _by_position(
        self, session: _Session, direction: str, record: Record, points: List[str]
    ) -> Tuple[str, str]:
        """TLS 1.3 protected record without a key log: order and size only."""
        sd = session.dirs[direction]
        if direction == C2S:
            post = sd.protected >= 2
            if not post:
                return "protected record, by position the client's Finished", METHOD_POSITION
        else:
            post = session.dirs[C2S].protected >= 1
            if not post:
                return (
                    "protected record, by position the server's handshake flight",
                    METHOD_POSITION,
                )
        if len(record.payload) == 3 + session.tag_length:
            points.append(Point.CLOSE_NOTIFY.value)
            return (
                f"protected record of {len(record.payload)} bytes, the size of an encrypted "
                "2-byte alert: close_notify assumed (position; a 2-byte application record "
                "looks the same)",
                METHOD_POSITION,
            )
        self._app_record(session, direction, points)
        what = "application data" if direction == C2S else "application data or NewSessionTicket"
        return f"protected record after the handshake, by position {what}", METHOD_POSITION

    def _app_record(self, session: _Session, direction: str, points: List[str]) -> None:
        sd = session.dirs[direction]
        if not sd.app_seen:
            sd.app_seen = True
            points.append(Point.HANDSHAKE_DONE.value)
        points.append(Point.APPLICATION_DATA.value)

    def _stoptls(
        self, session: _Session, direction: str, plaintext: bytes, points: List[str]
    ) -> None:
        """Read STOPTLS and its answer in decrypted application data."""
        for line in plaintext.splitlines(keepends=True):
            if direction == C2S:
                tag = self.dialect.command(line, _STOPTLS)
                if tag is not None:
                    session.stoptls_tag = tag
                    points.insert(0, Point.STOPTLS_COMMAND.value)
                    return
            elif session.stoptls_tag is not None and not session.stoptls_reply_seen:
                if self.dialect.answer(line, session.stoptls_tag):
                    session.stoptls_reply_seen = True
                    points.insert(0, Point.STOPTLS_REPLY.value)
                    return

    def _late(self, session: _Session, fr: FollowedRecord) -> List[Unit]:
        """A record that waited for key log secrets got classified."""
        sd = session.dirs[fr.direction]
        index = sd.pending.popleft() if sd.pending else 0
        points: List[str] = []
        desc, method = self._classify(session, fr.direction, fr, points)
        if Point.APPLICATION_DATA.value in points:
            sd.last_app_record = index
        text = f"record #{index} classified late: {desc}"
        if points:
            text += f" (points {', '.join(points)} passed before it was known)"
        unit = self._unit(fr.direction, UNIT_NOTE, b"", points, text, method)
        out = [unit]
        if Point.CLOSE_NOTIFY.value in points:
            self._after_closed(session, fr.direction)
        return out

    def _give_up_keylog(self, session: _Session, direction: str, why: str) -> Unit:
        session.keylog_ok = False
        for sd in session.dirs.values():
            sd.pending.clear()
        text = f"key log not usable for this TLS session ({why}); falling back to position"
        if not session.keylog_given:
            text = f"cannot classify TLS records ({why}); falling back to position"
        return self._unit(direction, UNIT_NOTE, b"", (), text, METHOD_POSITION)

    def _mark_closed(self, session: _Session, direction: str, text: str) -> Unit:
        unit = self._unit(
            direction, UNIT_NOTE, b"", (Point.CLOSE_NOTIFY.value,), text, METHOD_POSITION
        )
        self._after_closed(session, direction)
        return unit

    def _after_closed(self, session: _Session, direction: str) -> None:
        """``direction``'s close_notify has passed (seen or inferred)."""
        sd = session.dirs[direction]
        if sd.closed:
            return
        sd.closed = True
        self._first_plain_after[direction] = True
        if session.first_closer is None:
            session.first_closer = direction
            if direction == C2S:
                session.server_app_before_client_close = session.dirs[S2C].last_app_record
        if session.ended:
            self.cycles += 1
            self._last_session = session
            self.session = None
            if (
                session.first_closer == C2S
                and not session.stoptls_reply_seen
                and session.server_app_before_client_close is not None
            ):
                self._retro_stoptls = (
                    f"record #{session.server_app_before_client_close} was presumably the "
                    "STOPTLS answer: the last s2c application record before the client's "
                    "close_notify, and plaintext resumed (inferred after the fact)",
                    session.method,
                )


# --------------------------------------------------------------------- faults

ACTION_INJECT = "inject"
ACTION_DROP = "drop"
ACTION_DELAY = "delay"
ACTION_DUPLICATE = "duplicate"
ACTION_FIN = "fin"
ACTION_RST = "rst"
ACTION_SPLIT = "split"
ACTION_COALESCE = "coalesce"
ACTION_CORRUPT = "corrupt"

#: Every fault action with what it does to the unit it hits.
ACTIONS: Dict[str, str] = {
    ACTION_INJECT: "write data before/after the unit, in its segment or as a separate write",
    ACTION_DROP: "do not relay the unit (data, if given, is written in its place)",
    ACTION_DELAY: "hold this direction for `delay` seconds before the unit",
    ACTION_DUPLICATE: "write the unit twice (two writes)",
    ACTION_FIN: "send FIN to the receiver instead of the unit; relay nothing more this way",
    ACTION_RST: "send RST to the receiver instead of the unit; close the sender",
    ACTION_SPLIT: "write the unit in two writes, cut after `split_at` bytes",
    ACTION_COALESCE: "write the unit in one write together with the next unit",
    ACTION_CORRUPT: "flip bits: a record's last byte (its MAC/tag), a line's first byte",
}


@dataclass(frozen=True)
class Fault:
    """One fault: at the ``nth`` unit of ``direction`` that marks point ``at``,
    do ``action``.

    ``data`` is what ``inject`` writes (and what replaces a dropped unit);
    ``same_segment`` puts injected bytes in the unit's own write;
    ``before`` injects ahead of the unit instead of after it; ``delay`` is
    the hold of ``delay`` (and the bound of ``coalesce``'s wait for a next
    unit; 0 means 1 s); ``split_at`` the cut of ``split`` (negative counts
    from the end).  ``name`` is the ready-made name it came from, if any.
    """

    direction: str
    at: str
    action: str
    data: bytes = b""
    same_segment: bool = True
    delay: float = 0.0
    split_at: int = 1
    nth: int = 1
    before: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"fault direction must be c2s or s2c, not {self.direction!r}")
        if self.at not in POINTS:
            raise ValueError(
                f"unknown protocol point {self.at!r}; valid points: {', '.join(POINTS)}"
            )
        if self.action not in ACTIONS:
            raise ValueError(
                f"unknown fault action {self.action!r}; valid actions: {', '.join(ACTIONS)}"
            )
        if self.nth < 1:
            raise ValueError("nth counts from 1")
        if self.delay < 0:
            raise ValueError("delay must not be negative")
        if self.action == ACTION_INJECT and not self.data:
            raise ValueError("an inject fault needs data")

    def __str__(self) -> str:
        text = f"{self.action}@{self.at}:{self.direction}"
        if self.nth != 1:
            text += f":nth={self.nth}"
        if self.action in (ACTION_DELAY, ACTION_COALESCE) and self.delay:
            text += f":delay={self.delay:g}"
        if self.action == ACTION_SPLIT:
            text += f":split_at={self.split_at}"
        if self.before:
            text += ":before=yes"
        if self.action == ACTION_INJECT and not self.same_segment:
            text += ":same_segment=no"
        if self.data:
            text += f":data={_escape(self.data)}"
        return text


@dataclass(frozen=True)
class _Preset:
    description: str
    action: str
    at: Union[str, Mapping[str, str]]
    direction: Optional[str] = None  # fixed or default direction
    fixed: bool = False
    data: Mapping[str, bytes] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)


_INJECT_DATA = {C2S: b"NOOP\r\n", S2C: b"220 injected\r\n"}
_TWO_WAY = None  # direction required

_PRESETS: Dict[str, _Preset] = {
    "drop-close-notify": _Preset(
        "drop the close_notify (data=... is written in its place)",
        ACTION_DROP,
        Point.CLOSE_NOTIFY.value,
    ),
    "delay-close-notify": _Preset(
        "hold the close_notify for delay= seconds (default 0.2)",
        ACTION_DELAY,
        Point.CLOSE_NOTIFY.value,
        options={"delay": 0.2},
    ),
    "duplicate-close-notify": _Preset(
        "send the close_notify record twice", ACTION_DUPLICATE, Point.CLOSE_NOTIFY.value
    ),
    "split-close-notify": _Preset(
        "send the close_notify record in two writes", ACTION_SPLIT, Point.CLOSE_NOTIFY.value
    ),
    "coalesce-close-notify": _Preset(
        "send the close_notify and the next unit in one write",
        ACTION_COALESCE,
        Point.CLOSE_NOTIFY.value,
    ),
    "inject-after-close": _Preset(
        "inject plaintext (data=) in the same segment right after the close_notify",
        ACTION_INJECT,
        Point.CLOSE_NOTIFY.value,
        C2S,
        data=_INJECT_DATA,
    ),
    "inject-after-starttls": _Preset(
        "c2s: plaintext in the STARTTLS segment; s2c: an extra line after the STARTTLS answer",
        ACTION_INJECT,
        {C2S: Point.STARTTLS_COMMAND.value, S2C: Point.STARTTLS_REPLY.value},
        C2S,
        data={C2S: b"NOOP\r\n", S2C: b"250 injected\r\n"},
    ),
    "inject-in-tls": _Preset(
        "plaintext (data=) as a separate segment before the first application record",
        ACTION_INJECT,
        Point.HANDSHAKE_DONE.value,
        data=_INJECT_DATA,
        options={"same_segment": False, "before": True},
    ),
    "truncate": _Preset(
        "FIN to the receiver instead of the first application record (TLS up, no close_notify)",
        ACTION_FIN,
        Point.HANDSHAKE_DONE.value,
    ),
    "reset": _Preset(
        "RST to the receiver instead of the first application record",
        ACTION_RST,
        Point.HANDSHAKE_DONE.value,
    ),
    "corrupt": _Preset(
        "flip the last byte (MAC/tag) of the first application record",
        ACTION_CORRUPT,
        Point.HANDSHAKE_DONE.value,
    ),
    "duplicate-record": _Preset(
        "send the first application record twice (a replay)",
        ACTION_DUPLICATE,
        Point.HANDSHAKE_DONE.value,
    ),
    "drop-fin": _Preset("do not relay the sender's FIN", ACTION_DROP, Point.EOF.value),
    "delay-fin": _Preset(
        "hold the sender's FIN for delay= seconds (default 0.2)",
        ACTION_DELAY,
        Point.EOF.value,
        options={"delay": 0.2},
    ),
    "split-client-hello": _Preset(
        "send the ClientHello record in two writes (split_at=, default 1)",
        ACTION_SPLIT,
        Point.CLIENT_HELLO.value,
        C2S,
        fixed=True,
    ),
    "split-starttls": _Preset(
        "send the STARTTLS command line in two writes",
        ACTION_SPLIT,
        Point.STARTTLS_COMMAND.value,
        C2S,
        fixed=True,
        options={"split_at": 4},
    ),
    "coalesce-starttls-reply": _Preset(
        "send the STARTTLS answer together with the server's next unit",
        ACTION_COALESCE,
        Point.STARTTLS_REPLY.value,
        S2C,
        fixed=True,
    ),
}


def _fault_names() -> Dict[str, str]:
    names: Dict[str, str] = {}
    for name, preset in _PRESETS.items():
        if preset.fixed:
            names[name] = f"{preset.description} ({preset.direction})"
            continue
        default = f"; default {preset.direction}" if preset.direction else "; needs :c2s or :s2c"
        names[name] = preset.description + default
        for direction in DIRECTIONS:
            names[f"{name}-{direction}"] = f"{name} in direction {direction}"
    return names


#: Ready-made fault names (with -c2s/-s2c forms) and what each does.  Any
#: ``ACTION@POINT`` (see :data:`ACTIONS`, :data:`POINTS`) is accepted too.
FAULT_NAMES: Dict[str, str] = _fault_names()

_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


def _unescape(text: str) -> bytes:
    """``\\r``, ``\\n``, ``\\t``, ``\\\\`` and ``\\xNN`` in a command-line value."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\" or i + 1 == len(text):
            out += ch.encode("utf-8")
            i += 1
            continue
        nxt = text[i + 1]
        simple = {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\", "0": b"\0"}
        if nxt in simple:
            out += simple[nxt]
            i += 2
        elif nxt == "x" and i + 4 <= len(text):
            try:
                out.append(int(text[i + 2 : i + 4], 16))
            except ValueError:
                raise ValueError(f"bad \\x escape in {text!r}") from None
            i += 4
        else:
            raise ValueError(f"unknown escape \\{nxt} in {text!r}")
    return bytes(out)


def _escape(data: bytes) -> str:
    out = []
    for byte in data:
        ch = chr(byte)
        if ch == "\r":
            out.append("\\r")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\\":
            out.append("\\\\")
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def _valid_names_message() -> str:
    return (
        "valid fault names: "
        + ", ".join(FAULT_NAMES)
        + "; or ACTION@POINT with ACTION in "
        + ", ".join(ACTIONS)
        + " and POINT in "
        + ", ".join(POINTS)
    )


def parse_fault(text: str) -> Fault:
    """Read a fault from its command-line form.

    ``NAME[:c2s|:s2c][:key=value]...`` where NAME is one of
    :data:`FAULT_NAMES` (``drop-close-notify-c2s``, ``truncate:s2c``...) or
    ``ACTION@POINT`` (``delay@close-notify:s2c:delay=0.5``).  Keys: ``data``
    (escapes ``\\r \\n \\t \\\\ \\xNN``; always last, it takes the rest of
    the text, colons included), ``at``, ``nth``, ``delay``, ``split_at``,
    ``same_segment``, ``before``.  Raises ValueError naming what is valid.
    """
    text = text.strip()
    data: Optional[bytes] = None
    marker = text.find(":data=")
    if marker >= 0:
        data = _unescape(text[marker + len(":data=") :])
        text = text[:marker]
    head, *options = text.split(":")
    direction: Optional[str] = None
    values: Dict[str, str] = {}
    for option in options:
        if option in DIRECTIONS:
            if direction is not None and direction != option:
                raise ValueError(f"fault {head!r} given two directions")
            direction = option
        elif "=" in option:
            key, value = option.split("=", 1)
            values[key.strip().replace("-", "_")] = value.strip()
        elif option:
            raise ValueError(
                f"bad fault option {option!r} in {text!r}: expected c2s, s2c or key=value"
            )
    base = head
    for suffix in DIRECTIONS:
        if head.endswith("-" + suffix) and head[: -len(suffix) - 1] in _PRESETS:
            if direction is not None and direction != suffix:
                raise ValueError(f"fault {head!r} given two directions")
            base, direction = head[: -len(suffix) - 1], suffix
    kwargs: Dict[str, Any] = {}
    if "@" in base:
        action, _, at = base.partition("@")
        if action not in ACTIONS or at not in POINTS:
            raise ValueError(f"unknown fault {head!r}; {_valid_names_message()}")
        if direction is None:
            raise ValueError(f"fault {head!r} needs a direction: add :c2s or :s2c")
        name = ""
    else:
        preset = _PRESETS.get(base)
        if preset is None:
            raise ValueError(f"unknown fault {head!r}; {_valid_names_message()}")
        if preset.fixed and direction not in (None, preset.direction):
            raise ValueError(f"fault {base!r} only exists for {preset.direction}")
        direction = direction or preset.direction
        if direction is None:
            raise ValueError(
                f"fault {base!r} needs a direction: add :c2s or :s2c "
                f"(or use {base}-c2s / {base}-s2c)"
            )
        action = preset.action
        at = preset.at if isinstance(preset.at, str) else preset.at[direction]
        kwargs.update(preset.options)
        if data is None and direction in preset.data:
            data = preset.data[direction]
        name = base if preset.fixed else f"{base}-{direction}"
    for key, value in values.items():
        try:
            if key == "at":
                at = value
            elif key in ("nth", "split_at"):
                kwargs[key] = int(value)
            elif key == "delay":
                kwargs[key] = float(value)
            elif key in ("same_segment", "before"):
                if value.lower() not in _TRUE | _FALSE:
                    raise ValueError(f"{key} takes yes or no, not {value!r}")
                kwargs[key] = value.lower() in _TRUE
            else:
                raise ValueError(
                    f"unknown fault option {key!r}; options: data, at, nth, delay, split_at, "
                    "same_segment, before"
                )
        except ValueError as exc:
            raise ValueError(f"fault {head!r}: {exc}") from None
    return Fault(direction, at, action, data or b"", name=name, **kwargs)


# ---------------------------------------------------------------- the shell


@dataclass(frozen=True)
class ProxyEvent:
    """One entry of a connection's evidence log.

    ``time`` is seconds since the connection was accepted.  ``kind`` is a
    unit kind (``plaintext``, ``record``, ``fragment``, ``eof``, ``reset``,
    ``note``: what the sender sent, as received) or a shell kind
    (``fault``, ``injected``, ``sent``: one write to the receiver,
    ``fin-sent``, ``rst-sent``, ``connect``, ``error``, ``closed``).
    ``action`` names the fault action applied to a unit (``discarded`` when a
    unit arrived after the proxy ended its direction).
    """

    time: float
    direction: str
    kind: str
    point: str = ""
    detail: str = ""
    data: bytes = b""
    method: str = ""
    points: Tuple[str, ...] = ()
    index: int = 0
    action: str = ""
    connection: int = 0


class EventNotSeen(LookupError):
    """The connection ended before an awaited event happened."""


def format_event(event: ProxyEvent) -> str:
    """One readable line for ``starttls-harness proxy`` output."""
    where = f"[{event.connection}] {event.time:8.4f}s"
    direction = event.direction or "---"
    parts = [where, direction, event.kind]
    if event.points:
        parts.append(",".join(event.points))
    if event.method:
        parts.append(f"({event.method})")
    if event.action:
        parts.append(f"FAULT {event.action}")
    if event.data:
        if len(event.data) >= HEADER_LEN and check_header(event.data[:HEADER_LEN]) is None:
            parts.append(f"{len(event.data)} bytes")
        else:
            preview = _escape(event.data[:120]) + ("..." if len(event.data) > 120 else "")
            parts.append(f"{len(event.data)} bytes '{preview}'")
    if event.detail:
        parts.append("- " + event.detail)
    return " ".join(parts)


_Op = Tuple[str, Any]


class _Pipe:
    """The writes of one direction, in order, with holds and corks."""

    def __init__(self, conn: ProxyConnection, direction: str) -> None:
        self.conn = conn
        self.direction = direction
        self.queue: Deque[_Op] = collections.deque()
        self.held = False
        self.cork: Optional[bytearray] = None
        self.terminated = False  # a FIN or RST was queued: nothing more goes this way
        self.batching = False  # ops of one unit are queued together, then run
        self.queued_bytes = 0
        self._handles: List[asyncio.TimerHandle] = []

    @property
    def idle(self) -> bool:
        return not self.queue and not self.held and self.cork is None

    def push(self, op: str, arg: Any = None) -> None:
        self.queue.append((op, arg))
        if isinstance(arg, (bytes, bytearray)):
            self.queued_bytes += len(arg)
        if not self.batching:
            self.run()

    def run(self) -> None:
        loop = asyncio.get_running_loop() if self.conn.loop is None else self.conn.loop
        while self.queue and not self.held:
            op, arg = self.queue.popleft()
            if isinstance(arg, (bytes, bytearray)):
                self.queued_bytes -= len(arg)
            if op == "hold":
                self.held = True
                self._handles.append(loop.call_later(float(arg), self._release))
            elif op == "write":
                if self.cork is not None:
                    self.cork += arg
                    self._flush_cork()
                else:
                    self.conn._write(self.direction, bytes(arg))
            elif op == "cork":
                data, bound = arg
                self._flush_cork()
                self.cork = bytearray(data)
                self._handles.append(loop.call_later(bound, self._cork_timeout))
            elif op == "eof":
                self._flush_cork()
                self.conn._send_eof(self.direction)
            elif op == "rst":
                self._flush_cork()
                self.conn._send_rst(self.direction)
        self.conn._pipe_progress(self.direction)

    def _release(self) -> None:
        self.held = False
        self.run()

    def _cork_timeout(self) -> None:
        if self.cork is not None:
            self.conn._note(self.direction, "coalesce: no next unit in time; written alone")
            self._flush_cork()
            self.conn._pipe_progress(self.direction)

    def _flush_cork(self) -> None:
        if self.cork is not None:
            data = bytes(self.cork)
            self.cork = None
            self.conn._write(self.direction, data)

    def cancel(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()
        self.queue.clear()
        self.held = False
        self.cork = None


class _Side(asyncio.Protocol):
    """Protocol of one of the two sockets; ``direction`` is what it sends."""

    def __init__(self, conn: ProxyConnection, direction: str) -> None:
        self.conn = conn
        self.direction = direction
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn._side_made(self)

    def data_received(self, data: bytes) -> None:
        self.conn._on_data(self.direction, data)

    def eof_received(self) -> bool:
        self.conn._on_eof(self.direction)
        return True  # keep the other half open: half-close is relayed as such

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.conn._on_lost(self, exc)

    def pause_writing(self) -> None:
        self.conn._receiver_paused(self.direction, True)

    def resume_writing(self) -> None:
        self.conn._receiver_paused(self.direction, False)


@dataclass(frozen=True)
class _Limits:
    max_connections: int = 16
    max_buffer: int = 1 << 20
    max_line: int = 65536
    connect_timeout: float = 5.0
    idle_timeout: float = 60.0
    partial_timeout: float = 0.5


class ProxyConnection:
    """One proxied connection: its follower, its faults, its evidence log."""

    def __init__(self, proxy: Proxy, number: int) -> None:
        self.proxy = proxy
        self.number = number
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.follower = Follower(proxy.dialect, proxy.keylog, max_line=proxy.limits.max_line)
        self.faults: Tuple[Fault, ...] = tuple(proxy.faults)
        self._hits: Dict[int, int] = {}
        #: The evidence: every unit, fault, injection and write, in order.
        self.events: List[ProxyEvent] = []
        self.client: Optional[_Side] = None
        self.upstream: Optional[_Side] = None
        self._pipes = {d: _Pipe(self, d) for d in DIRECTIONS}
        self._eof_in: Dict[str, bool] = {d: False for d in DIRECTIONS}
        self._lost: Dict[str, bool] = {d: False for d in DIRECTIONS}  # by sender direction
        self._closing: Set[str] = set()
        self._early = bytearray()
        self._paused: Dict[str, Set[str]] = {d: set() for d in DIRECTIONS}
        self._start = 0.0
        self._last_activity = 0.0
        self._waiters: List[Tuple[Callable[[ProxyEvent], bool], asyncio.Future[ProxyEvent]]] = []
        self._closed_future: Optional[asyncio.Future[None]] = None
        self._timers: Dict[str, asyncio.TimerHandle] = {}
        self._tasks: Set[asyncio.Task[None]] = set()
        self.finished = False

    # ----------------------------------------------------------- public API

    def __repr__(self) -> str:
        return f"<ProxyConnection #{self.number} {len(self.events)} events>"

    async def wait_for(
        self, predicate: Callable[[ProxyEvent], bool], timeout: float = 5.0
    ) -> ProxyEvent:
        """The first event (past or future) matching ``predicate``.

        Raises ``asyncio.TimeoutError`` after ``timeout`` seconds and
        :class:`EventNotSeen` if the connection ends first.
        """
        for event in self.events:
            if predicate(event):
                return event
        if self.finished:
            raise EventNotSeen(f"connection #{self.number} ended without the awaited event")
        fut: asyncio.Future[ProxyEvent] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    async def wait_point(
        self, point: str, direction: Optional[str] = None, timeout: float = 5.0
    ) -> ProxyEvent:
        """Wait for a unit or note that marks ``point`` (in ``direction``)."""
        return await self.wait_for(
            lambda e: point in e.points and (direction is None or e.direction == direction),
            timeout,
        )

    async def wait_closed(self, timeout: float = 5.0) -> None:
        """Wait until both sockets are closed (bounded)."""
        if self._closed_future is None:
            raise RuntimeError("connection not started")
        await asyncio.wait_for(asyncio.shield(self._closed_future), timeout)

    def units(
        self,
        direction: Optional[str] = None,
        point: Optional[str] = None,
        kinds: Sequence[str] = (
            UNIT_PLAINTEXT,
            UNIT_RECORD,
            UNIT_FRAGMENT,
            UNIT_EOF,
            UNIT_RESET,
            UNIT_NOTE,
        ),
    ) -> List[ProxyEvent]:
        """Received units and notes, optionally filtered."""
        return [
            e
            for e in self.events
            if e.kind in kinds
            and (direction is None or e.direction == direction)
            and (point is None or point in e.points)
        ]

    def received(self, direction: str) -> bytes:
        """Every byte the sender of ``direction`` sent, in order."""
        return b"".join(
            e.data
            for e in self.events
            if e.direction == direction and e.kind in (UNIT_PLAINTEXT, UNIT_RECORD, UNIT_FRAGMENT)
        )

    def sent(self, direction: str) -> bytes:
        """Every byte written to the receiver of ``direction``, in order."""
        return b"".join(
            e.data for e in self.events if e.direction == direction and e.kind == EV_SENT
        )

    def writes(self, direction: str) -> List[bytes]:
        """The writes to the receiver of ``direction`` (one per TCP write)."""
        return [e.data for e in self.events if e.direction == direction and e.kind == EV_SENT]

    def close(self) -> None:
        """Close both sockets now (pending delayed writes are dropped)."""
        for task in list(self._tasks):
            task.cancel()
        for pipe in self._pipes.values():
            pipe.cancel()
        self._close_all("closed by the proxy")

    # ------------------------------------------------------------- logging

    def _now(self) -> float:
        loop = self.loop
        return (loop.time() - self._start) if loop is not None else 0.0

    def _emit(self, event: ProxyEvent) -> None:
        self.events.append(event)
        callback = self.proxy.on_event
        if callback is not None:
            try:
                callback(event)
            except Exception as exc:  # a printing failure must not kill the relay
                self.proxy.callback_errors.append(exc)
        for predicate, fut in list(self._waiters):
            if not fut.done() and predicate(event):
                fut.set_result(event)

    def _event(
        self,
        direction: str,
        kind: str,
        *,
        detail: str = "",
        data: bytes = b"",
        method: str = "",
        points: Sequence[str] = (),
        index: int = 0,
        action: str = "",
    ) -> None:
        self._emit(
            ProxyEvent(
                self._now(),
                direction,
                kind,
                points[0] if points else "",
                detail,
                bytes(data),
                method,
                tuple(points),
                index,
                action,
                self.number,
            )
        )

    def _note(self, direction: str, text: str) -> None:
        self._event(direction, UNIT_NOTE, detail=text)

    # --------------------------------------------------------- socket events

    def _side_made(self, side: _Side) -> None:
        if side.direction == C2S:
            self.client = side
            assert side.transport is not None
            self.loop = asyncio.get_running_loop()
            self._start = self._last_activity = self.loop.time()
            self._closed_future = self.loop.create_future()
            peer = side.transport.get_extra_info("peername")
            host, port = self.proxy.upstream
            self._event("", EV_CONNECT, detail=f"client {peer} -> upstream {host}:{port}")
            with contextlib.suppress(Exception):
                side.transport.pause_reading()
            task = self.loop.create_task(self._connect_upstream())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self._schedule_idle()
        else:
            self.upstream = side
            if self.finished or C2S in self._closing:
                assert side.transport is not None
                self._closing.add(S2C)
                side.transport.close()
                return
            self._event("", EV_CONNECT, detail="upstream connected")

    async def _connect_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.proxy.upstream
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: _Side(self, S2C), host, port),
                self.proxy.limits.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            self._event(
                "",
                EV_ERROR,
                detail=(
                    f"upstream {host}:{port} unreachable ({reason}); closing the client connection"
                ),
            )
            self._close_all("upstream unreachable")
            return
        if self.finished or C2S in self._closing:
            return  # the client went away meanwhile: _side_made closed upstream
        if self._early:
            early = bytes(self._early)
            self._early.clear()
            self._process(C2S, early)
        self._update_reading(C2S)

    def _on_data(self, direction: str, data: bytes) -> None:
        if direction == C2S and self.upstream is None:
            self._early += data
            if len(self._early) > self.proxy.limits.max_buffer:
                self._event("", EV_ERROR, detail="client sent too much before upstream connected")
                self._close_all("buffer limit")
            return
        self._process(direction, data)

    def _process(self, direction: str, data: bytes) -> None:
        self._touch()
        try:
            units = self.follower.feed(direction, data)
        except ValueError as exc:  # fed after the end: a bug, but never a crash
            self._note(direction, f"follower refused bytes: {exc}")
            units = []
        self._handle(units)
        if self.follower.has_partial_plaintext(direction):
            self._schedule_partial(direction)
        self._update_reading(direction)

    def _on_eof(self, direction: str) -> None:
        self._touch()
        if direction == C2S and self.upstream is None:
            self._close_all("client closed before upstream connected")
            return
        self._eof_in[direction] = True
        self._handle(self.follower.feed_eof(direction))
        self._maybe_finish()

    def _on_lost(self, side: _Side, exc: Optional[BaseException]) -> None:
        direction = side.direction
        self._lost[direction] = True
        expected = direction in self._closing
        if not self._eof_in[direction] and not expected:
            self._eof_in[direction] = True
            if exc is not None:
                self._handle(self.follower.feed_reset(direction))
            else:
                self._handle(self.follower.feed_eof(direction))
        elif exc is not None and not expected:
            self._note(direction, f"socket error after EOF: {exc}")
        self._maybe_finish()
        if self._lost[C2S] and (self._lost[S2C] or self.upstream is None):
            self._finalise()

    def _receiver_paused(self, receiver_sends: str, paused: bool) -> None:
        """The socket that sends ``receiver_sends`` cannot take more writes."""
        sender = _other(receiver_sends)
        if paused:
            self._paused[sender].add("receiver")
        else:
            self._paused[sender].discard("receiver")
        self._update_reading(sender)

    def _update_reading(self, direction: str) -> None:
        side = self.client if direction == C2S else self.upstream
        if side is None or side.transport is None or side.transport.is_closing():
            return
        if self._pipes[direction].queued_bytes > self.proxy.limits.max_buffer:
            self._paused[direction].add("backlog")
        else:
            self._paused[direction].discard("backlog")
        if direction == C2S and self.upstream is None:
            return
        with contextlib.suppress(Exception):
            if self._paused[direction]:
                side.transport.pause_reading()
            else:
                side.transport.resume_reading()

    # -------------------------------------------------------------- faults

    def _handle(self, units: Sequence[Unit]) -> None:
        for unit in units:
            if not unit.relayable:
                self._event(
                    unit.direction,
                    UNIT_NOTE,
                    detail=unit.detail,
                    method=unit.method,
                    points=unit.points,
                    index=unit.index,
                )
                continue
            self._relay(unit)

    def _matching(self, unit: Unit) -> List[Fault]:
        hits: List[Fault] = []
        for i, fault in enumerate(self.faults):
            if fault.direction != unit.direction or fault.at not in unit.points:
                continue
            self._hits[i] = self._hits.get(i, 0) + 1
            if self._hits[i] == fault.nth:
                hits.append(fault)
        return hits

    def _relay(self, unit: Unit) -> None:
        d = unit.direction
        pipe = self._pipes[d]
        if pipe.terminated:
            self._event(
                d,
                unit.kind,
                detail=unit.detail,
                data=unit.data,
                method=unit.method,
                points=unit.points,
                index=unit.index,
                action="discarded",
            )
            return
        faults = self._matching(unit)
        self._event(
            d,
            unit.kind,
            detail=unit.detail,
            data=unit.data,
            method=unit.method,
            points=unit.points,
            index=unit.index,
            action="+".join(f.action for f in faults),
        )
        self._apply(unit, faults)

    def _fault_event(self, fault: Fault, unit: Unit, text: str, data: bytes = b"") -> None:
        self._event(
            unit.direction,
            EV_FAULT,
            detail=f"{fault}: {text}",
            data=data,
            points=(fault.at,),
            index=unit.index,
            action=fault.action,
        )

    def _apply(self, unit: Unit, faults: Sequence[Fault]) -> None:
        pipe = self._pipes[unit.direction]
        pipe.batching = True
        try:
            self._plan(unit, faults)
        finally:
            pipe.batching = False
            pipe.run()

    def _plan(self, unit: Unit, faults: Sequence[Fault]) -> None:
        """Queue the writes (and FIN/RST) that relay ``unit`` under ``faults``."""
        d = unit.direction
        pipe = self._pipes[d]
        end = unit.kind in (UNIT_EOF, UNIT_RESET)
        by_action: Dict[str, List[Fault]] = {}
        for fault in faults:
            by_action.setdefault(fault.action, []).append(fault)
        for fault in by_action.get(ACTION_DELAY, []):
            self._fault_event(fault, unit, f"held for {fault.delay:g} s")
            pipe.push("hold", fault.delay)
        for action, op, what in ((ACTION_FIN, "eof", "FIN"), (ACTION_RST, "rst", "RST")):
            for fault in by_action.get(action, []):
                self._fault_event(
                    fault, unit, f"{what} sent to the receiver instead of this unit", unit.data
                )
                pipe.terminated = True
                pipe.push(op)
                return
        body: Optional[bytes] = None if end else unit.data
        end_op: Optional[str] = None
        if end:
            end_op = "eof" if unit.kind == UNIT_EOF else "rst"
        for fault in by_action.get(ACTION_CORRUPT, []):
            if body:
                body = _corrupt(body, unit.kind == UNIT_RECORD)
                self._fault_event(fault, unit, "relayed corrupted", body)
            else:
                self._fault_event(fault, unit, "nothing to corrupt in this unit")
        before_sep: List[bytes] = []
        before_same: List[bytes] = []
        after_same: List[bytes] = []
        after_sep: List[bytes] = []
        for fault in by_action.get(ACTION_DROP, []):
            if end:
                self._fault_event(fault, unit, f"{unit.kind.upper()} not relayed")
                end_op = None
            else:
                self._fault_event(fault, unit, "not relayed", unit.data)
                body = None
            if fault.data:
                after_same.append(fault.data)
                self._event(
                    d,
                    EV_INJECTED,
                    detail=f"{fault}: in place of the dropped unit",
                    data=fault.data,
                    index=unit.index,
                    action=fault.action,
                )
        for fault in by_action.get(ACTION_INJECT, []):
            same = fault.same_segment and not end
            target = (
                (before_same if fault.before else after_same)
                if same
                else (before_sep if fault.before or end else after_sep)
            )
            target.append(fault.data)
            where = ("before" if fault.before or end else "after") + (
                " the unit, same segment" if same else " the unit, separate write"
            )
            self._event(
                d,
                EV_INJECTED,
                detail=f"{fault}: {where}",
                data=fault.data,
                index=unit.index,
                action=fault.action,
            )
        writes: List[bytes] = list(before_sep)
        segment = b"".join(before_same) + (body or b"") + b"".join(after_same)
        splits = by_action.get(ACTION_SPLIT, [])
        if segment:
            if splits and len(segment) > 1:
                cut = splits[0].split_at
                cut = max(1, min(len(segment) - 1, cut if cut >= 0 else len(segment) + cut))
                writes += [segment[:cut], segment[cut:]]
                self._fault_event(splits[0], unit, f"written as {cut} + {len(segment) - cut} bytes")
            else:
                writes.append(segment)
                for fault in splits:
                    self._fault_event(fault, unit, "too short to split")
        for fault in by_action.get(ACTION_DUPLICATE, []):
            if body:
                writes.append(body)
                self._fault_event(fault, unit, "written twice", body)
            else:
                self._fault_event(fault, unit, f"a {unit.kind.upper()} cannot be duplicated")
        writes += after_sep
        coalesce = by_action.get(ACTION_COALESCE, [])
        for i, data in enumerate(writes):
            if coalesce and i == len(writes) - 1 and end_op is None:
                bound = coalesce[0].delay or 1.0
                self._fault_event(
                    coalesce[0],
                    unit,
                    f"held to share one write with the next unit (at most {bound:g} s)",
                )
                pipe.push("cork", (data, bound))
            else:
                pipe.push("write", data)
        if end_op is not None:
            if end_op == "eof" or end_op == "rst":
                pipe.terminated = True
            pipe.push(end_op)

    # --------------------------------------------------------------- output

    def _receiver(self, direction: str) -> Optional[_Side]:
        return self.upstream if direction == C2S else self.client

    def _write(self, direction: str, data: bytes) -> None:
        side = self._receiver(direction)
        if side is None or side.transport is None or side.transport.is_closing():
            self._note(direction, f"{len(data)} bytes not delivered: the receiver is gone")
            return
        side.transport.write(data)
        self._event(direction, EV_SENT, data=data)

    def _send_eof(self, direction: str) -> None:
        side = self._receiver(direction)
        if side is None or side.transport is None or side.transport.is_closing():
            self._note(direction, "FIN not delivered: the receiver is gone")
            return
        transport = side.transport
        if transport.can_write_eof():
            transport.write_eof()
        else:  # pragma: no cover - TCP transports can
            self._closing.add(side.direction)
            transport.close()
        self._event(direction, EV_FIN_SENT, detail="FIN to the receiver")

    def _send_rst(self, direction: str) -> None:
        side = self._receiver(direction)
        if side is None or side.transport is None or side.transport.is_closing():
            self._note(direction, "RST not delivered: the receiver is gone")
            return
        _abort_with_rst(side.transport)
        self._closing.add(side.direction)
        self._event(direction, EV_RST_SENT, detail="RST to the receiver")

    def _pipe_progress(self, direction: str) -> None:
        self._update_reading(direction)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        """Close both sockets once neither direction can carry more."""
        if self.finished:
            return
        for d in DIRECTIONS:
            pipe = self._pipes[d]
            if not pipe.idle:
                return
            receiver_gone = self._lost[_other(d)]
            if not (pipe.terminated or self._eof_in[d] or self._lost[d] or receiver_gone):
                return
        self._close_all("")

    def _close_all(self, reason: str) -> None:
        if reason:
            self._note("", reason)
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None:
                self._closing.add(side.direction)
                if not side.transport.is_closing():
                    side.transport.close()
        if self.upstream is None and self.client is not None and self.client.transport is None:
            self._finalise()

    def _finalise(self) -> None:
        if self.finished:
            return
        self.finished = True
        for pipe in self._pipes.values():
            pipe.cancel()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._event("", EV_CLOSED, detail="both sockets closed")
        for _predicate, fut in self._waiters:
            if not fut.done():
                fut.set_exception(
                    EventNotSeen(f"connection #{self.number} ended without the awaited event")
                )
        if self._closed_future is not None and not self._closed_future.done():
            self._closed_future.set_result(None)
        self.proxy._connection_done(self)

    # --------------------------------------------------------------- timers

    def _touch(self) -> None:
        if self.loop is not None:
            self._last_activity = self.loop.time()

    def _schedule_idle(self) -> None:
        assert self.loop is not None
        self._timers["idle"] = self.loop.call_later(self.proxy.limits.idle_timeout, self._idle)

    def _idle(self) -> None:
        assert self.loop is not None
        quiet = self.loop.time() - self._last_activity
        limit = self.proxy.limits.idle_timeout
        if quiet < limit:
            self._timers["idle"] = self.loop.call_later(limit - quiet, self._idle)
            return
        for pipe in self._pipes.values():
            pipe.cancel()
        self._close_all(f"no traffic for {limit:g} s: closing both sides")

    def _schedule_partial(self, direction: str) -> None:
        key = f"partial-{direction}"
        if key in self._timers or self.loop is None:
            return

        def fire() -> None:
            self._timers.pop(key, None)
            if self.finished or self._eof_in[direction]:
                return
            self._handle(self.follower.flush(direction))

        self._timers[key] = self.loop.call_later(self.proxy.limits.partial_timeout, fire)


def _corrupt(data: bytes, record: bool) -> bytes:
    """Flip the last byte of a record (its MAC or AEAD tag), or a line's first."""
    buf = bytearray(data)
    if record:
        buf[-1] ^= 0xFF
    else:
        buf[0] ^= 0x20 if chr(buf[0]).isalpha() else 0x01
    return bytes(buf)


def _abort_with_rst(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


Address = Tuple[str, int]


class Proxy:
    """The on-path proxy: accept clients, connect each to ``upstream``, follow
    and fault every connection.  Use :meth:`start`."""

    def __init__(
        self,
        upstream: Address,
        dialect: str,
        faults: Sequence[Fault],
        keylog: Union[str, os.PathLike[str], None],
        limits: _Limits,
        on_event: Optional[Callable[[ProxyEvent], None]],
    ) -> None:
        if dialect not in _DIALECTS:
            raise ValueError(
                f"unknown dialect {dialect!r}; choose one of {', '.join(sorted(_DIALECTS))}"
            )
        self.upstream = upstream
        self.dialect = dialect
        self.faults = tuple(faults)
        self.keylog = keylog
        self.limits = limits
        self.on_event = on_event
        #: Every connection accepted, in order (finished ones included).
        self.connections: List[ProxyConnection] = []
        #: Connections refused because ``max_connections`` were open.
        self.refused = 0
        self.callback_errors: List[Exception] = []
        self._active: Set[ProxyConnection] = set()
        self._server: Optional[asyncio.AbstractServer] = None
        self._new_connection: Optional[asyncio.Event] = None

    @classmethod
    async def start(
        cls,
        listen: Address = ("127.0.0.1", 0),
        upstream: Address = ("127.0.0.1", 25),
        dialect: str = "smtp",
        faults: Sequence[Fault] = (),
        keylog: Union[str, os.PathLike[str], None] = None,
        *,
        max_connections: int = 16,
        max_buffer: int = 1 << 20,
        max_line: int = 65536,
        connect_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        partial_timeout: float = 0.5,
        on_event: Optional[Callable[[ProxyEvent], None]] = None,
    ) -> Proxy:
        """Listen on ``listen`` and relay each connection to ``upstream``."""
        limits = _Limits(
            max_connections, max_buffer, max_line, connect_timeout, idle_timeout, partial_timeout
        )
        proxy = cls(upstream, dialect, faults, keylog, limits, on_event)
        proxy._new_connection = asyncio.Event()
        loop = asyncio.get_running_loop()
        proxy._server = await loop.create_server(proxy._accept, listen[0], listen[1])
        return proxy

    @property
    def address(self) -> Address:
        """The address the proxy listens on (the real port if 0 was asked)."""
        assert self._server is not None
        sockets: Sequence[socket.socket] = getattr(self._server, "sockets", None) or ()
        if not sockets:
            raise RuntimeError("the proxy is not listening")
        host, port = sockets[0].getsockname()[:2]
        return str(host), int(port)

    def _accept(self) -> asyncio.Protocol:
        if len(self._active) >= self.limits.max_connections:
            self.refused += 1
            return _Refuse(self)
        conn = ProxyConnection(self, len(self.connections) + 1)
        self.connections.append(conn)
        self._active.add(conn)
        if self._new_connection is not None:
            self._new_connection.set()
        return _Side(conn, C2S)

    def _connection_done(self, conn: ProxyConnection) -> None:
        self._active.discard(conn)

    async def connection(self, index: int = 0, timeout: float = 5.0) -> ProxyConnection:
        """The ``index``-th accepted connection, waiting for it (bounded)."""

        async def wait() -> ProxyConnection:
            while len(self.connections) <= index:
                assert self._new_connection is not None
                self._new_connection.clear()
                await self._new_connection.wait()
            return self.connections[index]

        return await asyncio.wait_for(wait(), timeout)

    def close(self) -> None:
        """Stop listening and close every open connection."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._active):
            conn.close()

    async def wait_closed(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), timeout)
        for conn in list(self._active):
            with contextlib.suppress(asyncio.TimeoutError, RuntimeError):
                await conn.wait_closed(timeout)

    async def __aenter__(self) -> Proxy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


class _Refuse(asyncio.Protocol):
    """Over the connection limit: close at once, and say so."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.proxy.on_event is not None:
            self.proxy.on_event(
                ProxyEvent(
                    0.0,
                    "",
                    EV_ERROR,
                    detail=f"connection refused: {self.proxy.limits.max_connections} already open",
                )
            )
        transport.close()


def _parse_address(value: Union[str, Address]) -> Address:
    if isinstance(value, tuple):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, not {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def run_proxy(
    listen: Union[str, Address],
    upstream: Union[str, Address],
    dialect: str = "smtp",
    faults: Sequence[Union[Fault, str]] = (),
    keylog: Union[str, os.PathLike[str], None] = None,
    out: Optional[IO[str]] = None,
    *,
    stop: Optional[asyncio.Event] = None,
    on_start: Optional[Callable[[Proxy], None]] = None,
    **limits: Any,
) -> Proxy:
    """Run the proxy, printing each event as a line to ``out``, until ``stop``
    is set (or the task is cancelled).  ``on_start`` gets the listening proxy;
    ``limits`` go to :meth:`Proxy.start`.  Returns the proxy (closed)."""
    import sys

    stream = out if out is not None else sys.stdout
    parsed = [f if isinstance(f, Fault) else parse_fault(f) for f in faults]

    def show(event: ProxyEvent) -> None:
        stream.write(format_event(event) + "\n")
        stream.flush()

    proxy = await Proxy.start(
        _parse_address(listen),
        _parse_address(upstream),
        dialect,
        parsed,
        keylog,
        on_event=show,
        **limits,
    )
    host, port = proxy.address
    up_host, up_port = proxy.upstream
    stream.write(
        f"proxy listening on {host}:{port} -> {up_host}:{up_port} ({dialect}); "
        f"key log: {keylog or 'none (TLS 1.3 followed by position)'}\n"
    )
    for fault in parsed:
        stream.write(f"fault: {fault}\n")
    stream.flush()
    if on_start is not None:
        on_start(proxy)
    try:
        if stop is None:
            stop = asyncio.Event()
        await stop.wait()
    finally:
        proxy.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await proxy.wait_closed()
    return proxy


#: Public name of the HOST:PORT parser (the CLI uses it).
parse_address = _parse_address
