"""asyncio adapter: a transport whose TLS can be switched on and off.

Theory of operation
===================

``loop.start_tls`` cannot return to plaintext (it closes TCP when TLS ends)
and does not report truncation, so the harness runs its own TLS layer: the
sans-I/O :class:`starttls_harness.tls.engine.Connection`.  This module is the thin loop
around it:

* :class:`_WireProtocol` is the asyncio protocol of the real TCP connection.
  It feeds every received chunk to the engine, writes out whatever the
  engine wants sent, and turns the engine's events into calls on the
  application protocol.
* :class:`SwitchableTransport` is what the application protocol sees: an
  ordinary ``asyncio.Transport`` (so aiosmtpd's ``SMTP`` and aiosmtplib's
  ``SMTPProtocol`` run on it unchanged) plus ``start_tls``, ``unwrap``,
  ``accept_unwrap``, ``send_close_notify`` and the hold gate.

Application data in both phases reaches ``protocol.data_received``.  A
protocol that defines ``engine_event(event)`` also sees every engine event.
A clean EOF calls ``eof_received``; everything that ends a connection on
the peer's fault (an enforced rule violation, a truncation, a fatal alert, a
failed handshake) closes TCP and calls ``connection_lost`` with a
:class:`ConnectionEnded` exception that carries the event, so that the
application can tell "closed" from "cut" (R6).

Only public asyncio APIs are used, so the same code runs under uvloop.
Writes are flushed after every operation; :meth:`SwitchableTransport.corked`
collects several operations into one ``write`` (one TCP segment on
loopback), which is how scenarios declare coalesced segments.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
    cast,
)

from starttls_harness.tls.engine import (
    AlertReceived,
    ClosureComplete,
    Connection,
    Event,
    HandshakeComplete,
    HandshakeFailed,
    LinePredicate,
    PeerEOF,
    PlaintextData,
    Policy,
    Rule,
    TLSData,
    Violation,
)
from starttls_harness.tls.framing import Framer
from starttls_harness.tls.states import State

_T = TypeVar("_T")

__all__ = [
    "ConnectionEnded",
    "SwitchableTransport",
    "Timeouts",
    "WireLog",
    "create_server",
    "open_connection",
]


@dataclass
class WireLog:
    """The real bytes of one TCP connection, each way, as the socket saw them.

    Kept for pcapng captures (``report/capture.py``).  ``segments`` holds
    ``(monotonic time, "out" | "in", what, data)``: ``what`` is ``data``,
    ``injected`` (the write held bytes put around the rules), ``eof`` (a
    FIN), ``reset`` or ``abort`` (an RST).  ``local``/``peer`` are the
    socket addresses when known; ``server_side`` says which end is ours.
    """

    server_side: bool = False
    local: Optional[Tuple[str, int]] = None
    peer: Optional[Tuple[str, int]] = None
    segments: List[Tuple[float, str, str, bytes]] = field(default_factory=list)
    #: segment index -> the injected pieces it carries, in order
    injected: Dict[int, List[bytes]] = field(default_factory=dict)

    def add(self, direction: str, what: str, data: bytes = b"", raw: Sequence[bytes] = ()) -> None:
        if raw:
            self.injected[len(self.segments)] = list(raw)
        self.segments.append((time.monotonic(), direction, what, data))


def _address(value: Any) -> Optional[Tuple[str, int]]:
    if isinstance(value, tuple) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return None


@dataclass
class Timeouts:
    """Bounds of the adapter's waits, in seconds (a setting, never a sleep)."""

    handshake: float = 2.0
    closure: float = 10.0
    connect: float = 10.0


DEFAULT_TIMEOUTS = Timeouts()


class ConnectionEnded(ConnectionError):
    """The connection ended because of ``event`` (a violation, an alert...)."""

    def __init__(self, event: Event) -> None:
        self.event = event
        if isinstance(event, Violation):
            text = f"{event.rule.value} violation: {event.message}"
        elif isinstance(event, HandshakeFailed):
            side = "peer alert" if event.remote else "local"
            text = f"TLS handshake failed ({side}): {event.reason}"
        elif isinstance(event, AlertReceived):
            text = f"peer sent a fatal alert: {event.description}"
        else:
            text = f"connection ended: {event!r}"
        super().__init__(text)

    @property
    def rule(self) -> Optional[str]:
        return self.event.rule.value if isinstance(self.event, Violation) else None


