"""Reference ManageSieve client (RFC 5804): STARTTLS, the STOPTLS extension, misbehaviours.

No Python ManageSieve library runs on the harness's switchable transport, so
this client is small and written for it: an ``asyncio.Protocol`` on
:class:`starttls_harness.tls.aio.SwitchableTransport`.

Rules it keeps: R1 (the hold gate is armed for the line that closes the
STARTTLS answer; bytes after it are refused by the engine), R3-R5 (``stoptls()``
waits for the bidirectional closure, reads the plaintext greeting and asks
CAPABILITY), R8 (after STARTTLS it sends ``CAPABILITY``, takes the first capability
list under TLS in place of what it learnt in plaintext, then sends
``NOOP "<tag>"`` and reads up to its tagged answer: a server that re-issues
its capabilities (RFC 5804 §2.2) and one that only answers are both read in
step; nothing is pipelined), R9 (with ``require_tls`` it never authenticates in
plaintext).  A response with data lines where the command expects none is
a re-issued capability list and is read as one.

Behaviours (``BEHAVIOURS``; each breaks exactly one rule, as the IMAP
client's): ``accept-injected-response`` (R1), ``plaintext-in-tls`` (R2),
``one-sided-close`` (R4), ``no-close-notify-reply`` (R5), ``no-state-reset``
(R8: authenticates right after the handshake on the plaintext list) and
``downgrade`` (R9).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import ssl
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Sequence

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
from starttls_harness.dialects.sieve import final_status, quoted, response_tag
from starttls_harness.servers.base import STRICT, Behaviour, behaviour_named
from starttls_harness.servers.imapsyntax import LineReader
from starttls_harness.tls.aio import ConnectionEnded, SwitchableTransport, Timeouts, open_connection
from starttls_harness.tls.engine import CloseNotifyReceived, ClosureComplete, Event, Rule
from starttls_harness.tls.states import State

__all__ = [
    "BEHAVIOURS",
    "CommandError",
    "Response",
    "SieveClient",
    "SieveError",
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
            "takes plaintext sent after the STARTTLS answer as a TLS response",
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
        Behaviour("no-state-reset", Rule.R8, "keeps capabilities learned before a transition"),
        Behaviour(
            "downgrade",
            Rule.R9,
            "authenticates in plaintext when STARTTLS is not offered despite require_tls",
        ),
    )
}

_STRING = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_LITERAL_AT_END = re.compile(rb"\{(\d{1,10})\+?\}\r?\n\Z")
_LITERAL_AT_START = re.compile(rb"\{(\d{1,10})\+?\}\r?\n")
_SYNC_TAG = "STARTTLS-SYNC"


class SieveError(Exception):
    """Base class of the client's errors."""


class CommandError(SieveError):
    """The server answered ``NO`` or ``BYE``."""


class TLSRequired(SieveError):
    """TLS is required and could not be had (not offered, refused, failed)."""


class StopTLSNotSupported(SieveError):
    """The server does not list STOPTLS."""


@dataclass
class Response:
    """One response: its data lines (literals inline) and its final line."""

    status: str
    final: bytes
    data: List[bytes] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def tag(self) -> Optional[str]:
        return response_tag(self.final)


def _capability_list(data: Sequence[bytes]) -> Dict[str, str]:
    caps: Dict[str, str] = {}
    for line in data:
        strings = [s.decode("utf-8", "replace") for s in _STRING.findall(line)]
        if strings:
            caps[strings[0].upper()] = strings[1] if len(strings) > 1 else ""
    return caps


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


