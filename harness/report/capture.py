"""A pcapng capture of one result's conversation, decrypted in Wireshark in one step.

A mail developer who gets a ``fail`` opens the file in the tool they already
use.  Two sources, best first:

**The real bytes.**  Every connection the harness makes or accepts on the
engine keeps a :class:`~starttls_harness.tls.aio.WireLog` (the probe and the
scripted server put it in ``Evidence.wires``): the bytes exactly as the
socket sent and received them, in order, with times, the socket addresses,
FIN/RST, and which writes carried bytes injected around the rules.
:func:`wire_capture_bytes` turns each into TCP segments (headers synthesised,
payloads real: the real ClientHello, certificate, records), marks injected
bytes with a packet comment giving their range in the segment, attaches the
harness's notes as comments, and puts the run's key log in a Decryption
Secrets Block.  Wireshark picks the SMTP/IMAP dissector (which follows
STARTTLS into TLS) by port, so a server port other than the dialect's
well-known one is shown as that port (``service_port``) and the real one is
in the first packet's comment.

**The fallback: synthesis from the evidence**, for a result whose run kept no
wire log (path scenarios through the proxy today).  The section comment says
``FALLBACK``.  It works like this:

* TCP over IPv4 loopback inside Ethernet frames: a SYN/SYN-ACK/ACK
  handshake, one segment per exchange with consistent sequence and ack
  numbers, a FIN (or RST, when the evidence says ``reset``) where the evidence
  has an ``eof``; timestamps are the exchange times.
* Plaintext and injected bytes are the real bytes, as recorded.  Bytes the
  harness put on the wire around the rules carry a packet comment
  (``opt_comment``: ``injected by the harness: ...``); harness notes are
  attached as comments to the next packet.
* Under TLS the evidence holds the plaintext, not the ciphertext, so each TLS
  session is **re-encrypted** with the run's own traffic secrets: a skeleton
  handshake (ClientHello carrying the client random from the key log, a
  ServerHello, and the encrypted EncryptedExtensions/Finished needed for a
  dissector to switch to the application keys) followed by one record per
  exchange.  The application records therefore decrypt, with the run's key
  log, to exactly the bytes the run exchanged; the handshake messages are
  placeholders (no certificate, dummy Finished) and the section comment says
  so.  TLS 1.3 sessions use the ``*_TRAFFIC_SECRET`` lines, TLS 1.2 sessions
  the ``CLIENT_RANDOM`` master secret (AES-GCM, RFC 5288).  A session the key
  log does not cover (no key log kept) gets fresh random secrets, appended to
  the key log with a comment line saying they are synthesised.
* A **Decryption Secrets Block** (pcapng block type 0x0000000A, secrets type
  0x544c534b "TLSK") holds the key log, so ``tshark -r FILE`` and Wireshark
  decrypt with no key file given.

The blocks are written with :mod:`struct`: python-pcapng, dpkt and scapy
write section, interface and packet blocks (scapy and dpkt with comments), but
none of them writes a Decryption Secrets Block, and the four block kinds
needed here are a few lines each -- a dependency would add nothing.

Files are created 0600: they hold TLS secrets.

API (the CLI wires ``--capture DIR`` / ``--capture-all`` from these)::

    write_capture(path, evidence, keylog, *, service_port=None, client=None,
                  server=None, tls_version="1.3", comment="", start_time=None)
        -> Path
    capture_result(result, directory, *, service_port=None, client=None,
                   server=None, start_time=None, real_ports=False) -> Path
    capture_bytes(evidence, keylog, ...) -> bytes      (the same, in memory)

``keylog`` is the run's NSS key log (bytes) or ``None``; ``capture_result``
reads it from ``result.evidence.keylog`` (a path) and names the file
``<id>-<dialect>-tls<version>.pcapng``.  ``client``/``server`` are
``(ipv4, port)``; the evidence does not record the target's address, so the
server defaults to ``127.0.0.1`` and the dialect's default port (which is also
what Wireshark's SMTP/IMAP dissectors listen on), the client to
``127.0.0.1:49152``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from starttls_harness.report.verdicts import Evidence, Exchange, Result
from starttls_harness.tls.keylog import (
    TLS_AES_128_GCM_SHA256,
    TLS_AES_256_GCM_SHA384,
    get_cipher_suite,
    parse_keylog,
    traffic_key_and_iv,
)

__all__ = [
    "BT_DSB",
    "BT_EPB",
    "BT_IDB",
    "BT_SHB",
    "SECRETS_TLS_KEYLOG",
    "capture_bytes",
    "capture_result",
    "dsb_block",
    "epb_block",
    "file_stem",
    "idb_block",
    "shb_block",
    "wire_capture_bytes",
    "write_capture",
]

# --- pcapng blocks (draft-ietf-opsawg-pcapng) ------------------------------------

BT_SHB = 0x0A0D0D0A
BT_IDB = 0x00000001
BT_EPB = 0x00000006
BT_DSB = 0x0000000A
SECRETS_TLS_KEYLOG = 0x544C534B  # "TLSK": NSS key log text
BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_ENDOFOPT = 0
OPT_COMMENT = 1
SHB_USERAPPL = 4
IF_NAME = 2
IF_TSRESOL = 9
LINKTYPE_ETHERNET = 1


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _options(options: Sequence[Tuple[int, bytes]]) -> bytes:
    if not options:
        return b""
    out = b"".join(struct.pack("<HH", code, len(v)) + _pad4(v) for code, v in options)
    return out + struct.pack("<HH", OPT_ENDOFOPT, 0)


def _block(block_type: int, body: bytes) -> bytes:
    body = _pad4(body)
    total = len(body) + 12
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def shb_block(comment: str = "", application: str = "starttls-harness") -> bytes:
    """Section Header Block: little-endian, version 1.0, section length unknown."""
    opts: List[Tuple[int, bytes]] = []
    if comment:
        opts.append((OPT_COMMENT, comment.encode("utf-8")))
    opts.append((SHB_USERAPPL, application.encode("utf-8")))
    body = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + _options(opts)
    return _block(BT_SHB, body)


def idb_block(linktype: int = LINKTYPE_ETHERNET, name: str = "lo") -> bytes:
    """Interface Description Block with microsecond timestamps."""
    opts = [(IF_NAME, name.encode("utf-8")), (IF_TSRESOL, bytes([6]))]
    return _block(BT_IDB, struct.pack("<HHI", linktype, 0, 0) + _options(opts))


def dsb_block(secrets: bytes, secrets_type: int = SECRETS_TLS_KEYLOG) -> bytes:
    """Decryption Secrets Block (type 0x0A): Wireshark applies it to later packets."""
    return _block(BT_DSB, struct.pack("<II", secrets_type, len(secrets)) + _pad4(secrets))


def epb_block(frame: bytes, timestamp: float, comments: Sequence[str] = ()) -> bytes:
    """Enhanced Packet Block on interface 0; each comment is one ``opt_comment``."""
    micros = round(timestamp * 1_000_000)
    head = struct.pack(
        "<IIIII", 0, (micros >> 32) & 0xFFFFFFFF, micros & 0xFFFFFFFF, len(frame), len(frame)
    )
    opts = [(OPT_COMMENT, c.encode("utf-8")) for c in comments]
    return _block(BT_EPB, head + _pad4(frame) + _options(opts))


# --- IPv4 / TCP ----------------------------------------------------------------

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
#: Largest TCP payload per synthesised segment (below the loopback MTU).
MAX_SEGMENT = 32768


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def _ip(address: str) -> bytes:
    parts = [int(p) for p in address.split(".")]
    if len(parts) != 4 or not all(0 <= p <= 255 for p in parts):
        raise ValueError(f"not an IPv4 address: {address!r}")
    return bytes(parts)


@dataclass
class _Tcp:
    """Both ends of one synthesised TCP connection and their sequence numbers."""

    ends: Dict[str, Tuple[bytes, int]]  # direction -> (source ip, source port)
    seq: Dict[str, int]
    ip_id: int = 1
    open: Dict[str, bool] = field(default_factory=lambda: {"c2s": True, "s2c": True})

    @staticmethod
    def other(direction: str) -> str:
        return "s2c" if direction == "c2s" else "c2s"

    def frame(self, direction: str, flags: int, payload: bytes = b"") -> bytes:
        src, sport = self.ends[direction]
        dst, dport = self.ends[self.other(direction)]
        seq = self.seq[direction] & 0xFFFFFFFF
        ack = self.seq[self.other(direction)] & 0xFFFFFFFF if flags & ACK else 0
        tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp) + len(payload))
        csum = _checksum(pseudo + tcp + payload)
        tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
        total = 20 + len(tcp) + len(payload)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, self.ip_id, 0x4000, 64, 6, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        self.seq[direction] += len(payload) + (1 if flags & (SYN | FIN) else 0)
        ethernet = b"\0" * 12 + b"\x08\x00"  # loopback: zero MAC addresses
        return ethernet + ip + tcp + payload


# --- TLS record synthesis -------------------------------------------------------

CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APPDATA = 20, 21, 22, 23
HT_CLIENT_HELLO, HT_SERVER_HELLO, HT_ENCRYPTED_EXTENSIONS, HT_FINISHED = 1, 2, 8, 20
TLS12_ECDHE_RSA_AES_128_GCM_SHA256 = 0xC02F
MAX_FRAGMENT = 1 << 14

#: RFC 8446 §6 / RFC 5246 §7.2 alert descriptions, for alerts the evidence names.
ALERTS = {
    "close_notify": 0,
    "unexpected_message": 10,
    "bad_record_mac": 20,
    "record_overflow": 22,
    "handshake_failure": 40,
    "bad_certificate": 42,
    "unsupported_certificate": 43,
    "certificate_revoked": 44,
    "certificate_expired": 45,
    "certificate_unknown": 46,
    "illegal_parameter": 47,
    "unknown_ca": 48,
    "access_denied": 49,
    "decode_error": 50,
    "decrypt_error": 51,
    "protocol_version": 70,
    "insufficient_security": 71,
    "internal_error": 80,
    "inappropriate_fallback": 86,
    "user_canceled": 90,
    "missing_extension": 109,
    "unsupported_extension": 110,
    "unrecognized_name": 112,
    "unknown_psk_identity": 115,
    "certificate_required": 116,
    "no_application_protocol": 120,
}


def _alert_code(text: str) -> Optional[int]:
    words = text.lower().replace("-", "_").replace(" ", "_")
    for prefix in ("sslv3_alert_", "tlsv1_alert_", "tlsv13_alert_"):
        if words.startswith(prefix):
            words = words[len(prefix) :]
    for name, code in ALERTS.items():
        if words.startswith(name):
            return code
    return None


def _handshake(msg_type: int, body: bytes) -> bytes:
    return struct.pack("!B", msg_type) + len(body).to_bytes(3, "big") + body


def _record(content_type: int, payload: bytes) -> bytes:
    return struct.pack("!BHH", content_type, 0x0303, len(payload)) + payload


def _hello(msg_type: int, random: bytes, suites: bytes, extensions: bytes) -> bytes:
    exts = struct.pack("!H", len(extensions)) + extensions if extensions else b""
    if msg_type == HT_CLIENT_HELLO:
        body = b"\x03\x03" + random + b"\0" + struct.pack("!H", len(suites)) + suites + b"\x01\0"
    else:
        body = b"\x03\x03" + random + b"\0" + suites + b"\0"
    return _handshake(msg_type, body + exts)


def _prf_sha256(secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """TLS 1.2 PRF with P_SHA256 (RFC 5246 §5)."""
    seed = label + seed
    out, a = b"", seed
    while len(out) < length:
        a = hmac.new(secret, a, hashlib.sha256).digest()
        out += hmac.new(secret, a + seed, hashlib.sha256).digest()
    return out[:length]


class _Sealer:
    """One direction's record protection: key, IV and sequence number."""

    def __init__(self, version: str, key: bytes, iv: bytes) -> None:
        self.version = version
        self.aead = AESGCM(key)
        self.iv = iv
        self.seq = 0

    def seal(self, content_type: int, data: bytes) -> bytes:
        seq = struct.pack("!Q", self.seq)
        self.seq += 1
        if self.version == "1.3":  # RFC 8446 §5.2: inner type, outer application_data
            inner = data + bytes([content_type])
            nonce = bytes(a ^ b for a, b in zip(self.iv, b"\0\0\0\0" + seq))
            header = struct.pack("!BHH", CT_APPDATA, 0x0303, len(inner) + 16)
            return header + self.aead.encrypt(nonce, inner, header)
        # RFC 5288: 4-byte salt + 8-byte explicit nonce; AAD = seq + header.
        aad = seq + struct.pack("!BHH", content_type, 0x0303, len(data))
        sealed = seq + self.aead.encrypt(self.iv + seq, data, aad)
        return _record(content_type, sealed)


