"""Reference SMTP server: aiosmtpd's command handling on the harness transport.

Why this shape
==============

aiosmtpd parses and answers SMTP commands well, but its STARTTLS reaches
into asyncio's private ``sslproto`` and clears the stream reader's private
buffer, and it cannot return to plaintext.  :class:`ReferenceSMTP`
subclasses :class:`aiosmtpd.smtp.SMTP` and keeps everything except the TLS
switch, which runs in the harness engine (:mod:`starttls_harness.tls.aio`):

* aiosmtpd never gets a ``tls_context``: it sees one ordinary transport (a
  :class:`~starttls_harness.tls.aio.SwitchableTransport`, passed to ``connection_made``
  once), and the STARTTLS/STOPTLS/AUTH keywords are edited in the handler's
  public ``handle_EHLO`` hook;
* ``smtp_STARTTLS`` and ``smtp_STOPTLS`` are overridden and call
  ``transport.start_tls(preface=...)`` / ``transport.accept_unwrap(preface=...)``;
* the R1 leftover is caught by the engine's *hold gate*, armed at
  connection start with a predicate that is true for a ``STARTTLS`` command
  line: bytes after that line never reach aiosmtpd's reader, and the engine
  refuses the upgrade when any were received (nothing is cleared).

The gate predicate tells command lines from DATA body lines *lexically*: a
``DATA`` line starts a body, a ``.`` line ends it.  Limitation: when the
server rejects ``DATA`` (no recipient, say) while the client has pipelined
more lines, the lexer still takes them for body lines, so a ``STARTTLS``
among them is not gated.  That ``STARTTLS`` is then refused with ``454`` (the
server only upgrades after a gated line, so no plaintext can leak into
TLS) and the lexer resynchronises; the client may simply send it again.
Under TLS a second lexer guards ``STOPTLS`` the same way: bytes pipelined
after it are withheld and the connection is refused (the extension forbids
pipelining after ``STOPTLS``).

The server is a mail sink: it never relays.  Accepted messages go to
``RunningServer.messages`` as :class:`ReceivedMessage` (envelope, content,
whether it arrived under TLS and in which TLS cycle).  ``AUTH PLAIN`` is
offered only under TLS, for ``ServerConfig.user``/``password``, so that the
state reset after every transition (R8) can be observed: after ``STOPTLS``
or a new ``STARTTLS`` the session is no longer authenticated and needs a
new ``EHLO``.

Behaviours (``ServerConfig.behaviour``; each breaks exactly one rule)
====================================================================

``strict``
    Follows every rule.
``keep-buffer`` (R1)
    Plaintext pipelined after ``STARTTLS`` is executed inside TLS
    (CVE-2011-0411's class): the engine relaxes R1.
``plaintext-in-tls`` (R2)
    Non-TLS bytes received while TLS is up are taken as commands and
    answered (under TLS): the engine relaxes R2.
``early-plaintext`` (R3)
    After ``STOPTLS`` the server sends its ``220`` answer, its own
    close_notify and the new plaintext greeting in one segment, without
    waiting for the client's close_notify.
``one-sided-resume`` (R4)
    Accepts plaintext that follows the client's close_notify in the same
    flight (the client did not wait for the answer): the engine relaxes R4.
``no-close-notify-reply`` (R5)
    Never answers the client's close_notify (after ``STOPTLS`` or not);
    closes TCP instead.
``ignore-truncation`` (R6)
    A DATA body cut by TCP EOF under TLS is stored as a message anyway
    (the engine reports the EOF as clean, the server completes the body).
``alert-as-close`` (R7)
    A fatal TLS alert is taken for a closure: the server returns to
    plaintext, greets again and answers plaintext commands.
``no-state-reset`` (R8)
    EHLO and AUTH state survive STARTTLS and STOPTLS.
``resume-without-stoptls`` (R3)
    A close_notify that no ``STOPTLS`` asked for is answered and plaintext
    resumes with a new ``220`` greeting, instead of the connection ending.
``one-sided-bare-resume`` (R4)
    The engine relaxes R4 and the bare return above is armed: plaintext
    glued to a close_notify without ``STOPTLS`` is answered as plaintext.
``plaintext-goodbye`` (R3)
    A close_notify without ``STOPTLS`` is answered, then a plaintext
    ``421`` goodbye is written before TCP is closed; so is one after a
    truncation (TCP EOF under TLS).
``accept-stoptls-in-plaintext`` (R3)
    ``STOPTLS`` outside TLS gets the positive ``220`` (no TLS to end).
``accept-starttls-in-tls`` (R8)
    A second ``STARTTLS`` inside TLS gets the positive ``220`` (the session
    stays in TLS).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Type, TypeVar

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax
from starttls_harness.servers.base import (
    BARE_RESUME,
    EXTRA_BEHAVIOURS,
    STRICT,
    Behaviour,
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
    PlaintextData,
    Rule,
    TLSData,
    Violation,
)

__all__ = [
    "BEHAVIOURS",
    "IDENT",
    "ReceivedMessage",
    "ReferenceSMTP",
    "SMTPConnection",
    "start_server",
]

#: Software name in the greeting.
IDENT = "starttls-harness reference SMTP sink (never relays)"
READY_TO_START = b"220 2.0.0 Ready to start TLS\r\n"
READY_TO_END = b"220 2.0.0 Ready to end TLS\r\n"
#: Oldest messages are dropped beyond this many (memory bound of a sink).
MAX_STORED_MESSAGES = 1000
#: Finished connection records kept for inspection.
CONNECTION_HISTORY = 256
#: Application bytes recorded per connection (evidence, bounded).
RECORD_LIMIT = 1 << 16

BEHAVIOURS: Dict[str, Behaviour] = {
    b.name: b
    for b in (
        STRICT,
        Behaviour(
            "keep-buffer",
            Rule.R1,
            "executes plaintext pipelined after STARTTLS inside TLS",
            (Rule.R1,),
        ),
        Behaviour(
            "plaintext-in-tls",
            Rule.R2,
            "answers plaintext commands received while TLS is up",
            (Rule.R2,),
        ),
        Behaviour(
            "early-plaintext",
            Rule.R3,
            "after STOPTLS sends close_notify and the plaintext greeting at once,"
            " without waiting for the client's close_notify",
        ),
        Behaviour(
            "one-sided-resume",
            Rule.R4,
            "accepts plaintext sent right after the client's close_notify",
            (Rule.R4,),
        ),
        Behaviour(
            "no-close-notify-reply",
            Rule.R5,
            "never answers the client's close_notify; closes TCP instead",
            (Rule.R5,),
        ),
        Behaviour(
            "ignore-truncation",
            Rule.R6,
            "stores a DATA body cut by TCP EOF under TLS as a message",
            (Rule.R6,),
        ),
        Behaviour(
            "alert-as-close",
            Rule.R7,
            "takes a fatal TLS alert for a closure and resumes plaintext",
            (Rule.R7,),
        ),
        Behaviour(
            "no-state-reset",
            Rule.R8,
            "keeps EHLO and AUTH state across STARTTLS and STOPTLS",
        ),
        *EXTRA_BEHAVIOURS,
    )
}


@dataclass(frozen=True)
class ReceivedMessage:
    """One accepted message (the sink's only output)."""

    mail_from: str
    rcpt_tos: Tuple[str, ...]
    content: bytes
    #: True when the DATA command completed while the session was in TLS.
    tls: bool
    #: TLS sessions started on the connection so far: 0 before the first
    #: STARTTLS, 1 in the first TLS session and the plaintext after it, ...
    cycle: int
    tls_version: Optional[str]
    #: The AUTH user the session was authenticated as, if any.
    auth_user: Optional[str]
    connection: int


@dataclass
class SMTPConnection:
    """What the server saw on one connection (for tests and evidence)."""

    id: int
    transport: Optional[SwitchableTransport] = None
    #: Application bytes handed to the command parser, with the phase
    #: ("plaintext" or "tls") they were received in; bounded.
    received: List[Tuple[str, bytes]] = field(default_factory=list)
    #: Why the connection ended, when it did not end cleanly.
    error: Optional[BaseException] = None
    tls_cycles: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _recorded: int = 0

    @property
    def violations(self) -> List[Violation]:
        return self.transport.violations if self.transport is not None else []

    def received_in(self, phase: str) -> bytes:
        return b"".join(data for p, data in self.received if p == phase)

    def record(self, phase: str, data: bytes) -> None:
        room = RECORD_LIMIT - self._recorded
        if room > 0 and data:
            self.received.append((phase, data[:room]))
            self._recorded += min(room, len(data))


class _CommandLexer:
    """Tells SMTP command lines from DATA body lines without parsing SMTP.

    Mirrors aiosmtpd: commands end at LF, a body line at CRLF, and the body
    ends at a line that is exactly ``.`` CRLF.  See the module docstring
    for the one case where it can disagree with the server.
    """

    def __init__(self) -> None:
        self.in_data = False
        self._body_line = b""

    def reset(self) -> None:
        self.in_data = False
        self._body_line = b""

    def verb(self, line: bytes) -> Optional[bytes]:
        """The command word of ``line`` (upper case), or None in a body."""
        if self.in_data:
            line = self._body_line + line
            if not line.endswith(b"\r\n"):
                self._body_line = line
                return None
            self._body_line = b""
            if line == b".\r\n":
                self.in_data = False
            return None
        word = line.strip().upper()
        if word == b"DATA":
            self.in_data = True
        return word


class _LineSplitter:
    """Cuts a byte stream into complete lines for a :class:`_CommandLexer`."""

    def __init__(self, limit: int) -> None:
        self.partial = b""
        self.limit = limit

    def lines(self, data: bytes) -> List[Tuple[int, bytes]]:
        """Complete lines of ``data`` with their end offsets in ``data``."""
        out: List[Tuple[int, bytes]] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                # An overlong line is the parser's problem; keep memory bounded.
                self.partial = (self.partial + data[start:])[-self.limit :]
                return out
            out.append((nl + 1, self.partial + data[start : nl + 1]))
            self.partial = b""
            start = nl + 1


_F = TypeVar("_F", bound=Callable[..., Any])


_NAMES: Dict[Tuple[type, Tuple[str, ...]], Tuple[str, ...]] = {}


def _names_once(cls: type, prefixes: Tuple[str, ...]) -> Tuple[str, ...]:
    """The attribute names of ``cls`` that start with one of ``prefixes`` (cached)."""
    names = _NAMES.get((cls, prefixes))
    if names is None:
        names = tuple(name for name in dir(cls) if name.startswith(prefixes))
        _NAMES[(cls, prefixes)] = names
    return names


def _signature_once(func: _F) -> _F:
    """Store ``func``'s signature on it, where :func:`inspect.signature` looks first."""
    func.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
    return func


class _QuietSession(Session):
    """aiosmtpd's Session without the deprecation warning on every AUTH.

    (aiosmtpd 1.4 sets the deprecated ``login_data`` itself after a
    successful AUTH, which logs a warning each time.)
    """

    legacy_login: Any = None

    @property
    def login_data(self) -> Any:
        return self.legacy_login

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self.legacy_login = value


class _SinkHandler:
    """aiosmtpd handler hooks; the per-connection work lives in the server."""

    def __dir__(self) -> Iterable[str]:
        # Only the hooks: see ReferenceSMTP.__dir__.
        return _names_once(type(self), ("handle_", "auth_"))

    # aiosmtpd checks this hook's arity with inspect.signature on every
    # connection; a static function carrying its signature answers at once
    # (a bound method's signature is rebuilt on every call).
    @staticmethod
    @_signature_once
    async def handle_EHLO(
        server: ReferenceSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: List[str],
    ) -> List[str]:
        session.host_name = hostname
        return server.advertise(responses)

    async def handle_DATA(self, server: ReferenceSMTP, session: Session, envelope: Envelope) -> str:
        server.store_message(envelope)
        return server.data_reply(envelope)


class _ServerState:
    """Shared by all connections of one running server."""

    def __init__(self, config: ServerConfig, behaviour: Behaviour) -> None:
        self.config = config
        self.behaviour = behaviour
        self.context = config.ssl_context()
        self.messages: List[ReceivedMessage] = []
        self.connections: List[SMTPConnection] = []
        self.ids = itertools.count(1)
        self.active = 0
        self.handler = _SinkHandler()

    def add_connection(self, record: SMTPConnection) -> None:
        finished = [c for c in self.connections if c.closed.is_set()]
        for old in finished[: max(0, len(finished) - CONNECTION_HISTORY)]:
            self.connections.remove(old)
        self.connections.append(record)

    def add_message(self, message: ReceivedMessage) -> None:
        self.messages.append(message)
        if len(self.messages) > MAX_STORED_MESSAGES:
            del self.messages[0]


class ReferenceSMTP(SMTP):
    """aiosmtpd's SMTP with the TLS switch on the harness transport."""

    #: Software name in the greeting (a subclass, LMTP's, names itself).
    ident = IDENT

    def __dir__(self) -> Iterable[str]:
        """The protocol's command and AUTH methods, found once per class.

        aiosmtpd's ``SMTP.__init__`` builds its command and AUTH tables from
        ``dir(self)`` and ``inspect.getmembers(self)`` (which calls ``dir``
        and then ``getattr`` on every one of ~190 names) on every connection:
        half the cost of accepting one, ~6 % of a server scenario run.  Both
        tables depend on the class only, so ``dir()`` (the data model's hook
        for "the interesting names", which is all aiosmtpd asks it for)
        answers with the ``smtp_*`` and ``auth_*`` names of the class,
        computed once.  Nothing of aiosmtpd's is patched or read; if it ever
        stops using ``dir()`` this only stops saving time (the HELP and EHLO
        tests check the tables).
        """
        return _names_once(type(self), ("smtp_", "auth_"))

    def __init__(self, state: _ServerState, record: SMTPConnection) -> None:
        limits = state.config.limits
        # Read by SMTP.__init__ for the StreamReader limit (bounds every line).
        self.line_length_limit = limits.max_line
        super().__init__(
            state.handler,
            data_size_limit=limits.max_message,
            hostname=state.config.pki.hostnames[0],
            ident=self.ident,
            tls_context=None,  # the engine does TLS; see the module docstring
            timeout=limits.idle_timeout,
            auth_require_tls=False,  # enforced in smtp_AUTH from our phase
            auth_exclude_mechanism=["LOGIN"],
            authenticator=self._check_credentials,
            loop=asyncio.get_running_loop(),
        )
        self.command_size_limit = min(limits.max_line, SMTP.command_size_limit)
        # aiosmtpd's class-level dict is shared by all instances and grows
        # with every EHLO; give each connection its own.
        self.command_size_limits = collections.defaultdict(self._command_limit)
        self.state = state
        self.behaviour = state.behaviour
        self.record = record
        self.switch: Optional[SwitchableTransport] = None
        #: The SMTP session's phase (what the server believes), not the
        #: engine's: it changes when STARTTLS/STOPTLS complete.
        self.phase_tls = False
        self.tls_cycle = 0
        #: resume-without-stoptls: the next closure was never asked for by STOPTLS.
        self._unasked_return = False
        self._gate_lexer = _CommandLexer()
        self._starttls_gated = False
        self._tls_lexer = _CommandLexer()
        self._tls_lines = _LineSplitter(limits.max_line)
        self._stoptls_seen = False
        self._after_stoptls = bytearray()
        self._incoming_tls = False
        self._in_data = False
        self._last_byte_newline = True
        self._waiters: Dict[type, asyncio.Future[Event]] = {}

    def _command_limit(self) -> int:
        return int(self.command_size_limit)

    @property
    def resets_state(self) -> bool:
        return self.behaviour.name != "no-state-reset"

    # ----------------------------------------------------- connection events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SwitchableTransport)
        self.switch = transport
        self.record.transport = transport
        transport.hold_after(self._is_starttls_line)
        super().connection_made(transport)
        self.session = self._fresh_session()

    def connection_lost(self, error: Optional[Exception]) -> None:
        if error is not None and self.record.error is None:
            self.record.error = error
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(error or ConnectionResetError("connection closed"))
                fut.exception()  # retrieved: the waiter may be gone
        try:
            super().connection_lost(error)
        finally:
            self.state.active -= 1
            self.record.closed.set()

    def eof_received(self) -> Optional[bool]:
        if self.behaviour.name == "ignore-truncation" and self.phase_tls and self._in_data:
            # R6 broken on purpose: finish the cut body as if the final dot
            # had arrived, and let aiosmtpd store it.
            end = b".\r\n" if self._last_byte_newline else b"\r\n.\r\n"
            asyncio.StreamReaderProtocol.data_received(self, end)
            asyncio.StreamReaderProtocol.eof_received(self)
            return False
        result: Optional[bool] = super().eof_received()
        return result

    def data_received(self, data: bytes) -> None:
        phase = "tls" if self._incoming_tls else "plaintext"
        if self._incoming_tls:
            data = self._guard_stoptls(data)
        if not data:
            return
        self.record.record(phase, data)
        self._last_byte_newline = data.endswith(b"\n")
        super().data_received(data)

    def engine_event(self, event: Event) -> None:
        """Called by the adapter for every engine event, in order."""
        if isinstance(event, TLSData):
            self._incoming_tls = True
        elif isinstance(event, PlaintextData):
            self._incoming_tls = False
        elif isinstance(event, ClosureComplete) and event.resumed and self._unasked_return:
            self._resume_without_stoptls()
        elif (
            isinstance(event, ClosureComplete)
            and not event.resumed
            and self.behaviour.name == "plaintext-goodbye"
            and self.switch is not None
        ):
            # R3 broken: plaintext onto the connection after the closure.
            self.switch.write_raw(b"421 4.4.2 TLS closed, closing connection\r\n")
        elif (
            isinstance(event, Violation)
            and event.rule is Rule.R6
            and self.behaviour.name == "plaintext-goodbye"
            and self.switch is not None
        ):
            # R3 broken: a plaintext goodbye onto the truncated TLS connection.
            self.switch.write_raw(b"421 4.4.2 connection truncated, closing\r\n")
        elif isinstance(event, AlertReceived) and self.behaviour.name == "alert-as-close":
            self._resume_after_alert()
        elif (
            isinstance(event, CloseNotifyReceived)
            and self.behaviour.name == "no-close-notify-reply"
            and self.switch is not None
        ):
            # R5 broken: hang up instead of answering (after STOPTLS or not).
            self.switch.close()
        waiter = self._waiters.get(type(event))
        if waiter is not None and not waiter.done():
            waiter.set_result(event)

    # ------------------------------------------------------------ the gates

    def _is_starttls_line(self, line: bytes) -> bool:
        """Hold-gate predicate: a plaintext STARTTLS command line."""
        if self._gate_lexer.verb(line) == b"STARTTLS":
            self._starttls_gated = True
            return True
        return False

    def _guard_stoptls(self, data: bytes) -> bytes:
        """Withhold TLS bytes pipelined after a STOPTLS command line."""
        if self._stoptls_seen:
            self._after_stoptls += data
            return b""
        for end, line in self._tls_lines.lines(data):
            if self._tls_lexer.verb(line) == b"STOPTLS":
                self._stoptls_seen = True
                self._after_stoptls += data[end:]
                return data[:end]
        return data

    def _release_stoptls_guard(self) -> None:
        """A matched STOPTLS line was not a command (e.g. an AUTH answer)."""
        if not self._stoptls_seen:
            return
        held = bytes(self._after_stoptls)
        self._stoptls_seen = False
        self._after_stoptls.clear()
        if held:
            self.data_received(held)

    def _new_phase(self, tls: bool) -> None:
        self.phase_tls = tls
        self._tls_lexer.reset()
        self._tls_lines = _LineSplitter(self.state.config.limits.max_line)
        self._gate_lexer.reset()
        self._stoptls_seen = False
        self._after_stoptls.clear()

    def _expect(self, kind: type) -> asyncio.Future[Event]:
        fut: asyncio.Future[Event] = self.loop.create_future()
        self._waiters[kind] = fut
        return fut

    # -------------------------------------------------------- state (R8)

    def greeting(self) -> bytes:
        return f"220 {self.hostname} {IDENT}\r\n".encode("ascii")

    def _reset_protocol_state(self) -> None:
        """RFC 3207 §4.2 / R8: forget everything, as at connection start."""
        assert self.session is not None
        if self.resets_state:
            self.session = self._fresh_session()
            self.envelope = Envelope()
            self.command_size_limits.clear()
        self.session.ssl = self._ssl_info() if self.phase_tls else None

    def _fresh_session(self) -> Session:
        session = _QuietSession(self.loop)
        if self.session is not None:
            session.peer = self.session.peer
        elif self.switch is not None:
            session.peer = self.switch.get_extra_info("peername")
        return session

    def _ssl_info(self) -> Dict[str, Any]:
        assert self.switch is not None
        return {
            "version": self.switch.tls_version,
            "cipher": self.switch.get_extra_info("cipher"),
        }

    def _resume_after_alert(self) -> None:
        """alert-as-close (R7 broken): plaintext resumes after a fatal alert."""
        assert self.switch is not None
        if not self.phase_tls or self.switch.is_closing():
            return
        self._new_phase(False)
        self._reset_protocol_state()
        self.switch.write(self.greeting())

    def _resume_without_stoptls(self) -> None:
        """resume-without-stoptls (R3 broken): a bare closure returns to plaintext."""
        assert self.switch is not None
        self._unasked_return = False
        self._new_phase(False)
        self._reset_protocol_state()
        self.switch.write(self.greeting())

    def advertise(self, responses: List[str]) -> List[str]:
        """Edit aiosmtpd's EHLO lines: STARTTLS in plaintext, STOPTLS and AUTH in TLS."""
        ours = ("STARTTLS", "STOPTLS", "AUTH")
        lines = [r for r in responses[:-1] if not r[4:].upper().startswith(ours)]
        if self.phase_tls:
            lines += ["250-STOPTLS", "250-AUTH PLAIN"]
        else:
            lines.append("250-STARTTLS")
        return [*lines, responses[-1]]

    def data_reply(self, envelope: Envelope) -> str:
        """The answer to a stored message (LMTP: one line per recipient)."""
        return "250 2.0.0 OK: accepted by the sink, not relayed"

    def store_message(self, envelope: Envelope) -> None:
        assert self.session is not None
        user: Optional[str] = None
        if self.session.authenticated and isinstance(self.session.auth_data, LoginPassword):
            user = self.session.auth_data.login.decode("utf-8", "replace")
        content = envelope.original_content or b""
        self.state.add_message(
            ReceivedMessage(
                mail_from=str(envelope.mail_from),
                rcpt_tos=tuple(envelope.rcpt_tos),
                content=bytes(content),
                tls=self.phase_tls,
                cycle=self.tls_cycle,
                tls_version=self.switch.tls_version if self.switch is not None else None,
                auth_user=user,
                connection=self.record.id,
            )
        )

    def _check_credentials(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        config = self.state.config
        ok = (
            isinstance(auth_data, LoginPassword)
            and hmac.compare_digest(auth_data.login, config.user.encode("utf-8"))
            and hmac.compare_digest(auth_data.password, config.password.encode("utf-8"))
        )
        # handled=False: aiosmtpd then answers 535 itself on failure.
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    # ------------------------------------------------------------ commands

    async def smtp_EHLO(self, hostname: str) -> None:
        self.command_size_limits.clear()  # aiosmtpd adds to it on every EHLO
        await super().smtp_EHLO(hostname)

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.phase_tls:
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        try:
            await super().smtp_AUTH(arg)
        finally:
            self._release_stoptls_guard()

    async def smtp_DATA(self, arg: str) -> None:
        self._in_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self._in_data = False

    @syntax("STARTTLS")
    async def smtp_STARTTLS(self, arg: str) -> None:
        switch = self.switch
        assert switch is not None
        gated, self._starttls_gated = self._starttls_gated, False
        if arg or self.phase_tls or not gated:
            if gated:
                switch.release_held()
            if arg:
                await self.push("501 5.5.4 Syntax: STARTTLS")
            elif self.phase_tls and self.behaviour.name == "accept-starttls-in-tls":
                await self.push(READY_TO_START.decode("ascii").rstrip())  # R8 broken
            elif self.phase_tls:
                await self.push("503 5.5.1 TLS is already active")
            else:
                self._gate_lexer.reset()
                await self.push(
                    "454 4.7.0 STARTTLS arrived where message data was expected; send it again"
                )
            return
        try:
            await switch.start_tls(
                self.state.context,
                server_side=True,
                preface=READY_TO_START,
                timeout=self.state.config.timeouts.handshake,
            )
        except (ConnectionError, asyncio.TimeoutError, RuntimeError) as exc:
            # R1 leftover refused, or the handshake failed: the connection
            # is being closed by the transport; the reason is on record.
            if self.record.error is None:
                self.record.error = exc
            switch.close()
            return
        self.tls_cycle += 1
        self.record.tls_cycles = self.tls_cycle
        self._new_phase(True)
        self._reset_protocol_state()
        if self.behaviour.name in BARE_RESUME:
            # R3 broken: a close_notify without STOPTLS returns to plaintext.
            switch.engine.accept_unwrap()
            self._unasked_return = True

    @syntax("STOPTLS")
    async def smtp_STOPTLS(self, arg: str) -> None:
        switch = self.switch
        assert switch is not None
        self._unasked_return = False
        pipelined = bytes(self._after_stoptls)
        self._stoptls_seen = False
        self._after_stoptls.clear()
        if arg:
            await self.push("501 5.5.4 Syntax: STOPTLS")
            return
        if not self.phase_tls:
            if self.behaviour.name == "accept-stoptls-in-plaintext":
                await self.push(READY_TO_END.decode("ascii").rstrip())  # R3 broken: no TLS
                return
            await self.push("503 5.5.1 STOPTLS is only valid under TLS")
            return
        if pipelined:
            await self.push("554 5.5.0 Nothing may be pipelined after STOPTLS; closing")
            switch.close()
            return
        try:
            resumed = await self._end_tls(switch)
        except (ConnectionError, asyncio.TimeoutError, RuntimeError) as exc:
            if self.record.error is None:
                self.record.error = exc
            switch.close()
            return
        if not resumed:
            return
        self._new_phase(False)
        self._reset_protocol_state()
        if self.behaviour.name != "early-plaintext":
            switch.write(self.greeting())

    async def _end_tls(self, switch: SwitchableTransport) -> bool:
        """The closure after STOPTLS; True when plaintext resumes."""
        timeout = self.state.config.timeouts.closure
        name = self.behaviour.name
        if name == "no-close-notify-reply":
            # R5 broken: the client's close_notify is never answered; the
            # engine_event hook closes TCP when it arrives.
            seen = self._expect(CloseNotifyReceived)
            await self.push(READY_TO_END.rstrip(b"\r\n"))
            await asyncio.wait_for(seen, timeout)
            return False
        if name == "early-plaintext":
            # R3 broken: our close_notify and the plaintext greeting leave
            # with the answer, before the client's close_notify arrived.
            done = self._expect(ClosureComplete)
            with switch.corked():
                switch.write(READY_TO_END)
                switch.events.extend(switch.engine.unwrap())
                switch.write_raw(self.greeting())
            await asyncio.wait_for(done, timeout)
            return True
        await switch.accept_unwrap(preface=READY_TO_END, timeout=timeout)
        return True


class _Refuser(asyncio.Protocol):
    """Answers a connection over the limit with 421 and closes it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
        transport.close()


async def start_server(
    config: ServerConfig, protocol: Type[ReferenceSMTP] = ReferenceSMTP
) -> RunningServer:
    """Start the reference SMTP server described by ``config`` (or a subclass's, LMTP's)."""
    behaviour = behaviour_named(BEHAVIOURS, config.behaviour)
    state = _ServerState(config, behaviour)

    def factory() -> asyncio.Protocol:
        if state.active >= config.limits.max_connections:
            return _Refuser()
        record = SMTPConnection(next(state.ids))
        state.add_connection(record)
        state.active += 1
        return protocol(state, record)

    server = await create_server(
        factory,
        config.host,
        config.port,
        policy=behaviour.policy,
        timeouts=config.timeouts,
    )
    return RunningServer(server, config, messages=state.messages, connections=state.connections)
