"""Reference NNTP client: STARTTLS (RFC 4642), the STOPTLS extension, and misbehaviours.

Why not a library: ``nntplib`` (stdlib up to Python 3.12) is built on a
blocking socket whose ``starttls()`` wraps it with ``wrap_socket`` (bytes
read ahead at the upgrade are dropped unseen; no way back to plaintext), and
no asyncio NNTP library on PyPI has STARTTLS.  So this client is small and
written for the harness: an ``asyncio.Protocol`` on the switchable transport
reading CRLF lines (:class:`~starttls_harness.servers.imapsyntax.LineReader`);
``nntplib`` is used by the tests as an independent peer of the reference
server instead.

Rules it keeps (``docs/rules.md``):

* R1: before sending STARTTLS it arms ``hold_after`` for the status line of
  the answer; plaintext after it is the leftover, which the engine refuses.
* R3-R5: ``stoptls()`` sends STOPTLS (nothing pipelined), expects ``382``,
  ``await transport.unwrap()`` (its close_notify, then the server's), then
  reads the new ``200``/``201`` greeting and re-reads CAPABILITIES.  A
  close_notify the server sends first is answered at once.
* R8: capabilities, login and current group are discarded at every
  transition; CAPABILITIES is re-read after STARTTLS and STOPTLS.
* R9: with ``require_tls=True`` (the default) it aborts with
  :class:`TLSRequired` when STARTTLS is not offered, refused or fails, and
  never sends AUTHINFO in plaintext.

Behaviours (``BEHAVIOURS``; each breaks exactly one rule, as the IMAP
client's): ``strict``; ``accept-injected-response`` (R1, engine relaxed:
plaintext after the ``382`` is taken as a TLS response);
``plaintext-in-tls`` (R2, relaxed); ``one-sided-close`` (R4: close_notify
and the next command, CAPABILITIES, in one segment); ``no-close-notify-reply``
(R5, relaxed: TCP closed instead of answering the server's close_notify);
``no-state-reset`` (R8: trusts the plaintext capabilities after STARTTLS,
logs in at once, never re-reads them); ``downgrade`` (R9: carries on in
plaintext, AUTHINFO in the clear, when STARTTLS is missing or refused).
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Dict, List, Optional, Tuple

from starttls_harness.clients.imap import BEHAVIOURS as IMAP_CLIENT_BEHAVIOURS
from starttls_harness.clients.lines import LineClient, LinePathDriver, run_reference_session
from starttls_harness.dialects.nntp import NEWSGROUP, is_multiline
from starttls_harness.dialects.roles import PATH_MESSAGE, ClientOutcome, Hooks, SessionPlan
from starttls_harness.servers.base import Behaviour

__all__ = [
    "BEHAVIOURS",
    "CommandError",
    "NntpClient",
    "NntpError",
    "Response",
    "StartTLSError",
    "StopTLSNotSupported",
    "TLSRequired",
    "path_driver",
    "reference_session",
]

#: The IMAP client's behaviours, broken the same way (see the module docstring).
BEHAVIOURS: Dict[str, Behaviour] = dict(IMAP_CLIENT_BEHAVIOURS)


class NntpError(Exception):
    """Anything the NNTP client reports."""


class CommandError(NntpError):
    """The server answered with an unexpected status."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"{response.code} {response.text}")
        self.response = response


class StartTLSError(NntpError):
    """STARTTLS was not offered, was refused or failed."""


class TLSRequired(StartTLSError):
    """TLS is required (``require_tls``) and could not be had (R9)."""


class StopTLSNotSupported(NntpError):
    """The server does not advertise STOPTLS under TLS."""


@dataclass
class Response:
    """One answer: status code and text, and the data block if one followed."""

    code: int
    text: str
    lines: List[bytes] = field(default_factory=list)


def _is_status_line(line: bytes) -> bool:
    """Hold-gate predicate: the (single-line) answer to STARTTLS."""
    return line[:3].isdigit()


