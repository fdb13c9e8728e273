"""TLS 1.3 record decryption from an NSS key log, to recognise close_notify.

Theory of operation
-------------------
In TLS 1.3 every record after the ServerHello is wrapped as outer type 23
(application_data); the real content type (alert, handshake, data) is the last
non-zero byte of the decrypted TLSInnerPlaintext (RFC 8446 §5.2).  An on-path
proxy therefore cannot tell a close_notify from ordinary data without keys.
The client under test writes its traffic secrets to an ``SSLKEYLOGFILE``
(NSS key log format), keyed by the 32-byte ClientHello.random, which the proxy
sees in clear.  From those pieces:

* ``client_random`` comes from the ClientHello, the cipher suite (hence hash,
  key length and AEAD) and the negotiated version from the ServerHello.
* Each direction has its own secret.  Records start under the handshake
  traffic secret; after that direction's Finished message the sender switches
  to ``*_TRAFFIC_SECRET_0``; a KeyUpdate moves to the next generation
  (HKDF-Expand-Label(secret, "traffic upd")).  Sequence numbers restart at 0
  with every key.  Key and IV come from HKDF-Expand-Label(secret, "key"/"iv").
* The nonce is the IV XOR the 64-bit sequence number (left-padded); the AAD is
  the 5-byte record header.

The decryptor follows Finished/KeyUpdate messages it decrypts, and as a safety
net also retries a record that fails authentication with the *next* epoch's
key at sequence 0 (handshake -> application, application N -> N+1) and keeps
that key if it works.  A record that fails both is a hard
:class:`DecryptionError`: a wrong or foreign key log must never pass silently.

OpenSSL appends key log lines while the handshake runs, and the client only
learns (and logs) the handshake secrets after the proxy has already relayed
the server's first encrypted records.  So secrets are looked up through a
``secrets_provider`` callable that re-reads the log on every miss; a miss that
persists raises :class:`SecretsUnavailable` *without* changing any state, and
:class:`Tls13Follower` queues such records and retries them on later calls.
The proxy must keep relaying meanwhile: blocking until the key appears could
deadlock, because the client writes the key only after receiving those bytes.

TLS 1.2 is classified without decryption: alerts keep outer type 21 there,
and any alert after a direction's ChangeCipherSpec is reported as an
(assumed) close_notify.  Where the key log has the connection's
``CLIENT_RANDOM`` line (its master secret) and the suite is one of the AEAD
suites the peers use (AES-GCM, RFC 5288; ChaCha20-Poly1305, RFC 7905), the
application data is decrypted too (:class:`Tls12Decryptor`: key block from
the TLS 1.2 PRF, RFC 5246 §5 and §6.3; sequence numbers from 0 at each
direction's ChangeCipherSpec).  Only the text of application data is handed
on (``FollowedRecord.clear``, for TLS 1.3 as well), so the path judge can
count commands and replies; how records are classified does not change.
0-RTT early data is not supported.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import struct
import time
from dataclasses import dataclass, field
from typing import (
    Callable,
    Deque,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from starttls_harness.tls.records import (
    CLOSE_NOTIFY,
    CT_ALERT,
    CT_APPLICATION_DATA,
    CT_HANDSHAKE,
    Record,
)

# --- key log -----------------------------------------------------------------

CLIENT_RANDOM = "CLIENT_RANDOM"
CLIENT_EARLY_TRAFFIC_SECRET = "CLIENT_EARLY_TRAFFIC_SECRET"
CLIENT_HANDSHAKE_TRAFFIC_SECRET = "CLIENT_HANDSHAKE_TRAFFIC_SECRET"
SERVER_HANDSHAKE_TRAFFIC_SECRET = "SERVER_HANDSHAKE_TRAFFIC_SECRET"
CLIENT_TRAFFIC_SECRET_0 = "CLIENT_TRAFFIC_SECRET_0"
SERVER_TRAFFIC_SECRET_0 = "SERVER_TRAFFIC_SECRET_0"
EXPORTER_SECRET = "EXPORTER_SECRET"

Secrets = Dict[bytes, Dict[str, bytes]]
SecretsMapping = Mapping[bytes, Mapping[str, bytes]]
SecretsProvider = Callable[[], SecretsMapping]

C2S = "c2s"
S2C = "s2c"
DIRECTIONS = (C2S, S2C)


class KeylogError(Exception):
    """Base class for everything this module raises about decryption."""


class SecretsUnavailable(KeylogError):
    """The key log has no (or not yet) the secret this record needs.

    Nothing was consumed: the same record may be retried later.
    """


class DecryptionError(KeylogError):
    """A record failed authentication with every plausible key.

    Almost always means the key log belongs to another connection or the
    follower lost track of the record sequence.
    """


class UnsupportedCipherSuite(KeylogError):
    """The ServerHello chose a suite this module cannot decrypt."""


class HandshakeParseError(KeylogError, ValueError):
    """A clear-text ClientHello/ServerHello could not be parsed."""


def parse_keylog(text: str) -> Secrets:
    """Parse NSS key log text into ``{client_random: {label: secret}}``.

    Comments, blank lines and malformed lines are skipped -- the file is
    appended to while we read it, so a torn last line is normal.  Later lines
    win over earlier ones.
    """
    secrets: Secrets = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 3 or fields[0].startswith("#"):
            continue
        label, random_hex, secret_hex = fields
        try:
            client_random = bytes.fromhex(random_hex)
            secret = bytes.fromhex(secret_hex)
        except ValueError:
            continue
        # A torn line can still be valid hex; lengths weed most of those out.
        if len(client_random) != 32 or len(secret) not in (32, 48):
            continue
        secrets.setdefault(client_random, {})[label] = secret
    return secrets


def read_keylog(path: Union[str, os.PathLike[str]]) -> Secrets:
    """Parse the key log at ``path``; a file not yet created yields ``{}``."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return parse_keylog(handle.read())
    except FileNotFoundError:
        return {}


