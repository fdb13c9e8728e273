"""Reference IMAP client: STARTTLS, the STOPTLS extension, and misbehaviours.

Why not a library.  The brief says to use a well-kept IMAP library where it
fits; none does:

* ``imaplib`` (stdlib) is built on blocking sockets: ``starttls()`` wraps the
  socket with ``SSLContext.wrap_socket`` and replaces its buffered reader, so
  plaintext read ahead at the upgrade is silently dropped (R1 can be neither
  checked nor reported), and it has no way back to plaintext.  It cannot run
  on :class:`starttls_harness.tls.aio.SwitchableTransport`; the tests use it as an
  independent interoperability peer of the reference server instead.
* ``aioimaplib`` (2.0.3 inspected) has no STARTTLS at all -- TLS only at
  connect time through ``loop.create_connection(ssl=...)`` -- keeps partial
  responses in private buffers (``incomplete_line``), and adding STARTTLS
  would mean ``loop.start_tls``, which cannot return to plaintext and hides
  leftover bytes.

So this client is small and written for the harness: an ``asyncio.Protocol``
on the switchable transport, with the IMAP tokenizer and line reader shared
with :mod:`servers.imapsyntax`.

Rules it keeps (``docs/rules.md``):

* R1: before sending STARTTLS it arms ``hold_after`` for the tagged answer
  line; plaintext after that line is the leftover, which the engine refuses
  (:class:`StartTLSError` with the ``ConnectionEnded`` cause).
* R3-R5: ``stoptls()`` sends STOPTLS (nothing pipelined), expects the tagged
  OK, ``await transport.unwrap()`` (sends close_notify and waits for the
  server's), then reads the server's new ``* OK`` greeting and re-reads
  CAPABILITY.  A server that writes plaintext before the closure is complete
  or hangs up instead of answering makes it raise ``ConnectionEnded`` with
  the rule.  A close_notify the server sends first is answered at once.
* R8: capabilities, authentication and the selected mailbox are discarded at
  every transition; CAPABILITY is re-read after STARTTLS and STOPTLS.
* R9: with ``require_tls=True`` (the default) it aborts with
  :class:`TLSRequired` when STARTTLS is not offered, refused or fails, and
  never sends LOGIN in plaintext.  :class:`StopTLSNotSupported` is raised,
  without sending anything, when STOPTLS is not advertised.

Behaviours (``BEHAVIOURS``; each breaks exactly one rule):

* ``strict`` -- follows every rule.
* ``accept-injected-response`` (R1) -- ``Policy.relaxing(R1)``: plaintext
  after the STARTTLS answer is taken as if it had come inside TLS.
* ``plaintext-in-tls`` (R2) -- ``Policy.relaxing(R2)``: plaintext received
  while TLS is up is taken as a server response.
* ``one-sided-close`` (R4) -- ``stoptls()`` sends its close_notify and the next
  command (CAPABILITY) in one segment, without waiting for the server's
  close_notify (``Policy.relaxing(R4)``).
* ``no-close-notify-reply`` (R5) -- ``Policy.relaxing(R5)``: a close_notify the
  server sends first is not answered; the client closes TCP instead.
* ``no-state-reset`` (R8) -- keeps the capabilities (and login state) learned
  before a transition and does not re-read them: after STARTTLS it trusts
  the plaintext CAPABILITY list.
* ``downgrade`` (R9) -- when STARTTLS is not offered or refused despite
  ``require_tls``, carries on in plaintext and sends LOGIN in the clear.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

from starttls_harness.clients.lines import (
    LineClient,
    LinePathDriver,
    client_behaviours,
    run_reference_session,
)
from starttls_harness.dialects.roles import PATH_MESSAGE, ClientOutcome, Hooks, SessionPlan
from starttls_harness.servers.base import Behaviour
from starttls_harness.servers.imapsyntax import (
    LITERAL_AT_END,
    Atom,
    ParseError,
    Token,
    quote,
    tokenize,
)

__all__ = [
    "BEHAVIOURS",
    "CommandError",
    "FetchResult",
    "ImapClient",
    "ImapError",
    "ImapProtocolError",
    "LoginDisabled",
    "Mailbox",
    "Response",
    "StartTLSError",
    "StopTLSNotSupported",
    "TLSRequired",
    "Untagged",
    "path_driver",
    "reference_session",
]

BEHAVIOURS: Dict[str, Behaviour] = client_behaviours(
    "STARTTLS",
    keeps="keeps capabilities learned before STARTTLS/STOPTLS",
    downgrade="logs in in plaintext when STARTTLS is not offered despite require_tls",
)


# ------------------------------------------------------------------ errors


class ImapError(Exception):
    """Base class of the client's errors."""


