"""The follower: cuts each direction of a proxied connection into units and
tags them with the protocol points they mark (sans-I/O).

Plaintext is cut into units by the dialect's framer
(:mod:`starttls_harness.tls.framing`; CRLF lines for SMTP and IMAP, the
default).  The follower reads the dialect's ``STARTTLS`` command from the
client (SMTP ``STARTTLS``; IMAP ``<tag> STARTTLS``) and the final unit of
the answer from the server (SMTP ``220``; IMAP ``<tag> OK``).  A positive
answer starts a TLS *session*.

At every unit boundary the follower looks at the next bytes: if they can
start a TLS record header (:func:`starttls_harness.tls.records.check_header`)
they are cut as a record, otherwise the framer cuts a plaintext unit.  Mail
text never starts with the bytes 0x14-0x18 followed by 0x03, so this is
unambiguous for the dialects here, and it is what lets the proxy see
plaintext where TLS is expected (injection) and TLS where plaintext is
expected.  Each direction has its own framer; it is reset when a record
interrupts the plaintext, since plaintext after TLS is a fresh stream.

Inside TLS, records are classified by the session
(:mod:`starttls_harness.proxy.session`: ``record-type``, ``keylog`` or
``position``); ``STOPTLS`` and its answer are read in decrypted application
data when a key log allows it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

from starttls_harness.proxy.session import Session
from starttls_harness.proxy.upgrade import STARTTLS, STOPTLS, upgrade_reader
from starttls_harness.proxy.vocabulary import (
    METHOD_KEYLOG,
    METHOD_POSITION,
    PHASE_CLOSING,
    PHASE_PLAINTEXT,
    PHASE_STARTTLS,
    PHASE_TLS,
    UNIT_EOF,
    UNIT_FRAGMENT,
    UNIT_NOTE,
    UNIT_PLAINTEXT,
    UNIT_RECORD,
    UNIT_RESET,
    Point,
    Unit,
    check_direction,
    other_direction,
)
from starttls_harness.tls.framing import Framer, FramerFactory, line_framer
from starttls_harness.tls.keylog import (
    C2S,
    DIRECTIONS,
    S2C,
    FollowedRecord,
    KeylogError,
    SecretsMapping,
    SecretsProvider,
    keylog_file_provider,
)
from starttls_harness.tls.records import (
    CT_APPLICATION_DATA,
    HEADER_LEN,
    Record,
    check_header,
    content_type_name,
)

__all__ = ["Follower"]

# Records waiting for key log secrets before the key log is declared useless.
_MAX_PENDING = 32
_PENDING = "protected record, classification pending (key log has no secret yet)"


class Follower:
    """Follow one proxied connection in both directions (sans-I/O).

    :meth:`feed` takes the bytes of one direction as they arrive and returns
    the :class:`Unit` objects completed by them, in order; :meth:`feed_eof`
    and :meth:`feed_reset` report the end of a direction.  ``keylog`` is a
    key log path, a secrets provider or a mapping (see
    :mod:`starttls_harness.tls.keylog`); without it TLS 1.3 is followed by position.
    ``framer`` makes the framer of each direction's plaintext (and of
    decrypted application data); a unit no longer than ``max_line`` is
    buffered, a longer one is cut there.
    """

    def __init__(
        self,
        dialect: str = "smtp",
        keylog: Union[str, os.PathLike[str], SecretsProvider, SecretsMapping, None] = None,
        *,
        max_line: int = 65536,
        framer: FramerFactory = line_framer,
    ) -> None:
        self.dialect = upgrade_reader(dialect)
        self._secrets: Union[SecretsProvider, SecretsMapping, None]
        if isinstance(keylog, (str, os.PathLike)):
            self._secrets = keylog_file_provider(keylog)
        else:
            self._secrets = keylog
        self.max_line = max_line
        self._make_framer = framer
        self._framers: Dict[str, Framer] = {d: self._new_framer() for d in DIRECTIONS}
        self._buffers: Dict[str, bytearray] = {d: bytearray() for d in DIRECTIONS}
        self._ended: Dict[str, bool] = {d: False for d in DIRECTIONS}
        self._index = 0
        self._starttls_tag: Optional[str] = None
        self.session: Optional[Session] = None
        self._last_session: Optional[Session] = None
        #: Completed TLS sessions (both close_notify alerts seen).
        self.cycles = 0
        self._sessions = 0
        self._after_close: Dict[str, bool] = {d: False for d in DIRECTIONS}
        self._first_plain_after: Dict[str, bool] = {d: False for d in DIRECTIONS}
        self._retro_stoptls: Optional[Tuple[str, str]] = None  # (text, method)
        #: The text of the application data record just classified (None: unread).
        self._clear: Optional[bytes] = None

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
        """True if ``direction`` buffers an incomplete plaintext unit (not a record)."""
        buf = self._buffers[direction]
        return bool(buf) and check_header(bytes(buf[:HEADER_LEN])) is not None

    # --------------------------------------------------------------- input

    def feed(self, direction: str, data: bytes) -> List[Unit]:
        """Add bytes of ``direction``; return the units they complete."""
        check_direction(direction)
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
                self._framers[direction].reset()  # plaintext after this starts afresh
                record = Record(raw[0], (raw[1] << 8) | raw[2], raw[HEADER_LEN:], raw)
                out.extend(self._on_record(direction, record))
                continue
            if not self._cut_plaintext(direction, buf, out):
                break
        return out

    def _cut_plaintext(self, direction: str, buf: bytearray, out: List[Unit]) -> bool:
        """Cut the plaintext units at the start of ``buf`` with the framer, up
        to the next TLS record header; False if not one unit is complete.

        Units are the framer's raw slices, relayed as they are.  When a
        record header follows a unit, the framer's later units are dropped
        and the framer reset: those bytes are TLS, and plaintext after TLS
        is a fresh stream.
        """
        framer = self._framers[direction]
        data = bytes(buf)
        units, _used = framer.split(data)
        if not units:
            if len(data) < self.max_line:
                return False
            units = [data[: self.max_line]]  # a framer that ignores max_unit
            framer.reset()
        limit = min(framer.max_unit, self.max_line)
        start = 0
        for unit in units:
            if start and check_header(data[start : start + HEADER_LEN]) is None:
                framer.reset()  # a record (or the start of one) follows this plaintext
                break
            if not unit or not data.startswith(unit, start):
                raise ValueError(
                    f"framer {type(framer).__name__} returned a unit that is not the next "
                    f"bytes of the stream ({unit[:16]!r}...)"
                )
            start += len(unit)
            note = self._cut_note(unit) if len(unit) >= limit else ""
            out.extend(self._on_plaintext(direction, unit, note))
        del buf[:start]
        return True

    def _new_framer(self) -> Framer:
        framer = self._make_framer()
        framer.max_unit = min(framer.max_unit, self.max_line)
        return framer

    def _cut_note(self, unit: bytes) -> str:
        """Say so if ``unit``, as long as the limit, was cut there rather than
        ending there (a fresh framer without the limit tells)."""
        unbounded = self._make_framer()
        unbounded.max_unit = len(unit) + 1
        if unbounded.split(unit)[1] == len(unit):
            return ""  # a complete unit that happens to be exactly the limit long
        return f"unit longer than {len(unit)} bytes, cut"

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
        check_direction(direction)
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
            if sd.closed and not session.dirs[other_direction(direction)].closed:
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
                tag = self.dialect.proxy_command(line, STARTTLS)
                if self._starttls_tag is None and tag is not None:
                    self._starttls_tag = tag
                    points.insert(0, Point.STARTTLS_COMMAND.value)
                elif self._starttls_tag is not None:
                    details.append("pipelined after STARTTLS, before its answer")
            elif self._starttls_tag is not None:
                answer = self.dialect.proxy_answer(line, self._starttls_tag)
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

    def _start_session(self) -> Session:
        self._sessions += 1
        self.session = Session(self._sessions, self._secrets)
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
        self._clear = None
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
        unit = Unit(
            index,
            direction,
            UNIT_RECORD,
            record.raw,
            tuple(points),
            detail,
            method,
            phase,
            clear=self._clear,
        )
        out.append(unit)
        if Point.CLOSE_NOTIFY.value in points:
            self._after_closed(session, direction)
        return out

    def _without_keylog(
        self, session: Session, direction: str, record: Record, points: List[str]
    ) -> Tuple[str, str]:
        """TLS 1.3 without usable secrets: clear records are read, protected
        ones placed by position."""
        if record.content_type == CT_APPLICATION_DATA:
            return session.by_position(direction, record, points)
        clear = FollowedRecord(direction, record, record.content_type, record.payload, False)
        return self._classify(session, direction, clear, points)

    def _with_follower(
        self,
        session: Session,
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
        self, session: Session, direction: str, fr: FollowedRecord, points: List[str]
    ) -> Tuple[str, str]:
        """Classify a record the TLS follower read; look for STOPTLS in it."""
        desc, method = session.classify(direction, fr, points)
        self._clear = fr.clear
        if fr.encrypted and fr.content_type == CT_APPLICATION_DATA and fr.plaintext is not None:
            self._stoptls(session, direction, fr.plaintext, points)
        return desc, method

    def _stoptls(
        self, session: Session, direction: str, plaintext: bytes, points: List[str]
    ) -> None:
        """Read STOPTLS and its answer in decrypted application data."""
        units, used = self._make_framer().split(plaintext)
        if used < len(plaintext):
            units.append(plaintext[used:])  # a unit the record ends in the middle of
        for line in units:
            if direction == C2S:
                tag = self.dialect.proxy_command(line, STOPTLS)
                if tag is not None:
                    session.stoptls_tag = tag
                    points.insert(0, Point.STOPTLS_COMMAND.value)
                    return
            elif session.stoptls_tag is not None and not session.stoptls_reply_seen:
                if self.dialect.proxy_answer(line, session.stoptls_tag):
                    session.stoptls_reply_seen = True
                    points.insert(0, Point.STOPTLS_REPLY.value)
                    return

    def _late(self, session: Session, fr: FollowedRecord) -> List[Unit]:
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
        unit = replace(
            self._unit(fr.direction, UNIT_NOTE, b"", points, text, method), clear=self._clear
        )
        out = [unit]
        if Point.CLOSE_NOTIFY.value in points:
            self._after_closed(session, fr.direction)
        return out

    def _give_up_keylog(self, session: Session, direction: str, why: str) -> Unit:
        session.keylog_ok = False
        for sd in session.dirs.values():
            sd.pending.clear()
        text = f"key log not usable for this TLS session ({why}); falling back to position"
        if not session.keylog_given:
            text = f"cannot classify TLS records ({why}); falling back to position"
        return self._unit(direction, UNIT_NOTE, b"", (), text, METHOD_POSITION)

    def _mark_closed(self, session: Session, direction: str, text: str) -> Unit:
        unit = self._unit(
            direction, UNIT_NOTE, b"", (Point.CLOSE_NOTIFY.value,), text, METHOD_POSITION
        )
        self._after_closed(session, direction)
        return unit

    def _after_closed(self, session: Session, direction: str) -> None:
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
