"""What every reference client on the switchable transport shares, whatever its framing.

A reference client is an ``asyncio.Protocol`` on
:class:`starttls_harness.tls.aio.SwitchableTransport` that feeds a reader
cut by the dialect's framing (CRLF lines, BER messages, length-prefixed
messages, XML stanzas) and keeps the closure rules the same way in every
dialect.  The way the rules are kept is written once here; a dialect's
client module says only what is its own: its messages, how it reads its
answers (its reader), its errors and its misbehaving modes.

* :class:`PeerProtocol` -- feeds the dialect's reader, holds the closure
  future and watches the engine (``no-close-notify-reply`` hangs up instead
  of answering, R5);
* :class:`PeerClient` -- connect (and greet), the handshake of an upgrade
  (R1's leftover handed to the engine), going on without TLS (R9:
  ``require_tls`` refuses, ``downgrade`` goes on), the reset at a
  transition (R8; ``no-state-reset`` keeps the state), a bounded close;
* :class:`PeerPathDriver` -- a reference client driven one verb at a time
  through the path proxy (connect, upgrade, return, goodbye, events, close);
* :func:`run_reference_session` -- the normal session against the scripted
  server: upgrade, login, returns while offered, store, goodbye;
* :func:`client_modes` -- a client's misbehaving modes, each breaking one
  rule, in rule order (names and relaxed rules written once).

The readers differ by framing and stay with their dialects: a
:class:`~starttls_harness.servers.imapsyntax.LineReader` for CRLF lines
(and PostgreSQL's length-prefixed reads), a
:class:`~starttls_harness.servers.xmpp.UnitReader` cut by the XMPP framer,
LDAP's reader of whole BER answers.  Whatever a reader still holds at an
upgrade goes to the engine (R1), the same way for all.
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
    Dict,
    Generic,
    Mapping,
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
from starttls_harness.tls.aio import ConnectionEnded, SwitchableTransport, Timeouts, open_connection
from starttls_harness.tls.engine import CloseNotifyReceived, ClosureComplete, Event, Rule
from starttls_harness.tls.states import State

__all__ = [
    "PeerClient",
    "PeerPathDriver",
    "PeerProtocol",
    "Reader",
    "client_modes",
    "run_reference_session",
    "session_errors",
]

C = TypeVar("C", bound="PeerClient")

#: The misbehaving modes every reference client may have, by the rule each
#: breaks: the mode's name, and whether the engine relaxes that rule for it
#: (R8 and R9 are broken by the client itself).
_MODES: Dict[Rule, Tuple[str, bool]] = {
    Rule.R1: ("accept-injected-response", True),
    Rule.R2: ("plaintext-in-tls", True),
    Rule.R4: ("one-sided-close", True),
    Rule.R5: ("no-close-notify-reply", True),
    Rule.R6: ("ignore-truncation", True),
    Rule.R8: ("no-state-reset", False),
    Rule.R9: ("downgrade", False),
}


def client_modes(
    descriptions: Mapping[Rule, str], extra: Sequence[Behaviour] = ()
) -> Dict[str, Behaviour]:
    """``strict`` and a client's misbehaving modes, by name, in rule order.

    ``descriptions`` says which of the common modes the client has and what
    each does in its words; ``no-close-notify-reply`` (R5) every client has.
    ``extra`` adds the dialect's own modes.
    """
    said = {Rule.R5: "closes TCP instead of answering the server's close_notify", **descriptions}
    modes = [
        Behaviour(name, rule, said[rule], (rule,) if relaxed else ())
        for rule, (name, relaxed) in _MODES.items()
        if rule in said
    ]
    ordered = sorted((*modes, *extra), key=lambda b: list(Rule).index(b.rule) if b.rule else -1)
    return {b.name: b for b in (STRICT, *ordered)}


class Reader(Protocol):
    """What the protocol feeds: the dialect's reader, cut by its framing."""

    def feed(self, data: bytes) -> None: ...

    def feed_eof(self) -> None: ...

    def set_exception(self, exc: BaseException) -> None: ...

    def take_pending(self) -> bytes: ...


