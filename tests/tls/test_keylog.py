"""Tests for starttls_harness.tls.keylog against real TLS connections made by OpenSSL.

Client and server are ``ssl.SSLObject`` pairs joined by ``MemoryBIO`` pumps;
every byte in each direction is captured in wire order, the client writes an
NSS key log, and the follower must recover exactly what was sent and flag
exactly the close_notify records.

TLS 1.3 suites cannot be chosen through Python's ``ssl`` module, so the
per-suite tests run the same session in a subprocess whose ``OPENSSL_CONF``
sets ``Ciphersuites``; this file doubles as that subprocess's script.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from starttls_harness.tls.keylog import (
    CLIENT_HANDSHAKE_TRAFFIC_SECRET,
    CLIENT_RANDOM,
    CLIENT_TRAFFIC_SECRET_0,
    SERVER_HANDSHAKE_TRAFFIC_SECRET,
    SERVER_TRAFFIC_SECRET_0,
    TLS_AES_128_GCM_SHA256,
    TLS_AES_256_GCM_SHA384,
    TLS_CHACHA20_POLY1305_SHA256,
    DecryptionError,
    FollowedRecord,
    HandshakeParseError,
    KeylogError,
    SecretsUnavailable,
    Tls12Decryptor,
    Tls13Decryptor,
    Tls13Follower,
    UnsupportedCipherSuite,
    client_random_from_client_hello,
    get_cipher_suite,
    hkdf_expand_label,
    keylog_file_provider,
    next_traffic_secret,
    parse_keylog,
    parse_server_hello,
    read_keylog,
    tls12_prf,
    traffic_key_and_iv,
)
from starttls_harness.tls.records import (
    CT_ALERT,
    CT_APPLICATION_DATA,
    CT_HANDSHAKE,
    Record,
    RecordSplitter,
)

CLIENT_MESSAGES = [b"EHLO client.example\r\n", b"MAIL FROM:<a@b>\r\n" + bytes(range(256)) * 4]
SERVER_DATA = b"250 ok\r\n" + bytes((i * 7 + 3) % 251 for i in range(40000))

SUITE_NAMES = {
    "TLS_AES_128_GCM_SHA256": TLS_AES_128_GCM_SHA256,
    "TLS_AES_256_GCM_SHA384": TLS_AES_256_GCM_SHA384,
    "TLS_CHACHA20_POLY1305_SHA256": TLS_CHACHA20_POLY1305_SHA256,
}

Chunk = Tuple[str, bytes]


# --- a real TLS session in memory -------------------------------------------------


@dataclass
class Session:
    chunks: List[Chunk]  # (direction, bytes) in the order they crossed the wire
    keylog_path: Path
    version: str
    cipher: str
    server_received: bytes
    client_received: bytes

    def stream(self, direction: str) -> bytes:
        return b"".join(data for d, data in self.chunks if d == direction)

    def records(self) -> List[Tuple[str, Record]]:
        """All records, interleaved in wire order."""
        splitters = {"c2s": RecordSplitter(), "s2c": RecordSplitter()}
        out: List[Tuple[str, Record]] = []
        for direction, data in self.chunks:
            out.extend((direction, r) for r in splitters[direction].feed(data))
        assert all(not s.pending for s in splitters.values())
        return out


def _read_all(obj: ssl.SSLObject) -> bytes:
    out = bytearray()
    while True:
        try:
            data = obj.read(65536)
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            break
        if not data:
            break
        out += data
    return bytes(out)


def run_session(
    workdir: Path,
    version: str,
    *,
    server_curve: Optional[str] = None,
    on_chunk: Optional[Callable[[str, bytes], None]] = None,
    trust_server: bool = True,
    ciphers: Optional[str] = None,
) -> Session:
    """Handshake, exchange data, then close_notify both ways (client first).

    With ``trust_server=False`` the client rejects the server's certificate,
    the handshake ends with the client's unknown_ca alert and so does the
    session.
    """
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server_ctx)
    if server_curve:
        server_ctx.set_ecdh_curve(server_curve)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    (ca if trust_server else trustme.CA()).configure_trust(client_ctx)
    keylog_path = workdir / "keylog.txt"
    client_ctx.keylog_filename = str(keylog_path)
    tls_version = ssl.TLSVersion[version]
    for ctx in (server_ctx, client_ctx):
        ctx.minimum_version = ctx.maximum_version = tls_version
        if ciphers is not None:
            ctx.set_ciphers(ciphers)

    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    chunks: List[Chunk] = []

    def pump() -> None:
        for direction, src, dst in (("c2s", c_out, s_in), ("s2c", s_out, c_in)):
            data = src.read()
            if data:
                chunks.append((direction, data))
                if on_chunk is not None:
                    on_chunk(direction, data)
                dst.write(data)

    done = [False, False]
    failed = [False, False]
    for _ in range(50):
        for i, obj in enumerate((client, server)):
            if not done[i] and not failed[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    failed[i] = True
        pump()
        if all(done) or all(failed):
            break
    if not trust_server:
        assert failed == [True, True], "the handshake should have failed"
        return Session(chunks, keylog_path, "", "", b"", b"")
    assert all(done), "handshake did not complete"

    for message in CLIENT_MESSAGES:
        client.write(message)
    pump()
    server_received = _read_all(server)
    server.write(SERVER_DATA)
    pump()
    client_received = _read_all(client)

    with pytest.raises(ssl.SSLWantReadError):
        client.unwrap()  # sends close_notify, then waits for the server's
    pump()
    _read_all(server)  # consumes the client's close_notify
    server.unwrap()
    pump()
    client.unwrap()
    pump()
    cipher = client.cipher()
    assert cipher is not None
    return Session(
        chunks=chunks,
        keylog_path=keylog_path,
        version=str(client.version()),
        cipher=cipher[0],
        server_received=server_received,
        client_received=client_received,
    )


def run_session_with_suite(workdir: Path, suite: str) -> Session:
    """TLS 1.3 session forced to one suite via OPENSSL_CONF, in a subprocess."""
    conf = workdir / "openssl.cnf"
    conf.write_text(
        "openssl_conf = openssl_init\n"
        "[openssl_init]\nssl_conf = ssl_sect\n"
        "[ssl_sect]\nsystem_default = system_default_sect\n"
        f"[system_default_sect]\nCiphersuites = {suite}\n"
    )
    env = dict(os.environ)
    env["OPENSSL_CONF"] = str(conf)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, "--session", str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((workdir / "session.json").read_text())
    return Session(
        chunks=[(d, bytes.fromhex(h)) for d, h in data["chunks"]],
        keylog_path=Path(data["keylog_path"]),
        version=data["version"],
        cipher=data["cipher"],
        server_received=bytes.fromhex(data["server_received"]),
        client_received=bytes.fromhex(data["client_received"]),
    )


def _session_main(workdir: Path) -> None:
    session = run_session(workdir, "TLSv1_3")
    data = {
        "chunks": [(d, c.hex()) for d, c in session.chunks],
        "keylog_path": str(session.keylog_path),
        "version": session.version,
        "cipher": session.cipher,
        "server_received": session.server_received.hex(),
        "client_received": session.client_received.hex(),
    }
    (workdir / "session.json").write_text(json.dumps(data))


# --- helpers for checking a followed session ---------------------------------------


@dataclass
class Followed:
    results: List[FollowedRecord] = field(default_factory=list)

    def of(self, direction: str) -> List[FollowedRecord]:
        return [r for r in self.results if r.direction == direction]

    def app_data(self, direction: str) -> bytes:
        return b"".join(r.plaintext or b"" for r in self.of(direction) if r.is_application_data)


def follow(session: Session, follower: Tls13Follower) -> Followed:
    followed = Followed()
    for direction, record in session.records():
        followed.results.extend(follower.feed(direction, record))
    return followed


def check_tls13_session(session: Session, followed: Followed, follower: Tls13Follower) -> None:
    assert session.server_received == b"".join(CLIENT_MESSAGES)
    assert session.client_received == SERVER_DATA
    assert follower.version == 0x0304
    assert follower.cipher_suite == SUITE_NAMES[session.cipher]
    assert follower.pending("c2s") == follower.pending("s2c") == 0
    records = session.records()
    assert len(followed.results) == len(records)

    # The decrypted application data is exactly what each side sent.
    assert followed.app_data("c2s") == b"".join(CLIENT_MESSAGES)
    assert followed.app_data("s2c") == SERVER_DATA
    assert len([r for r in followed.of("s2c") if r.is_application_data]) >= 3

    for direction in ("c2s", "s2c"):
        results = followed.of(direction)
        # Exactly one close_notify per direction, and it is the last record.
        flagged = [i for i, r in enumerate(results) if r.is_close_notify]
        assert flagged == [len(results) - 1]
        last = results[-1]
        assert last.decrypted and last.record.content_type == CT_APPLICATION_DATA
        assert last.content_type == CT_ALERT and last.alert == (1, 0)
        assert not last.close_notify_assumed
        # Every protected record decrypted; none of the data records is flagged.
        for r in results:
            if r.record.content_type == CT_APPLICATION_DATA:
                assert r.decrypted
            if r.is_application_data:
                assert not r.is_close_notify and not r.is_alert
        # Handshake messages (Finished, NewSessionTicket) were decrypted too.
        assert any(r.decrypted and r.content_type == CT_HANDSHAKE for r in results)


# --- RFC 8448 known answers -------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "key", "iv"),
    [
        pytest.param(  # server_handshake_traffic_secret
            "b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38",
            "3fce516009c21727d0f2e4e86ee403bc",
            "5d313eb2671276ee13000b30",
            id="server-handshake",
        ),
        pytest.param(  # client_handshake_traffic_secret
            "b3eddb126e067f35a780b3abf45e2d8f3b1a950738f52e9600746a0e27a55a21",
            "dbfaa693d1762c5b666af5d950258d01",
            "5bd3c71b836e0b76bb73265f",
            id="client-handshake",
        ),
        pytest.param(  # server_application_traffic_secret_0
            "a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643",
            "9f02283b6c9c07efc26bb9f2ac92e356",
            "cf782b88dd83549aadf1e984",
            id="server-application",
        ),
    ],
)
def test_rfc8448_traffic_key_and_iv(secret: str, key: str, iv: str) -> None:
    secret_bytes = bytes.fromhex(secret)
    assert hkdf_expand_label(secret_bytes, "key", b"", 16).hex() == key
    assert hkdf_expand_label(secret_bytes, b"iv", b"", 12).hex() == iv
    suite = get_cipher_suite(TLS_AES_128_GCM_SHA256)
    assert traffic_key_and_iv(secret_bytes, suite) == (bytes.fromhex(key), bytes.fromhex(iv))


RFC8448_CLIENT_FINISHED_RECORD = bytes.fromhex(
    "17030300 3575ec4d c238cce6 0b298044 a71e219c 56cc77b0 517fe9b9 3c7a4bfc"
    "44d87f38 f80338ac 98fc46de b384bd1c aeacab68 67d726c4 0546"
)
RFC8448_CLIENT_FINISHED = bytes.fromhex(
    "14000020 a8ec436d 677634ae 525ac1fc ebe11a03 9ec17694 fac6e985 27b642f2edd5ce61"
)


def _record(raw: bytes) -> Record:
    records = RecordSplitter().feed(raw)
    assert len(records) == 1
    return records[0]


def test_rfc8448_client_finished_record_decrypts() -> None:
    client_random = bytes(32)
    secrets = {
        client_random: {
            CLIENT_HANDSHAKE_TRAFFIC_SECRET: bytes.fromhex(
                "b3eddb126e067f35a780b3abf45e2d8f3b1a950738f52e9600746a0e27a55a21"
            )
        }
    }
    decryptor = Tls13Decryptor(client_random, TLS_AES_128_GCM_SHA256, secrets)
    record = _record(RFC8448_CLIENT_FINISHED_RECORD)
    assert decryptor.decrypt("c2s", record) == (CT_HANDSHAKE, RFC8448_CLIENT_FINISHED)
    # The Finished ends the handshake phase for this direction only.
    assert decryptor.phase("c2s") == "application"
    assert decryptor.sequence("c2s") == 0
    assert decryptor.phase("s2c") == "handshake"


def test_rfc8448_record_with_wrong_secret_fails_loudly() -> None:
    client_random = bytes(32)
    secrets = {
        client_random: {
            CLIENT_HANDSHAKE_TRAFFIC_SECRET: bytes(32),
            CLIENT_TRAFFIC_SECRET_0: bytes(range(32)),
        }
    }
    decryptor = Tls13Decryptor(client_random, TLS_AES_128_GCM_SHA256, secrets)
    with pytest.raises(DecryptionError, match="key log does not match"):
        decryptor.decrypt("c2s", _record(RFC8448_CLIENT_FINISHED_RECORD))
    assert decryptor.sequence("c2s") == 0  # nothing consumed


# --- key log parsing ---------------------------------------------------------------


def test_parse_keylog_skips_comments_and_torn_lines() -> None:
    r1, r2 = "11" * 32, "22" * 32
    text = (
        "# TLS secrets log file\n"
        "\n"
        f"CLIENT_HANDSHAKE_TRAFFIC_SECRET {r1} {'aa' * 48}\n"
        f"SERVER_TRAFFIC_SECRET_0 {r1} {'bb' * 32}\n"
        f"CLIENT_RANDOM {r2} {'cc' * 48}\n"
        f"SERVER_TRAFFIC_SECRET_0 {r1} {'dd' * 32}\n"  # a later line wins
        f"not hex {r1} zz\n"
        f"CLIENT_TRAFFIC_SECRET_0 {r1} {'ee' * 20}"  # torn: secret too short
    )
    secrets = parse_keylog(text)
    assert secrets == {
        bytes.fromhex(r1): {
            CLIENT_HANDSHAKE_TRAFFIC_SECRET: bytes.fromhex("aa" * 48),
            SERVER_TRAFFIC_SECRET_0: bytes.fromhex("dd" * 32),
        },
        bytes.fromhex(r2): {"CLIENT_RANDOM": bytes.fromhex("cc" * 48)},
    }


def test_read_keylog_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_keylog(tmp_path / "absent.txt") == {}
    assert keylog_file_provider(tmp_path / "absent.txt")() == {}


# --- TLS 1.3 round trips -------------------------------------------------------------


def test_tls13_default_suite_round_trip(tmp_path: Path) -> None:
    session = run_session(tmp_path, "TLSv1_3")
    assert session.version == "TLSv1.3"
    follower = Tls13Follower(keylog_file_provider(session.keylog_path))
    followed = follow(session, follower)
    check_tls13_session(session, followed, follower)

    # The client random the follower took from the wire is the key log's.
    assert follower.client_random in read_keylog(session.keylog_path)
    first_c2s = next(r for d, r in session.records() if d == "c2s")
    assert client_random_from_client_hello(first_c2s.payload) == follower.client_random


@pytest.mark.parametrize("suite", sorted(SUITE_NAMES))
def test_tls13_each_cipher_suite(tmp_path: Path, suite: str) -> None:
    session = run_session_with_suite(tmp_path, suite)
    if session.cipher != suite:
        pytest.skip(f"could not force {suite} via OPENSSL_CONF (got {session.cipher})")
    follower = Tls13Follower(keylog_file_provider(session.keylog_path))
    followed = follow(session, follower)
    check_tls13_session(session, followed, follower)
    server_hello = next(r for d, r in session.records() if d == "s2c")
    assert parse_server_hello(server_hello.payload).cipher_suite == SUITE_NAMES[suite]


def test_tls13_is_close_notify_per_record(tmp_path: Path) -> None:
    session = run_session(tmp_path, "TLSv1_3")
    follower = Tls13Follower(read_keylog(session.keylog_path))
    answers: Dict[str, List[bool]] = {"c2s": [], "s2c": []}
    for direction, record in session.records():
        answers[direction].append(follower.is_close_notify(direction, record))
    for direction in ("c2s", "s2c"):
        assert answers[direction].count(True) == 1
        assert answers[direction][-1] is True


def test_tls13_follow_live_while_keylog_is_written(tmp_path: Path) -> None:
    """Follow as a proxy would: the client logs secrets only after it has seen
    the server's flight, so early records must wait and then be released."""
    follower = Tls13Follower(keylog_file_provider(tmp_path / "keylog.txt"))
    splitters = {"c2s": RecordSplitter(), "s2c": RecordSplitter()}
    followed = Followed()
    max_pending = 0

    def on_chunk(direction: str, data: bytes) -> None:
        nonlocal max_pending
        for record in splitters[direction].feed(data):
            followed.results.extend(follower.feed(direction, record))
        max_pending = max(max_pending, follower.pending("s2c"), follower.pending("c2s"))

    session = run_session(tmp_path, "TLSv1_3", on_chunk=on_chunk)
    followed.results.extend(follower.poll())
    assert max_pending > 0, "the key log race was not exercised"
    # Results come out per direction in order, but delayed ones may come out
    # after later records of the other direction; compare per direction.
    check_tls13_session(session, followed, follower)


