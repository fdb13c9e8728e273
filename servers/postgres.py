"""Reference PostgreSQL server: SSLRequest, a trusting startup, simple queries, misbehaviours.

Just enough of the backend protocol 3.0 for the harness (see
:mod:`starttls_harness.dialects.postgres`): ``SSLRequest`` is answered ``S``
and the handshake follows; ``GSSENCRequest`` is answered ``N``; the
``StartupMessage`` is accepted only under TLS (as a ``hostssl``-only
``pg_hba.conf`` would) and answered ``AuthenticationOk`` ...
``ReadyForQuery`` (trust: no password; with :class:`PgServerConfig`'s
``auth`` = ``password``, ``md5`` or ``scram-sha-256`` the test user must
give its password first, as ``pg_hba.conf`` would ask); a simple query ``SELECT 'text'`` or
``SELECT n`` returns one row, ``INSERT ...`` stores the statement (the
storage action, see :attr:`RunningServer.messages`), anything else is a
syntax error; ``Terminate`` ends the session.

Security decisions: the hold gate is armed for ``SSLRequest``, so bytes
pipelined after it are the R1 leftover the strict engine refuses -- the
connection ends, as PostgreSQL >= 14.1 ends it with "received unencrypted
data after SSL request" (CVE-2021-23214).  There is no return to
plaintext: after a TLS closure the connection is closed.

Behaviours (``BEHAVIOURS``; each breaks exactly one rule): ``keep-buffer``
(R1: the pipelined startup and query run inside TLS, as PostgreSQL < 14.1),
``plaintext-in-tls`` (R2), ``no-close-notify-reply`` (R5),
``ignore-truncation`` (R6: an INSERT cut by EOF is stored),
``alert-as-close`` (R7: a fatal alert is taken for a closure and the session
goes on in plaintext), and the shared
:data:`~starttls_harness.servers.base.EXTRA_BEHAVIOURS`:
``resume-without-stoptls`` (R3), ``plaintext-goodbye`` (R3: a plaintext
``FATAL`` ErrorResponse after the closure), ``one-sided-bare-resume`` (R4),
``accept-starttls-in-tls`` (R8: ``SSLRequest`` inside TLS answered ``S``)
and ``accept-stoptls-in-plaintext`` (R3: the harness's STOPTLS request
answered ``S``).
"""

from __future__ import annotations

import os
import ssl
import struct
from dataclasses import dataclass
from typing import Dict, Optional

from starttls_harness.dialects.pg_auth import SCRAM, ScramServer, md5_password, scram_verifier
from starttls_harness.dialects.postgres import (
    CANCEL_CODE,
    GSSENC_CODE,
    PROTOCOL_3,
    SSL_CODE,
    STOPTLS_CODE,
    PostgresFramer,
    auth,
    command_complete,
    error_response,
    ready,
    select_result,
    selected_value,
    session_start,
    startup_params,
    untyped_code,
)
from starttls_harness.servers.base import Behaviour, RunningServer, ServerConfig
from starttls_harness.servers.framed import (
    EndSession,
    FramedSession,
    SessionsRunningServer,
    closing_behaviours,
    start_session_server,
)
from starttls_harness.servers.imapsyntax import IncompleteRead, LineReader
from starttls_harness.tls.framing import Framer

__all__ = [
    "AUTH_METHODS",
    "BEHAVIOURS",
    "PgMessage",
    "PgServerConfig",
    "PostgresServerProtocol",
    "start_server",
]

BEHAVIOURS: Dict[str, Behaviour] = closing_behaviours(
    pipelined="runs a startup and query pipelined after SSLRequest inside TLS (CVE-2021-23214)",
    plaintext="runs plaintext received while TLS is up",
    truncated="stores an INSERT cut by EOF under TLS",
)

#: How the reference server authenticates the startup's user (pg_hba.conf's
#: methods): ``trust`` (no password), ``password`` (cleartext), ``md5`` and
#: ``scram-sha-256``.
AUTH_METHODS = ("trust", "password", "md5", "scram-sha-256")


@dataclass
class PgServerConfig(ServerConfig):
    """:class:`ServerConfig` with the login method; the test user is ``user``/``password``."""

    auth: str = "trust"

    def __post_init__(self) -> None:
        if self.auth not in AUTH_METHODS:
            raise ValueError(f"auth {self.auth!r}: use one of {', '.join(AUTH_METHODS)}")


#: Longest startup packet PostgreSQL accepts (``MAX_STARTUP_PACKET_LENGTH``).
_MAX_STARTUP = 10000


def _fatal(why: str, sqlstate: str = "08P01") -> bytes:
    return error_response("FATAL", sqlstate, why)


def _goodbye(why: str) -> bytes:
    """What the plaintext-goodbye mode writes: a FATAL error, as a backend ending."""
    return _fatal(f"terminating connection: {why}", "57P01")


@dataclass
class PgMessage:
    """One stored INSERT statement (the storage action)."""

    data: bytes
    tls: bool
    complete: bool = True