class SieveClient:
    """A ManageSieve client on the switchable transport; create it with :meth:`connect`."""

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
        max_literal: int = 1 << 20,
    ) -> None:
        self.transport = transport
        self.protocol = protocol
        self.behaviour = behaviour
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.require_tls = require_tls
        self.timeout = timeout
        self.max_literal = max_literal
        #: The capability list of the current phase, name -> value (None: not known).
        self.caps: Optional[Dict[str, str]] = None
        self.authenticated = False
        self.upgrades = 0
        self.downgraded: Optional[str] = None
        self._tag = 0

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
    ) -> SieveClient:
        """Connect and read the greeting (the capability list)."""
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
            await client._read_greeting(learn=True)
        except BaseException:
            transport.abort()
            raise
        return client

    @property
    def capabilities(self) -> Optional[FrozenSet[str]]:
        return frozenset(self.caps) if self.caps is not None else None

    # ----------------------------------------------------------- commands

    async def capability(self) -> FrozenSet[str]:
        """Ask the server; the answer replaces what was known."""
        response = await self._run(b"CAPABILITY\r\n", data=True)
        self.caps = _capability_list(response.data)
        return frozenset(self.caps)

    async def noop(self) -> Response:
        self._tag += 1
        return await self._run(b"NOOP " + quoted(f"n{self._tag}") + b"\r\n")

    async def starttls(self, ssl_context: Optional[ssl.SSLContext] = None) -> bool:
        """Upgrade to TLS; True once TLS is up (False only for ``downgrade``)."""
        context = ssl_context or self.ssl_context
        if context is None:
            raise ValueError("no ssl_context given")
        if self.transport.tls_active:
            raise SieveError("TLS is already active")
        if "STARTTLS" not in await self._known():
            return self._without_tls("the server does not offer STARTTLS")
        # R1: whatever follows the line closing the answer is held, not read.
        self.transport.hold_after(lambda line: final_status(line) is not None, once=True)
        self._write(b"STARTTLS\r\n")
        response = await self._response()
        if not response.ok:
            self.transport.release_held()
            return self._without_tls(f"STARTTLS refused: {response.final.decode().strip()}")
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
            await self._resync()
        return True

    async def _resync(self) -> None:
        """CAPABILITY, then a tagged NOOP read up to its answer; the first list counts.

        The first response under TLS is the re-issued list (RFC 5804 §2.2) or
        the answer to CAPABILITY; the NOOP, sent only once that response is
        in, brings the reader level with the server either way.
        """
        self._write(b"CAPABILITY\r\n")
        first = await self._response()
        if not first.ok:
            raise CommandError(first.final.decode("utf-8", "replace").strip())
        self.caps = _capability_list(first.data)
        self._write(b"NOOP " + quoted(_SYNC_TAG) + b"\r\n")
        for _ in range(4):
            response = await self._response()
            if response.status == "BYE":
                raise CommandError(response.final.decode("utf-8", "replace").strip())
            if response.tag == _SYNC_TAG:
                return
        raise SieveError("no answer to the synchronising NOOP")

    async def stoptls(self) -> None:
        """Return to plaintext with the bidirectional closure (R3-R5)."""
        if not self.transport.tls_active:
            raise SieveError("STOPTLS needs an active TLS session")
        if "STOPTLS" not in await self._known():
            raise StopTLSNotSupported("the server does not list STOPTLS")
        await self._run(b"STOPTLS\r\n")
        if self.transport.engine.state is not State.TLS:
            raise self._ended("TLS ended before STOPTLS completed")
        if self.protocol.reader.pending:
            self.transport.abort()
            raise SieveError("the server sent data after its STOPTLS answer")
        if self.behaviour.name == "one-sided-close":
            # R4 broken: close_notify and the next command in one segment.
            self.protocol.closure = asyncio.get_running_loop().create_future()
            with self.transport.corked():
                self.transport.events.extend(self.transport.engine.unwrap())
                self.transport.write(b"CAPABILITY\r\n")
            await asyncio.wait_for(self.protocol.closure, self.timeout)
            self._transition()
            await self._read_greeting(learn=True)
            self.caps = _capability_list((await self._response()).data)
            return
        await self.transport.unwrap(timeout=self.timeout)
        reset = self._transition()
        await self._read_greeting(learn=False)
        if reset:
            await self.capability()

    async def authenticate(self, user: str, password: str) -> Response:
        """AUTHENTICATE "PLAIN" with an initial response; never in plaintext (R9)."""
        if (
            not self.transport.tls_active
            and self.require_tls
            and self.behaviour.name != "downgrade"
        ):
            raise TLSRequired("refusing to send credentials in plaintext (require_tls)")
        caps = self.caps or {}
        if "PLAIN" not in caps.get("SASL", "").upper().split():
            raise SieveError("the server offers no SASL PLAIN")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        response = await self._run(b'AUTHENTICATE "PLAIN" ' + quoted(token) + b"\r\n")
        self.authenticated = True
        return response

    async def putscript(self, name: str, script: bytes) -> Response:
        """Store ``script`` as ``name`` (a non-synchronizing literal)."""
        head = b"PUTSCRIPT " + quoted(name) + b" {%d+}\r\n" % len(script)
        return await self._run(head + script + b"\r\n")

    async def listscripts(self) -> List[str]:
        response = await self._run(b"LISTSCRIPTS\r\n", data=True)
        names = [_STRING.search(line) for line in response.data]
        return [n.group(1).decode("utf-8", "replace") for n in names if n is not None]

    async def getscript(self, name: str) -> bytes:
        """The script ``name`` (sent back as a literal or a quoted string)."""
        response = await self._run(b"GETSCRIPT " + quoted(name) + b"\r\n", data=True)
        if not response.data:
            raise SieveError("GETSCRIPT answered without the script")
        first = response.data[0]
        literal = _LITERAL_AT_START.match(first)
        if literal is not None:
            return first[literal.end() : literal.end() + int(literal.group(1))]
        found = _STRING.match(first)
        return found.group(1) if found is not None else first

    async def logout(self) -> None:
        with contextlib.suppress(CommandError):
            await self._run(b"LOGOUT\r\n")
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
        """R8 after STARTTLS/STOPTLS; False when ``no-state-reset`` keeps the state."""
        if self.behaviour.name == "no-state-reset":
            return False
        self.caps = None
        self.authenticated = False
        return True

    async def _known(self) -> FrozenSet[str]:
        if self.caps is None:
            return await self.capability()
        return frozenset(self.caps)

    def _write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.transport.write(data)

    async def _run(self, command: bytes, *, data: bool = False) -> Response:
        """Send ``command``; its answer (a re-issued capability list before it is read as one)."""
        self._write(command)
        for _ in range(4):
            response = await self._response()
            if response.data and not data and response.status == "OK":
                if self.behaviour.name != "no-state-reset":
                    self.caps = _capability_list(response.data)
                continue
            if not response.ok:
                raise CommandError(response.final.decode("utf-8", "replace").strip())
            return response
        raise SieveError("too many unsolicited responses")

    async def _response(self) -> Response:
        reader = self.protocol.reader
        data: List[bytes] = []
        while True:
            line = await reader.read_line(self.timeout)
            status = final_status(line)
            if status is not None:
                return Response(status, line, data)
            found = _LITERAL_AT_END.search(line)
            if found is not None:
                size = int(found.group(1))
                if size > self.max_literal:
                    self.transport.abort()
                    raise SieveError(f"literal of {size} bytes exceeds {self.max_literal}")
                line += await reader.read_exactly(size, self.timeout)
                line += await reader.read_line(self.timeout)
            data.append(line)

    async def _read_greeting(self, *, learn: bool) -> None:
        response = await self._response()
        if not response.ok:
            self.transport.abort()
            raise SieveError(f"unexpected greeting {response.final[:80]!r}")
        if learn:
            self.caps = _capability_list(response.data)


