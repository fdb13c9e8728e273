"""The on-path proxy: its sans-I/O follower, its fault specs, and the relay
over real loopback sockets with real TLS between two strict engine peers.

The toy peers speak just enough SMTP: the server greets ``220 hi``, answers
``STARTTLS`` with ``220 go`` and upgrades, answers ``STOPTLS`` under TLS with
``220 bye tls``, waits for the bidirectional closure and greets again with
``220 hello again``; ``NOOP`` gets ``250 ok``, ``QUIT`` ``221 bye``.  The
client writes a TLS key log, which the proxy reads to follow TLS 1.3.
"""

from __future__ import annotations

import asyncio
import io
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, List, Optional, Sequence, Set, Tuple, Union

import pytest
from starttls_harness.proxy import (
    ACTIONS,
    C2S,
    FAULT_NAMES,
    POINTS,
    S2C,
    EventNotSeen,
    Fault,
    Follower,
    Point,
    Proxy,
    ProxyConnection,
    ProxyEvent,
    Unit,
    format_event,
    parse_fault,
    run_proxy,
)
from starttls_harness.tls.aio import (
    ConnectionEnded,
    SwitchableTransport,
    create_server,
    open_connection,
)
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import Connection

Runner = Callable[..., Any]
Item = Union[bytes, Optional[BaseException]]
WAIT = 5.0  # bound of every wait in these tests (a setting, never a sleep)
METHOD = {"1.2": "record-type", "1.3": "keylog"}


# ------------------------------------------------------------------ toy peers


