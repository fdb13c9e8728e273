"""Tests for starttls_harness.tls.records on byte streams captured from real TLS sessions."""

from __future__ import annotations

import random
import ssl
from typing import Dict, List

import pytest
import trustme
from starttls_harness.tls.records import (
    CLOSE_NOTIFY,
    CT_ALERT,
    CT_APPLICATION_DATA,
    CT_CHANGE_CIPHER_SPEC,
    CT_HANDSHAKE,
    MAX_RECORD_PAYLOAD,
    NotTLSError,
    Record,
    RecordSplitter,
    describe,
)

PLAINTEXT = b"MAIL FROM:<a@b>\r\n"


def capture_session(version: str) -> Dict[str, bytes]:
    """Every byte each direction sent: handshake, data, close_notify both ways."""
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    for ctx in (server_ctx, client_ctx):
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion[version]
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    captured = {"c2s": bytearray(), "s2c": bytearray()}

    def pump() -> None:
        for direction, src, dst in (("c2s", c_out, s_in), ("s2c", s_out, c_in)):
            data = src.read()
            captured[direction] += data
            dst.write(data)

    def read_all(obj: ssl.SSLObject) -> bytes:
        out = bytearray()
        while True:
            try:
                data = obj.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return bytes(out)
            if not data:
                return bytes(out)
            out += data

    for _ in range(50):
        for obj in (client, server):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        pump()
        if client.version() and server.version():
            break
    client.write(b"EHLO x\r\n")
    pump()
    assert read_all(server) == b"EHLO x\r\n"
    server.write(b"y" * 20000)  # two records
    pump()
    assert read_all(client) == b"y" * 20000
    with pytest.raises(ssl.SSLWantReadError):
        client.unwrap()
    pump()
    read_all(server)
    server.unwrap()
    pump()
    client.unwrap()
    assert client.version() == version.replace("_", ".")
    return {d: bytes(b) for d, b in captured.items()}


@pytest.fixture(scope="module", params=["TLSv1_3", "TLSv1_2"])
def session(request: pytest.FixtureRequest) -> Dict[str, bytes]:
    return capture_session(request.param)


def split_lump(stream: bytes) -> List[Record]:
    splitter = RecordSplitter()
    records = splitter.feed(stream)
    assert splitter.pending == b""
    return records


def manual_split(stream: bytes) -> List[bytes]:
    """Reference cut of a stream into raw records, straight from the headers."""
    raws, pos = [], 0
    while pos < len(stream):
        end = pos + 5 + int.from_bytes(stream[pos + 3 : pos + 5], "big")
        raws.append(stream[pos:end])
        pos = end
    assert pos == len(stream)
    return raws


# --- reassembly on real streams ------------------------------------------------------


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_lump_matches_headers(session: Dict[str, bytes], direction: str) -> None:
    stream = session[direction]
    records = split_lump(stream)
    assert [r.raw for r in records] == manual_split(stream)
    for r in records:
        assert r.raw == r.header + r.payload
        assert r.content_type == r.raw[0]
        assert r.version == int.from_bytes(r.raw[1:3], "big")
        assert len(r.payload) == int.from_bytes(r.raw[3:5], "big")
    assert records[0].is_handshake  # ClientHello / ServerHello
    assert records[-1].content_type in (CT_ALERT, CT_APPLICATION_DATA)  # close_notify
    assert any(r.is_ccs for r in records)


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_one_byte_chunks_match_lump(session: Dict[str, bytes], direction: str) -> None:
    stream = session[direction]
    splitter = RecordSplitter()
    records: List[Record] = []
    for i in range(len(stream)):
        got = splitter.feed(stream[i : i + 1])
        assert len(got) <= 1
        records.extend(got)
        if got:
            assert splitter.pending == b""
            assert splitter.offset == i + 1
        else:
            assert stream[splitter.offset : i + 1] == splitter.pending
    assert records == split_lump(stream)
    assert splitter.pending == b"" and splitter.offset == len(stream)


def test_random_chunks_match_lump(session: Dict[str, bytes]) -> None:
    rng = random.Random(8446)
    for stream in session.values():
        for _ in range(20):
            splitter = RecordSplitter()
            records: List[Record] = []
            pos = 0
            while pos < len(stream):
                size = rng.choice([1, 2, 4, 5, 6, 17, 300, 5000, 20000])
                records.extend(splitter.feed(stream[pos : pos + size]))
                pos += size
            assert records == split_lump(stream)


def test_plaintext_after_tls_stream(session: Dict[str, bytes]) -> None:
    stream = session["c2s"]
    splitter = RecordSplitter()
    with pytest.raises(NotTLSError) as info:
        splitter.feed(stream + PLAINTEXT)
    err = info.value
    assert err.offset == len(stream)
    assert err.data == PLAINTEXT
    assert err.records == split_lump(stream)  # records before the garbage survive
    assert isinstance(err, ValueError)
    assert splitter.take_pending() == PLAINTEXT
    assert splitter.pending == b""
    assert splitter.offset == len(stream) + len(PLAINTEXT)


# --- rejection of plaintext --------------------------------------------------------------