def keylog_file_provider(path: Union[str, os.PathLike[str]]) -> SecretsProvider:
    """A ``secrets_provider`` that re-reads ``path`` each time it is called."""

    def provider() -> SecretsMapping:
        return read_keylog(path)

    return provider


# --- key schedule --------------------------------------------------------------

_AeadFactory = Callable[[bytes], Union[AESGCM, ChaCha20Poly1305]]


@dataclass(frozen=True)
class CipherSuite:
    """The parameters of a TLS 1.3 cipher suite that record decryption needs."""

    code: int
    name: str
    hash_factory: Callable[[], hashes.HashAlgorithm]
    key_length: int
    aead_factory: _AeadFactory

    @property
    def hash_length(self) -> int:
        return self.hash_factory().digest_size


TLS_AES_128_GCM_SHA256 = 0x1301
TLS_AES_256_GCM_SHA384 = 0x1302
TLS_CHACHA20_POLY1305_SHA256 = 0x1303

CIPHER_SUITES: Dict[int, CipherSuite] = {
    TLS_AES_128_GCM_SHA256: CipherSuite(
        TLS_AES_128_GCM_SHA256, "TLS_AES_128_GCM_SHA256", hashes.SHA256, 16, AESGCM
    ),
    TLS_AES_256_GCM_SHA384: CipherSuite(
        TLS_AES_256_GCM_SHA384, "TLS_AES_256_GCM_SHA384", hashes.SHA384, 32, AESGCM
    ),
    TLS_CHACHA20_POLY1305_SHA256: CipherSuite(
        TLS_CHACHA20_POLY1305_SHA256,
        "TLS_CHACHA20_POLY1305_SHA256",
        hashes.SHA256,
        32,
        ChaCha20Poly1305,
    ),
}

AEAD_IV_LENGTH = 12


def get_cipher_suite(code: int) -> CipherSuite:
    try:
        return CIPHER_SUITES[code]
    except KeyError:
        raise UnsupportedCipherSuite(
            f"cipher suite 0x{code:04x} is not supported for decryption"
        ) from None


def hkdf_expand_label(
    secret: bytes,
    label: Union[str, bytes],
    context: bytes,
    length: int,
    algorithm: Optional[hashes.HashAlgorithm] = None,
) -> bytes:
    """HKDF-Expand-Label from RFC 8446 §7.1 (SHA-256 unless told otherwise)."""
    if isinstance(label, str):
        label = label.encode("ascii")
    full_label = b"tls13 " + label
    info = (
        struct.pack("!HB", length, len(full_label))
        + full_label
        + struct.pack("!B", len(context))
        + context
    )
    hkdf = HKDFExpand(
        algorithm=algorithm if algorithm is not None else hashes.SHA256(),
        length=length,
        info=info,
    )
    return hkdf.derive(secret)


