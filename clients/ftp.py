"""Reference FTP client: AUTH TLS (RFC 4217), CCC (RFC 2228), and misbehaviours.

Why not ``ftplib``: it reads through ``socket.makefile`` and wraps the
socket with ``SSLContext.wrap_socket`` (bytes its reader buffered before the
upgrade are out of reach, R1 can be neither checked nor reported), and its
``ccc()`` is ``unwrap()`` with no way to show the closure's order.  ftplib is
the interoperability peer of the reference server instead.  This client is
small and written for the harness: an ``asyncio.Protocol`` on
:class:`starttls_harness.tls.aio.SwitchableTransport` (the control
connection only; the storage act is ``MKD``, which needs no data connection).

CCC as it does it (RFC 4217 §5 leaves the order open): the engine is told
before ``CCC`` leaves that a close_notify of the server's returns to
plaintext (it answers it at once, R5); after the ``200`` the client sends its
own close_notify unless the closure already completed (as ftplib and curl's
active mode), waits for the server's (R4), and only then speaks plaintext
(R3), starting with ``FEAT`` (R8).

Behaviours (``BEHAVIOURS``; each breaks exactly one rule):
``accept-injected-response`` (R1), ``plaintext-in-tls`` (R2),
``early-plaintext`` (R3: plaintext after its close_notify is taken as the
end of TLS), ``one-sided-close`` (R4: close_notify and the next command in
one segment), ``no-close-notify-reply`` (R5: closes TCP instead of
answering the server's close_notify), ``passive-ccc`` (R5: curl's passive
CCC mode -- it waits for the server's close_notify, never answers it and
speaks plaintext), ``no-state-reset`` (R8) and ``downgrade`` (R9).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from typing import Dict, FrozenSet, List, Optional, Sequence, Set

from starttls_harness.clients.lines import (
    LineClient,
    LineClientProtocol,
    LinePathDriver,
    client_behaviours,
    run_reference_session,
)
from starttls_harness.dialects.roles import ClientOutcome, Hooks, SessionPlan
from starttls_harness.servers.base import Behaviour
from starttls_harness.tls.aio import SwitchableTransport
from starttls_harness.tls.engine import Event, Rule, Violation
from starttls_harness.tls.states import Input, State, transition

__all__ = [
    "BEHAVIOURS",
    "CommandError",
    "FtpClient",
    "FtpError",
    "StopTLSNotSupported",
    "TLSRequired",
    "path_driver",
    "reference_session",
]

BEHAVIOURS: Dict[str, Behaviour] = client_behaviours(
    "AUTH TLS",
    answer="reply",
    keeps="keeps the FEAT list learned before AUTH TLS/CCC",
    downgrade="logs in in plaintext when AUTH TLS is not offered despite require_tls",
    extra=(
        Behaviour(
            "early-plaintext",
            Rule.R3,
            "after CCC takes plaintext that comes before the server's close_notify",
            (Rule.R3,),
        ),
        Behaviour(
            "passive-ccc",
            Rule.R5,
            "after CCC waits for the server's close_notify, never answers it, speaks plaintext",
            (Rule.R3, Rule.R5),
        ),
    ),
)


class FtpError(Exception):
    """Base class of the client's errors."""


class CommandError(FtpError):
    """The server answered ``4xx``/``5xx``."""


class TLSRequired(FtpError):
    """TLS is required and could not be had (not offered, refused, failed)."""


class StopTLSNotSupported(FtpError):
    """The server does not list CCC."""


def _features(lines: Sequence[bytes]) -> FrozenSet[str]:
    """FEAT's feature lines (``AUTH TLS`` as such; the first word otherwise)."""
    found: Set[str] = set()
    for line in lines[1:-1]:
        text = line.decode("latin-1").strip().upper()
        head, _, args = text.partition(" ")
        if not head:
            continue
        found.add(head)
        if head == "AUTH":
            found.update(f"AUTH {a}" for a in args.replace(";", " ").split())
    return frozenset(found)


