"""(b) The floor's cycle through the project's engine and asyncio adapter.

Same conversation, same certificates, same loopback sockets as
:mod:`benchmarks.floor`, but both ends are :class:`starttls_harness.tls.aio` transports
on one event loop: the server arms the hold gate on ``STARTTLS`` and
upgrades with ``start_tls(preface=...)``; after the ``NOOP`` it answers
``250`` and agrees to the closure in one step (``accept_unwrap``), the
client initiates it with ``unwrap()``, and the server greets again in
plaintext.  Engines record their transcript (the default), as in a real run.

:func:`pair_cycle` is the same without sockets or event loop: the sans-I/O
engine on an in-memory :class:`starttls_harness.tls.engine.Pair` (compare with
:func:`benchmarks.floor.memory_cycle`).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Callable, List, Optional, Set

from starttls_harness.tls.aio import SwitchableTransport, create_server, open_connection
from starttls_harness.tls.engine import ClosureComplete, Connection, Pair, PlaintextData, TLSData

from .floor import AGAIN, GO, GREETING, NOOP, OK, STARTTLS

__all__ = ["EngineBench", "pair_cycle"]


class _Lines(asyncio.Protocol):
    """Collects complete lines; ``line()`` waits (bounded) for the next one."""

    def __init__(self) -> None:
        self.buf = b""
        self.lines: List[bytes] = []
        self.waiter: Optional[asyncio.Future[None]] = None
        self.transport: Optional[SwitchableTransport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SwitchableTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.lines.append(line + b"\n")
        if self.lines and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("closed"))

    async def line(self) -> bytes:
        """The next line (unbounded here: :meth:`EngineBench.cycles` bounds
        the whole batch, so the adapter's cost is not blurred by ours)."""
        if not self.lines:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.lines.pop(0)


class _Server(_Lines):
    def __init__(self, ctx: ssl.SSLContext, tasks: Set[asyncio.Task[Any]]) -> None:
        super().__init__()
        self.ctx = ctx
        self.tasks = tasks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.hold_after(lambda line: line == STARTTLS)
        self.transport.write(GREETING)
        task = asyncio.get_running_loop().create_task(self.serve())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self) -> None:
        t = self.transport
        assert t is not None
        assert await self.line() == STARTTLS
        await t.start_tls(self.ctx, server_side=True, preface=GO)
        assert await self.line() == NOOP
        await t.accept_unwrap(preface=OK)
        t.write(AGAIN)


class EngineBench:
    """A listening engine server; :meth:`cycle` runs one client cycle."""

    def __init__(self, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> None:
        self.client_ctx = client_ctx
        self.server_ctx = server_ctx
        self.tasks: Set[asyncio.Task[Any]] = set()
        self.server: Optional[asyncio.AbstractServer] = None
        self.port = 0

    async def start(self) -> None:
        self.server = await create_server(
            lambda: _Server(self.server_ctx, self.tasks), "127.0.0.1", 0, backlog=128
        )
        self.port = int(self.server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def cycle(self) -> None:
        t, proto = await open_connection(_Lines, "127.0.0.1", self.port)
        assert isinstance(proto, _Lines)
        try:
            assert await proto.line() == GREETING
            t.hold_after(lambda line: line[3:4] == b" ", once=True)
            t.write(STARTTLS)
            assert await proto.line() == GO
            await t.start_tls(self.client_ctx, server_side=False, server_hostname="localhost")
            t.write(NOOP)
            assert await proto.line() == OK
            closure = await t.unwrap()
            assert closure.resumed
            assert await proto.line() == AGAIN
        finally:
            t.close()

    async def cycles(self, n: int) -> None:
        async def batch() -> None:
            for _ in range(n):
                await self.cycle()
            # Let the server side of the last connection finish too.
            while self.tasks:
                await asyncio.wait(set(self.tasks))

        await asyncio.wait_for(batch(), 10.0 + 0.1 * n)


def pair_cycle(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> None:
    """The engine's part of the cycle, in memory (no sockets, no loop)."""
    pair = Pair(Connection(), Connection())
    pair.server.hold_after(lambda line: line == STARTTLS)
    pair.server.send_data(GREETING)
    pair.pump()
    pair.client.hold_after(lambda line: line[3:4] == b" ", once=True)
    pair.client.send_data(STARTTLS)
    pair.pump()
    pair.server.send_data(GO)
    pair.server.start_tls(server_ctx, server_side=True)
    pair.pump()
    pair.client.start_tls(client_ctx, server_side=False, server_hostname="localhost")
    pair.pump()
    pair.client.send_data(NOOP)
    pair.pump()
    pair.server.send_data(OK)
    pair.server.accept_unwrap()
    pair.pump()
    pair.client.unwrap()
    pair.pump()
    pair.server.send_data(AGAIN)
    pair.pump()
    got = b"".join(e.data for e in pair.client_events if isinstance(e, (PlaintextData, TLSData)))
    assert got == GREETING + GO + OK + AGAIN, got
    assert any(isinstance(e, ClosureComplete) for e in pair.client_events)


def loop_runner(loop: asyncio.AbstractEventLoop, bench: EngineBench) -> Callable[[int], None]:
    def run(n: int) -> None:
        loop.run_until_complete(bench.cycles(n))

    return run