def traffic_key_and_iv(secret: bytes, suite: CipherSuite) -> Tuple[bytes, bytes]:
    """Record protection key and IV for one traffic secret (RFC 8446 §7.3)."""
    algorithm = suite.hash_factory()
    key = hkdf_expand_label(secret, "key", b"", suite.key_length, algorithm)
    iv = hkdf_expand_label(secret, "iv", b"", AEAD_IV_LENGTH, algorithm)
    return key, iv


def next_traffic_secret(secret: bytes, suite: CipherSuite) -> bytes:
    """application_traffic_secret_N+1 after a KeyUpdate (RFC 8446 §7.2)."""
    return hkdf_expand_label(secret, "traffic upd", b"", suite.hash_length, suite.hash_factory())


# --- clear-text hello parsing ---------------------------------------------------

HS_CLIENT_HELLO = 1
HS_SERVER_HELLO = 2
HS_FINISHED = 20
HS_KEY_UPDATE = 24
EXT_SUPPORTED_VERSIONS = 43
TLS13_VERSION = 0x0304
# ServerHello.random that marks a HelloRetryRequest (RFC 8446 §4.1.3).
HELLO_RETRY_REQUEST_RANDOM = hashlib.sha256(b"HelloRetryRequest").digest()


def _handshake_body(payload: bytes, expected_type: int, what: str) -> bytes:
    if len(payload) < 4 or payload[0] != expected_type:
        raise HandshakeParseError(f"not a {what}: {payload[:8].hex()}")
    length = int.from_bytes(payload[1:4], "big")
    body = payload[4 : 4 + length]
    if len(body) < length:
        raise HandshakeParseError(f"truncated {what} ({len(body)}/{length} bytes)")
    return body


def client_random_from_client_hello(record_payload: bytes) -> bytes:
    """ClientHello.random from a handshake payload starting with the ClientHello.

    Only the first 38 bytes are needed, so a ClientHello spread over several
    records still works with just the first record's payload.
    """
    if len(record_payload) < 38 or record_payload[0] != HS_CLIENT_HELLO:
        raise HandshakeParseError(f"not the start of a ClientHello: {record_payload[:8].hex()}")
    return bytes(record_payload[6:38])


@dataclass(frozen=True)
class ServerHello:
    random: bytes
    cipher_suite: int
    version: int  # negotiated: supported_versions if present, else legacy_version

    @property
    def is_hello_retry_request(self) -> bool:
        return self.random == HELLO_RETRY_REQUEST_RANDOM


def parse_server_hello(payload: bytes) -> ServerHello:
    """Parse a ServerHello (or HelloRetryRequest) handshake message."""
    body = _handshake_body(payload, HS_SERVER_HELLO, "ServerHello")
    try:
        (legacy_version,) = struct.unpack_from("!H", body, 0)
        random = body[2:34]
        session_id_length = body[34]
        pos = 35 + session_id_length
        (cipher_suite,) = struct.unpack_from("!H", body, pos)
        pos += 3  # cipher suite + legacy_compression_method
        version = legacy_version
        if pos + 2 <= len(body):
            (extensions_length,) = struct.unpack_from("!H", body, pos)
            pos += 2
            end = min(pos + extensions_length, len(body))
            while pos + 4 <= end:
                ext_type, ext_length = struct.unpack_from("!HH", body, pos)
                pos += 4
                if ext_type == EXT_SUPPORTED_VERSIONS and ext_length == 2:
                    (version,) = struct.unpack_from("!H", body, pos)
                pos += ext_length
    except (IndexError, struct.error) as exc:
        raise HandshakeParseError(f"truncated ServerHello: {exc}") from None
    if len(random) != 32:
        raise HandshakeParseError("truncated ServerHello random")
    return ServerHello(random=bytes(random), cipher_suite=cipher_suite, version=version)


def cipher_suite_from_server_hello(payload: bytes) -> int:
    """The cipher suite code chosen in a ServerHello handshake message."""
    return parse_server_hello(payload).cipher_suite


def _split_handshake_messages(buffer: bytearray) -> List[Tuple[int, bytes]]:
    """Remove and return the complete ``(type, message)`` items in ``buffer``."""
    messages: List[Tuple[int, bytes]] = []
    while len(buffer) >= 4:
        length = int.from_bytes(buffer[1:4], "big")
        if len(buffer) < 4 + length:
            break
        messages.append((buffer[0], bytes(buffer[: 4 + length])))
        del buffer[: 4 + length]
    return messages


# --- record decryption ---------------------------------------------------------

