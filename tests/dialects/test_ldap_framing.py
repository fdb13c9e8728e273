"""The LDAP dialect's BER layer: the framer and the minimal codec.

The framer gets the same properties as the line framer: arbitrary bytes
never make it raise, whatever it cuts is exactly the bytes it reports as
used, and re-segmenting a stream (feeding it in arbitrary pieces, as TCP
may deliver it) never changes the units it finds.
"""

from __future__ import annotations

from typing import List

from hypothesis import given, settings
from hypothesis import strategies as st
from starttls_harness.dialects.ldap import (
    LDAP,
    SEARCH_DONE,
    SEARCH_ENTRY,
    STARTTLS_OID,
    SUCCESS,
    BerFramer,
    extended_request,
    extended_response,
    header,
    integer,
    parse_message,
    response,
    search_entry,
    search_request,
    split_ldap_reply,
    tlv,
)

_MESSAGES = [
    LDAP.hello(),
    LDAP.starttls(),
    LDAP.sentinel(),
    LDAP.injected(),
    LDAP.quit(),
    LDAP.login("cn=tester", "pw"),
    LDAP.state_probe("stoptls"),
    extended_response(2, SUCCESS, oid=STARTTLS_OID),
    search_entry(1, b"", {"supportedExtension": [STARTTLS_OID], "x": [b"y" * 300]}),
    response(1, SEARCH_DONE, SUCCESS),
]


def _feed(framer: BerFramer, pieces: List[bytes]) -> List[bytes]:
    """Units found when the stream arrives in ``pieces`` (the caller keeps the rest)."""
    units: List[bytes] = []
    pending = b""
    for piece in pieces:
        pending += piece
        found, used = framer.split(pending)
        assert b"".join(found) == pending[:used]
        units += found
        pending = pending[used:]
    return units


def _cuts(data: bytes, points: List[int]) -> List[bytes]:
    bounds = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:])] or [b""]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0), max_size=20))
def test_arbitrary_bytes_never_crash_and_segmentation_never_matters(
    data: bytes, points: List[int]
) -> None:
    framer = BerFramer(max_unit=512)
    whole = _feed(framer, [data])
    assert _feed(framer, _cuts(data, points)) == whole
    for unit in whole:
        assert 0 < len(unit) <= 512
        parse_message(unit)  # never raises


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(_MESSAGES), min_size=1, max_size=8),
    st.lists(st.integers(min_value=0), max_size=30),
)
def test_real_messages_are_cut_exactly_however_they_arrive(
    messages: List[bytes], points: List[int]
) -> None:
    stream = b"".join(messages)
    assert _feed(BerFramer(), _cuts(stream, points)) == messages


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=10))
def test_junk_before_a_message_never_hides_it_or_changes_the_verdict(
    junk: bytes, points: List[int]
) -> None:
    """Whatever precedes it, the injected request is found (or swallowed) the same
    way in every segmentation: the prober's verdict cannot depend on TCP."""
    stream = junk + LDAP.injected()
    whole = _feed(BerFramer(), [stream])
    assert _feed(BerFramer(), _cuts(stream, points)) == whole
    if not junk:
        assert whole == [LDAP.injected()]


def test_short_and_long_form_lengths() -> None:
    assert tlv(0x04, b"a" * 5)[:2] == b"\x04\x05"
    assert tlv(0x04, b"a" * 200)[:3] == b"\x04\x81\xc8"
    assert tlv(0x04, b"a" * 300)[:4] == b"\x04\x82\x01\x2c"
    assert header(b"\x30\x82\x01", 0) is None  # incomplete length
    assert integer(128) == b"\x02\x02\x00\x80" and integer(-1) == b"\x02\x01\xff"


def test_a_message_longer_than_the_bound_is_cut_at_the_bound() -> None:
    big = search_entry(9, b"", {"x": [b"z" * 5000]})
    units, used = BerFramer(max_unit=1024).split(big)
    assert units[0] == big[:1024] and used >= 1024
    assert BerFramer(max_unit=1024).split(big[:1000]) == ([], 0)  # waits below the bound


def test_indefinite_length_is_refused_as_junk() -> None:
    units, _used = BerFramer().split(b"\x30\x80\x02\x01\x01\x42\x00\x00\x00")
    assert units[0] == b"\x30\x80" and parse_message(units[0]) is None


def test_the_codec_reads_what_it_writes() -> None:
    start = parse_message(LDAP.starttls())
    assert start is not None and start.name == STARTTLS_OID and start.msgid == 2
    answer = parse_message(extended_response(2, 52, b"later"))
    assert answer is not None and answer.result == 52 and answer.diagnostic == b"later"
    search = parse_message(search_request(3, b"", ["a", "B"]))
    assert search is not None and search.wanted == ("a", "b")
    entry = parse_message(search_entry(1, b"", {"supportedExtension": [STARTTLS_OID]}))
    assert entry is not None and entry.op == SEARCH_ENTRY
    assert entry.attrs == {"supportedextension": (STARTTLS_OID,)}


def test_a_search_answer_is_one_reply_with_its_entries() -> None:
    entry = search_entry(1, b"", {"supportedExtension": [STARTTLS_OID]})
    done = response(1, SEARCH_DONE, SUCCESS)
    reply, rest = split_ldap_reply(entry + done + b"\x30")
    assert reply is not None and reply.lines == (entry, done) and reply.ok and rest == b"\x30"
    assert "STARTTLS" in LDAP.capabilities(reply)
    assert split_ldap_reply(entry + done[:-1]) == (None, entry + done[:-1])
    assert "SearchResultDone id=1 result=0" in reply.text


def test_the_injected_answer_is_recognised_by_its_message_id() -> None:
    reply, _ = split_ldap_reply(response(4, SEARCH_DONE, 32))
    assert reply is not None and LDAP.is_injected_reply(reply)
    sentinel, _ = split_ldap_reply(response(3, SEARCH_DONE, SUCCESS))
    assert sentinel is not None and LDAP.is_sentinel_reply(sentinel)
    assert not LDAP.is_injected_reply(sentinel)
    assert LDAP.proxy_command(LDAP.starttls(), b"STARTTLS") == "2"
    assert LDAP.proxy_command(LDAP.starttls(), b"STOPTLS") is None
    assert LDAP.proxy_answer(extended_response(2, SUCCESS), "2") is True
    assert LDAP.proxy_answer(extended_response(2, 1), "2") is False
    assert LDAP.proxy_answer(LDAP.sentinel(), "2") is None
    assert extended_request(5, b"1.2") != extended_request(5, b"1.2", b"")