class _ClientProtocol(LineClientProtocol):
    """The line client's protocol, with the CCC modes' own closures."""

    def engine_event(self, event: Event) -> None:
        if isinstance(event, Violation) and not event.enforced and event.rule is Rule.R3:
            self.closure_over()  # early-plaintext: the plaintext ended TLS for it
        else:
            super().engine_event(event)

    def unanswered(self, transport: SwitchableTransport) -> None:
        if self.behaviour.name == "passive-ccc" and self.closure is not None:
            # curl's passive mode: the server's close_notify ends TLS for
            # it; it never answers and goes on in plaintext.
            transport.engine.state = transition(transport.engine.state, Input.FORCED_RESUME)
            self.closure_over()
        else:
            transport.close()  # hang up instead (passive-ccc does so outside CCC)


class FtpClient(LineClient):
    """An FTP client on the switchable transport; create it with :meth:`connect`."""

    behaviours = BEHAVIOURS
    protocol_class = _ClientProtocol
    error = FtpError
    tls_required = TLSRequired
    stoptls_unsupported = StopTLSNotSupported
    upgrade_name = "AUTH TLS"
    stoptls_name = "CCC"
    stoptls_missing = "the server does not list CCC"

    greeting = b""
    #: What FEAT listed in the current phase (None: not known).
    features: Optional[FrozenSet[str]] = None
    logged_in = False

    # ----------------------------------------------------------- commands

    async def feat(self) -> FrozenSet[str]:
        """Ask the server; the answer replaces what was known (``502``: none)."""
        self.features = None
        lines = await self._send(b"FEAT")
        self.features = _features(lines) if lines[-1].startswith(b"211") else frozenset()
        return self.features

    async def auth_tls(self, ssl_context: Optional[ssl.SSLContext] = None) -> bool:
        """Upgrade to TLS; True once TLS is up (False only for ``downgrade``)."""
        return await self.starttls(ssl_context)

    async def login(self, user: str, password: str) -> bytes:
        """USER/PASS; refused locally in plaintext (R9)."""
        self._guard_credentials()
        lines = await self._send(f"USER {user}".encode(), check=False)
        if lines[-1].startswith(b"331"):
            lines = await self._send(f"PASS {password}".encode(), check=False)
        self._check(lines)
        self.logged_in = True
        return lines[-1]

    async def protect(self) -> None:
        """``PBSZ 0`` and ``PROT P`` (RFC 4217 §9), as real clients send them."""
        await self._send(b"PBSZ 0")
        await self._send(b"PROT P")

    async def ccc(self) -> None:
        """Clear the control channel (CCC): the bidirectional closure, then plaintext."""
        t = self.transport
        await self._may_stop()
        passive = self.behaviour.name == "passive-ccc"
        self.protocol.closure = asyncio.get_running_loop().create_future()
        if not passive:
            t.engine.accept_unwrap()  # a close_notify of the server's returns to plaintext
        await self._send(b"CCC")
        self._nothing_after_answer()
        if passive:
            await asyncio.wait_for(self.protocol.closure, self.timeout)
        elif self.behaviour.name == "one-sided-close" and t.engine.state is State.TLS:
            # R4 broken: close_notify and the next command in one segment.
            with t.corked():
                t.events.extend(t.engine.unwrap())
                t.write(b"FEAT\r\n")
            await asyncio.wait_for(self.protocol.closure, self.timeout)
            self._transition()
            self.features = _features(await self._reply())
            return
        elif t.engine.state is State.TLS:
            with t.corked():  # our close_notify leaves as the cork is released
                t.events.extend(t.engine.unwrap())
            await asyncio.wait_for(self.protocol.closure, self.timeout)
        elif t.engine.state is not State.PLAINTEXT:
            await asyncio.wait_for(self.protocol.closure, self.timeout)
        if self._transition(keep_login=True):
            await self.feat()

    async def pwd(self) -> bytes:
        return (await self._send(b"PWD"))[-1]

    async def noop(self, *, check: bool = True) -> bytes:
        return (await self._send(b"NOOP", check=check))[-1]

    async def mkd(self, name: str) -> bytes:
        """Make a directory: the storage act (the reference server counts it stored)."""
        return (await self._send(f"MKD {name}".encode()))[-1]

    async def quit(self) -> None:
        with contextlib.suppress(CommandError):
            await self._send(b"QUIT")
        await self.aclose()

    goodbye = quit

    async def stoptls(self) -> None:
        """FTP's return to plaintext is CCC."""
        await self.ccc()

    # ------------------------------------------------------------ hooks

    async def _greet(self) -> None:
        lines = await self._reply()
        if not lines[-1].startswith(b"220"):
            raise FtpError(f"unexpected greeting {lines[-1][:80]!r}")
        self.greeting = b"".join(lines)

    def _known(self) -> Optional[FrozenSet[str]]:
        return self.features

    async def _discover(self) -> FrozenSet[str]:
        return await self.feat()

    async def _ask_upgrade(self) -> Optional[str]:
        # R1: whatever follows the one-line answer is held, not read.
        self.transport.hold_after(lambda line: True, once=True)
        self._write(b"AUTH TLS\r\n")
        answer = await self._line()
        return None if answer.startswith(b"234") else answer.decode("latin-1").strip()

    # ------------------------------------------------------- internals

    def _forget(self) -> None:
        self.features = None
        self.logged_in = False

    def _transition(self, keep_login: bool = False) -> bool:
        """R8 after AUTH TLS/CCC; False when ``no-state-reset`` keeps the state.

        CCC keeps the login by design (RFC 4217 §5); AUTH TLS resets it.
        """
        logged_in = self.logged_in
        if not super()._transition():
            return False
        self.logged_in = logged_in and keep_login
        return True

    async def _line(self) -> bytes:
        return await self.protocol.reader.read_line(self.timeout)

    async def _reply(self) -> List[bytes]:
        """One reply (RFC 959 §4.2: ``ccc-`` ... ``ccc ``)."""
        first = await self._line()
        lines = [first]
        if len(first) >= 4 and first[:3].isdigit() and first[3:4] == b"-":
            code = first[:3]
            while True:
                line = await self._line()
                lines.append(line)
                if line[:3] == code and line[3:4] != b"-":
                    break
        elif not (len(first) >= 3 and first[:3].isdigit()):
            raise FtpError(f"unexpected answer {first[:80]!r}")
        return lines

    def _check(self, lines: List[bytes]) -> None:
        if lines[-1][:1] in (b"4", b"5"):
            raise CommandError(lines[-1].decode("latin-1").strip())

    async def _send(self, command: bytes, *, check: bool = True) -> List[bytes]:
        self._write(command + b"\r\n")
        lines = await self._reply()
        if check:
            self._check(lines)
        return lines


