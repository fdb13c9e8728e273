"""The framer seam: :mod:`starttls_harness.tls.framing` and its two users.

* :class:`LineFramer` under hypothesis: arbitrary bytes cut at arbitrary
  places give the same units as one lump, never raise, never leave more than
  ``max_unit`` bytes buffered, and the units are exactly the bytes consumed.
* A toy framer of another shape (a 2-byte big-endian length, then the
  payload) stands for a binary dialect: the engine's R1 hold gate and the
  proxy's follower (sans-I/O and through a real proxy on loopback) cut by it
  and not by line ends.
"""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any, Callable, List, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starttls_harness.proxy import C2S, S2C, Follower, Point, Proxy, Unit
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import (
    Connection,
    Event,
    PlaintextData,
    Rule,
    violations,
)
from starttls_harness.tls.framing import DEFAULT_MAX_UNIT, Framer, LineFramer, line_framer

Runner = Callable[..., Any]
Chunk = Tuple[str, bytes]
WAIT = 5.0  # bound of every wait in these tests (a setting, never a sleep)
RANDOM = bool(os.environ.get("STARTTLS_HARNESS_RANDOM"))


def bounded(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------ the toy


class PrefixFramer(Framer):
    """A unit is a 2-byte big-endian payload length and the payload.

    The toy binary dialect of these tests: its payloads may hold ``\\n``
    anywhere, so a line framer would cut them wrong.
    """

    def __init__(self, max_unit: int = DEFAULT_MAX_UNIT) -> None:
        self.max_unit = max_unit

    def split(self, data: bytes) -> Tuple[List[bytes], int]:
        units: List[bytes] = []
        start = 0
        while len(data) - start >= 2:
            size = 2 + struct.unpack_from("!H", data, start)[0]
            size = min(size, self.max_unit)  # an over-long unit is cut at the limit
            if len(data) - start < size:
                break
            units.append(data[start : start + size])
            start += size
        return units, start


def unit(payload: bytes) -> bytes:
    """``payload`` as one toy unit."""
    return struct.pack("!H", len(payload)) + payload


def is_starttls(u: bytes) -> bool:
    return u[2:] == b"STARTTLS"


def is_go(u: bytes) -> bool:
    return u[2:] == b"GO"


# ------------------------------------------------------- framer properties


def cut_at(data: bytes, offsets: Sequence[int]) -> List[bytes]:
    """``data`` cut at ``offsets`` (any order, repeats and ends allowed)."""
    points = sorted({0, len(data), *(min(o, len(data)) for o in offsets)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def stream(framer: Framer, chunks: Sequence[bytes]) -> Tuple[List[bytes], bytes]:
    """Feed ``chunks`` the way the contract says (keep ``data[used:]``, append,
    split again), checking the contract at every step; the units and the rest."""
    units: List[bytes] = []
    pending = b""
    for chunk in chunks:
        pending += chunk
        got, used = framer.split(pending)
        assert 0 <= used <= len(pending)
        assert b"".join(got) == pending[:used]  # the units are the bytes consumed
        assert all(0 < len(u) <= framer.max_unit for u in got)
        units += got
        pending = pending[used:]
        assert len(pending) < framer.max_unit  # never buffers a whole unit's worth
    return units, pending


def reference_lines(data: bytes, max_unit: int) -> Tuple[List[bytes], bytes]:
    """LineFramer's units, byte by byte: a unit ends at LF or at ``max_unit``."""
    units: List[bytes] = []
    current = bytearray()
    for byte in data:
        current.append(byte)
        if byte == 0x0A or len(current) == max_unit:
            units.append(bytes(current))
            current.clear()
    return units, bytes(current)


#: Bytes rich in line ends (CRLF, bare LF, bare CR) and arbitrary binary.
LINEISH = st.lists(
    st.one_of(st.binary(max_size=24), st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n"])),
    max_size=40,
).map(b"".join)
OFFSETS = st.lists(st.integers(0, 2000), max_size=30)


@bounded(400)
@given(data=st.one_of(LINEISH, st.binary(max_size=600)), offsets=OFFSETS, limit=st.integers(1, 64))
def test_line_framer_any_bytes_any_cuts(data: bytes, offsets: List[int], limit: int) -> None:
    lump, lump_rest = stream(LineFramer(limit), [data])
    cut, cut_rest = stream(LineFramer(limit), cut_at(data, offsets))
    bytewise, byte_rest = stream(LineFramer(limit), [data[i : i + 1] for i in range(len(data))])
    assert (lump, lump_rest) == (cut, cut_rest) == (bytewise, byte_rest)
    assert (lump, lump_rest) == reference_lines(data, limit)
    assert b"".join(lump) + lump_rest == data
    assert b"\n" not in lump_rest
    for u in lump:  # a unit ends at its line end, or is cut at the limit
        assert u.endswith(b"\n") or len(u) == limit
        assert b"\n" not in u[:-1]


def test_line_framer_defaults() -> None:
    framer = line_framer()
    assert isinstance(framer, LineFramer) and framer.max_unit == DEFAULT_MAX_UNIT
    assert framer.split(b"") == ([], 0)
    assert framer.split(b"EHLO x\r\nMAIL") == ([b"EHLO x\r\n"], 8)
    long = b"x" * (DEFAULT_MAX_UNIT + 3)
    assert framer.split(long) == ([long[:DEFAULT_MAX_UNIT]], DEFAULT_MAX_UNIT)


@bounded(200)
@given(
    payloads=st.lists(st.binary(max_size=40), max_size=12),
    tail=st.binary(max_size=6),
    offsets=OFFSETS,
)
def test_toy_framer_keeps_the_contract(
    payloads: List[bytes], tail: bytes, offsets: List[int]
) -> None:
    """The toy is a proper framer (else the tests below would prove nothing)."""
    data = b"".join(unit(p) for p in payloads) + tail
    units, rest = stream(PrefixFramer(), cut_at(data, offsets))
    assert units[: len(payloads)] == [unit(p) for p in payloads]
    assert b"".join(units) + rest == data


# ------------------------------------------------------------ engine gate

#: What a client of the toy dialect writes in one segment: a message with
#: line ends inside, the upgrade command, and a command injected after it.
TOY_C2S = unit(b"HELO\r\nlines\ninside") + unit(b"STARTTLS") + unit(b"INJECTED\r\n")


def delivered(events: List[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, PlaintextData))


@pytest.mark.parametrize("chunk", [None, 1, 3], ids=["lump", "bytewise", "by3"])
def test_engine_hold_gate_cuts_with_the_dialect_framer(
    pki: Pki, tls_version: str, chunk: Optional[int]
) -> None:
    """The gate fires on the toy unit and holds what follows it: R1."""
    server = Connection()
    server.hold_after(is_starttls, framer=PrefixFramer())
    step = chunk or len(TOY_C2S)
    got = b"".join(
        delivered(server.receive_data(TOY_C2S[i : i + step])) for i in range(0, len(TOY_C2S), step)
    )
    assert got == unit(b"HELO\r\nlines\ninside") + unit(b"STARTTLS")
    assert server.held == unit(b"INJECTED\r\n")
    events = server.start_tls(pki.server_context(tls_version), server_side=True)
    assert [(v.rule, v.data) for v in violations(events)] == [(Rule.R1, unit(b"INJECTED\r\n"))]


def test_engine_hold_gate_line_framer_does_not_see_toy_units() -> None:
    """Counter-check: cut by lines, the same bytes never show the trigger unit."""
    server = Connection()
    server.hold_after(is_starttls)
    assert delivered(server.receive_data(TOY_C2S)) == TOY_C2S
    assert server.held == b""


@bounded(150)
@given(offsets=OFFSETS)
def test_engine_hold_gate_any_cuts(offsets: List[int]) -> None:
    """A client arms the gate on the toy answer: delivery does not follow TCP."""
    client = Connection()
    client.hold_after(is_go, once=True, framer=PrefixFramer())
    client.send_data(unit(b"STARTTLS"))
    wire = unit(b"OK\nnot yet") + unit(b"GO") + unit(b"ANSWER INJECTED")
    got = b"".join(delivered(client.receive_data(piece)) for piece in cut_at(wire, offsets))
    assert got == unit(b"OK\nnot yet") + unit(b"GO")
    assert client.held == unit(b"ANSWER INJECTED")


# --------------------------------------------------------------- follower


def toy_transcript(pki: Pki, version: str) -> List[Chunk]:
    """Toy-framed plaintext, a TLS session, its closure and plaintext again,
    between two engines whose gates cut by the toy framer: the wire, per write."""
    client, server = Connection(), Connection()
    server.hold_after(is_starttls, framer=PrefixFramer())
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

    def say(conn: Connection, data: bytes) -> None:
        conn.send_data(data)
        pump()

    say(server, unit(b"HI\nthere"))
    client.hold_after(is_go, once=True, framer=PrefixFramer())
    say(client, unit(b"HELO\r\nx") + unit(b"STARTTLS"))
    server.send_data(unit(b"GO"))
    server.start_tls(pki.server_context(version), server_side=True)
    pump()
    client.start_tls(pki.client_context(version), server_side=False, server_hostname="localhost")
    pump()
    say(client, unit(b"SECRET\n"))
    say(server, unit(b"OK"))
    server.accept_unwrap()
    pump()
    client.unwrap()
    pump()
    say(server, unit(b"AGAIN\n\n"))
    say(client, unit(b"BYE"))
    return wire


def follow(follower: Follower, chunks: Sequence[Chunk]) -> List[Unit]:
    units: List[Unit] = []
    for d, data in chunks:
        units += follower.feed(d, data)
    return units + follower.feed_eof(C2S) + follower.feed_eof(S2C)


def plaintext(units: Sequence[Unit], direction: str) -> List[bytes]:
    return [u.data for u in units if u.kind == "plaintext" and u.direction == direction]


def test_follower_cuts_plaintext_with_the_given_framer(pki: Pki, tls_version: str) -> None:
    wire = toy_transcript(pki, tls_version)
    lump = follow(Follower("smtp", framer=PrefixFramer), wire)
    bytewise = [(d, data[i : i + 1]) for d, data in wire for i in range(len(data))]
    assert follow(Follower("smtp", framer=PrefixFramer), bytewise) == lump
    assert plaintext(lump, C2S) == [unit(b"HELO\r\nx"), unit(b"STARTTLS"), unit(b"BYE")]
    assert plaintext(lump, S2C) == [unit(b"HI\nthere"), unit(b"GO"), unit(b"AGAIN\n\n")]
    for d in (C2S, S2C):  # every byte comes out again, in order
        assert b"".join(u.data for u in lump if u.direction == d) == b"".join(
            data for dd, data in wire if dd == d
        )
    # TLS in between is followed as ever: both closures, then plaintext again.
    closes = [u.direction for u in lump if Point.CLOSE_NOTIFY.value in u.points]
    assert sorted(closes) == [C2S, S2C]
    first = [u.data for u in lump if Point.FIRST_PLAINTEXT_AFTER_TLS.value in u.points]
    assert sorted(first) == sorted([unit(b"AGAIN\n\n"), unit(b"BYE")])
    # The default framer cuts the same wire by line ends instead.
    lines = plaintext(follow(Follower("smtp"), wire), S2C)
    assert lines[0] == b"\x00\x08HI\n" and unit(b"GO") not in lines


def test_follower_framer_limit_and_flush() -> None:
    """An incomplete toy unit is flushed whole; an over-long one is cut at
    ``max_line`` (and says so), a unit exactly that long is not."""
    follower = Follower("smtp", max_line=16, framer=PrefixFramer)
    assert follower.feed(C2S, unit(b"half")[:4]) == []
    assert follower.has_partial_plaintext(C2S)
    (fragment,) = follower.flush(C2S)
    assert fragment.data == unit(b"half")[:4] and "incomplete" in fragment.detail
    exact, cut = follower.feed(C2S, unit(b"x" * 14) + unit(b"y" * 20))
    assert exact.data == unit(b"x" * 14) and exact.detail == ""
    assert cut.data == unit(b"y" * 20)[:16] and "cut" in cut.detail
    (rest,) = follower.flush(C2S)  # what is left after the cut is not a unit
    assert rest.data == b"y" * 6


def test_follower_line_limit_note() -> None:
    """The default framer: the same limit, with the same distinction."""
    follower = Follower("smtp", max_line=8)
    exact, cut, tail = follower.feed(C2S, b"1234567\n" + b"abcdefghij\r\n")
    assert (exact.data, exact.detail) == (b"1234567\n", "")
    assert cut.data == b"abcdefgh" and "cut" in cut.detail
    assert (tail.data, tail.detail) == (b"ij\r\n", "")


class StrippingFramer(Framer):
    """A broken framer: it hands out payloads without their prefix."""

    def split(self, data: bytes) -> Tuple[List[bytes], int]:
        units, used = PrefixFramer().split(data)
        return [u[2:] for u in units], used


def test_follower_refuses_units_that_are_not_the_stream() -> None:
    """The proxy relays units as they are: a framer that rewrites bytes would
    corrupt the relay, so the follower refuses it loudly."""
    follower = Follower("smtp", framer=StrippingFramer)
    with pytest.raises(ValueError, match="not the next bytes"):
        follower.feed(C2S, unit(b"NOOP"))


# ------------------------------------------------------------------ proxy


def test_proxy_relays_toy_units_one_write_each(run: Runner) -> None:
    """Through a real proxy on loopback: the client's one segment of three toy
    units reaches the server as three writes, cut by the toy framer."""
    payloads = [b"HELO\r\nlines\ninside", b"NOOP", b"QUIT\n"]

    async def body() -> None:
        received = bytearray()
        done = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(unit(b"HI\nthere"))
            received.extend(await reader.read())
            done.set()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        proxy = await Proxy.start(("127.0.0.1", 0), ("127.0.0.1", port), framer=PrefixFramer)
        reader, writer = await asyncio.open_connection(*proxy.address)
        assert await asyncio.wait_for(reader.readexactly(10), WAIT) == unit(b"HI\nthere")
        writer.write(b"".join(unit(p) for p in payloads))
        writer.write_eof()
        await asyncio.wait_for(done.wait(), WAIT)
        conn = await proxy.connection(0)
        assert bytes(received) == b"".join(unit(p) for p in payloads)
        assert conn.writes(C2S) == [unit(p) for p in payloads]
        assert [e.data for e in conn.units(S2C, kinds=("plaintext",))] == [unit(b"HI\nthere")]
        writer.close()
        proxy.close()
        await proxy.wait_closed()
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)

    run(body)
