"""What every reference server shares: behaviours, limits, a running handle.

A *behaviour* names one way of breaking exactly one rule (or ``strict`` for
none).  The catalogue's validation matrix starts each reference peer in each
behaviour and expects the scenario that guards that rule to fail.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from starttls_harness.tls.aio import SwitchableTransport, Timeouts
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import ClosureComplete, Event, Policy, Rule, Violation

__all__ = [
    "BARE_RESUME",
    "EXTRA_BEHAVIOURS",
    "NO_CLOSE_NOTIFY_REPLY",
    "STRICT",
    "Behaviour",
    "ExtraModes",
    "Limits",
    "RunningServer",
    "ServerConfig",
    "behaviour_named",
    "relaxing",
]


@dataclass(frozen=True)
class Behaviour:
    """A named (mis)behaviour of a reference peer."""

    name: str
    #: The rule this behaviour breaks (None for ``strict``).
    rule: Optional[Rule]
    description: str
    #: Engine rules relaxed for this behaviour (may be empty when the
    #: misbehaviour lives in the dialect, e.g. R8 state reset).
    relaxed: Tuple[Rule, ...] = ()

    @property
    def policy(self) -> Policy:
        return Policy.relaxing(*self.relaxed)


STRICT = Behaviour("strict", None, "follows every closure rule (the default)")


def relaxing(name: str, rule: Rule, description: str) -> Behaviour:
    """A misbehaviour the engine plays: ``rule`` is broken by relaxing it there."""
    return Behaviour(name, rule, description, (rule,))


#: R5 broken in the engine, in the words of every session-per-connection server.
NO_CLOSE_NOTIFY_REPLY = relaxing(
    "no-close-notify-reply", Rule.R5, "closes TCP instead of answering the client's close_notify"
)

#: Misbehaviours every reference server has, beside its own table: the
#: return-to-plaintext mistakes real software makes, so that every server
#: scenario is shown failing against some peer.
EXTRA_BEHAVIOURS: Tuple[Behaviour, ...] = (
    Behaviour(
        "resume-without-stoptls",
        Rule.R3,
        "returns to plaintext (a new greeting) after a close_notify that no STOPTLS asked for",
    ),
    Behaviour(
        "plaintext-goodbye",
        Rule.R3,
        "answers a close_notify that no STOPTLS asked for, then writes a plaintext goodbye"
        " (SMTP 421, IMAP BYE) before closing TCP",
    ),
    Behaviour(
        "one-sided-bare-resume",
        Rule.R4,
        "takes plaintext glued to a close_notify (no STOPTLS) as the start of plaintext",
        (Rule.R4,),
    ),
    Behaviour(
        "accept-starttls-in-tls",
        Rule.R8,
        "answers a second STARTTLS inside TLS with its positive reply (and stays in TLS)",
    ),
    Behaviour(
        "accept-stoptls-in-plaintext",
        Rule.R3,
        "answers STOPTLS with its positive reply outside TLS",
    ),
)


def behaviour_named(behaviours: Dict[str, Behaviour], name: str) -> Behaviour:
    """Look ``name`` up, with an error that lists the choices."""
    try:
        return behaviours[name]
    except KeyError:
        choices = ", ".join(sorted(behaviours))
        raise ValueError(f"unknown behaviour {name!r}; choose one of: {choices}") from None


#: Behaviours in which a close_notify that no STOPTLS asked for returns to
#: plaintext (the server arms the return at every handshake).
BARE_RESUME = frozenset({"resume-without-stoptls", "one-sided-bare-resume"})


class ExtraModes:
    """The :data:`EXTRA_BEHAVIOURS` of one connection on a :class:`SwitchableTransport`.

    Servers whose session owns the transport (POP3, ManageSieve) share this
    instead of repeating the same checks; only the wording of the goodbye
    and of the positive replies stays in the dialect's server.
    """

    def __init__(self, behaviour: Behaviour, goodbye: Callable[[str], bytes]) -> None:
        self.name = behaviour.name
        #: Renders the dialect's goodbye line (POP3 ``-ERR``, ManageSieve ``BYE``).
        self.goodbye = goodbye
        #: Armed at every handshake: a close_notify without STOPTLS returns to plaintext.
        self.unasked_return = False

    @property
    def starttls_in_tls(self) -> bool:
        """accept-starttls-in-tls (R8 broken): answer a second STARTTLS positively."""
        return self.name == "accept-starttls-in-tls"

    @property
    def stoptls_in_plaintext(self) -> bool:
        """accept-stoptls-in-plaintext (R3 broken): answer STOPTLS positively without TLS."""
        return self.name == "accept-stoptls-in-plaintext"

    def handshake_done(self, transport: SwitchableTransport) -> None:
        """After each STARTTLS: arm the bare return of the BARE_RESUME modes (R3 broken)."""
        if self.name in BARE_RESUME:
            transport.engine.accept_unwrap()
            self.unasked_return = True

    def stoptls_asked(self) -> None:
        """STOPTLS arrived: the closure that follows is an agreed one."""
        self.unasked_return = False

    def on_event(self, event: Event, transport: Optional[SwitchableTransport]) -> bool:
        """Write the plaintext goodbye ``event`` calls for (plaintext-goodbye).

        Returns True when a closure no STOPTLS asked for has returned to
        plaintext (resume-without-stoptls): the caller resets and greets.
        """
        if isinstance(event, ClosureComplete) and event.resumed and self.unasked_return:
            self.unasked_return = False
            return True
        if self.name != "plaintext-goodbye" or transport is None:
            return False
        if isinstance(event, ClosureComplete) and not event.resumed:
            # R3 broken: plaintext onto the connection after the closure.
            transport.write_raw(self.goodbye("TLS closed, closing connection"))
        elif isinstance(event, Violation) and event.rule is Rule.R6:
            # R3 broken: a plaintext goodbye onto the truncated TLS connection.
            transport.write_raw(self.goodbye("connection truncated"))
        return False


@dataclass(frozen=True)
class Limits:
    """Bounds that keep a reference server safe against hostile starttls_harness.clients."""

    max_line: int = 2048
    max_literal: int = 1 << 20
    max_message: int = 1 << 20
    max_connections: int = 256
    idle_timeout: float = 60.0


@dataclass
class ServerConfig:
    """How to start a reference server (shared by SMTP and IMAP)."""

    pki: Pki
    host: str = "127.0.0.1"
    port: int = 0
    tls_version: Optional[str] = None  # "1.2", "1.3" or None for both
    behaviour: str = "strict"
    keylog: Optional[Path] = None
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    #: The test user for AUTH PLAIN (SMTP) and LOGIN (IMAP).
    user: str = "tester"
    password: str = "correct horse"
    #: A TLS context built by the caller (the built-in path pair keeps one per
    #: key log file); it then stands for ``pki``, ``tls_version`` and ``keylog``.
    context: Optional[ssl.SSLContext] = None

    def ssl_context(self) -> ssl.SSLContext:
        if self.context is not None:
            return self.context
        return self.pki.server_context(self.tls_version, keylog=self.keylog)


@dataclass
class RunningServer:
    """A started reference server; ``close()`` stops it and its connections."""

    server: asyncio.AbstractServer
    config: ServerConfig
    #: Messages received (SMTP) or appended (IMAP), visible to tests.
    messages: List[Any] = field(default_factory=list)
    #: Per-connection records (transports, violations) for tests.
    connections: List[Any] = field(default_factory=list)

    @property
    def address(self) -> Tuple[str, int]:
        sockname = self.server.sockets[0].getsockname()  # type: ignore[attr-defined]
        return str(sockname[0]), int(sockname[1])

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    async def close(self) -> None:
        self.server.close()
        tasks: List[asyncio.Task[Any]] = []
        for conn in list(self.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()
            # A session served by a task of its own (FTP) may be waiting on
            # something the abort does not wake: it ends with the server.
            task = getattr(conn, "task", None)
            if isinstance(task, asyncio.Task) and not task.done():
                task.cancel()
                tasks.append(task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def __aenter__(self) -> RunningServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