# ------------------------------------------------------ the harness's roles


class _PathDriver(LinePathDriver[FtpClient]):
    """:class:`FtpClient` through the path proxy, one verb at a time."""

    async def command(self, hooks: Hooks) -> None:
        await self._client().noop(check=False)

    async def stoptls(self, hooks: Hooks) -> None:
        client = self._client()
        if not client.logged_in:
            await client.login(self.user, self.password)
        await super().stoptls(hooks)

    async def send_unit(self, hooks: Hooks) -> None:
        """``MKD`` cut in two records: the FIN replaces the second."""
        client = self._client()
        await client.login(self.user, self.password)
        hooks.arm(nth=2)
        client._write(b"MKD path-harness-cut")
        client._write(b"\r\n")
        await client._reply()

    async def fetch_unit(self, hooks: Hooks) -> None:
        """A multi-line FEAT answer cut by a FIN after its first record."""
        client = self._client()
        await client.login(self.user, self.password)
        hooks.arm(nth=1)
        await client.feat()


#: The reference client as the path role's client under test (it logs in):
#: ``path_driver(spec, behaviour, user, password)``.
path_driver = functools.partial(_PathDriver, FtpClient)


async def reference_session(plan: SessionPlan) -> ClientOutcome:
    """The reference client's normal session against the scripted server.

    FEAT, AUTH TLS, FEAT, login, ``PBSZ 0``/``PROT P``; while CCC is offered,
    ``cycles`` times CCC + FEAT + AUTH TLS + FEAT + login; ``MKD`` as the
    stored unit; QUIT.
    """

    async def login(client: FtpClient) -> None:
        await client.login(plan.user, plan.password)

    async def protect(client: FtpClient) -> None:
        if client.transport.tls_active:
            await client.protect()

    async def store(client: FtpClient) -> None:
        answer = await client.mkd("harness-stored")
        if not answer.startswith(b"257"):
            raise client._ended(f"MKD answered {answer[:60]!r}")

    return await run_reference_session(
        FtpClient,
        plan,
        login=login,
        settle=protect,
        store=store,
        done="directory made after {n} CCC cycle(s)",
    )
