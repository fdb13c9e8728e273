"""Reference NNTP client: STARTTLS (RFC 4642), the STOPTLS extension, and misbehaviours.

Why not a library: ``nntplib`` (stdlib up to Python 3.12) is built on a
blocking socket whose ``starttls()`` wraps it with ``wrap_socket`` (bytes
read ahead at the upgrade are dropped unseen; no way back to plaintext), and
no asyncio NNTP library on PyPI has STARTTLS.  So this client is small and
written for the harness: an ``asyncio.Protocol`` on the switchable transport
reading CRLF lines (:class:`~starttls_harness.servers.imapsyntax.LineReader`);
``nntplib`` is used by the tests as an independent peer of the reference
server instead.

Rules it keeps (``docs/rules.md``):

* R1: before sending STARTTLS it arms ``hold_after`` for the status line of
  the answer; plaintext after it is the leftover, which the engine refuses.
* R3-R5: ``stoptls()`` sends STOPTLS (nothing pipelined), expects ``382``,
  ``await transport.unwrap()`` (its close_notify, then the server's), then
  reads the new ``200``/``201`` greeting and re-reads CAPABILITIES.  A
  close_notify the server sends first is answered at once.
* R8: capabilities, login and current group are discarded at every
  transition; CAPABILITIES is re-read after STARTTLS and STOPTLS.
* R9: with ``require_tls=True`` (the default) it aborts with
  :class:`TLSRequired` when STARTTLS is not offered, refused or fails, and
  never sends AUTHINFO in plaintext.

Behaviours (``BEHAVIOURS``; each breaks exactly one rule, as the IMAP
client's): ``strict``; ``accept-injected-response`` (R1, engine relaxed:
plaintext after the ``382`` is taken as a TLS response);
``plaintext-in-tls`` (R2, relaxed); ``one-sided-close`` (R4: close_notify
and the next command, CAPABILITIES, in one segment); ``no-close-notify-reply``
(R5, relaxed: TCP closed instead of answering the server's close_notify);
``no-state-reset`` (R8: trusts the plaintext capabilities after STARTTLS,
logs in at once, never re-reads them); ``downgrade`` (R9: carries on in
plaintext, AUTHINFO in the clear, when STARTTLS is missing or refused).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from starttls_harness.clients.imap import BEHAVIOURS as IMAP_CLIENT_BEHAVIOURS
from starttls_harness.dialects.nntp import NEWSGROUP, is_multiline
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
from starttls_harness.servers.base import Behaviour, behaviour_named
from starttls_harness.servers.imapsyntax import LineReader
from starttls_harness.tls.aio import ConnectionEnded, SwitchableTransport, Timeouts, open_connection
from starttls_harness.tls.engine import CloseNotifyReceived, ClosureComplete, Event, Rule
from starttls_harness.tls.states import State

__all__ = [
    "BEHAVIOURS",
    "CommandError",
    "NntpClient",
    "NntpError",
    "Response",
    "StartTLSError",
    "StopTLSNotSupported",
    "TLSRequired",
    "path_driver",
    "reference_session",
]

#: The IMAP client's behaviours, broken the same way (see the module docstring).
BEHAVIOURS: Dict[str, Behaviour] = dict(IMAP_CLIENT_BEHAVIOURS)


class NntpError(Exception):
    """Anything the NNTP client reports."""


class CommandError(NntpError):
    """The server answered with an unexpected status."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"{response.code} {response.text}")
        self.response = response


class StartTLSError(NntpError):
    """STARTTLS was not offered, was refused or failed."""


class TLSRequired(StartTLSError):
    """TLS is required (``require_tls``) and could not be had (R9)."""


class StopTLSNotSupported(NntpError):
    """The server does not advertise STOPTLS under TLS."""


@dataclass
class Response:
    """One answer: status code and text, and the data block if one followed."""

    code: int
    text: str
    lines: List[bytes] = field(default_factory=list)


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
            self.transport.close()  # no-close-notify-reply: hang up instead (R5 broken)


def _is_status_line(line: bytes) -> bool:
    """Hold-gate predicate: the (single-line) answer to STARTTLS."""
    return line[:3].isdigit()


