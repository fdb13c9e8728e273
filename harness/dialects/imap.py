"""IMAP (RFC 9051, STARTTLS §6.2.1) as the harness speaks it."""

from __future__ import annotations

from typing import FrozenSet, List, Optional, Set, Tuple

from starttls_harness.dialects.base import Dialect, LinePredicate, Reply


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


IMAP = _Imap()