class ToyServer(asyncio.Protocol):
    """A strict engine peer speaking a sliver of SMTP with STOPTLS."""

    def __init__(self, ctx: ssl.SSLContext, registry: List[ToyServer]) -> None:
        self.ctx = ctx
        self.buf = b""
        #: (phase, line) of every command the server interpreted.
        self.handled: List[Tuple[str, bytes]] = []
        self.lost: asyncio.Future[Optional[BaseException]] = (
            asyncio.get_running_loop().create_future()
        )
        self.tasks: Set[asyncio.Future[None]] = set()
        registry.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SwitchableTransport)
        self.t = transport
        transport.hold_after(lambda line: line.strip() == b"STARTTLS")
        transport.write(b"220 hi\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            raw, self.buf = self.buf.split(b"\n", 1)
            line = raw.strip()
            self.handled.append(("tls" if self.t.tls_active else "plain", line))
            task = asyncio.ensure_future(self.handle(line))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def handle(self, line: bytes) -> None:
        try:
            if line == b"STARTTLS":
                await self.t.start_tls(self.ctx, server_side=True, preface=b"220 go\r\n")
            elif line == b"STOPTLS":
                await self.t.accept_unwrap(b"220 bye tls\r\n", timeout=WAIT)
                self.t.write(b"220 hello again\r\n")
            elif line == b"NOOP":
                self.t.write(b"250 ok\r\n")
            elif line == b"QUIT":
                self.t.write(b"221 bye\r\n")
                self.t.close()
            else:
                self.t.write(b"500 what\r\n")
        except (ConnectionError, asyncio.TimeoutError):
            pass

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class ToyClient(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.buf = b""
        self.lost: asyncio.Future[Optional[BaseException]] = (
            asyncio.get_running_loop().create_future()
        )

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.queue.put_nowait(line + b"\n")

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.queue.put_nowait(exc)
        if not self.lost.done():
            self.lost.set_result(exc)

    async def line(self) -> Item:
        return await asyncio.wait_for(self.queue.get(), WAIT)


@dataclass
class Stack:
    """Client -> proxy -> server on loopback, with the pieces a test inspects."""

    pki: Pki
    version: str
    keylog: Path
    server: asyncio.AbstractServer
    servers: List[ToyServer]
    proxy: Proxy
    t: SwitchableTransport
    client: ToyClient
    conn: ProxyConnection

    @classmethod
    async def start(
        cls,
        pki: Pki,
        version: str,
        tmp_path: Path,
        faults: Sequence[Union[Fault, str]] = (),
        *,
        proxy_keylog: bool = True,
    ) -> Stack:
        servers: List[ToyServer] = []
        ctx = pki.server_context(version)
        server = await create_server(lambda: ToyServer(ctx, servers), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        keylog = tmp_path / "keys.log"
        proxy = await Proxy.start(
            ("127.0.0.1", 0),
            ("127.0.0.1", port),
            "smtp",
            [f if isinstance(f, Fault) else parse_fault(f) for f in faults],
            keylog if proxy_keylog else None,
        )
        t, p = await open_connection(ToyClient, *proxy.address)
        assert isinstance(p, ToyClient)
        conn = await proxy.connection(0, timeout=WAIT)
        assert await p.line() == b"220 hi\r\n"
        return cls(pki, version, keylog, server, servers, proxy, t, p, conn)

    @property
    def toy(self) -> ToyServer:
        return self.servers[0]

    async def command(self, line: bytes) -> Item:
        self.t.write(line)
        return await self.client.line()

    async def starttls(self) -> None:
        self.t.hold_after(lambda line: line[3:4] == b" ", once=True)
        assert await self.command(b"STARTTLS\r\n") == b"220 go\r\n"
        await self.t.start_tls(
            self.pki.client_context(self.version, self.keylog),
            server_side=False,
            server_hostname="localhost",
        )

    async def stop(self) -> None:
        self.t.abort()
        for toy in self.servers:
            toy.t.abort()
        self.proxy.close()
        await self.proxy.wait_closed(WAIT)
        self.server.close()
        await asyncio.wait_for(self.server.wait_closed(), WAIT)


def run_stack(
    run: Runner,
    pki: Pki,
    version: str,
    tmp_path: Path,
    faults: Sequence[Union[Fault, str]],
    body: Callable[[Stack], Awaitable[None]],
    **kwargs: Any,
) -> None:
    async def main() -> None:
        stack = await Stack.start(pki, version, tmp_path, faults, **kwargs)
        try:
            await body(stack)
        finally:
            await stack.stop()

    run(main)


def lost_rule(exc: Optional[BaseException]) -> Optional[str]:
    return exc.rule if isinstance(exc, ConnectionEnded) else None


def engine_bytes(engine: Connection, direction: str) -> bytes:
    return b"".join(seg.data for seg in engine.transcript if seg.direction == direction)


def close_notify_events(conn: ProxyConnection, direction: str) -> List[ProxyEvent]:
    return [
        e for e in conn.units(direction, Point.CLOSE_NOTIFY.value) if e.kind in ("record", "note")
    ]


# ------------------------------------------------------------ relay unchanged


@pytest.mark.parametrize("proxy_keylog", [True, False], ids=["keylog", "no-keylog"])
def test_full_cycle_relayed_unchanged(
    pki: Pki, tls_version: str, run: Runner, tmp_path: Path, proxy_keylog: bool
) -> None:
    """STARTTLS, data, STOPTLS, plaintext, STARTTLS again, QUIT: nothing changes,
    and the log marks each protocol point with how it was recognised."""

    async def body(s: Stack) -> None:
        assert await s.command(b"NOOP\r\n") == b"250 ok\r\n"
        await s.starttls()
        assert await s.command(b"NOOP\r\n") == b"250 ok\r\n"
        assert await s.command(b"STOPTLS\r\n") == b"220 bye tls\r\n"
        assert (await s.t.unwrap(timeout=WAIT)).resumed
        assert await s.client.line() == b"220 hello again\r\n"
        assert await s.command(b"NOOP\r\n") == b"250 ok\r\n"
        await s.starttls()
        assert await s.command(b"QUIT\r\n") == b"221 bye\r\n"
        assert await s.client.line() is None  # clean close
        await s.conn.wait_closed(WAIT)
        assert not s.t.violations and not s.toy.t.violations
        assert await asyncio.wait_for(s.toy.lost, WAIT) is None

        conn = s.conn
        # Byte for byte: what one engine wrote is what the other read.
        for sender, receiver, d in ((s.t, s.toy.t, C2S), (s.toy.t, s.t, S2C)):
            wrote = engine_bytes(sender.engine, "out")
            assert conn.received(d) == wrote
            assert conn.sent(d) == wrote
            got = engine_bytes(receiver.engine, "in")
            # The client's answering close_notify at QUIT may reach a server
            # that has already closed; everything before it arrived.
            assert wrote.startswith(got) and len(wrote) - len(got) <= 40
        assert not [e for e in conn.events if e.action or e.kind in ("fault", "injected")]
        # One write per unit: records and lines are never merged by the proxy.
        for d in (C2S, S2C):
            units = [e.data for e in conn.units(d, kinds=("plaintext", "record"))]
            assert conn.writes(d) == units

        expected = METHOD[tls_version] if proxy_keylog else "position"
        if tls_version == "1.2":
            expected = "record-type"
        for d in (C2S, S2C):
            closes = close_notify_events(conn, d)
            assert len(closes) == 2, closes  # STOPTLS closure, then the closure at QUIT
            assert {e.method for e in closes} == {expected}
            assert len(conn.units(d, Point.HANDSHAKE_DONE.value)) == 2
            after = conn.units(d, Point.FIRST_PLAINTEXT_AFTER_TLS.value)
            assert after and after[0].kind == "plaintext"
        assert [e.data for e in conn.units(C2S, Point.STARTTLS_COMMAND.value)] == [
            b"STARTTLS\r\n"
        ] * 2
        assert len(conn.units(S2C, Point.STARTTLS_REPLY.value)) == 2
        assert len(conn.units(C2S, Point.CLIENT_HELLO.value)) == 2
        assert conn.units(S2C, Point.FIRST_PLAINTEXT_AFTER_TLS.value)[0].data == (
            b"220 hello again\r\n"
        )
        stoptls = conn.units(S2C, Point.STOPTLS_REPLY.value)
        assert stoptls  # read under TLS 1.3 with a key log, inferred otherwise
        assert stoptls[0].kind == ("record" if expected == "keylog" else "note")
        if expected == "keylog":
            assert conn.units(C2S, Point.STOPTLS_COMMAND.value)
            assert not [e for e in conn.events if "falling back" in e.detail]
        text = "\n".join(format_event(e) for e in conn.events)
        assert "close-notify" in text and f"({expected})" in text

    run_stack(run, pki, tls_version, tmp_path, [], body, proxy_keylog=proxy_keylog)


def test_wrong_key_log_falls_back_to_position(pki: Pki, run: Runner, tmp_path: Path) -> None:
    """A key log without this connection's secrets: the proxy says so and
    follows by position (TLS 1.3)."""

    async def body(s: Stack) -> None:
        s.keylog = tmp_path / "other.log"  # the client writes elsewhere
        (tmp_path / "keys.log").write_text("# nothing for this connection\n")
        await s.starttls()
        assert await s.command(b"STOPTLS\r\n") == b"220 bye tls\r\n"
        assert (await s.t.unwrap(timeout=WAIT)).resumed
        assert await s.client.line() == b"220 hello again\r\n"
        await s.conn.wait_point(Point.FIRST_PLAINTEXT_AFTER_TLS.value, S2C, WAIT)
        notes = [e for e in s.conn.events if "falling back to position" in e.detail]
        assert notes and notes[0].method == "position"
        for d in (C2S, S2C):
            assert {e.method for e in close_notify_events(s.conn, d)} == {"position"}

    run_stack(run, pki, "1.3", tmp_path, [], body)


# ---------------------------------------------------------------- the faults


async def stoptls_then_unwrap(s: Stack) -> BaseException:
    """Ask for STOPTLS, start the closure, return how the client's unwrap failed."""
    await s.starttls()
    assert await s.command(b"STOPTLS\r\n") == b"220 bye tls\r\n"
    try:
        await s.t.unwrap(timeout=WAIT)
    except (ConnectionError, asyncio.TimeoutError) as exc:
        return exc
    raise AssertionError("the closure completed despite the fault")


def handled_after(toy: ToyServer, command: bytes) -> List[Tuple[str, bytes]]:
    lines = [line for _, line in toy.handled]
    return toy.handled[lines.index(command) + 1 :] if command in lines else []


@pytest.mark.parametrize("proxy_keylog", [True, False], ids=["keylog", "no-keylog"])
def test_drop_close_notify_c2s_with_plaintext(
    pki: Pki, tls_version: str, run: Runner, tmp_path: Path, proxy_keylog: bool
) -> None:
    """The client's close_notify never arrives; plaintext comes instead: the
    server refuses it (R2: it is still in TLS) and never answers it."""

    async def body(s: Stack) -> None:
        await stoptls_then_unwrap(s)
        exc = await asyncio.wait_for(s.toy.lost, WAIT)
        assert lost_rule(exc) in ("R2", "R3")
        assert handled_after(s.toy, b"STOPTLS") == []
        conn = s.conn
        drop = [e for e in conn.events if e.kind == "fault" and e.action == "drop"]
        assert drop and drop[0].direction == C2S
        injected = [e for e in conn.events if e.kind == "injected"]
        assert [e.data for e in injected] == [b"NOOP\r\n"]
        assert conn.writes(C2S)[-1] == b"NOOP\r\n"
        dropped = close_notify_events(conn, C2S)[0].data
        assert dropped not in conn.sent(C2S)

    fault = "drop-close-notify-c2s:data=NOOP\\r\\n"
    run_stack(run, pki, tls_version, tmp_path, [fault], body, proxy_keylog=proxy_keylog)


def test_inject_after_close_c2s(pki: Pki, tls_version: str, run: Runner, tmp_path: Path) -> None:
    """close_notify and plaintext in one segment: the server sees a peer that
    did not wait for its answer (R4) and interprets nothing."""

    async def body(s: Stack) -> None:
        await stoptls_then_unwrap(s)
        exc = await asyncio.wait_for(s.toy.lost, WAIT)
        assert lost_rule(exc) == "R4"
        assert handled_after(s.toy, b"STOPTLS") == []
        close = close_notify_events(s.conn, C2S)[0]
        assert close.data + b"NOOP\r\n" in s.conn.writes(C2S)  # one write, one segment

    run_stack(run, pki, tls_version, tmp_path, ["inject-after-close:c2s"], body)


def test_drop_close_notify_s2c_with_fake_greeting(
    pki: Pki, tls_version: str, run: Runner, tmp_path: Path
) -> None:
    """The server's close_notify is replaced by a plaintext greeting: the
    client, still waiting for the close_notify, refuses it (R3)."""

    async def body(s: Stack) -> None:
        exc = await stoptls_then_unwrap(s)
        assert lost_rule(exc) == "R3", exc
        assert isinstance(exc, ConnectionEnded) and b"fake" in getattr(exc.event, "data", b"")
        lines = []
        while not s.client.queue.empty():
            lines.append(s.client.queue.get_nowait())
        assert not [x for x in lines if isinstance(x, bytes) and b"fake" in x]
        assert [e.data for e in s.conn.events if e.kind == "injected"] == [b"220 fake greeting\r\n"]

    fault = "drop-close-notify:s2c:data=220 fake greeting\\r\\n"
    run_stack(run, pki, tls_version, tmp_path, [fault], body)


@pytest.mark.parametrize("direction", [C2S, S2C])
def test_truncate(pki: Pki, tls_version: str, run: Runner, tmp_path: Path, direction: str) -> None:
    """FIN instead of the first application record: the receiver reports a
    truncation (R6) and resumes nothing."""

    async def body(s: Stack) -> None:
        await s.starttls()
        s.t.write(b"NOOP\r\n")
        if direction == C2S:
            exc = await asyncio.wait_for(s.toy.lost, WAIT)
            assert handled_after(s.toy, b"STARTTLS") == []
        else:
            exc = await asyncio.wait_for(s.client.lost, WAIT)
            assert await s.client.line() is exc  # no reply line came through
        assert lost_rule(exc) == "R6", exc
        fin = [e for e in s.conn.events if e.kind == "fin-sent"]
        assert fin[0].direction == direction
        assert [e for e in s.conn.events if e.kind == "fault" and e.action == "fin"]

    run_stack(run, pki, tls_version, tmp_path, [f"truncate-{direction}"], body)


def test_reset_c2s(pki: Pki, tls_version: str, run: Runner, tmp_path: Path) -> None:
    """RST instead of the first application record: truncation too (R6)."""

    async def body(s: Stack) -> None:
        await s.starttls()
        s.t.write(b"NOOP\r\n")
        exc = await asyncio.wait_for(s.toy.lost, WAIT)
        assert lost_rule(exc) == "R6", exc
        assert [e for e in s.conn.events if e.kind == "rst-sent" and e.direction == C2S]

    run_stack(run, pki, tls_version, tmp_path, ["reset-c2s"], body)


def test_corrupt_c2s(pki: Pki, tls_version: str, run: Runner, tmp_path: Path) -> None:
    """A flipped MAC/tag byte: bad_record_mac, the server aborts (R2)."""

    async def body(s: Stack) -> None:
        await s.starttls()
        s.t.write(b"NOOP\r\n")
        exc = await asyncio.wait_for(s.toy.lost, WAIT)
        assert lost_rule(exc) == "R2", exc
        assert handled_after(s.toy, b"STARTTLS") == []
        record = s.conn.units(C2S, Point.HANDSHAKE_DONE.value)[0].data
        sent = s.conn.writes(C2S)
        assert record not in sent
        assert record[:-1] + bytes([record[-1] ^ 0xFF]) in sent

    run_stack(run, pki, tls_version, tmp_path, ["corrupt-c2s"], body)


def test_duplicate_record_s2c(pki: Pki, tls_version: str, run: Runner, tmp_path: Path) -> None:
    """A replayed record fails authentication at the client (R2)."""

    async def body(s: Stack) -> None:
        await s.starttls()
        assert await s.command(b"NOOP\r\n") == b"250 ok\r\n"
        exc = await asyncio.wait_for(s.client.lost, WAIT)
        assert lost_rule(exc) == "R2", exc
        record = s.conn.units(S2C, Point.HANDSHAKE_DONE.value)[0].data
        assert s.conn.writes(S2C).count(record) == 2

    run_stack(run, pki, tls_version, tmp_path, ["duplicate-record-s2c"], body)


def test_inject_after_starttls_both_ways(
    pki: Pki, tls_version: str, run: Runner, tmp_path: Path
) -> None:
    """A command in the STARTTLS segment (CVE-2011-0411): the server refuses
    it (R1) without interpreting it."""

    async def body(s: Stack) -> None:
        s.t.hold_after(lambda line: line[3:4] == b" ", once=True)
        s.t.write(b"STARTTLS\r\n")
        exc = await asyncio.wait_for(s.toy.lost, WAIT)
        assert lost_rule(exc) == "R1"
        assert handled_after(s.toy, b"STARTTLS") == []
        assert b"STARTTLS\r\nNOOP\r\n" in s.conn.writes(C2S)

    run_stack(run, pki, tls_version, tmp_path, ["inject-after-starttls:c2s"], body)


def test_response_injection_s2c(pki: Pki, tls_version: str, run: Runner, tmp_path: Path) -> None:
    """An extra answer after the STARTTLS reply: the client refuses it (R1)."""

    async def body(s: Stack) -> None:
        with pytest.raises(ConnectionEnded) as info:
            await s.starttls()
        assert info.value.rule == "R1"
        assert b"250 injected" in getattr(info.value.event, "data", b"")

    run_stack(run, pki, tls_version, tmp_path, ["inject-after-starttls-s2c"], body)


def test_split_coalesce_delay_keep_a_conforming_exchange(
    pki: Pki, tls_version: str, run: Runner, tmp_path: Path
) -> None:
    """Segmentation and timing faults change the wire, not the outcome."""
    faults = [
        "split-starttls",
        "split-client-hello:split_at=1",
        "coalesce-close-notify-s2c",
        "delay-close-notify-c2s:delay=0.05",
        "split@handshake-done:s2c:split_at=-1",
    ]

    async def body(s: Stack) -> None:
        await s.starttls()
        assert await s.command(b"NOOP\r\n") == b"250 ok\r\n"
        assert await s.command(b"STOPTLS\r\n") == b"220 bye tls\r\n"
        assert (await s.t.unwrap(timeout=WAIT)).resumed
        assert await s.client.line() == b"220 hello again\r\n"
        assert await s.command(b"NOOP\r\n") == b"250 ok\r\n"
        assert not s.t.violations and not s.toy.t.violations
        conn = s.conn
        for d in (C2S, S2C):  # same bytes, other cuts
            assert conn.sent(d) == conn.received(d)
        c2s = conn.writes(C2S)
        assert b"STAR" in c2s and b"TTLS\r\n" in c2s
        hello = conn.units(C2S, Point.CLIENT_HELLO.value)[0].data
        assert hello[:1] in c2s and hello[1:] in c2s
        close_s2c = close_notify_events(conn, S2C)[0].data
        assert close_s2c + b"220 hello again\r\n" in conn.writes(S2C)
        first_app = conn.units(S2C, Point.HANDSHAKE_DONE.value)[0].data
        assert first_app[:-1] in conn.writes(S2C) and first_app[-1:] in conn.writes(S2C)
        close_c2s = close_notify_events(conn, C2S)[0]
        sent = [e for e in conn.events if e.kind == "sent" and e.data == close_c2s.data]
        # uvloop's clock counts whole milliseconds: allow for its rounding.
        assert sent and sent[0].time - close_c2s.time >= 0.05 - 0.002

    run_stack(run, pki, tls_version, tmp_path, faults, body)


# ------------------------------------------------------------- robustness


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_upstream_unreachable_closes_client(run: Runner) -> None:
    async def body() -> None:
        proxy = await Proxy.start(("127.0.0.1", 0), ("127.0.0.1", free_port()))
        reader, writer = await asyncio.open_connection(*proxy.address)
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        conn = await proxy.connection(0)
        error = await conn.wait_for(lambda e: e.kind == "error", WAIT)
        assert "unreachable" in error.detail
        await conn.wait_closed(WAIT)
        with pytest.raises(EventNotSeen):
            await conn.wait_for(lambda e: e.kind == "record", WAIT)
        writer.close()
        proxy.close()
        await proxy.wait_closed()

    run(body)


def test_connection_limit(run: Runner) -> None:
    async def body() -> None:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 hi\r\n")
            await reader.read()
            writer.close()

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        proxy = await Proxy.start(("127.0.0.1", 0), ("127.0.0.1", port), max_connections=1)
        r1, w1 = await asyncio.open_connection(*proxy.address)
        assert await asyncio.wait_for(r1.readline(), WAIT) == b"220 hi\r\n"
        r2, w2 = await asyncio.open_connection(*proxy.address)
        assert await asyncio.wait_for(r2.read(), WAIT) == b""
        assert proxy.refused == 1
        for w in (w1, w2):
            w.close()
        proxy.close()
        await proxy.wait_closed()
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)

    run(body)


def test_run_proxy_prints_events(run: Runner) -> None:
    async def body() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 hi\r\n")
            assert await reader.readline() == b"QUIT\r\n"
            writer.write(b"221 bye\r\n")
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        out = io.StringIO()
        stop = asyncio.Event()
        started: asyncio.Future[Proxy] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(
            run_proxy(
                "127.0.0.1:0",
                f"127.0.0.1:{port}",
                "smtp",
                ["drop-fin-c2s"],
                None,
                out,
                stop=stop,
                on_start=started.set_result,
            )
        )
        proxy = await asyncio.wait_for(started, WAIT)
        assert f"listening on 127.0.0.1:{proxy.address[1]}" in out.getvalue()
        reader, writer = await asyncio.open_connection(*proxy.address)
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"220 hi\r\n"
        writer.write(b"QUIT\r\n")
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"221 bye\r\n"
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()
        stop.set()
        assert await asyncio.wait_for(task, WAIT) is proxy
        text = out.getvalue()
        assert "fault: drop@eof:c2s" in text
        assert "s2c plaintext plaintext 8 bytes '220 hi\\r\\n'" in text
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)

    run(body)


# ------------------------------------------------------------- fault specs


def test_parse_fault_names() -> None:
    f = parse_fault("drop-close-notify-c2s")
    assert (f.direction, f.at, f.action, f.data) == (C2S, "close-notify", "drop", b"")
    assert parse_fault("drop-close-notify:s2c").direction == S2C
    f = parse_fault("inject-after-close:s2c:data=220 fake\\r\\n")
    assert (f.direction, f.action, f.data, f.same_segment) == (S2C, "inject", b"220 fake\r\n", True)
    assert parse_fault("inject-after-close").data == b"NOOP\r\n"
    f = parse_fault("truncate:c2s")
    assert (f.action, f.at) == ("fin", "handshake-done")
    assert parse_fault("truncate-s2c").direction == S2C
    f = parse_fault("delay@close-notify:s2c:delay=0.5:nth=2")
    assert (f.action, f.delay, f.nth, f.direction) == ("delay", 0.5, 2, S2C)
    f = parse_fault("inject@starttls-command:c2s:same_segment=no:data=A:B\\x00")
    assert f.data == b"A:B\x00" and not f.same_segment
    assert parse_fault(str(f)) == replace_name(f)
    for name in FAULT_NAMES:
        needs_direction = "needs :c2s or :s2c" in FAULT_NAMES[name]
        text = f"{name}:c2s" if needs_direction else name
        if "(s2c)" in FAULT_NAMES[name]:
            text = name
        fault = parse_fault(text)
        assert fault.at in POINTS and fault.action in ACTIONS
    for name in (
        "drop-close-notify-c2s",
        "drop-close-notify-s2c",
        "inject-after-close",
        "truncate-c2s",
        "truncate-s2c",
    ):
        assert name in FAULT_NAMES


def replace_name(f: Fault) -> Fault:
    return Fault(
        f.direction, f.at, f.action, f.data, f.same_segment, f.delay, f.split_at, f.nth, f.before
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("drop-the-lot", "valid fault names: "),
        ("truncate", "needs a direction"),
        ("truncate-c2s:s2c", "two directions"),
        ("drop@nowhere:c2s", "valid fault names"),
        ("delay@close-notify:c2s:delay=soon", "could not convert"),
        ("split-client-hello:s2c", "only exists for c2s"),
        ("inject@eof:c2s", "needs data"),
        ("truncate-c2s:colour=red", "unknown fault option"),
        ("truncate-c2s:bogus", "bad fault option"),
    ],
)
def test_parse_fault_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_fault(text)
    assert message in str(info.value)
    if message == "valid fault names: ":
        assert "drop-close-notify-c2s" in str(info.value) and "close-notify" in str(info.value)


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="direction"):
        Fault("up", "close-notify", "drop")
    with pytest.raises(ValueError, match="valid points"):
        Fault(C2S, "somewhere", "drop")
    with pytest.raises(ValueError, match="valid actions"):
        Fault(C2S, "eof", "explode")