PHASE_HANDSHAKE = "handshake"
PHASE_APPLICATION = "application"
_Epoch = Tuple[str, int]  # (phase, KeyUpdate generation)
_Opener = Tuple[Union[AESGCM, ChaCha20Poly1305], bytes]

_LABELS = {
    (C2S, PHASE_HANDSHAKE): CLIENT_HANDSHAKE_TRAFFIC_SECRET,
    (S2C, PHASE_HANDSHAKE): SERVER_HANDSHAKE_TRAFFIC_SECRET,
    (C2S, PHASE_APPLICATION): CLIENT_TRAFFIC_SECRET_0,
    (S2C, PHASE_APPLICATION): SERVER_TRAFFIC_SECRET_0,
}


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'c2s' or 's2c', not {direction!r}")


@dataclass
class _DirectionState:
    phase: str = PHASE_HANDSHAKE
    generation: int = 0
    seq: int = 0
    handshake: bytearray = field(default_factory=bytearray)


class Tls13Decryptor:
    """Decrypt the protected records of one TLS 1.3 connection, both directions.

    Records must be passed in wire order per direction, each exactly once
    (sequence numbers are implicit).  ``secrets`` is either a mapping as
    returned by :func:`parse_keylog` or a callable returning one; the callable
    is invoked again whenever a needed secret is missing, then once more after
    each delay in ``retry_delays`` (blocking ``time.sleep``; leave it empty in
    an event loop and retry later on :class:`SecretsUnavailable` instead).
    """

    def __init__(
        self,
        client_random: bytes,
        cipher_suite: int,
        secrets: Union[SecretsProvider, SecretsMapping],
        *,
        retry_delays: Sequence[float] = (),
    ) -> None:
        if len(client_random) != 32:
            raise ValueError("client_random must be 32 bytes")
        self.client_random = bytes(client_random)
        self.suite = get_cipher_suite(cipher_suite)
        if callable(secrets):
            self._provider: Optional[SecretsProvider] = secrets
            self._secrets: SecretsMapping = {}
        else:
            self._provider = None
            self._secrets = secrets
        self._retry_delays = tuple(retry_delays)
        self._states = {direction: _DirectionState() for direction in DIRECTIONS}
        self._openers: Dict[Tuple[str, _Epoch], _Opener] = {}
        self._app_secrets: Dict[Tuple[str, int], bytes] = {}

    @classmethod
    def from_hellos(
        cls,
        client_hello_payload: bytes,
        server_hello_payload: bytes,
        secrets: Union[SecretsProvider, SecretsMapping],
        *,
        retry_delays: Sequence[float] = (),
    ) -> Tls13Decryptor:
        """Build from the clear ClientHello and ServerHello record payloads."""
        return cls(
            client_random_from_client_hello(client_hello_payload),
            cipher_suite_from_server_hello(server_hello_payload),
            secrets,
            retry_delays=retry_delays,
        )

    def phase(self, direction: str) -> str:
        """``"handshake"`` or ``"application"`` for the next record."""
        _check_direction(direction)
        return self._states[direction].phase

    def generation(self, direction: str) -> int:
        """Application key generation (incremented by each KeyUpdate)."""
        _check_direction(direction)
        return self._states[direction].generation

    def sequence(self, direction: str) -> int:
        """Sequence number the next record in ``direction`` will use."""
        _check_direction(direction)
        return self._states[direction].seq

    # secrets

    def _lookup_once(self, label: str) -> Optional[bytes]:
        return self._secrets.get(self.client_random, {}).get(label)

    def _lookup(self, label: str) -> bytes:
        secret = self._lookup_once(label)
        if secret is None and self._provider is not None:
            self._secrets = self._provider()
            secret = self._lookup_once(label)
            for delay in self._retry_delays:
                if secret is not None:
                    break
                time.sleep(delay)
                self._secrets = self._provider()
                secret = self._lookup_once(label)
        if secret is None:
            raise SecretsUnavailable(
                f"key log has no {label} for client_random {self.client_random.hex()}"
            )
        if len(secret) != self.suite.hash_length:
            raise DecryptionError(
                f"{label} is {len(secret)} bytes but {self.suite.name} needs "
                f"{self.suite.hash_length}: key log does not match this connection"
            )
        return secret

    def _traffic_secret(self, direction: str, epoch: _Epoch) -> bytes:
        phase, generation = epoch
        if phase == PHASE_HANDSHAKE:
            return self._lookup(_LABELS[direction, phase])
        cached = self._app_secrets.get((direction, generation))
        if cached is not None:
            return cached
        if generation == 0:
            secret = self._lookup(_LABELS[direction, phase])
        else:
            secret = next_traffic_secret(
                self._traffic_secret(direction, (phase, generation - 1)), self.suite
            )
        self._app_secrets[direction, generation] = secret
        return secret

    def _opener(self, direction: str, epoch: _Epoch) -> _Opener:
        opener = self._openers.get((direction, epoch))
        if opener is None:
            key, iv = traffic_key_and_iv(self._traffic_secret(direction, epoch), self.suite)
            opener = (self.suite.aead_factory(key), iv)
            self._openers[direction, epoch] = opener
        return opener

    # records

    @staticmethod
    def _open(opener: _Opener, seq: int, record: Record) -> bytes:
        aead, iv = opener
        nonce = bytes(a ^ b for a, b in zip(iv, seq.to_bytes(AEAD_IV_LENGTH, "big")))
        return aead.decrypt(nonce, record.payload, record.header)

    @staticmethod
    def _next_epoch(epoch: _Epoch) -> _Epoch:
        phase, generation = epoch
        if phase == PHASE_HANDSHAKE:
            return (PHASE_APPLICATION, 0)
        return (PHASE_APPLICATION, generation + 1)

    def decrypt(self, direction: str, record: Record) -> Tuple[int, bytes]:
        """Decrypt the next protected record of ``direction``.

        Returns ``(inner_content_type, plaintext)``.  Raises
        :class:`SecretsUnavailable` (state untouched, retry later) or
        :class:`DecryptionError` (no key authenticates the record).
        """
        _check_direction(direction)
        if record.content_type != CT_APPLICATION_DATA:
            raise ValueError(
                f"TLS 1.3 protected records have outer type 23, not {record.content_type}"
            )
        state = self._states[direction]
        epoch: _Epoch = (state.phase, state.generation)
        try:
            plaintext = self._open(self._opener(direction, epoch), state.seq, record)
        except InvalidTag:
            # Maybe the sender switched keys at a point we did not see (e.g. a
            # missed Finished or KeyUpdate): try the next epoch from seq 0.
            following = self._next_epoch(epoch)
            try:
                opener = self._opener(direction, following)
            except SecretsUnavailable as exc:
                raise SecretsUnavailable(
                    f"{direction} record #{state.seq} fails with the {epoch[0]} key "
                    f"and the next key is not (yet) available: {exc}"
                ) from exc
            try:
                plaintext = self._open(opener, 0, record)
            except InvalidTag:
                raise DecryptionError(
                    f"{direction} record #{state.seq} ({len(record.payload)} bytes) "
                    f"fails authentication with the {epoch[0]} key (generation "
                    f"{epoch[1]}) and the next one: the key log does not match "
                    f"this connection or records were missed"
                ) from None
            state.phase, state.generation = following
            state.seq = 0
            state.handshake.clear()
        state.seq += 1
        content = plaintext.rstrip(b"\x00")
        if not content:
            raise DecryptionError(f"{direction} record has no inner content type")
        content_type, data = content[-1], content[:-1]
        if content_type == CT_HANDSHAKE:
            self._track_handshake(state, data)
        return content_type, data

    @staticmethod
    def _track_handshake(state: _DirectionState, data: bytes) -> None:
        """Switch keys after Finished/KeyUpdate; both end on a record boundary."""
        state.handshake.extend(data)
        switch = False
        for msg_type, _ in _split_handshake_messages(state.handshake):
            if msg_type == HS_FINISHED and state.phase == PHASE_HANDSHAKE:
                switch = True
            elif msg_type == HS_KEY_UPDATE and state.phase == PHASE_APPLICATION:
                switch = True
        if switch:
            if state.phase == PHASE_HANDSHAKE:
                state.phase, state.generation = PHASE_APPLICATION, 0
            else:
                state.generation += 1
            state.seq = 0
            state.handshake.clear()


