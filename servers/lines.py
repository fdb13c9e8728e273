"""What the reference servers of the line protocols share (POP3, ManageSieve, NNTP).

Each of those servers serves a connection with one coroutine that reads
command lines from a :class:`~starttls_harness.servers.imapsyntax.LineReader`
and answers them, so that STARTTLS and STOPTLS ``await`` the transport's
switch.  The rules are kept the same way in every one of them, so that part
is written once here; a dialect's server module says only what is its own:
its commands and answers, its greeting, what a transition forgets, and the
words of its misbehaving modes.

* :class:`LineSession` -- the asyncio protocol and the session loop; the
  engine watch (``no-close-notify-reply`` hangs up, R5; ``alert-as-close``
  greets again, R7; the :data:`~starttls_harness.servers.base.EXTRA_BEHAVIOURS`
  through :class:`~starttls_harness.servers.base.ExtraModes`); STARTTLS
  (R1: the hold gate is armed for the plaintext upgrade command, the
  leftover goes to the engine; R8: the state is reset) and STOPTLS (R3-R5:
  the bidirectional closure, then a fresh greeting; ``early-plaintext``
  greets before the client's close_notify);
* :class:`SessionsRunningServer` and :func:`start_session_server` -- a
  running server whose ``close()`` also waits for its sessions.

All of it is the line-framed case of :mod:`starttls_harness.servers.framed`,
the server base PostgreSQL and XMPP are built on too; what is here is what
lines add: the line reader, its limits, and the return to plaintext.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Callable, ClassVar, Dict, List, Optional, Protocol

from starttls_harness.servers.base import (
    EXTRA_BEHAVIOURS,
    NO_CLOSE_NOTIFY_REPLY,
    STRICT,
    Behaviour,
    RunningServer,
    relaxing,
)
from starttls_harness.servers.framed import (
    EndSession,
    FramedProtocol,
    FramedSession,
    SessionsRunningServer,
    set_done,
    start_session_server,
)
from starttls_harness.servers.imapsyntax import LineReader, LineTooLong
from starttls_harness.tls.aio import SwitchableTransport
from starttls_harness.tls.engine import ClosureComplete, Rule
from starttls_harness.tls.states import State

__all__ = [
    "ConnectionCount",
    "EndSession",
    "LineServerProtocol",
    "LineSession",
    "SessionsRunningServer",
    "server_behaviours",
    "start_session_server",
]


def server_behaviours(upgrade: str, *, cut: str, keeps: str) -> Dict[str, Behaviour]:
    """A line server's misbehaving modes, each breaking exactly one rule.

    ``upgrade`` names the upgrade command, ``cut`` the unit that
    ``ignore-truncation`` stores when EOF cuts it (R6), ``keeps`` the state
    that ``no-state-reset`` keeps (R8); then the shared
    :data:`~starttls_harness.servers.base.EXTRA_BEHAVIOURS`.
    """
    return {
        b.name: b
        for b in (
            STRICT,
            relaxing(
                "keep-buffer", Rule.R1, f"executes commands pipelined after {upgrade} inside TLS"
            ),
            relaxing("plaintext-in-tls", Rule.R2, "executes plaintext received while TLS is up"),
            Behaviour(
                "early-plaintext",
                Rule.R3,
                "sends close_notify and the plaintext greeting without waiting for the client's"
                " close_notify",
            ),
            relaxing(
                "one-sided-resume",
                Rule.R4,
                "accepts plaintext that follows the client's close_notify in the same segment",
            ),
            NO_CLOSE_NOTIFY_REPLY,
            relaxing("ignore-truncation", Rule.R6, f"stores {cut} cut by EOF under TLS"),
            relaxing(
                "alert-as-close", Rule.R7, "takes a fatal alert for a closure and resumes plaintext"
            ),
            Behaviour("no-state-reset", Rule.R8, f"keeps {keeps} across {upgrade} and STOPTLS"),
            *EXTRA_BEHAVIOURS,
        )
    }


class LineServerProtocol(FramedProtocol):
    """A server connection that reads lines, and its half of the return to plaintext.

    Shared by the line sessions and the IMAP server: STOPTLS's answer is
    followed by the bidirectional closure and a fresh greeting (R3-R5): the
    answer leaves under TLS, the client's close_notify is answered, and only
    then does the server greet in plaintext.  ``early-plaintext`` greets
    before the client's close_notify (R3); ``no-close-notify-reply`` hangs up
    instead (R5, in the engine watch); ``alert-as-close`` greets again (R7).
    """

    reader: LineReader
    _stopping: bool
    _after_stoptls: bytes

    def _unasked_return(self) -> None:
        self._reset()  # resume-without-stoptls: greet as after STOPTLS
        self._write(self._resumed_greeting())

    def _closure_complete(self, event: ClosureComplete) -> None:
        if self._stopping and self.reader.pending:
            self._after_stoptls = self.reader.take_pending()
        set_done(self._closure)

    def _alert_received(self) -> None:
        t = self.transport
        if (
            not self.behaviour.policy.enforces(Rule.R7)
            and t is not None
            and t.engine.state is State.PLAINTEXT
        ):
            self._reset()  # alert-as-close: the alert is taken for a closure
            self._write(self._greeting_after_alert())

    def _greeting_after_alert(self) -> bytes:
        """The greeting when ``alert-as-close`` takes an alert for a closure."""
        return self._resumed_greeting()

    def _reset(self) -> None:
        raise NotImplementedError

    def _resumed_greeting(self) -> bytes:
        """The greeting after the return to plaintext."""
        raise NotImplementedError

    async def _close_then_greet(self, answer: bytes, bound: float) -> bool:
        """Answer STOPTLS with ``answer``, close, greet; False when commands were pipelined."""
        t = self.transport
        assert t is not None
        loop = asyncio.get_running_loop()
        name = self.behaviour.name
        if name == "early-plaintext":
            # R3 broken: close_notify and plaintext leave together, before
            # the client's close_notify can have arrived.
            self._closure = loop.create_future()
            with t.corked():
                t.write(answer)
                t.events.extend(t.engine.unwrap())
                self._reset()
                t.write_raw(self._resumed_greeting())
            await asyncio.wait_for(self._closure, bound)
            return True
        if name == "no-close-notify-reply":
            # R5 broken: the engine watch closes TCP when the close_notify comes.
            self._close_notify = loop.create_future()
            t.write(answer)
            await asyncio.wait_for(self._close_notify, bound)
            return True
        self._stopping = True
        try:
            await t.accept_unwrap(preface=answer)
        finally:
            self._stopping = False
        if self._after_stoptls:
            return False
        self._reset()
        self._write(self._resumed_greeting())
        return True


#: How many finished connection records ``RunningServer.connections`` keeps.
KEEP_FINISHED = 256


class Slots(Protocol):
    """Where a server counts its connections: those served now, and the next id."""

    active: int
    next_id: int


class ConnectionCount(LineServerProtocol):
    """A connection counted against ``Limits.max_connections`` (the IMAP and NNTP servers).

    It takes a slot when it is made (or is turned away with the dialect's
    refusal), gives it back when it ends, and prunes the finished records of
    ``RunningServer.connections`` so that a long run does not grow them.
    """

    def _count_in(self, slots: Slots, records: List[Any]) -> None:
        self._slots = slots
        self._records = records
        self.id = slots.next_id
        slots.next_id += 1
        self._counted = False
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _take_slot(self, transport: SwitchableTransport, limit: int, refusal: bytes) -> bool:
        """Take a slot; False (after ``refusal`` and a close) when all are taken."""
        if self._slots.active >= limit:
            transport.write(refusal)
            transport.close()
            self._finish()
            return False
        self._slots.active += 1
        self._counted = True
        return True

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        super().connection_lost(exc)
        self._release_slot()
        self._prune()

    def _finish(self) -> None:
        self._release_slot()
        if not self.finished.done():
            self.finished.set_result(None)

    def _release_slot(self) -> None:
        if self._counted:
            self._counted = False
            self._slots.active -= 1

    def _prune(self) -> None:
        records = self._records
        done = [
            c for c in records if getattr(c, "finished", None) is not None and c.finished.done()
        ]
        for old in done[: max(0, len(done) - KEEP_FINISHED)]:
            records.remove(old)


class LineSession(LineServerProtocol, FramedSession):
    """One connection of a line server (see the module docstring).

    A dialect sets the class attributes and fills in the hooks (the methods
    that raise :class:`NotImplementedError`).
    """

    #: The positive answers to STARTTLS and STOPTLS.
    starttls_ok: ClassVar[bytes]
    stoptls_ok: ClassVar[bytes]
    #: The answer to a line over the limit (the session ends after it).
    too_long: ClassVar[bytes]
    #: The goodbye after the idle timeout (None: the session ends silently).
    idle: ClassVar[Optional[bytes]] = None
    #: Why the session ends when commands were pipelined after STOPTLS.
    pipelined: ClassVar[str] = "commands were pipelined after STOPTLS"

    def __init__(
        self,
        running: RunningServer,
        behaviour: Behaviour,
        ctx: ssl.SSLContext,
        goodbye: Callable[[str], bytes],
    ) -> None:
        super().__init__(
            running, behaviour, ctx, goodbye, LineReader(running.config.limits.max_line)
        )
        #: STARTTLS upgrades done on the connection.
        self.upgrades = 0
        self._stopping = False
        self._after_stoptls = b""

    # ------------------------------------------------------------ hooks

    def _greeting(self) -> bytes:
        """The greeting at connection start and after every return to plaintext."""
        raise NotImplementedError

    def _reset(self) -> None:
        """R8: back to the state at connection start (unless no-state-reset)."""
        raise NotImplementedError

    def _resumed_greeting(self) -> bytes:
        return self._greeting()

    def _holds(self, line: bytes) -> bool:
        """Hold-gate predicate: the plaintext upgrade command."""
        raise NotImplementedError

    async def _execute(self, raw: bytes) -> None:
        """Answer one command."""
        raise NotImplementedError

    async def _read_command(self) -> bytes:
        """One command (a line; a dialect with literals reads them inline)."""
        return await self.reader.read_line(self.config.limits.idle_timeout)

    # ------------------------------------------------------------ session

    async def _serve(self) -> None:
        t = self.transport
        assert t is not None
        try:
            self._write(self._greeting())
            while not t.is_closing():
                await self._execute(await self._read_command())
        except LineTooLong:
            raise EndSession(self.too_long) from None
        except asyncio.TimeoutError:
            if self.idle is None:
                raise
            raise EndSession(self.idle) from None

    async def _serve_starttls(self, has_args: bool, refusal: bytes) -> bool:
        """STARTTLS (R1, R8); True once TLS is up, False when answered otherwise."""
        t = self.transport
        assert t is not None
        if t.tls_active and not has_args and self.extra.starttls_in_tls:
            self._write(self.starttls_ok)  # R8 broken: the session stays in TLS
            return False
        if has_args or t.tls_active or self.user is not None:
            self._write(refusal)
            if not t.tls_active and t.engine.held:
                t.release_held()
            return False
        leftover = self.reader.take_pending()  # R1 leftover, if the gate missed any
        await t.start_tls(self.ctx, server_side=True, preface=self.starttls_ok, leftover=leftover)
        self.upgrades += 1
        self._reset()
        self.extra.handshake_done(t)
        return True

    async def _serve_stoptls(self, has_args: bool, *, not_in_tls: bytes, misplaced: bytes) -> None:
        """STOPTLS: the bidirectional closure, then a fresh greeting (R3-R5)."""
        t = self.transport
        assert t is not None
        self.extra.stoptls_asked()
        if not t.tls_active and not has_args and self.extra.stoptls_in_plaintext:
            self._write(self.stoptls_ok)  # R3 broken: there is no TLS to end
            return
        if not t.tls_active:
            self._write(not_in_tls)
            return
        if has_args or self.reader.pending:
            self._write(misplaced)
            return
        if not await self._close_then_greet(self.stoptls_ok, self.config.timeouts.closure):
            raise self._farewell(self.pipelined)