def test_tls13_secrets_appearing_late_are_picked_up(tmp_path: Path) -> None:
    session = run_session(tmp_path, "TLSv1_3")
    real = read_keylog(session.keylog_path)
    written = False

    def provider() -> Dict[bytes, Dict[str, bytes]]:
        return real if written else {}

    follower = Tls13Follower(provider)
    records = session.records()
    first = next(i for i, (_, r) in enumerate(records) if r.content_type == CT_APPLICATION_DATA)
    followed = Followed()
    for d, r in records[:first]:
        followed.results.extend(follower.feed(d, r))
    assert len(followed.results) == first  # clear-text records need no keys
    direction, record = records[first]
    with pytest.raises(SecretsUnavailable):
        follower.is_close_notify(direction, record)
    assert follower.pending(direction) == 1
    assert follower.poll() == []  # still not in the key log
    written = True
    released = follower.poll()
    assert [r.record for r in released] == [record]
    followed.results.extend(released)
    for d, r in records[first + 1 :]:
        followed.results.extend(follower.feed(d, r))
    check_tls13_session(session, followed, follower)


def test_tls13_hello_retry_request(tmp_path: Path) -> None:
    session = run_session(tmp_path, "TLSv1_3", server_curve="prime256v1")
    first_s2c = next(r for d, r in session.records() if d == "s2c")
    if not parse_server_hello(first_s2c.payload).is_hello_retry_request:
        pytest.skip("server did not answer with a HelloRetryRequest")
    follower = Tls13Follower(keylog_file_provider(session.keylog_path))
    followed = follow(session, follower)
    check_tls13_session(session, followed, follower)