def test_plaintext_raises_with_bytes() -> None:
    splitter = RecordSplitter()
    with pytest.raises(NotTLSError) as info:
        splitter.feed(PLAINTEXT)
    assert info.value.offset == 0
    assert info.value.data == PLAINTEXT
    assert info.value.records == []
    assert "not a TLS record type" in str(info.value)
    # The bytes stay until the caller takes them; feeding more keeps failing.
    assert splitter.pending == PLAINTEXT
    with pytest.raises(NotTLSError) as again:
        splitter.feed(b"RCPT TO:<c@d>\r\n")
    assert again.value.data == PLAINTEXT + b"RCPT TO:<c@d>\r\n"
    assert splitter.take_pending() == PLAINTEXT + b"RCPT TO:<c@d>\r\n"
    assert splitter.feed(b"\x17\x03\x03\x00\x01z") == [
        Record(CT_APPLICATION_DATA, 0x0303, b"z", b"\x17\x03\x03\x00\x01z")
    ]


@pytest.mark.parametrize("prefix", [b"E", b"EH", b"EHLO x\r\n", b"\x16\x01", b"\x17\x03\x05"])
def test_short_bad_prefix_rejected_immediately(prefix: bytes) -> None:
    with pytest.raises(NotTLSError) as info:
        RecordSplitter().feed(prefix)
    assert info.value.data == prefix


@pytest.mark.parametrize("prefix", [b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x15\x03\x03\x00"])
def test_short_plausible_prefix_waits(prefix: bytes) -> None:
    splitter = RecordSplitter()
    assert splitter.feed(prefix) == []
    assert splitter.pending == prefix


def test_length_limit() -> None:
    ok = bytes([CT_APPLICATION_DATA, 3, 3]) + MAX_RECORD_PAYLOAD.to_bytes(2, "big")
    assert RecordSplitter().feed(ok) == []
    too_long = bytes([CT_APPLICATION_DATA, 3, 3]) + (MAX_RECORD_PAYLOAD + 1).to_bytes(2, "big")
    with pytest.raises(NotTLSError, match="length"):
        RecordSplitter().feed(too_long)


def test_bad_header_after_partial_record_boundary() -> None:
    splitter = RecordSplitter()
    assert splitter.feed(b"\x16\x03\x01\x00\x03ab") == []
    with pytest.raises(NotTLSError) as info:
        splitter.feed(b"cQUIT\r\n")
    assert info.value.offset == 8
    assert info.value.data == b"QUIT\r\n"
    assert [r.payload for r in info.value.records] == [b"abc"]


# --- Record helpers --------------------------------------------------------------------


def test_plain_alert_needs_caller_to_rule_out_encryption() -> None:
    (close,) = RecordSplitter().feed(b"\x15\x03\x03\x00\x02\x01\x00")
    assert close.is_alert and not close.is_application_data
    assert close.plain_alert(encrypted=False) == (1, CLOSE_NOTIFY)
    assert close.is_plain_close_notify(encrypted=False)
    assert close.plain_alert(encrypted=True) is None
    assert not close.is_plain_close_notify(encrypted=True)

    encrypted_alert = Record(CT_ALERT, 0x0303, bytes(26), b"\x15\x03\x03\x00\x1a" + bytes(26))
    assert encrypted_alert.plain_alert(encrypted=False) is None
    fatal = Record(CT_ALERT, 0x0303, b"\x02\x28", b"\x15\x03\x03\x00\x02\x02\x28")
    assert fatal.plain_alert(encrypted=False) == (2, 40)
    assert not fatal.is_plain_close_notify(encrypted=False)
    handshake = Record(CT_HANDSHAKE, 0x0301, b"\x00\x00", b"\x16\x03\x01\x00\x02\x00\x00")
    assert handshake.plain_alert(encrypted=False) is None
    assert handshake.is_handshake and not handshake.is_ccs
    ccs = Record(CT_CHANGE_CIPHER_SPEC, 0x0303, b"\x01", b"\x14\x03\x03\x00\x01\x01")
    assert ccs.is_ccs


def test_describe() -> None:
    close = Record(CT_ALERT, 0x0303, b"\x01\x00", b"\x15\x03\x03\x00\x02\x01\x00")
    assert "warning close_notify" in describe(close, encrypted=False)
    assert "if unencrypted" in describe(close)
    assert "encrypted alert" in describe(close, encrypted=True)
    data = Record(CT_APPLICATION_DATA, 0x0303, bytes(40), b"\x17\x03\x03\x00\x28" + bytes(40))
    text = describe(data, encrypted=True)
    assert "application_data(23)" in text and "TLS 1.2" in text and "40-byte" in text
    assert "(encrypted)" in text and text.endswith("...]")


def test_tls13_close_notify_is_not_a_plain_alert(session: Dict[str, bytes]) -> None:
    """Under TLS 1.3 the close_notify hides in an application_data record; under
    TLS 1.2 it is an alert record too long to be a plaintext alert."""
    for stream in session.values():
        last = split_lump(stream)[-1]
        assert last.plain_alert(encrypted=False) is None
        assert len(last.payload) > 2