@dataclass
class _Session:
    """One TLS session of the conversation, with what it needs to re-encrypt."""

    version: str
    client_random: bytes
    secrets: Dict[str, bytes]
    synthesised: bool = False


TLS13_LABELS = (
    "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
    "SERVER_HANDSHAKE_TRAFFIC_SECRET",
    "CLIENT_TRAFFIC_SECRET_0",
    "SERVER_TRAFFIC_SECRET_0",
)


def _covers(version: str, secrets: Dict[str, bytes]) -> bool:
    """Whether one client random's key log lines let us seal a ``version`` session."""
    if version == "1.3":
        lengths = {len(secrets.get(n, b"")) for n in TLS13_LABELS}
        return all(n in secrets for n in TLS13_LABELS) and len(lengths) == 1
    return len(secrets.get("CLIENT_RANDOM", b"")) == 48


Flights = Tuple[bytes, List[Tuple[str, bytes]], Dict[str, _Sealer]]


def _tls13_flights(session: _Session) -> Flights:
    """ClientHello; the flights after it in wire order; the application sealers."""
    s = session.secrets
    code = TLS_AES_128_GCM_SHA256
    if len(s["CLIENT_TRAFFIC_SECRET_0"]) == 48:
        code = TLS_AES_256_GCM_SHA384
    suite = get_cipher_suite(code)

    def sealer(label: str) -> _Sealer:
        return _Sealer("1.3", *traffic_key_and_iv(s[label], suite))

    versions_ch = struct.pack("!HHB", 43, 3, 2) + b"\x03\x04"
    versions_sh = struct.pack("!HH", 43, 2) + b"\x03\x04"
    ch = _hello(HT_CLIENT_HELLO, session.client_random, struct.pack("!H", code), versions_ch)
    server_random = hashlib.sha256(b"server random" + session.client_random).digest()
    sh = _hello(HT_SERVER_HELLO, server_random, struct.pack("!H", code), versions_sh)
    finished = _handshake(HT_FINISHED, b"\0" * suite.hash_length)  # placeholder verify_data
    server_flight = sealer("SERVER_HANDSHAKE_TRAFFIC_SECRET").seal(
        CT_HANDSHAKE, _handshake(HT_ENCRYPTED_EXTENSIONS, b"\0\0") + finished
    )
    client_flight = sealer("CLIENT_HANDSHAKE_TRAFFIC_SECRET").seal(CT_HANDSHAKE, finished)
    sealers = {
        "c2s": sealer("CLIENT_TRAFFIC_SECRET_0"),
        "s2c": sealer("SERVER_TRAFFIC_SECRET_0"),
    }
    after = [("s2c", _record(CT_HANDSHAKE, sh) + server_flight), ("c2s", client_flight)]
    return _record(CT_HANDSHAKE, ch), after, sealers