# --- wrong key logs fail loudly ------------------------------------------------------


def test_wrong_secrets_raise_decryption_error(tmp_path: Path) -> None:
    session = run_session(tmp_path, "TLSv1_3")
    real = read_keylog(session.keylog_path)
    ((client_random, labels),) = real.items()
    # Same connection, same secret sizes, wrong bytes.
    wrong = {client_random: {label: bytes(len(s)) for label, s in labels.items()}}
    follower = Tls13Follower(wrong)
    with pytest.raises(DecryptionError, match="does not match"):
        follow(session, follower)


def test_keylog_of_another_connection_never_passes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    session = run_session(tmp_path / "a", "TLSv1_3")
    other = run_session(tmp_path / "b", "TLSv1_3")
    follower = Tls13Follower(keylog_file_provider(other.keylog_path))
    undecided = 0
    for direction, record in session.records():
        try:
            assert follower.is_close_notify(direction, record) is False
        except SecretsUnavailable:
            undecided += 1
    # Every protected record stays undecided, close_notify included.
    protected = [r for _, r in session.records() if r.content_type == CT_APPLICATION_DATA]
    assert undecided == len(protected)
    assert follower.pending("c2s") + follower.pending("s2c") == len(protected)

    decryptor = follower.decryptor
    assert decryptor is not None
    with pytest.raises(SecretsUnavailable, match="key log has no"):
        decryptor.decrypt("s2c", protected[0])


