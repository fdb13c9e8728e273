"""Going slowly on request: at most N connections open, R new ones a second.

A production server with connection limits answers a burst with ``421 too
many connections`` (SMTP) or ``* BYE`` (IMAP), or tarpits; the harness would
then report scenario errors that say nothing about STARTTLS.  ``check
--max-connections N --rate R`` installs a :class:`Pacing` for the run (a
context variable, so runs side by side in one process do not share it), and
the probe asks it for a :class:`Slot` before it opens a connection and gives
it back when the connection ends.  Limits hold per target (host, port).

:func:`refusal` recognises a greeting that turns the harness away for load,
so the report names that as the cause instead of a scenario failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Tuple

__all__ = ["Pacing", "Slot", "acquire", "pacing", "refusal", "release"]


@dataclass
class _Gate:
    """One target's limits: a semaphore for open connections, a start schedule."""

    max_connections: Optional[int]
    rate: Optional[float]
    open: int = 0
    #: The most connections open at once, and how many were opened (for tests, reports).
    most_open: int = 0
    opened: int = 0
    next_start: float = 0.0
    semaphore: Optional[asyncio.Semaphore] = None

    async def enter(self) -> None:
        if self.max_connections is not None:
            if self.semaphore is None:  # made inside the running loop
                self.semaphore = asyncio.Semaphore(self.max_connections)
            await self.semaphore.acquire()
        if self.rate:
            loop = asyncio.get_running_loop()
            now = loop.time()
            start = max(now, self.next_start)
            self.next_start = start + 1.0 / self.rate
            if start > now:
                try:
                    await asyncio.sleep(start - now)  # the schedule, not a guess
                except BaseException:
                    if self.semaphore is not None:
                        self.semaphore.release()
                    raise
        self.open += 1
        self.opened += 1
        self.most_open = max(self.most_open, self.open)

    def leave(self) -> None:
        self.open -= 1
        if self.semaphore is not None:
            self.semaphore.release()


@dataclass
class Pacing:
    """The run's limits, applied to each target separately."""

    max_connections: Optional[int] = None
    rate: Optional[float] = None
    gates: Dict[Tuple[str, int], _Gate] = field(default_factory=dict)

    def gate(self, host: str, port: int) -> _Gate:
        key = (host.lower(), port)
        if key not in self.gates:
            self.gates[key] = _Gate(self.max_connections, self.rate)
        return self.gates[key]


_CURRENT: contextvars.ContextVar[Optional[Pacing]] = contextvars.ContextVar(
    "starttls_harness_pacing", default=None
)


@contextlib.contextmanager
def pacing(value: Optional[Pacing]) -> Iterator[Optional[Pacing]]:
    """Apply ``value`` to every connection opened inside (and in tasks started there)."""
    token = _CURRENT.set(value)
    try:
        yield value
    finally:
        _CURRENT.reset(token)


@dataclass
class Slot:
    """One connection's place at its target; :func:`release` it once."""

    gate: _Gate
    released: bool = False


async def acquire(host: str, port: int) -> Optional[Slot]:
    """Wait for room to open a connection to ``host:port`` (None: no limits set)."""
    current = _CURRENT.get()
    if current is None or (current.max_connections is None and not current.rate):
        return None
    gate = current.gate(host, port)
    await gate.enter()
    return Slot(gate)


def release(slot: Optional[Slot]) -> None:
    """Give the place back (idempotent: close and connection loss both call it)."""
    if slot is not None and not slot.released:
        slot.released = True
        slot.gate.leave()


#: Greetings that turn a client away for load (RFC 5321 §3.8 421, RFC 9051 BYE;
#: vsftpd's and ProFTPD's 421, PostgreSQL's 53300 "too many clients already").
_REFUSAL = re.compile(
    rb"too many (connections|sessions|clients|concurrent|connected|users)"
    rb"|connection (limit|rate)|rate limit|try again later|please try later"
    rb"|maximum number of (connections|clients)|too busy",
    re.IGNORECASE,
)


def refusal(first_reply: bytes) -> Optional[str]:
    """The target's words if its first reply refuses us for load, else None."""
    if _REFUSAL.search(first_reply):
        return first_reply.decode("utf-8", "replace").strip().splitlines()[0][:200]
    return None
