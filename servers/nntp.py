"""Reference NNTP server (RFC 3977): STARTTLS (RFC 4642), the STOPTLS extension, misbehaviours.

A small reader server written for the harness on the project's engine
(:mod:`starttls_harness.tls.aio`), one task per connection reading CRLF
lines (:class:`~starttls_harness.servers.imapsyntax.LineReader`):

* commands: ``CAPABILITIES``, ``MODE READER``, ``DATE``, ``HELP``, ``QUIT``,
  ``STARTTLS``, ``STOPTLS``, ``AUTHINFO USER``/``PASS`` and ``AUTHINFO SASL
  PLAIN`` (RFC 4643; only under TLS: ``483`` in plaintext), ``GROUP``,
  ``LIST [ACTIVE]``, ``STAT`` and ``POST`` (an article ended by a ``.``
  line, dot-unstuffed, kept in ``RunningServer.messages``; posting needs no
  login);
* one newsgroup, :data:`~starttls_harness.dialects.nntp.NEWSGROUP`, readable
  (``GROUP``/``STAT``) only by the logged-in test user (``480`` otherwise),
  so that a kept login is visible (R8);
* STARTTLS: the hold gate is armed with a predicate that is true for a
  ``STARTTLS`` command line outside an article, so no byte after it reaches
  the reader; ``382`` is the ``preface`` of ``start_tls``.  Held bytes are
  the R1 leftover, which the strict engine refuses.  ``STARTTLS`` inside TLS
  or after a login gets ``502``;
* STOPTLS (the test extension, listed in ``CAPABILITIES`` only under TLS):
  ``382``, the bidirectional closure (``accept_unwrap``), then a new
  ``200`` greeting in plaintext.  Nothing may be pipelined after it;
* after every transition the session is reset as at connection start (R8):
  no login, no current group;
* multi-line answers are written one line per write (one TLS record per
  line), so that the path role can cut an answer in the middle.

Behaviours (``BEHAVIOURS``; each breaks exactly one rule, as the SMTP and
IMAP servers' do): ``strict``; ``keep-buffer`` (R1, engine relaxed: a
command pipelined after STARTTLS runs inside TLS, INN CVE-2012-3523's
class); ``plaintext-in-tls`` (R2, relaxed); ``early-plaintext`` (R3: after
STOPTLS the answer, our close_notify and the greeting leave together);
``one-sided-resume`` (R4, relaxed); ``no-close-notify-reply`` (R5: TCP closed
instead of an answering close_notify); ``ignore-truncation`` (R6: an article
cut by EOF under TLS is stored); ``alert-as-close`` (R7: a fatal alert is
taken for a closure and plaintext resumes); ``no-state-reset`` (R8: the
login and current group survive STARTTLS and STOPTLS); and the shared
:data:`~starttls_harness.servers.base.EXTRA_BEHAVIOURS` (see
:class:`~starttls_harness.servers.base.ExtraModes`):
``resume-without-stoptls`` (R3), ``plaintext-goodbye`` (R3: the goodbye is a
``400`` line), ``one-sided-bare-resume`` (R4), ``accept-starttls-in-tls`` (R8:
a second STARTTLS gets ``382``) and ``accept-stoptls-in-plaintext`` (R3).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ssl
import time
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Dict, List, Optional

from starttls_harness.dialects.nntp import NEWSGROUP
from starttls_harness.servers.base import Behaviour, RunningServer, ServerConfig
from starttls_harness.servers.imap import BEHAVIOURS as IMAP_SERVER_BEHAVIOURS
from starttls_harness.servers.imapsyntax import IncompleteRead
from starttls_harness.servers.lines import (
    ConnectionCount,
    EndSession,
    LineSession,
    SessionsRunningServer,
    start_session_server,
)
from starttls_harness.tls.aio import SwitchableTransport

__all__ = ["BEHAVIOURS", "NntpRunningServer", "NntpServerProtocol", "PostedArticle", "start_server"]

IDENT = "starttls-harness reference NNTP server"

#: The IMAP server's behaviours, each breaking the same rule the same way;
#: only the cut unit differs (an article, not an APPEND literal).
BEHAVIOURS: Dict[str, Behaviour] = {
    **IMAP_SERVER_BEHAVIOURS,
    "ignore-truncation": replace(
        IMAP_SERVER_BEHAVIOURS["ignore-truncation"],
        description="stores an article cut by EOF under TLS",
    ),
    "no-state-reset": replace(
        IMAP_SERVER_BEHAVIOURS["no-state-reset"],
        description="keeps the login and current group across STARTTLS and STOPTLS",
    ),
}


@dataclass(frozen=True)
class PostedArticle:
    """One article taken by POST (dot-unstuffed)."""

    data: bytes
    tls: bool
    tls_version: Optional[str]
    #: STARTTLS upgrades done on the connection when it was posted.
    cycle: int
    user: Optional[str]
    connection: int
    #: False for an article cut by EOF (stored only by ``ignore-truncation``).
    complete: bool = True


Handler = Callable[["NntpServerProtocol", List[bytes]], Awaitable[None]]


class NntpServerProtocol(ConnectionCount, LineSession):
    """One NNTP connection (see the module docstring)."""

    starttls_ok = b"382 Continue with TLS negotiation\r\n"
    stoptls_ok = b"382 Continue with TLS closure\r\n"
    too_long = b"501 Line too long\r\n"
    idle = b"400 Idle for too long\r\n"
    pipelined = "Commands were pipelined after STOPTLS"

    def __init__(
        self, running: NntpRunningServer, behaviour: Behaviour, ctx: ssl.SSLContext
    ) -> None:
        super().__init__(running, behaviour, ctx, _goodbye)
        self.server = running
        self.limits = running.config.limits
        self._pending_user: Optional[str] = None
        self.group: Optional[str] = None
        #: True while an article is being read (its lines are not commands).
        self.in_article = False
        self._count_in(running, running.connections)

    # --------------------------------------------------- asyncio protocol

    def _admit(self, transport: SwitchableTransport) -> bool:
        refusal = b"400 Too many connections, try again later\r\n"
        return self._take_slot(transport, self.limits.max_connections, refusal)

    def _holds(self, line: bytes) -> bool:
        """Hold-gate predicate: a plaintext STARTTLS command (not an article line)."""
        return not self.in_article and line.strip().upper() == b"STARTTLS"

    def _session_over(self) -> None:
        self._finish()

    def _block(self, status: str, lines: List[str]) -> None:
        """A multi-line answer, one write per line (see the module docstring)."""
        self._write(status.encode() + b"\r\n")
        for line in lines:
            data = line.encode("utf-8")
            self._write((b"." + data if data.startswith(b".") else data) + b"\r\n")
        self._write(b".\r\n")

    def _greeting(self) -> bytes:
        return f"200 {IDENT} ready (posting ok)\r\n".encode()

    def _reset(self) -> None:
        """R8: back to the state at connection start (unless no-state-reset)."""
        self.in_article = False
        self._pending_user = None
        if self.behaviour.name == "no-state-reset":
            return
        self.user = None
        self.group = None

    @property
    def _tls(self) -> bool:
        return self.transport is not None and self.transport.tls_active

    async def _execute(self, line: bytes) -> None:
        words = line.split()
        if not words:
            self._write(b"501 Empty command\r\n")
            return
        verb = words[0].upper().decode("ascii", "replace")
        shown = verb.encode() if verb == "AUTHINFO" else line.strip()[:200]
        self.log.append((b"tls " if self._tls else b"plain ") + shown)
        handler = COMMANDS.get(verb)
        if handler is None:
            self._write(b"500 Unknown command\r\n")
            return
        await handler(self, words[1:])

    # --------------------------------------------------------- commands

    async def cmd_capabilities(self, args: List[bytes]) -> None:
        caps = ["VERSION 2", f"IMPLEMENTATION {IDENT}", "READER", "POST", "LIST ACTIVE"]
        if self._tls:
            caps.append("STOPTLS")
            if self.user is None:
                caps += ["AUTHINFO USER SASL", "SASL PLAIN"]
        elif self.user is None:
            caps.append("STARTTLS")
        self._block("101 Capability list:", caps)

    async def cmd_mode(self, args: List[bytes]) -> None:
        if [a.upper() for a in args] != [b"READER"]:
            self._write(b"501 Unknown MODE variant\r\n")
            return
        self._write(b"200 Posting allowed\r\n")

    async def cmd_date(self, args: List[bytes]) -> None:
        self._write(time.strftime("111 %Y%m%d%H%M%S\r\n", time.gmtime()).encode())

    async def cmd_help(self, args: List[bytes]) -> None:
        self._block("100 Help text follows", [" ".join(sorted(COMMANDS))])

    async def cmd_quit(self, args: List[bytes]) -> None:
        raise EndSession(b"205 Connection closing\r\n")

    async def cmd_starttls(self, args: List[bytes]) -> None:
        why = b"501 No arguments allowed" if args else b"502 Command unavailable"
        await self._serve_starttls(bool(args), why + b"\r\n")

    async def cmd_stoptls(self, args: List[bytes]) -> None:
        await self._serve_stoptls(
            bool(args),
            not_in_tls=b"502 STOPTLS is only valid under TLS\r\n",
            misplaced=b"501 STOPTLS takes no arguments and must end the pipeline\r\n",
        )

    async def cmd_authinfo(self, args: List[bytes]) -> None:
        sub = args[0].upper() if args else b""
        if self.user is not None:
            self._write(b"502 Already authenticated\r\n")
        elif not self._tls:
            self._write(b"483 Encryption required\r\n")
        elif sub == b"USER" and len(args) == 2:
            self._pending_user = args[1].decode("utf-8", "replace")
            self._write(b"381 Password required\r\n")
        elif sub == b"PASS" and len(args) >= 2:
            user, self._pending_user = self._pending_user, None
            if user is None:
                self._write(b"482 Authentication commands issued out of sequence\r\n")
                return
            self._login(user, b" ".join(args[1:]).decode("utf-8", "replace"))
        elif sub == b"SASL" and len(args) in (2, 3):
            if args[1].upper() != b"PLAIN":
                self._write(b"503 Mechanism not recognized\r\n")
                return
            if len(args) == 3:
                token = args[2]
            else:
                self._write(b"383 \r\n")
                token = (await self.reader.read_line(self.limits.idle_timeout)).strip()
            self._sasl_plain(token)
        else:
            self._write(b"501 Syntax error\r\n")

    def _sasl_plain(self, token: bytes) -> None:
        if token == b"*":
            self._write(b"481 Authentication cancelled\r\n")
            return
        try:
            parts = base64.b64decode(token, validate=True).split(b"\0")
        except (binascii.Error, ValueError):
            self._write(b"504 Invalid base64\r\n")
            return
        if len(parts) != 3:
            self._write(b"481 Authentication failed\r\n")
            return
        self._login(parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace"))

    def _login(self, user: str, password: str) -> None:
        config = self.config
        ok = hmac.compare_digest(user.encode(), config.user.encode()) and hmac.compare_digest(
            password.encode(), config.password.encode()
        )
        if ok:
            self.user = user
            self._write(b"281 Authentication accepted\r\n")
        else:
            self._write(b"481 Authentication failed\r\n")

    def _count(self) -> int:
        return len(self.server.messages)

    async def cmd_group(self, args: List[bytes]) -> None:
        if len(args) != 1:
            self._write(b"501 Syntax: GROUP newsgroup\r\n")
        elif self.user is None:
            self._write(b"480 Authentication required\r\n")
        elif args[0].decode("utf-8", "replace") != NEWSGROUP:
            self._write(b"411 No such newsgroup\r\n")
        else:
            self.group = NEWSGROUP
            n = self._count()
            self._write(f"211 {n} {1 if n else 0} {n} {NEWSGROUP}\r\n".encode())

    async def cmd_list(self, args: List[bytes]) -> None:
        if args and args[0].upper() != b"ACTIVE":
            self._write(b"503 Only LIST ACTIVE is offered\r\n")
            return
        n = self._count()
        self._block("215 List of newsgroups follows", [f"{NEWSGROUP} {n} 1 y"])

    async def cmd_stat(self, args: List[bytes]) -> None:
        if self.user is None:
            self._write(b"480 Authentication required\r\n")
        elif self.group is None:
            self._write(b"412 No newsgroup selected\r\n")
        elif not self._count():
            self._write(b"420 Current article number is invalid\r\n")
        else:
            self._write(b"223 1 <1@harness.invalid>\r\n")

    async def cmd_post(self, args: List[bytes]) -> None:
        if args:
            self._write(b"501 POST takes no arguments\r\n")
            return
        self.in_article = True
        under_tls = self._tls
        self._write(b"340 Send article to be posted. End with <CR-LF>.<CR-LF>\r\n")
        lines: List[bytes] = []
        size = 0
        try:
            while True:
                line = await self.reader.read_line(self.limits.idle_timeout)
                if line in (b".\r\n", b".\n"):
                    break
                size += len(line)
                if size > self.limits.max_message:
                    raise EndSession(b"441 Article too large\r\n")
                lines.append(line[1:] if line.startswith(b".") else line)
        except IncompleteRead as cut:
            # R6: an article cut by EOF is discarded -- unless ignore-truncation.
            if self.behaviour.name == "ignore-truncation" and under_tls:
                self._store(b"".join(lines) + cut.partial, tls=True, complete=False)
            raise
        finally:
            self.in_article = False
        self._store(b"".join(lines), tls=under_tls)
        self._write(b"240 Article received OK\r\n")

    def _store(self, data: bytes, *, tls: bool, complete: bool = True) -> None:
        transport = self.transport
        assert transport is not None
        self.server.messages.append(
            PostedArticle(
                data=data,
                tls=tls,
                tls_version=transport.tls_version,
                cycle=self.upgrades,
                user=self.user,
                connection=self.id,
                complete=complete,
            )
        )


def _goodbye(why: str) -> bytes:
    """RFC 3977 §3.2.1: a ``400`` response is the server ending the session."""
    return b"400 " + why.encode() + b"\r\n"


#: Dispatch table: command name -> handler.
COMMANDS: Dict[str, Handler] = {
    "CAPABILITIES": NntpServerProtocol.cmd_capabilities,
    "MODE": NntpServerProtocol.cmd_mode,
    "DATE": NntpServerProtocol.cmd_date,
    "HELP": NntpServerProtocol.cmd_help,
    "QUIT": NntpServerProtocol.cmd_quit,
    "STARTTLS": NntpServerProtocol.cmd_starttls,
    "STOPTLS": NntpServerProtocol.cmd_stoptls,
    "AUTHINFO": NntpServerProtocol.cmd_authinfo,
    "GROUP": NntpServerProtocol.cmd_group,
    "LIST": NntpServerProtocol.cmd_list,
    "STAT": NntpServerProtocol.cmd_stat,
    "POST": NntpServerProtocol.cmd_post,
}


@dataclass
class NntpRunningServer(SessionsRunningServer):
    """The running server, with what its connections share (a slot count, ids)."""

    active: int = 0
    next_id: int = 1


async def start_server(config: ServerConfig) -> RunningServer:
    """Start the reference NNTP server (``config.behaviour`` picks a mode)."""
    return await start_session_server(config, BEHAVIOURS, NntpServerProtocol, NntpRunningServer)
