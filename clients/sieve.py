"""Reference ManageSieve client (RFC 5804): STARTTLS, the STOPTLS extension, misbehaviours.

No Python ManageSieve library runs on the harness's switchable transport, so
this client is small and written for it: an ``asyncio.Protocol`` on
:class:`starttls_harness.tls.aio.SwitchableTransport`.

Rules it keeps: R1 (the hold gate is armed for the line that closes the
STARTTLS answer; bytes after it are refused by the engine), R3-R5 (``stoptls()``
waits for the bidirectional closure, reads the plaintext greeting and asks
CAPABILITY), R8 (after STARTTLS it sends ``CAPABILITY``, takes the first capability
list under TLS in place of what it learnt in plaintext, then sends
``NOOP "<tag>"`` and reads up to its tagged answer: a server that re-issues
its capabilities (RFC 5804 §2.2) and one that only answers are both read in
step; nothing is pipelined), R9 (with ``require_tls`` it never authenticates in
plaintext).  A response with data lines where the command expects none is
a re-issued capability list and is read as one.

Behaviours (``BEHAVIOURS``; each breaks exactly one rule, as the IMAP
client's): ``accept-injected-response`` (R1), ``plaintext-in-tls`` (R2),
``one-sided-close`` (R4), ``no-close-notify-reply`` (R5), ``no-state-reset``
(R8: authenticates right after the handshake on the plaintext list) and
``downgrade`` (R9).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import re
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

from starttls_harness.clients.lines import (
    LineClient,
    LinePathDriver,
    client_behaviours,
    run_reference_session,
)
from starttls_harness.dialects.roles import PATH_MESSAGE, ClientOutcome, Hooks, SessionPlan
from starttls_harness.dialects.sieve import final_status, quoted, response_tag
from starttls_harness.servers.base import Behaviour

__all__ = [
    "BEHAVIOURS",
    "CommandError",
    "Response",
    "SieveClient",
    "SieveError",
    "StopTLSNotSupported",
    "TLSRequired",
    "path_driver",
    "reference_session",
]

BEHAVIOURS: Dict[str, Behaviour] = client_behaviours(
    "STARTTLS",
    keeps="keeps capabilities learned before a transition",
    downgrade="authenticates in plaintext when STARTTLS is not offered despite require_tls",
)

_STRING = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_LITERAL_AT_END = re.compile(rb"\{(\d{1,10})\+?\}\r?\n\Z")
_LITERAL_AT_START = re.compile(rb"\{(\d{1,10})\+?\}\r?\n")
_SYNC_TAG = "STARTTLS-SYNC"


class SieveError(Exception):
    """Base class of the client's errors."""


class CommandError(SieveError):
    """The server answered ``NO`` or ``BYE``."""


class TLSRequired(SieveError):
    """TLS is required and could not be had (not offered, refused, failed)."""


class StopTLSNotSupported(SieveError):
    """The server does not list STOPTLS."""


@dataclass
class Response:
    """One response: its data lines (literals inline) and its final line."""

    status: str
    final: bytes
    data: List[bytes] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def tag(self) -> Optional[str]:
        return response_tag(self.final)


def _capability_list(data: Sequence[bytes]) -> Dict[str, str]:
    caps: Dict[str, str] = {}
    for line in data:
        strings = [s.decode("utf-8", "replace") for s in _STRING.findall(line)]
        if strings:
            caps[strings[0].upper()] = strings[1] if len(strings) > 1 else ""
    return caps


