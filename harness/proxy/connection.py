"""One proxied connection: its follower, its faults, its evidence log, its waits.

A :class:`ProxyConnection` reads from one socket, asks the follower for
units, applies the configured :class:`~starttls_harness.proxy.faults.Fault`
objects to the units they match, and writes each unit to the other socket
as a separate ``transport.write`` (``TCP_NODELAY`` on both sockets), unless a
fault declares otherwise.  Everything is logged as
:class:`~starttls_harness.proxy.events.ProxyEvent` objects; every wait on
them is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from typing import (
    Callable,
    Dict,
    List,
    Optional,
    Protocol,
    Sequence,
    Set,
    Tuple,
    Union,
)

from starttls_harness.proxy.events import EventNotSeen, ProxyEvent
from starttls_harness.proxy.faults import Fault
from starttls_harness.proxy.follower import Follower
from starttls_harness.proxy.plan import plan_unit
from starttls_harness.proxy.sockets import Pipe, Side, abort_with_rst
from starttls_harness.proxy.vocabulary import (
    C2S,
    DIRECTIONS,
    EV_CLOSED,
    EV_CONNECT,
    EV_ERROR,
    EV_FIN_SENT,
    EV_RST_SENT,
    EV_SENT,
    S2C,
    UNIT_EOF,
    UNIT_FRAGMENT,
    UNIT_NOTE,
    UNIT_PLAINTEXT,
    UNIT_RECORD,
    UNIT_RESET,
    Unit,
    other_direction,
)
from starttls_harness.tls.framing import FramerFactory
from starttls_harness.tls.keylog import SecretsProvider

__all__ = ["Address", "Limits", "ProxyConnection", "ProxyHost"]

#: A listening or upstream address.
Address = Tuple[str, int]


@dataclass(frozen=True)
class Limits:
    """The bounds of a proxy (see :meth:`starttls_harness.proxy.Proxy.start`)."""

    max_connections: int = 16
    max_buffer: int = 1 << 20
    max_line: int = 65536
    connect_timeout: float = 5.0
    idle_timeout: float = 60.0
    partial_timeout: float = 0.5


class ProxyHost(Protocol):
    """What a connection needs of the proxy that accepted it."""

    upstream: Address
    dialect: str
    faults: Tuple[Fault, ...]
    keylog: Union[str, os.PathLike[str], SecretsProvider, None]
    limits: Limits
    framer: FramerFactory
    on_event: Optional[Callable[[ProxyEvent], None]]
    callback_errors: List[Exception]

    def _connection_done(self, conn: ProxyConnection) -> None: ...


class ProxyConnection:
    """One proxied connection: its follower, its faults, its evidence log."""

    def __init__(self, proxy: ProxyHost, number: int) -> None:
        self.proxy = proxy
        self.number = number
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.follower = Follower(
            proxy.dialect, proxy.keylog, max_line=proxy.limits.max_line, framer=proxy.framer
        )
        self.faults: Tuple[Fault, ...] = tuple(proxy.faults)
        self._hits: Dict[int, int] = {}
        #: The evidence: every unit, fault, injection and write, in order.
        self.events: List[ProxyEvent] = []
        self.client: Optional[Side] = None
        self.upstream: Optional[Side] = None
        self._pipes = {d: Pipe(self, d) for d in DIRECTIONS}
        self._eof_in: Dict[str, bool] = {d: False for d in DIRECTIONS}
        self._lost: Dict[str, bool] = {d: False for d in DIRECTIONS}  # by sender direction
        self._closing: Set[str] = set()
        self._early = bytearray()
        self._paused: Dict[str, Set[str]] = {d: set() for d in DIRECTIONS}
        self._start = 0.0
        self._last_activity = 0.0
        self._waiters: List[Tuple[Callable[[ProxyEvent], bool], asyncio.Future[ProxyEvent]]] = []
        self._closed_future: Optional[asyncio.Future[None]] = None
        self._timers: Dict[str, asyncio.TimerHandle] = {}
        self._tasks: Set[asyncio.Task[None]] = set()
        self.finished = False

    # ----------------------------------------------------------- public API

    def __repr__(self) -> str:
        return f"<ProxyConnection #{self.number} {len(self.events)} events>"

    async def wait_for(
        self, predicate: Callable[[ProxyEvent], bool], timeout: float = 5.0
    ) -> ProxyEvent:
        """The first event (past or future) matching ``predicate``.

        Raises ``asyncio.TimeoutError`` after ``timeout`` seconds and
        :class:`EventNotSeen` if the connection ends first.
        """
        for event in self.events:
            if predicate(event):
                return event
        if self.finished:
            raise EventNotSeen(f"connection #{self.number} ended without the awaited event")
        fut: asyncio.Future[ProxyEvent] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    async def wait_point(
        self, point: str, direction: Optional[str] = None, timeout: float = 5.0
    ) -> ProxyEvent:
        """Wait for a unit or note that marks ``point`` (in ``direction``)."""
        return await self.wait_for(
            lambda e: point in e.points and (direction is None or e.direction == direction),
            timeout,
        )

    async def wait_closed(self, timeout: float = 5.0) -> None:
        """Wait until both sockets are closed (bounded)."""
        if self._closed_future is None:
            raise RuntimeError("connection not started")
        await asyncio.wait_for(asyncio.shield(self._closed_future), timeout)

    def units(
        self,
        direction: Optional[str] = None,
        point: Optional[str] = None,
        kinds: Sequence[str] = (
            UNIT_PLAINTEXT,
            UNIT_RECORD,
            UNIT_FRAGMENT,
            UNIT_EOF,
            UNIT_RESET,
            UNIT_NOTE,
        ),
    ) -> List[ProxyEvent]:
        """Received units and notes, optionally filtered."""
        return [
            e
            for e in self.events
            if e.kind in kinds
            and (direction is None or e.direction == direction)
            and (point is None or point in e.points)
        ]

    def received(self, direction: str) -> bytes:
        """Every byte the sender of ``direction`` sent, in order."""
        return b"".join(
            e.data
            for e in self.events
            if e.direction == direction and e.kind in (UNIT_PLAINTEXT, UNIT_RECORD, UNIT_FRAGMENT)
        )

    def sent(self, direction: str) -> bytes:
        """Every byte written to the receiver of ``direction``, in order."""
        return b"".join(
            e.data for e in self.events if e.direction == direction and e.kind == EV_SENT
        )

    def writes(self, direction: str) -> List[bytes]:
        """The writes to the receiver of ``direction`` (one per TCP write)."""
        return [e.data for e in self.events if e.direction == direction and e.kind == EV_SENT]

    def close(self) -> None:
        """Close both sockets now (pending delayed writes are dropped)."""
        for task in list(self._tasks):
            task.cancel()
        for pipe in self._pipes.values():
            pipe.cancel()
        self._close_all("closed by the proxy")

    # ------------------------------------------------------------- logging

    def _now(self) -> float:
        loop = self.loop
        return (loop.time() - self._start) if loop is not None else 0.0

    def _emit(self, event: ProxyEvent) -> None:
        self.events.append(event)
        callback = self.proxy.on_event
        if callback is not None:
            try:
                callback(event)
            except Exception as exc:  # a printing failure must not kill the relay
                self.proxy.callback_errors.append(exc)
        for predicate, fut in list(self._waiters):
            if not fut.done() and predicate(event):
                fut.set_result(event)

    def _event(
        self,
        direction: str,
        kind: str,
        *,
        detail: str = "",
        data: bytes = b"",
        method: str = "",
        points: Sequence[str] = (),
        index: int = 0,
        action: str = "",
        clear: Optional[bytes] = None,
    ) -> None:
        self._emit(
            ProxyEvent(
                self._now(),
                direction,
                kind,
                points[0] if points else "",
                detail,
                bytes(data),
                method,
                tuple(points),
                index,
                action,
                self.number,
                clear,
            )
        )

    def _note(self, direction: str, text: str) -> None:
        self._event(direction, UNIT_NOTE, detail=text)

    # --------------------------------------------------------- socket events

    def _side_made(self, side: Side) -> None:
        if side.direction == C2S:
            self.client = side
            assert side.transport is not None
            self.loop = asyncio.get_running_loop()
            self._start = self._last_activity = self.loop.time()
            self._closed_future = self.loop.create_future()
            peer = side.transport.get_extra_info("peername")
            host, port = self.proxy.upstream
            self._event("", EV_CONNECT, detail=f"client {peer} -> upstream {host}:{port}")
            with contextlib.suppress(Exception):
                side.transport.pause_reading()
            task = self.loop.create_task(self._connect_upstream())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self._schedule_idle()
        else:
            self.upstream = side
            if self.finished or C2S in self._closing:
                assert side.transport is not None
                self._closing.add(S2C)
                side.transport.close()
                return
            self._event("", EV_CONNECT, detail="upstream connected")

    async def _connect_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.proxy.upstream
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: Side(self, S2C), host, port),
                self.proxy.limits.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            self._event(
                "",
                EV_ERROR,
                detail=(
                    f"upstream {host}:{port} unreachable ({reason}); closing the client connection"
                ),
            )
            self._close_all("upstream unreachable")
            return
        if self.finished or C2S in self._closing:
            return  # the client went away meanwhile: _side_made closed upstream
        if self._early:
            early = bytes(self._early)
            self._early.clear()
            self._process(C2S, early)
        self._update_reading(C2S)

    def _on_data(self, direction: str, data: bytes) -> None:
        if direction == C2S and self.upstream is None:
            self._early += data
            if len(self._early) > self.proxy.limits.max_buffer:
                self._event("", EV_ERROR, detail="client sent too much before upstream connected")
                self._close_all("buffer limit")
            return
        self._process(direction, data)

    def _process(self, direction: str, data: bytes) -> None:
        self._touch()
        try:
            units = self.follower.feed(direction, data)
        except ValueError as exc:  # fed after the end: a bug, but never a crash
            self._note(direction, f"follower refused bytes: {exc}")
            units = []
        self._handle(units)
        if self.follower.has_partial_plaintext(direction):
            self._schedule_partial(direction)
        self._update_reading(direction)

    def _on_eof(self, direction: str) -> None:
        self._touch()
        if direction == C2S and self.upstream is None:
            self._close_all("client closed before upstream connected")
            return
        self._eof_in[direction] = True
        self._handle(self.follower.feed_eof(direction))
        self._maybe_finish()

    def _on_lost(self, side: Side, exc: Optional[BaseException]) -> None:
        direction = side.direction
        self._lost[direction] = True
        expected = direction in self._closing
        if not self._eof_in[direction] and not expected:
            self._eof_in[direction] = True
            if exc is not None:
                self._handle(self.follower.feed_reset(direction))
            else:
                self._handle(self.follower.feed_eof(direction))
        elif exc is not None and not expected:
            self._note(direction, f"socket error after EOF: {exc}")
        self._maybe_finish()
        if self._lost[C2S] and (self._lost[S2C] or self.upstream is None):
            self._finalise()

    def _receiver_paused(self, receiver_sends: str, paused: bool) -> None:
        """The socket that sends ``receiver_sends`` cannot take more writes."""
        sender = other_direction(receiver_sends)
        if paused:
            self._paused[sender].add("receiver")
        else:
            self._paused[sender].discard("receiver")
        self._update_reading(sender)

    def _update_reading(self, direction: str) -> None:
        side = self.client if direction == C2S else self.upstream
        if side is None or side.transport is None or side.transport.is_closing():
            return
        if self._pipes[direction].queued_bytes > self.proxy.limits.max_buffer:
            self._paused[direction].add("backlog")
        else:
            self._paused[direction].discard("backlog")
        if direction == C2S and self.upstream is None:
            return
        with contextlib.suppress(Exception):
            if self._paused[direction]:
                side.transport.pause_reading()
            else:
                side.transport.resume_reading()

    # -------------------------------------------------------------- faults

    def _handle(self, units: Sequence[Unit]) -> None:
        for unit in units:
            if not unit.relayable:
                self._event(
                    unit.direction,
                    UNIT_NOTE,
                    detail=unit.detail,
                    method=unit.method,
                    points=unit.points,
                    index=unit.index,
                    clear=unit.clear,
                )
                continue
            self._relay(unit)

    def _matching(self, unit: Unit) -> List[Fault]:
        hits: List[Fault] = []
        for i, fault in enumerate(self.faults):
            if fault.direction != unit.direction or fault.at not in unit.points:
                continue
            self._hits[i] = self._hits.get(i, 0) + 1
            if self._hits[i] == fault.nth:
                hits.append(fault)
        return hits

    def _relay(self, unit: Unit) -> None:
        d = unit.direction
        pipe = self._pipes[d]
        if pipe.terminated:
            self._event(
                d,
                unit.kind,
                detail=unit.detail,
                data=unit.data,
                method=unit.method,
                points=unit.points,
                index=unit.index,
                action="discarded",
                clear=unit.clear,
            )
            return
        faults = self._matching(unit)
        self._event(
            d,
            unit.kind,
            detail=unit.detail,
            data=unit.data,
            method=unit.method,
            points=unit.points,
            index=unit.index,
            action="+".join(f.action for f in faults),
            clear=unit.clear,
        )
        self._apply(unit, faults)

    def _apply(self, unit: Unit, faults: Sequence[Fault]) -> None:
        """Log the plan for ``unit`` under ``faults``, then queue its writes."""
        plan = plan_unit(unit, faults)
        for event in plan.events:
            self._event(
                unit.direction,
                event.kind,
                detail=event.detail,
                data=event.data,
                points=event.points,
                index=unit.index,
                action=event.action,
            )
        pipe = self._pipes[unit.direction]
        if plan.terminated:
            pipe.terminated = True
        pipe.batching = True
        try:
            for op, arg in plan.ops:
                pipe.push(op, arg)
        finally:
            pipe.batching = False
            pipe.run()

    # --------------------------------------------------------------- output

    def _receiver(self, direction: str) -> Optional[Side]:
        return self.upstream if direction == C2S else self.client

    def _write(self, direction: str, data: bytes) -> None:
        side = self._receiver(direction)
        if side is None or side.transport is None or side.transport.is_closing():
            self._note(direction, f"{len(data)} bytes not delivered: the receiver is gone")
            return
        side.transport.write(data)
        self._event(direction, EV_SENT, data=data)

    def _send_eof(self, direction: str) -> None:
        side = self._receiver(direction)
        if side is None or side.transport is None or side.transport.is_closing():
            self._note(direction, "FIN not delivered: the receiver is gone")
            return
        transport = side.transport
        if transport.can_write_eof():
            transport.write_eof()
        else:  # pragma: no cover - TCP transports can
            self._closing.add(side.direction)
            transport.close()
        self._event(direction, EV_FIN_SENT, detail="FIN to the receiver")

    def _send_rst(self, direction: str) -> None:
        side = self._receiver(direction)
        if side is None or side.transport is None or side.transport.is_closing():
            self._note(direction, "RST not delivered: the receiver is gone")
            return
        abort_with_rst(side.transport)
        self._closing.add(side.direction)
        self._event(direction, EV_RST_SENT, detail="RST to the receiver")

    def _pipe_progress(self, direction: str) -> None:
        self._update_reading(direction)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        """Close both sockets once neither direction can carry more."""
        if self.finished:
            return
        for d in DIRECTIONS:
            pipe = self._pipes[d]
            if not pipe.idle:
                return
            receiver_gone = self._lost[other_direction(d)]
            if not (pipe.terminated or self._eof_in[d] or self._lost[d] or receiver_gone):
                return
        self._close_all("")

    def _close_all(self, reason: str) -> None:
        if reason:
            self._note("", reason)
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None:
                self._closing.add(side.direction)
                if not side.transport.is_closing():
                    side.transport.close()
        if self.upstream is None and self.client is not None and self.client.transport is None:
            self._finalise()

    def _finalise(self) -> None:
        if self.finished:
            return
        self.finished = True
        for pipe in self._pipes.values():
            pipe.cancel()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._event("", EV_CLOSED, detail="both sockets closed")
        for _predicate, fut in self._waiters:
            if not fut.done():
                fut.set_exception(
                    EventNotSeen(f"connection #{self.number} ended without the awaited event")
                )
        if self._closed_future is not None and not self._closed_future.done():
            self._closed_future.set_result(None)
        self.proxy._connection_done(self)

    # --------------------------------------------------------------- timers

    def _touch(self) -> None:
        if self.loop is not None:
            self._last_activity = self.loop.time()

    def _schedule_idle(self) -> None:
        assert self.loop is not None
        self._timers["idle"] = self.loop.call_later(self.proxy.limits.idle_timeout, self._idle)

    def _idle(self) -> None:
        assert self.loop is not None
        quiet = self.loop.time() - self._last_activity
        limit = self.proxy.limits.idle_timeout
        if quiet < limit:
            self._timers["idle"] = self.loop.call_later(limit - quiet, self._idle)
            return
        for pipe in self._pipes.values():
            pipe.cancel()
        self._close_all(f"no traffic for {limit:g} s: closing both sides")

    def _schedule_partial(self, direction: str) -> None:
        key = f"partial-{direction}"
        if key in self._timers or self.loop is None:
            return

        def fire() -> None:
            self._timers.pop(key, None)
            if self.finished or self._eof_in[direction]:
                return
            self._handle(self.follower.flush(direction))

        self._timers[key] = self.loop.call_later(self.proxy.limits.partial_timeout, fire)
