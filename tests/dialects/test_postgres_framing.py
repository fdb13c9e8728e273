"""The PostgreSQL framer and reply splitter under hypothesis, and the hold gate that uses them.

* :class:`PostgresFramer` (beside the framer contract in ``test_framers``):
  a stream of real messages is cut at exactly their boundaries, whichever
  way it is segmented; one-byte answers and hostile lengths.
* :meth:`Postgres.split_reply` never raises and finds the same replies
  however the server's stream was cut.
* The engine's R1 hold gate armed with the framer (the server's SSLRequest,
  the client's one-byte answer) holds exactly the bytes after the trigger,
  however they were segmented: the R1 verdict cannot depend on segmentation.
"""

from __future__ import annotations

import struct
from typing import List, Sequence, Tuple

from hypothesis import given
from hypothesis import strategies as st
from starttls_harness.dialects.postgres import (
    POSTGRES,
    PostgresFramer,
    auth,
    error_response,
    query,
    select_result,
    session_start,
    ssl_request,
    startup,
    terminate,
    untyped_code,
)
from starttls_harness.tls.engine import Connection
from test_framers import OFFSETS, bounded, cut_at, stream


def _server_stream(pieces: Sequence[bytes]) -> bytes:
    return b"S" + b"".join(pieces)


@bounded(200)
@given(
    client=st.lists(
        st.sampled_from([query("SELECT 1"), query("SELECT 'a'"), terminate()]), max_size=8
    ),
    offsets=OFFSETS,
)
def test_real_messages_are_cut_at_their_boundaries(client: List[bytes], offsets: List[int]) -> None:
    """The client's stream: SSLRequest, StartupMessage, typed messages."""
    first = [ssl_request(), startup({"user": "u"})]
    data = b"".join(first + client)
    units, rest = stream(PostgresFramer(), cut_at(data, offsets))
    assert units == first + client and rest == b""
    assert untyped_code(units[0]) is not None and untyped_code(units[1]) is not None


def test_one_byte_answers_only_at_the_start_of_a_stream() -> None:
    framer = PostgresFramer()
    assert framer.split(b"NS") == ([b"N", b"S"], 2)  # GSS refused, then SSL accepted
    framer.reset()  # a new TLS session: the backend's first message is typed
    status = b"S\x00\x00\x00\x08a\x00b\x00"
    assert framer.split(auth(0) + status) == ([auth(0), status], len(auth(0)) + len(status))
    assert PostgresFramer().split(b"S" + b"\x16\x03\x03\x00\x10") == ([b"S"], 1)


def test_hostile_lengths_are_cut_never_buffered_without_bound() -> None:
    framer = PostgresFramer(64)
    units, used = framer.split(b"Q\x00\x00\x00\x01rest")  # a length below its own size
    assert units[0] == b"Q\x00\x00\x00\x01" and used >= 5
    huge = b"Q" + struct.pack("!I", 10_000) + b"x" * 200
    units, used = PostgresFramer(64).split(huge)
    assert [len(u) for u in units] == [64, 64, 64] and used == 192


@bounded(200)
@given(buf=st.binary(max_size=400), tag=st.one_of(st.none(), st.just("ssl")))
def test_split_reply_never_raises(buf: bytes, tag: object) -> None:
    reply, rest = POSTGRES.split_reply(buf, tag if isinstance(tag, str) else None)
    if reply is None:
        assert rest == buf
    else:
        assert reply.raw + rest == buf and reply.lines


def _replies(chunks: Sequence[bytes]) -> List[Tuple[Tuple[bytes, ...], bool]]:
    """Replies as the prober reads them: the SSL byte first, then answers."""
    buf = b""
    out: List[Tuple[Tuple[bytes, ...], bool]] = []
    tag = "ssl"
    for chunk in chunks:
        buf += chunk
        while True:
            reply, buf = POSTGRES.split_reply(buf, tag)
            if reply is None:
                break
            out.append((reply.lines, reply.ok))
            tag = ""
    return out


@bounded(200)
@given(offsets=OFFSETS)
def test_replies_do_not_depend_on_segmentation(offsets: List[int]) -> None:
    answers = [
        session_start(),
        select_result(b"starttls-harness sentinel"),
        error_response("ERROR", "42601", "syntax error") + select_result(b"x"),
        error_response("FATAL", "57P01", "terminating connection"),
    ]
    data = _server_stream(answers)
    whole = _replies([data])
    assert [ok for _, ok in whole] == [True, True, True, False, False]
    assert _replies(cut_at(data, offsets)) == whole


@bounded(150)
@given(offsets=OFFSETS, server_side=st.booleans())
def test_hold_gate_holds_the_same_bytes_however_cut(offsets: List[int], server_side: bool) -> None:
    """What arrives after the trigger unit is held whole (R1 decided on the same bytes)."""
    if server_side:
        trigger, after = ssl_request(), startup({"user": "x"}) + query("SELECT 'injected'")
        predicate = POSTGRES.scripted_server().parse
        engine = Connection()
        engine.hold_after(
            lambda unit: predicate(unit, False).kind == "starttls", framer=PostgresFramer()
        )
    else:
        trigger, after = b"S", error_response("FATAL", "28000", "injected")
        engine = Connection()
        engine.hold_after(POSTGRES.final_line_of(ssl_request()), once=True, framer=PostgresFramer())
    delivered = b""
    for chunk in cut_at(trigger + after, offsets):
        for event in engine.receive_data(chunk):
            delivered += getattr(event, "data", b"")
    assert delivered == trigger
    assert engine.held == after
