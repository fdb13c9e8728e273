"""What a dialect provides in the roles other than the prober's.

The prober's knowledge (commands, replies, capabilities) is on
:class:`~starttls_harness.dialects.base.Dialect` itself.  This module holds
the interfaces of the other roles, so that a dialect module (and its
reference client in ``clients/<dialect>.py``) can implement them without
reaching up into the run layer:

* :class:`ScriptedServer` -- what the harness says when it plays a
  (conforming, then faulty) server for a client under test, and how it cuts
  the client's commands (IMAP literals, SMTP DATA bodies);
* :class:`PathDriver` -- the reference client driven one verb at a time
  through the path proxy;
* :class:`SessionPlan` / :class:`ClientOutcome` -- the reference client's
  one normal session, run against the scripted server.
"""

from __future__ import annotations

import abc
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, FrozenSet, List, Optional, Protocol, Sequence, Tuple

if TYPE_CHECKING:  # types only: the CLI imports the registry at start-up, keep it light
    from starttls_harness.tls.aio import Timeouts
    from starttls_harness.tls.engine import Event

__all__ = [
    "COMMAND_KINDS",
    "PATH_MESSAGE",
    "PATH_RECIPIENT",
    "PATH_SENDER",
    "ClientOutcome",
    "ClientSpec",
    "Command",
    "Hooks",
    "PathDriver",
    "ScriptedServer",
    "SessionPlan",
    "StopTLSUnsupported",
    "dot_body_end",
    "failed",
    "transport_events",
]

#: The kinds a scripted server sorts client commands into (the run layer
#: decides from kinds, never from a dialect's verbs).
COMMAND_KINDS = frozenset(
    {
        "hello",
        "starttls",
        "stoptls",
        "auth",
        "mail",
        "rcpt",
        "data",
        "bdat",
        "message",
        "append",
        "select",
        "access",
        "quit",
        "noop",
        "other",
    }
)


# ------------------------------------------------------- the scripted server


@dataclass(frozen=True)
class Command:
    """One complete unit from the client, and how the server classifies it."""

    raw: bytes
    tls: bool
    kind: str
    verb: str = ""
    tag: bytes = b""
    #: Everything after the verb (and after the tag, for tagged dialects).
    rest: bytes = b""

    @property
    def text(self) -> str:
        return self.raw[:120].decode("latin-1").strip()


class ScriptedServer(abc.ABC):
    """What a conforming server of one dialect says, for the scripted server.

    ``injection_effect`` names how a client shows that it acted on a response
    injected before the handshake; the run layer knows the effects
    ``answer-taken`` (the injected reply is taken as the answer to the first
    command under TLS) and ``capabilities-believed`` (the injected
    capabilities forbid the login that a client then never sends).
    """

    injection_effect: str = ""
    #: Verbs by which a client retreats after taking an injected answer
    #: (``answer-taken``), besides its goodbye and repeating its command.
    retreat_verbs: FrozenSet[str] = frozenset()
    #: A client that ends the connection once TLS is up, before its first
    #: command, refused the injection rather than acted on it (libpq checks
    #: its buffer for unencrypted bytes when the handshake completes).
    close_before_first_is_refusal: bool = False

    @abc.abstractmethod
    def parse(self, raw: bytes, tls: bool) -> Command: ...

    @abc.abstractmethod
    def greeting(self) -> bytes: ...

    @abc.abstractmethod
    def hello(self, cmd: Command, *, tls: bool, starttls: bool, stoptls: bool) -> bytes:
        """The hello answer; the plaintext one carries a bait capability (R8)."""

    @abc.abstractmethod
    def starttls_ok(self, cmd: Command) -> bytes: ...

    @abc.abstractmethod
    def starttls_refused(self, cmd: Command) -> bytes: ...

    @abc.abstractmethod
    def not_offered(self, cmd: Command) -> bytes: ...

    @abc.abstractmethod
    def stoptls_ok(self, cmd: Command) -> bytes: ...

    @abc.abstractmethod
    def goodbye(self, cmd: Command) -> bytes: ...

    @abc.abstractmethod
    def injection(self, starttls: Command) -> bytes:
        """A response a client that reads it before the handshake acts on."""

    def partial_injection(self, starttls: Command) -> bytes:
        """An injected response cut before its line end, to be glued in front
        of the first reply under TLS (a client that keeps its read buffer
        across the upgrade reads one line made of both)."""
        return self.injection(starttls).split(b"\r\n", 1)[0] + b" "

    def multi_injection(self, starttls: Command) -> bytes:
        """Several injected responses (lines) in one write."""
        return self.injection(starttls) * 2

    def shaped_injection(self, shape: str, starttls: Command) -> Optional[bytes]:
        """The bytes of one more injection shape, None where the dialect has none.

        ``capabilities``: a forged answer to the hello, a capability list that
        offers no way to log in; ``tagged``: a tagged completion alone, for
        the tag the client will most likely use next; ``untagged-before-answer``:
        untagged responses written in plaintext *ahead of* the STARTTLS answer.
        """
        return None

    def unmarked(self, hello: bytes) -> bytes:
        """The hello answer without the mark that STARTTLS is mandatory (XMPP
        ``<required/>``); unchanged where the protocol has none."""
        return hello

    def starttls_bad(self, cmd: Command) -> bytes:
        """STARTTLS answered as a bad command (SMTP 5xx, IMAP ``BAD``)."""
        return self.not_offered(cmd)

    def preauth_greeting(self) -> Optional[bytes]:
        """A greeting that says the session is authenticated already (IMAP
        ``PREAUTH``), so no STARTTLS can follow; None where the protocol has none."""
        return None

    @abc.abstractmethod
    def stored(self, cmd: Command) -> bytes:
        """The answer to a complete message (end of DATA / APPEND)."""

    @abc.abstractmethod
    def simple(self, cmd: Command) -> bytes:
        """The final answer to any other command."""

    @abc.abstractmethod
    def auth_prompts(self, cmd: Command) -> List[bytes]:
        """Continuation prompts an authentication command needs before its answer."""

    @abc.abstractmethod
    def auth_done(self, cmd: Command, ok: bool) -> bytes: ...

    # -- command cutting: the framer cuts lines; these say what a line opens

    def literal_after(self, line: bytes) -> Optional[Tuple[int, bool]]:
        """``(size, synchronizing)`` if ``line`` announces a literal that follows."""
        return None

    def literal_prompt(self) -> bytes:
        """The continuation that invites a synchronizing literal."""
        return b""

    def body_prompt(self, cmd: Command) -> Optional[bytes]:
        """The answer that opens a message body after ``cmd`` (None: no body follows)."""
        return None

    def body_end(self, data: bytes) -> Optional[Tuple[int, int]]:
        """``(body length, bytes used)`` once ``data`` holds a complete body."""
        return None

    def parse_body(self, body: bytes, tls: bool) -> Command:
        """The act a complete message body is."""
        return Command(body, tls, "message")