R = TypeVar("R", bound=Reader)


class PeerProtocol(asyncio.Protocol, Generic[R]):
    """Feeds the dialect's reader; watches the engine for closures."""

    def __init__(self, behaviour: Behaviour, reader: R) -> None:
        self.behaviour = behaviour
        self.reader = reader
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


class PeerClient:
    """A reference client on the switchable transport; create it with :meth:`connect`.

    A dialect sets the class attributes and :meth:`_new_protocol` (its
    reader), and where it has them :meth:`_setup` (its own state),
    :meth:`_greet` (the server speaks first) and :meth:`_forget` (R8).
    """

    #: The dialect's misbehaving modes, by name.
    behaviours: ClassVar[Dict[str, Behaviour]]
    #: The dialect's errors: its base class, TLS required and not had (R9),
    #: no return to plaintext, and the upgrade refused or failed when TLS
    #: is not required (by default the same as TLS required).
    error: ClassVar[Type[Exception]]
    tls_required: ClassVar[Type[Exception]]
    stoptls_unsupported: ClassVar[Type[Exception]]
    starttls_error: ClassVar[Optional[Type[Exception]]] = None
    #: What :meth:`stoptls` says when there is no return to plaintext.
    stoptls_missing: ClassVar[str] = "the server does not advertise STOPTLS"
    #: What an upgrade under TLS says.
    already_tls: ClassVar[str] = "TLS is already active"

    def __init__(
        self,
        transport: SwitchableTransport,
        protocol: PeerProtocol[Any],
        *,
        behaviour: Behaviour = STRICT,
        ssl_context: Optional[ssl.SSLContext] = None,
        server_hostname: Optional[str] = None,
        require_tls: bool = True,
        timeout: float = 10.0,
        **options: Any,
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
        self._setup(**options)

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
        **options: Any,
    ) -> C:
        """Connect (and read the greeting, if the server speaks first).

        ``options`` are the dialect's own: the protocol's (``max_line``) and
        the client's (an XMPP ``domain``).
        """
        chosen = behaviour_named(cls.behaviours, behaviour)
        protocol = cls._new_protocol(chosen, options)
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

    @classmethod
    def _new_protocol(cls, behaviour: Behaviour, options: Dict[str, Any]) -> PeerProtocol[Any]:
        """The protocol (and its reader) of a new connection; it takes its own
        settings out of ``options`` (the rest are the client's)."""
        raise NotImplementedError

    def _setup(self) -> None:
        """The dialect's own state of a new client (keywords: its options)."""

    async def _greet(self) -> None:
        """Read the greeting at connection start (nothing: the client speaks first)."""

    def _forget(self) -> None:
        """R8: drop what the transition invalidates (capabilities, login, ...)."""
        raise NotImplementedError

    def _return_offered(self) -> bool:
        """The server offers the return to plaintext now (none by default)."""
        return False

    # --------------------------------------------------------- commands

    async def starttls(self, ssl_context: Optional[ssl.SSLContext] = None) -> bool:
        """Upgrade to TLS; True once TLS is up (False only for ``downgrade``)."""
        raise NotImplementedError

    async def stoptls(self) -> None:
        """Return to plaintext (none by default: :attr:`stoptls_unsupported`)."""
        raise self.stoptls_unsupported(self.stoptls_missing)

    async def goodbye(self) -> object:
        """The dialect's goodbye (QUIT, LOGOUT, unbind, ...), then a bounded close."""
        await self.aclose()
        return None

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

    def _upgrade_context(self, ssl_context: Optional[ssl.SSLContext]) -> ssl.SSLContext:
        """The context of an upgrade; an upgrade needs plaintext."""
        context = ssl_context or self.ssl_context
        if context is None:
            raise ValueError("no ssl_context given")
        if self._upgraded():
            raise self.error(self.already_tls)
        return context

    def _upgraded(self) -> bool:
        """True when an upgrade can no longer come."""
        return self.transport.tls_active

    async def _handshake(self, context: ssl.SSLContext) -> None:
        """The upgrade's handshake; what the reader holds is the engine's (R1)."""
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
            error = self.tls_required if self.require_tls else self._refused()
            raise error(f"TLS could not be started: {exc}") from exc
        self.upgrades += 1

    def _ended(self, what: str) -> ConnectionError:
        """The error that ended the connection (the violation, if one did)."""
        enforced = [v for v in self.transport.violations if v.enforced]
        if enforced:
            return ConnectionEnded(enforced[-1])
        return ConnectionResetError(what)

    def _refused(self) -> Type[Exception]:
        """The error of an upgrade that fails when TLS is not required."""
        return self.starttls_error or self.tls_required

    def _without_tls(self, reason: str) -> bool:
        """No TLS to be had: ``downgrade`` goes on in plaintext, the others raise (R9)."""
        if self.behaviour.name == "downgrade":
            self.downgraded = reason
            return False
        if self.require_tls:
            self.transport.close()
            raise self.tls_required(reason)
        raise self._refused()(reason)

    def _transition(self) -> bool:
        """R8 after every transition; False when ``no-state-reset`` keeps the state."""
        if self.behaviour.name == "no-state-reset":
            return False
        self._forget()
        return True

    def _write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.transport.write(data)


