"""The proxy's vocabulary: protocol points, unit and event kinds, phases.

Every other module of the proxy speaks these names; they are also what a
path scenario aims a fault at and what the evidence log records, so they are
defined once, here, with nothing below them but the TLS key-log directions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from starttls_harness.tls.keylog import C2S, DIRECTIONS, S2C

__all__ = [
    "C2S",
    "DIRECTIONS",
    "METHODS",
    "POINTS",
    "S2C",
    "Point",
    "Unit",
    "check_direction",
    "other_direction",
]


class Point(str, enum.Enum):
    """Named protocol points a fault can be aimed at (values are the names)."""

    STARTTLS_COMMAND = "starttls-command"
    STARTTLS_REPLY = "starttls-reply"
    CLIENT_HELLO = "client-hello"
    SERVER_HELLO = "server-hello"
    HANDSHAKE_DONE = "handshake-done"
    APPLICATION_DATA = "application-data"
    STOPTLS_COMMAND = "stoptls-command"
    STOPTLS_REPLY = "stoptls-reply"
    CLOSE_NOTIFY = "close-notify"
    AFTER_CLOSE_NOTIFY = "after-close-notify"
    PLAINTEXT_IN_TLS = "plaintext-in-tls"
    FIRST_PLAINTEXT_AFTER_TLS = "first-plaintext-after-tls"
    PLAINTEXT = "plaintext"
    RECORD = "record"
    EOF = "eof"
    RESET = "reset"


#: Every point with what marks it (one line each; ``starttls-harness`` prints it).
POINTS: Dict[str, str] = {
    Point.STARTTLS_COMMAND.value: "c2s: the STARTTLS command line",
    Point.STARTTLS_REPLY.value: "s2c: the final line of the positive answer to STARTTLS",
    Point.CLIENT_HELLO.value: "c2s: the record carrying the ClientHello",
    Point.SERVER_HELLO.value: "s2c: the record carrying the ServerHello",
    Point.HANDSHAKE_DONE.value: "the first application record of a TLS session, each way",
    Point.APPLICATION_DATA.value: "every application record (use nth= to pick one)",
    Point.STOPTLS_COMMAND.value: "c2s: the record carrying STOPTLS (TLS 1.3 with a key log only)",
    Point.STOPTLS_REPLY.value: "s2c: the record answering STOPTLS (TLS 1.3 with a key log only)",
    Point.CLOSE_NOTIFY.value: "the record carrying a close_notify alert, each way",
    Point.AFTER_CLOSE_NOTIFY.value: "the next unit after a close_notify in the same direction",
    Point.PLAINTEXT_IN_TLS.value: "a plaintext line while TLS is up in that direction",
    Point.FIRST_PLAINTEXT_AFTER_TLS.value: "the first plaintext line after a direction's TLS",
    Point.PLAINTEXT.value: "every plaintext line",
    Point.RECORD.value: "every TLS record",
    Point.EOF.value: "the sender's FIN",
    Point.RESET.value: "the sender's RST (or a socket error)",
}

METHOD_RECORD_TYPE = "record-type"
METHOD_KEYLOG = "keylog"
METHOD_POSITION = "position"
#: How a TLS record was classified (the ``method`` of events).
METHODS = (METHOD_RECORD_TYPE, METHOD_KEYLOG, METHOD_POSITION)

# Unit kinds: what the follower cut from a stream.
UNIT_PLAINTEXT = "plaintext"
UNIT_RECORD = "record"
UNIT_FRAGMENT = "fragment"  # incomplete line or record flushed at EOF / on a timer
UNIT_EOF = "eof"
UNIT_RESET = "reset"
UNIT_NOTE = "note"  # a classification learnt later; nothing to relay

# Event kinds added by the shell.
EV_FAULT = "fault"
EV_INJECTED = "injected"
EV_SENT = "sent"
EV_FIN_SENT = "fin-sent"
EV_RST_SENT = "rst-sent"
EV_CONNECT = "connect"
EV_ERROR = "error"
EV_CLOSED = "closed"

PHASE_PLAINTEXT = "plaintext"
PHASE_STARTTLS = "starttls-requested"
PHASE_TLS = "tls"
PHASE_CLOSING = "closing"


def other_direction(direction: str) -> str:
    """The direction opposite ``direction``."""
    return S2C if direction == C2S else C2S


def check_direction(direction: str) -> None:
    """Refuse anything but ``c2s`` and ``s2c``."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'c2s' or 's2c', not {direction!r}")


@dataclass(frozen=True)
class Unit:
    """One thing the follower cut from a direction's stream.

    ``points`` are the :class:`Point` names the unit marks, most specific
    first; ``method`` says how a TLS record was classified; ``phase`` is the
    connection's phase when the unit arrived.  Notes (``kind == "note"``)
    carry classifications learnt after the fact and nothing to relay.
    """

    index: int
    direction: str
    kind: str
    data: bytes = b""
    points: Tuple[str, ...] = ()
    detail: str = ""
    method: str = ""
    phase: str = ""
    #: The decrypted text of an application data record (None: not read).
    clear: Optional[bytes] = None

    @property
    def point(self) -> str:
        return self.points[0] if self.points else ""

    @property
    def relayable(self) -> bool:
        return self.kind != UNIT_NOTE