def test_blocking_retry_delays_wait_for_the_secret() -> None:
    client_random = bytes(32)
    real = {
        client_random: {
            CLIENT_HANDSHAKE_TRAFFIC_SECRET: bytes.fromhex(
                "b3eddb126e067f35a780b3abf45e2d8f3b1a950738f52e9600746a0e27a55a21"
            )
        }
    }
    calls = 0

    def provider() -> Dict[bytes, Dict[str, bytes]]:
        nonlocal calls
        calls += 1
        return real if calls >= 3 else {}

    record = _record(RFC8448_CLIENT_FINISHED_RECORD)
    impatient = Tls13Decryptor(client_random, TLS_AES_128_GCM_SHA256, provider)
    with pytest.raises(SecretsUnavailable):
        impatient.decrypt("c2s", record)  # one re-read only: call 1
    patient = Tls13Decryptor(
        client_random, TLS_AES_128_GCM_SHA256, provider, retry_delays=(0.001, 0.001)
    )
    assert patient.decrypt("c2s", record) == (CT_HANDSHAKE, RFC8448_CLIENT_FINISHED)
    assert calls == 3


def test_decryptor_from_hellos(tmp_path: Path) -> None:
    session = run_session(tmp_path, "TLSv1_3")
    records = session.records()
    client_hello = next(r for d, r in records if d == "c2s")
    server_hello = next(r for d, r in records if d == "s2c")
    decryptor = Tls13Decryptor.from_hellos(
        client_hello.payload, server_hello.payload, keylog_file_provider(session.keylog_path)
    )
    assert decryptor.suite.name == session.cipher
    first_protected = next(r for d, r in records if d == "s2c" and r.is_application_data)
    inner_type, plaintext = decryptor.decrypt("s2c", first_protected)
    assert inner_type == CT_HANDSHAKE and plaintext[0] == 8  # EncryptedExtensions
    assert decryptor.sequence("s2c") == 1


