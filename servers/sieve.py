"""Reference ManageSieve server (RFC 5804): STARTTLS, the STOPTLS extension, misbehaviours.

One coroutine per connection reads commands (lines with their ``{n+}``
literals inline) from a :class:`~starttls_harness.servers.imapsyntax.LineReader`
and answers them.  Commands: CAPABILITY, STARTTLS, STOPTLS, AUTHENTICATE
"PLAIN" (with or without an initial response), NOOP (with its TAG),
PUTSCRIPT, LISTSCRIPTS, GETSCRIPT, SETACTIVE, DELETESCRIPT, HAVESPACE,
CHECKSCRIPT and LOGOUT.  Every PUTSCRIPT is recorded in
``RunningServer.messages`` (the storage probe counts them); the scripts by
name are what LISTSCRIPTS and GETSCRIPT show.

Security decisions: in plaintext the capability list has ``"SASL" ""`` and
``"STARTTLS"`` and AUTHENTICATE is refused with ``NO (ENCRYPT-NEEDED)``; the
hold gate is armed for the STARTTLS line (bytes after it are the R1
leftover the strict engine refuses); after the handshake the capability
list is re-issued, as RFC 5804 §2.2 requires, without ``STARTTLS`` and with
``"STOPTLS"``; STOPTLS is answered ``OK`` under TLS, followed by the
bidirectional closure and the capability greeting in plaintext; every
transition forgets the login (R8).

Behaviours (``BEHAVIOURS``; each breaks exactly one rule, as in
:mod:`starttls_harness.servers.imap`): ``keep-buffer`` (R1),
``plaintext-in-tls`` (R2), ``early-plaintext`` (R3), ``one-sided-resume`` (R4),
``no-close-notify-reply`` (R5), ``ignore-truncation`` (R6: a PUTSCRIPT literal
cut by EOF is stored), ``alert-as-close`` (R7), ``no-state-reset`` (R8: the
login survives STARTTLS and STOPTLS), and the shared
:data:`~starttls_harness.servers.base.EXTRA_BEHAVIOURS` (see
:class:`~starttls_harness.servers.base.ExtraModes`):
``resume-without-stoptls`` (R3), ``plaintext-goodbye`` (R3: the goodbye is a
``BYE`` line), ``one-sided-bare-resume`` (R4), ``accept-starttls-in-tls`` (R8:
a second STARTTLS gets ``OK``) and ``accept-stoptls-in-plaintext`` (R3).
"""

from __future__ import annotations

import base64
import binascii
import re
import ssl
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from starttls_harness.dialects.sieve import capability_lines, quoted
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

__all__ = ["BEHAVIOURS", "SieveScript", "SieveServerProtocol", "start_server"]

BEHAVIOURS: Dict[str, Behaviour] = server_behaviours(
    "STARTTLS", cut="a PUTSCRIPT literal", keeps="the login"
)

_LITERAL_AT_END = re.compile(rb"\{(\d{1,10})(\+?)\}\r?\n\Z")
_TOKEN = re.compile(rb'\s*(?:"((?:[^"\\]|\\.)*)"|\{(\d{1,10})\+?\}\r?\n|([^\s"{]+))', re.S)


@dataclass
class SieveScript:
    """One PUTSCRIPT (the storage probe's unit)."""

    name: str
    data: bytes
    tls: bool
    complete: bool = True


def _tokens(raw: bytes) -> List[bytes]:
    """The words of a command: atoms, quoted strings (unescaped), literals (inline)."""
    out: List[bytes] = []
    pos = 0
    while pos < len(raw):
        if not raw[pos:].strip():
            break
        found = _TOKEN.match(raw, pos)
        if found is None:
            raise ValueError("malformed command")
        if found.group(1) is not None:
            out.append(re.sub(rb"\\(.)", rb"\1", found.group(1)))
            pos = found.end()
        elif found.group(2) is not None:
            size = int(found.group(2))
            start = found.end()
            out.append(raw[start : start + size])
            pos = start + size
        else:
            out.append(found.group(3))
            pos = found.end()
    return out