class NntpClient(LineClient):
    """An NNTP reader client on the switchable transport (see the module docstring)."""

    behaviours = BEHAVIOURS
    error = NntpError
    tls_required = TLSRequired
    starttls_error = StartTLSError
    stoptls_unsupported = StopTLSNotSupported

    greeting: Optional[Response] = None
    #: Capability keyword -> its arguments, in the current phase (None: not known).
    capabilities: Optional[Dict[str, List[str]]] = None
    authenticated = False
    group: Optional[str] = None

    # ----------------------------------------------------------- commands

    async def capability(self) -> Dict[str, List[str]]:
        """CAPABILITIES; the answer replaces what was known."""
        self.capabilities = None
        response = await self._run(b"CAPABILITIES", 101)
        caps: Dict[str, List[str]] = {}
        for line in response.lines:
            words = line.decode("utf-8", "replace").split()
            if words:
                caps[words[0].upper()] = [w.upper() for w in words[1:]]
        self.capabilities = caps
        return caps

    async def date(self) -> Response:
        return await self._run(b"DATE", 111)

    async def login(self, user: str, password: str) -> Response:
        """AUTHINFO USER/PASS, or SASL PLAIN; never in plaintext when TLS is required."""
        if not self.transport.tls_active and self.require_tls and not self.downgraded:
            raise TLSRequired("refusing to send credentials in plaintext (require_tls)")
        caps = self.capabilities if self.capabilities is not None else await self.capability()
        offered = caps.get("AUTHINFO", [])
        if "SASL" in offered and "PLAIN" in caps.get("SASL", []) and "USER" not in offered:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            response = await self._run(f"AUTHINFO SASL PLAIN {token}".encode(), 281)
        else:
            await self._run(f"AUTHINFO USER {user}".encode(), 381)
            response = await self._run(f"AUTHINFO PASS {password}".encode(), 281)
        self.authenticated = True
        return response

    async def select(self, group: str = NEWSGROUP) -> Response:
        response = await self._run(f"GROUP {group}".encode(), 211)
        self.group = group
        return response

    async def post(self, article: bytes) -> Response:
        """POST one article (dot-stuffed here; CRLF line ends expected)."""
        await self._run(b"POST", 340)
        lines = article.split(b"\r\n")
        if lines and lines[-1] == b"":
            lines.pop()
        body = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)
        self._write(body + b".\r\n")
        return self._checked(await self._read_response(), 240)

    async def quit(self) -> Response:
        self._write(b"QUIT\r\n")
        response = await self._read_response()
        await self.aclose()
        return response

    goodbye = quit

    # ------------------------------------------------------------ hooks

    async def _greet(self) -> None:
        response = await self._read_response()
        if response.code not in (200, 201):
            self.transport.abort()
            raise CommandError(response)
        self.greeting = response

    def _known(self) -> Optional[Dict[str, List[str]]]:
        return self.capabilities

    async def _discover(self) -> Dict[str, List[str]]:
        return await self.capability()

    async def _ask_upgrade(self) -> Optional[str]:
        # R1: whatever follows the answer line is held, not read.
        self.transport.hold_after(_is_status_line, once=True)
        self._write(b"STARTTLS\r\n")
        response = await self._read_response()
        return None if response.code == 382 else f"{response.code} {response.text}"

    async def _ask_stoptls(self) -> None:
        await self._run(b"STOPTLS", 382)

    def _glued(self) -> Tuple[bytes, Callable[[], Awaitable[object]]]:
        async def answer() -> None:
            await self._greet()
            await self._read_response()

        return b"CAPABILITIES\r\n", answer

    def _forget(self) -> None:
        self.capabilities = None
        self.authenticated = False
        self.group = None

    # ------------------------------------------------------- internals

    async def _run(self, command: bytes, expect: int) -> Response:
        self._write(command + b"\r\n")
        return self._checked(await self._read_response(), expect)

    @staticmethod
    def _checked(response: Response, expect: int) -> Response:
        if response.code != expect:
            raise CommandError(response)
        return response

    async def _read_response(self) -> Response:
        reader = self.protocol.reader
        status = await reader.read_line(self.timeout)
        if not status[:3].isdigit():
            self.transport.abort()
            raise NntpError(f"malformed status line {status[:80]!r}")
        response = Response(int(status[:3]), status[4:].decode("utf-8", "replace").strip())
        if is_multiline(status):
            while True:
                line = (await reader.read_line(self.timeout)).rstrip(b"\r\n")
                if line == b".":
                    break
                response.lines.append(line[1:] if line.startswith(b".") else line)
        return response


# ------------------------------------------------------ the harness's roles


def _as_article(message: bytes, sender: str = "harness@harness.invalid") -> bytes:
    """A mail message with the headers an NNTP server wants, if it lacks them."""
    head = b""
    if not message.lower().startswith(b"newsgroups:") and b"\r\nnewsgroups:" not in message.lower():
        head += f"Newsgroups: {NEWSGROUP}\r\n".encode()
    if not message.lower().startswith(b"from:") and b"\r\nfrom:" not in message.lower():
        head += f"From: <{sender}>\r\n".encode()
    return head + message


class _PathDriver(LinePathDriver[NntpClient]):
    """:class:`NntpClient` through the path proxy, one verb at a time."""

    async def command(self, hooks: Hooks) -> None:
        await self._client().date()

    async def send_unit(self, hooks: Hooks) -> None:
        """POST (record 1), then the article over two records: FIN replaces the second."""
        hooks.arm(nth=3)
        await self._client().post(_as_article(PATH_MESSAGE))

    async def fetch_unit(self, hooks: Hooks) -> None:
        """CAPABILITIES under TLS: the reference server writes one record per line."""
        hooks.arm(nth=2)
        await self._client().capability()


#: The reference client as the path role's client under test:
#: ``path_driver(spec, behaviour, user, password)``.
path_driver = functools.partial(_PathDriver, NntpClient)


async def reference_session(plan: SessionPlan) -> ClientOutcome:
    """The reference client's normal session against the scripted server.

    CAPABILITIES, STARTTLS, CAPABILITIES, AUTHINFO (when offered); STOPTLS
    cycles (closure, greeting, CAPABILITIES); POST; QUIT.
    """

    async def login(client: NntpClient) -> None:
        if "AUTHINFO" in (client.capabilities or {}):
            await client.login(plan.user, plan.password)

    async def store(client: NntpClient) -> None:
        await client.post(_as_article(plan.message, plan.sender))

    return await run_reference_session(
        NntpClient,
        plan,
        login=login,
        store=store,
        done="article posted after {n} STOPTLS cycle(s)",
    )
