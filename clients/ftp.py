"""Reference FTP client: AUTH TLS (RFC 4217), CCC (RFC 2228), and misbehaviours.

Why not ``ftplib``: it reads through ``socket.makefile`` and wraps the
socket with ``SSLContext.wrap_socket`` (bytes its reader buffered before the
upgrade are out of reach, R1 can be neither checked nor reported), and its
``ccc()`` is ``unwrap()`` with no way to show the closure's order.  ftplib is
the interoperability peer of the reference server instead.  This client is
small and written for the harness: an ``asyncio.Protocol`` on
:class:`starttls_harness.tls.aio.SwitchableTransport` (the control
connection only; the storage act is ``MKD``, which needs no data connection).

CCC as it does it (RFC 4217 §5 leaves the order open): the engine is told
before ``CCC`` leaves that a close_notify of the server's returns to
plaintext (it answers it at once, R5); after the ``200`` the client sends its
own close_notify unless the closure already completed (as ftplib and curl's
active mode), waits for the server's (R4), and only then speaks plaintext
(R3), starting with ``FEAT`` (R8).

Behaviours (``BEHAVIOURS``; each breaks exactly one rule):
``accept-injected-response`` (R1), ``plaintext-in-tls`` (R2),
``early-plaintext`` (R3: plaintext after its close_notify is taken as the
end of TLS), ``one-sided-close`` (R4: close_notify and the next command in
one segment), ``no-close-notify-reply`` (R5: closes TCP instead of
answering the server's close_notify), ``passive-ccc`` (R5: curl's passive
CCC mode -- it waits for the server's close_notify, never answers it and
speaks plaintext), ``no-state-reset`` (R8) and ``downgrade`` (R9).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Dict, FrozenSet, List, Optional, Sequence, Set

from starttls_harness.dialects.roles import (
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
from starttls_harness.tls.engine import (
    CloseNotifyReceived,
    ClosureComplete,
    Event,
    Rule,
    Violation,
)
from starttls_harness.tls.states import Input, State, transition

__all__ = [
    "BEHAVIOURS",
    "CommandError",
    "FtpClient",
    "FtpError",
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
            "takes plaintext sent after the AUTH TLS answer as a TLS reply",
            (Rule.R1,),
        ),
        Behaviour(
            "plaintext-in-tls",
            Rule.R2,
            "takes plaintext received while TLS is up as a reply",
            (Rule.R2,),
        ),
        Behaviour(
            "early-plaintext",
            Rule.R3,
            "after CCC takes plaintext that comes before the server's close_notify",
            (Rule.R3,),
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
        Behaviour(
            "passive-ccc",
            Rule.R5,
            "after CCC waits for the server's close_notify, never answers it, speaks plaintext",
            (Rule.R3, Rule.R5),
        ),
        Behaviour("no-state-reset", Rule.R8, "keeps the FEAT list learned before AUTH TLS/CCC"),
        Behaviour(
            "downgrade",
            Rule.R9,
            "logs in in plaintext when AUTH TLS is not offered despite require_tls",
        ),
    )
}


class FtpError(Exception):
    """Base class of the client's errors."""


class CommandError(FtpError):
    """The server answered ``4xx``/``5xx``."""


class TLSRequired(FtpError):
    """TLS is required and could not be had (not offered, refused, failed)."""


class StopTLSNotSupported(FtpError):
    """The server does not list CCC."""


def _features(lines: Sequence[bytes]) -> FrozenSet[str]:
    """FEAT's feature lines (``AUTH TLS`` as such; the first word otherwise)."""
    found: Set[str] = set()
    for line in lines[1:-1]:
        text = line.decode("latin-1").strip().upper()
        head, _, args = text.partition(" ")
        if not head:
            continue
        found.add(head)
        if head == "AUTH":
            found.update(f"AUTH {a}" for a in args.replace(";", " ").split())
    return frozenset(found)


class _ClientProtocol(asyncio.Protocol):
    """Feeds the line reader; watches the engine for closures."""

    def __init__(self, behaviour: Behaviour, max_line: int) -> None:
        self.behaviour = behaviour
        self.reader = LineReader(max_line)
        self.transport: Optional[SwitchableTransport] = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: Resolved when the CCC closure is over (or, relaxed, forced over).
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

    def _closed(self) -> None:
        if self.closure is not None and not self.closure.done():
            self.closure.set_result(None)

    def engine_event(self, event: Event) -> None:
        t = self.transport
        if isinstance(event, ClosureComplete):
            self._closed()
        elif isinstance(event, Violation) and not event.enforced and event.rule is Rule.R3:
            self._closed()  # early-plaintext: the plaintext ended TLS for it
        elif (
            isinstance(event, CloseNotifyReceived)
            and not self.behaviour.policy.enforces(Rule.R5)
            and t is not None
            and t.engine.state is State.CLOSE_RECEIVED
        ):
            if self.behaviour.name == "passive-ccc" and self.closure is not None:
                # curl's passive mode: the server's close_notify ends TLS for
                # it; it never answers and goes on in plaintext.
                t.engine.state = transition(t.engine.state, Input.FORCED_RESUME)
                self._closed()
            else:
                t.close()  # hang up instead (passive-ccc does so outside CCC)


