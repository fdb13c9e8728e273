"""IMAP wire syntax for the reference server and client: tokens, lines, literals.

Separate from the server (:mod:`starttls_harness.servers.imap`) because both
reference peers read IMAP with it: the tokenizer parses commands and
responses alike, :class:`StartTLSLine` is the server's R1 hold-gate
predicate (literal-aware, so literal data is never taken for a command),
and :class:`LineReader` is the buffer both read lines and literals from,
whose unread bytes can be inspected and handed over through public methods.
"""

from __future__ import annotations

import asyncio
import re
from typing import List, Optional, Tuple, Union

__all__ = [
    "LITERAL_AT_END",
    "TAG_RE",
    "Atom",
    "IncompleteRead",
    "LineReader",
    "LineTooLong",
    "Literal",
    "ParseError",
    "StartTLSLine",
    "Token",
    "is_starttls_line",
    "quote",
    "tokenize",
]

# ----------------------------------------------------------------- tokens

#: A command tag: ASTRING-CHAR except "+" (RFC 3501 §9).
_TAG = rb"[^\x00-\x20(){%*\"\\+\x7f-\xff]+"
#: Matches the tag at the start of a command line.
TAG_RE = re.compile(_TAG)
_STARTTLS_RE = re.compile(rb"(" + _TAG + rb") STARTTLS\r?\n", re.IGNORECASE)
#: A literal announced at the end of a line: ``{n}`` or (LITERAL+) ``{n+}``.
LITERAL_AT_END = re.compile(rb"\{(\d{1,10})(\+?)\}\r?\n\Z")
_LITERAL_HERE = re.compile(rb"\{(\d{1,10})\+?\}\r?\n")
_ATOM_STOP = frozenset(b' ()\r\n{"')


def is_starttls_line(line: bytes) -> bool:
    """True when ``line`` is exactly ``<tag> STARTTLS`` (any case) plus CRLF/LF."""
    return _STARTTLS_RE.fullmatch(line) is not None


class StartTLSLine:
    """Hold-gate predicate over complete plaintext lines (see module docstring).

    Stateful because it is lexically literal-aware: after a line that ends in
    ``{n}`` the next n bytes are literal data, never a command.
    """

    def __init__(self) -> None:
        #: Literal bytes still to skip.
        self.literal = 0

    def __call__(self, line: bytes) -> bool:
        fresh = True
        if self.literal:
            if len(line) <= self.literal:
                self.literal -= len(line)
                return False
            line = line[self.literal :]
            self.literal = 0
            fresh = False  # the rest continues the command the literal belongs to
        match = LITERAL_AT_END.search(line)
        if match is not None:
            self.literal = int(match.group(1))
            return False
        return fresh and is_starttls_line(line)

    def cancel_literal(self) -> None:
        """The server refused the announced literal: the client will not send it."""
        self.literal = 0


class Atom(bytes):
    """An IMAP atom (including NIL, numbers, ``BODY[...]<...>`` items)."""


class Literal(bytes):
    """A string that came as a literal ``{n}``."""


#: A parsed IMAP token: an atom, a string (quoted: plain ``bytes``; literal:
#: :class:`Literal`) or a parenthesised list.
Token = Union[bytes, List["Token"]]


class ParseError(ValueError):
    """The bytes are not well-formed IMAP."""


def tokenize(data: bytes, pos: int = 0) -> List[Token]:
    """Parse IMAP tokens from ``data[pos:]`` up to the end of the (logical) line.

    ``data`` holds the line with its literals inline, as read from the wire
    (``... {5}\\r\\nhello ...``).  Used for commands and for responses.
    """
    return _lex(data, pos, 0)[0]


