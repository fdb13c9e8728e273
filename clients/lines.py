"""What the reference clients of the line protocols share (POP3, ManageSieve, NNTP, FTP, IMAP).

Each of those clients is an ``asyncio.Protocol`` on
:class:`starttls_harness.tls.aio.SwitchableTransport` that feeds a
:class:`~starttls_harness.servers.imapsyntax.LineReader` and keeps the same
rules the same way; only the words differ.  So the way the rules are kept
is written once here, and a dialect's client module says only what is its
own: its commands and how it reads their answers (the hooks below), its
errors, and its misbehaving modes.

* :class:`LineClientProtocol` -- the line reader, the closure future and the
  engine watch (``no-close-notify-reply`` hangs up instead of answering, R5);
* :class:`LineClient` -- connect and greet, the upgrade (R1: the hold gate
  is armed before the command leaves; R9: ``require_tls`` refuses to go on
  without TLS, ``downgrade`` goes on), the return to plaintext (R3-R5; the
  ``one-sided-close`` mode glues its next command to its close_notify, R4),
  the reset at every transition (R8; ``no-state-reset`` keeps the state),
  and a bounded close;
* :class:`LinePathDriver` -- the client driven one verb at a time through the
  path proxy;
* :func:`run_reference_session` -- the normal session against the scripted
  server: upgrade, login, STOPTLS cycles while offered, store, goodbye.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import (
    Any,
    Awaitable,
    Callable,
    ClassVar,
    Collection,
    Dict,
    Generic,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Type,
    TypeVar,
)

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
from starttls_harness.tls.engine import CloseNotifyReceived, ClosureComplete, Event, Rule
from starttls_harness.tls.states import State

__all__ = [
    "LineClient",
    "LineClientProtocol",
    "LinePathDriver",
    "client_behaviours",
    "run_reference_session",
]

C = TypeVar("C", bound="LineClient")


def client_behaviours(
    upgrade: str,
    *,
    keeps: str,
    downgrade: str,
    answer: str = "response",
    extra: Sequence[Behaviour] = (),
) -> Dict[str, Behaviour]:
    """A line client's misbehaving modes, each breaking exactly one rule, in rule order.

    ``upgrade`` names the upgrade command and ``answer`` what the server sends;
    ``keeps`` says what ``no-state-reset`` keeps (R8), ``downgrade`` what the
    client does without TLS (R9); ``extra`` adds the dialect's own modes.
    """
    modes = (
        Behaviour(
            "accept-injected-response",
            Rule.R1,
            f"takes plaintext sent after the {upgrade} answer as a TLS {answer}",
            (Rule.R1,),
        ),
        Behaviour(
            "plaintext-in-tls",
            Rule.R2,
            f"takes plaintext received while TLS is up as a {answer}",
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
        Behaviour("no-state-reset", Rule.R8, keeps),
        Behaviour("downgrade", Rule.R9, downgrade),
        *extra,
    )
    ordered = sorted(modes, key=lambda b: list(Rule).index(b.rule) if b.rule else -1)
    return {b.name: b for b in (STRICT, *ordered)}


class LineClientProtocol(asyncio.Protocol):
    """Feeds the line reader; watches the engine for closures."""

    def __init__(self, behaviour: Behaviour, max_line: int) -> None:
        self.behaviour = behaviour
        self.reader = LineReader(max_line)
        self.transport: Optional[SwitchableTransport] = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: Resolved when a closure the client waits for is over.
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

    def closure_over(self) -> None:
        """The closure the client waits for is over."""
        if self.closure is not None and not self.closure.done():
            self.closure.set_result(None)

    def engine_event(self, event: Event) -> None:
        if isinstance(event, ClosureComplete):
            self.closure_over()
        elif (
            isinstance(event, CloseNotifyReceived)
            and not self.behaviour.policy.enforces(Rule.R5)
            and self.transport is not None
            and self.transport.engine.state is State.CLOSE_RECEIVED
        ):
            self.unanswered(self.transport)

    def unanswered(self, transport: SwitchableTransport) -> None:
        """R5 relaxed: what the client does with a close_notify it will not answer."""
        transport.close()  # no-close-notify-reply: hang up instead (R5 broken)


class LineClient:
    """A reference client on the switchable transport; create it with :meth:`connect`.

    A dialect sets the class attributes and fills in the hooks (the methods
    that raise :class:`NotImplementedError`).
    """

    #: The dialect's misbehaving modes, by name.
    behaviours: ClassVar[Dict[str, Behaviour]]
    protocol_class: ClassVar[Type[LineClientProtocol]] = LineClientProtocol
    #: The dialect's errors: its base class, TLS required and not had (R9),
    #: STARTTLS refused when TLS is not required, no return to plaintext.
    error: ClassVar[Type[Exception]]
    tls_required: ClassVar[Type[Exception]]
    starttls_error: ClassVar[Type[Exception]]
    stoptls_unsupported: ClassVar[Type[Exception]]
    #: The error of an answer the client cannot read (the base error by default).
    protocol_error: ClassVar[Optional[Type[Exception]]] = None
    #: The upgrade command and the return's as they are offered (capabilities).
    upgrade_name: ClassVar[str] = "STARTTLS"
    stoptls_name: ClassVar[str] = "STOPTLS"
    #: What :meth:`stoptls` says when the server does not offer the return.
    stoptls_missing: ClassVar[str] = "the server does not advertise STOPTLS"

    def __init__(
        self,
        transport: SwitchableTransport,
        protocol: LineClientProtocol,
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
        #: Upgrades done; ``downgraded`` says why TLS was skipped (``downgrade``).
        self.upgrades = 0
        self.downgraded: Optional[str] = None

    @classmethod
    async def connect(
        cls: Type[C],
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
    ) -> C:
        """Connect and read the greeting."""
        return await cls._open(
            host,
            port,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            require_tls=require_tls,
            behaviour=behaviour,
            timeout=timeout,
            timeouts=timeouts,
            max_line=max_line,
        )

    @classmethod
    async def _open(
        cls: Type[C],
        host: str,
        port: int,
        *,
        ssl_context: Optional[ssl.SSLContext],
        server_hostname: Optional[str],
        require_tls: bool,
        behaviour: str,
        timeout: float,
        timeouts: Optional[Timeouts],
        max_line: int,
        **options: Any,
    ) -> C:
        chosen = behaviour_named(cls.behaviours, behaviour)
        protocol = cls.protocol_class(chosen, max_line)
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
            **options,
        )
        try:
            await client._greet()
        except BaseException:
            transport.abort()
            raise
        return client

    # ------------------------------------------------------------ hooks

    async def _greet(self) -> None:
        """Read the greeting at connection start (raise if it is not one)."""
        raise NotImplementedError

    def _known(self) -> Optional[Collection[str]]:
        """What the server offers in this phase, as far as known (None: not known)."""
        raise NotImplementedError

    async def _discover(self) -> Collection[str]:
        """Ask the server what it offers; the answer replaces what was known."""
        raise NotImplementedError

    async def _ask_upgrade(self) -> Optional[str]:
        """Arm the hold gate, send the upgrade command; the refusal's words, or None."""
        raise NotImplementedError

    async def _rediscover(self, upgraded: bool) -> None:
        """R8: learn the capabilities again after an upgrade (or a return)."""
        await self._discover()

    async def _ask_stoptls(self) -> None:
        """Send the return command and check its positive answer."""
        raise NotImplementedError

    def _glued(self) -> Tuple[bytes, Callable[[], Awaitable[object]]]:
        """``one-sided-close``: the command glued to the close_notify, and how to
        read the greeting and its answer once the closure is over."""
        raise NotImplementedError

    async def _greet_again(self, reset: bool) -> None:
        """Read the plaintext greeting after the return (``reset``: state forgotten)."""
        await self._greet()

    def _forget(self) -> None:
        """R8: drop what the transition invalidates (capabilities, login, ...)."""
        raise NotImplementedError

    # --------------------------------------------------------- commands

    async def starttls(self, ssl_context: Optional[ssl.SSLContext] = None) -> bool:
        """Upgrade to TLS; True once TLS is up (False only for ``downgrade``)."""
        context = ssl_context or self.ssl_context
        if context is None:
            raise ValueError("no ssl_context given")
        if self.transport.tls_active:
            raise self.error("TLS is already active")
        name = self.upgrade_name
        if name not in await self._offered():
            return self._without_tls(f"the server does not offer {name}")
        refused = await self._ask_upgrade()
        if refused is not None:
            self.transport.release_held()
            return self._without_tls(f"{name} refused: {refused}")
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
            error = self.tls_required if self.require_tls else self.starttls_error
            raise error(f"TLS could not be started: {exc}") from exc
        self.upgrades += 1
        if self._transition():
            await self._rediscover(True)
        return True

    async def stoptls(self) -> None:
        """Return to plaintext with the bidirectional closure (R3-R5)."""
        await self._may_stop()
        await self._ask_stoptls()
        if self.transport.engine.state is not State.TLS:
            # The answer came, and the same read broke a rule (e.g. the
            # server's plaintext greeting glued to its close_notify).
            raise self._ended(f"TLS ended before {self.stoptls_name} completed")
        self._nothing_after_answer()
        if self.behaviour.name == "one-sided-close":
            # R4 broken: close_notify and the next command in one segment.
            command, answer = self._glued()
            self.protocol.closure = asyncio.get_running_loop().create_future()
            with self.transport.corked():
                self.transport.events.extend(self.transport.engine.unwrap())
                self.transport.write(command)
            await asyncio.wait_for(self.protocol.closure, self.timeout)
            self._transition()
            await answer()
            return
        await self.transport.unwrap(timeout=self.timeout)
        reset = self._transition()
        await self._greet_again(reset)
        if reset:
            await self._rediscover(False)

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

    # -------------------------------------------------------- internals

    def _ended(self, what: str) -> ConnectionError:
        """The error that ended the connection (the violation, if one did)."""
        enforced = [v for v in self.transport.violations if v.enforced]
        if enforced:
            return ConnectionEnded(enforced[-1])
        return ConnectionResetError(what)

    async def _may_stop(self) -> None:
        """The return needs TLS up and the server offering it."""
        if not self.transport.tls_active:
            raise self.error(f"{self.stoptls_name} needs an active TLS session")
        if self.stoptls_name not in await self._offered():
            raise self.stoptls_unsupported(self.stoptls_missing)

    def _nothing_after_answer(self) -> None:
        """R3: nothing may follow the return's answer before the closure."""
        if self.protocol.reader.pending:
            self.transport.abort()
            error = self.protocol_error or self.error
            raise error(f"the server sent data after its {self.stoptls_name} answer")

    def _guard_credentials(self) -> None:
        """R9: no credentials in plaintext when TLS is required (``downgrade`` sends them)."""
        if (
            not self.transport.tls_active
            and self.require_tls
            and self.behaviour.name != "downgrade"
        ):
            raise self.tls_required("refusing to send credentials in plaintext (require_tls)")

    def _without_tls(self, reason: str) -> bool:
        """No TLS to be had: ``downgrade`` goes on in plaintext, the others raise (R9)."""
        if self.behaviour.name == "downgrade":
            self.downgraded = reason
            return False
        if self.require_tls:
            self.transport.close()
            raise self.tls_required(reason)
        raise self.starttls_error(reason)

    def _transition(self) -> bool:
        """R8 after every transition; False when ``no-state-reset`` keeps the state."""
        if self.behaviour.name == "no-state-reset":
            return False
        self._forget()
        return True

    async def _offered(self) -> Collection[str]:
        known = self._known()
        if known is None:
            return await self._discover()
        return known

    def _write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.transport.write(data)