# --- TLS 1.2 AEAD decryption -------------------------------------------------------

TLS12_VERSION = 0x0303


@dataclass(frozen=True)
class Tls12Suite:
    """A TLS 1.2 AEAD suite: PRF hash, key length, fixed IV length (4: GCM salt)."""

    code: int
    hash_factory: Callable[[], hashes.HashAlgorithm]
    key_length: int
    fixed_iv_length: int
    aead_factory: _AeadFactory


def _gcm12(code: int, key_length: int, sha384: bool = False) -> Tls12Suite:
    return Tls12Suite(code, hashes.SHA384 if sha384 else hashes.SHA256, key_length, 4, AESGCM)


def _chacha12(code: int) -> Tls12Suite:
    return Tls12Suite(code, hashes.SHA256, 32, 12, ChaCha20Poly1305)


#: The (EC)DHE AEAD suites (RFC 5289, RFC 5288, RFC 7905).
TLS12_SUITES: Dict[int, Tls12Suite] = {
    s.code: s
    for s in (
        _gcm12(0xC02B, 16),
        _gcm12(0xC02C, 32, sha384=True),
        _gcm12(0xC02F, 16),
        _gcm12(0xC030, 32, sha384=True),
        _gcm12(0x009E, 16),
        _gcm12(0x009F, 32, sha384=True),
        _chacha12(0xCCA8),
        _chacha12(0xCCA9),
        _chacha12(0xCCAA),
    )
}