def _lex(data: bytes, pos: int, depth: int) -> Tuple[List[Token], int]:
    out: List[Token] = []
    size = len(data)
    while pos < size:
        char = data[pos]
        if char == 0x20:
            pos += 1
        elif char in (0x0D, 0x0A):
            if depth:
                raise ParseError("unterminated parenthesised list")
            return out, size
        elif char == 0x28:  # (
            sub, pos = _lex(data, pos + 1, depth + 1)
            out.append(sub)
        elif char == 0x29:  # )
            if not depth:
                raise ParseError("unbalanced ')'")
            return out, pos + 1
        elif char == 0x22:  # "
            value, pos = _quoted(data, pos + 1)
            out.append(value)
        elif char == 0x7B:  # {
            match = _LITERAL_HERE.match(data, pos)
            if match is None:
                raise ParseError("malformed literal")
            start = match.end()
            stop = start + int(match.group(1))
            if stop > size:
                raise ParseError("literal longer than the data")
            out.append(Literal(data[start:stop]))
            pos = stop
        else:
            start = pos
            while pos < size and data[pos] not in _ATOM_STOP:
                if data[pos] == 0x5B:  # [ ... ] may hold spaces and parentheses
                    close = data.find(b"]", pos)
                    if close < 0:
                        raise ParseError("unterminated '['")
                    pos = close
                pos += 1
            out.append(Atom(data[start:pos]))
    if depth:
        raise ParseError("unterminated parenthesised list")
    return out, pos


def _quoted(data: bytes, pos: int) -> Tuple[bytes, int]:
    value = bytearray()
    while pos < len(data):
        char = data[pos]
        if char == 0x5C and pos + 1 < len(data):  # backslash
            value.append(data[pos + 1])
            pos += 2
        elif char == 0x22:
            return bytes(value), pos + 1
        elif char in (0x0D, 0x0A):
            break
        else:
            value.append(char)
            pos += 1
    raise ParseError("unterminated quoted string")


def quote(value: Union[str, bytes]) -> bytes:
    """``value`` as an IMAP quoted string."""
    raw = value.encode() if isinstance(value, str) else value
    if b"\r" in raw or b"\n" in raw:
        raise ValueError("CR and LF cannot be quoted; use a literal")
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


# ------------------------------------------------------------------ reading


class LineTooLong(ValueError):
    """A line exceeded the configured bound."""


class IncompleteRead(ConnectionError):
    """The peer closed the connection in the middle of a line or literal."""

    def __init__(self, partial: bytes) -> None:
        super().__init__(f"connection closed after {len(partial)} bytes of an incomplete unit")
        self.partial = partial


class LineReader:
    """Bytes from ``data_received``, read as lines and literals by one coroutine.

    A plain buffer instead of ``asyncio.StreamReader`` so that what is still
    unread can be inspected and handed over (R1 leftover, STOPTLS checks)
    through public methods.  Every wait is bounded by ``timeout``.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._eof = False
        self._exc: Optional[BaseException] = None
        self._waiter: Optional[asyncio.Future[None]] = None

    def feed(self, data: bytes) -> None:
        self._buf += data
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        self._wake()

    @property
    def pending(self) -> bytes:
        """Received bytes not yet read."""
        return bytes(self._buf)

    def take_pending(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    async def read_line(self, timeout: Optional[float]) -> bytes:
        """One line with its CRLF/LF; :class:`LineTooLong` past ``max_line``."""
        deadline = _deadline(timeout)
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                if nl + 1 > self.max_line:
                    raise LineTooLong(f"line longer than {self.max_line} bytes")
                line = bytes(self._buf[: nl + 1])
                del self._buf[: nl + 1]
                return line
            if len(self._buf) > self.max_line:
                raise LineTooLong(f"line longer than {self.max_line} bytes")
            await self._wait(deadline)

    async def read_exactly(self, size: int, timeout: Optional[float]) -> bytes:
        deadline = _deadline(timeout)
        while len(self._buf) < size:
            await self._wait(deadline)
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    async def _wait(self, deadline: Optional[float]) -> None:
        if self._eof:  # a clean EOF seen first stays the cause
            raise IncompleteRead(self.take_pending())
        if self._exc is not None:
            raise self._exc
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        remaining = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            await asyncio.wait_for(self._waiter, remaining)
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else asyncio.get_running_loop().time() + timeout