class FtpClient:
    """An FTP client on the switchable transport; create it with :meth:`connect`."""

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
        #: What FEAT listed in the current phase (None: not known).
        self.features: Optional[FrozenSet[str]] = None
        self.logged_in = False
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
    ) -> FtpClient:
        """Connect and read the ``220`` greeting."""
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
            lines = await client._reply()
            if not lines[-1].startswith(b"220"):
                raise FtpError(f"unexpected greeting {lines[-1][:80]!r}")
            client.greeting = b"".join(lines)
        except BaseException:
            transport.abort()
            raise
        return client

    # ----------------------------------------------------------- commands

    async def feat(self) -> FrozenSet[str]:
        """Ask the server; the answer replaces what was known (``502``: none)."""
        self.features = None
        lines = await self._send(b"FEAT")
        self.features = _features(lines) if lines[-1].startswith(b"211") else frozenset()
        return self.features

    async def auth_tls(self, ssl_context: Optional[ssl.SSLContext] = None) -> bool:
        """Upgrade to TLS; True once TLS is up (False only for ``downgrade``)."""
        context = ssl_context or self.ssl_context
        if context is None:
            raise ValueError("no ssl_context given")
        if self.transport.tls_active:
            raise FtpError("TLS is already active")
        features = await self._known_features()
        if "AUTH TLS" not in features:
            return self._without_tls("the server does not offer AUTH TLS")
        # R1: whatever follows the one-line answer is held, not read.
        self.transport.hold_after(lambda line: True, once=True)
        self._write(b"AUTH TLS\r\n")
        answer = await self._line()
        if not answer.startswith(b"234"):
            self.transport.release_held()
            return self._without_tls(f"AUTH TLS refused: {answer.decode('latin-1').strip()}")
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
            await self.feat()
        return True

    async def login(self, user: str, password: str) -> bytes:
        """USER/PASS; refused locally in plaintext (R9)."""
        if (
            not self.transport.tls_active
            and self.require_tls
            and self.behaviour.name != "downgrade"
        ):
            raise TLSRequired("refusing to send credentials in plaintext (require_tls)")
        lines = await self._send(f"USER {user}".encode(), check=False)
        if lines[-1].startswith(b"331"):
            lines = await self._send(f"PASS {password}".encode(), check=False)
        self._check(lines)
        self.logged_in = True
        return lines[-1]

    async def protect(self) -> None:
        """``PBSZ 0`` and ``PROT P`` (RFC 4217 §9), as real clients send them."""
        await self._send(b"PBSZ 0")
        await self._send(b"PROT P")

    async def ccc(self) -> None:
        """Clear the control channel (CCC): the bidirectional closure, then plaintext."""
        t = self.transport
        if not t.tls_active:
            raise FtpError("CCC needs an active TLS session")
        if "CCC" not in await self._known_features():
            raise StopTLSNotSupported("the server does not list CCC")
        passive = self.behaviour.name == "passive-ccc"
        self.protocol.closure = asyncio.get_running_loop().create_future()
        if not passive:
            t.engine.accept_unwrap()  # a close_notify of the server's returns to plaintext
        await self._send(b"CCC")
        if self.protocol.reader.pending:
            t.abort()
            raise FtpError("the server sent data after its CCC answer")
        if passive:
            await asyncio.wait_for(self.protocol.closure, self.timeout)
        elif self.behaviour.name == "one-sided-close" and t.engine.state is State.TLS:
            # R4 broken: close_notify and the next command in one segment.
            with t.corked():
                t.events.extend(t.engine.unwrap())
                t.write(b"FEAT\r\n")
            await asyncio.wait_for(self.protocol.closure, self.timeout)
            self._transition()
            self.features = _features(await self._reply())
            return
        elif t.engine.state is State.TLS:
            with t.corked():  # our close_notify leaves as the cork is released
                t.events.extend(t.engine.unwrap())
            await asyncio.wait_for(self.protocol.closure, self.timeout)
        elif t.engine.state is not State.PLAINTEXT:
            await asyncio.wait_for(self.protocol.closure, self.timeout)
        if self._transition(keep_login=True):
            await self.feat()

    async def pwd(self) -> bytes:
        return (await self._send(b"PWD"))[-1]

    async def noop(self, *, check: bool = True) -> bytes:
        return (await self._send(b"NOOP", check=check))[-1]

    async def mkd(self, name: str) -> bytes:
        """Make a directory: the storage act (the reference server counts it stored)."""
        return (await self._send(f"MKD {name}".encode()))[-1]

    async def quit(self) -> None:
        with contextlib.suppress(CommandError):
            await self._send(b"QUIT")
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

    def _without_tls(self, reason: str) -> bool:
        if self.behaviour.name == "downgrade":
            self.downgraded = reason
            return False
        if self.require_tls:
            self.transport.close()
        raise TLSRequired(reason)

    def _transition(self, keep_login: bool = False) -> bool:
        """R8 after AUTH TLS/CCC; False when ``no-state-reset`` keeps the state.

        CCC keeps the login by design (RFC 4217 §5); AUTH TLS resets it.
        """
        if self.behaviour.name == "no-state-reset":
            return False
        self.features = None
        self.logged_in = self.logged_in and keep_login
        return True

    async def _known_features(self) -> FrozenSet[str]:
        if self.features is None:
            return await self.feat()
        return self.features

    def _write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.transport.write(data)

    async def _line(self) -> bytes:
        return await self.protocol.reader.read_line(self.timeout)

    async def _reply(self) -> List[bytes]:
        """One reply (RFC 959 §4.2: ``ccc-`` ... ``ccc ``)."""
        first = await self._line()
        lines = [first]
        if len(first) >= 4 and first[:3].isdigit() and first[3:4] == b"-":
            code = first[:3]
            while True:
                line = await self._line()
                lines.append(line)
                if line[:3] == code and line[3:4] != b"-":
                    break
        elif not (len(first) >= 3 and first[:3].isdigit()):
            raise FtpError(f"unexpected answer {first[:80]!r}")
        return lines

    def _check(self, lines: List[bytes]) -> None:
        if lines[-1][:1] in (b"4", b"5"):
            raise CommandError(lines[-1].decode("latin-1").strip())

    async def _send(self, command: bytes, *, check: bool = True) -> List[bytes]:
        self._write(command + b"\r\n")
        lines = await self._reply()
        if check:
            self._check(lines)
        return lines


