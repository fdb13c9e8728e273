"""The asyncio adapter over real loopback sockets (asyncio and uvloop).

A tiny line protocol stands in for a mail dialect: ``STARTTLS`` upgrades,
``STOPTLS`` returns to plaintext (the server answers, then waits for the
client's close_notify), anything else is echoed with the phase it arrived in.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from typing import List, Optional, Set, Tuple, Union

import pytest
from starttls_harness.tls.aio import (
    ConnectionEnded,
    SwitchableTransport,
    create_server,
    open_connection,
)
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import AlertReceived, ClosureComplete, Policy, Rule

Item = Union[bytes, Optional[BaseException]]


class EchoServer(asyncio.Protocol):
    def __init__(self, ctx: ssl.SSLContext, log: List[EchoServer]) -> None:
        self.ctx = ctx
        self.buf = b""
        self.lost: asyncio.Future[Optional[BaseException]] = (
            asyncio.get_running_loop().create_future()
        )
        self.handled: List[bytes] = []
        self.tasks: Set[asyncio.Future[None]] = set()
        log.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SwitchableTransport)
        self.t = transport
        transport.hold_after(lambda line: line.strip() == b"STARTTLS")
        transport.write(b"220 hello\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.handled.append(line.strip())
            task = asyncio.ensure_future(self.handle(line.strip()))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def handle(self, line: bytes) -> None:
        try:
            if line == b"STARTTLS":
                await self.t.start_tls(self.ctx, server_side=True, preface=b"220 go ahead\r\n")
            elif line == b"STOPTLS":
                await self.t.accept_unwrap(b"220 ending TLS\r\n")
                self.t.write(b"220 hello again\r\n")
            else:
                phase = b"tls" if self.t.tls_active else b"plain"
                self.t.write(b"250 " + phase + b" " + line + b"\r\n")
        except (ConnectionError, asyncio.TimeoutError):
            pass

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class LineClient(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.queue.put_nowait(line + b"\n")

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.queue.put_nowait(exc)

    async def line(self) -> Item:
        return await asyncio.wait_for(self.queue.get(), 5)


async def start(
    pki: Pki, version: str, policy: Optional[Policy] = None
) -> Tuple[asyncio.AbstractServer, int, List[EchoServer]]:
    log: List[EchoServer] = []
    ctx = pki.server_context(version)
    server = await create_server(lambda: EchoServer(ctx, log), "127.0.0.1", 0, policy=policy)
    return server, server.sockets[0].getsockname()[1], log  # type: ignore[attr-defined]


async def connect(
    port: int, policy: Optional[Policy] = None
) -> Tuple[SwitchableTransport, LineClient]:
    t, p = await open_connection(LineClient, "127.0.0.1", port, policy=policy)
    assert isinstance(p, LineClient)
    assert await p.line() == b"220 hello\r\n"
    return t, p


async def client_starttls(t: SwitchableTransport, p: LineClient, pki: Pki, version: str) -> None:
    t.hold_after(lambda line: line[3:4] == b" ", once=True)
    t.write(b"STARTTLS\r\n")
    assert await p.line() == b"220 go ahead\r\n"
    await t.start_tls(pki.client_context(version), server_side=False, server_hostname="localhost")


def test_three_cycles_over_loopback(pki: Pki, tls_version: str, run) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        server, port, log = await start(pki, tls_version)
        t, p = await connect(port)
        sock = t.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        for cycle in range(3):
            t.write(b"NOOP %d\r\n" % cycle)
            assert await p.line() == b"250 plain NOOP %d\r\n" % cycle
            await client_starttls(t, p, pki, tls_version)
            assert t.tls_version == {"1.2": "TLSv1.2", "1.3": "TLSv1.3"}[tls_version]
            t.write(b"MAIL %d\r\n" % cycle)
            assert await p.line() == b"250 tls MAIL %d\r\n" % cycle
            t.write(b"STOPTLS\r\n")
            assert await p.line() == b"220 ending TLS\r\n"
            closure = await t.unwrap()
            assert closure.resumed
            assert await p.line() == b"220 hello again\r\n"
            assert not t.tls_active
        assert not t.violations and not log[0].t.violations
        t.close()
        assert await asyncio.wait_for(log[0].lost, 5) is None
        server.close()
        await server.wait_closed()

    run(body)


def test_command_injection_is_refused(pki: Pki, tls_version: str, run) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        server, port, log = await start(pki, tls_version)
        t, p = await connect(port)
        with t.corked():  # one TCP segment: the CVE-2011-0411 pattern
            t.write(b"STARTTLS\r\nNOOP injected\r\n")
        assert await p.line() == b"220 go ahead\r\n"
        exc = await asyncio.wait_for(log[0].lost, 5)
        assert isinstance(exc, ConnectionEnded) and exc.rule == "R1"
        assert b"NOOP injected" not in log[0].handled
        assert isinstance(await p.line(), (type(None), BaseException))  # closed
        server.close()
        await server.wait_closed()

    run(body)


def test_relaxed_server_executes_injection(pki: Pki, tls_version: str, run) -> None:  # type: ignore[no-untyped-def]
    """The misbehaving engine really lets the injected command through."""

    async def body() -> None:
        server, port, _log = await start(pki, tls_version, Policy.relaxing(Rule.R1))
        t, p = await connect(port)
        with t.corked():
            t.write(b"STARTTLS\r\nNOOP injected\r\n")
        assert await p.line() == b"220 go ahead\r\n"
        await t.start_tls(
            pki.client_context(tls_version), server_side=False, server_hostname="localhost"
        )
        assert await p.line() == b"250 tls NOOP injected\r\n"
        t.close()
        server.close()
        await server.wait_closed()

    run(body)


def test_one_sided_close_is_refused(pki: Pki, tls_version: str, run) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        server, port, log = await start(pki, tls_version)
        t, p = await connect(port, Policy.relaxing(Rule.R4))
        await client_starttls(t, p, pki, tls_version)
        t.write(b"STOPTLS\r\n")
        assert await p.line() == b"220 ending TLS\r\n"
        with t.corked():  # close_notify and plaintext in one segment
            t.engine.unwrap()
            t.write(b"NOOP early\r\n")
        exc = await asyncio.wait_for(log[0].lost, 5)
        assert isinstance(exc, ConnectionEnded) and exc.rule == "R4"
        assert b"NOOP early" not in log[0].handled
        server.close()
        await server.wait_closed()

    run(body)


def test_truncation_is_reported(pki: Pki, tls_version: str, run) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        server, port, log = await start(pki, tls_version)
        t, p = await connect(port)
        await client_starttls(t, p, pki, tls_version)
        t.write(b"partial command without end")
        t.abort()  # TCP goes away without close_notify
        exc = await asyncio.wait_for(log[0].lost, 5)
        assert isinstance(exc, ConnectionEnded) and exc.rule == "R6"
        server.close()
        await server.wait_closed()

    run(body)


def test_plaintext_inside_tls_is_refused(pki: Pki, tls_version: str, run) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        server, port, log = await start(pki, tls_version)
        t, p = await connect(port)
        await client_starttls(t, p, pki, tls_version)
        t.write_raw(b"NOOP plaintext\r\n")
        exc = await asyncio.wait_for(log[0].lost, 5)
        assert isinstance(exc, ConnectionEnded) and exc.rule == "R2"
        assert b"NOOP plaintext" not in log[0].handled
        server.close()
        await server.wait_closed()

    run(body)


def test_closure_wait_is_bounded(pki: Pki, tls_version: str, run) -> None:  # type: ignore[no-untyped-def]
    """A peer that never answers close_notify: unwrap() fails within its bound."""

    async def body() -> None:
        server, port, _log = await start(pki, tls_version, Policy.relaxing(Rule.R5))
        t, p = await connect(port)
        await client_starttls(t, p, pki, tls_version)
        with pytest.raises(asyncio.TimeoutError, match=r"within 0\.2 s"):
            await t.unwrap(timeout=0.2)
        server.close()
        await server.wait_closed()

    run(body)


def test_unwrap_result_is_closure_event(pki: Pki, tls_version: str, run) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        server, port, _log = await start(pki, tls_version)
        t, p = await connect(port)
        await client_starttls(t, p, pki, tls_version)
        t.write(b"STOPTLS\r\n")
        assert await p.line() == b"220 ending TLS\r\n"
        result = await t.unwrap()
        assert isinstance(result, ClosureComplete)
        assert t.get_extra_info("ssl_object") is None
        t.close()
        server.close()
        await server.wait_closed()

    run(body)


class ResettingServer(EchoServer):
    """Answers a fatal alert with an RST (as Postfix does with unread input)."""

    def engine_event(self, event: object) -> None:
        if isinstance(event, AlertReceived):
            sock = self.t.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.t.abort()  # linger 0: an RST, not a FIN


def test_reset_after_our_provoked_alert_is_not_blamed_on_the_peer(
    pki: Pki, tls_version: str, run
) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        log: List[EchoServer] = []
        ctx = pki.server_context(tls_version)
        server = await create_server(lambda: ResettingServer(ctx, log), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        t, p = await connect(port)
        await client_starttls(t, p, pki, tls_version)
        with t.corked():
            t.send_fatal_alert()
            t.write_raw(b"NOOP after alert\r\n")
        lost = await p.line()
        assert not isinstance(lost, ConnectionEnded), lost
        assert isinstance(await asyncio.wait_for(log[0].lost, 5), ConnectionEnded)
        server.close()
        await server.wait_closed()

    run(body)


def test_no_write_after_our_truncation_fin(pki: Pki, tls_version: str, run) -> None:  # type: ignore[no-untyped-def]
    """After truncate(), an automatic close_notify answer is not written."""

    async def body() -> None:
        server, port, log = await start(pki, tls_version)
        t, p = await connect(port)
        await client_starttls(t, p, pki, tls_version)
        t.truncate()
        t.engine.send_close_notify()
        t._flush()  # must not raise "write() after write_eof()"
        exc = await asyncio.wait_for(log[0].lost, 5)
        assert isinstance(exc, ConnectionEnded) and exc.rule == "R6"
        server.close()
        await server.wait_closed()

    run(body)
