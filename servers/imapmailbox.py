"""The reference IMAP server's mailbox: stored messages and FETCH.

One mailbox (INBOX) per running server, append-only: UIDs equal sequence
numbers because nothing is ever expunged.  What a FETCH may ask for is the
small set the harness and the interop clients use (``FLAGS``, ``UID``,
``INTERNALDATE``, ``RFC822*``, ``BODY[]``/``BODY.PEEK[]`` with ``HEADER``,
``TEXT`` and partials, ``FAST``); anything else is a ``BAD``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import List, Optional, Set, Tuple

from starttls_harness.servers.imapsyntax import Atom, ParseError, Token

__all__ = [
    "DATE_TIME",
    "FLAGS_LINE",
    "SYSTEM_FLAGS",
    "FetchItem",
    "StoredMessage",
    "fetch_items",
    "internal_date",
    "sequence_set",
]

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
DATE_TIME = re.compile(rb"[ \d]\d-[A-Za-z]{3}-\d{4} \d\d:\d\d:\d\d [+-]\d{4}\Z")
SYSTEM_FLAGS = frozenset({"\\ANSWERED", "\\FLAGGED", "\\DELETED", "\\SEEN", "\\DRAFT"})
FLAGS_LINE = b"(\\Answered \\Flagged \\Deleted \\Seen \\Draft)"


def internal_date(now: Optional[float] = None) -> str:
    t = time.gmtime(now)
    return (
        f"{t.tm_mday:02d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )


@dataclass
class StoredMessage:
    """One appended message, with the phase it arrived in (evidence)."""

    data: bytes
    #: Appended under TLS?
    tls: bool
    tls_version: Optional[str]
    #: STARTTLS upgrades done on the connection so far: the k-th TLS session
    #: stores cycle k; plaintext after its STOPTLS still says k.
    cycle: int
    uid: int
    connection: int
    internal_date: str = field(default_factory=internal_date)
    flags: Set[str] = field(default_factory=set)
    #: False when a truncated literal was stored (``ignore-truncation``).
    complete: bool = True


@dataclass
class FetchItem:
    """One FETCH data item, rendered for one message."""

    name: str
    section: str = ""
    partial: Optional[Tuple[int, int]] = None
    sets_seen: bool = False

    def render(self, message: StoredMessage) -> bytes:
        data = message.data
        if self.name == "FLAGS":
            return b"FLAGS (" + " ".join(sorted(message.flags)).encode() + b")"
        if self.name == "UID":
            return b"UID %d" % message.uid
        if self.name == "INTERNALDATE":
            return b'INTERNALDATE "' + message.internal_date.encode() + b'"'
        if self.name == "RFC822.SIZE":
            return b"RFC822.SIZE %d" % len(data)
        header, text = _split(data)
        if self.name in ("RFC822", "RFC822.HEADER", "RFC822.TEXT"):
            body = {"RFC822": data, "RFC822.HEADER": header, "RFC822.TEXT": text}[self.name]
            return self.name.encode() + b" " + _literal(body)
        body = {"": data, "HEADER": header, "TEXT": text}[self.section]
        label = b"BODY[" + self.section.encode() + b"]"
        if self.partial is not None:
            start, count = self.partial
            body = body[start : start + count]
            label += b"<%d>" % start
        return label + b" " + _literal(body)


_BODY_ITEM = re.compile(r"BODY(\.PEEK)?\[(HEADER|TEXT|)\](?:<(\d{1,10})\.(\d{1,10})>)?\Z")
_SIMPLE_ITEMS = frozenset(
    {"FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "RFC822", "RFC822.HEADER", "RFC822.TEXT"}
)
_MACROS = {"FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]}


def fetch_items(spec: Token, by_uid: bool) -> List[FetchItem]:
    names: List[Token] = spec if isinstance(spec, list) else [spec]
    if not names:
        raise ParseError("no FETCH items")
    items: List[FetchItem] = []
    for token in names:
        if not isinstance(token, Atom):
            raise ParseError("FETCH items are atoms")
        name = bytes(token).decode("ascii", "replace").upper()
        if name in _MACROS and not isinstance(spec, list):
            items.extend(FetchItem(n) for n in _MACROS[name])
        elif name in _SIMPLE_ITEMS:
            items.append(FetchItem(name, sets_seen=name in ("RFC822", "RFC822.TEXT")))
        else:
            match = _BODY_ITEM.match(name)
            if match is None:
                raise ParseError(f"unsupported FETCH item {name[:40]}")
            partial = None
            if match.group(3) is not None:
                partial = (int(match.group(3)), int(match.group(4)))
            items.append(FetchItem("BODY", match.group(2), partial, sets_seen=not match.group(1)))
    if by_uid and not any(item.name == "UID" for item in items):
        items.insert(0, FetchItem("UID"))
    return items


def sequence_set(text: bytes, count: int) -> List[int]:
    """Expand ``1,3:5,7:*`` against ``count`` messages (sorted, unique)."""
    numbers: Set[int] = set()
    for part in text.split(b","):
        bounds = part.split(b":")
        if len(bounds) > 2 or not all(bounds):
            raise ParseError("invalid sequence set")
        values = []
        for bound in bounds:
            if bound == b"*":
                if count == 0:
                    raise ParseError("the mailbox is empty")
                values.append(count)
            elif bound.isdigit() and 0 < int(bound) <= count:
                values.append(int(bound))
            else:
                raise ParseError("invalid message sequence number")
        low, high = min(values), max(values)
        numbers.update(range(low, high + 1))
    return sorted(numbers)


def _split(data: bytes) -> Tuple[bytes, bytes]:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[: end + 4], data[end + 4 :]


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data
