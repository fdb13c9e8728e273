"""Reference POP3 client: STLS (RFC 2595), the STOPTLS extension, and misbehaviours.

Why not ``poplib``: it is blocking, ``stls()`` wraps the socket with
``SSLContext.wrap_socket`` and drops what its reader already buffered (R1
can be neither checked nor reported), and it has no way back to plaintext.
The tests use it as an independent interoperability peer of the reference
server instead.  This client is small and written for the harness: an
``asyncio.Protocol`` on :class:`starttls_harness.tls.aio.SwitchableTransport`.

Rules it keeps: R1 (the hold gate is armed for the one-line STLS answer;
bytes after it are refused by the engine), R3-R5 (``stoptls()`` waits for the
bidirectional closure, then reads the new greeting and CAPA again), R8 (the
capabilities and the login are forgotten at every transition, CAPA is
re-read), R9 (with ``require_tls`` it never logs in in plaintext).

Behaviours (``BEHAVIOURS``; each breaks exactly one rule, as the IMAP
client's): ``accept-injected-response`` (R1), ``plaintext-in-tls`` (R2),
``one-sided-close`` (R4), ``no-close-notify-reply`` (R5), ``no-state-reset``
(R8: the plaintext CAPA is trusted after STLS, AUTH follows the handshake)
and ``downgrade`` (R9).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import ssl
from typing import Awaitable, Callable, Dict, FrozenSet, List, Optional, Tuple

from starttls_harness.clients.lines import (
    LineClient,
    LinePathDriver,
    client_behaviours,
    run_reference_session,
)
from starttls_harness.dialects.pop3 import dot_stuff
from starttls_harness.dialects.roles import PATH_MESSAGE, ClientOutcome, Hooks, SessionPlan
from starttls_harness.servers.base import Behaviour

__all__ = [
    "BEHAVIOURS",
    "CommandError",
    "Pop3Client",
    "Pop3Error",
    "StopTLSNotSupported",
    "TLSRequired",
    "path_driver",
    "reference_session",
]

BEHAVIOURS: Dict[str, Behaviour] = client_behaviours(
    "STLS",
    keeps="keeps capabilities learned before STLS/STOPTLS",
    downgrade="logs in in plaintext when STLS is not offered despite require_tls",
)


class Pop3Error(Exception):
    """Base class of the client's errors."""


class CommandError(Pop3Error):
    """The server answered ``-ERR``."""


class TLSRequired(Pop3Error):
    """TLS is required and could not be had (not offered, refused, failed)."""


class StopTLSNotSupported(Pop3Error):
    """The server does not list STOPTLS."""


