"""SMTP (RFC 5321, STARTTLS RFC 3207) as the harness speaks it."""

from __future__ import annotations

from typing import FrozenSet, List, Optional, Set, Tuple

from starttls_harness.dialects.base import Dialect, LinePredicate, Reply


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


SMTP = _Smtp()