def _tls12_flights(session: _Session) -> Flights:
    """ClientHello; ServerHello, CCS + Finished each way; the application sealers."""
    code = struct.pack("!H", TLS12_ECDHE_RSA_AES_128_GCM_SHA256)
    server_random = hashlib.sha256(b"server random" + session.client_random).digest()
    block = _prf_sha256(
        session.secrets["CLIENT_RANDOM"],
        b"key expansion",
        server_random + session.client_random,
        40,
    )
    sealers = {"c2s": _Sealer("1.2", block[:16], block[32:36])}
    sealers["s2c"] = _Sealer("1.2", block[16:32], block[36:40])
    finished = _handshake(HT_FINISHED, b"\0" * 12)  # placeholder verify_data
    ccs = _record(CT_CCS, b"\x01")
    ch = _record(CT_HANDSHAKE, _hello(HT_CLIENT_HELLO, session.client_random, code, b""))
    sh = _record(CT_HANDSHAKE, _hello(HT_SERVER_HELLO, server_random, code, b""))
    after = [
        ("s2c", sh),
        ("c2s", ccs + sealers["c2s"].seal(CT_HANDSHAKE, finished)),
        ("s2c", ccs + sealers["s2c"].seal(CT_HANDSHAKE, finished)),
    ]
    return ch, after, sealers


