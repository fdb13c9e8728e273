"""The proxy's evidence log entries and the error of a wait that cannot succeed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["EventNotSeen", "ProxyEvent"]


@dataclass(frozen=True)
class ProxyEvent:
    """One entry of a connection's evidence log.

    ``time`` is seconds since the connection was accepted.  ``kind`` is a
    unit kind (``plaintext``, ``record``, ``fragment``, ``eof``, ``reset``,
    ``note``: what the sender sent, as received) or a shell kind
    (``fault``, ``injected``, ``sent``: one write to the receiver,
    ``fin-sent``, ``rst-sent``, ``connect``, ``error``, ``closed``).
    ``action`` names the fault action applied to a unit (``discarded`` when a
    unit arrived after the proxy ended its direction).
    """

    time: float
    direction: str
    kind: str
    point: str = ""
    detail: str = ""
    data: bytes = b""
    method: str = ""
    points: Tuple[str, ...] = ()
    index: int = 0
    action: str = ""
    connection: int = 0
    #: The decrypted text of an application data record (or of the late
    #: note that classified one); None when the proxy could not read it.
    clear: Optional[bytes] = None


class EventNotSeen(LookupError):
    """The connection ended before an awaited event happened."""
