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

import asyncio
import base64
import contextlib
import ssl
from typing import Dict, FrozenSet, List, Optional, Sequence

from starttls_harness.dialects.pop3 import dot_stuff
from starttls_harness.dialects.roles import (
    PATH_MESSAGE,
    ClientOutcome,
    ClientSpec,
    Hooks,
    PathDriver,
    SessionPlan,
    StopTLSUnsupported,
    failed,
    transport_events,
)
from starttls_harness.servers.base import STRICT, Behaviour, behaviour_named
from starttls_harness.servers.imapsyntax import LineReader
from starttls_harness.tls.aio import ConnectionEnded, SwitchableTransport, Timeouts, open_connection
from starttls_harness.tls.engine import CloseNotifyReceived, ClosureComplete, Event, Rule
from starttls_harness.tls.states import State

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

BEHAVIOURS: Dict[str, Behaviour] = {
    b.name: b
    for b in (
        STRICT,
        Behaviour(
            "accept-injected-response",
            Rule.R1,
            "takes plaintext sent after the STLS answer as a TLS response",
            (Rule.R1,),
        ),
        Behaviour(
            "plaintext-in-tls",
            Rule.R2,
            "takes plaintext received while TLS is up as a response",
            (Rule.R2,),
        ),
        Behaviour(
            "one-sided-close",
            Rule.R4,
            "sends the next command right after its close_notify without waiting",
            (Rule.R4,),
        ),
        Behaviour(
            "no-close-notify-reply",
            Rule.R5,
            "closes TCP instead of answering the server's close_notify",
            (Rule.R5,),
        ),
        Behaviour("no-state-reset", Rule.R8, "keeps capabilities learned before STLS/STOPTLS"),
        Behaviour(
            "downgrade",
            Rule.R9,
            "logs in in plaintext when STLS is not offered despite require_tls",
        ),
    )
}


class Pop3Error(Exception):
    """Base class of the client's errors."""


class CommandError(Pop3Error):
    """The server answered ``-ERR``."""


class TLSRequired(Pop3Error):
    """TLS is required and could not be had (not offered, refused, failed)."""


class StopTLSNotSupported(Pop3Error):
    """The server does not list STOPTLS."""


class _ClientProtocol(asyncio.Protocol):
    """Feeds the line reader; watches the engine for closures."""

    def __init__(self, behaviour: Behaviour, max_line: int) -> None:
        self.behaviour = behaviour
        self.reader = LineReader(max_line)
        self.transport: Optional[SwitchableTransport] = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closure: Optional[asyncio.Future[None]] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SwitchableTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)

    def eof_received(self) -> None:
        self.reader.feed_eof()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        lost = exc or ConnectionResetError("the server closed the connection")
        self.reader.set_exception(lost)
        if self.closure is not None and not self.closure.done():
            self.closure.set_exception(lost)
            self.closure.exception()
        if not self.lost.done():
            self.lost.set_result(None)

    def engine_event(self, event: Event) -> None:
        if isinstance(event, ClosureComplete):
            if self.closure is not None and not self.closure.done():
                self.closure.set_result(None)
        elif (
            isinstance(event, CloseNotifyReceived)
            and not self.behaviour.policy.enforces(Rule.R5)
            and self.transport is not None
            and self.transport.engine.state is State.CLOSE_RECEIVED
        ):
            self.transport.close()  # no-close-notify-reply: hang up instead


