"""The mail dialects the harness speaks when it plays a peer: SMTP and IMAP.

A dialect knows the bytes of the few commands a scenario needs (hello,
STARTTLS, STOPTLS, a *sentinel* whose answer proves what the peer did, an
*injected* command whose answer is recognisable) and how to cut the peer's
byte stream into complete replies.  Scenarios are written once, against
this interface, and run for both dialects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Set, Tuple

__all__ = ["DIALECTS", "IMAP", "SMTP", "Dialect", "Reply", "dialect_named"]


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


class _Smtp(Dialect):
    name = "smtp"
    default_port = 25

    def hello(self) -> bytes:
        return b"EHLO harness.invalid\r\n"

    def starttls(self) -> bytes:
        return b"STARTTLS\r\n"

    def stoptls(self) -> bytes:
        return b"STOPTLS\r\n"

    def sentinel(self) -> bytes:
        return b"NOOP\r\n"

    def injected(self) -> bytes:
        # An unknown verb: its 5xx answer cannot be mistaken for NOOP's 250.
        return b"XHARNESS-INJECTED\r\n"

    def quit(self) -> bytes:
        return b"QUIT\r\n"

    def is_injected_reply(self, reply: Reply) -> bool:
        return reply.key.startswith("5")

    def is_sentinel_reply(self, reply: Reply) -> bool:
        return reply.key.startswith("2")

    def split_reply(
        self, buf: bytes, expect_tag: Optional[str] = None
    ) -> Tuple[Optional[Reply], bytes]:
        lines: List[bytes] = []
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                return None, buf
            line = buf[pos : nl + 1]
            lines.append(line)
            pos = nl + 1
            if len(line) < 4 or line[3:4] != b"-":
                code = line[:3].decode("latin-1", "replace")
                ok = code[:1] in ("2", "3")
                return Reply(tuple(lines), ok, code), buf[pos:]

    def capabilities(self, reply: Reply) -> FrozenSet[str]:
        words: Set[str] = set()
        for line in reply.lines[1:]:
            text = line[4:].decode("latin-1").strip()
            if text:
                words.add(text.split()[0].upper())
        return frozenset(words)

    def greeting_ok(self, reply: Reply) -> bool:
        return reply.key == "220"

    def final_line_of(self, command: bytes) -> LinePredicate:
        return LinePredicate("smtp-final")


class _Imap(Dialect):
    name = "imap"
    default_port = 143

    def hello(self) -> bytes:
        return b"h1 CAPABILITY\r\n"

    def starttls(self) -> bytes:
        return b"s1 STARTTLS\r\n"

    def stoptls(self) -> bytes:
        return b"x1 STOPTLS\r\n"

    def sentinel(self) -> bytes:
        return b"n1 NOOP\r\n"

    def injected(self) -> bytes:
        return b"i1 NOOP\r\n"

    def quit(self) -> bytes:
        return b"q1 LOGOUT\r\n"

    def is_injected_reply(self, reply: Reply) -> bool:
        return reply.key == "i1"

    def is_sentinel_reply(self, reply: Reply) -> bool:
        return reply.key == "n1"

    def split_reply(
        self, buf: bytes, expect_tag: Optional[str] = None
    ) -> Tuple[Optional[Reply], bytes]:
        """One tagged reply with its untagged lines, or one lone greeting.

        With ``expect_tag`` None, the first complete line is a reply of its
        own (greetings, ``+`` continuations); otherwise untagged lines are
        collected until a tagged line.  Literals in responses are not
        needed by any scenario and are not parsed.
        """
        lines: List[bytes] = []
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                return None, buf
            line = buf[pos : nl + 1]
            lines.append(line)
            pos = nl + 1
            first = line.split(b" ", 2)
            tag = first[0].decode("latin-1", "replace")
            status = first[1].upper() if len(first) > 1 else b""
            if expect_tag is None or (tag not in ("*", "+")):
                ok = status == b"OK" or tag == "+"
                return Reply(tuple(lines), ok, tag), buf[pos:]

    def capabilities(self, reply: Reply) -> FrozenSet[str]:
        words: Set[str] = set()
        for line in reply.lines:
            text = line.decode("latin-1").strip()
            upper = text.upper()
            start = upper.find("CAPABILITY ")
            if start >= 0:
                rest = text[start + len("CAPABILITY ") :].split("]")[0]
                words.update(w.upper() for w in rest.split())
        return frozenset(words)

    def greeting_ok(self, reply: Reply) -> bool:
        return reply.key == "*" and reply.ok

    def final_line_of(self, command: bytes) -> LinePredicate:
        return LinePredicate("imap-tagged", command.split(b" ", 1)[0].decode("latin-1"))

    def tag_of(self, command: bytes) -> Optional[str]:
        return command.split(b" ", 1)[0].decode("latin-1")


SMTP = _Smtp()
IMAP = _Imap()
DIALECTS: Dict[str, Dialect] = {"smtp": SMTP, "imap": IMAP}


def dialect_named(name: str) -> Dialect:
    try:
        return DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown dialect {name!r}; use smtp or imap") from None
