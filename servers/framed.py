"""The one server base every session-per-connection reference server is built on.

A reference server of this kind serves each connection with one coroutine
that reads the dialect's plaintext *units* (CRLF lines, PostgreSQL messages,
XMPP stanzas: whatever the dialect's :class:`~starttls_harness.tls.framing.Framer`
cuts) from a reader fed by ``data_received``, and answers them, so that
STARTTLS ``await``\\ s the transport's switch.  What does not depend on the
framing is written once here; a dialect's server module keeps its messages,
its unit handling and its modes.

* :class:`FramedProtocol` -- the asyncio side of a connection on a
  :class:`~starttls_harness.tls.aio.SwitchableTransport`: the reader is fed
  and failed, and the engine watch keeps the rules every server shares
  (``no-close-notify-reply`` hangs up, R5; the
  :data:`~starttls_harness.servers.base.EXTRA_BEHAVIOURS` through
  :class:`~starttls_harness.servers.base.ExtraModes`).  By default a closure
  ends the connection and a fatal alert aborts it (no return to plaintext);
  a dialect that returns to plaintext overrides the hooks.
* :class:`FramedSession` -- the life cycle: admission, the hold gate armed
  with the dialect's predicate and framer (R1), the session task, its end
  (:class:`EndSession` with a last answer, or quietly on a broken
  connection) and the close.
* :class:`UnitReader` -- a reader of any framer's units (a
  :class:`~starttls_harness.servers.imapsyntax.LineReader` that cuts with a
  framer), and :func:`closing_behaviours` -- the modes of a server with no
  return to plaintext.
* :class:`SessionsRunningServer` and :func:`start_session_server` -- a
  running server whose ``close()`` also waits for its sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Type, TypeVar

from starttls_harness.servers.base import (
    EXTRA_BEHAVIOURS,
    NO_CLOSE_NOTIFY_REPLY,
    STRICT,
    Behaviour,
    ExtraModes,
    RunningServer,
    ServerConfig,
    behaviour_named,
    relaxing,
)
from starttls_harness.servers.imapsyntax import LineReader
from starttls_harness.tls.aio import SwitchableTransport, create_server
from starttls_harness.tls.engine import (
    AlertReceived,
    CloseNotifyReceived,
    ClosureComplete,
    Event,
    LocalProtocolError,
    Rule,
    TransitionError,
)
from starttls_harness.tls.framing import Framer
from starttls_harness.tls.states import State

__all__ = [
    "EndSession",
    "FramedProtocol",
    "FramedSession",
    "SessionsRunningServer",
    "Truncated",
    "UnitReader",
    "closing_behaviours",
    "start_session_server",
]

#: How a session ends quietly: the connection broke, or the peer went idle.
QUIET_ENDS = (
    asyncio.TimeoutError,
    ConnectionError,
    LocalProtocolError,
    TransitionError,
    ssl.SSLError,
)


def closing_behaviours(*, pipelined: str, plaintext: str, truncated: str) -> Dict[str, Behaviour]:
    """The modes of a server with no return to plaintext (a closure ends the connection).

    ``pipelined`` says what ``keep-buffer`` runs inside TLS (R1),
    ``plaintext`` what ``plaintext-in-tls`` does (R2), ``truncated`` what
    ``ignore-truncation`` stores (R6); then the shared
    :data:`~starttls_harness.servers.base.EXTRA_BEHAVIOURS`.
    """
    return {
        b.name: b
        for b in (
            STRICT,
            relaxing("keep-buffer", Rule.R1, pipelined),
            relaxing("plaintext-in-tls", Rule.R2, plaintext),
            NO_CLOSE_NOTIFY_REPLY,
            relaxing("ignore-truncation", Rule.R6, truncated),
            relaxing(
                "alert-as-close",
                Rule.R7,
                "takes a fatal alert for a closure and goes on in plaintext",
            ),
            *EXTRA_BEHAVIOURS,
        )
    }


class EndSession(Exception):
    """End the session after a last answer (the dialect's goodbye; may be empty)."""

    def __init__(self, line: bytes = b"") -> None:
        super().__init__(line.decode("latin-1").strip() or "session ends")
        self.line = line


class Truncated(Exception):
    """The connection ended in the middle of a unit (``partial`` holds its bytes)."""

    def __init__(self, partial: bytes) -> None:
        super().__init__("the connection ended in the middle of a unit")
        self.partial = partial


class UnitReader(LineReader):
    """Bytes from ``data_received``, read as the framer's units by one coroutine.

    The buffer, its hand-over (the R1 leftover at the upgrade) and its
    wake-up are the :class:`LineReader`'s; every wait is bounded by
    ``timeout``.  ``unit_end`` is a byte no unit can end without (XMPP's
    ``>``): the buffer is then cut again only once one arrived, not for every
    segment of a long unit that cannot be complete.
    """

    def __init__(self, framer: Framer, unit_end: Optional[bytes] = None) -> None:
        super().__init__(framer.max_unit)
        self.framer = framer
        self._unit_end = unit_end
        #: A unit may be complete since the last cut.
        self._complete_maybe = False

    def feed(self, data: bytes) -> None:
        if self._unit_end is None or self._unit_end in data:
            self._complete_maybe = True
        super().feed(data)

    async def read_unit(self, timeout: float) -> bytes:
        """The next unit; :class:`Truncated` when the stream ends inside one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            units: List[bytes] = []
            if self._complete_maybe or len(self._buf) >= self.framer.max_unit:
                units, _used = self.framer.split(bytes(self._buf))
                self._complete_maybe = len(units) > 1
            if units:
                del self._buf[: len(units[0])]
                return units[0]
            if self._eof or self._exc is not None:
                if self._buf.strip():
                    raise Truncated(self.take_pending())
                raise self._exc or ConnectionResetError("the peer closed the connection")
            self._waiter = loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, max(0.0, deadline - loop.time()))
            finally:
                self._waiter = None


class FramedProtocol(asyncio.Protocol):
    """A server connection that reads units, and the engine watch (module docstring)."""

    transport: Optional[SwitchableTransport]
    behaviour: Behaviour
    reader: LineReader
    extra: ExtraModes
    _closure: Optional[asyncio.Future[None]]
    _close_notify: Optional[asyncio.Future[None]]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)

    def eof_received(self) -> bool:
        # Keep the transport open: the session decides (and may still store
        # a truncated unit under ``ignore-truncation``) and then closes.
        self.reader.feed_eof()
        return True

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        lost = exc or ConnectionResetError("connection closed")
        self.reader.set_exception(lost)
        for fut in (self._closure, self._close_notify):
            if fut is not None and not fut.done():
                fut.set_exception(lost)
                fut.exception()

    def engine_event(self, event: Event) -> None:
        """Closure bookkeeping; the misbehaving modes hook in here."""
        t = self.transport
        if self.extra.on_event(event, t):
            self._unasked_return()
        if isinstance(event, ClosureComplete):
            self._closure_complete(event)
        elif isinstance(event, CloseNotifyReceived):
            set_done(self._close_notify)
            if (
                not self.behaviour.policy.enforces(Rule.R5)
                and t is not None
                and t.engine.state is State.CLOSE_RECEIVED
            ):
                t.close()  # no-close-notify-reply: hang up instead of answering
        elif isinstance(event, AlertReceived):
            self._alert_received()

    # ------------------------------------------------------------ hooks

    def _unasked_return(self) -> None:
        """resume-without-stoptls: a closure no STOPTLS asked for returned to plaintext."""

    def _closure_complete(self, event: ClosureComplete) -> None:
        """The closure is complete: no return to plaintext here, the connection ends."""
        t = self.transport
        if t is not None and not event.resumed:
            t.close()

    def _alert_received(self) -> None:
        """A fatal alert ends the connection, unless ``alert-as-close`` goes on (R7)."""
        t = self.transport
        if t is not None and self.behaviour.policy.enforces(Rule.R7):
            t.abort()

    def _write(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing() or not data:
            return
        with contextlib.suppress(LocalProtocolError):
            t.write(data)


class FramedSession(FramedProtocol):
    """One connection served by a session task (see the module docstring).

    A dialect fills in :meth:`_serve` and :meth:`_holds` (and may set the
    other hooks).
    """

    def __init__(
        self,
        running: RunningServer,
        behaviour: Behaviour,
        ctx: ssl.SSLContext,
        goodbye: Callable[[str], bytes],
        reader: LineReader,
    ) -> None:
        self.running = running
        self.config: ServerConfig = running.config
        self.behaviour = behaviour
        self.ctx = ctx
        self.reader = reader
        self.transport: Optional[SwitchableTransport] = None
        self.user: Optional[str] = None
        #: Units received (evidence; no secrets).
        self.log: List[bytes] = []
        self._closure: Optional[asyncio.Future[None]] = None
        self._close_notify: Optional[asyncio.Future[None]] = None
        self.extra = ExtraModes(behaviour, goodbye)

    # ------------------------------------------------------------ hooks

    def _holds(self, unit: bytes) -> bool:
        """Hold-gate predicate: the plaintext upgrade request."""
        raise NotImplementedError

    def _gate_framer(self) -> Optional[Framer]:
        """The framer of the hold gate (None: CRLF lines)."""
        return None

    async def _serve(self) -> None:
        """Read and answer units until the session ends."""
        raise NotImplementedError

    def _admit(self, transport: SwitchableTransport) -> bool:
        """Whether the connection is served (False: the dialect turned it away)."""
        return True

    def _broken(self) -> None:
        """The session ended on a broken connection or an idle peer (before the close)."""

    def _session_over(self) -> None:
        """After the session, whatever ended it."""

    # --------------------------------------------------- asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SwitchableTransport)
        self.transport = transport
        self.running.connections.append(self)
        if not self._admit(transport):
            return
        transport.hold_after(self._holds, framer=self._gate_framer())
        task = asyncio.get_running_loop().create_task(self._session())
        sessions = getattr(self.running, "sessions", None)
        if isinstance(sessions, set):
            sessions.add(task)
            task.add_done_callback(sessions.discard)

    # ------------------------------------------------------------ session

    async def _session(self) -> None:
        t = self.transport
        assert t is not None
        try:
            await self._serve()
        except EndSession as end:
            self._write(end.line)
        except QUIET_ENDS:
            self._broken()
        finally:
            t.close()
            self._session_over()

    def _farewell(self, why: str) -> EndSession:
        """The end of the session with the dialect's goodbye saying ``why``."""
        return EndSession(self.extra.goodbye(why))


def set_done(fut: Optional[asyncio.Future[None]]) -> None:
    """Resolve ``fut`` if someone waits on it and it is not resolved yet."""
    if fut is not None and not fut.done():
        fut.set_result(None)


@dataclass
class SessionsRunningServer(RunningServer):
    """:class:`RunningServer` whose ``close()`` also waits for the sessions."""

    sessions: Set[asyncio.Task[None]] = field(default_factory=set)

    async def close(self) -> None:
        await super().close()
        pending = list(self.sessions)
        if pending:
            await asyncio.wait(pending, timeout=self.config.timeouts.closure)


R = TypeVar("R", bound=SessionsRunningServer)


async def start_session_server(
    config: ServerConfig,
    behaviours: Dict[str, Behaviour],
    session: Callable[[R, Behaviour, ssl.SSLContext], asyncio.Protocol],
    running_class: Type[R],
) -> R:
    """Start a server: ``session(running, behaviour, context)`` serves a connection."""
    behaviour = behaviour_named(behaviours, config.behaviour)
    ctx = config.ssl_context()
    holder: List[R] = []

    def factory() -> asyncio.Protocol:
        return session(holder[0], behaviour, ctx)

    server = await create_server(
        factory, config.host, config.port, policy=behaviour.policy, timeouts=config.timeouts
    )
    running = running_class(server, config)
    holder.append(running)
    return running
