"""Reference POP3 server: STLS (RFC 2595), the STOPTLS extension, and misbehaviours.

One coroutine per connection reads command lines from a
:class:`~starttls_harness.servers.imapsyntax.LineReader` and answers them, so
STLS and STOPTLS ``await`` the transport's switch.  Commands: CAPA, STLS,
STOPTLS, USER/PASS, AUTH PLAIN (with or without an initial response), NOOP,
STAT, LIST, UIDL, RETR, DELE, RSET, QUIT and ``XTND XMIT`` (a dot-terminated
message handed to the server: the storage action, see
:mod:`starttls_harness.dialects.pop3`).  The maildrop is the list of stored
messages, shared by every connection; DELE only marks (nothing is expunged).

Security decisions: in plaintext CAPA lists ``STLS`` and no ``USER``/``SASL``,
and every login is refused with ``-ERR [AUTH]`` until TLS is up (R9 on the
server side); the hold gate is armed for the ``STLS`` line, so bytes after
it are the R1 leftover the strict engine refuses; ``STOPTLS`` is listed only
inside TLS, answered ``+OK`` under TLS, followed by the bidirectional
closure and a fresh plaintext greeting; after every transition the session
is back in the AUTHORIZATION state (R8).

Behaviours (``BEHAVIOURS``; each breaks exactly one rule, as in
:mod:`starttls_harness.servers.imap`): ``keep-buffer`` (R1),
``plaintext-in-tls`` (R2), ``early-plaintext`` (R3), ``one-sided-resume`` (R4),
``no-close-notify-reply`` (R5), ``ignore-truncation`` (R6: an XTND XMIT body
cut by EOF is stored), ``alert-as-close`` (R7), ``no-state-reset`` (R8: the
login survives STLS and STOPTLS), and the shared
:data:`~starttls_harness.servers.base.EXTRA_BEHAVIOURS` (see
:class:`~starttls_harness.servers.base.ExtraModes`):
``resume-without-stoptls`` (R3), ``plaintext-goodbye`` (R3: the goodbye is an
``-ERR`` line), ``one-sided-bare-resume`` (R4), ``accept-starttls-in-tls`` (R8:
a second STLS gets ``+OK``) and ``accept-stoptls-in-plaintext`` (R3).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ssl
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

from starttls_harness.dialects.pop3 import dot_stuff
from starttls_harness.servers.base import (
    EXTRA_BEHAVIOURS,
    STRICT,
    Behaviour,
    ExtraModes,
    RunningServer,
    ServerConfig,
    behaviour_named,
)
from starttls_harness.servers.imapsyntax import IncompleteRead, LineReader, LineTooLong
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

__all__ = ["BEHAVIOURS", "Pop3Message", "Pop3ServerProtocol", "start_server"]

BEHAVIOURS: Dict[str, Behaviour] = {
    b.name: b
    for b in (
        STRICT,
        Behaviour(
            "keep-buffer", Rule.R1, "executes commands pipelined after STLS inside TLS", (Rule.R1,)
        ),
        Behaviour(
            "plaintext-in-tls", Rule.R2, "executes plaintext received while TLS is up", (Rule.R2,)
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
            "stores an XTND XMIT body cut by EOF under TLS",
            (Rule.R6,),
        ),
        Behaviour(
            "alert-as-close",
            Rule.R7,
            "takes a fatal alert for a closure and resumes plaintext",
            (Rule.R7,),
        ),
        Behaviour("no-state-reset", Rule.R8, "keeps the login across STLS and STOPTLS"),
        *EXTRA_BEHAVIOURS,
    )
}

_GREETING = b"+OK starttls-harness POP3 server ready\r\n"
_STLS_OK = b"+OK Begin TLS negotiation\r\n"
_STOPTLS_OK = b"+OK Begin TLS closure\r\n"


def _goodbye(why: str) -> bytes:
    """POP3 has no goodbye of its own: a final ``-ERR`` before the server closes."""
    return b"-ERR " + why.encode() + b"\r\n"


@dataclass
class Pop3Message:
    """One message handed over by XTND XMIT (the maildrop's entries)."""

    data: bytes
    tls: bool
    complete: bool = True


class _Quit(Exception):
    """End the session after a final ``-ERR`` line."""


class Pop3ServerProtocol(asyncio.Protocol):
    """One POP3 connection (see the module docstring)."""

    def __init__(self, running: RunningServer, behaviour: Behaviour, ctx: ssl.SSLContext) -> None:
        self.running = running
        self.config: ServerConfig = running.config
        self.behaviour = behaviour
        self.ctx = ctx
        self.reader = LineReader(self.config.limits.max_line)
        self.transport: Optional[SwitchableTransport] = None
        self.user: Optional[str] = None
        self.named: Optional[bytes] = None
        self.log: List[bytes] = []
        self._stopping = False
        self._after_stoptls = b""
        self._closure: Optional[asyncio.Future[None]] = None
        self._close_notify: Optional[asyncio.Future[None]] = None
        self.extra = ExtraModes(behaviour, _goodbye)

    # --------------------------------------------------- asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SwitchableTransport)
        self.transport = transport
        self.running.connections.append(self)
        transport.hold_after(_is_stls)
        task = asyncio.get_running_loop().create_task(self._session())
        sessions = getattr(self.running, "sessions", None)
        if isinstance(sessions, set):
            sessions.add(task)
            task.add_done_callback(sessions.discard)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)

    def eof_received(self) -> bool:
        self.reader.feed_eof()
        return True

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        lost = exc or ConnectionResetError("connection closed")
        self.reader.set_exception(lost)
        for fut in (self._closure, self._close_notify):
            if fut is not None and not fut.done():
                fut.set_exception(lost)

    def engine_event(self, event: Event) -> None:
        """Closure bookkeeping; the misbehaving modes hook in here."""
        t = self.transport
        if self.extra.on_event(event, t):
            self._reset()  # resume-without-stoptls: greet as after STOPTLS
            self._write(_GREETING)
        if isinstance(event, ClosureComplete):
            if self._stopping and self.reader.pending:
                self._after_stoptls = self.reader.take_pending()
            _set(self._closure)
        elif isinstance(event, CloseNotifyReceived):
            _set(self._close_notify)
            if (
                not self.behaviour.policy.enforces(Rule.R5)
                and t is not None
                and t.engine.state is State.CLOSE_RECEIVED
            ):
                t.close()  # no-close-notify-reply: hang up instead of answering
        elif (
            isinstance(event, AlertReceived)
            and not self.behaviour.policy.enforces(Rule.R7)
            and t is not None
            and t.engine.state is State.PLAINTEXT
        ):
            self._reset()  # alert-as-close: the alert is taken for a closure
            self._write(_GREETING)

    # ------------------------------------------------------------ session

    async def _session(self) -> None:
        t = self.transport
        assert t is not None
        try:
            self._write(_GREETING)
            while not t.is_closing():
                line = await self.reader.read_line(self.config.limits.idle_timeout)
                await self._execute(line)
        except _Quit as why:
            self._write(b"-ERR " + str(why).encode() + b"\r\n")
        except LineTooLong:
            self._write(b"-ERR line too long\r\n")
        except (
            asyncio.TimeoutError,
            ConnectionError,
            LocalProtocolError,
            TransitionError,
            ssl.SSLError,
        ):
            pass
        finally:
            t.close()

    def _write(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        with contextlib.suppress(LocalProtocolError):
            t.write(data)

    def _reset(self) -> None:
        """R8: back to AUTHORIZATION (unless no-state-reset)."""
        self.named = None
        if self.behaviour.name != "no-state-reset":
            self.user = None

    def _capa(self) -> bytes:
        assert self.transport is not None
        caps = ["TOP", "UIDL", "XTND"]
        if self.transport.tls_active:
            caps += ["USER", "SASL PLAIN", "STOPTLS"]
        else:
            caps.append("STLS")
        return b"+OK Capability list follows\r\n" + dot_stuff("\r\n".join(caps).encode())

    async def _execute(self, line: bytes) -> None:
        t = self.transport
        assert t is not None
        words = line.strip().split(None, 1)
        verb = words[0].upper().decode("latin-1") if words else ""
        arg = words[1] if len(words) > 1 else b""
        self.log.append(line[:200] if verb not in ("PASS", "AUTH") else verb.encode())
        if verb == "CAPA":
            self._write(self._capa())
        elif verb == "STLS":
            await self._stls(arg)
        elif verb == "STOPTLS":
            await self._stoptls(arg)
        elif verb == "QUIT":
            self._write(b"+OK bye\r\n")
            t.close()
        elif verb in ("USER", "PASS", "AUTH"):
            await self._login(verb, arg)
        elif verb == "XTND" and self.user is not None and arg.strip().upper() == b"XMIT":
            await self._xmit()
        elif self.user is not None and verb in _TRANSACTION:
            self._transaction(verb, arg)
        elif verb in _TRANSACTION or verb == "XTND":
            self._write(b"-ERR not logged in\r\n")
        else:
            self._write(b"-ERR unknown command\r\n")

    async def _stls(self, arg: bytes) -> None:
        t = self.transport
        assert t is not None
        if t.tls_active and not arg and self.extra.starttls_in_tls:
            self._write(_STLS_OK)  # R8 broken: the session stays in TLS
            return
        if arg or t.tls_active or self.user is not None:
            self._write(b"-ERR STLS not allowed now\r\n")
            if not t.tls_active and t.engine.held:
                t.release_held()
            return
        leftover = self.reader.take_pending()
        await t.start_tls(self.ctx, server_side=True, preface=_STLS_OK, leftover=leftover)
        self._reset()
        self.extra.handshake_done(t)

    async def _stoptls(self, arg: bytes) -> None:
        t = self.transport
        assert t is not None
        self.extra.stoptls_asked()
        if not t.tls_active and not arg and self.extra.stoptls_in_plaintext:
            self._write(_STOPTLS_OK)  # R3 broken: there is no TLS to end
            return
        if not t.tls_active or arg or self.reader.pending:
            self._write(b"-ERR STOPTLS only under TLS, alone and without arguments\r\n")
            return
        answer = _STOPTLS_OK
        loop = asyncio.get_running_loop()
        bound = self.config.timeouts.closure
        name = self.behaviour.name
        if name == "early-plaintext":
            self._closure = loop.create_future()
            with t.corked():
                t.write(answer)
                t.events.extend(t.engine.unwrap())
                self._reset()
                t.write_raw(_GREETING)
            await asyncio.wait_for(self._closure, bound)
            return
        if name == "no-close-notify-reply":
            self._close_notify = loop.create_future()
            t.write(answer)
            await asyncio.wait_for(self._close_notify, bound)
            return
        self._stopping = True
        try:
            await t.accept_unwrap(preface=answer)
        finally:
            self._stopping = False
        if self._after_stoptls:
            raise _Quit("commands were pipelined after STOPTLS")
        self._reset()
        self._write(_GREETING)

    async def _login(self, verb: str, arg: bytes) -> None:
        t = self.transport
        assert t is not None
        if not t.tls_active:
            self._write(b"-ERR [AUTH] Plaintext authentication disallowed; use STLS\r\n")
            return
        if self.user is not None:
            self._write(b"-ERR already logged in\r\n")
            return
        config = self.config
        if verb == "USER":
            self.named = arg.strip()
            self._write(b"+OK send PASS\r\n")
            return
        if verb == "PASS":
            ok = self.named == config.user.encode() and arg == config.password.encode()
        else:
            words = arg.split()
            if not words or words[0].upper() != b"PLAIN" or len(words) > 2:
                self._write(b"-ERR only AUTH PLAIN is offered\r\n")
                return
            token = words[1] if len(words) == 2 else None
            if token is None:
                self._write(b"+ \r\n")
                token = (await self.reader.read_line(self.config.limits.idle_timeout)).strip()
                if token == b"*":
                    self._write(b"-ERR authentication cancelled\r\n")
                    return
            try:
                parts = base64.b64decode(token, validate=True).split(b"\0")
            except (binascii.Error, ValueError):
                parts = []
            wanted = [config.user.encode(), config.password.encode()]
            ok = len(parts) == 3 and parts[1:] == wanted
        self.named = None
        if not ok:
            self._write(b"-ERR [AUTH] invalid credentials\r\n")
            return
        self.user = config.user
        self._write(b"+OK logged in\r\n")

    async def _xmit(self) -> None:
        t = self.transport
        assert t is not None
        self._write(b"+OK Start sending message\r\n")
        body = bytearray()
        limit = self.config.limits.max_message
        while True:
            try:
                line = await self.reader.read_line(self.config.limits.idle_timeout)
            except IncompleteRead as cut:
                if self.behaviour.name == "ignore-truncation":
                    self._store(bytes(body) + cut.partial, complete=False)
                raise
            if line.rstrip(b"\r\n") == b".":
                break
            body += line[1:] if line.startswith(b"..") else line
            if len(body) > limit:
                raise _Quit("message too large")
        self._store(bytes(body), complete=True)
        self._write(b"+OK message sent\r\n")

    def _store(self, data: bytes, *, complete: bool) -> None:
        assert self.transport is not None
        self.running.messages.append(Pop3Message(data, self.transport.tls_active, complete))

    def _transaction(self, verb: str, arg: bytes) -> None:
        drop: List[Pop3Message] = self.running.messages
        if verb in ("NOOP", "RSET"):
            self._write(b"+OK\r\n")
        elif verb == "STAT":
            self._write(b"+OK %d %d\r\n" % (len(drop), sum(len(m.data) for m in drop)))
        elif verb in ("LIST", "UIDL") and not arg:
            lines = [
                b"%d %s" % (i, str(len(m.data) if verb == "LIST" else i).encode())
                for i, m in enumerate(drop, 1)
            ]
            self._write(b"+OK %d messages\r\n" % len(drop) + dot_stuff(b"\r\n".join(lines)))
        else:
            words = arg.split()
            number = int(words[0]) if words and words[0].isdigit() else 0
            if not 1 <= number <= len(drop):
                self._write(b"-ERR no such message\r\n")
            elif verb == "LIST":
                self._write(b"+OK %d %d\r\n" % (number, len(drop[number - 1].data)))
            elif verb == "UIDL":
                self._write(b"+OK %d %d\r\n" % (number, number))
            elif verb == "DELE":
                self._write(b"+OK marked\r\n")
            elif verb in ("RETR", "TOP"):
                self._write(b"+OK message follows\r\n" + dot_stuff(drop[number - 1].data))


_TRANSACTION = frozenset({"NOOP", "RSET", "STAT", "LIST", "UIDL", "DELE", "RETR", "TOP"})


def _is_stls(line: bytes) -> bool:
    return line.strip().upper() == b"STLS"


def _set(fut: Optional[asyncio.Future[None]]) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


async def start_server(config: ServerConfig) -> RunningServer:
    """Start the reference POP3 server (``config.behaviour`` picks a mode)."""
    behaviour = behaviour_named(BEHAVIOURS, config.behaviour)
    ctx = config.ssl_context()
    holder: List[Pop3RunningServer] = []

    def factory() -> Pop3ServerProtocol:
        return Pop3ServerProtocol(holder[0], behaviour, ctx)

    server = await create_server(
        factory, config.host, config.port, policy=behaviour.policy, timeouts=config.timeouts
    )
    running = Pop3RunningServer(server, config)
    holder.append(running)
    return running


@dataclass
class Pop3RunningServer(RunningServer):
    """:class:`RunningServer` whose ``close()`` also waits for the sessions."""

    sessions: Set[asyncio.Task[None]] = field(default_factory=set)

    async def close(self) -> None:
        await super().close()
        pending = list(self.sessions)
        if pending:
            await asyncio.wait(pending, timeout=self.config.timeouts.closure)