class SieveClient(LineClient):
    """A ManageSieve client on the switchable transport; create it with :meth:`connect`."""

    behaviours = BEHAVIOURS
    error = SieveError
    tls_required = TLSRequired
    stoptls_unsupported = StopTLSNotSupported
    stoptls_missing = "the server does not list STOPTLS"

    max_literal = 1 << 20
    #: The capability list of the current phase, name -> value (None: not known).
    caps: Optional[Dict[str, str]] = None
    authenticated = False
    _tag = 0

    @property
    def capabilities(self) -> Optional[FrozenSet[str]]:
        return frozenset(self.caps) if self.caps is not None else None

    # ----------------------------------------------------------- commands

    async def capability(self) -> FrozenSet[str]:
        """Ask the server; the answer replaces what was known."""
        response = await self._run(b"CAPABILITY\r\n", data=True)
        self.caps = _capability_list(response.data)
        return frozenset(self.caps)

    async def noop(self) -> Response:
        self._tag += 1
        return await self._run(b"NOOP " + quoted(f"n{self._tag}") + b"\r\n")

    async def _resync(self) -> None:
        """CAPABILITY, then a tagged NOOP read up to its answer; the first list counts.

        The first response under TLS is the re-issued list (RFC 5804 §2.2) or
        the answer to CAPABILITY; the NOOP, sent only once that response is
        in, brings the reader level with the server either way.
        """
        self._write(b"CAPABILITY\r\n")
        first = await self._response()
        if not first.ok:
            raise CommandError(first.final.decode("utf-8", "replace").strip())
        self.caps = _capability_list(first.data)
        self._write(b"NOOP " + quoted(_SYNC_TAG) + b"\r\n")
        for _ in range(4):
            response = await self._response()
            if response.status == "BYE":
                raise CommandError(response.final.decode("utf-8", "replace").strip())
            if response.tag == _SYNC_TAG:
                return
        raise SieveError("no answer to the synchronising NOOP")

    async def authenticate(self, user: str, password: str) -> Response:
        """AUTHENTICATE "PLAIN" with an initial response; never in plaintext (R9)."""
        self._guard_credentials()
        caps = self.caps or {}
        if "PLAIN" not in caps.get("SASL", "").upper().split():
            raise SieveError("the server offers no SASL PLAIN")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        response = await self._run(b'AUTHENTICATE "PLAIN" ' + quoted(token) + b"\r\n")
        self.authenticated = True
        return response

    async def putscript(self, name: str, script: bytes) -> Response:
        """Store ``script`` as ``name`` (a non-synchronizing literal)."""
        head = b"PUTSCRIPT " + quoted(name) + b" {%d+}\r\n" % len(script)
        return await self._run(head + script + b"\r\n")

    async def listscripts(self) -> List[str]:
        response = await self._run(b"LISTSCRIPTS\r\n", data=True)
        names = [_STRING.search(line) for line in response.data]
        return [n.group(1).decode("utf-8", "replace") for n in names if n is not None]

    async def getscript(self, name: str) -> bytes:
        """The script ``name`` (sent back as a literal or a quoted string)."""
        response = await self._run(b"GETSCRIPT " + quoted(name) + b"\r\n", data=True)
        if not response.data:
            raise SieveError("GETSCRIPT answered without the script")
        first = response.data[0]
        literal = _LITERAL_AT_START.match(first)
        if literal is not None:
            return first[literal.end() : literal.end() + int(literal.group(1))]
        found = _STRING.match(first)
        return found.group(1) if found is not None else first

    async def logout(self) -> None:
        with contextlib.suppress(CommandError):
            await self._run(b"LOGOUT\r\n")
        await self.aclose()

    goodbye = logout

    # ------------------------------------------------------------ hooks

    async def _greet(self) -> None:
        await self._read_greeting(learn=True)

    def _known(self) -> Optional[FrozenSet[str]]:
        return self.capabilities

    async def _discover(self) -> FrozenSet[str]:
        return await self.capability()

    async def _ask_upgrade(self) -> Optional[str]:
        # R1: whatever follows the line closing the answer is held, not read.
        self.transport.hold_after(lambda line: final_status(line) is not None, once=True)
        self._write(b"STARTTLS\r\n")
        response = await self._response()
        return None if response.ok else response.final.decode().strip()

    async def _rediscover(self, upgraded: bool) -> None:
        if upgraded:
            await self._resync()
        else:
            await self.capability()

    async def _ask_stoptls(self) -> None:
        await self._run(b"STOPTLS\r\n")

    def _glued(self) -> Tuple[bytes, Callable[[], Awaitable[object]]]:
        async def answer() -> None:
            await self._read_greeting(learn=True)
            self.caps = _capability_list((await self._response()).data)

        return b"CAPABILITY\r\n", answer

    async def _greet_again(self, reset: bool) -> None:
        await self._read_greeting(learn=False)

    def _forget(self) -> None:
        self.caps = None
        self.authenticated = False

    # ------------------------------------------------------- internals

    async def _run(self, command: bytes, *, data: bool = False) -> Response:
        """Send ``command``; its answer (a re-issued capability list before it is read as one)."""
        self._write(command)
        for _ in range(4):
            response = await self._response()
            if response.data and not data and response.status == "OK":
                if self.behaviour.name != "no-state-reset":
                    self.caps = _capability_list(response.data)
                continue
            if not response.ok:
                raise CommandError(response.final.decode("utf-8", "replace").strip())
            return response
        raise SieveError("too many unsolicited responses")

    async def _response(self) -> Response:
        reader = self.protocol.reader
        data: List[bytes] = []
        while True:
            line = await reader.read_line(self.timeout)
            status = final_status(line)
            if status is not None:
                return Response(status, line, data)
            found = _LITERAL_AT_END.search(line)
            if found is not None:
                size = int(found.group(1))
                if size > self.max_literal:
                    self.transport.abort()
                    raise SieveError(f"literal of {size} bytes exceeds {self.max_literal}")
                line += await reader.read_exactly(size, self.timeout)
                line += await reader.read_line(self.timeout)
            data.append(line)

    async def _read_greeting(self, *, learn: bool) -> None:
        response = await self._response()
        if not response.ok:
            self.transport.abort()
            raise SieveError(f"unexpected greeting {response.final[:80]!r}")
        if learn:
            self.caps = _capability_list(response.data)


