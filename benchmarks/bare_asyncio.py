"""The floor's cycle on asyncio with no engine: what the event loop itself costs.

Two hand-written ``asyncio.Protocol`` state machines, each with an
``ssl.SSLObject`` and two ``MemoryBIO`` objects, speak the cycle of
:mod:`benchmarks.floor` over loopback on one event loop.  No hold gate,
no record splitting, no transcript, no rule checks, no futures per step:
the least an asyncio program can do.  The engine's row is compared with
this one to tell the adapter's cost from the event loop's.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Callable, Optional

from .floor import AGAIN, GO, GREETING, NOOP, OK, STARTTLS

__all__ = ["BareBench"]


class _TLSSide(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls: Optional[ssl.SSLObject] = None
        self.handshaken = False
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            assert self.transport is not None
            self.transport.write(data)

    def handshake(self) -> bool:
        assert self.tls is not None
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.flush()
            return False
        self.flush()
        self.handshaken = True
        return True

    def data_received(self, data: bytes) -> None:
        if self.tls is None:
            self.buf += data
            if self.buf.endswith(b"\n"):
                line, self.buf = self.buf, b""
                self.on_line(line)
            return
        self.incoming.write(data)
        if not self.handshaken and not self.handshake():
            return
        self.on_tls()

    def on_line(self, line: bytes) -> None:
        raise NotImplementedError

    def on_tls(self) -> None:
        raise NotImplementedError


class _Server(_TLSSide):
    def __init__(self, ctx: ssl.SSLContext) -> None:
        super().__init__()
        self.ctx = ctx

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.write(GREETING)

    def on_line(self, line: bytes) -> None:
        assert line == STARTTLS
        assert self.transport is not None
        self.transport.write(GO)
        self.tls = self.ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def on_tls(self) -> None:
        assert self.tls is not None and self.transport is not None
        while True:
            try:
                data = self.tls.read()
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                data = b""
            if data == NOOP:
                self.tls.write(OK)
                self.flush()
                continue
            assert data == b"", data
            self.tls.unwrap()  # answer the close_notify
            self.flush()
            self.tls = None
            self.transport.write(AGAIN)
            return


class _Client(_TLSSide):
    def __init__(self, ctx: ssl.SSLContext, done: asyncio.Future[None]) -> None:
        super().__init__()
        self.ctx = ctx
        self.done = done
        self.closing = False

    def on_line(self, line: bytes) -> None:
        assert self.transport is not None
        if line == GREETING:
            self.transport.write(STARTTLS)
        elif line == GO:
            self.tls = self.ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
            self.handshake()
        else:
            assert line == AGAIN, line
            self.transport.close()
            self.done.set_result(None)

    def handshake(self) -> bool:
        if super().handshake():
            assert self.tls is not None
            self.tls.write(NOOP)
            self.flush()
            return False  # nothing to read yet
        return False

    def on_tls(self) -> None:
        assert self.tls is not None
        if self.closing:
            try:
                self.tls.unwrap()
            except ssl.SSLWantReadError:
                return
            self.tls = None
            leftover = self.incoming.read()
            if leftover:
                self.data_received(leftover)
            return
        try:
            data = self.tls.read()
        except ssl.SSLWantReadError:
            return
        assert data == OK, data
        self.closing = True
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        self.flush()


class BareBench:
    """A bare asyncio server; :meth:`cycles` runs client cycles against it."""

    def __init__(self, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> None:
        self.client_ctx = client_ctx
        self.server_ctx = server_ctx
        self.server: Optional[asyncio.AbstractServer] = None
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Server(self.server_ctx), "127.0.0.1", 0, backlog=128
        )
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def cycles(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(n):
            done: asyncio.Future[None] = loop.create_future()
            await loop.create_connection(
                lambda done=done: _Client(self.client_ctx, done),  # type: ignore[misc]
                "127.0.0.1",
                self.port,
            )
            await asyncio.wait_for(done, 5.0)


def loop_runner(loop: asyncio.AbstractEventLoop, bench: BareBench) -> Callable[[int], None]:
    def run(n: int) -> None:
        loop.run_until_complete(bench.cycles(n))

    return run