class SwitchableTransport(asyncio.Transport):
    """The application's view of one connection (see the module docstring)."""

    def __init__(
        self,
        wire: _WireProtocol,
        engine: Connection,
        timeouts: Timeouts,
        wire_log: bool = True,
    ) -> None:
        super().__init__()
        self._wire = wire
        self.engine = engine
        self.timeouts = timeouts
        self._protocol: Optional[asyncio.BaseProtocol] = None
        #: Every engine event on this connection, in order (evidence).
        self.events: List[Event] = []
        #: The real bytes each way, when the connection records (captures).
        self.wire: Optional[WireLog] = WireLog() if wire_log else None
        self._raw_pending: List[bytes] = []
        self._handshake: Optional[asyncio.Future[HandshakeComplete]] = None
        self._closure: Optional[asyncio.Future[ClosureComplete]] = None
        self._cork = 0
        self._closing = False
        self._passthrough = False
        self._eof_written = False

    # ------------------------------------------------------- asyncio API

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sslobj = self.engine.ssl_object if self.engine.tls_active else None
        if name in ("ssl_object", "sslobject"):
            return sslobj
        if name == "cipher":
            return sslobj.cipher() if sslobj is not None else default
        if name == "peercert":
            return sslobj.getpeercert() if sslobj is not None else default
        if name == "engine":
            return self.engine
        tcp = self._wire.transport
        return tcp.get_extra_info(name, default) if tcp is not None else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def is_closing(self) -> bool:
        tcp = self._wire.transport
        return self._closing or tcp is None or tcp.is_closing()

    def is_reading(self) -> bool:
        tcp = self._wire.transport
        return bool(tcp is not None and tcp.is_reading())

    def pause_reading(self) -> None:
        if self._wire.transport is not None:
            self._wire.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._wire.transport is not None and not self._wire.transport.is_closing():
            self._wire.transport.resume_reading()

    def set_write_buffer_limits(
        self, high: Optional[int] = None, low: Optional[int] = None
    ) -> None:
        if self._wire.transport is not None:
            self._wire.transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        tcp = self._wire.transport
        return tcp.get_write_buffer_size() if tcp is not None else 0

    def can_write_eof(self) -> bool:
        return not self.engine.tls_active

    def write_eof(self) -> None:
        if self.engine.tls_active:
            raise RuntimeError("write_eof() while TLS is up; use send_close_notify()")
        if self._wire.transport is not None:
            self._log("out", "eof")
            self._wire.transport.write_eof()

    def write(self, data: Union[bytes, bytearray, memoryview]) -> None:
        if self.is_closing():
            return
        self.engine.send_data(bytes(data))
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def close(self) -> None:
        """Graceful close: one-way close_notify under TLS, then TCP close."""
        if self._closing:
            return
        if self.engine.state is State.TLS:
            self.engine.send_close_notify()
        with contextlib.suppress(Exception):
            self._flush()
        self._closing = True
        self.engine.close()
        if self._wire.transport is not None:
            if not self._wire.transport.is_closing():
                self._log("out", "eof")
            self._wire.transport.close()

    def abort(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            self.engine.close()
        if self._wire.transport is not None:
            if not self._wire.transport.is_closing():
                self._log("out", "abort")
            self._wire.transport.abort()

    # ------------------------------------------------- STARTTLS and back

    @property
    def tls_active(self) -> bool:
        return self.engine.tls_active

    @property
    def tls_version(self) -> Optional[str]:
        return self.engine.tls_version if self.engine.tls_active else None

    @property
    def violations(self) -> List[Violation]:
        return [e for e in self.events if isinstance(e, Violation)]

    def hold_after(
        self,
        predicate: Optional[LinePredicate],
        *,
        once: bool = False,
        framer: Optional[Framer] = None,
    ) -> None:
        """Arm the engine's hold gate (see :meth:`Connection.hold_after`)."""
        self.engine.hold_after(predicate, once=once, framer=framer)

    def release_held(self) -> None:
        """Deliver plaintext the gate held back (the upgrade did not happen)."""
        self._dispatch(self.engine.release_held())

    def write_raw(self, data: bytes) -> None:
        """Bytes straight onto the wire, around every rule (fault injection)."""
        self.engine.send_raw(data)
        self._raw_pending.append(bytes(data))
        self._flush()

    def send_fatal_alert(self) -> None:
        """Make our TLS stack send a real fatal alert (fault injection, R7).

        Python's ``ssl`` cannot send an alert on request, so the engine is
        fed a forged application-data record: it fails authentication and
        OpenSSL answers with an encrypted ``bad_record_mac`` alert under the
        current keys.  Our side is then BROKEN; from here on, incoming bytes
        bypass the engine and reach the protocol raw, so the harness can
        see whether the peer wrongly resumes plaintext.
        """
        forged = b"\x17\x03\x03\x00\x20" + bytes(32)
        self.events.extend(self.engine.receive_data(forged))
        self._passthrough = True
        self._flush()

    def truncate(self) -> None:
        """TCP FIN with TLS still up and no close_notify (the R6 fault)."""
        tcp = self._wire.transport
        if tcp is None or tcp.is_closing():
            return
        self._flush()
        self._eof_written = True
        self._log("out", "eof")
        if tcp.can_write_eof():
            tcp.write_eof()
        else:  # pragma: no cover - every TCP transport can
            tcp.close()

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Everything written inside goes out in a single TCP write."""
        self._cork += 1
        try:
            yield
        finally:
            self._cork -= 1
            self._flush()

    async def start_tls(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: Optional[str] = None,
        preface: bytes = b"",
        leftover: bytes = b"",
        timeout: Optional[float] = None,
    ) -> HandshakeComplete:
        """Upgrade to TLS and wait for the handshake (bounded).

        ``preface`` is the plaintext answer to STARTTLS (server side): it is
        written and the engine switched in one step, so nothing can slip in
        between.  Raises :class:`ConnectionEnded` if the upgrade is refused
        (R1 leftover) or the handshake fails.
        """
        loop = asyncio.get_running_loop()
        self._handshake = loop.create_future()
        fut = self._handshake
        with self.corked():
            if preface:
                self.engine.send_data(preface)
            events = self.engine.start_tls(
                context,
                server_side=server_side,
                server_hostname=server_hostname,
                leftover=leftover,
            )
        self._dispatch(events)
        return await self._bounded(fut, timeout or self.timeouts.handshake, "TLS handshake")

    async def unwrap(self, timeout: Optional[float] = None) -> ClosureComplete:
        """Initiate the bidirectional closure; return when plaintext resumes."""
        fut = self._new_closure()
        with self.corked():
            events = self.engine.unwrap()
        self._dispatch(events)
        return await self._bounded(fut, timeout or self.timeouts.closure, "TLS closure")

    async def accept_unwrap(
        self, preface: bytes = b"", timeout: Optional[float] = None
    ) -> ClosureComplete:
        """As responder: send ``preface`` under TLS, then await the closure."""
        fut = self._new_closure()
        with self.corked():
            if preface:
                self.engine.send_data(preface)
            events = self.engine.accept_unwrap()
        self._dispatch(events)
        return await self._bounded(fut, timeout or self.timeouts.closure, "TLS closure")

    def send_close_notify(self) -> None:
        """One-way close_notify (the TCP connection is to be closed next)."""
        self._dispatch(self.engine.send_close_notify())
        self._flush()

    # ---------------------------------------------------------- internals

    def _new_closure(self) -> asyncio.Future[ClosureComplete]:
        self._closure = asyncio.get_running_loop().create_future()
        return self._closure

    async def _bounded(self, fut: asyncio.Future[_T], timeout: float, what: str) -> _T:
        # No shield: nothing else awaits ``fut`` and every resolver checks
        # done() first, so a cancelled one is harmless -- and a shield costs
        # an extra future and event-loop pass per wait (benchmarks/).
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self.abort()
            raise asyncio.TimeoutError(f"{what} did not complete within {timeout:g} s") from None

    def _flush(self) -> None:
        if self._cork:
            return
        data = self.engine.data_to_send()
        tcp = self._wire.transport
        if data and tcp is not None and not tcp.is_closing() and not self._eof_written:
            raw = self._raw_pending
            self._log("out", "injected" if raw else "data", data, raw)
            tcp.write(data)
        self._raw_pending = []

    def _log(self, direction: str, what: str, data: bytes = b"", raw: Sequence[bytes] = ()) -> None:
        if self.wire is not None:
            self.wire.add(direction, what, data, raw)

    def _dispatch(self, events: List[Event]) -> None:
        """Turn engine events into protocol calls and future results."""
        self.events.extend(events)
        self._flush()
        protocol = self._protocol
        hook: Optional[Callable[[Event], None]] = getattr(protocol, "engine_event", None)
        for event in events:
            if hook is not None:
                hook(event)
            if isinstance(event, (PlaintextData, TLSData)):
                if protocol is not None and not self._closing:
                    protocol.data_received(event.data)  # type: ignore[attr-defined]
            elif isinstance(event, HandshakeComplete):
                _resolve(self._handshake, event)
            elif isinstance(event, ClosureComplete):
                _resolve(self._closure, event)
                if not event.resumed:
                    self.close()
            elif isinstance(event, PeerEOF):
                keep_open = False
                if protocol is not None:
                    keep_open = bool(protocol.eof_received())  # type: ignore[attr-defined]
                if not keep_open:
                    self.close()
            elif (
                isinstance(event, HandshakeFailed)
                or (isinstance(event, AlertReceived) and self.engine.policy.enforces(Rule.R7))
                or (isinstance(event, Violation) and event.enforced)
            ):
                self._end(ConnectionEnded(event))
        if self.engine.state is State.BROKEN and not self._closing:
            failure = self._last_failure()
            if failure is None:
                self.close()  # e.g. a relaxed peer took an EOF for a closure
            else:
                self._end(ConnectionEnded(failure))

    def _last_failure(self) -> Optional[Event]:
        for event in reversed(self.events):
            if isinstance(event, (Violation, HandshakeFailed, AlertReceived)):
                if not isinstance(event, Violation) or event.enforced:
                    return event
        return None

    def _end(self, exc: ConnectionEnded) -> None:
        """Close TCP because of the peer; fail pending waits with ``exc``."""
        self._wire.failure = exc
        for fut in (self._handshake, self._closure):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: a waiter may have gone
        self._closing = True
        if self._wire.transport is not None:
            if not self._wire.transport.is_closing():
                self._log("out", "eof")
            self._wire.transport.close()


def _resolve(fut: Optional[asyncio.Future[Any]], value: Any) -> None:
    if fut is not None and not fut.done():
        fut.set_result(value)


class _WireProtocol(asyncio.Protocol):
    """Protocol of the real TCP connection; drives the engine."""

    def __init__(
        self,
        app: asyncio.Protocol,
        policy: Optional[Policy],
        timeouts: Timeouts,
        record: bool,
        server_side: bool = False,
    ) -> None:
        self.app = app
        self.transport: Optional[asyncio.Transport] = None
        self.failure: Optional[BaseException] = None
        engine = Connection(policy, record=record)
        self.switch = SwitchableTransport(self, engine, timeouts, wire_log=record)
        self.switch.set_protocol(app)
        if self.switch.wire is not None:
            self.switch.wire.server_side = server_side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        if self.switch.wire is not None:
            self.switch.wire.local = _address(transport.get_extra_info("sockname"))
            self.switch.wire.peer = _address(transport.get_extra_info("peername"))
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.app.connection_made(self.switch)

    def data_received(self, data: bytes) -> None:
        switch = self.switch
        switch._log("in", "data", data)
        if switch._passthrough:
            if switch._protocol is not None:
                switch._protocol.data_received(data)  # type: ignore[attr-defined]
            return
        switch._dispatch(switch.engine.receive_data(data))

    def eof_received(self) -> Optional[bool]:
        self.switch._log("in", "eof")
        if self.switch._passthrough:
            return None
        self.switch._dispatch(self.switch.engine.receive_data(b""))
        return None

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        switch = self.switch
        if isinstance(exc, ConnectionResetError):
            switch._log("in", "reset")
        if (
            exc is not None
            and self.failure is None
            and not switch._closing
            and not switch._passthrough  # our own provoked alert broke the engine
        ):
            # An RST while TLS is up is a truncation too (R6): let the
            # engine judge it exactly as it judges an EOF.
            switch._dispatch(switch.engine.receive_data(b""))
        pending = ConnectionResetError("connection closed")
        for fut in (switch._handshake, switch._closure):
            if fut is not None and not fut.done():
                fut.set_exception(self.failure or exc or pending)
                fut.exception()
        switch._closing = True
        lost = self.failure or exc
        self.app.connection_lost(lost if isinstance(lost, Exception) or lost is None else None)

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()


async def create_server(
    protocol_factory: Callable[[], asyncio.Protocol],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    policy: Optional[Policy] = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    record: bool = True,
    **kwargs: Any,
) -> asyncio.AbstractServer:
    """``loop.create_server`` whose connections run on the engine."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _WireProtocol(protocol_factory(), policy, timeouts, record, server_side=True),
        host,
        port,
        **kwargs,
    )


async def open_connection(
    protocol_factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    *,
    policy: Optional[Policy] = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    record: bool = True,
) -> Tuple[SwitchableTransport, asyncio.Protocol]:
    """``loop.create_connection`` on the engine; returns (transport, protocol)."""
    loop = asyncio.get_running_loop()
    _, wire = await asyncio.wait_for(
        loop.create_connection(
            lambda: _WireProtocol(protocol_factory(), policy, timeouts, record), host, port
        ),
        timeouts.connect,
    )
    assert isinstance(wire, _WireProtocol)
    return wire.switch, wire.app
