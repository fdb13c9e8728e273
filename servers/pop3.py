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

import base64
import binascii
import ssl
from dataclasses import dataclass
from typing import Dict, List, Optional

from starttls_harness.dialects.pop3 import dot_stuff
from starttls_harness.servers.base import (
    Behaviour,
    RunningServer,
    ServerConfig,
)
from starttls_harness.servers.imapsyntax import IncompleteRead
from starttls_harness.servers.lines import (
    LineSession,
    SessionsRunningServer,
    server_behaviours,
    start_session_server,
)

__all__ = ["BEHAVIOURS", "Pop3Message", "Pop3ServerProtocol", "start_server"]

BEHAVIOURS: Dict[str, Behaviour] = server_behaviours(
    "STLS", cut="an XTND XMIT body", keeps="the login"
)

_GREETING = b"+OK starttls-harness POP3 server ready\r\n"


def _goodbye(why: str) -> bytes:
    """POP3 has no goodbye of its own: a final ``-ERR`` before the server closes."""
    return b"-ERR " + why.encode() + b"\r\n"


@dataclass
class Pop3Message:
    """One message handed over by XTND XMIT (the maildrop's entries)."""

    data: bytes
    tls: bool
    complete: bool = True


class Pop3ServerProtocol(LineSession):
    """One POP3 connection (see the module docstring)."""

    starttls_ok = b"+OK Begin TLS negotiation\r\n"
    stoptls_ok = b"+OK Begin TLS closure\r\n"
    too_long = b"-ERR line too long\r\n"

    def __init__(self, running: RunningServer, behaviour: Behaviour, ctx: ssl.SSLContext) -> None:
        super().__init__(running, behaviour, ctx, _goodbye)
        self.named: Optional[bytes] = None

    def _greeting(self) -> bytes:
        return _GREETING

    def _holds(self, line: bytes) -> bool:
        return line.strip().upper() == b"STLS"

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
            await self._serve_starttls(bool(arg), b"-ERR STLS not allowed now\r\n")
        elif verb == "STOPTLS":
            refusal = b"-ERR STOPTLS only under TLS, alone and without arguments\r\n"
            await self._serve_stoptls(bool(arg), not_in_tls=refusal, misplaced=refusal)
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
                raise self._farewell("message too large")
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


async def start_server(config: ServerConfig) -> RunningServer:
    """Start the reference POP3 server (``config.behaviour`` picks a mode)."""
    return await start_session_server(config, BEHAVIOURS, Pop3ServerProtocol, SessionsRunningServer)