# --- the conversation -----------------------------------------------------------


class _Writer:
    """Walks the evidence and emits packets; holds TCP and TLS state."""

    def __init__(
        self,
        tcp: _Tcp,
        base: float,
        sessions: List[_Session],
        tls_version: str,
    ) -> None:
        self.tcp = tcp
        self.base = base
        self.sessions = sessions
        self.tls_version = tls_version
        self.extra_keys: List[str] = []
        self.packets: List[Tuple[bytes, float, List[str]]] = []
        self.pending: List[str] = []
        self.sealers: Optional[Dict[str, _Sealer]] = None
        self.closed: Dict[str, bool] = {}
        #: client random of a real ClientHello the evidence holds (``tls-wire``)
        self.seen_random: Optional[bytes] = None

    def emit(self, t: float, direction: str, flags: int, payload: bytes = b"", *notes: str) -> None:
        comments = [*self.pending, *(n for n in notes if n)]
        self.pending = []
        chunks = [payload[i : i + MAX_SEGMENT] for i in range(0, len(payload), MAX_SEGMENT)]
        for chunk in chunks or [b""]:
            frame = self.tcp.frame(direction, flags, chunk)
            self.packets.append((frame, self.base + t, comments))
            comments = []

    def data(self, t: float, direction: str, payload: bytes, *notes: str) -> None:
        self.emit(t, direction, PSH | ACK, payload, *notes)

    def open_tcp(self, t: float) -> None:
        self.emit(t, "c2s", SYN)
        self.emit(t, "s2c", SYN | ACK)
        self.emit(t, "c2s", ACK)

    def start_tls(self, t: float) -> None:
        random = self.seen_random
        match = [s for s in self.sessions if random is None or s.client_random == random]
        if match:
            session = match[0]
            self.sessions.remove(session)
        else:  # the run kept no secrets for this session: make some, and say so
            random = random or os.urandom(32)
            session = _Session(self.tls_version, random, {}, synthesised=True)
            if session.version == "1.3":
                for name in TLS13_LABELS:
                    session.secrets[name] = os.urandom(32)
            else:
                session.secrets["CLIENT_RANDOM"] = os.urandom(48)
            self.extra_keys += [
                f"{name} {session.client_random.hex()} {secret.hex()}"
                for name, secret in session.secrets.items()
            ]
        flights = _tls13_flights if session.version == "1.3" else _tls12_flights
        client_hello, after, self.sealers = flights(session)
        self.closed = {"c2s": False, "s2c": False}
        note = "TLS handshake synthesised by the harness (placeholder messages)"
        if session.synthesised:
            note += "; the run kept no key log for it: its secrets are synthesised"
        if self.seen_random is None:
            self.data(t, "c2s", client_hello, note)
            note = ""
        self.seen_random = None
        for direction, flight in after:
            self.data(t, direction, flight, note)
            note = ""

    def seal(self, direction: str, content_type: int, data: bytes) -> bytes:
        assert self.sealers is not None
        sealer = self.sealers[direction]
        pieces = [data[i : i + MAX_FRAGMENT] for i in range(0, len(data), MAX_FRAGMENT)]
        return b"".join(sealer.seal(content_type, p) for p in pieces or [b""])

    def end_tls_if_done(self) -> None:
        if self.sealers is not None and all(self.closed.values()):
            self.sealers = None

    def exchange(self, e: Exchange) -> None:
        d = e.direction
        if e.kind == "note" or d not in ("c2s", "s2c"):
            if e.note.startswith("TLS up"):
                if self.sealers is None:
                    self.start_tls(e.t)
            elif d in ("c2s", "s2c") and e.note.startswith(("R5:", "R6:")):
                # The engine saw this side close TCP (R5: unanswered close_notify,
                # R6: EOF while TLS is up); the probe records no separate eof then.
                self.fin(e.t, d, f"harness note [{d}]: {e.note}")
            else:
                text = e.note + (f": {e.data.decode('latin-1')!r}" if e.data else "")
                self.pending.append(f"harness note [{d}]: {text}")
            return
        if e.kind in ("tls", "close_notify") and self.sealers is None:
            self.start_tls(e.t)
        if e.kind == "tls":
            self.data(e.t, d, self.seal(d, CT_APPDATA, e.data), e.note)
        elif e.kind == "close_notify":
            self.data(e.t, d, self.seal(d, CT_ALERT, b"\x01\x00"), e.note or "close_notify")
            self.closed[d] = True
            self.end_tls_if_done()
        elif e.kind == "alert":
            code = _alert_code(e.note)
            if code is None:
                self.pending.append(f"alert [{d}] not synthesised: {e.note}")
                return
            alert = bytes([1 if code in (0, 90) else 2, code])
            note = f"alert {e.note}"
            if self.sealers is not None:
                self.data(e.t, d, self.seal(d, CT_ALERT, alert), note)
            else:
                self.data(e.t, d, _record(CT_ALERT, alert), note)
        elif e.kind == "injected":
            self.injected(e)
        elif e.kind == "eof":
            if "reset" in e.note.lower() or "rst" in e.note.lower():
                self.emit(e.t, d, RST | ACK, b"", e.note)
            else:
                self.fin(e.t, d, e.note)
        elif e.kind == "tls-wire":
            if e.data:
                if d == "c2s" and e.data[:1] == b"\x16" and e.data[5:6] == b"\x01":
                    self.seen_random = e.data[11:43]  # header 5, type+length 4, version 2
                self.data(e.t, d, e.data, e.note or "TLS record as received")
            else:
                self.pending.append(f"TLS record [{d}] not kept by the evidence: {e.note}")
        elif e.data:  # plaintext and anything else that carries bytes
            self.data(e.t, d, e.data, e.note)
        elif e.note:
            self.pending.append(f"{e.kind} [{d}]: {e.note}")

    def injected(self, e: Exchange) -> None:
        note = e.note if e.note.startswith("injected") else f"injected by the harness: {e.note}"
        if e.data:
            self.data(e.t, e.direction, e.data, note.rstrip(": "))
        elif e.note.startswith("RST"):
            self.emit(e.t, e.direction, RST | ACK, b"", note)
        elif e.note.startswith("FIN"):
            self.fin(e.t, e.direction, note)
        else:
            self.pending.append(note)

    def fin(self, t: float, direction: str, note: str) -> None:
        if self.tcp.open[direction]:
            self.emit(t, direction, FIN | ACK, b"", note)
            self.tcp.open[direction] = False
            self.emit(t, _Tcp.other(direction), ACK)
        elif note:
            self.pending.append(note)

    def blocks(self) -> List[bytes]:
        if self.pending and self.packets:  # notes after the last packet ride on it
            self.packets[-1][2].extend(self.pending)
            self.pending = []
        return [epb_block(frame, ts, comments) for frame, ts, comments in self.packets]