# ------------------------------------------------------ the harness's roles


class _PathDriver(PathDriver):
    """:class:`SieveClient` through the path proxy, one verb at a time."""

    def __init__(self, spec: ClientSpec, behaviour: str, user: str, password: str) -> None:
        self.spec = spec
        self.behaviour = behaviour
        self.user = user
        self.password = password
        self.client: Optional[SieveClient] = None

    def _client(self) -> SieveClient:
        if self.client is None:
            raise ConnectionError("not connected")
        return self.client

    async def connect(self, hooks: Hooks) -> None:
        spec = self.spec
        self.client = await SieveClient.connect(
            spec.host,
            spec.port,
            ssl_context=spec.tls_context,
            server_hostname=spec.server_hostname,
            behaviour=self.behaviour,
            timeout=spec.timeout,
            timeouts=Timeouts(handshake=spec.timeout, closure=spec.timeout, connect=spec.timeout),
        )

    async def starttls(self, hooks: Hooks) -> None:
        if not await self._client().starttls():
            raise ConnectionError("the client carried on without TLS")

    async def command(self, hooks: Hooks) -> None:
        await self._client().noop()

    async def stoptls(self, hooks: Hooks) -> None:
        try:
            await self._client().stoptls()
        except StopTLSNotSupported as exc:
            raise StopTLSUnsupported(str(exc)) from exc

    async def send_unit(self, hooks: Hooks) -> None:
        """PUTSCRIPT of a literal over two records: FIN replaces the second."""
        client = self._client()
        await client.capability()  # what the server offers now, whatever was kept
        await client.authenticate(self.user, self.password)
        hooks.arm(nth=2)  # command and literal in one write: records 1-2
        await client.putscript("path", PATH_MESSAGE)

    async def fetch_unit(self, hooks: Hooks) -> None:
        """GETSCRIPT of a script whose literal takes two records: FIN cuts it."""
        client = self._client()
        await client.capability()
        await client.authenticate(self.user, self.password)
        await client.putscript("path", PATH_MESSAGE)
        hooks.arm(nth=2)
        await client.getscript("path")

    async def quit(self, hooks: Hooks) -> None:
        await self._client().logout()

    def engine_events(self) -> Optional[Sequence[Event]]:
        if self.client is None:
            return None
        return transport_events(self.client.transport)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def path_driver(spec: ClientSpec, behaviour: str, user: str, password: str) -> PathDriver:
    """The reference client as the path role's client under test (it authenticates)."""
    return _PathDriver(spec, behaviour, user, password)


async def reference_session(plan: SessionPlan) -> ClientOutcome:
    """The reference client's normal session against the scripted server."""
    errors = (SieveError, ConnectionError, OSError, asyncio.TimeoutError, RuntimeError)
    try:
        client = await SieveClient.connect(
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
        await client.starttls()
        await client.authenticate(plan.user, plan.password)
        for _ in range(plan.cycles):
            if "STOPTLS" not in (client.capabilities or frozenset()):
                break
            await client.stoptls()  # closure, greeting, CAPABILITY
            await client.starttls()
            await client.authenticate(plan.user, plan.password)
            done += 1
        await client.putscript("harness", plan.message)
        with contextlib.suppress(*errors):
            await client.logout()
    except errors as exc:
        return failed(exc)
    finally:
        client.close()
    return ClientOutcome(True, f"script stored after {done} STOPTLS cycle(s)")