class Pop3Client(LineClient):
    """A POP3 client on the switchable transport; create it with :meth:`connect`."""

    behaviours = BEHAVIOURS
    error = Pop3Error
    tls_required = TLSRequired
    stoptls_unsupported = StopTLSNotSupported
    upgrade_name = "STLS"
    stoptls_missing = "the server does not list STOPTLS"

    greeting = b""
    #: What CAPA listed in the current phase (None: not known).
    capabilities: Optional[FrozenSet[str]] = None
    authenticated = False

    # ----------------------------------------------------------- commands

    async def capa(self) -> FrozenSet[str]:
        """Ask the server; the answer replaces what was known."""
        self.capabilities = None
        lines = await self._multi(b"CAPA")
        self.capabilities = frozenset(
            line.split()[0].decode("latin-1").upper() for line in lines if line.strip()
        )
        return self.capabilities

    async def noop(self, *, check: bool = True) -> bytes:
        """NOOP (a TRANSACTION-state command: ``-ERR`` before login, raised if ``check``)."""
        try:
            return await self._simple(b"NOOP")
        except CommandError as refused:
            if check:
                raise
            return str(refused).encode()

    async def stat(self) -> bytes:
        return await self._simple(b"STAT")

    async def stls(self, ssl_context: Optional[ssl.SSLContext] = None) -> bool:
        """Upgrade to TLS; True once TLS is up (False only for ``downgrade``)."""
        return await self.starttls(ssl_context)

    async def login(self, user: str, password: str) -> bytes:
        """AUTH PLAIN with an initial response; refused locally in plaintext (R9)."""
        self._guard_credentials()
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        answer = await self._simple(f"AUTH PLAIN {token}".encode())
        self.authenticated = True
        return answer

    async def xmit(self, message: bytes) -> bytes:
        """Hand ``message`` to the server (``XTND XMIT``, a dot-terminated body)."""
        await self._simple(b"XTND XMIT")
        self._write(dot_stuff(message))
        return await self._status()

    async def retr(self, number: int) -> bytes:
        """Message ``number``, un-dot-stuffed."""
        lines = await self._multi(b"RETR %d" % number)
        return b"".join(line[1:] if line.startswith(b"..") else line for line in lines)

    async def quit(self) -> None:
        with contextlib.suppress(CommandError):
            await self._simple(b"QUIT")
        await self.aclose()

    goodbye = quit

    # ------------------------------------------------------------ hooks

    async def _greet(self) -> None:
        line = await self._line()
        if not line.startswith(b"+OK"):
            self.transport.abort()
            raise Pop3Error(f"unexpected greeting {line[:80]!r}")
        self.greeting = line

    def _known(self) -> Optional[FrozenSet[str]]:
        return self.capabilities

    async def _discover(self) -> FrozenSet[str]:
        return await self.capa()

    async def _ask_upgrade(self) -> Optional[str]:
        # R1: whatever follows the one-line answer is held, not read.
        self.transport.hold_after(lambda line: True, once=True)
        self._write(b"STLS\r\n")
        answer = await self._line()
        return None if answer.startswith(b"+OK") else answer.decode("latin-1").strip()

    async def _ask_stoptls(self) -> None:
        await self._simple(b"STOPTLS")

    def _glued(self) -> Tuple[bytes, Callable[[], Awaitable[object]]]:
        async def answer() -> None:
            await self._greet()
            await self._read_multi()

        return b"CAPA\r\n", answer

    def _forget(self) -> None:
        self.capabilities = None
        self.authenticated = False

    # ------------------------------------------------------- internals

    async def _line(self) -> bytes:
        return await self.protocol.reader.read_line(self.timeout)

    async def _status(self) -> bytes:
        line = await self._line()
        if line.startswith(b"+OK"):
            return line
        if line.startswith(b"-ERR"):
            raise CommandError(line.decode("latin-1").strip())
        raise Pop3Error(f"unexpected answer {line[:80]!r}")

    async def _simple(self, command: bytes) -> bytes:
        self._write(command + b"\r\n")
        return await self._status()

    async def _multi(self, command: bytes) -> List[bytes]:
        self._write(command + b"\r\n")
        return await self._read_multi()

    async def _read_multi(self) -> List[bytes]:
        await self._status()
        lines: List[bytes] = []
        while True:
            line = await self._line()
            if line.rstrip(b"\r\n") == b".":
                return lines
            lines.append(line)


# ------------------------------------------------------ the harness's roles


class _PathDriver(LinePathDriver[Pop3Client]):
    """:class:`Pop3Client` through the path proxy, one verb at a time."""

    async def command(self, hooks: Hooks) -> None:
        # Any answer proves the pair in step; NOOP leaves the capabilities
        # alone (before a login it is answered -ERR, RFC 1939).
        await self._client().noop(check=False)

    async def send_unit(self, hooks: Hooks) -> None:
        """XTND XMIT of a body over two records: FIN replaces the second."""
        client = self._client()
        await client.capa()
        await client.login(self.user, self.password)
        hooks.arm(nth=3)  # 1: XTND XMIT, 2-3: the body (16 KiB + the rest with the dot)
        await client.xmit(PATH_MESSAGE)

    async def fetch_unit(self, hooks: Hooks) -> None:
        """RETR of a message whose answer takes two records: FIN cuts it."""
        client = self._client()
        await client.capa()
        await client.login(self.user, self.password)
        await client.xmit(PATH_MESSAGE)
        hooks.arm(nth=2)
        await client.retr(1)


#: The reference client as the path role's client under test (it logs in):
#: ``path_driver(spec, behaviour, user, password)``.
path_driver = functools.partial(_PathDriver, Pop3Client)


async def reference_session(plan: SessionPlan) -> ClientOutcome:
    """The reference client's normal session against the scripted server.

    CAPA, STLS, CAPA, AUTH; STOPTLS cycles (closure, greeting, CAPA); XTND XMIT; QUIT.
    """

    async def login(client: Pop3Client) -> None:
        await client.login(plan.user, plan.password)

    async def store(client: Pop3Client) -> None:
        await client.xmit(plan.message)

    return await run_reference_session(
        Pop3Client,
        plan,
        login=login,
        store=store,
        done="message sent after {n} STOPTLS cycle(s)",
    )
