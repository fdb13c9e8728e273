"""The mail dialects the harness speaks when it plays a peer: SMTP and IMAP.

A dialect knows the bytes of the few commands a scenario needs (hello,
STARTTLS, STOPTLS, a *sentinel* whose answer proves what the peer did, an
*injected* command whose answer is recognisable) and how to cut the peer's
byte stream into complete replies.  Scenarios are written once, against
this interface, and run for both dialects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Optional, Tuple

__all__ = ["Dialect", "LinePredicate", "Reply"]


@dataclass(frozen=True)
class Reply:
    """One complete reply: its lines (with line ends) and whether it says OK."""

    lines: Tuple[bytes, ...]
    ok: bool
    #: SMTP: the status code; IMAP: the tag of the final line (or ``*``).
    key: str

    @property
    def raw(self) -> bytes:
        return b"".join(self.lines)

    @property
    def text(self) -> str:
        return self.raw.decode("latin-1").strip()


class LinePredicate:
    """A picklable, printable line predicate (for the engine's hold gate)."""

    def __init__(self, kind: str, arg: str = "") -> None:
        self.kind = kind
        self.arg = arg

    def __call__(self, line: bytes) -> bool:
        if self.kind == "smtp-final":
            return len(line) >= 4 and line[:3].isdigit() and line[3:4] in (b" ", b"\r", b"\n")
        if self.kind == "imap-tagged":
            return line.split(b" ", 1)[0].decode("latin-1") == self.arg
        raise ValueError(self.kind)  # pragma: no cover

    def __repr__(self) -> str:
        return f"LinePredicate({self.kind!r}, {self.arg!r})"


class Dialect:
    """Base class; see :data:`SMTP` and :data:`IMAP`."""

    name = ""
    default_port = 0

    def hello(self) -> bytes:
        raise NotImplementedError

    def starttls(self) -> bytes:
        raise NotImplementedError

    def stoptls(self) -> bytes:
        raise NotImplementedError

    def sentinel(self) -> bytes:
        """A harmless command whose answer proves the peer is in step."""
        raise NotImplementedError

    def injected(self) -> bytes:
        """A command the harness smuggles in; its answer is recognisable."""
        raise NotImplementedError

    def quit(self) -> bytes:
        raise NotImplementedError

    def is_injected_reply(self, reply: Reply) -> bool:
        raise NotImplementedError

    def is_sentinel_reply(self, reply: Reply) -> bool:
        raise NotImplementedError

    def split_reply(
        self, buf: bytes, expect_tag: Optional[str] = None
    ) -> Tuple[Optional[Reply], bytes]:
        """Cut one complete reply off ``buf``; ``(None, buf)`` if incomplete."""
        raise NotImplementedError

    def capabilities(self, reply: Reply) -> FrozenSet[str]:
        raise NotImplementedError

    def greeting_ok(self, reply: Reply) -> bool:
        raise NotImplementedError

    def final_line_of(self, command: bytes) -> LinePredicate:
        """Predicate for the final line of the answer to ``command``."""
        raise NotImplementedError

    def tag_of(self, command: bytes) -> Optional[str]:
        """The tag a reply to ``command`` ends with (IMAP), or None."""
        return None