# ------------------------------------------------------- sans-I/O follower

Chunk = Tuple[str, bytes]


def in_memory_transcript(pki: Pki, version: str, keylog: Path, dialect: str) -> List[Chunk]:
    """A STARTTLS / STOPTLS / STARTTLS conversation between two engines, as
    the wire saw it: (direction, bytes) per write, in order."""
    client, server = Connection(), Connection()
    wire: List[Chunk] = []

    def pump() -> None:
        moved = True
        while moved:
            moved = False
            for src, dst, d in ((client, server, C2S), (server, client, S2C)):
                data = src.data_to_send()
                if data:
                    moved = True
                    wire.append((d, data))
                    dst.receive_data(data)

    smtp = dialect == "smtp"
    greet = b"220 hi\r\n" if smtp else b"* OK hi\r\n"

    def say(conn: Connection, line: bytes) -> None:
        conn.send_data(line)
        pump()

    def starttls(tag: bytes) -> None:
        say(client, b"STARTTLS\r\n" if smtp else tag + b" STARTTLS\r\n")
        server.send_data(b"220 go\r\n" if smtp else tag + b" OK begin TLS\r\n")
        server.start_tls(pki.server_context(version), server_side=True)
        pump()
        client.start_tls(
            pki.client_context(version, keylog), server_side=False, server_hostname="localhost"
        )
        pump()

    say(server, greet)
    say(client, b"NOOP\r\n" if smtp else b"a1 NOOP\r\n")
    say(server, b"250 ok\r\n" if smtp else b"a1 OK done\r\n")
    starttls(b"a2")
    say(client, b"NOOP\r\n" if smtp else b"a3 NOOP\r\n")
    say(server, b"250 ok\r\n" if smtp else b"a3 OK done\r\n")
    say(client, b"STOPTLS\r\n" if smtp else b"a4 STOPTLS\r\n")
    server.send_data(b"220 bye tls\r\n" if smtp else b"a4 OK begin TLS closure\r\n")
    server.accept_unwrap()
    pump()
    client.unwrap()
    pump()
    say(server, b"220 hello again\r\n" if smtp else b"* OK hello again\r\n")
    starttls(b"a5")
    say(client, b"QUIT\r\n" if smtp else b"a6 LOGOUT\r\n")
    assert not [e for e in client.transcript if e.kind == "raw"]
    return wire