def test_secret_length_mismatch_is_reported() -> None:
    client_random = bytes(32)
    secrets = {client_random: {CLIENT_HANDSHAKE_TRAFFIC_SECRET: bytes(48)}}
    decryptor = Tls13Decryptor(client_random, TLS_AES_128_GCM_SHA256, secrets)
    with pytest.raises(DecryptionError, match="48 bytes"):
        decryptor.decrypt("c2s", _record(RFC8448_CLIENT_FINISHED_RECORD))


def test_unsupported_inputs() -> None:
    with pytest.raises(UnsupportedCipherSuite):
        Tls13Decryptor(bytes(32), 0x1304, {})  # TLS_AES_128_CCM_SHA256
    decryptor = Tls13Decryptor(bytes(32), TLS_AES_128_GCM_SHA256, {})
    with pytest.raises(ValueError, match="outer type 23"):
        decryptor.decrypt("c2s", _record(b"\x15\x03\x03\x00\x02\x01\x00"))
    with pytest.raises(ValueError, match="direction"):
        decryptor.decrypt("up", _record(RFC8448_CLIENT_FINISHED_RECORD))
    with pytest.raises(HandshakeParseError):
        client_random_from_client_hello(b"\x02\x00\x00\x26" + bytes(40))
    with pytest.raises(HandshakeParseError):
        parse_server_hello(b"\x02\x00\x00\x30" + bytes(10))
    follower = Tls13Follower({})
    with pytest.raises(KeylogError, match="early data"):
        follower.feed("c2s", _record(b"\x17\x03\x03\x00\x02ab"))