class CommandError(ImapError):
    """The server answered NO or BAD."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"{response.tag} {response.status} {response.text}")
        self.response = response


class ImapProtocolError(ImapError):
    """The server sent something IMAP does not allow here."""


class StartTLSError(ImapError):
    """STARTTLS is not offered, was refused, or TLS could not be negotiated."""


class TLSRequired(StartTLSError):
    """R9: TLS is required and could not be had; the connection is closed."""


class StopTLSNotSupported(ImapError):
    """The server does not advertise STOPTLS (nothing was sent)."""


class LoginDisabled(ImapError):
    """The server advertises LOGINDISABLED."""


# --------------------------------------------------------------- responses


@dataclass
class Untagged:
    """One untagged response, literals inline in ``raw``."""

    raw: bytes
    tokens: List[Token]

    @property
    def keyword(self) -> str:
        """``CAPABILITY``, ``OK``, ``FETCH`` (for ``* 3 FETCH``), ..."""
        words = [t for t in self.tokens[:2] if isinstance(t, Atom)]
        if words and bytes(words[0]).isdigit() and len(words) > 1:
            return bytes(words[1]).decode("ascii", "replace").upper()
        return bytes(words[0]).decode("ascii", "replace").upper() if words else ""


@dataclass
class Response:
    """A tagged completion with the untagged responses that preceded it."""

    tag: str
    status: str
    text: str
    code: Optional[str] = None
    untagged: List[Untagged] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "OK"


@dataclass
class Mailbox:
    name: str
    exists: int
    read_only: bool
    uidvalidity: Optional[int] = None


@dataclass
class FetchResult:
    seq: int
    items: Dict[str, Token]

    @property
    def body(self) -> Optional[bytes]:
        """The whole message (``RFC822`` or ``BODY[]``), if fetched."""
        for name in ("RFC822", "BODY[]"):
            value = self.items.get(name)
            if isinstance(value, bytes):
                return bytes(value)
        return None

    @property
    def flags(self) -> Tuple[str, ...]:
        value = self.items.get("FLAGS")
        if not isinstance(value, list):
            return ()
        return tuple(bytes(v).decode("ascii", "replace") for v in value if isinstance(v, bytes))


_STATUS = re.compile(rb"(OK|NO|BAD|BYE|PREAUTH)(?: \[([^\]]*)\])? ?(.*?)\r?\n?\Z", re.I | re.S)
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d{1,10})\]", re.I)
_ATOM_SAFE = re.compile(r"[!#$&'+-\[^-z|}~]+\Z")

#: An argument of :meth:`ImapClient.command`: ``str`` is sent verbatim
#: (atoms, lists, already quoted strings); ``bytes`` is sent as a literal.
Arg = Union[str, bytes]


def astring(value: str) -> str:
    """``value`` as an IMAP astring: an atom when safe, else quoted."""
    if _ATOM_SAFE.match(value):
        return value
    return quote(value).decode("utf-8")


def _number(token: Token) -> int:
    if not isinstance(token, Atom) or not token.isdigit():
        raise ImapProtocolError(f"expected a number, got {token!r}")
    return int(token)


def _capabilities(tokens: Sequence[Token]) -> FrozenSet[str]:
    return frozenset(
        bytes(t).decode("ascii", "replace").upper() for t in tokens if isinstance(t, bytes)
    )


# ---------------------------------------------------------------- protocol


# ------------------------------------------------------------------ client


class ImapClient(LineClient):
    """An IMAP client on the switchable transport (see the module docstring).

    Create it with :meth:`connect`.  Transport failures surface as
    ``ConnectionError`` (:class:`starttls_harness.tls.aio.ConnectionEnded` carries the
    rule when a violation ended the connection).
    """

    behaviours = BEHAVIOURS
    error = ImapError
    tls_required = TLSRequired
    starttls_error = StartTLSError
    stoptls_unsupported = StopTLSNotSupported
    protocol_error = ImapProtocolError

    greeting: Optional[Untagged] = None
    #: What the server advertised in the current phase (None: not known).
    capabilities: Optional[FrozenSet[str]] = None
    authenticated = False
    selected: Optional[str] = None
    #: The largest literal the client reads.
    max_literal = 16 << 20
    _tag = 0

    async def __aenter__(self) -> ImapClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ----------------------------------------------------------- commands

    async def capability(self) -> FrozenSet[str]:
        """Ask the server; the answer replaces what was known."""
        self.capabilities = None
        await self._run("CAPABILITY")
        if self.capabilities is None:
            raise ImapProtocolError("CAPABILITY answered without a capability list")
        return self.capabilities

    async def noop(self) -> Response:
        return await self._run("NOOP")

    async def login(self, user: str, password: str) -> Response:
        """LOGIN; refused locally in plaintext when TLS is required (R9)."""
        self._guard_credentials()
        caps = await self._offered()
        if "LOGINDISABLED" in caps:
            raise LoginDisabled("the server advertises LOGINDISABLED")
        response = await self._run("LOGIN", astring(user), quote(password).decode("utf-8"))
        self.authenticated = True
        return response

    async def select(self, mailbox: str = "INBOX", *, readonly: bool = False) -> Mailbox:
        verb = "EXAMINE" if readonly else "SELECT"
        response = await self._run(verb, astring(mailbox))
        exists, uidvalidity = 0, None
        for item in response.untagged:
            if item.keyword == "EXISTS":
                exists = _number(item.tokens[0])
            found = _UIDVALIDITY.search(item.raw)
            if item.keyword == "OK" and found is not None:
                uidvalidity = int(found.group(1))
        self.selected = mailbox
        read_only = (response.code or "").upper().startswith("READ-ONLY")
        return Mailbox(mailbox, exists, read_only or readonly, uidvalidity)

    async def append(
        self,
        message: bytes,
        mailbox: str = "INBOX",
        *,
        flags: Sequence[str] = (),
        date_time: Optional[str] = None,
    ) -> Response:
        args: List[Arg] = [astring(mailbox)]
        if flags:
            args.append("(" + " ".join(flags) + ")")
        if date_time is not None:
            args.append(quote(date_time).decode("ascii"))
        args.append(bytes(message))
        return await self._run("APPEND", *args)

    async def fetch(
        self, message_set: Union[int, str], items: str = "(RFC822)"
    ) -> List[FetchResult]:
        response = await self._run("FETCH", str(message_set), items)
        results = []
        for item in response.untagged:
            if item.keyword != "FETCH" or len(item.tokens) < 3:
                continue
            values = item.tokens[2]
            if not isinstance(values, list) or len(values) % 2:
                raise ImapProtocolError("malformed FETCH response")
            pairs: Dict[str, Token] = {}
            for name, value in zip(values[::2], values[1::2]):
                if not isinstance(name, bytes):
                    raise ImapProtocolError("malformed FETCH item name")
                pairs[bytes(name).decode("ascii", "replace").upper()] = value
            results.append(FetchResult(_number(item.tokens[0]), pairs))
        return results

    async def logout(self) -> Response:
        response = await self._run("LOGOUT", check=False)
        await self.aclose()
        return response

    goodbye = logout

    async def command(self, name: str, *args: Arg, check: bool = True) -> Response:
        """Any other command (``str`` args verbatim, ``bytes`` as literals)."""
        verb = name.upper()
        if verb in ("STARTTLS", "STOPTLS"):
            raise ValueError(f"use {verb.lower()}(): the transport has to switch")
        if verb in ("LOGIN", "AUTHENTICATE"):
            self._guard_credentials()
        return await self._run(verb, *args, check=check)

    # ------------------------------------------------------------ hooks

    async def _greet(self) -> None:
        await self._read_greeting(learn=True)

    def _known(self) -> Optional[FrozenSet[str]]:
        return self.capabilities

    async def _discover(self) -> FrozenSet[str]:
        return await self.capability()

    async def _ask_upgrade(self) -> Optional[str]:
        tag = self._next_tag()
        prefix = tag + b" "
        # R1: whatever follows our tagged answer line is held, not read.
        self.transport.hold_after(lambda line: line.startswith(prefix), once=True)
        self._write(tag + b" STARTTLS\r\n")
        response = await self._read_response(tag)
        return None if response.ok else f"{response.status} {response.text}"

    async def _ask_stoptls(self) -> None:
        await self._run("STOPTLS")

    def _glued(self) -> Tuple[bytes, Callable[[], Awaitable[object]]]:
        tag = self._next_tag()

        async def answer() -> None:
            await self._read_greeting(learn=True)
            await self._read_response(tag)

        return tag + b" CAPABILITY\r\n", answer

    async def _greet_again(self, reset: bool) -> None:
        await self._read_greeting(learn=reset)

    def _forget(self) -> None:
        self.selected = None
        self.capabilities = None
        self.authenticated = False

    # ------------------------------------------------------- internals

    def _next_tag(self) -> bytes:
        self._tag += 1
        return b"a%d" % self._tag

    def _write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.transport.write(data)

    async def _run(self, name: str, *args: Arg, check: bool = True) -> Response:
        tag = self._next_tag()
        line = tag + b" " + name.encode("ascii")
        early: List[Untagged] = []
        for arg in args:
            if isinstance(arg, str):
                line += b" " + arg.encode("utf-8")
                continue
            plus = "LITERAL+" in (self.capabilities or ())
            line += b" {%d%s}\r\n" % (len(arg), b"+" if plus else b"")
            if not plus:
                self._write(line)
                line = b""
                refused = await self._continuation(tag, early)
                if refused is not None:
                    return self._checked(refused, check)
            line += arg
        self._write(line + b"\r\n")
        response = await self._read_response(tag)
        response.untagged[:0] = early
        return self._checked(response, check)

    @staticmethod
    def _checked(response: Response, check: bool) -> Response:
        if check and not response.ok:
            raise CommandError(response)
        return response

    async def _continuation(self, tag: bytes, early: List[Untagged]) -> Optional[Response]:
        """Wait for ``+`` after a synchronizing literal; a tagged answer refuses it."""
        while True:
            unit = await self._read_unit()
            if unit.startswith(b"+"):
                return None
            response = self._classify(unit, tag)
            if isinstance(response, Response):
                response.untagged[:0] = early
                return response
            early.append(response)

    async def _read_response(self, tag: bytes) -> Response:
        untagged: List[Untagged] = []
        while True:
            unit = await self._read_unit()
            if unit.startswith(b"+"):
                raise ImapProtocolError(f"unexpected continuation request: {unit[:80]!r}")
            item = self._classify(unit, tag)
            if isinstance(item, Response):
                item.untagged[:0] = untagged
                return item
            untagged.append(item)

    async def _read_unit(self) -> bytes:
        """One response line with its literals inline."""
        reader = self.protocol.reader
        line = await reader.read_line(self.timeout)
        raw = bytearray(line)
        while True:
            announced = LITERAL_AT_END.search(line)
            if announced is None:
                return bytes(raw)
            size = int(announced.group(1))
            if size > self.max_literal:
                self.transport.abort()
                raise ImapProtocolError(f"literal of {size} bytes exceeds {self.max_literal}")
            raw += await reader.read_exactly(size, self.timeout)
            line = await reader.read_line(self.timeout)
            raw += line

    def _classify(self, unit: bytes, tag: bytes, learn: bool = True) -> Union[Untagged, Response]:
        if unit.startswith(b"* "):
            try:
                tokens = tokenize(unit, 2)
            except ParseError as exc:
                raise ImapProtocolError(f"malformed response {unit[:80]!r}: {exc}") from exc
            item = Untagged(unit, tokens)
            if not learn:
                return item
            if item.keyword == "CAPABILITY":
                self.capabilities = _capabilities(tokens[1:])
            status = _STATUS.match(unit, 2)
            if status is not None:
                self._learn_code(status.group(2))
            return item
        if not unit.startswith(tag + b" "):
            raise ImapProtocolError(f"unexpected response {unit[:80]!r} (waiting for {tag!r})")
        status = _STATUS.match(unit, len(tag) + 1)
        if status is None or status.group(1).upper() not in (b"OK", b"NO", b"BAD"):
            raise ImapProtocolError(f"malformed completion {unit[:80]!r}")
        code = status.group(2)
        self._learn_code(code)
        return Response(
            tag.decode("ascii"),
            status.group(1).upper().decode("ascii"),
            status.group(3).decode("utf-8", "replace"),
            code.decode("utf-8", "replace") if code is not None else None,
        )

    def _learn_code(self, code: Optional[bytes]) -> None:
        if code is not None and code.upper().startswith(b"CAPABILITY "):
            self.capabilities = _capabilities(code.split()[1:])

    async def _read_greeting(self, *, learn: bool) -> None:
        unit = await self._read_unit()
        item = self._classify(unit, b"*", learn=learn) if unit.startswith(b"* ") else None
        if not isinstance(item, Untagged) or item.keyword not in ("OK", "PREAUTH"):
            self.transport.abort()
            raise ImapProtocolError(f"unexpected greeting {unit[:80]!r}")
        self.greeting = item
        self.authenticated = self.authenticated or item.keyword == "PREAUTH"


# ------------------------------------------------------ the harness's roles


class _PathDriver(LinePathDriver[ImapClient]):
    """:class:`ImapClient` through the path proxy, one verb at a time."""

    async def command(self, hooks: Hooks) -> None:
        await self._client().noop()

    async def send_unit(self, hooks: Hooks) -> None:
        """APPEND of a literal over two records: FIN cuts the literal."""
        client = self._client()
        await client.capability()  # what the server offers now, whatever was kept
        await client.login(self.user, self.password)
        # LITERAL+: command and literal in one write (records 1-2); otherwise
        # the command line is record 1 and the literal records 2-3.
        hooks.arm(nth=2 if "LITERAL+" in (client.capabilities or ()) else 3)
        await client.append(PATH_MESSAGE)

    async def fetch_unit(self, hooks: Hooks) -> None:
        """FETCH of a message whose literal takes two records: FIN cuts it."""
        client = self._client()
        await client.capability()
        await client.login(self.user, self.password)
        await client.append(PATH_MESSAGE)
        await client.select()
        hooks.arm(nth=2)
        await client.fetch(1, "(RFC822)")


#: The reference client as the path role's client under test (it logs in):
#: ``path_driver(spec, behaviour, user, password)``.
path_driver = functools.partial(_PathDriver, ImapClient)


async def reference_session(plan: SessionPlan) -> ClientOutcome:
    """The reference client's normal session against the scripted server.

    CAPABILITY, STARTTLS, CAPABILITY, LOGIN; STOPTLS cycles (closure,
    greeting, CAPABILITY); APPEND; LOGOUT.
    """

    async def login(client: ImapClient) -> None:
        await client.login(plan.user, plan.password)

    async def store(client: ImapClient) -> None:
        await client.append(plan.message)

    return await run_reference_session(
        ImapClient,
        plan,
        login=login,
        store=store,
        done="message appended after {n} STOPTLS cycle(s)",
    )
