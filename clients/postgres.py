"""Reference PostgreSQL client: SSLRequest, startup, simple queries, and misbehaviours.

Why not ``psycopg``/libpq in process: the harness must see what happens to
bytes that arrive after the ``S`` (CVE-2021-23222 was exactly libpq reading
them as TLS data), and a client built on the harness's engine reports that
byte exact.  libpq (``psql``) is exercised as an external client by
``check-client`` and the real-software tier instead.

Rules it keeps: R1 (the hold gate is armed for the one-byte answer to
``SSLRequest``; bytes after it are refused by the engine), R2/R6 through the
strict engine, R5 (a close_notify is answered), R8 (every TLS session starts
with a new ``StartupMessage``), R9 (with ``require_tls`` it never sends a
startup, let alone a password, after ``N``).  There is no return to
plaintext in PostgreSQL: :meth:`PgClient.stoptls` always raises
:class:`StopTLSNotSupported`.

Behaviours (``BEHAVIOURS``; each breaks exactly one rule):
``accept-injected-response`` (R1: bytes glued to the ``S`` are read as the
first TLS message, as libpq < 14.1), ``plaintext-in-tls`` (R2),
``no-close-notify-reply`` (R5), ``ignore-truncation`` (R6: an answer cut by
EOF counts as complete) and ``downgrade`` (R9: after ``N`` it starts the
session and sends its password in plaintext).
"""

from __future__ import annotations

import contextlib
import functools
import ssl
import struct
from typing import Any, Dict, List, Optional, Tuple

from starttls_harness.clients.peer import (
    PeerClient,
    PeerPathDriver,
    PeerProtocol,
    client_modes,
    run_reference_session,
)
from starttls_harness.dialects.postgres import (
    PostgresFramer,
    error_fields,
    message,
    query,
    ssl_request,
    startup,
    terminate,
)
from starttls_harness.dialects.roles import PATH_MESSAGE, ClientOutcome, Hooks, SessionPlan
from starttls_harness.servers.base import Behaviour
from starttls_harness.servers.imapsyntax import IncompleteRead, LineReader
from starttls_harness.tls.aio import ConnectionEnded
from starttls_harness.tls.engine import Rule

__all__ = [
    "BEHAVIOURS",
    "PgClient",
    "PgError",
    "ServerError",
    "StopTLSNotSupported",
    "TLSRequired",
    "path_driver",
    "reference_session",
]

BEHAVIOURS: Dict[str, Behaviour] = client_modes(
    {
        Rule.R1: "reads bytes glued to the S answer as TLS data (libpq < 14.1, CVE-2021-23222)",
        Rule.R2: "takes plaintext received while TLS is up as a response",
        Rule.R6: "takes an answer cut by EOF under TLS as complete",
        Rule.R9: "starts the session and sends its password in plaintext after N",
    }
)

#: Largest backend message the client accepts (bytes).
_MAX_MESSAGE = 1 << 24


class PgError(Exception):
    """Base class of the client's errors."""


class ServerError(PgError):
    """The server answered with an ErrorResponse."""


class TLSRequired(PgError):
    """TLS is required and could not be had (refused, failed)."""


class StopTLSNotSupported(PgError):
    """PostgreSQL has no return to plaintext."""


class _Cut(PgError):
    """The connection ended in the middle of an answer (ignore-truncation takes it)."""


