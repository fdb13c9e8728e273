"""The framer contract of every binary or XML dialect, under hypothesis.

Arbitrary bytes (real units of either direction glued to junk, or junk
alone) cut at arbitrary places give the same units as one lump and as single
bytes, never raise, and never leave a unit's worth buffered: the contract of
:class:`~starttls_harness.tls.framing.Framer`, for the PostgreSQL and XMPP
framers alike.  The dialects' own framing tests (``test_postgres_framing``,
``test_xmpp_framing``) take the helpers and the streams from here.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starttls_harness.dialects import postgres as pg
from starttls_harness.dialects.xmpp import (
    DOMAIN,
    XMPP,
    XmppFramer,
    chat_message,
    features,
    iq_ping,
    receipt,
    stream_error,
    stream_header,
)
from starttls_harness.tls.framing import Framer

RANDOM = bool(os.environ.get("STARTTLS_HARNESS_RANDOM"))


def bounded(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def cut_at(data: bytes, offsets: Sequence[int]) -> List[bytes]:
    points = sorted({0, len(data), *(min(o, len(data)) for o in offsets)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def stream(framer: Framer, chunks: Sequence[bytes]) -> Tuple[List[bytes], bytes]:
    """Feed ``chunks`` as the contract says, checking it at every step."""
    units: List[bytes] = []
    pending = b""
    for chunk in chunks:
        pending += chunk
        got, used = framer.split(pending)
        assert 0 <= used <= len(pending)
        assert b"".join(got) == pending[:used]
        assert all(0 < len(u) <= framer.max_unit for u in got)
        units += got
        pending = pending[used:]
        assert len(pending) < framer.max_unit
    return units, pending


#: Real frontend and backend messages, in any order, glued to junk or not.
MESSAGES = st.sampled_from(
    [
        pg.ssl_request(),
        b"S",
        b"N",
        pg.startup({"user": "postgres", "database": "postgres"}),
        pg.query("SELECT 1"),
        pg.query("SELECT '" + "x" * 300 + "'"),
        pg.terminate(),
        pg.auth(0),
        pg.auth(3),
        pg.session_start(),
        pg.select_result(b"row"),
        pg.error_response("FATAL", "08P01", "received unencrypted data after SSL request"),
    ]
)
PGISH = st.one_of(st.lists(MESSAGES, max_size=12).map(b"".join), st.binary(max_size=500))
#: Real elements of either direction, in any order, glued to junk or not.
ELEMENTS = [
    stream_header(to=DOMAIN),
    stream_header(sender=DOMAIN, stream_id="abc"),
    features(starttls=True, required=True),
    features(mechanisms=("PLAIN", "SCRAM-SHA-1"), bind=True),
    XMPP.starttls(),
    b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
    iq_ping("a'b>c"),
    chat_message("m1", "tester@localhost", "x > y & <z> " * 20),
    receipt("m1"),
    b"<message><body><![CDATA[</body> <x>]]></body></message>",
    b" \n",
    stream_error("not-well-formed")[: -len(b"</stream:stream>")],
    b"</stream:stream>",
]
XMLISH = st.one_of(
    st.lists(st.sampled_from(ELEMENTS), max_size=12).map(b"".join),
    st.binary(max_size=500),
    st.lists(st.sampled_from([b"<", b">", b"/", b"a", b"'", b"<?", b"?>", b"<!", b" "]),
             max_size=80).map(b"".join),
)  # fmt: skip
OFFSETS = st.lists(st.integers(0, 3000), max_size=30)

#: Per dialect: a framer with a given unit bound, and the streams to cut.
FRAMERS: Dict[str, Tuple[Callable[[int], Framer], st.SearchStrategy[bytes]]] = {
    "postgres": (pg.PostgresFramer, PGISH),
    "xmpp": (XmppFramer, XMLISH),
}


@pytest.mark.parametrize("name", FRAMERS)
@bounded(400)
@given(draw=st.data(), offsets=OFFSETS, limit=st.integers(1, 600))
def test_any_bytes_any_cuts_same_units(
    name: str, draw: st.DataObject, offsets: List[int], limit: int
) -> None:
    framer, streams = FRAMERS[name]
    data = draw.draw(streams, label="data")
    lump = stream(framer(limit), [data])
    cut = stream(framer(limit), cut_at(data, offsets))
    bytewise = stream(framer(limit), [data[i : i + 1] for i in range(len(data))])
    assert lump == cut == bytewise
    units, rest = lump
    assert b"".join(units) + rest == data
