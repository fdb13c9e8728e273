"""Sans-I/O TLS record splitter.

An on-path proxy relays opaque bytes; to spot close_notify alerts it must know
where TLS records begin and end.  :class:`RecordSplitter` turns an arbitrary
chunking of one direction of a byte stream into whole :class:`Record` objects,
and refuses (with :class:`NotTLSError`) as soon as the bytes at a record
boundary cannot be a TLS record header -- which is how a STARTTLS proxy notices
that a peer is still (or again) talking plaintext.

No I/O happens here: callers feed bytes they have read and act on the result.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

# Record content types (RFC 8446 §5.1, RFC 6520 for heartbeat).
CT_CHANGE_CIPHER_SPEC = 20
CT_ALERT = 21
CT_HANDSHAKE = 22
CT_APPLICATION_DATA = 23
CT_HEARTBEAT = 24
CONTENT_TYPES = frozenset(
    {CT_CHANGE_CIPHER_SPEC, CT_ALERT, CT_HANDSHAKE, CT_APPLICATION_DATA, CT_HEARTBEAT}
)

CONTENT_TYPE_NAMES: Dict[int, str] = {
    CT_CHANGE_CIPHER_SPEC: "change_cipher_spec",
    CT_ALERT: "alert",
    CT_HANDSHAKE: "handshake",
    CT_APPLICATION_DATA: "application_data",
    CT_HEARTBEAT: "heartbeat",
}

# Alert levels and the descriptions most relevant to connection teardown.
ALERT_LEVEL_WARNING = 1
ALERT_LEVEL_FATAL = 2
CLOSE_NOTIFY = 0
USER_CANCELED = 90

ALERT_DESCRIPTION_NAMES: Dict[int, str] = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    22: "record_overflow",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    86: "inappropriate_fallback",
    90: "user_canceled",
    109: "missing_extension",
    110: "unsupported_extension",
    112: "unrecognized_name",
    113: "bad_certificate_status_response",
    115: "unknown_psk_identity",
    116: "certificate_required",
    120: "no_application_protocol",
}

HEADER_LEN = 5
# TLS 1.2 allows ciphertext up to 2^14 + 2048 bytes (RFC 5246 §6.2.3); TLS 1.3
# is stricter (2^14 + 256), so the looser bound accepts both.
MAX_RECORD_PAYLOAD = 16384 + 2048
# Highest record-layer minor version we accept: 0 = SSL 3.0 ... 4 = TLS 1.3
# (TLS 1.3 records normally say 0x0303, but be lenient).
MAX_MINOR_VERSION = 4


class NotTLSError(ValueError):
    """The bytes at a record boundary cannot start a TLS record.

    ``offset`` is the position of the boundary in the whole stream fed so far,
    ``data`` the buffered bytes starting at that boundary (what the peer sent
    instead of a record), and ``records`` any records that were completed by
    the same :meth:`RecordSplitter.feed` call before the bad boundary, so that
    raising does not lose them.
    """

    def __init__(
        self,
        offset: int,
        data: bytes,
        reason: str = "not a TLS record header",
        records: Sequence[Record] = (),
    ) -> None:
        self.offset = offset
        self.data = bytes(data)
        self.reason = reason
        self.records: List[Record] = list(records)
        super().__init__(f"{reason} at stream offset {offset}: {self.data[:32]!r}")


@dataclass(frozen=True)
class Record:
    """One TLS record as seen on the wire (possibly encrypted)."""

    content_type: int
    version: int
    payload: bytes
    raw: bytes

    @property
    def header(self) -> bytes:
        """The 5-byte record header (the AEAD additional data in TLS 1.3)."""
        return self.raw[:HEADER_LEN]

    @property
    def is_alert(self) -> bool:
        return self.content_type == CT_ALERT

    @property
    def is_application_data(self) -> bool:
        return self.content_type == CT_APPLICATION_DATA

    @property
    def is_handshake(self) -> bool:
        return self.content_type == CT_HANDSHAKE

    @property
    def is_ccs(self) -> bool:
        return self.content_type == CT_CHANGE_CIPHER_SPEC

    def plain_alert(self, encrypted: bool) -> Optional[Tuple[int, int]]:
        """Return ``(level, description)`` if this is a readable plaintext alert.

        Whether record protection is in force is connection state that a single
        record cannot reveal (a 2-byte payload is merely *likely* plaintext), so
        the caller must say so via ``encrypted``; when it is true the payload is
        ciphertext and ``None`` is returned.
        """
        if encrypted or self.content_type != CT_ALERT or len(self.payload) != 2:
            return None
        return self.payload[0], self.payload[1]

    def is_plain_close_notify(self, encrypted: bool) -> bool:
        """True for an unencrypted close_notify alert record."""
        alert = self.plain_alert(encrypted)
        return alert is not None and alert[1] == CLOSE_NOTIFY


def _version_name(version: int) -> str:
    major, minor = version >> 8, version & 0xFF
    if major == 3 and minor == 0:
        return "SSL 3.0"
    if major == 3 and 1 <= minor <= 4:
        return f"TLS 1.{minor - 1}"
    return f"0x{version:04x}"


def content_type_name(content_type: int) -> str:
    return CONTENT_TYPE_NAMES.get(content_type, f"unknown({content_type})")


def alert_description_name(description: int) -> str:
    return ALERT_DESCRIPTION_NAMES.get(description, f"unknown({description})")


def describe(record: Record, encrypted: Optional[bool] = None) -> str:
    """A one-line, human-readable description for evidence logs.

    ``encrypted`` is the caller's knowledge of record protection; with ``None``
    (unknown) a 2-byte alert is decoded but marked as an assumption.
    """
    text = (
        f"{content_type_name(record.content_type)}({record.content_type}) record, "
        f"{_version_name(record.version)} (0x{record.version:04x}), "
        f"{len(record.payload)}-byte payload"
    )
    if record.is_alert:
        alert = record.plain_alert(encrypted=bool(encrypted))
        if alert is not None:
            level = {ALERT_LEVEL_WARNING: "warning", ALERT_LEVEL_FATAL: "fatal"}.get(
                alert[0], str(alert[0])
            )
            note = " if unencrypted" if encrypted is None else ""
            text += f": {level} {alert_description_name(alert[1])}{note}"
        else:
            text += ": encrypted alert"
    elif encrypted:
        text += " (encrypted)"
    head = record.payload[:16].hex()
    ellipsis = "..." if len(record.payload) > 16 else ""
    return f"{text} [{head}{ellipsis}]"


def check_header(data: bytes) -> Optional[str]:
    """Why ``data`` cannot begin a TLS record, or ``None`` if it still might.

    Only the bytes present are checked, so a short prefix like ``b"EH"`` is
    rejected at once while a plausible 2-byte prefix is not yet accepted as a
    full header.
    """
    if len(data) >= 1 and data[0] not in CONTENT_TYPES:
        return f"content type {data[0]} is not a TLS record type"
    if len(data) >= 2 and data[1] != 3:
        return f"major version {data[1]} is not 3"
    if len(data) >= 3 and data[2] > MAX_MINOR_VERSION:
        return f"minor version {data[2]} is too high"
    if len(data) >= HEADER_LEN:
        (length,) = struct.unpack_from("!H", data, 3)
        if length > MAX_RECORD_PAYLOAD:
            return f"record length {length} exceeds {MAX_RECORD_PAYLOAD}"
    return None


class RecordSplitter:
    """Reassemble TLS records from one direction of a byte stream.

    Feed it bytes in any chunking; it returns each record once it is complete
    and buffers the rest.  After a :class:`NotTLSError` the offending bytes
    stay buffered (further feeds keep raising) until :meth:`take_pending`
    hands them to the caller, e.g. to relay or log them as plaintext.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._offset = 0  # stream offset of the first buffered byte

    @property
    def pending(self) -> bytes:
        """Bytes received but not yet part of a complete record."""
        return bytes(self._buffer)

    @property
    def offset(self) -> int:
        """Stream offset of the next record boundary."""
        return self._offset

    def take_pending(self) -> bytes:
        """Return and forget the buffered bytes (e.g. after :class:`NotTLSError`).

        The stream offset advances past them, so the splitter may be reused
        if the caller knows a record boundary follows.
        """
        data = bytes(self._buffer)
        self._offset += len(data)
        self._buffer.clear()
        return data

    def feed(self, data: bytes) -> List[Record]:
        """Add ``data`` and return every record completed by it, in order."""
        self._buffer.extend(data)
        records: List[Record] = []
        while True:
            reason = check_header(bytes(self._buffer[:HEADER_LEN]))
            if reason is not None:
                raise NotTLSError(self._offset, bytes(self._buffer), reason, records)
            if len(self._buffer) < HEADER_LEN:
                return records
            content_type, major, minor, length = struct.unpack_from("!BBBH", self._buffer)
            end = HEADER_LEN + length
            if len(self._buffer) < end:
                return records
            raw = bytes(self._buffer[:end])
            del self._buffer[:end]
            self._offset += end
            records.append(
                Record(
                    content_type=content_type,
                    version=(major << 8) | minor,
                    payload=raw[HEADER_LEN:],
                    raw=raw,
                )
            )