# ------------------------------------------------------ the harness's roles


class PeerClient(Protocol):
    """What :class:`PeerPathDriver` needs of a reference client (any dialect)."""

    transport: SwitchableTransport

    async def starttls(self) -> bool: ...

    async def aclose(self) -> None: ...


P = TypeVar("P", bound=PeerClient)


class PeerPathDriver(PathDriver, Generic[P]):
    """A reference client through the path proxy, one verb at a time.

    ``connect`` is the client class's ``connect`` (same keywords for every
    reference client).  A dialect adds what its client does for the path's
    own verbs (``command``, ``stoptls``, ``send_unit``, ``fetch_unit``,
    ``quit``), and what follows its upgrade (``after_upgrade``, a login).
    """

    def __init__(
        self,
        connect: Callable[..., Awaitable[P]],
        spec: ClientSpec,
        behaviour: str,
        user: str,
        password: str,
    ) -> None:
        self._connect = connect
        self.spec = spec
        self.behaviour = behaviour
        self.user = user
        self.password = password
        self.client: Optional[P] = None

    def _client(self) -> P:
        if self.client is None:
            raise ConnectionError("not connected")
        return self.client

    async def connect(self, hooks: Hooks) -> None:
        spec = self.spec
        self.client = await self._connect(
            spec.host,
            spec.port,
            ssl_context=spec.tls_context,
            server_hostname=spec.server_hostname,
            behaviour=self.behaviour,
            timeout=spec.timeout,
            timeouts=Timeouts(handshake=spec.timeout, closure=spec.timeout, connect=spec.timeout),
        )

    async def starttls(self, hooks: Hooks) -> None:
        client = self._client()
        if not await client.starttls():
            raise ConnectionError("the client carried on without TLS")
        await self.after_upgrade(client)

    async def after_upgrade(self, client: P) -> None:
        """What the client does right after its upgrade (nothing, or a login)."""

    def engine_events(self) -> Optional[Sequence[Event]]:
        if self.client is None:
            return None
        return transport_events(self.client.transport)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