# ------------------------------------------------------ the harness's roles


def _ended(client: FtpClient, what: str) -> ConnectionError:
    enforced = [v for v in client.transport.violations if v.enforced]
    return ConnectionEnded(enforced[-1]) if enforced else ConnectionResetError(what)


class _PathDriver(PathDriver):
    """:class:`FtpClient` through the path proxy, one verb at a time."""

    def __init__(self, spec: ClientSpec, behaviour: str, user: str, password: str) -> None:
        self.spec = spec
        self.behaviour = behaviour
        self.user = user
        self.password = password
        self.client: Optional[FtpClient] = None

    def _client(self) -> FtpClient:
        if self.client is None:
            raise ConnectionError("not connected")
        return self.client

    async def connect(self, hooks: Hooks) -> None:
        spec = self.spec
        self.client = await FtpClient.connect(
            spec.host,
            spec.port,
            ssl_context=spec.tls_context,
            server_hostname=spec.server_hostname,
            behaviour=self.behaviour,
            timeout=spec.timeout,
            timeouts=Timeouts(handshake=spec.timeout, closure=spec.timeout, connect=spec.timeout),
        )

    async def starttls(self, hooks: Hooks) -> None:
        if not await self._client().auth_tls():
            raise ConnectionError("the client carried on without TLS")

    async def command(self, hooks: Hooks) -> None:
        await self._client().noop(check=False)

    async def stoptls(self, hooks: Hooks) -> None:
        client = self._client()
        if not client.logged_in:
            await client.login(self.user, self.password)
        try:
            await client.ccc()
        except StopTLSNotSupported as exc:
            raise StopTLSUnsupported(str(exc)) from exc

    async def send_unit(self, hooks: Hooks) -> None:
        """``MKD`` cut in two records: the FIN replaces the second."""
        client = self._client()
        await client.login(self.user, self.password)
        hooks.arm(nth=2)
        client._write(b"MKD path-harness-cut")
        client._write(b"\r\n")
        await client._reply()

    async def fetch_unit(self, hooks: Hooks) -> None:
        """A multi-line FEAT answer cut by a FIN after its first record."""
        client = self._client()
        await client.login(self.user, self.password)
        hooks.arm(nth=1)
        await client.feat()

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
    """The reference client's normal session against the scripted server.

    FEAT, AUTH TLS, FEAT, login, ``PBSZ 0``/``PROT P``; while CCC is offered,
    ``cycles`` times CCC + FEAT + AUTH TLS + FEAT + login; ``MKD`` as the
    stored unit; QUIT.
    """
    errors = (FtpError, ConnectionError, OSError, asyncio.TimeoutError, RuntimeError)
    try:
        client = await FtpClient.connect(
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
        await client.auth_tls()
        await client.login(plan.user, plan.password)
        if client.transport.tls_active:
            await client.protect()
        for _ in range(plan.cycles):
            if "CCC" not in (client.features or frozenset()):
                break
            await client.ccc()
            await client.auth_tls()
            await client.login(plan.user, plan.password)
            done += 1
        answer = await client.mkd("harness-stored")
        if not answer.startswith(b"257"):
            raise _ended(client, f"MKD answered {answer[:60]!r}")
        with contextlib.suppress(*errors):
            await client.quit()
    except errors as exc:
        return failed(exc)
    finally:
        client.close()
    return ClientOutcome(True, f"directory made after {done} CCC cycle(s)")
