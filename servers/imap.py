"""Reference IMAP4rev1 server: STARTTLS, the STOPTLS extension, and misbehaviours.

The server is an ``asyncio.Protocol`` on :class:`starttls_harness.tls.aio.SwitchableTransport`:
one coroutine per connection reads commands (lines and literals) from a
:class:`LineReader` and answers them, so STARTTLS and STOPTLS can simply
``await`` the transport's switch.  It implements what the closure rules need
and what ``imaplib`` uses: CAPABILITY, NOOP, LOGOUT, STARTTLS, STOPTLS,
LOGIN, SELECT/EXAMINE (INBOX only), APPEND (synchronizing ``{n}`` and
LITERAL+ ``{n+}`` literals), FETCH and UID FETCH (FLAGS, UID, INTERNALDATE,
RFC822, RFC822.SIZE/HEADER/TEXT, BODY[]/BODY.PEEK[] with "", HEADER or TEXT
and a ``<start.count>`` partial), CHECK, CLOSE and UNSELECT.  Unknown
commands get ``BAD``; AUTHENTICATE answers ``NO`` (no mechanism offered).

Security decisions (RFC 3501 §6.2, RFC 9051 §6.2.1):

* In plaintext the server advertises ``STARTTLS LOGINDISABLED`` and refuses
  LOGIN with ``NO [PRIVACYREQUIRED]``: no password ever crosses in clear.
  ``STOPTLS`` is advertised only inside TLS.
* STARTTLS: the transport's hold gate is armed at connection start with
  :class:`StartTLSLine`, so no byte after a ``<tag> STARTTLS`` line reaches
  the command reader; the tagged ``OK Begin TLS negotiation now`` is the
  ``preface`` of ``start_tls`` (written and switched in one step).  Held
  bytes are the R1 leftover: the strict engine refuses the connection.
* STOPTLS: ``<tag> OK Begin TLS closure`` under TLS, then the bidirectional
  closure (``accept_unwrap``), then an untagged ``* OK`` greeting in
  plaintext.  The client must pipeline nothing after STOPTLS: a STOPTLS
  with commands already queued behind it gets ``BAD`` (they run under TLS);
  bytes that arrive under TLS after the OK end the connection with
  ``* BYE`` once the closure is done.
* After every transition the session is reset as at connection start (R8):
  not authenticated, nothing selected, capabilities to be re-read.
* Bounds (:class:`servers.base.Limits`): command lines, literal sizes,
  literals per command, simultaneous connections (``* BYE`` and close) and
  idle time.

:class:`StartTLSLine` recognises STARTTLS *lexically*: a line ending in
``{n}`` or ``{n+}`` announces an n-byte literal, whose bytes (newlines
included) are skipped, and the rest of that line continues the command.
Limitation: it does not know whether the server accepts a synchronizing
literal; when the server refuses one (too big) it calls
:meth:`StartTLSLine.cancel_literal`.  A client that sends a literal the server
refused is out of protocol and may have its bytes judged as commands.

Behaviours (``BEHAVIOURS``; each breaks exactly one rule):

* ``strict`` -- follows every rule.
* ``keep-buffer`` (R1) -- ``Policy.relaxing(R1)``: a command pipelined after
  STARTTLS (same segment, or before the ClientHello) is executed inside TLS
  (CVE-2011-0411).
* ``plaintext-in-tls`` (R2) -- ``Policy.relaxing(R2)``: plaintext received
  while TLS is up is executed and answered (under TLS).
* ``early-plaintext`` (R3) -- after STOPTLS sends its tagged OK, its own
  close_notify and the plaintext ``* OK`` greeting in one segment, without
  waiting for the client's close_notify (a strict client's engine sees
  bytes glued to the close_notify and reports R4 on its side).
* ``one-sided-resume`` (R4) -- ``Policy.relaxing(R4)``: plaintext that follows
  the client's close_notify in the same segment (the client did not wait)
  is accepted and answered as plaintext.
* ``no-close-notify-reply`` (R5) -- ``Policy.relaxing(R5)``: never answers the
  client's close_notify (after STOPTLS or not); closes TCP instead.
* ``ignore-truncation`` (R6) -- ``Policy.relaxing(R6)`` and an APPEND literal
  cut by EOF is stored anyway (a truncated message is served by FETCH).
* ``alert-as-close`` (R7) -- ``Policy.relaxing(R7)``: a fatal alert under TLS is
  taken for a closure; the server greets in plaintext and carries on.
* ``no-state-reset`` (R8) -- the authenticated (and selected) state survives
  STARTTLS and STOPTLS: after STOPTLS, SELECT/FETCH work in plaintext without
  a new LOGIN.  Capabilities still follow the TLS status.

``start_server(config)`` returns a :class:`servers.base.RunningServer`
whose ``messages`` list is the shared INBOX (:class:`StoredMessage`) and
whose ``connections`` holds one :class:`ImapServerProtocol` per connection
(transport, engine events, violations) for tests and evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import (
    Awaitable,
    Callable,
    Dict,
    FrozenSet,
    List,
    Optional,
    Set,
    Tuple,
    Union,
)

from starttls_harness.servers.base import (
    STRICT,
    Behaviour,
    Limits,
    RunningServer,
    ServerConfig,
    behaviour_named,
)
from starttls_harness.tls.aio import SwitchableTransport, create_server
from starttls_harness.tls.engine import (
    AlertReceived,
    CloseNotifyReceived,
    ClosureComplete,
    Event,
    LocalProtocolError,
    Rule,
    TransitionError,
)
from starttls_harness.tls.states import State

__all__ = [
    "BEHAVIOURS",
    "Atom",
    "ImapRunningServer",
    "ImapServerProtocol",
    "IncompleteRead",
    "LineReader",
    "LineTooLong",
    "Literal",
    "ParseError",
    "StartTLSLine",
    "StoredMessage",
    "Token",
    "is_starttls_line",
    "start_server",
    "tokenize",
]

BEHAVIOURS: Dict[str, Behaviour] = {
    b.name: b
    for b in (
        STRICT,
        Behaviour(
            "keep-buffer",
            Rule.R1,
            "executes commands pipelined after STARTTLS inside TLS",
            (Rule.R1,),
        ),
        Behaviour(
            "plaintext-in-tls",
            Rule.R2,
            "executes plaintext received while TLS is up",
            (Rule.R2,),
        ),
        Behaviour(
            "early-plaintext",
            Rule.R3,
            "sends close_notify and the plaintext greeting without waiting for the client's"
            " close_notify",
        ),
        Behaviour(
            "one-sided-resume",
            Rule.R4,
            "accepts plaintext that follows the client's close_notify in the same segment",
            (Rule.R4,),
        ),
        Behaviour(
            "no-close-notify-reply",
            Rule.R5,
            "closes TCP instead of answering the client's close_notify",
            (Rule.R5,),
        ),
        Behaviour(
            "ignore-truncation",
            Rule.R6,
            "stores an APPEND literal cut by EOF under TLS",
            (Rule.R6,),
        ),
        Behaviour(
            "alert-as-close",
            Rule.R7,
            "takes a fatal alert for a closure and resumes plaintext",
            (Rule.R7,),
        ),
        Behaviour(
            "no-state-reset",
            Rule.R8,
            "keeps the authenticated state across STARTTLS and STOPTLS",
        ),
    )
}

# ----------------------------------------------------------------- wire syntax

#: A command tag: ASTRING-CHAR except "+" (RFC 3501 §9).
_TAG = rb"[^\x00-\x20(){%*\"\\+\x7f-\xff]+"
_TAG_RE = re.compile(_TAG)
_STARTTLS_RE = re.compile(rb"(" + _TAG + rb") STARTTLS\r?\n", re.IGNORECASE)
#: A literal announced at the end of a line: ``{n}`` or (LITERAL+) ``{n+}``.
LITERAL_AT_END = re.compile(rb"\{(\d{1,10})(\+?)\}\r?\n\Z")
_LITERAL_HERE = re.compile(rb"\{(\d{1,10})\+?\}\r?\n")
_ATOM_STOP = frozenset(b' ()\r\n{"')


def is_starttls_line(line: bytes) -> bool:
    """True when ``line`` is exactly ``<tag> STARTTLS`` (any case) plus CRLF/LF."""
    return _STARTTLS_RE.fullmatch(line) is not None


class StartTLSLine:
    """Hold-gate predicate over complete plaintext lines (see module docstring).

    Stateful because it is lexically literal-aware: after a line that ends in
    ``{n}`` the next n bytes are literal data, never a command.
    """

    def __init__(self) -> None:
        #: Literal bytes still to skip.
        self.literal = 0

    def __call__(self, line: bytes) -> bool:
        fresh = True
        if self.literal:
            if len(line) <= self.literal:
                self.literal -= len(line)
                return False
            line = line[self.literal :]
            self.literal = 0
            fresh = False  # the rest continues the command the literal belongs to
        match = LITERAL_AT_END.search(line)
        if match is not None:
            self.literal = int(match.group(1))
            return False
        return fresh and is_starttls_line(line)

    def cancel_literal(self) -> None:
        """The server refused the announced literal: the client will not send it."""
        self.literal = 0


class Atom(bytes):
    """An IMAP atom (including NIL, numbers, ``BODY[...]<...>`` items)."""


class Literal(bytes):
    """A string that came as a literal ``{n}``."""


#: A parsed IMAP token: an atom, a string (quoted: plain ``bytes``; literal:
#: :class:`Literal`) or a parenthesised list.
Token = Union[bytes, List["Token"]]


class ParseError(ValueError):
    """The bytes are not well-formed IMAP."""


def tokenize(data: bytes, pos: int = 0) -> List[Token]:
    """Parse IMAP tokens from ``data[pos:]`` up to the end of the (logical) line.

    ``data`` holds the line with its literals inline, as read from the wire
    (``... {5}\\r\\nhello ...``).  Used for commands and for responses.
    """
    return _lex(data, pos, 0)[0]


def _lex(data: bytes, pos: int, depth: int) -> Tuple[List[Token], int]:
    out: List[Token] = []
    size = len(data)
    while pos < size:
        char = data[pos]
        if char == 0x20:
            pos += 1
        elif char in (0x0D, 0x0A):
            if depth:
                raise ParseError("unterminated parenthesised list")
            return out, size
        elif char == 0x28:  # (
            sub, pos = _lex(data, pos + 1, depth + 1)
            out.append(sub)
        elif char == 0x29:  # )
            if not depth:
                raise ParseError("unbalanced ')'")
            return out, pos + 1
        elif char == 0x22:  # "
            value, pos = _quoted(data, pos + 1)
            out.append(value)
        elif char == 0x7B:  # {
            match = _LITERAL_HERE.match(data, pos)
            if match is None:
                raise ParseError("malformed literal")
            start = match.end()
            stop = start + int(match.group(1))
            if stop > size:
                raise ParseError("literal longer than the data")
            out.append(Literal(data[start:stop]))
            pos = stop
        else:
            start = pos
            while pos < size and data[pos] not in _ATOM_STOP:
                if data[pos] == 0x5B:  # [ ... ] may hold spaces and parentheses
                    close = data.find(b"]", pos)
                    if close < 0:
                        raise ParseError("unterminated '['")
                    pos = close
                pos += 1
            out.append(Atom(data[start:pos]))
    if depth:
        raise ParseError("unterminated parenthesised list")
    return out, pos


def _quoted(data: bytes, pos: int) -> Tuple[bytes, int]:
    value = bytearray()
    while pos < len(data):
        char = data[pos]
        if char == 0x5C and pos + 1 < len(data):  # backslash
            value.append(data[pos + 1])
            pos += 2
        elif char == 0x22:
            return bytes(value), pos + 1
        elif char in (0x0D, 0x0A):
            break
        else:
            value.append(char)
            pos += 1
    raise ParseError("unterminated quoted string")


def quote(value: Union[str, bytes]) -> bytes:
    """``value`` as an IMAP quoted string."""
    raw = value.encode() if isinstance(value, str) else value
    if b"\r" in raw or b"\n" in raw:
        raise ValueError("CR and LF cannot be quoted; use a literal")
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


# ------------------------------------------------------------------ reading


class LineTooLong(ValueError):
    """A line exceeded the configured bound."""


class IncompleteRead(ConnectionError):
    """The peer closed the connection in the middle of a line or literal."""

    def __init__(self, partial: bytes) -> None:
        super().__init__(f"connection closed after {len(partial)} bytes of an incomplete unit")
        self.partial = partial


class LineReader:
    """Bytes from ``data_received``, read as lines and literals by one coroutine.

    A plain buffer instead of ``asyncio.StreamReader`` so that what is still
    unread can be inspected and handed over (R1 leftover, STOPTLS checks)
    through public methods.  Every wait is bounded by ``timeout``.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._eof = False
        self._exc: Optional[BaseException] = None
        self._waiter: Optional[asyncio.Future[None]] = None

    def feed(self, data: bytes) -> None:
        self._buf += data
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        self._wake()

    @property
    def pending(self) -> bytes:
        """Received bytes not yet read."""
        return bytes(self._buf)

    def take_pending(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    async def read_line(self, timeout: Optional[float]) -> bytes:
        """One line with its CRLF/LF; :class:`LineTooLong` past ``max_line``."""
        deadline = _deadline(timeout)
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                if nl + 1 > self.max_line:
                    raise LineTooLong(f"line longer than {self.max_line} bytes")
                line = bytes(self._buf[: nl + 1])
                del self._buf[: nl + 1]
                return line
            if len(self._buf) > self.max_line:
                raise LineTooLong(f"line longer than {self.max_line} bytes")
            await self._wait(deadline)

    async def read_exactly(self, size: int, timeout: Optional[float]) -> bytes:
        deadline = _deadline(timeout)
        while len(self._buf) < size:
            await self._wait(deadline)
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    async def _wait(self, deadline: Optional[float]) -> None:
        if self._eof:  # a clean EOF seen first stays the cause
            raise IncompleteRead(self.take_pending())
        if self._exc is not None:
            raise self._exc
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        remaining = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            await asyncio.wait_for(self._waiter, remaining)
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


# ------------------------------------------------------------------ mailbox


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DATE_TIME = re.compile(rb"[ \d]\d-[A-Za-z]{3}-\d{4} \d\d:\d\d:\d\d [+-]\d{4}\Z")
_SYSTEM_FLAGS = frozenset({"\\ANSWERED", "\\FLAGGED", "\\DELETED", "\\SEEN", "\\DRAFT"})
_FLAGS_LINE = b"(\\Answered \\Flagged \\Deleted \\Seen \\Draft)"


def _internal_date(now: Optional[float] = None) -> str:
    t = time.gmtime(now)
    return (
        f"{t.tm_mday:02d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )


@dataclass
class StoredMessage:
    """One appended message, with the phase it arrived in (evidence)."""

    data: bytes
    #: Appended under TLS?
    tls: bool
    tls_version: Optional[str]
    #: STARTTLS upgrades done on the connection so far: the k-th TLS session
    #: stores cycle k; plaintext after its STOPTLS still says k.
    cycle: int
    uid: int
    connection: int
    internal_date: str = field(default_factory=_internal_date)
    flags: Set[str] = field(default_factory=set)
    #: False when a truncated literal was stored (``ignore-truncation``).
    complete: bool = True


# ------------------------------------------------------------------ server


class _Bye(Exception):
    """End the session with an untagged BYE."""


class _Server:
    """What the connections of one server share."""

    def __init__(
        self, running: RunningServer, behaviour: Behaviour, context: ssl.SSLContext
    ) -> None:
        self.running = running
        self.config = running.config
        self.limits: Limits = running.config.limits
        self.behaviour = behaviour
        self.context = context
        self.uidvalidity = int(time.time()) & 0x7FFFFFFF or 1
        self.active = 0
        self.next_id = 1
        self.tasks: Set[asyncio.Task[None]] = set()

    @property
    def messages(self) -> List[StoredMessage]:
        return self.running.messages


Handler = Callable[["ImapServerProtocol", bytes, List[Token]], Awaitable[None]]

_NOT_AUTH, _AUTH, _SELECTED, _ANY = "not-authenticated", "authenticated", "selected", "any"

#: How many finished connection records ``RunningServer.connections`` keeps.
_KEEP_FINISHED = 256


class ImapServerProtocol(asyncio.Protocol):
    """One IMAP connection (see the module docstring)."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.behaviour = server.behaviour
        self.limits = server.limits
        self.id = server.next_id
        server.next_id += 1
        self.reader = LineReader(self.limits.max_line)
        self.predicate = StartTLSLine()
        self.transport: Optional[SwitchableTransport] = None
        self.authenticated = False
        self.selected: Optional[str] = None
        self.read_only = False
        self.exists = 0
        #: STARTTLS upgrades done on this connection.
        self.upgrades = 0
        #: Commands executed, with the phase they ran in (evidence).
        self.log: List[Tuple[str, bytes]] = []
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._counted = False
        self._stopping = False
        self._after_stoptls = b""
        self._closure: Optional[asyncio.Future[None]] = None
        self._close_notify: Optional[asyncio.Future[None]] = None

    # --------------------------------------------------- asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SwitchableTransport)
        self.transport = transport
        server = self.server
        server.running.connections.append(self)
        if server.active >= self.limits.max_connections:
            transport.write(b"* BYE [UNAVAILABLE] Too many connections\r\n")
            transport.close()
            self._finish()
            return
        server.active += 1
        self._counted = True
        transport.hold_after(self.predicate)
        task = asyncio.get_running_loop().create_task(self._session())
        server.tasks.add(task)
        task.add_done_callback(server.tasks.discard)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)

    def eof_received(self) -> bool:
        # Keep the transport open: the session decides (and may still store
        # a truncated APPEND under ``ignore-truncation``) and then closes.
        self.reader.feed_eof()
        return True

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        lost = exc or ConnectionResetError("connection closed")
        self.reader.set_exception(lost)
        for fut in (self._closure, self._close_notify):
            if fut is not None and not fut.done():
                fut.set_exception(lost)
        self._release_slot()
        self._prune()

    def _release_slot(self) -> None:
        if self._counted:
            self._counted = False
            self.server.active -= 1

    def engine_event(self, event: Event) -> None:
        """Closure bookkeeping; the misbehaving modes hook in here."""
        if isinstance(event, ClosureComplete):
            if self._stopping and self.reader.pending:
                # Sent under TLS after STOPTLS, before the closure.
                self._after_stoptls = self.reader.take_pending()
            _set(self._closure)
        elif isinstance(event, CloseNotifyReceived):
            _set(self._close_notify)
            if (
                not self.behaviour.policy.enforces(Rule.R5)
                and self.transport is not None
                and self.transport.engine.state is State.CLOSE_RECEIVED
            ):
                # no-close-notify-reply: hang up instead of answering.
                self.transport.close()
        elif (
            isinstance(event, AlertReceived)
            and not self.behaviour.policy.enforces(Rule.R7)
            and self.transport is not None
            and self.transport.engine.state is State.PLAINTEXT
        ):
            # alert-as-close: the alert is taken for a closure.
            self._reset()
            self._write(self._greeting(b"TLS ended by alert; plaintext resumed"))

    # ------------------------------------------------------------ session

    async def _session(self) -> None:
        try:
            self._write(self._greeting(b"starttls-harness IMAP4rev1 server ready"))
            while self.transport is not None and not self.transport.is_closing():
                command = await self._read_command()
                if command is not None:
                    await self._execute(*command)
        except _Bye as bye:
            self._write(b"* BYE " + str(bye).encode() + b"\r\n")
        except LineTooLong:
            self._write(b"* BYE Line too long\r\n")
        except asyncio.TimeoutError:
            self._write(b"* BYE Autologout; idle for too long\r\n")
        except (ConnectionError, LocalProtocolError, TransitionError, ssl.SSLError):
            pass
        finally:
            if self.transport is not None:
                self.transport.close()
            self._finish()

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(LocalProtocolError):
            transport.write(data)

    def _phase(self) -> str:
        assert self.transport is not None
        return f"tls{self.upgrades}" if self.transport.tls_active else f"plain{self.upgrades}"

    def _finish(self) -> None:
        self._release_slot()
        if not self.finished.done():
            self.finished.set_result(None)

    def _prune(self) -> None:
        conns = self.server.running.connections
        done = [c for c in conns if getattr(c, "finished", None) is not None and c.finished.done()]
        for old in done[: max(0, len(done) - _KEEP_FINISHED)]:
            conns.remove(old)

    async def _read_command(self) -> Optional[Tuple[bytes, bytes]]:
        """One command with its literals inline: ``(tag, raw)``, or None if refused."""
        timeout = self.limits.idle_timeout
        line = await self.reader.read_line(timeout)
        raw = bytearray(line)
        tag_match = _TAG_RE.match(line)
        tag = tag_match.group(0) if tag_match is not None else b""
        literals = 0
        while True:
            announced = LITERAL_AT_END.search(line)
            if announced is None:
                if tag_match is None:
                    self._untagged_bad()
                    return None
                return tag, bytes(raw)
            size, synchronizing = int(announced.group(1)), not announced.group(2)
            literals += 1
            if (
                tag_match is None
                or size > min(self.limits.max_literal, self.limits.max_message)
                or literals > 16
            ):
                self.predicate.cancel_literal()
                if not synchronizing:
                    raise _Bye("[TOOBIG] Literal refused")
                if tag_match is None:
                    self._untagged_bad()
                    return None
                self._write(tag + b" NO [TOOBIG] Literal too large\r\n")
                return None
            if synchronizing:
                self._write(b"+ Ready for literal data\r\n")
            try:
                raw += await self.reader.read_exactly(size, timeout)
            except IncompleteRead as cut:
                self._truncated_literal(bytes(raw), cut.partial)
                raise
            line = await self.reader.read_line(timeout)
            raw += line

    def _untagged_bad(self) -> None:
        self._write(b"* BAD Missing or invalid tag\r\n")

    def _truncated_literal(self, head: bytes, partial: bytes) -> None:
        """EOF inside a literal: discarded (R6), unless ``ignore-truncation``."""
        if self.behaviour.name != "ignore-truncation" or not self.authenticated:
            return
        words = head.split(None, 2)
        if len(words) >= 2 and words[1].upper() == b"APPEND":
            self._store(partial, complete=False)

    async def _execute(self, tag: bytes, raw: bytes) -> None:
        assert self.transport is not None
        try:
            tokens = tokenize(raw)
        except ParseError as exc:
            self._write(tag + b" BAD " + str(exc).encode() + b"\r\n")
            return
        if len(tokens) < 2 or not isinstance(tokens[1], Atom):
            self._write(tag + b" BAD Missing command\r\n")
            return
        name = bytes(tokens[1]).upper().decode("ascii", "replace")
        args = tokens[2:]
        if name == "UID" and args and isinstance(args[0], Atom):
            name = "UID " + bytes(args[0]).upper().decode("ascii", "replace")
            args = args[1:]
        shown = raw.split(b"\r\n", 1)[0][:200]
        if name in ("LOGIN", "AUTHENTICATE"):
            shown = tag + b" " + name.encode() + b" <redacted>"
        self.log.append((self._phase(), shown))
        entry = COMMANDS.get(name)
        if entry is None:
            self._write(tag + b" BAD Unknown command\r\n")
            return
        state, handler = entry
        problem = self._state_problem(state)
        if problem is not None:
            self._write(tag + b" BAD " + problem + b"\r\n")
            return
        await handler(self, tag, args)

    def _state_problem(self, needed: str) -> Optional[bytes]:
        if needed == _ANY:
            return None
        if needed == _NOT_AUTH and self.authenticated:
            return b"Already authenticated"
        if needed in (_AUTH, _SELECTED) and not self.authenticated:
            return b"Not authenticated; LOGIN first"
        if needed == _SELECTED and self.selected is None:
            return b"No mailbox selected"
        return None

    # ------------------------------------------------------------ state

    def _capabilities(self) -> bytes:
        assert self.transport is not None
        caps = [b"IMAP4rev1", b"LITERAL+"]
        if self.transport.tls_active:
            caps.append(b"STOPTLS")
        else:
            caps += [b"STARTTLS", b"LOGINDISABLED"]
        return b" ".join(caps)

    def _greeting(self, text: bytes) -> bytes:
        return b"* OK [CAPABILITY " + self._capabilities() + b"] " + text + b"\r\n"

    def _reset(self) -> None:
        """R8: back to the state at connection start (unless no-state-reset)."""
        self.predicate.cancel_literal()
        if self.behaviour.name == "no-state-reset":
            return
        self.authenticated = False
        self.selected = None
        self.read_only = False
        self.exists = 0

    def _store(
        self,
        data: bytes,
        *,
        flags: FrozenSet[str] = frozenset(),
        date: Optional[str] = None,
        complete: bool = True,
    ) -> StoredMessage:
        assert self.transport is not None
        messages = self.server.messages
        message = StoredMessage(
            data=data,
            tls=self.transport.tls_active,
            tls_version=self.transport.tls_version,
            cycle=self.upgrades,
            uid=len(messages) + 1,
            connection=self.id,
            flags=set(flags),
            complete=complete,
        )
        if date is not None:
            message.internal_date = date
        messages.append(message)
        return message

    def _announce(self) -> bytes:
        """``* n EXISTS`` when the selected INBOX grew."""
        count = len(self.server.messages)
        if self.selected is None or count == self.exists:
            return b""
        self.exists = count
        return b"* %d EXISTS\r\n" % count

    # --------------------------------------------------------- commands

    async def cmd_capability(self, tag: bytes, args: List[Token]) -> None:
        if args:
            self._write(tag + b" BAD CAPABILITY takes no arguments\r\n")
            return
        self._write(
            b"* CAPABILITY "
            + self._capabilities()
            + b"\r\n"
            + tag
            + b" OK CAPABILITY completed\r\n"
        )

    async def cmd_noop(self, tag: bytes, args: List[Token]) -> None:
        self._write(self._announce() + tag + b" OK NOOP completed\r\n")

    async def cmd_check(self, tag: bytes, args: List[Token]) -> None:
        self._write(self._announce() + tag + b" OK CHECK completed\r\n")

    async def cmd_logout(self, tag: bytes, args: List[Token]) -> None:
        assert self.transport is not None
        self._write(b"* BYE Logging out\r\n" + tag + b" OK LOGOUT completed\r\n")
        self.transport.close()

    async def cmd_authenticate(self, tag: bytes, args: List[Token]) -> None:
        self._write(tag + b" NO [CANNOT] No SASL mechanism is offered; use LOGIN\r\n")

    async def cmd_starttls(self, tag: bytes, args: List[Token]) -> None:
        transport = self.transport
        assert transport is not None
        if args or transport.tls_active:
            why = b"TLS is already active" if transport.tls_active else b"No arguments allowed"
            self._write(tag + b" BAD " + why + b"\r\n")
            if not transport.tls_active and transport.engine.held:
                transport.release_held()
            return
        # Anything our own reader already holds beyond the STARTTLS line is
        # R1 leftover too (the gate should have kept it back).
        leftover = self.reader.take_pending()
        self.predicate.cancel_literal()
        await transport.start_tls(
            self.server.context,
            server_side=True,
            preface=tag + b" OK Begin TLS negotiation now\r\n",
            leftover=leftover,
        )
        self.upgrades += 1
        self._reset()

    async def cmd_stoptls(self, tag: bytes, args: List[Token]) -> None:
        transport = self.transport
        assert transport is not None
        if not transport.tls_active:
            self._write(tag + b" BAD STOPTLS is only valid under TLS\r\n")
            return
        if args or self.reader.pending:
            self._write(tag + b" BAD STOPTLS takes no arguments and must end the pipeline\r\n")
            return
        answer = tag + b" OK Begin TLS closure\r\n"
        loop = asyncio.get_running_loop()
        closure_timeout = self.server.config.timeouts.closure
        name = self.behaviour.name
        if name == "early-plaintext":
            # R3 broken: close_notify and plaintext leave together, before
            # the client's close_notify can have arrived.
            self._closure = loop.create_future()
            with transport.corked():
                transport.write(answer)
                transport.events.extend(transport.engine.unwrap())
                self._reset()
                transport.write_raw(self._greeting(b"Plaintext resumed"))
            await asyncio.wait_for(self._closure, closure_timeout)
            return
        if name == "no-close-notify-reply":
            # R5 broken: the client's close_notify is never answered; the
            # engine_event hook closes TCP when it arrives.
            self._close_notify = loop.create_future()
            transport.write(answer)
            await asyncio.wait_for(self._close_notify, closure_timeout)
            return
        self._stopping = True
        try:
            await transport.accept_unwrap(preface=answer)
        finally:
            self._stopping = False
        if self._after_stoptls:
            raise _Bye("Commands were pipelined after STOPTLS")
        self._reset()
        self._write(self._greeting(b"Plaintext resumed"))

    async def cmd_login(self, tag: bytes, args: List[Token]) -> None:
        assert self.transport is not None
        if not self.transport.tls_active:
            self._write(tag + b" NO [PRIVACYREQUIRED] LOGIN is disabled until STARTTLS\r\n")
            return
        if len(args) != 2 or any(isinstance(a, list) for a in args):
            self._write(tag + b" BAD LOGIN needs a user name and a password\r\n")
            return
        user, password = (bytes(a) for a in args if not isinstance(a, list))
        config = self.server.config
        if user != config.user.encode() or password != config.password.encode():
            self._write(tag + b" NO [AUTHENTICATIONFAILED] Invalid credentials\r\n")
            return
        self.authenticated = True
        self._write(tag + b" OK [CAPABILITY " + self._capabilities() + b"] LOGIN completed\r\n")

    async def cmd_select(self, tag: bytes, args: List[Token], read_only: bool = False) -> None:
        verb = b"EXAMINE" if read_only else b"SELECT"
        if len(args) != 1 or isinstance(args[0], list):
            self._write(tag + b" BAD " + verb + b" needs one mailbox name\r\n")
            return
        self.selected = None
        if bytes(args[0]).upper() != b"INBOX":
            self._write(tag + b" NO [NONEXISTENT] Only INBOX exists\r\n")
            return
        self.selected = "INBOX"
        self.read_only = read_only
        count = len(self.server.messages)
        self.exists = count
        self._write(
            b"* FLAGS " + _FLAGS_LINE + b"\r\n"
            b"* OK [PERMANENTFLAGS "
            + _FLAGS_LINE[:-1]
            + b" \\*)] Flags permitted\r\n"
            + b"* %d EXISTS\r\n* 0 RECENT\r\n" % count
            + b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % self.server.uidvalidity
            + b"* OK [UIDNEXT %d] Predicted next UID\r\n" % (count + 1)
            + tag
            + (b" OK [READ-ONLY] " if read_only else b" OK [READ-WRITE] ")
            + verb
            + b" completed\r\n"
        )

    async def cmd_examine(self, tag: bytes, args: List[Token]) -> None:
        await self.cmd_select(tag, args, read_only=True)

    async def cmd_close(self, tag: bytes, args: List[Token]) -> None:
        self.selected = None
        self._write(tag + b" OK CLOSE completed\r\n")

    async def cmd_append(self, tag: bytes, args: List[Token]) -> None:
        if len(args) < 2 or not isinstance(args[-1], Literal) or isinstance(args[0], list):
            self._write(tag + b" BAD APPEND needs a mailbox and a message literal\r\n")
            return
        if bytes(args[0]).upper() != b"INBOX":
            self._write(tag + b" NO [TRYCREATE] Only INBOX exists\r\n")
            return
        flags: Set[str] = set()
        date: Optional[str] = None
        for extra in args[1:-1]:
            if isinstance(extra, list) and not flags:
                for flag in extra:
                    if not isinstance(flag, Atom):
                        self._write(tag + b" BAD Flags are atoms\r\n")
                        return
                    flags.add(bytes(flag).decode("ascii", "replace"))
            elif isinstance(extra, bytes) and not isinstance(extra, Atom) and date is None:
                if not _DATE_TIME.match(extra):
                    self._write(tag + b" BAD Invalid date-time\r\n")
                    return
                date = extra.decode("ascii")
            else:
                self._write(tag + b" BAD Invalid APPEND arguments\r\n")
                return
        if any(f.startswith("\\") and f.upper() not in _SYSTEM_FLAGS for f in flags):
            self._write(tag + b" BAD Unknown system flag\r\n")
            return
        message = self._store(bytes(args[-1]), flags=frozenset(flags), date=date)
        self._write(self._announce() + tag + b" OK APPEND completed (UID %d)\r\n" % message.uid)

    async def cmd_fetch(self, tag: bytes, args: List[Token], by_uid: bool = False) -> None:
        if len(args) != 2 or not isinstance(args[0], Atom):
            self._write(tag + b" BAD FETCH needs a sequence set and items\r\n")
            return
        head = self._announce()
        messages = self.server.messages[: self.exists]
        try:
            numbers = _sequence_set(bytes(args[0]), len(messages))
            items = _fetch_items(args[1], by_uid)
        except ParseError as exc:
            self._write(tag + b" BAD " + str(exc).encode() + b"\r\n")
            return
        out = bytearray(head)
        for number in numbers:
            out += self._fetch_one(number, messages[number - 1], items)
        self._write(bytes(out) + tag + b" OK FETCH completed\r\n")

    async def cmd_uid_fetch(self, tag: bytes, args: List[Token]) -> None:
        # UIDs equal sequence numbers here: nothing is ever expunged.
        await self.cmd_fetch(tag, args, by_uid=True)

    def _fetch_one(self, number: int, message: StoredMessage, items: List[_Item]) -> bytes:
        parts: List[bytes] = []
        if not self.read_only and any(item.sets_seen for item in items):
            if "\\Seen" not in message.flags:
                message.flags.add("\\Seen")
                if not any(item.name == "FLAGS" for item in items):
                    items = [_Item("FLAGS"), *items]
        for item in items:
            parts.append(item.render(message))
        return b"* %d FETCH (" % number + b" ".join(parts) + b")\r\n"


@dataclass
class _Item:
    """One FETCH data item."""

    name: str
    section: str = ""
    partial: Optional[Tuple[int, int]] = None
    sets_seen: bool = False

    def render(self, message: StoredMessage) -> bytes:
        data = message.data
        if self.name == "FLAGS":
            return b"FLAGS (" + " ".join(sorted(message.flags)).encode() + b")"
        if self.name == "UID":
            return b"UID %d" % message.uid
        if self.name == "INTERNALDATE":
            return b'INTERNALDATE "' + message.internal_date.encode() + b'"'
        if self.name == "RFC822.SIZE":
            return b"RFC822.SIZE %d" % len(data)
        header, text = _split(data)
        if self.name in ("RFC822", "RFC822.HEADER", "RFC822.TEXT"):
            body = {"RFC822": data, "RFC822.HEADER": header, "RFC822.TEXT": text}[self.name]
            return self.name.encode() + b" " + _literal(body)
        body = {"": data, "HEADER": header, "TEXT": text}[self.section]
        label = b"BODY[" + self.section.encode() + b"]"
        if self.partial is not None:
            start, count = self.partial
            body = body[start : start + count]
            label += b"<%d>" % start
        return label + b" " + _literal(body)


_BODY_ITEM = re.compile(r"BODY(\.PEEK)?\[(HEADER|TEXT|)\](?:<(\d{1,10})\.(\d{1,10})>)?\Z")
_SIMPLE_ITEMS = frozenset(
    {"FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "RFC822", "RFC822.HEADER", "RFC822.TEXT"}
)
_MACROS = {"FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]}


def _fetch_items(spec: Token, by_uid: bool) -> List[_Item]:
    names: List[Token] = spec if isinstance(spec, list) else [spec]
    if not names:
        raise ParseError("no FETCH items")
    items: List[_Item] = []
    for token in names:
        if not isinstance(token, Atom):
            raise ParseError("FETCH items are atoms")
        name = bytes(token).decode("ascii", "replace").upper()
        if name in _MACROS and not isinstance(spec, list):
            items.extend(_Item(n) for n in _MACROS[name])
        elif name in _SIMPLE_ITEMS:
            items.append(_Item(name, sets_seen=name in ("RFC822", "RFC822.TEXT")))
        else:
            match = _BODY_ITEM.match(name)
            if match is None:
                raise ParseError(f"unsupported FETCH item {name[:40]}")
            partial = None
            if match.group(3) is not None:
                partial = (int(match.group(3)), int(match.group(4)))
            items.append(_Item("BODY", match.group(2), partial, sets_seen=not match.group(1)))
    if by_uid and not any(item.name == "UID" for item in items):
        items.insert(0, _Item("UID"))
    return items


def _sequence_set(text: bytes, count: int) -> List[int]:
    """Expand ``1,3:5,7:*`` against ``count`` messages (sorted, unique)."""
    numbers: Set[int] = set()
    for part in text.split(b","):
        bounds = part.split(b":")
        if len(bounds) > 2 or not all(bounds):
            raise ParseError("invalid sequence set")
        values = []
        for bound in bounds:
            if bound == b"*":
                if count == 0:
                    raise ParseError("the mailbox is empty")
                values.append(count)
            elif bound.isdigit() and 0 < int(bound) <= count:
                values.append(int(bound))
            else:
                raise ParseError("invalid message sequence number")
        low, high = min(values), max(values)
        numbers.update(range(low, high + 1))
    return sorted(numbers)


def _split(data: bytes) -> Tuple[bytes, bytes]:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[: end + 4], data[end + 4 :]


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


def _set(fut: Optional[asyncio.Future[None]]) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


#: Dispatch table: command name -> (state it needs, handler).
COMMANDS: Dict[str, Tuple[str, Handler]] = {
    "CAPABILITY": (_ANY, ImapServerProtocol.cmd_capability),
    "NOOP": (_ANY, ImapServerProtocol.cmd_noop),
    "LOGOUT": (_ANY, ImapServerProtocol.cmd_logout),
    "STARTTLS": (_ANY, ImapServerProtocol.cmd_starttls),
    "STOPTLS": (_ANY, ImapServerProtocol.cmd_stoptls),
    "LOGIN": (_NOT_AUTH, ImapServerProtocol.cmd_login),
    "AUTHENTICATE": (_NOT_AUTH, ImapServerProtocol.cmd_authenticate),
    "SELECT": (_AUTH, ImapServerProtocol.cmd_select),
    "EXAMINE": (_AUTH, ImapServerProtocol.cmd_examine),
    "APPEND": (_AUTH, ImapServerProtocol.cmd_append),
    "CHECK": (_SELECTED, ImapServerProtocol.cmd_check),
    "CLOSE": (_SELECTED, ImapServerProtocol.cmd_close),
    "UNSELECT": (_SELECTED, ImapServerProtocol.cmd_close),
    "FETCH": (_SELECTED, ImapServerProtocol.cmd_fetch),
    "UID FETCH": (_SELECTED, ImapServerProtocol.cmd_uid_fetch),
}


async def start_server(config: ServerConfig) -> RunningServer:
    """Start the reference IMAP server (``config.behaviour`` picks a mode)."""
    behaviour = behaviour_named(BEHAVIOURS, config.behaviour)
    context = config.ssl_context()
    holder: List[_Server] = []

    def factory() -> ImapServerProtocol:
        return ImapServerProtocol(holder[0])

    server = await create_server(
        factory,
        config.host,
        config.port,
        policy=behaviour.policy,
        timeouts=config.timeouts,
    )
    running = ImapRunningServer(server, config)
    state = _Server(running, behaviour, context)
    running.sessions = state.tasks
    holder.append(state)
    return running


@dataclass
class ImapRunningServer(RunningServer):
    """:class:`RunningServer` whose ``close()`` also waits for the sessions."""

    sessions: Set[asyncio.Task[None]] = field(default_factory=set)

    async def close(self) -> None:
        await super().close()
        pending = list(self.sessions)
        if pending:
            await asyncio.wait(pending, timeout=self.config.timeouts.closure)