class NntpClient:
    """An NNTP reader client on the switchable transport (see the module docstring)."""

    def __init__(
        self,
        transport: SwitchableTransport,
        protocol: _ClientProtocol,
        *,
        behaviour: Behaviour,
        ssl_context: Optional[ssl.SSLContext],
        server_hostname: Optional[str],
        require_tls: bool,
        timeout: float,
    ) -> None:
        self.transport = transport
        self.protocol = protocol
        self.behaviour = behaviour
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.require_tls = require_tls
        self.timeout = timeout
        self.greeting: Optional[Response] = None
        #: Capability keyword -> its arguments, in the current phase (None: not known).
        self.capabilities: Optional[Dict[str, List[str]]] = None
        self.authenticated = False
        self.group: Optional[str] = None
        self.upgrades = 0
        #: Why TLS was skipped (``downgrade`` only).
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
    ) -> NntpClient:
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

    async def capability(self) -> Dict[str, List[str]]:
        """CAPABILITIES; the answer replaces what was known."""
        self.capabilities = None
        response = await self._run(b"CAPABILITIES", 101)
        caps: Dict[str, List[str]] = {}
        for line in response.lines:
            words = line.decode("utf-8", "replace").split()
            if words:
                caps[words[0].upper()] = [w.upper() for w in words[1:]]
        self.capabilities = caps
        return caps

    async def date(self) -> Response:
        return await self._run(b"DATE", 111)

    async def starttls(self, ssl_context: Optional[ssl.SSLContext] = None) -> bool:
        """Upgrade to TLS; True once TLS is up (False only for ``downgrade``)."""
        context = ssl_context or self.ssl_context
        if context is None:
            raise ValueError("no ssl_context given")
        if self.transport.tls_active:
            raise NntpError("TLS is already active")
        if "STARTTLS" not in await self._known_capabilities():
            return self._without_tls("the server does not offer STARTTLS")
        # R1: whatever follows the answer line is held, not read.
        self.transport.hold_after(_is_status_line, once=True)
        self._write(b"STARTTLS\r\n")
        response = await self._read_response()
        if response.code != 382:
            self.transport.release_held()
            return self._without_tls(f"STARTTLS refused: {response.code} {response.text}")
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
            error = TLSRequired if self.require_tls else StartTLSError
            raise error(f"TLS could not be started: {exc}") from exc
        self.upgrades += 1
        if self._transition():
            await self.capability()
        return True

    async def stoptls(self) -> None:
        """Return to plaintext with the bidirectional closure (R3-R5)."""
        if not self.transport.tls_active:
            raise NntpError("STOPTLS needs an active TLS session")
        if "STOPTLS" not in await self._known_capabilities():
            raise StopTLSNotSupported("the server does not advertise STOPTLS")
        await self._run(b"STOPTLS", 382)
        if self.transport.engine.state is not State.TLS:
            raise self._ended("TLS ended before STOPTLS completed")
        if self.protocol.reader.pending:
            self.transport.abort()
            raise NntpError("the server sent data after its STOPTLS answer")
        if self.behaviour.name == "one-sided-close":
            await self._one_sided_stoptls()
            return
        await self.transport.unwrap(timeout=self.timeout)
        reset = self._transition()
        await self._read_greeting()
        if reset:
            await self.capability()

    async def _one_sided_stoptls(self) -> None:
        """R4 broken: close_notify and the next command in one segment."""
        self.protocol.closure = asyncio.get_running_loop().create_future()
        with self.transport.corked():
            self.transport.events.extend(self.transport.engine.unwrap())
            self.transport.write(b"CAPABILITIES\r\n")
        await asyncio.wait_for(self.protocol.closure, self.timeout)
        self._transition()
        await self._read_greeting()
        await self._read_response()

    async def login(self, user: str, password: str) -> Response:
        """AUTHINFO USER/PASS, or SASL PLAIN; never in plaintext when TLS is required."""
        if not self.transport.tls_active and self.require_tls and not self.downgraded:
            raise TLSRequired("refusing to send credentials in plaintext (require_tls)")
        caps = await self._known_capabilities()
        offered = caps.get("AUTHINFO", [])
        if "SASL" in offered and "PLAIN" in caps.get("SASL", []) and "USER" not in offered:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            response = await self._run(f"AUTHINFO SASL PLAIN {token}".encode(), 281)
        else:
            await self._run(f"AUTHINFO USER {user}".encode(), 381)
            response = await self._run(f"AUTHINFO PASS {password}".encode(), 281)
        self.authenticated = True
        return response

    async def select(self, group: str = NEWSGROUP) -> Response:
        response = await self._run(f"GROUP {group}".encode(), 211)
        self.group = group
        return response

    async def post(self, article: bytes) -> Response:
        """POST one article (dot-stuffed here; CRLF line ends expected)."""
        await self._run(b"POST", 340)
        lines = article.split(b"\r\n")
        if lines and lines[-1] == b"":
            lines.pop()
        body = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)
        self._write(body + b".\r\n")
        return self._checked(await self._read_response(), 240)

    async def quit(self) -> Response:
        self._write(b"QUIT\r\n")
        response = await self._read_response()
        await self.aclose()
        return response

    def close(self) -> None:
        """Close (one-way close_notify under TLS, then TCP FIN)."""
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
        raise StartTLSError(reason)

    def _transition(self) -> bool:
        """R8 after STARTTLS/STOPTLS; False when ``no-state-reset`` keeps it."""
        if self.behaviour.name == "no-state-reset":
            return False
        self.capabilities = None
        self.authenticated = False
        self.group = None
        return True

    async def _known_capabilities(self) -> Dict[str, List[str]]:
        if self.capabilities is None:
            return await self.capability()
        return self.capabilities

    def _write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.transport.write(data)

    async def _run(self, command: bytes, expect: int) -> Response:
        self._write(command + b"\r\n")
        return self._checked(await self._read_response(), expect)

    @staticmethod
    def _checked(response: Response, expect: int) -> Response:
        if response.code != expect:
            raise CommandError(response)
        return response

    async def _read_response(self) -> Response:
        reader = self.protocol.reader
        status = await reader.read_line(self.timeout)
        if not status[:3].isdigit():
            self.transport.abort()
            raise NntpError(f"malformed status line {status[:80]!r}")
        response = Response(int(status[:3]), status[4:].decode("utf-8", "replace").strip())
        if is_multiline(status):
            while True:
                line = (await reader.read_line(self.timeout)).rstrip(b"\r\n")
                if line == b".":
                    break
                response.lines.append(line[1:] if line.startswith(b".") else line)
        return response

    async def _read_greeting(self) -> None:
        response = await self._read_response()
        if response.code not in (200, 201):
            self.transport.abort()
            raise CommandError(response)
        self.greeting = response


