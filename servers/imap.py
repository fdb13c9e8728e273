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
* ``resume-without-stoptls`` (R3) -- a close_notify that no STOPTLS asked
  for is answered and plaintext resumes (a new ``* OK`` greeting), instead
  of the connection ending.
* ``one-sided-bare-resume`` (R4) -- ``Policy.relaxing(R4)`` and the bare
  return of ``resume-without-stoptls``: plaintext glued to a close_notify
  without STOPTLS is answered as plaintext.
* ``plaintext-goodbye`` (R3) -- a close_notify without STOPTLS is answered,
  then ``* BYE`` is written in plaintext before TCP is closed; so is one
  after a truncation (TCP EOF under TLS).
* ``accept-stoptls-in-plaintext`` (R3) -- STOPTLS outside TLS gets the
  tagged OK (there is no TLS to end).
* ``accept-starttls-in-tls`` (R8) -- a second STARTTLS inside TLS gets the
  tagged OK (the session stays in TLS).

Layout: the wire syntax both reference peers read IMAP with (tokenizer,
:class:`StartTLSLine`, :class:`LineReader`) is in
:mod:`starttls_harness.servers.imapsyntax` (its names stay importable from
here), the mailbox and FETCH rendering in
:mod:`starttls_harness.servers.imapmailbox`; this module is the session.

``start_server(config)`` returns a :class:`servers.base.RunningServer`
whose ``messages`` list is the shared INBOX (:class:`StoredMessage`) and
whose ``connections`` holds one :class:`ImapServerProtocol` per connection
(transport, engine events, violations) for tests and evidence.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import (
    Awaitable,
    Callable,
    Dict,
    FrozenSet,
    List,
    Optional,
    Set,
    Tuple,
)

from starttls_harness.servers.base import (
    Behaviour,
    ExtraModes,
    Limits,
    RunningServer,
    ServerConfig,
    behaviour_named,
)
from starttls_harness.servers.imapmailbox import (
    DATE_TIME,
    FLAGS_LINE,
    SYSTEM_FLAGS,
    FetchItem,
    StoredMessage,
    fetch_items,
    sequence_set,
)
from starttls_harness.servers.imapsyntax import (
    LITERAL_AT_END,
    TAG_RE,
    Atom,
    IncompleteRead,
    LineReader,
    LineTooLong,
    Literal,
    ParseError,
    StartTLSLine,
    Token,
    is_starttls_line,
    tokenize,
)

# The wire syntax lives in imapsyntax (the reference client reads IMAP with it
# too); its public names stay importable from here.
from starttls_harness.servers.lines import (
    ConnectionCount,
    SessionsRunningServer,
    server_behaviours,
)
from starttls_harness.tls.aio import SwitchableTransport, create_server
from starttls_harness.tls.engine import (
    LocalProtocolError,
    TransitionError,
)

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

BEHAVIOURS: Dict[str, Behaviour] = server_behaviours(
    "STARTTLS", cut="an APPEND literal", keeps="the authenticated state"
)

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


class ImapServerProtocol(ConnectionCount):
    """One IMAP connection (see the module docstring)."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.behaviour = server.behaviour
        self.limits = server.limits
        self.reader = LineReader(self.limits.max_line)
        self.predicate = StartTLSLine()
        self.transport: Optional[SwitchableTransport] = None
        self.authenticated = False
        self.selected: Optional[str] = None
        self.read_only = False
        self.exists = 0
        #: STARTTLS upgrades done on this connection.
        self.upgrades = 0
        self.extra = ExtraModes(self.behaviour, _goodbye)
        #: Commands executed, with the phase they ran in (evidence).
        self.log: List[Tuple[str, bytes]] = []
        self._count_in(server, server.running.connections)
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
        refusal = b"* BYE [UNAVAILABLE] Too many connections\r\n"
        if not self._take_slot(transport, self.limits.max_connections, refusal):
            return
        transport.hold_after(self.predicate)
        task = asyncio.get_running_loop().create_task(self._session())
        server.tasks.add(task)
        task.add_done_callback(server.tasks.discard)

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

    def _phase(self) -> str:
        assert self.transport is not None
        return f"tls{self.upgrades}" if self.transport.tls_active else f"plain{self.upgrades}"

    async def _read_command(self) -> Optional[Tuple[bytes, bytes]]:
        """One command with its literals inline: ``(tag, raw)``, or None if refused."""
        timeout = self.limits.idle_timeout
        line = await self.reader.read_line(timeout)
        raw = bytearray(line)
        tag_match = TAG_RE.match(line)
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

    def _resumed_greeting(self) -> bytes:
        return self._greeting(b"Plaintext resumed")

    def _greeting_after_alert(self) -> bytes:
        return self._greeting(b"TLS ended by alert; plaintext resumed")

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
        if transport.tls_active and not args and self.behaviour.name == "accept-starttls-in-tls":
            self._write(tag + b" OK Begin TLS negotiation now\r\n")  # R8 broken
            return
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
        self.extra.handshake_done(transport)

    async def cmd_stoptls(self, tag: bytes, args: List[Token]) -> None:
        transport = self.transport
        assert transport is not None
        if not transport.tls_active:
            if self.behaviour.name == "accept-stoptls-in-plaintext":
                self._write(tag + b" OK Begin TLS closure\r\n")  # R3 broken: no TLS
                return
            self._write(tag + b" BAD STOPTLS is only valid under TLS\r\n")
            return
        self.extra.stoptls_asked()
        if args or self.reader.pending:
            self._write(tag + b" BAD STOPTLS takes no arguments and must end the pipeline\r\n")
            return
        answer = tag + b" OK Begin TLS closure\r\n"
        if not await self._close_then_greet(answer, self.server.config.timeouts.closure):
            raise _Bye("Commands were pipelined after STOPTLS")

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
            b"* FLAGS " + FLAGS_LINE + b"\r\n"
            b"* OK [PERMANENTFLAGS "
            + FLAGS_LINE[:-1]
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
                if not DATE_TIME.match(extra):
                    self._write(tag + b" BAD Invalid date-time\r\n")
                    return
                date = extra.decode("ascii")
            else:
                self._write(tag + b" BAD Invalid APPEND arguments\r\n")
                return
        if any(f.startswith("\\") and f.upper() not in SYSTEM_FLAGS for f in flags):
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
            numbers = sequence_set(bytes(args[0]), len(messages))
            items = fetch_items(args[1], by_uid)
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

    def _fetch_one(self, number: int, message: StoredMessage, items: List[FetchItem]) -> bytes:
        parts: List[bytes] = []
        if not self.read_only and any(item.sets_seen for item in items):
            if "\\Seen" not in message.flags:
                message.flags.add("\\Seen")
                if not any(item.name == "FLAGS" for item in items):
                    items = [FetchItem("FLAGS"), *items]
        for item in items:
            parts.append(item.render(message))
        return b"* %d FETCH (" % number + b" ".join(parts) + b")\r\n"


def _goodbye(why: str) -> bytes:
    """IMAP's goodbye: an untagged ``BYE`` before the server closes."""
    return b"* BYE " + why.encode() + b"\r\n"


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


class ImapRunningServer(SessionsRunningServer):
    """:class:`RunningServer` whose ``close()`` also waits for the sessions."""