# ------------------------------------------------------ the harness's roles


P = TypeVar("P", bound=PeerClient)


class PeerPathDriver(PathDriver, Generic[P]):
    """A reference client through the path proxy, one verb at a time.

    Every reference client connects with the same keywords and has the same
    upgrade and return.  A dialect adds what its client does for the path's
    own verbs (``command``, ``send_unit``, ``fetch_unit``, ``quit``), and
    what follows its upgrade (``after_upgrade``, a login).  Its module's
    ``path_driver`` is ``functools.partial(_PathDriver, TheClient)``: called
    with the path's spec, behaviour, user and password.
    """

    def __init__(
        self,
        client_class: Type[P],
        spec: ClientSpec,
        behaviour: str,
        user: str,
        password: str,
    ) -> None:
        self.client_class = client_class
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
        self.client = await self.client_class.connect(
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

    async def stoptls(self, hooks: Hooks) -> None:
        client = self._client()
        try:
            await client.stoptls()
        except client.stoptls_unsupported as exc:
            raise StopTLSUnsupported(str(exc)) from exc

    async def quit(self, hooks: Hooks) -> None:
        await self._client().goodbye()

    def engine_events(self) -> Optional[Sequence[Event]]:
        if self.client is None:
            return None
        return transport_events(self.client.transport)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def session_errors(client_class: Type[PeerClient]) -> Tuple[Type[BaseException], ...]:
    """What ends a reference session as failed (the dialect's errors among them)."""
    return (client_class.error, ConnectionError, OSError, asyncio.TimeoutError, RuntimeError)


async def run_reference_session(
    client_class: Type[C],
    plan: SessionPlan,
    *,
    login: Callable[[C], Awaitable[object]],
    store: Callable[[C], Awaitable[object]],
    done: str,
    settle: Optional[Callable[[C], Awaitable[object]]] = None,
    on_error: Optional[Callable[[C], object]] = None,
) -> ClientOutcome:
    """The reference client's normal session against the scripted server.

    Connect, upgrade (TLS required), ``login``, ``settle`` once if given;
    then -- while the server offers the return -- ``plan.cycles`` times
    return, upgrade, login; ``store``; the client's goodbye (its errors
    ignored); close.  ``done`` is the outcome's words, with ``{n}`` for the
    cycles done.  ``on_error`` says goodbye after a failed step (its own
    errors ignored).
    """
    errors = session_errors(client_class)
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
            if not client._return_offered():
                break
            await client.stoptls()
            await client.starttls()
            await login(client)
            cycles += 1
        await store(client)
        with contextlib.suppress(*errors):
            await client.goodbye()
    except errors as exc:
        if on_error is not None:
            with contextlib.suppress(*errors):
                on_error(client)
        return failed(exc)
    finally:
        client.close()
    return ClientOutcome(True, done.format(n=cycles))