class SieveServerProtocol(LineSession):
    """One ManageSieve connection (see the module docstring)."""

    starttls_ok = b'OK "Begin TLS negotiation now."\r\n'
    stoptls_ok = b'OK "Begin TLS closure."\r\n'
    too_long = b'BYE "line too long"\r\n'

    def __init__(self, running: RunningServer, behaviour: Behaviour, ctx: ssl.SSLContext) -> None:
        super().__init__(running, behaviour, ctx, _goodbye)

    def _holds(self, line: bytes) -> bool:
        return line.strip().upper() == b"STARTTLS"

    async def _read_command(self) -> bytes:
        """One command with its literals inline (EOF inside a PUTSCRIPT literal: R6)."""
        timeout = self.config.limits.idle_timeout
        line = await self.reader.read_line(timeout)
        raw = bytearray(line)
        while True:
            announced = _LITERAL_AT_END.search(line)
            if announced is None:
                return bytes(raw)
            size = int(announced.group(1))
            if size > self.config.limits.max_literal:
                raise self._farewell("literal too large")
            try:
                raw += await self.reader.read_exactly(size, timeout)
            except IncompleteRead as cut:
                self._truncated(bytes(raw), cut.partial)
                raise
            line = await self.reader.read_line(timeout)
            raw += line

    def _truncated(self, head: bytes, partial: bytes) -> None:
        if self.behaviour.name != "ignore-truncation" or self.user is None:
            return
        if head.split(None, 1)[:1] == [b"PUTSCRIPT"]:
            self._store("truncated", partial, complete=False)

    def _reset(self) -> None:
        """R8: forget the login (unless no-state-reset)."""
        if self.behaviour.name != "no-state-reset":
            self.user = None

    def _capabilities(self) -> bytes:
        assert self.transport is not None
        caps: List[Tuple[str, Optional[str]]] = [
            ("IMPLEMENTATION", "starttls-harness"),
            ("SIEVE", "fileinto reject envelope"),
            ("VERSION", "1.0"),
        ]
        if self.transport.tls_active:
            caps += [("SASL", "PLAIN"), ("STOPTLS", None)]
        else:
            caps += [("SASL", ""), ("STARTTLS", None)]
        return capability_lines(caps)

    def _greeting(self) -> bytes:
        return self._capabilities() + b'OK "starttls-harness ManageSieve ready."\r\n'

    def _store(self, name: str, data: bytes, *, complete: bool) -> None:
        assert self.transport is not None
        script = SieveScript(name, data, self.transport.tls_active, complete)
        self.running.messages.append(script)

    def _scripts(self) -> Dict[str, SieveScript]:
        return {s.name: s for s in self.running.messages if s.complete}

    async def _execute(self, raw: bytes) -> None:
        t = self.transport
        assert t is not None
        try:
            words = _tokens(raw)
        except ValueError:
            self._write(b'NO "malformed command"\r\n')
            return
        if not words:
            self._write(b'NO "empty command"\r\n')
            return
        verb = words[0].upper().decode("latin-1")
        args = words[1:]
        self.log.append(verb.encode() if verb == "AUTHENTICATE" else raw[:200])
        if verb == "CAPABILITY":
            self._write(self._capabilities() + b'OK "Capability completed."\r\n')
        elif verb == "NOOP":
            tag = b" (TAG " + quoted(args[0].decode("latin-1")) + b")" if args else b""
            self._write(b"OK" + tag + b' "Done"\r\n')
        elif verb == "LOGOUT":
            self._write(b'OK "Logout completed."\r\n')
            t.close()
        elif verb == "STARTTLS":
            await self._starttls(args)
        elif verb == "STOPTLS":
            refusal = b'NO "STOPTLS only under TLS, alone and without arguments"\r\n'
            await self._serve_stoptls(bool(args), not_in_tls=refusal, misplaced=refusal)
        elif verb == "AUTHENTICATE":
            await self._authenticate(args)
        elif verb in _AUTHENTICATED and self.user is None:
            self._write(b'NO "authenticate first"\r\n')
        elif verb in _AUTHENTICATED:
            self._script_command(verb, args)
        else:
            self._write(b'NO "unknown command"\r\n')

    async def _starttls(self, args: List[bytes]) -> None:
        if await self._serve_starttls(bool(args), b'NO "STARTTLS not allowed now"\r\n'):
            # RFC 5804 §2.2: the capabilities are re-issued under TLS.
            self._write(self._capabilities() + b'OK "TLS negotiation successful."\r\n')

    async def _authenticate(self, args: List[bytes]) -> None:
        t = self.transport
        assert t is not None
        if not t.tls_active:
            self._write(b'NO (ENCRYPT-NEEDED) "authenticate after STARTTLS"\r\n')
            return
        if self.user is not None:
            self._write(b'NO "already authenticated"\r\n')
            return
        if not args or args[0].upper() != b"PLAIN" or len(args) > 2:
            self._write(b'NO "only PLAIN is offered"\r\n')
            return
        if len(args) == 2:
            token = args[1]
        else:
            self._write(b'""\r\n')
            answer = _tokens(await self._read_command())
            token = answer[0] if answer else b"*"
            if token == b"*":
                self._write(b'NO "authentication cancelled"\r\n')
                return
        try:
            parts = base64.b64decode(token, validate=True).split(b"\0")
        except (binascii.Error, ValueError):
            parts = []
        config = self.config
        if len(parts) != 3 or parts[1:] != [config.user.encode(), config.password.encode()]:
            self._write(b'NO "authentication failed"\r\n')
            return
        self.user = config.user
        self._write(b'OK "Logged in."\r\n')

    def _script_command(self, verb: str, args: List[bytes]) -> None:
        scripts = self._scripts()
        name = args[0].decode("utf-8", "replace") if args else ""
        if verb == "LISTSCRIPTS":
            out = b"".join(quoted(n) + b"\r\n" for n in scripts)
            self._write(out + b'OK "Listscripts completed."\r\n')
        elif verb == "PUTSCRIPT" and len(args) == 2:
            self._store(name, args[1], complete=True)
            self._write(b'OK "PUTSCRIPT completed."\r\n')
        elif verb == "CHECKSCRIPT" and len(args) == 1:
            self._write(b'OK "Script is valid."\r\n')
        elif verb == "HAVESPACE" and len(args) == 2:
            self._write(b'OK "Putscript would succeed."\r\n')
        elif verb == "GETSCRIPT" and name in scripts:
            data = scripts[name].data
            self._write(b"{%d}\r\n" % len(data) + data + b'\r\nOK "Getscript completed."\r\n')
        elif verb in ("SETACTIVE", "DELETESCRIPT") and (name in scripts or not name):
            self._write(b"OK\r\n")
        elif verb in ("GETSCRIPT", "SETACTIVE", "DELETESCRIPT"):
            self._write(b'NO (NONEXISTENT) "no such script"\r\n')
        else:
            self._write(b'NO "wrong arguments"\r\n')


_AUTHENTICATED = frozenset(
    {"LISTSCRIPTS", "PUTSCRIPT", "CHECKSCRIPT", "HAVESPACE", "GETSCRIPT", "SETACTIVE"}
    | {"DELETESCRIPT"}
)


def _goodbye(why: str) -> bytes:
    """RFC 5804's goodbye: a ``BYE`` response before the server closes."""
    return b"BYE " + quoted(why) + b"\r\n"


async def start_server(config: ServerConfig) -> RunningServer:
    """Start the reference ManageSieve server (``config.behaviour`` picks a mode)."""
    return await start_session_server(
        config, BEHAVIOURS, SieveServerProtocol, SessionsRunningServer
    )