def tls12_prf(
    secret: bytes, label: bytes, seed: bytes, length: int, algorithm: hashes.HashAlgorithm
) -> bytes:
    """The TLS 1.2 PRF: P_hash(secret, label + seed) (RFC 5246 §5)."""
    seed = label + seed
    out = b""
    a = seed
    while len(out) < length:
        a = _hmac(secret, a, algorithm)
        out += _hmac(secret, a + seed, algorithm)
    return out[:length]


def _hmac(key: bytes, data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
    mac = hmac.HMAC(key, type(algorithm)())
    mac.update(data)
    return mac.finalize()


class Tls12Decryptor:
    """Decrypt the application data of one TLS 1.2 connection (AEAD suites).

    Feed every record after a direction's ChangeCipherSpec, in wire order, to
    :meth:`decrypt`.  A missing master secret raises :class:`SecretsUnavailable`
    (nothing consumed); a record that fails authentication raises
    :class:`DecryptionError` and the direction stays unreadable from then on.
    """

    def __init__(
        self,
        client_random: bytes,
        server_random: bytes,
        cipher_suite: int,
        secrets: Union[SecretsProvider, SecretsMapping],
    ) -> None:
        suite = TLS12_SUITES.get(cipher_suite)
        if suite is None:
            raise UnsupportedCipherSuite(
                f"TLS 1.2 cipher suite 0x{cipher_suite:04x} is not supported for decryption"
            )
        self.suite = suite
        self.client_random = bytes(client_random)
        self.server_random = bytes(server_random)
        self._secrets = secrets
        self._keys: Optional[Dict[str, _Opener]] = None
        self._seq = {direction: 0 for direction in DIRECTIONS}
        self._broken: Dict[str, str] = {}

    def _master_secret(self) -> bytes:
        secrets = self._secrets() if callable(self._secrets) else self._secrets
        master = secrets.get(self.client_random, {}).get(CLIENT_RANDOM)
        if master is None or len(master) != 48:
            raise SecretsUnavailable(
                f"key log has no {CLIENT_RANDOM} line for {self.client_random.hex()}"
            )
        return master

    def _openers(self) -> Dict[str, _Opener]:
        if self._keys is None:
            suite = self.suite
            klen, ivlen = suite.key_length, suite.fixed_iv_length
            block = tls12_prf(
                self._master_secret(),
                b"key expansion",
                self.server_random + self.client_random,
                2 * (klen + ivlen),
                suite.hash_factory(),
            )
            ck, sk = block[:klen], block[klen : 2 * klen]
            civ, siv = block[2 * klen : 2 * klen + ivlen], block[2 * klen + ivlen :]
            self._keys = {
                C2S: (suite.aead_factory(ck), civ),
                S2C: (suite.aead_factory(sk), siv),
            }
        return self._keys

    def decrypt(self, direction: str, record: Record) -> bytes:
        """The plaintext of ``direction``'s next protected record."""
        _check_direction(direction)
        if direction in self._broken:
            raise DecryptionError(self._broken[direction])
        aead, iv = self._openers()[direction]
        seq = self._seq[direction]
        self._seq[direction] = seq + 1
        payload = record.payload
        if self.suite.fixed_iv_length == 4:  # GCM: 8-byte explicit nonce first
            nonce, body = iv + payload[:8], payload[8:]
        else:  # ChaCha20-Poly1305: IV xor sequence number
            nonce = bytes(a ^ b for a, b in zip(iv, seq.to_bytes(AEAD_IV_LENGTH, "big")))
            body = payload
        length = len(body) - 16
        aad = struct.pack("!QBHH", seq, record.content_type, record.version, max(length, 0))
        try:
            return aead.decrypt(nonce, body, aad)
        except (InvalidTag, ValueError):
            why = f"{direction} TLS 1.2 record #{seq} fails authentication"
            self._broken[direction] = why
            raise DecryptionError(why) from None


# --- following a whole connection ------------------------------------------------


@dataclass(frozen=True)
class FollowedRecord:
    """A wire record plus what the follower learnt about it.

    ``content_type`` is the inner type for decrypted TLS 1.3 records and the
    outer type otherwise; ``plaintext`` is ``None`` when the record is
    encrypted but was not decrypted (TLS 1.2).
    """

    direction: str
    record: Record
    content_type: int
    plaintext: Optional[bytes]
    encrypted: bool
    #: The text of a decrypted application data record (TLS 1.3, or TLS 1.2
    #: with the master secret); None when it could not be read.
    clear: Optional[bytes] = None

    @property
    def decrypted(self) -> bool:
        return self.encrypted and self.plaintext is not None

    @property
    def is_alert(self) -> bool:
        return self.content_type == CT_ALERT

    @property
    def is_application_data(self) -> bool:
        return self.content_type == CT_APPLICATION_DATA

    @property
    def alert(self) -> Optional[Tuple[int, int]]:
        """``(level, description)`` when the alert's bytes are readable."""
        if not self.is_alert or self.plaintext is None or len(self.plaintext) != 2:
            return None
        return self.plaintext[0], self.plaintext[1]

    @property
    def close_notify_assumed(self) -> bool:
        """An encrypted, undecrypted alert (TLS 1.2): assumed to be close_notify."""
        return self.is_alert and self.plaintext is None

    @property
    def is_close_notify(self) -> bool:
        """close_notify, read from the alert -- or assumed, see above."""
        if self.close_notify_assumed:
            return True
        alert = self.alert
        return alert is not None and alert[1] == CLOSE_NOTIFY


class Tls13Follower:
    """Follow one connection's records and classify them, decrypting TLS 1.3.

    Feed every record of each direction in wire order.  The follower reads the
    client random and the negotiated version/cipher suite from the clear
    ClientHello/ServerHello, then decrypts TLS 1.3 records with secrets from
    ``secrets`` (see :class:`Tls13Decryptor`).

    Records whose secret is not in the key log yet are queued per direction
    and released, in order, by later :meth:`feed` / :meth:`poll` calls, so
    :meth:`feed` may return zero or several results.

    TLS 1.2 is followed without decryption.  There alerts keep outer type 21,
    so an alert record after that direction's ChangeCipherSpec is reported as
    encrypted and *assumed* to be close_notify: its level and description are
    ciphertext, and a fatal alert (e.g. bad_record_mac) would be reported the
    same way.  ``FollowedRecord.close_notify_assumed`` marks that guess.
    """

    def __init__(
        self,
        secrets: Union[SecretsProvider, SecretsMapping],
        *,
        retry_delays: Sequence[float] = (),
    ) -> None:
        self._secrets = secrets
        self._retry_delays = tuple(retry_delays)
        self.client_random: Optional[bytes] = None
        self.server_hello: Optional[ServerHello] = None
        self.decryptor: Optional[Tls13Decryptor] = None
        self._queues: Dict[str, Deque[Record]] = {
            direction: collections.deque() for direction in DIRECTIONS
        }
        self._handshake = {direction: bytearray() for direction in DIRECTIONS}
        self._ccs_seen = {direction: False for direction in DIRECTIONS}
        self._tls12: Optional[Tls12Decryptor] = None
        self._tls12_tried = False

    @property
    def version(self) -> Optional[int]:
        """Negotiated protocol version (0x0304 = TLS 1.3), once known."""
        if self.server_hello is None:
            return None
        return self.server_hello.version

    @property
    def cipher_suite(self) -> Optional[int]:
        return None if self.server_hello is None else self.server_hello.cipher_suite

    def pending(self, direction: str) -> int:
        """How many records of ``direction`` wait for key log secrets."""
        _check_direction(direction)
        return len(self._queues[direction])

    def feed(self, direction: str, record: Record) -> List[FollowedRecord]:
        """Add the next record of ``direction``; return records now classified."""
        _check_direction(direction)
        self._queues[direction].append(record)
        return self._drain(direction)

    def poll(self) -> List[FollowedRecord]:
        """Retry queued records of both directions (e.g. on a timer)."""
        results: List[FollowedRecord] = []
        for direction in DIRECTIONS:
            results.extend(self._drain(direction))
        return results

    def is_close_notify(self, direction: str, record: Record) -> bool:
        """Feed ``record``; True if it (or a queued ``direction`` record released
        with it) is a close_notify.

        Raises :class:`SecretsUnavailable` if ``record`` could not be decided
        yet: it stays queued and will come out of a later :meth:`feed`/:meth:`poll`.
        """
        results = self.feed(direction, record)
        if not any(result.record is record for result in results):
            raise SecretsUnavailable(
                f"{direction} record queued until the key log has its secret "
                f"({self.pending(direction)} pending)"
            )
        return any(result.is_close_notify for result in results)

    def _drain(self, direction: str) -> List[FollowedRecord]:
        queue = self._queues[direction]
        results: List[FollowedRecord] = []
        while queue:
            try:
                results.append(self._classify(direction, queue[0]))
            except SecretsUnavailable:
                break
            queue.popleft()
        return results

    def _classify(self, direction: str, record: Record) -> FollowedRecord:
        version = self.version
        if version is None:
            if record.content_type == CT_APPLICATION_DATA:
                raise KeylogError(
                    f"{direction} application data before the ServerHello "
                    "(0-RTT early data is not supported)"
                )
            return self._plain(direction, record)
        if version >= TLS13_VERSION:
            if record.content_type != CT_APPLICATION_DATA:
                # CCS (middlebox compatibility) and pre-key alerts stay clear.
                return self._plain(direction, record)
            inner_type, plaintext = self._tls13_decryptor().decrypt(direction, record)
            clear = plaintext if inner_type == CT_APPLICATION_DATA else None
            return FollowedRecord(direction, record, inner_type, plaintext, True, clear)
        if self._ccs_seen[direction]:
            clear = self._tls12_clear(direction, record)
            return FollowedRecord(direction, record, record.content_type, None, True, clear)
        if record.is_ccs:
            self._ccs_seen[direction] = True
        return self._plain(direction, record)

    def _tls12_clear(self, direction: str, record: Record) -> Optional[bytes]:
        """The text of a TLS 1.2 application data record, when it can be read.

        Every protected record goes through the decryptor (sequence numbers);
        a missing secret or an unsupported suite only leaves the text unread.
        """
        if self._tls12 is None and not self._tls12_tried:
            self._tls12_tried = True
            hello = self.server_hello
            if self.client_random is not None and hello is not None and self._secrets:
                with contextlib.suppress(UnsupportedCipherSuite):
                    self._tls12 = Tls12Decryptor(
                        self.client_random, hello.random, hello.cipher_suite, self._secrets
                    )
        if self._tls12 is None:
            return None
        try:
            plaintext = self._tls12.decrypt(direction, record)
        except SecretsUnavailable:
            self._tls12 = None  # no master secret: nothing of this connection is readable
            return None
        except DecryptionError:
            return None
        return plaintext if record.content_type == CT_APPLICATION_DATA else None

    def _tls13_decryptor(self) -> Tls13Decryptor:
        if self.decryptor is None:
            if self.client_random is None or self.server_hello is None:
                raise KeylogError("encrypted record before both hellos were seen")
            self.decryptor = Tls13Decryptor(
                self.client_random,
                self.server_hello.cipher_suite,
                self._secrets,
                retry_delays=self._retry_delays,
            )
        return self.decryptor

    def _plain(self, direction: str, record: Record) -> FollowedRecord:
        if record.is_handshake and self._wants_hello(direction):
            buffer = self._handshake[direction]
            buffer.extend(record.payload)
            for msg_type, message in _split_handshake_messages(buffer):
                if msg_type == HS_CLIENT_HELLO and direction == C2S:
                    self.client_random = client_random_from_client_hello(message)
                elif msg_type == HS_SERVER_HELLO and direction == S2C:
                    hello = parse_server_hello(message)
                    if not hello.is_hello_retry_request:
                        self.server_hello = hello
                if not self._wants_hello(direction):
                    buffer.clear()
                    break
        return FollowedRecord(direction, record, record.content_type, record.payload, False)

    def _wants_hello(self, direction: str) -> bool:
        if direction == C2S:
            return self.client_random is None
        return self.server_hello is None


# The follower handles TLS 1.2 as well; a version-neutral alias reads better.
TlsFollower = Tls13Follower
