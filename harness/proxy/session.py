"""One TLS session the follower tracks: its state and how its records are told apart.

A session runs from a positive ``STARTTLS`` answer to both close_notify
alerts; :class:`Session` holds what the follower has learnt of it per
direction and classifies its records.

Inside TLS the commands are encrypted.  ``STOPTLS`` and its answer travel
inside TLS, so the return to plaintext is found through the close_notify
alerts, identified in one of three ways -- each logged event says which in
``method``:

``record-type`` (TLS 1.2)
    Alerts keep their outer record type 21.  An alert record after a
    direction's ChangeCipherSpec is encrypted: it is taken to be close_notify.
    It could be a fatal alert instead (bad_record_mac ...): the record type
    cannot tell them apart.  Application records (type 23) are known, so the
    first one each way is ``handshake-done``.  ``STOPTLS`` cannot be read.
``keylog`` (TLS 1.3 with a key log)
    Records are decrypted with the secrets of the NSS key log
    (``SSLKEYLOGFILE``; :mod:`starttls_harness.tls.keylog`).  Alerts, handshake messages
    (Finished, NewSessionTicket, KeyUpdate) and application data are known
    exactly, and so are the ``STOPTLS`` command and its reply.  The server's
    first protected records pass before the client has logged the secrets
    for them: they are relayed at once and classified later (a note).  A
    client writes its secrets before it sends its Finished, so when a second
    client record still cannot be decrypted the key log lacks this
    connection: the session falls back to ``position`` (and says so).
``position`` (TLS 1.3 without a usable key log)
    Every protected record has outer type 23, so only order and size are
    left.  What can be told: the client's first protected record is its
    Finished (no client certificate assumed) and later ones are application
    records; a server record is post-handshake once the client's Finished has
    passed, but it may be a NewSessionTicket, so the server's
    ``handshake-done`` may be a ticket.  A record whose size is exactly that
    of an encrypted 2-byte alert (3 bytes plus the AEAD tag) is *assumed* to
    be close_notify when it passes (this is what faults at ``close-notify``
    act on); a 2-byte application record looks the same.  When plaintext
    follows records in a direction, the last record before it is taken to be
    that direction's close_notify (a note says so).  What cannot be told:
    a close_notify from a fatal alert, a closure from plaintext injected
    after application data (R2), a truncation after an application record
    from a closure, and ``STOPTLS`` or its reply (a note names the last
    server application record before the client's close_notify once
    plaintext resumes).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple, Union

from starttls_harness.proxy.vocabulary import (
    METHOD_KEYLOG,
    METHOD_POSITION,
    METHOD_RECORD_TYPE,
    Point,
)
from starttls_harness.tls.keylog import (
    C2S,
    DIRECTIONS,
    TLS13_VERSION,
    FollowedRecord,
    SecretsMapping,
    SecretsProvider,
    Tls13Follower,
)
from starttls_harness.tls.records import (
    CLOSE_NOTIFY,
    CT_ALERT,
    CT_APPLICATION_DATA,
    CT_CHANGE_CIPHER_SPEC,
    CT_HANDSHAKE,
    Record,
    alert_description_name,
    content_type_name,
)

__all__ = [
    "HS_CLIENT_HELLO",
    "HS_NAMES",
    "HS_SERVER_HELLO",
    "Session",
    "SessionDir",
]

#: Handshake message names by type (for the evidence log).
HS_NAMES: Dict[int, str] = {
    0: "hello_request",
    1: "client_hello",
    2: "server_hello",
    4: "new_session_ticket",
    5: "end_of_early_data",
    8: "encrypted_extensions",
    11: "certificate",
    12: "server_key_exchange",
    13: "certificate_request",
    14: "server_hello_done",
    15: "certificate_verify",
    16: "client_key_exchange",
    20: "finished",
    24: "key_update",
}
HS_CLIENT_HELLO = 1
HS_SERVER_HELLO = 2
# AEAD tag length by TLS 1.3 suite (TLS_AES_128_CCM_8_SHA256 has 8 bytes).
_TAG_LENGTH = {0x1305: 8}


@dataclass
class SessionDir:
    """One direction of one TLS session."""

    records: int = 0
    protected: int = 0  # TLS 1.3 records with outer type 23
    hello_seen: bool = False
    app_seen: bool = False
    closed: bool = False
    last_record: Optional[int] = None  # unit index
    last_app_record: Optional[int] = None
    pending: Deque[int] = field(default_factory=collections.deque)


class Session:
    """One TLS session (STARTTLS ... closure) on the connection."""

    def __init__(self, number: int, secrets: Union[SecretsProvider, SecretsMapping, None]) -> None:
        self.number = number
        self.keylog_given = secrets is not None
        self.keylog_ok = secrets is not None
        self.tls = Tls13Follower(secrets if secrets is not None else {})
        self.dirs: Dict[str, SessionDir] = {d: SessionDir() for d in DIRECTIONS}
        self.stoptls_tag: Optional[str] = None
        self.stoptls_reply_seen = False
        self.first_closer: Optional[str] = None
        self.server_app_before_client_close: Optional[int] = None

    @property
    def version(self) -> Optional[int]:
        return self.tls.version

    @property
    def is13(self) -> bool:
        return self.version is not None and self.version >= TLS13_VERSION

    @property
    def method(self) -> str:
        if self.version is None:
            return ""
        if not self.is13:
            return METHOD_RECORD_TYPE
        return METHOD_KEYLOG if self.keylog_ok else METHOD_POSITION

    @property
    def tag_length(self) -> int:
        return _TAG_LENGTH.get(self.tls.cipher_suite or 0, 16)

    @property
    def ended(self) -> bool:
        return all(d.closed for d in self.dirs.values())

    def classify(self, direction: str, fr: FollowedRecord, points: List[str]) -> Tuple[str, str]:
        """Describe a record the TLS follower classified; add its points."""
        record = fr.record
        sd = self.dirs[direction]
        if not fr.encrypted:
            method = METHOD_RECORD_TYPE
            if record.content_type == CT_HANDSHAKE and record.payload:
                msg = record.payload[0]
                hello = HS_CLIENT_HELLO if direction == C2S else HS_SERVER_HELLO
                if msg == hello and not sd.hello_seen:
                    sd.hello_seen = True
                    points.append(
                        Point.CLIENT_HELLO.value if direction == C2S else Point.SERVER_HELLO.value
                    )
                return f"handshake: {HS_NAMES.get(msg, str(msg))}", method
            if record.content_type == CT_CHANGE_CIPHER_SPEC:
                return "change_cipher_spec", method
            alert = fr.alert
            if alert is not None:
                if alert[1] == CLOSE_NOTIFY:
                    points.append(Point.CLOSE_NOTIFY.value)
                return f"clear alert: {alert_description_name(alert[1])}", method
            return f"clear {content_type_name(record.content_type)} record", method
        method = self.method
        ctype = fr.content_type
        if ctype == CT_APPLICATION_DATA:
            self.app_record(direction, points)
            desc = "application data" + (" (decrypted)" if fr.decrypted else "")
            return desc, method
        if ctype == CT_HANDSHAKE:
            if fr.plaintext:
                name = HS_NAMES.get(fr.plaintext[0], str(fr.plaintext[0]))
                return f"protected handshake: {name}", method
            return "protected handshake (Finished)", method
        if ctype == CT_ALERT:
            if fr.close_notify_assumed:
                points.append(Point.CLOSE_NOTIFY.value)
                return (
                    "encrypted alert after ChangeCipherSpec: assumed close_notify (TLS 1.2 "
                    "cannot tell it from a fatal alert by the record type)",
                    method,
                )
            alert = fr.alert
            if alert is not None and alert[1] == CLOSE_NOTIFY:
                points.append(Point.CLOSE_NOTIFY.value)
                return "alert: close_notify (decrypted)", method
            name = alert_description_name(alert[1]) if alert is not None else "unreadable"
            return f"alert: {name} (decrypted; not a closure)", method
        return f"protected {content_type_name(ctype)}", method

    def by_position(self, direction: str, record: Record, points: List[str]) -> Tuple[str, str]:
        """TLS 1.3 protected record without a key log: order and size only."""
        sd = self.dirs[direction]
        if direction == C2S:
            post = sd.protected >= 2
            if not post:
                return "protected record, by position the client's Finished", METHOD_POSITION
        else:
            post = self.dirs[C2S].protected >= 1
            if not post:
                return (
                    "protected record, by position the server's handshake flight",
                    METHOD_POSITION,
                )
        if len(record.payload) == 3 + self.tag_length:
            points.append(Point.CLOSE_NOTIFY.value)
            return (
                f"protected record of {len(record.payload)} bytes, the size of an encrypted "
                "2-byte alert: close_notify assumed (position; a 2-byte application record "
                "looks the same)",
                METHOD_POSITION,
            )
        self.app_record(direction, points)
        what = "application data" if direction == C2S else "application data or NewSessionTicket"
        return f"protected record after the handshake, by position {what}", METHOD_POSITION

    def app_record(self, direction: str, points: List[str]) -> None:
        sd = self.dirs[direction]
        if not sd.app_seen:
            sd.app_seen = True
            points.append(Point.HANDSHAKE_DONE.value)
        points.append(Point.APPLICATION_DATA.value)