def follow(follower: Follower, chunks: Sequence[Chunk]) -> List[Unit]:
    units: List[Unit] = []
    for d, data in chunks:
        units += follower.feed(d, data)
    units += follower.feed_eof(C2S) + follower.feed_eof(S2C)
    return units


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
@pytest.mark.parametrize("with_keylog", [True, False], ids=["keylog", "no-keylog"])
def test_follower_chunking_does_not_matter(
    pki: Pki, tls_version: str, tmp_path: Path, dialect: str, with_keylog: bool
) -> None:
    keylog = tmp_path / "keys.log"
    wire = in_memory_transcript(pki, tls_version, keylog, dialect)
    lump = follow(Follower(dialect, keylog if with_keylog else None), wire)
    bytewise = [(d, data[i : i + 1]) for d, data in wire for i in range(len(data))]
    single = follow(Follower(dialect, keylog if with_keylog else None), bytewise)
    assert single == lump
    assert [u.index for u in lump] == list(range(1, len(lump) + 1))
    # Every byte comes out again, in order, in units.
    for d in (C2S, S2C):
        assert b"".join(u.data for u in lump if u.direction == d) == b"".join(
            data for dd, data in wire if dd == d
        )

    method = "record-type" if tls_version == "1.2" else ("keylog" if with_keylog else "position")

    def where(point: Point) -> List[Tuple[str, str]]:
        return [(u.direction, u.kind) for u in lump if point.value in u.points]

    assert where(Point.STARTTLS_COMMAND) == [(C2S, "plaintext")] * 2
    assert where(Point.STARTTLS_REPLY) == [(S2C, "plaintext")] * 2
    assert where(Point.CLIENT_HELLO) == [(C2S, "record")] * 2
    assert where(Point.CLOSE_NOTIFY) == [(C2S, "record"), (S2C, "record")]
    assert {u.method for u in lump if Point.CLOSE_NOTIFY.value in u.points} == {method}
    assert where(Point.FIRST_PLAINTEXT_AFTER_TLS) == [(S2C, "plaintext"), (C2S, "plaintext")]
    assert (S2C, "record") in where(Point.HANDSHAKE_DONE)
    reply = where(Point.STOPTLS_REPLY)
    assert reply == [(S2C, "record" if method == "keylog" else "note")]
    eof = next(u for u in lump if u.kind == "eof")
    assert eof.detail.startswith("FIN while TLS is up") or method == "position"
    follower = Follower(dialect, keylog if with_keylog else None)
    follow(follower, wire)
    assert follower.cycles == 1 and follower.phase == "tls"