def _sessions(keylog: Optional[bytes]) -> List[_Session]:
    """The key log's TLS sessions, in the order they first appear."""
    if not keylog:
        return []
    out = []
    for random, secrets in parse_keylog(keylog.decode("ascii", "replace")).items():
        for version in ("1.3", "1.2"):
            if _covers(version, secrets):
                out.append(_Session(version, random, dict(secrets)))
                break
    return out


def capture_bytes(
    evidence: Evidence,
    keylog: Optional[bytes],
    *,
    service_port: Optional[int] = None,
    client: Optional[Tuple[str, int]] = None,
    server: Optional[Tuple[str, int]] = None,
    tls_version: str = "1.3",
    comment: str = "",
    start_time: Optional[float] = None,
) -> bytes:
    """The pcapng file for ``evidence`` (see the module docstring)."""
    if server is None:
        server = ("127.0.0.1", service_port or 25)
    client = client or ("127.0.0.1", 49152)
    exchanges = evidence.exchanges
    if start_time is None:  # written right after the run: its last exchange was "now"
        start_time = time.time() - (exchanges[-1].t if exchanges else 0.0)
    tcp = _Tcp(
        ends={"c2s": (_ip(client[0]), client[1]), "s2c": (_ip(server[0]), server[1])},
        seq={"c2s": 0x10000000, "s2c": 0x20000000},
    )
    writer = _Writer(tcp, start_time, _sessions(keylog), tls_version)
    writer.open_tcp(0.0)
    for e in exchanges:
        writer.exchange(e)
    secrets = keylog or b""
    if writer.extra_keys:
        if secrets and not secrets.endswith(b"\n"):
            secrets += b"\n"
        secrets += b"# synthesised by starttls-harness: the run kept no key log for these\n"
        secrets += "".join(f"{line}\n" for line in writer.extra_keys).encode("ascii")
    section = (
        "starttls-harness evidence as synthesised TCP over loopback; plaintext and "
        "injected bytes are the real bytes; TLS records are re-encrypted from the "
        "decrypted evidence with the run's key log (handshake messages are placeholders)"
    )
    if comment:
        section = f"{comment}\n{section}"
    head = [shb_block(section), idb_block()]
    if secrets:
        head.append(dsb_block(secrets))
    return b"".join(head + writer.blocks())