class LinePathDriver(PeerPathDriver[C]):
    """A :class:`LineClient` through the path proxy, one verb at a time.

    A dialect adds what its client does for the path's own verbs
    (``command``, ``send_unit``, ``fetch_unit``, ``quit``).
    """

    def __init__(
        self, client_class: Type[C], spec: ClientSpec, behaviour: str, user: str, password: str
    ) -> None:
        super().__init__(client_class.connect, spec, behaviour, user, password)
        self.client_class = client_class

    async def stoptls(self, hooks: Hooks) -> None:
        client = self._client()
        try:
            await client.stoptls()
        except client.stoptls_unsupported as exc:
            raise StopTLSUnsupported(str(exc)) from exc


async def run_reference_session(
    client_class: Type[C],
    plan: SessionPlan,
    *,
    login: Callable[[C], Awaitable[object]],
    store: Callable[[C], Awaitable[object]],
    goodbye: Callable[[C], Awaitable[object]],
    done: str,
    settle: Optional[Callable[[C], Awaitable[object]]] = None,
) -> ClientOutcome:
    """The reference client's normal session against the scripted server.

    Upgrade (TLS required), ``login``, ``settle`` once if given; then -- while
    the server offers the return -- ``plan.cycles`` times return, upgrade,
    login; ``store``; ``goodbye`` (its errors ignored).  ``done`` is the
    outcome's words, with ``{n}`` for the cycles done.
    """
    errors = (client_class.error, ConnectionError, OSError, asyncio.TimeoutError, RuntimeError)
    try:
        client = await client_class.connect(
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
    cycles = 0
    try:
        await client.starttls()
        await login(client)
        if settle is not None:
            await settle(client)
        for _ in range(plan.cycles):
            if client.stoptls_name not in (client._known() or ()):
                break
            await client.stoptls()
            await client.starttls()
            await login(client)
            cycles += 1
        await store(client)
        with contextlib.suppress(*errors):
            await goodbye(client)
    except errors as exc:
        return failed(exc)
    finally:
        client.close()
    return ClientOutcome(True, done.format(n=cycles))
