"""The line-framing case of the reference client base (POP3, ManageSieve, NNTP, FTP, IMAP).

Those clients are :class:`starttls_harness.clients.peer.PeerClient` classes whose
protocol feeds a :class:`~starttls_harness.servers.imapsyntax.LineReader`,
and whose upgrade and return follow the same command/answer pattern; only
the words differ.  So that pattern is written once here, and a dialect's
client module says only what is its own: its commands and how it reads
their answers (the hooks below), its errors, and its misbehaving modes.

* :class:`LineClientProtocol` -- the peer protocol on a line reader;
* :class:`LineClient` -- connect and greet, the upgrade (R1: the hold gate
  is armed before the command leaves; R9: ``require_tls`` refuses to go on
  without TLS, ``downgrade`` goes on), the return to plaintext (R3-R5; the
  ``one-sided-close`` mode glues its next command to its close_notify, R4),
  the reset at every transition (R8; ``no-state-reset`` keeps the state),
  and a bounded close;
* :class:`LinePathDriver` -- the client driven one verb at a time through the
  path proxy (its verbs: :class:`~starttls_harness.clients.peer.PeerPathDriver`);
* :func:`run_reference_session` -- the normal session against the scripted
  server (one skeleton for every reference client, re-exported here).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import (
    Any,
    Awaitable,
    Callable,
    ClassVar,
    Collection,
    Dict,
    Optional,
    Sequence,
    Tuple,
    Type,
)

from starttls_harness.clients.peer import (
    PeerClient,
    PeerPathDriver,
    PeerProtocol,
    client_modes,
    run_reference_session,
)
from starttls_harness.servers.base import Behaviour
from starttls_harness.servers.imapsyntax import LineReader
from starttls_harness.tls.engine import Rule
from starttls_harness.tls.states import State

__all__ = [
    "LineClient",
    "LineClientProtocol",
    "LinePathDriver",
    "client_behaviours",
    "run_reference_session",
]


def client_behaviours(
    upgrade: str,
    *,
    keeps: str,
    downgrade: str,
    answer: str = "response",
    extra: Sequence[Behaviour] = (),
) -> Dict[str, Behaviour]:
    """A line client's misbehaving modes, each breaking exactly one rule, in rule order.

    ``upgrade`` names the upgrade command and ``answer`` what the server sends;
    ``keeps`` says what ``no-state-reset`` keeps (R8), ``downgrade`` what the
    client does without TLS (R9); ``extra`` adds the dialect's own modes.
    """
    return client_modes(
        {
            Rule.R1: f"takes plaintext sent after the {upgrade} answer as a TLS {answer}",
            Rule.R2: f"takes plaintext received while TLS is up as a {answer}",
            Rule.R4: "sends the next command right after its close_notify without waiting",
            Rule.R8: keeps,
            Rule.R9: downgrade,
        },
        extra,
    )


class LineClientProtocol(PeerProtocol[LineReader]):
    """Feeds the line reader; watches the engine for closures."""

    def __init__(self, behaviour: Behaviour, max_line: int) -> None:
        super().__init__(behaviour, LineReader(max_line))


class LineClient(PeerClient):
    """A reference client of a line protocol; create it with :meth:`connect`.

    A dialect sets the class attributes and fills in the hooks (the methods
    that raise :class:`NotImplementedError`).
    """

    protocol: LineClientProtocol
    protocol_class: ClassVar[Type[LineClientProtocol]] = LineClientProtocol
    #: The error of an answer the client cannot read (the base error by default).
    protocol_error: ClassVar[Optional[Type[Exception]]] = None
    #: The upgrade command and the return's as they are offered (capabilities).
    upgrade_name: ClassVar[str] = "STARTTLS"
    stoptls_name: ClassVar[str] = "STOPTLS"

    @classmethod
    def _new_protocol(cls, behaviour: Behaviour, options: Dict[str, Any]) -> LineClientProtocol:
        return cls.protocol_class(behaviour, options.pop("max_line", 1 << 16))

    # ------------------------------------------------------------ hooks

    async def _greet(self) -> None:
        """Read the greeting at connection start (raise if it is not one)."""
        raise NotImplementedError

    def _known(self) -> Optional[Collection[str]]:
        """What the server offers in this phase, as far as known (None: not known)."""
        raise NotImplementedError

    async def _discover(self) -> Collection[str]:
        """Ask the server what it offers; the answer replaces what was known."""
        raise NotImplementedError

    async def _ask_upgrade(self) -> Optional[str]:
        """Arm the hold gate, send the upgrade command; the refusal's words, or None."""
        raise NotImplementedError

    async def _rediscover(self, upgraded: bool) -> None:
        """R8: learn the capabilities again after an upgrade (or a return)."""
        await self._discover()

    async def _ask_stoptls(self) -> None:
        """Send the return command and check its positive answer."""
        raise NotImplementedError

    def _return_offered(self) -> bool:
        return self.stoptls_name in (self._known() or ())

    def _glued(self) -> Tuple[bytes, Callable[[], Awaitable[object]]]:
        """``one-sided-close``: the command glued to the close_notify, and how to
        read the greeting and its answer once the closure is over."""
        raise NotImplementedError

    async def _greet_again(self, reset: bool) -> None:
        """Read the plaintext greeting after the return (``reset``: state forgotten)."""
        await self._greet()

    # --------------------------------------------------------- commands

    async def starttls(self, ssl_context: Optional[ssl.SSLContext] = None) -> bool:
        """Upgrade to TLS; True once TLS is up (False only for ``downgrade``)."""
        context = self._upgrade_context(ssl_context)
        name = self.upgrade_name
        if name not in await self._offered():
            return self._without_tls(f"the server does not offer {name}")
        refused = await self._ask_upgrade()
        if refused is not None:
            self.transport.release_held()
            return self._without_tls(f"{name} refused: {refused}")
        await self._handshake(context)
        if self._transition():
            await self._rediscover(True)
        return True

    async def stoptls(self) -> None:
        """Return to plaintext with the bidirectional closure (R3-R5)."""
        await self._may_stop()
        await self._ask_stoptls()
        if self.transport.engine.state is not State.TLS:
            # The answer came, and the same read broke a rule (e.g. the
            # server's plaintext greeting glued to its close_notify).
            raise self._ended(f"TLS ended before {self.stoptls_name} completed")
        self._nothing_after_answer()
        if self.behaviour.name == "one-sided-close":
            # R4 broken: close_notify and the next command in one segment.
            command, answer = self._glued()
            self.protocol.closure = asyncio.get_running_loop().create_future()
            with self.transport.corked():
                self.transport.events.extend(self.transport.engine.unwrap())
                self.transport.write(command)
            await asyncio.wait_for(self.protocol.closure, self.timeout)
            self._transition()
            await answer()
            return
        await self.transport.unwrap(timeout=self.timeout)
        reset = self._transition()
        await self._greet_again(reset)
        if reset:
            await self._rediscover(False)

    # -------------------------------------------------------- internals

    async def _may_stop(self) -> None:
        """The return needs TLS up and the server offering it."""
        if not self.transport.tls_active:
            raise self.error(f"{self.stoptls_name} needs an active TLS session")
        if self.stoptls_name not in await self._offered():
            raise self.stoptls_unsupported(self.stoptls_missing)

    def _nothing_after_answer(self) -> None:
        """R3: nothing may follow the return's answer before the closure."""
        if self.protocol.reader.pending:
            self.transport.abort()
            error = self.protocol_error or self.error
            raise error(f"the server sent data after its {self.stoptls_name} answer")

    def _guard_credentials(self) -> None:
        """R9: no credentials in plaintext when TLS is required (``downgrade`` sends them)."""
        if (
            not self.transport.tls_active
            and self.require_tls
            and self.behaviour.name != "downgrade"
        ):
            raise self.tls_required("refusing to send credentials in plaintext (require_tls)")

    async def _offered(self) -> Collection[str]:
        known = self._known()
        if known is None:
            return await self._discover()
        return known


# ------------------------------------------------------ the harness's roles


#: The path driver of a line client (the same verbs as any reference client's).
LinePathDriver = PeerPathDriver