# --- key changes the real sessions do not exercise -------------------------------------


def _seal(secret: bytes, seq: int, inner_type: int, content: bytes) -> Record:
    """Encrypt one TLS 1.3 record (AES-128-GCM) independently of the decryptor."""
    key, iv = traffic_key_and_iv(secret, get_cipher_suite(TLS_AES_128_GCM_SHA256))
    inner = content + bytes([inner_type]) + bytes(3)  # some zero padding
    length = len(inner) + 16
    header = bytes([CT_APPLICATION_DATA, 3, 3]) + length.to_bytes(2, "big")
    nonce = bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big")))
    return _record(header + AESGCM(key).encrypt(nonce, inner, header))


def test_key_update_and_missed_finished_fallback() -> None:
    client_random = bytes(range(32))
    hs, app0 = os.urandom(32), os.urandom(32)
    app1 = next_traffic_secret(app0, get_cipher_suite(TLS_AES_128_GCM_SHA256))
    app2 = next_traffic_secret(app1, get_cipher_suite(TLS_AES_128_GCM_SHA256))
    secrets = {client_random: {SERVER_HANDSHAKE_TRAFFIC_SECRET: hs, SERVER_TRAFFIC_SECRET_0: app0}}
    finished = b"\x14\x00\x00\x20" + bytes(32)
    key_update = b"\x18\x00\x00\x01\x00"
    stream = [
        (_seal(hs, 0, CT_HANDSHAKE, b"\x08\x00\x00\x02\x00\x00"), CT_HANDSHAKE),
        (_seal(hs, 1, CT_HANDSHAKE, finished), CT_HANDSHAKE),
        (_seal(app0, 0, CT_APPLICATION_DATA, b"gen0-a"), CT_APPLICATION_DATA),
        (_seal(app0, 1, CT_HANDSHAKE, key_update), CT_HANDSHAKE),
        (_seal(app1, 0, CT_APPLICATION_DATA, b"gen1-a"), CT_APPLICATION_DATA),
        (_seal(app1, 1, CT_APPLICATION_DATA, b"gen1-b"), CT_APPLICATION_DATA),
        (_seal(app1, 2, CT_ALERT, b"\x01\x5a"), CT_ALERT),  # user_canceled
        # A KeyUpdate we never saw (e.g. lost): the next generation is tried.
        (_seal(app2, 0, CT_ALERT, b"\x01\x00"), CT_ALERT),
    ]
    decryptor = Tls13Decryptor(client_random, TLS_AES_128_GCM_SHA256, secrets)
    contents = []
    epochs = []
    for record, inner_type in stream:
        got_type, content = decryptor.decrypt("s2c", record)
        assert got_type == inner_type
        contents.append(content)
        epochs.append((decryptor.phase("s2c"), decryptor.generation("s2c")))
    # Finished and KeyUpdate switch keys as soon as they are read.
    assert epochs == [
        ("handshake", 0),
        ("application", 0),
        ("application", 0),
        ("application", 1),
        ("application", 1),
        ("application", 1),
        ("application", 1),
        ("application", 2),
    ]
    assert contents[2] == b"gen0-a" and contents[4:6] == [b"gen1-a", b"gen1-b"]
    assert contents[6:] == [b"\x01\x5a", b"\x01\x00"]

    # The follower's verdicts on the two decrypted alerts.
    user_canceled = FollowedRecord("s2c", stream[6][0], CT_ALERT, contents[6], True)
    close_notify = FollowedRecord("s2c", stream[7][0], CT_ALERT, contents[7], True)
    assert user_canceled.alert == (1, 90) and not user_canceled.is_close_notify
    assert close_notify.alert == (1, 0) and close_notify.is_close_notify

    # Handshake Finished never seen at all: the first app record still opens.
    fresh = Tls13Decryptor(client_random, TLS_AES_128_GCM_SHA256, secrets)
    assert fresh.decrypt("s2c", _seal(app0, 0, CT_APPLICATION_DATA, b"x")) == (
        CT_APPLICATION_DATA,
        b"x",
    )
    assert fresh.phase("s2c") == "application" and fresh.sequence("s2c") == 1