# --- the real bytes ---------------------------------------------------------------

_INJECTED = "injected by the harness"


def _injected_note(segment: bytes, pieces: List[bytes]) -> str:
    """The packet comment of a segment that carries injected bytes: which ones, where."""
    parts, start = [], 0
    for piece in pieces:
        at = segment.find(piece, start)
        if at < 0:
            parts.append(f"{piece!r}")
            continue
        parts.append(f"bytes {at}-{at + len(piece)} of this segment: {piece!r}")
        start = at + len(piece)
    where = "; ".join(parts) or "this segment"
    return f"{_INJECTED} (put on the wire around the rules): {where}"


def _end(address: Optional[Tuple[str, int]], fallback: Tuple[str, int]) -> Tuple[bytes, int, str]:
    """(IPv4 bytes, port, comment) for a socket address; IPv6 maps onto loopback."""
    if address is None:
        return _ip(fallback[0]), fallback[1], ""
    host, port = address
    try:
        return _ip(host), port, ""
    except ValueError:
        return _ip(fallback[0]), port, f"{host} shown as {fallback[0]}"


def _wire_packets(
    wires: Sequence[Any],
    exchanges: Sequence[Exchange],
    origin: float,
    clock: float,
    service_port: Optional[int] = None,
) -> List[Tuple[bytes, float, List[str]]]:
    """Packets of the real connections, in time order, with the harness's notes.

    ``origin`` is the evidence's monotonic start, ``clock`` what to add to a
    monotonic time to get wall-clock time.  A server port other than
    ``service_port`` is shown as ``service_port`` (Wireshark picks the
    SMTP/IMAP dissector, which follows STARTTLS, by port), and the first
    packet's comment gives the real one.
    """
    events: List[Tuple[float, int, int, str, str, bytes]] = []
    tcps: List[_Tcp] = []
    for n, wire in enumerate(wires):
        local_is_client = True
        segments = list(wire.segments)
        client_addr, server_addr = wire.local, wire.peer
        if getattr(wire, "server_side", False):
            local_is_client = False
            client_addr, server_addr = wire.peer, wire.local
        c_ip, c_port, c_note = _end(client_addr, ("127.0.0.1", 49152 + n))
        s_ip, s_port, s_note = _end(server_addr, ("127.0.0.2", service_port or 25))
        if service_port and s_port != service_port:
            s_note = ", ".join(
                x for x in (s_note, f"server port {s_port} shown as {service_port}") if x
            )
            s_port = service_port
        tcps.append(
            _Tcp(
                ends={"c2s": (c_ip, c_port), "s2c": (s_ip, s_port)},
                seq={"c2s": 0x10000000 + n * 0x1000000, "s2c": 0x20000000 + n * 0x1000000},
            )
        )
        first = segments[0][0] if segments else origin
        notes = "; ".join(x for x in (c_note, s_note) if x)
        events.append((first, 0, n, "c2s", "open", notes.encode()))
        marks = getattr(wire, "injected", {})
        for i, (t, direction, what, data) in enumerate(segments):
            outgoing = direction == "out"
            d = "c2s" if outgoing == local_is_client else "s2c"
            if what == "injected":
                what = _injected_note(data, marks.get(i, []))
            events.append((t, 1, n, d, what, data))
    for e in exchanges:
        if e.kind == "note" or e.direction not in ("c2s", "s2c"):
            text = e.note + (f": {e.data.decode('latin-1')!r}" if e.data else "")
            events.append((origin + e.t, 2, -1, e.direction, "note", text.encode("utf-8")))
    events.sort(key=lambda x: (x[0], x[1] == 2))
    packets: List[Tuple[bytes, float, List[str]]] = []
    pending: List[str] = []

    def emit(tcp: _Tcp, t: float, d: str, flags: int, payload: bytes, notes: List[str]) -> None:
        comments = [*pending, *notes]
        pending.clear()
        for i in range(0, max(len(payload), 1), MAX_SEGMENT):
            packets.append((tcp.frame(d, flags, payload[i : i + MAX_SEGMENT]), t + clock, comments))
            comments = []

    for t, _, n, d, what, data in events:
        if n < 0:
            pending.append(f"harness note [{d}]: {data.decode('utf-8')}")
            continue
        tcp = tcps[n]
        if what == "open":
            note = [data.decode()] if data else []
            emit(tcp, t, "c2s", SYN, b"", note)
            emit(tcp, t, "s2c", SYN | ACK, b"", [])
            emit(tcp, t, "c2s", ACK, b"", [])
        elif what == "data":
            emit(tcp, t, d, PSH | ACK, data, [])
        elif what.startswith(_INJECTED):
            emit(tcp, t, d, PSH | ACK, data, [what])
        elif what == "eof" and tcp.open[d]:
            emit(tcp, t, d, FIN | ACK, b"", [])
            tcp.open[d] = False
            emit(tcp, t, _Tcp.other(d), ACK, b"", [])
        elif what in ("reset", "abort") and (tcp.open["c2s"] or tcp.open["s2c"]):
            emit(tcp, t, d, RST | ACK, b"", [])
            tcp.open = {"c2s": False, "s2c": False}
    if pending and packets:
        packets[-1][2].extend(pending)
    return packets


