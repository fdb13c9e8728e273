"""The XMPP framer and reply splitter under hypothesis, and the hold gate that uses them.

* :class:`XmppFramer` (beside the framer contract in ``test_framers``): a
  stream of real elements is cut at exactly their boundaries, whichever way
  it is segmented.
* Hostile XML (a DOCTYPE with entities, text at the top, nesting past the
  bound) comes out as units no reader accepts.
* :meth:`Xmpp.split_reply` never raises and finds the same replies however
  the server's stream was cut.
* The engine's R1 hold gate armed with the framer holds exactly the bytes
  after ``<starttls/>`` / ``<proceed/>``, however they were segmented.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from hypothesis import given
from hypothesis import strategies as st
from starttls_harness.dialects.xmpp import (
    DOMAIN,
    XMPP,
    XmppFramer,
    features,
    kind_of,
    parse_unit,
    stream_error,
    stream_header,
)
from starttls_harness.tls.engine import Connection
from test_framers import ELEMENTS, OFFSETS, XMLISH, bounded, cut_at, stream


@bounded(200)
@given(picks=st.lists(st.integers(0, len(ELEMENTS) - 2), max_size=10), offsets=OFFSETS)
def test_real_elements_are_cut_at_their_boundaries(picks: List[int], offsets: List[int]) -> None:
    elements = [ELEMENTS[i] for i in picks if ELEMENTS[i].strip()]
    data = b"".join(elements)
    units, rest = stream(XmppFramer(), cut_at(data, offsets))
    assert units == elements and rest == b""
    assert all(kind_of(parse_unit(u)) != "unreadable" for u in units)


def test_hostile_xml_is_never_read() -> None:
    bomb = b"<!DOCTYPE x [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;'>]>"
    units, _ = XmppFramer().split(bomb + b"<iq type='get' id='x'>&b;</iq>")
    assert kind_of(parse_unit(units[0])) == "unreadable"
    assert kind_of(parse_unit(units[1])) == "unreadable"  # &b; is an unknown entity
    assert kind_of(parse_unit(b"text at the top<iq/>")) == "unreadable"
    units, _ = XmppFramer().split(b"<iq><!-- no comments --></iq>")
    assert kind_of(parse_unit(units[0])) == "unreadable"  # cut at the comment
    deep = b"<a>" * 100 + b"</a>" * 100
    units, _ = XmppFramer(max_depth=10).split(deep)
    assert kind_of(parse_unit(units[0])) == "unreadable"


def test_over_long_units_are_cut_never_buffered_without_bound() -> None:
    framer = XmppFramer(64)
    units, used = framer.split(b"<message><body>" + b"x" * 200)
    assert [len(u) for u in units] == [64, 64, 64] and used == 192


@bounded(200)
@given(buf=XMLISH)
def test_split_reply_never_raises(buf: bytes) -> None:
    reply, rest = XMPP.split_reply(buf)
    if reply is None:
        assert rest == buf
    else:
        assert reply.raw + rest == buf and reply.lines


def _replies(chunks: Sequence[bytes]) -> List[Tuple[Tuple[bytes, ...], bool, str]]:
    buf = b""
    out: List[Tuple[Tuple[bytes, ...], bool, str]] = []
    for chunk in chunks:
        buf += chunk
        while True:
            reply, buf = XMPP.split_reply(buf)
            if reply is None:
                break
            out.append((reply.lines, reply.ok, reply.key))
    return out


@bounded(200)
@given(offsets=OFFSETS)
def test_replies_do_not_depend_on_segmentation(offsets: List[int]) -> None:
    data = (
        stream_header(sender=DOMAIN, stream_id="1")
        + features(starttls=True, required=True)
        + b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
        + b"<iq type='error' id='starttls-harness-sentinel'><error/></iq>"
        + stream_error("policy-violation")
    )
    whole = _replies([data])
    assert [(ok, key) for _, ok, key in whole] == [
        (True, "features"), (True, "proceed"), (True, "iq"), (False, "stream-error"),
        (False, "close"),
    ]  # fmt: skip
    assert _replies(cut_at(data, offsets)) == whole


@bounded(150)
@given(offsets=OFFSETS, server_side=st.booleans())
def test_hold_gate_holds_the_same_bytes_however_cut(offsets: List[int], server_side: bool) -> None:
    """What arrives after the trigger unit is held whole (R1 decided on the same bytes)."""
    engine = Connection()
    if server_side:
        before, trigger, after = XMPP.hello(), XMPP.starttls(), XMPP.injected()
        parse = XMPP.scripted_server().parse
        engine.hold_after(lambda u: parse(u, False).kind == "starttls", framer=XmppFramer())
    else:
        before = stream_header(sender=DOMAIN) + features(starttls=True)
        trigger = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
        after = XMPP.scripted_server().injection(XMPP.scripted_server().parse(trigger, False))
        engine.hold_after(XMPP.final_line_of(XMPP.starttls()), once=True, framer=XmppFramer())
        before = b""  # the prober arms the gate after the features (mid-stream)
    delivered = b""
    for chunk in cut_at(before + trigger + after, offsets):
        for event in engine.receive_data(chunk):
            delivered += getattr(event, "data", b"")
    assert delivered == before + trigger
    assert engine.held == after