# ------------------------------------------------------ the harness's roles


def _as_article(message: bytes, sender: str = "harness@harness.invalid") -> bytes:
    """A mail message with the headers an NNTP server wants, if it lacks them."""
    head = b""
    if not message.lower().startswith(b"newsgroups:") and b"\r\nnewsgroups:" not in message.lower():
        head += f"Newsgroups: {NEWSGROUP}\r\n".encode()
    if not message.lower().startswith(b"from:") and b"\r\nfrom:" not in message.lower():
        head += f"From: <{sender}>\r\n".encode()
    return head + message


class _PathDriver(PathDriver):
    """:class:`NntpClient` through the path proxy, one verb at a time."""

    def __init__(self, spec: ClientSpec, behaviour: str, user: str, password: str) -> None:
        self.spec = spec
        self.behaviour = behaviour
        self.client: Optional[NntpClient] = None

    def _client(self) -> NntpClient:
        if self.client is None:
            raise ConnectionError("not connected")
        return self.client

    async def connect(self, hooks: Hooks) -> None:
        spec = self.spec
        self.client = await NntpClient.connect(
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
        await self._client().date()

    async def stoptls(self, hooks: Hooks) -> None:
        try:
            await self._client().stoptls()
        except StopTLSNotSupported as exc:
            raise StopTLSUnsupported(str(exc)) from exc

    async def send_unit(self, hooks: Hooks) -> None:
        """POST (record 1), then the article over two records: FIN replaces the second."""
        hooks.arm(nth=3)
        await self._client().post(_as_article(PATH_MESSAGE))

    async def fetch_unit(self, hooks: Hooks) -> None:
        """CAPABILITIES under TLS: the reference server writes one record per line."""
        hooks.arm(nth=2)
        await self._client().capability()

    async def quit(self, hooks: Hooks) -> None:
        await self._client().quit()

    def engine_events(self) -> Optional[Sequence[Event]]:
        return None if self.client is None else transport_events(self.client.transport)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def path_driver(spec: ClientSpec, behaviour: str, user: str, password: str) -> PathDriver:
    """The reference client as the path role's client under test."""
    return _PathDriver(spec, behaviour, user, password)


async def reference_session(plan: SessionPlan) -> ClientOutcome:
    """The reference client's normal session against the scripted server."""
    errors = (NntpError, ConnectionError, OSError, asyncio.TimeoutError, RuntimeError)
    try:
        client = await NntpClient.connect(
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

    async def login() -> None:
        if "AUTHINFO" in (client.capabilities or {}):
            await client.login(plan.user, plan.password)

    done = 0
    try:
        await client.starttls()  # CAPABILITIES, STARTTLS, CAPABILITIES
        await login()
        for _ in range(plan.cycles):
            if "STOPTLS" not in (client.capabilities or {}):
                break
            await client.stoptls()  # closure, greeting, CAPABILITIES
            await client.starttls()
            await login()
            done += 1
        await client.post(_as_article(plan.message, plan.sender))
        with contextlib.suppress(*errors):
            await client.quit()
    except errors as exc:
        return failed(exc)
    finally:
        client.close()
    return ClientOutcome(True, f"article posted after {done} STOPTLS cycle(s)")