def test_follower_position_inference_from_plaintext(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a key log, when no record has the size of an encrypted alert,
    the last record before plaintext is taken for close_notify (a note)."""
    import starttls_harness.proxy.session

    wire = in_memory_transcript(pki, "1.3", tmp_path / "k.log", "smtp")
    monkeypatch.setattr(
        starttls_harness.proxy.session.Session, "tag_length", property(lambda self: 99)
    )
    units = follow(Follower("smtp"), wire)
    notes = [u for u in units if u.kind == "note" and Point.CLOSE_NOTIFY.value in u.points]
    assert [(u.direction, u.method) for u in notes] == [(S2C, "position"), (C2S, "position")]
    assert "inferred by position" in notes[0].detail
    first = [u for u in units if Point.FIRST_PLAINTEXT_AFTER_TLS.value in u.points]
    assert [u.data for u in first] == [b"220 hello again\r\n", b"STARTTLS\r\n"]


def test_follower_plaintext_in_tls_and_truncation(pki: Pki, tmp_path: Path) -> None:
    keylog = tmp_path / "k.log"
    wire = in_memory_transcript(pki, "1.3", keylog, "smtp")
    cut = next(i for i, (d, data) in enumerate(wire) if d == C2S and data.startswith(b"\x17"))
    follower = Follower("smtp", keylog)
    units = follow(follower, [*wire[: cut + 1], (C2S, b"NOOP\r\n")])
    injected = [u for u in units if u.data == b"NOOP\r\n" and u.phase == "tls"]
    assert injected and Point.PLAINTEXT_IN_TLS.value in injected[0].points
    eof = next(u for u in units if u.kind == "eof" and u.direction == C2S)
    assert "truncation" in eof.detail and eof.method == "keylog"
    assert Follower("smtp").flush(C2S) == []
    partial = Follower("smtp")
    assert partial.feed(C2S, b"HELO") == [] and partial.has_partial_plaintext(C2S)
    (unit,) = partial.flush(C2S)
    assert unit.data == b"HELO" and "incomplete" in unit.detail
    with pytest.raises(ValueError, match="unknown dialect"):
        Follower("gopher")