@pytest.mark.parametrize("version", ["TLSv1_3", "TLSv1_2"])
def test_failed_handshake_alert_is_not_close_notify(tmp_path: Path, version: str) -> None:
    session = run_session(tmp_path, version, trust_server=False)
    follower = Tls13Follower(keylog_file_provider(session.keylog_path))
    followed = follow(session, follower)
    assert follower.pending("c2s") == follower.pending("s2c") == 0
    alerts = [r for r in followed.results if r.is_alert]
    # OpenSSL sends this alert before it protects its own records.
    assert [(r.direction, r.alert, r.encrypted) for r in alerts] == [("c2s", (2, 48), False)]
    assert not any(r.is_close_notify for r in followed.results)


# --- TLS 1.2: alerts after ChangeCipherSpec --------------------------------------------


def test_tls12_follower_flags_close_notify(tmp_path: Path) -> None:
    session = run_session(tmp_path, "TLSv1_2")
    assert session.version == "TLSv1.2"
    assert session.server_received == b"".join(CLIENT_MESSAGES)
    assert session.client_received == SERVER_DATA
    assert "CLIENT_RANDOM" in next(iter(read_keylog(session.keylog_path).values()))
    follower = Tls13Follower(keylog_file_provider(session.keylog_path))
    followed = follow(session, follower)
    assert follower.version == 0x0303
    assert follower.decryptor is None
    for direction in ("c2s", "s2c"):
        results = followed.of(direction)
        flagged = [i for i, r in enumerate(results) if r.is_close_notify]
        assert flagged == [len(results) - 1]
        last = results[-1]
        assert last.record.content_type == CT_ALERT and last.encrypted
        assert last.close_notify_assumed and last.alert is None
        # Application data records are encrypted and never flagged.
        data = [r for r in results if r.record.content_type == CT_APPLICATION_DATA]
        assert data and all(r.encrypted and not r.is_close_notify for r in data)
        # Before ChangeCipherSpec nothing is encrypted.
        ccs = next(i for i, r in enumerate(results) if r.record.is_ccs)
        assert not any(r.encrypted for r in results[: ccs + 1])
        assert all(r.encrypted for r in results[ccs + 1 :])
    assert len(followed.of("s2c")) + len(followed.of("c2s")) == len(session.records())