# ------------------------------------------------------------ the path role


def dot_body_end(data: bytes) -> Optional[Tuple[int, int]]:
    """:meth:`ScriptedServer.body_end` of a body ended by a line with a lone dot
    (SMTP DATA, POP3 XTND XMIT, NNTP POST): the body up to (not including) it."""
    if data.startswith(b".\r\n"):
        return 0, 3
    pos = data.find(b"\r\n.\r\n")
    if pos < 0:
        return None
    return pos + 2, pos + 5


class StopTLSUnsupported(Exception):
    """The pair cannot return to plaintext: scenarios that need it are skipped."""


@dataclass(frozen=True)
class ClientSpec:
    """Where and how the client under test connects (to the proxy)."""

    dialect: str
    host: str
    port: int
    tls_version: str
    tls_context: ssl.SSLContext
    server_hostname: str
    #: Bound of every reply and of the handshake and closure.
    timeout: float


class Hooks(Protocol):
    """Given to every path verb: ``arm()`` arms the scenario's fault, at most once."""

    def arm(self, nth: int = 1) -> None: ...


class PathDriver(abc.ABC):
    """The client under test, driven one verb at a time (see the path catalogue).

    A verb returns when the client did it; it raises whatever the client
    raised when it could not (a refusal, a closed connection, a timeout),
    and :class:`StopTLSUnsupported` from :meth:`stoptls` when the pair has no
    way back to plaintext.  Every wait inside is bounded by the spec's
    ``timeout``.
    """

    @abc.abstractmethod
    async def connect(self, hooks: Hooks) -> None: ...

    @abc.abstractmethod
    async def starttls(self, hooks: Hooks) -> None: ...

    @abc.abstractmethod
    async def command(self, hooks: Hooks) -> None: ...

    @abc.abstractmethod
    async def stoptls(self, hooks: Hooks) -> None: ...

    @abc.abstractmethod
    async def send_unit(self, hooks: Hooks) -> None: ...

    @abc.abstractmethod
    async def fetch_unit(self, hooks: Hooks) -> None: ...

    @abc.abstractmethod
    async def quit(self, hooks: Hooks) -> None: ...

    def engine_events(self) -> Optional[Sequence[Event]]:
        """The client's own TLS-layer events, if it can tell (None: it cannot)."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection (bounded); called once, always."""


#: The path role's message: over two TLS records (16 KiB is the record
#: limit), in short lines.
PATH_MESSAGE = b"Subject: cut by the path harness\r\n\r\n" + (b"x" * 70 + b"\r\n") * 300
PATH_SENDER = "path@harness.invalid"
PATH_RECIPIENT = "postmaster@localhost"


def transport_events(transport: object) -> List[Event]:
    """The engine events a harness transport recorded (empty for any other)."""
    events = getattr(transport, "events", None)
    return list(events) if isinstance(events, list) else []


# ----------------------------------------------------- the reference session


@dataclass(frozen=True)
class ClientOutcome:
    """What the client reported at the end of its session."""

    ok: bool
    detail: str
    #: Exit status of an external client (None for in-process clients).
    exit_status: Optional[int] = None
    stdout: bytes = b""
    stderr: bytes = b""


@dataclass(frozen=True)
class SessionPlan:
    """The reference client's one normal session against the scripted server.

    Connect, hello, STARTTLS (TLS required), hello, login, then -- while the
    server offers it -- ``cycles`` times STOPTLS + STARTTLS + login, store
    ``message``, and say goodbye.
    """

    host: str
    port: int
    tls_context: ssl.SSLContext
    behaviour: str
    timeout: float
    timeouts: Timeouts
    cycles: int
    user: str
    password: str
    sender: str
    recipient: str
    message: bytes


def failed(exc: BaseException) -> ClientOutcome:
    """The outcome of a session that ended with ``exc``."""
    return ClientOutcome(False, f"{type(exc).__name__}: {exc}")