def wire_capture_bytes(
    evidence: Evidence,
    keylog: Optional[bytes],
    *,
    comment: str = "",
    service_port: Optional[int] = None,
) -> Optional[bytes]:
    """The pcapng of the real bytes ``evidence.wires`` kept, or None if it kept none.

    ``service_port``: see :func:`_wire_packets` (None keeps the real ports).
    """
    wires = [w for w in evidence.wires if w is not None and w.segments]
    if not wires:
        return None
    clock = time.time() - time.monotonic()
    packets = _wire_packets(wires, evidence.exchanges, evidence.start, clock, service_port)
    section = (
        "starttls-harness: the real bytes of the conversation as the harness's socket "
        "sent and received them, in order (TCP headers synthesised; ports as on the wire); "
        "the Decryption Secrets Block holds the run's TLS key log"
    )
    if comment:
        section = f"{comment}\n{section}"
    head = [shb_block(section), idb_block()]
    if keylog:
        head.append(dsb_block(keylog))
    return b"".join(head + [epb_block(f, ts, c) for f, ts, c in packets])


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
    finally:
        if fd != -1:
            os.close(fd)


def write_capture(
    path: Union[str, os.PathLike[str]],
    evidence: Evidence,
    keylog: Optional[bytes],
    *,
    service_port: Optional[int] = None,
    client: Optional[Tuple[str, int]] = None,
    server: Optional[Tuple[str, int]] = None,
    tls_version: str = "1.3",
    comment: str = "",
    start_time: Optional[float] = None,
) -> Path:
    """Write the capture of ``evidence`` to ``path`` (mode 0600); return the path."""
    data = capture_bytes(
        evidence,
        keylog,
        service_port=service_port,
        client=client,
        server=server,
        tls_version=tls_version,
        comment=comment,
        start_time=start_time,
    )
    out = Path(path)
    _write_private(out, data)
    return out