def _clear(followed: Followed, direction: str) -> bytes:
    return b"".join(r.clear or b"" for r in followed.of(direction))


@pytest.mark.parametrize(
    "ciphers",
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ],
)
def test_tls12_application_data_is_decrypted_from_client_random(
    tmp_path: Path, ciphers: str
) -> None:
    """With the master secret (CLIENT_RANDOM) the AEAD suites' application
    data is read exactly; how records are classified does not change."""
    session = run_session(tmp_path, "TLSv1_2", ciphers=ciphers)
    assert session.cipher == ciphers
    followed = follow(session, Tls13Follower(keylog_file_provider(session.keylog_path)))
    assert _clear(followed, "c2s") == b"".join(CLIENT_MESSAGES)
    assert _clear(followed, "s2c") == SERVER_DATA
    for direction in ("c2s", "s2c"):
        results = followed.of(direction)
        assert [r.is_close_notify for r in results].count(True) == 1
        assert all(r.plaintext is None for r in results if r.encrypted)  # classification as before


def test_tls12_without_the_master_secret_nothing_is_read(tmp_path: Path) -> None:
    session = run_session(tmp_path, "TLSv1_2")
    (tmp_path / "other").mkdir()
    other = run_session(tmp_path / "other", "TLSv1_2")
    for secrets in ({}, keylog_file_provider(other.keylog_path)):
        followed = follow(session, Tls13Follower(secrets))
        assert _clear(followed, "c2s") == _clear(followed, "s2c") == b""


def test_tls12_wrong_master_secret_reads_nothing(tmp_path: Path) -> None:
    """A master secret that does not authenticate leaves the text unread, never garbage."""
    session = run_session(tmp_path, "TLSv1_2")
    keys = read_keylog(session.keylog_path)
    wrong = {r: {CLIENT_RANDOM: bytes(48)} for r in keys}
    followed = follow(session, Tls13Follower(wrong))
    assert _clear(followed, "c2s") == _clear(followed, "s2c") == b""


def test_tls12_prf_known_answer() -> None:
    """The TLS 1.2 PRF (SHA-256) against the widely used test vector."""
    secret = bytes.fromhex("9bbe436ba940f017b17652849a71db35")
    seed = bytes.fromhex("a0ba9f936cda311827a6f796ffd5198c")
    out = tls12_prf(secret, b"test label", seed, 100, hashes.SHA256())
    assert out.hex().startswith("e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a")


def test_tls12_unsupported_suite_is_refused() -> None:
    with pytest.raises(UnsupportedCipherSuite):
        Tls12Decryptor(bytes(32), bytes(32), 0x002F, {})


if __name__ == "__main__" and sys.argv[1:2] == ["--session"]:
    _session_main(Path(sys.argv[2]))
