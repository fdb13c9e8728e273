"""The proxy's two sockets per connection: the protocol of each, and the
ordered writes of each direction with its holds and corks.

Both report to their connection through the small interfaces below, so this
module does not depend on :mod:`starttls_harness.proxy.connection`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
from typing import Any, Deque, List, Optional, Protocol, Tuple, cast

__all__ = ["Pipe", "PipeOwner", "Side", "SideOwner", "abort_with_rst"]


class PipeOwner(Protocol):
    """What a :class:`Pipe` needs of its connection."""

    loop: Optional[asyncio.AbstractEventLoop]

    def _write(self, direction: str, data: bytes) -> None: ...

    def _send_eof(self, direction: str) -> None: ...

    def _send_rst(self, direction: str) -> None: ...

    def _pipe_progress(self, direction: str) -> None: ...

    def _note(self, direction: str, text: str) -> None: ...


class SideOwner(Protocol):
    """What a :class:`Side` reports its socket's events to."""

    def _side_made(self, side: Side) -> None: ...

    def _on_data(self, direction: str, data: bytes) -> None: ...

    def _on_eof(self, direction: str) -> None: ...

    def _on_lost(self, side: Side, exc: Optional[BaseException]) -> None: ...

    def _receiver_paused(self, receiver_sends: str, paused: bool) -> None: ...


_Op = Tuple[str, Any]


class Pipe:
    """The writes of one direction, in order, with holds and corks."""

    def __init__(self, conn: PipeOwner, direction: str) -> None:
        self.conn = conn
        self.direction = direction
        self.queue: Deque[_Op] = collections.deque()
        self.held = False
        self.cork: Optional[bytearray] = None
        self.terminated = False  # a FIN or RST was queued: nothing more goes this way
        self.batching = False  # ops of one unit are queued together, then run
        self.queued_bytes = 0
        self._handles: List[asyncio.TimerHandle] = []

    @property
    def idle(self) -> bool:
        return not self.queue and not self.held and self.cork is None

    def push(self, op: str, arg: Any = None) -> None:
        self.queue.append((op, arg))
        if isinstance(arg, (bytes, bytearray)):
            self.queued_bytes += len(arg)
        if not self.batching:
            self.run()

    def run(self) -> None:
        loop = asyncio.get_running_loop() if self.conn.loop is None else self.conn.loop
        while self.queue and not self.held:
            op, arg = self.queue.popleft()
            if isinstance(arg, (bytes, bytearray)):
                self.queued_bytes -= len(arg)
            if op == "hold":
                self.held = True
                self._handles.append(loop.call_later(float(arg), self._release))
            elif op == "write":
                if self.cork is not None:
                    self.cork += arg
                    self._flush_cork()
                else:
                    self.conn._write(self.direction, bytes(arg))
            elif op == "cork":
                data, bound = arg
                self._flush_cork()
                self.cork = bytearray(data)
                self._handles.append(loop.call_later(bound, self._cork_timeout))
            elif op == "eof":
                self._flush_cork()
                self.conn._send_eof(self.direction)
            elif op == "rst":
                self._flush_cork()
                self.conn._send_rst(self.direction)
        self.conn._pipe_progress(self.direction)

    def _release(self) -> None:
        self.held = False
        self.run()

    def _cork_timeout(self) -> None:
        if self.cork is not None:
            self.conn._note(self.direction, "coalesce: no next unit in time; written alone")
            self._flush_cork()
            self.conn._pipe_progress(self.direction)

    def _flush_cork(self) -> None:
        if self.cork is not None:
            data = bytes(self.cork)
            self.cork = None
            self.conn._write(self.direction, data)

    def cancel(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()
        self.queue.clear()
        self.held = False
        self.cork = None


class Side(asyncio.Protocol):
    """Protocol of one of the two sockets; ``direction`` is what it sends."""

    def __init__(self, conn: SideOwner, direction: str) -> None:
        self.conn = conn
        self.direction = direction
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn._side_made(self)

    def data_received(self, data: bytes) -> None:
        self.conn._on_data(self.direction, data)

    def eof_received(self) -> bool:
        self.conn._on_eof(self.direction)
        return True  # keep the other half open: half-close is relayed as such

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.conn._on_lost(self, exc)

    def pause_writing(self) -> None:
        self.conn._receiver_paused(self.direction, True)

    def resume_writing(self) -> None:
        self.conn._receiver_paused(self.direction, False)


def abort_with_rst(transport: asyncio.Transport) -> None:
    """Close ``transport`` with a TCP RST (zero linger), not a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