class Pop3Client:
    """A POP3 client on the switchable transport; create it with :meth:`connect`."""

    def __init__(
        self,
        transport: SwitchableTransport,
        protocol: _ClientProtocol,
        *,
        behaviour: Behaviour = STRICT,
        ssl_context: Optional[ssl.SSLContext] = None,
        server_hostname: Optional[str] = None,
        require_tls: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.transport = transport
        self.protocol = protocol
        self.behaviour = behaviour
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.require_tls = require_tls
        self.timeout = timeout
        self.greeting = b""
        #: What CAPA listed in the current phase (None: not known).
        self.capabilities: Optional[FrozenSet[str]] = None
        self.authenticated = False
        self.upgrades = 0
        self.downgraded: Optional[str] = None

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: Optional[ssl.SSLContext] = None,
        server_hostname: Optional[str] = None,
        require_tls: bool = True,
        behaviour: str = "strict",
        timeout: float = 10.0,
        timeouts: Optional[Timeouts] = None,
        max_line: int = 1 << 16,
    ) -> Pop3Client:
        """Connect and read the greeting."""
        chosen = behaviour_named(BEHAVIOURS, behaviour)
        protocol = _ClientProtocol(chosen, max_line)
        transport, _ = await open_connection(
            lambda: protocol, host, port, policy=chosen.policy, timeouts=timeouts or Timeouts()
        )
        client = cls(
            transport,
            protocol,
            behaviour=chosen,
            ssl_context=ssl_context,
            server_hostname=server_hostname or host,
            require_tls=require_tls,
            timeout=timeout,
        )
        try:
            await client._read_greeting()
        except BaseException:
            transport.abort()
            raise
        return client

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
        context = ssl_context or self.ssl_context
        if context is None:
            raise ValueError("no ssl_context given")
        if self.transport.tls_active:
            raise Pop3Error("TLS is already active")
        caps = await self._known_capabilities()
        if "STLS" not in caps:
            return self._without_tls("the server does not offer STLS")
        # R1: whatever follows the one-line answer is held, not read.
        self.transport.hold_after(lambda line: True, once=True)
        self._write(b"STLS\r\n")
        answer = await self._line()
        if not answer.startswith(b"+OK"):
            self.transport.release_held()
            return self._without_tls(f"STLS refused: {answer.decode('latin-1').strip()}")
        leftover = self.protocol.reader.take_pending()
        try:
            await self.transport.start_tls(
                context,
                server_side=False,
                server_hostname=self.server_hostname,
                leftover=leftover,
                timeout=self.timeout,
            )
        except (ConnectionError, asyncio.TimeoutError, ssl.SSLError) as exc:
            self.transport.abort()
            raise TLSRequired(f"TLS could not be started: {exc}") from exc
        self.upgrades += 1
        if self._transition():
            await self.capa()
        return True

    async def stoptls(self) -> None:
        """Return to plaintext with the bidirectional closure (R3-R5)."""
        if not self.transport.tls_active:
            raise Pop3Error("STOPTLS needs an active TLS session")
        caps = await self._known_capabilities()
        if "STOPTLS" not in caps:
            raise StopTLSNotSupported("the server does not list STOPTLS")
        await self._simple(b"STOPTLS")
        if self.transport.engine.state is not State.TLS:
            raise self._ended("TLS ended before STOPTLS completed")
        if self.protocol.reader.pending:
            self.transport.abort()
            raise Pop3Error("the server sent data after its STOPTLS answer")
        if self.behaviour.name == "one-sided-close":
            # R4 broken: close_notify and the next command in one segment.
            self.protocol.closure = asyncio.get_running_loop().create_future()
            with self.transport.corked():
                self.transport.events.extend(self.transport.engine.unwrap())
                self.transport.write(b"CAPA\r\n")
            await asyncio.wait_for(self.protocol.closure, self.timeout)
            self._transition()
            await self._read_greeting()
            await self._read_multi()
            return
        await self.transport.unwrap(timeout=self.timeout)
        reset = self._transition()
        await self._read_greeting()
        if reset:
            await self.capa()

    async def login(self, user: str, password: str) -> bytes:
        """AUTH PLAIN with an initial response; refused locally in plaintext (R9)."""
        if (
            not self.transport.tls_active
            and self.require_tls
            and self.behaviour.name != "downgrade"
        ):
            raise TLSRequired("refusing to send credentials in plaintext (require_tls)")
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

    def close(self) -> None:
        self.transport.close()

    async def aclose(self) -> None:
        """Close and wait (bounded) until the connection is gone."""
        self.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.protocol.lost), self.timeout)
        except asyncio.TimeoutError:
            self.transport.abort()

    # ------------------------------------------------------- internals

    def _ended(self, what: str) -> ConnectionError:
        enforced = [v for v in self.transport.violations if v.enforced]
        if enforced:
            return ConnectionEnded(enforced[-1])
        return ConnectionResetError(what)

    def _without_tls(self, reason: str) -> bool:
        if self.behaviour.name == "downgrade":
            self.downgraded = reason
            return False
        if self.require_tls:
            self.transport.close()
        raise TLSRequired(reason)

    def _transition(self) -> bool:
        """R8 after STLS/STOPTLS; False when ``no-state-reset`` keeps the state."""
        if self.behaviour.name == "no-state-reset":
            return False
        self.capabilities = None
        self.authenticated = False
        return True

    async def _known_capabilities(self) -> FrozenSet[str]:
        if self.capabilities is None:
            return await self.capa()
        return self.capabilities

    def _write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.transport.write(data)

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

    async def _read_greeting(self) -> None:
        line = await self._line()
        if not line.startswith(b"+OK"):
            self.transport.abort()
            raise Pop3Error(f"unexpected greeting {line[:80]!r}")
        self.greeting = line


