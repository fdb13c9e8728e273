"""Framers: how a dialect's plaintext byte stream is cut into units.

A *unit* is the smallest piece of plaintext a protocol acts on: a CRLF line
for the mail dialects, a length-prefixed message for PostgreSQL, a BER
``LDAPMessage`` for LDAP, a stanza for XMPP.  Everything in the harness that
must find a boundary in plaintext -- the engine's R1 hold gate, the proxy's
follower, the scripted server -- asks the dialect's framer instead of
searching for ``\\n`` itself, so a binary or XML protocol fits the same seam.

A framer is an object per byte stream (it may keep state, e.g. an XML
stream's open element); a dialect hands out fresh ones through a factory.
:meth:`Framer.split` is the whole contract: given the bytes not yet cut,
return the complete units at their start and how many bytes those use.  A
framer never raises on hostile input: bytes that cannot start a unit are
returned as one unit of their own (the caller then sees something that is
not a command and refuses it), and a unit longer than ``max_unit`` is cut
at that size, so a peer that never sends a boundary cannot make anyone
buffer without bound.
"""

from __future__ import annotations

import abc
from typing import Callable, List, Tuple

__all__ = ["DEFAULT_MAX_UNIT", "Framer", "FramerFactory", "LineFramer", "line_framer"]

#: The longest unit any framer buffers before cutting (bytes).
DEFAULT_MAX_UNIT = 64 * 1024


class Framer(abc.ABC):
    """Cuts one direction's plaintext into units."""

    #: A unit longer than this is cut here (see the module docstring).
    max_unit: int = DEFAULT_MAX_UNIT

    @abc.abstractmethod
    def split(self, data: bytes) -> Tuple[List[bytes], int]:
        """The complete units at the start of ``data`` and the bytes they use.

        ``data[used:]`` is an incomplete unit the caller keeps and passes
        again, with more bytes appended, on the next call.
        """

    def reset(self) -> None:
        """Forget any state: the stream starts afresh (a new TLS session)."""
        return None


#: What a dialect provides: a new framer for each stream.
FramerFactory = Callable[[], Framer]


class LineFramer(Framer):
    """Lines ending in LF (CRLF in every mail dialect); the line end is kept."""

    def __init__(self, max_unit: int = DEFAULT_MAX_UNIT) -> None:
        self.max_unit = max_unit

    def split(self, data: bytes) -> Tuple[List[bytes], int]:
        units: List[bytes] = []
        start = 0
        while True:
            nl = data.find(b"\n", start, start + self.max_unit)
            if nl < 0:
                if len(data) - start >= self.max_unit:
                    units.append(data[start : start + self.max_unit])
                    start += self.max_unit
                    continue
                return units, start
            units.append(data[start : nl + 1])
            start = nl + 1


def line_framer() -> Framer:
    """The factory of :class:`LineFramer` (the mail dialects' framing)."""
    return LineFramer()