# ------------------------------------------------------ the harness's roles


class _PathDriver(LinePathDriver[SieveClient]):
    """:class:`SieveClient` through the path proxy, one verb at a time."""

    async def command(self, hooks: Hooks) -> None:
        await self._client().noop()

    async def send_unit(self, hooks: Hooks) -> None:
        """PUTSCRIPT of a literal over two records: FIN replaces the second."""
        client = self._client()
        await client.capability()  # what the server offers now, whatever was kept
        await client.authenticate(self.user, self.password)
        hooks.arm(nth=2)  # command and literal in one write: records 1-2
        await client.putscript("path", PATH_MESSAGE)

    async def fetch_unit(self, hooks: Hooks) -> None:
        """GETSCRIPT of a script whose literal takes two records: FIN cuts it."""
        client = self._client()
        await client.capability()
        await client.authenticate(self.user, self.password)
        await client.putscript("path", PATH_MESSAGE)
        hooks.arm(nth=2)
        await client.getscript("path")


#: The reference client as the path role's client under test (it authenticates):
#: ``path_driver(spec, behaviour, user, password)``.
path_driver = functools.partial(_PathDriver, SieveClient)


async def reference_session(plan: SessionPlan) -> ClientOutcome:
    """The reference client's normal session against the scripted server.

    STARTTLS, AUTHENTICATE; STOPTLS cycles (closure, greeting, CAPABILITY);
    PUTSCRIPT; LOGOUT.
    """

    async def login(client: SieveClient) -> None:
        await client.authenticate(plan.user, plan.password)

    async def store(client: SieveClient) -> None:
        await client.putscript("harness", plan.message)

    return await run_reference_session(
        SieveClient,
        plan,
        login=login,
        store=store,
        done="script stored after {n} STOPTLS cycle(s)",
    )