# ------------------------------------------------------ the harness's roles


class _PathDriver(PathDriver):
    """:class:`Pop3Client` through the path proxy, one verb at a time."""

    def __init__(self, spec: ClientSpec, behaviour: str, user: str, password: str) -> None:
        self.spec = spec
        self.behaviour = behaviour
        self.user = user
        self.password = password
        self.client: Optional[Pop3Client] = None

    def _client(self) -> Pop3Client:
        if self.client is None:
            raise ConnectionError("not connected")
        return self.client

    async def connect(self, hooks: Hooks) -> None:
        spec = self.spec
        self.client = await Pop3Client.connect(
            spec.host,
            spec.port,
            ssl_context=spec.tls_context,
            server_hostname=spec.server_hostname,
            behaviour=self.behaviour,
            timeout=spec.timeout,
            timeouts=Timeouts(handshake=spec.timeout, closure=spec.timeout, connect=spec.timeout),
        )

    async def starttls(self, hooks: Hooks) -> None:
        if not await self._client().stls():
            raise ConnectionError("the client carried on without TLS")

    async def command(self, hooks: Hooks) -> None:
        # Any answer proves the pair in step; NOOP leaves the capabilities
        # alone (before a login it is answered -ERR, RFC 1939).
        await self._client().noop(check=False)

    async def stoptls(self, hooks: Hooks) -> None:
        try:
            await self._client().stoptls()
        except StopTLSNotSupported as exc:
            raise StopTLSUnsupported(str(exc)) from exc

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

    async def quit(self, hooks: Hooks) -> None:
        await self._client().quit()

    def engine_events(self) -> Optional[Sequence[Event]]:
        if self.client is None:
            return None
        return transport_events(self.client.transport)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def path_driver(spec: ClientSpec, behaviour: str, user: str, password: str) -> PathDriver:
    """The reference client as the path role's client under test (it logs in)."""
    return _PathDriver(spec, behaviour, user, password)


async def reference_session(plan: SessionPlan) -> ClientOutcome:
    """The reference client's normal session against the scripted server."""
    errors = (Pop3Error, ConnectionError, OSError, asyncio.TimeoutError, RuntimeError)
    try:
        client = await Pop3Client.connect(
            plan.host,
            plan.port,
            ssl_context=plan.tls_context,
            server_hostname="localhost",
            require_tls=True,
            behaviour=plan.behaviour,
            timeout=plan.timeout,
            timeouts=plan.timeouts,
        )
    except errors as exc:
        return failed(exc)
    done = 0
    try:
        await client.stls()  # CAPA, STLS, CAPA
        await client.login(plan.user, plan.password)
        for _ in range(plan.cycles):
            if "STOPTLS" not in (client.capabilities or frozenset()):
                break
            await client.stoptls()  # closure, greeting, CAPA
            await client.stls()
            await client.login(plan.user, plan.password)
            done += 1
        await client.xmit(plan.message)
        with contextlib.suppress(*errors):
            await client.quit()
    except errors as exc:
        return failed(exc)
    finally:
        client.close()
    return ClientOutcome(True, f"message sent after {done} STOPTLS cycle(s)")