class PgClient(PeerClient):
    """A PostgreSQL client on the switchable transport; create it with :meth:`connect`."""

    protocol: PeerProtocol[LineReader]
    behaviours = BEHAVIOURS
    error = PgError
    tls_required = TLSRequired
    stoptls_unsupported = StopTLSNotSupported
    stoptls_missing = "PostgreSQL has no return to plaintext"
    already_tls = "SSLRequest only comes first"

    def _setup(self) -> None:
        self.parameters: Dict[str, str] = {}
        self.started = False

    @classmethod
    def _new_protocol(
        cls, behaviour: Behaviour, options: Dict[str, Any]
    ) -> PeerProtocol[LineReader]:
        # The client speaks first: nothing is read at connection start.
        return PeerProtocol(behaviour, LineReader(_MAX_MESSAGE))

    # ----------------------------------------------------------- requests

    async def starttls(self, ssl_context: Optional[ssl.SSLContext] = None) -> bool:
        """SSLRequest and the handshake; True once TLS is up (False only for ``downgrade``)."""
        context = self._upgrade_context(ssl_context)
        # R1: whatever follows the one-byte answer is held, not read.
        self.transport.hold_after(lambda unit: True, once=True, framer=PostgresFramer())
        self._write(ssl_request())
        answer = await self.protocol.reader.read_exactly(1, self.timeout)
        if answer != b"S":
            self.transport.release_held()
            if answer != b"N" and self.behaviour.name == "downgrade":
                self.protocol.reader.take_pending()  # the refusal's text: carry on regardless
            shown = "N" if answer == b"N" else repr(answer)
            return self._without_tls(f"SSLRequest answered {shown}")
        await self._handshake(context)
        return True

    async def start(self, user: str, password: str, database: str = "postgres") -> None:
        """The StartupMessage, a cleartext password if asked, up to ReadyForQuery."""
        if not self.transport.tls_active and self.require_tls and not self.downgraded:
            raise TLSRequired("refusing to start a session in plaintext (require_tls)")
        self._write(startup({"user": user, "database": database}))
        while True:
            kind, body = await self._message()
            if kind == b"R":
                (code,) = struct.unpack_from("!i", body)
                if code == 3:
                    self._write(message(b"p", password.encode() + b"\0"))
                elif code not in (0, 12):
                    raise PgError(f"authentication method {code} is not supported")
            elif kind == b"S":
                name, _, value = body.rstrip(b"\0").partition(b"\0")
                self.parameters[name.decode("latin-1")] = value.decode("latin-1")
            elif kind == b"Z":
                self.started = True
                return

    async def query(self, sql: str) -> List[List[Optional[bytes]]]:
        """A simple query; the rows of its answer (an ErrorResponse raises)."""
        if not self.started:
            raise PgError("no session: start() first")
        self._write(query(sql))
        rows: List[List[Optional[bytes]]] = []
        error: Optional[ServerError] = None
        while True:
            try:
                kind, body = await self._message()
            except _Cut:
                if self.behaviour.name == "ignore-truncation":
                    return rows  # R6 broken: the cut answer counts as complete
                raise
            if kind == b"D":
                rows.append(_row(body))
            elif kind == b"E" and error is None:
                error = ServerError(_describe_error(body))
            elif kind == b"Z":
                if error is not None:
                    raise error
                return rows

    async def insert(self, data: bytes) -> None:
        """Store ``data`` (the storage action): one INSERT statement."""
        text = data.decode("latin-1").replace("'", "''")
        await self.query(f"INSERT INTO messages VALUES ('{text}')")

    async def quit(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._write(terminate())
        await self.aclose()

    goodbye = quit

    # ------------------------------------------------------- internals

    def _upgraded(self) -> bool:
        return self.transport.tls_active or self.started

    async def _message(self) -> Tuple[bytes, bytes]:
        """One typed backend message; a FATAL error raises at once."""
        reader = self.protocol.reader
        try:
            head = await reader.read_exactly(5, self.timeout)
            (length,) = struct.unpack_from("!I", head, 1)
            if head[0] == 0 or not 4 <= length <= _MAX_MESSAGE:
                self.transport.abort()
                raise PgError(f"not a backend message: {head!r}")
            body = await reader.read_exactly(length - 4, self.timeout)
        except IncompleteRead as cut:
            raise _Cut(f"connection ended in the middle of an answer: {cut}") from cut
        except ConnectionEnded as ended:
            if ended.event is not None and getattr(ended.event, "rule", None) is Rule.R6:
                raise _Cut(f"truncated: {ended}") from ended
            raise
        kind = head[:1]
        if kind == b"E" and error_fields(head + body).get("S") in ("FATAL", "PANIC"):
            raise ServerError(_describe_error(body))
        return kind, body


def _row(body: bytes) -> List[Optional[bytes]]:
    (count,) = struct.unpack_from("!h", body)
    pos = 2
    out: List[Optional[bytes]] = []
    for _ in range(count):
        (size,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if size < 0:
            out.append(None)
            continue
        out.append(body[pos : pos + size])
        pos += size
    return out


def _describe_error(body: bytes) -> str:
    fields = error_fields(b"E\0\0\0\0" + body)
    return f"{fields.get('S', 'ERROR')} {fields.get('C', '')}: {fields.get('M', '')}"


# ------------------------------------------------------ the harness's roles


class _PathDriver(PeerPathDriver[PgClient]):
    """:class:`PgClient` through the path proxy, one verb at a time."""

    async def after_upgrade(self, client: PgClient) -> None:
        await client.start(self.user, self.password)

    async def command(self, hooks: Hooks) -> None:
        await self._client().query("SELECT 1")

    async def send_unit(self, hooks: Hooks) -> None:
        """An INSERT over two records: FIN replaces the second."""
        hooks.arm(nth=2)
        await self._client().insert(PATH_MESSAGE)

    async def fetch_unit(self, hooks: Hooks) -> None:
        """A SELECT whose answer takes two records: FIN cuts it."""
        client = self._client()
        value = PATH_MESSAGE.decode("latin-1").replace("'", "''")
        sql = f"SELECT '{value}'"
        hooks.arm(nth=2)
        await client.query(sql)


#: The reference client as the path role's client under test:
#: ``path_driver(spec, behaviour, user, password)``.
path_driver = functools.partial(_PathDriver, PgClient)


async def reference_session(plan: SessionPlan) -> ClientOutcome:
    """The reference client's normal session against the scripted server.

    SSLRequest, startup and login under TLS, an INSERT, Terminate (no return
    to plaintext in PostgreSQL).
    """

    async def login(client: PgClient) -> None:
        await client.start(plan.user, plan.password)

    async def store(client: PgClient) -> None:
        await client.insert(plan.message)

    return await run_reference_session(
        PgClient,
        plan,
        login=login,
        store=store,
        done="message stored (PostgreSQL: no STOPTLS cycle)",
    )