class PostgresServerProtocol(FramedSession):
    """One PostgreSQL connection (see the module docstring)."""

    reader: LineReader

    def __init__(self, running: RunningServer, behaviour: Behaviour, ctx: ssl.SSLContext) -> None:
        reader = LineReader(running.config.limits.max_line)
        super().__init__(running, behaviour, ctx, _goodbye, reader)
        #: The StartupMessage was accepted: typed messages follow.
        self.started = False
        #: The password exchange under way (None: none asked, or done).
        self.asked: Optional[str] = None
        self.salt = b""
        self.scram: Optional[ScramServer] = None

    def _holds(self, unit: bytes) -> bool:
        return untyped_code(unit) == SSL_CODE

    def _gate_framer(self) -> Framer:
        return PostgresFramer()

    async def _serve(self) -> None:
        t = self.transport
        assert t is not None
        while not t.is_closing():
            if self.started:
                await self._typed()
            else:
                await self._startup()

    async def _read(self, size: int) -> bytes:
        return await self.reader.read_exactly(size, self.config.limits.idle_timeout)

    async def _startup(self) -> None:
        """One startup-phase message (no type byte)."""
        t = self.transport
        assert t is not None
        head = await self._read(4)
        (length,) = struct.unpack("!I", head)
        if not 8 <= length <= _MAX_STARTUP:
            raise EndSession()  # "invalid length of startup packet": closed silently
        unit = head + await self._read(length - 4)
        self.log.append(unit[:200])
        code = untyped_code(unit)
        if code == SSL_CODE and not t.tls_active:
            leftover = self.reader.take_pending()
            await t.start_tls(self.ctx, server_side=True, preface=b"S", leftover=leftover)
            self.extra.handshake_done(t)
        elif code == GSSENC_CODE and not t.tls_active:
            self._write(b"N")
        elif code == STOPTLS_CODE and not t.tls_active and self.extra.stoptls_in_plaintext:
            self._write(b"S")  # R3 broken: there is no TLS to end
        elif code == PROTOCOL_3:
            self._start(startup_params(unit))
        elif code == CANCEL_CODE:
            raise EndSession()
        else:
            major, minor = divmod(code or 0, 1 << 16)
            raise EndSession(_fatal(f"unsupported frontend protocol {major}.{minor}"))

    def _start(self, params: Dict[str, str]) -> None:
        t = self.transport
        assert t is not None
        if not t.tls_active:
            why = 'no pg_hba.conf entry for host "127.0.0.1", SSL off'
            raise EndSession(_fatal(why, "28000"))
        if not params.get("user"):
            raise EndSession(_fatal("no PostgreSQL user name specified in startup packet", "28000"))
        self.user = params["user"]
        self.started = True
        method = getattr(self.config, "auth", "trust")
        if method == "trust":
            self._write(session_start())
            return
        self.asked = method
        if method == "password":
            self._write(auth(3))
        elif method == "md5":
            self.salt = os.urandom(4)
            self._write(auth(5, self.salt))
        else:
            self._write(auth(10, SCRAM.encode() + b"\0\0"))

    def _password(self, body: bytes) -> None:
        """One PasswordMessage / SASL message of the login the server asked for."""
        user, password = self.config.user, self.config.password
        failed = _fatal(f'password authentication failed for user "{self.user}"', "28P01")
        if self.asked == "scram-sha-256" and self.scram is None:
            self.scram = ScramServer(scram_verifier(password))
            first = self.scram.first(body)
            if first is None or self.user != user:
                raise EndSession(failed)
            self._write(auth(11, first))
            return
        if self.asked == "scram-sha-256":
            assert self.scram is not None
            final = self.scram.final(body)
            if final is None:
                raise EndSession(failed)
            self._write(auth(12, final))
        else:
            wanted = password.encode()
            if self.asked == "md5":
                wanted = md5_password(user, password, self.salt)
            if body.rstrip(b"\0") != wanted or self.user != user:
                raise EndSession(failed)
        self.asked = None
        self._write(session_start())

    async def _typed(self) -> None:
        """One typed message after the startup."""
        t = self.transport
        assert t is not None
        head = await self._read(5)
        if head[0] == 0:
            await self._untyped_in_session(head)
            return
        (length,) = struct.unpack_from("!I", head, 1)
        kind = head[:1]
        if length < 4 or length - 4 > self.config.limits.max_message:
            raise EndSession(_fatal("invalid message length"))
        try:
            body = await self._read(length - 4)
        except IncompleteRead as cut:
            if kind == b"Q" and self.behaviour.name == "ignore-truncation":
                self._store(head + cut.partial, complete=False)
            raise
        self.log.append(head + body[:200])
        if self.asked is not None:
            if kind != b"p":
                raise EndSession(_fatal(f"expected password response, got message type {head[0]}"))
            self._password(body)
        elif kind == b"Q":
            self._query(body.rstrip(b"\0").decode("utf-8", "replace"), head + body)
        elif kind == b"X":
            raise EndSession()
        else:
            raise EndSession(_fatal(f"invalid frontend message type {head[0]}"))

    async def _untyped_in_session(self, head: bytes) -> None:
        """A startup-phase message after the startup: only accept-starttls-in-tls answers."""
        t = self.transport
        assert t is not None
        rest = await self._read(3)
        if untyped_code(head + rest) == SSL_CODE and t.tls_active and self.extra.starttls_in_tls:
            self._write(b"S")  # R8 broken: the session stays in TLS
            return
        raise EndSession(_fatal("invalid frontend message type 0"))

    def _query(self, sql: str, raw: bytes) -> None:
        value = selected_value(sql)
        if value is not None:
            self._write(select_result(value))
        elif sql.strip().upper().startswith("INSERT"):
            self._store(raw, complete=True)
            self._write(command_complete("INSERT 0 1") + ready())
        else:
            self._write(error_response("ERROR", "42601", "syntax error") + ready())

    def _store(self, data: bytes, *, complete: bool) -> None:
        assert self.transport is not None
        self.running.messages.append(PgMessage(data, self.transport.tls_active, complete))


async def start_server(config: ServerConfig) -> RunningServer:
    """Start the reference PostgreSQL server (``config.behaviour`` picks a mode)."""
    return await start_session_server(
        config, BEHAVIOURS, PostgresServerProtocol, SessionsRunningServer
    )