def file_stem(result: Result) -> str:
    """``[<target>-]<id>-<dialect>-tls<version>``: unique within a multi-target run."""
    stem = f"{result.id}-{result.dialect}-tls{result.tls_version}"
    if result.target:
        slug = re.sub(r"[^A-Za-z0-9.-]+", "_", result.target).strip("_")
        stem = f"{slug}-{stem}"
    return stem


def capture_result(
    result: Result,
    directory: Union[str, os.PathLike[str]],
    *,
    client: Optional[Tuple[str, int]] = None,
    service_port: Optional[int] = None,
    server: Optional[Tuple[str, int]] = None,
    start_time: Optional[float] = None,
    real_ports: bool = False,
) -> Path:
    """``<directory>/[<target>-]<id>-<dialect>-tls<version>.pcapng`` for one result.

    The real bytes when the run kept them (``evidence.wires``); else the
    synthesis from the evidence (the section comment says FALLBACK).  The
    server port is shown as the dialect's well-known port unless
    ``real_ports`` (the real one is in a packet comment).
    """
    keylog = None
    if result.evidence.keylog and Path(result.evidence.keylog).exists():
        keylog = Path(result.evidence.keylog).read_bytes()
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    where = f"{result.target}: " if result.target else ""
    comment = f"{where}{result.id} [{result.dialect}, TLS {result.tls_version}]: "
    comment += f"{result.verdict.value} -- {result.summary}"
    if result.rule:
        comment += f" (rule {result.rule})"
    path = folder / f"{file_stem(result)}.pcapng"
    port = None if real_ports else service_port
    real = wire_capture_bytes(result.evidence, keylog, comment=comment, service_port=port)
    if real is not None:
        _write_private(path, real)
        return path
    comment += (
        "\nFALLBACK: the run kept no real bytes of this conversation; what follows is "
        "synthesised from the evidence"
    )
    return write_capture(
        path,
        result.evidence,
        keylog,
        service_port=service_port,
        client=client,
        server=server,
        tls_version=result.tls_version,
        comment=comment,
        start_time=start_time,
    )
