"""What a dialect must provide, in every role the harness plays.

A dialect knows the bytes of the few commands a scenario needs (hello,
STARTTLS, STOPTLS, a *sentinel* whose answer proves what the peer did, an
*injected* command whose answer is recognisable) and how to cut the peer's
byte stream into complete replies (the prober's role, on :class:`Dialect`
itself); what a conforming server says (:meth:`Dialect.scripted_server`,
the client role); which reference server and client it comes with (by
module name, loaded by the run layer; the client module also drives the
path role and the client role's reference session); how its plaintext is
cut into units (:meth:`Dialect.framer`); and capability flags.

Scenarios are written once, against this interface, and run for every
registered dialect.  :data:`REQUIRED` lists what a dialect must override;
the registry refuses a dialect that does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, List, Mapping, Optional, Sequence, Tuple

from starttls_harness.dialects.roles import ScriptedServer
from starttls_harness.report.verdicts import Verdict
from starttls_harness.tls.framing import Framer

__all__ = [
    "REQUIRED",
    "REQUIRED_ATTRIBUTES",
    "Dialect",
    "LinePredicate",
    "LoginRefused",
    "Reply",
    "SessionLogin",
    "UnitStep",
]


@dataclass(frozen=True)
class Reply:
    """One complete reply: its lines (with line ends) and whether it says OK."""

    lines: Tuple[bytes, ...]
    ok: bool
    #: SMTP: the status code; IMAP: the tag of the final line (or ``*``).
    key: str

    @property
    def raw(self) -> bytes:
        return b"".join(self.lines)

    @property
    def text(self) -> str:
        return self.raw.decode("latin-1").strip()


@dataclass(frozen=True)
class UnitStep:
    """One write of the prober's storage action (a message, an APPEND).

    ``answer`` says what must come back before the next step: ``ok`` (a
    complete positive reply), ``continue`` (a continuation that invites
    the rest) or ``none`` (nothing is awaited: the unit is cut after it).
    """

    data: bytes
    answer: str = "ok"

    def __post_init__(self) -> None:
        if self.answer not in ("ok", "continue", "none"):
            raise ValueError(f"unit step answer {self.answer!r}: use ok, continue or none")


class LoginRefused(Exception):
    """The target refused the test user's login; ``str(exc)`` says why (never a secret)."""


class SessionLogin:
    """A login carried by the session start after each handshake (PostgreSQL).

    :meth:`opening` is sent first (instead of :meth:`Dialect.after_handshake`);
    :meth:`answer` gets each reply and returns what to send next, ``b""`` when
    nothing (the login is over), or raises :class:`LoginRefused`.
    """

    def opening(self) -> bytes:
        raise NotImplementedError

    def answer(self, reply: Reply) -> bytes:
        raise NotImplementedError


class LinePredicate:
    """A picklable, printable unit predicate (for the engine's hold gate).

    Each dialect subclasses it with its own test of "the final unit of the
    answer"; ``kind`` and ``arg`` only name it in evidence and reprs.
    """

    kind = "unit"

    def __init__(self, arg: str = "") -> None:
        self.arg = arg

    def __call__(self, unit: bytes) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.arg!r})"


#: The client-role verdicts of a reference client whose engine is relaxed for
#: R1 (``accept-injected-response``), beyond the default table: it also takes
#: plaintext that arrives after its ClientHello, and every injected line, not
#: only the first (a partial one is completed by the first TLS bytes).
TAKES_EVERY_INJECTION: Mapping[str, Verdict] = {
    "client.response-injection": Verdict.FAIL,
    "client.response-injection-split": Verdict.FAIL,
    "client.response-injection-partial": Verdict.FAIL,
    "client.response-injection-multi": Verdict.FAIL,
}


class CodedFinalLine(LinePredicate):
    """The last line of a coded reply (SMTP, FTP: three digits and a space, or the line end)."""

    def __call__(self, line: bytes) -> bool:
        return len(line) >= 4 and line[:3].isdigit() and line[3:4] in (b" ", b"\r", b"\n")


class Dialect:
    """Base class; see :data:`~starttls_harness.dialects.smtp.SMTP` and ``IMAP``."""

    name = ""
    default_port = 0
    #: The URL scheme of a target (``smtp://HOST:PORT``).
    url_scheme = ""
    #: Module names of the reference server and client (``start_server``,
    #: ``BEHAVIOURS``; the client module also ``path_driver`` and
    #: ``reference_session``).  Loaded by name by the run layer.
    server_module = ""
    client_module = ""
    #: Capability flags.
    has_return_to_plaintext = False
    #: The server speaks first on connect (LDAP, PostgreSQL: the client does).
    server_greets = True
    #: The return to plaintext is a bare bidirectional closure, no command
    #: (LDAP's removal of the TLS layer): :meth:`stoptls` is empty and a
    #: closure is never "without STOPTLS".
    return_by_closure = False
    #: After each transition a conforming client asks for the capabilities
    #: again (SMTP EHLO, IMAP CAPABILITY); LDAP only asks it to discard what
    #: it learned (RFC 4513 §3.1.5), which a client that binds at once does.
    rereads_capabilities = True
    #: The scripted server can greet "authenticated already" (IMAP PREAUTH).
    has_preauth = False
    #: The upgrade offer can say that it is mandatory (XMPP ``<required/>``): a
    #: client scenario offers it without the mark (``ScriptedServer.unmarked``).
    marks_starttls_required = False
    #: The hello is answered with the capability list (SMTP EHLO): the scripted
    #: server can inject a forged one (``ScriptedServer.shaped_injection``).
    has_capability_list_reply = False
    #: Replies complete commands by tag (IMAP): the scripted server can inject
    #: a tagged completion, and untagged responses ahead of the STARTTLS answer.
    has_tagged_replies = False
    #: After the STARTTLS handshake the server speaks first, unprompted
    #: (ManageSieve re-sends its capabilities, RFC 5804 §2.2): its first TLS
    #: record then is no answer to anything the client sent.
    speaks_first_after_starttls = False
    #: Under TLS the client must wait for the reply to its first command (or
    #: for the server's unprompted first reply) before it sends another (SMTP
    #: EHLO: RFC 2920 forbids pipelining past it; POP3 CAPA; ManageSieve; FTP;
    #: NNTP; PostgreSQL's startup; XMPP's stream header).  A client that sends
    #: more before that reply passed took an injected response as it (R1).
    #: False where the client may pipeline there (IMAP, LDAP).
    awaits_first_tls_reply = False
    #: The server may send the first close_notify of the return to plaintext
    #: (FTP CCC); STOPTLS: only the client starts the closure.
    server_may_close_first = False
    #: Who starts the closure of the return to plaintext: ``client`` (STOPTLS)
    #: or ``either`` (the order is not fixed by the protocol).
    closure_initiator = "client"
    #: The return to plaintext is refused before a login (FTP CCC on real servers).
    stoptls_needs_login = False
    #: The server speaks first in plaintext after the return (a new greeting).
    greets_after_stoptls = True
    #: The storage action needs a login first.
    storage_needs_login = False
    #: Transitions after which :meth:`state_probe` shows kept state only
    #: when a test user logged in before it (else the scenario is skipped).
    state_needs_login: Tuple[str, ...] = ()
    #: The tag an untargeted reply ends with (IMAP: any tagged line, ``*``).
    any_reply_tag: Optional[str] = None
    #: Reference-client behaviour -> {scenario id: verdict} where this
    #: dialect's reference client differs from the client role's matrix.
    reference_client_expected: Mapping[str, Mapping[str, Verdict]] = {}
    #: The same for the reference server (behaviour -> the whole non-pass map).
    reference_server_expected: Mapping[str, Mapping[str, Verdict]] = {}
    #: The same for the path role: (side, behaviour) -> the whole non-pass map.
    reference_path_expected: Mapping[Tuple[str, str], Mapping[str, Verdict]] = {}

    # ------------------------------------------------------- every role

    def framer(self) -> Framer:
        """A fresh framer of this dialect's plaintext units (one per stream)."""
        raise NotImplementedError

    def scripted_server(self) -> ScriptedServer:
        """What a conforming server of this dialect says (the client role)."""
        raise NotImplementedError

    def fake_greeting(self) -> bytes:
        """A plaintext greeting an attacker on the path writes to a client."""
        raise NotImplementedError

    # ------------------------------------------------- the prober's role

    def hello(self) -> bytes:
        raise NotImplementedError

    def hello_for(self, tls: bool) -> bytes:
        """The hello in the current phase; ``b""`` where the protocol has none
        (PostgreSQL before TLS): the prober then exchanges nothing and asks
        :meth:`capabilities` of an empty reply."""
        return self.hello()

    def after_handshake(self) -> bytes:
        """What the client sends first in every TLS session, before anything a
        scenario sends (PostgreSQL's StartupMessage); ``b""``: nothing."""
        return b""

    def session_login(self, user: Optional[str], password: Optional[str]) -> Optional[SessionLogin]:
        """The login the session start carries (None: :meth:`after_handshake` as is)."""
        return None

    def starttls(self) -> bytes:
        raise NotImplementedError

    def stoptls(self) -> bytes:
        raise NotImplementedError

    def stoptls_unoffered(self, reply: Reply) -> Optional[str]:
        """Why a refused return to plaintext means "not offered" (None: it was offered).

        A dialect whose return to plaintext is tried whether or not the
        hello lists it (FTP's CCC predates FEAT) says here which refusals
        only mean that the command is unknown: the scenario is then ``skip``.
        """
        return None

    def sentinel(self) -> bytes:
        """A harmless command whose answer proves the peer is in step."""
        raise NotImplementedError

    def injected(self) -> bytes:
        """A command the harness smuggles in; its answer is recognisable."""
        raise NotImplementedError

    def quit(self) -> bytes:
        raise NotImplementedError

    def is_injected_reply(self, reply: Reply) -> bool:
        raise NotImplementedError

    def is_sentinel_reply(self, reply: Reply) -> bool:
        raise NotImplementedError

    def split_reply(
        self, buf: bytes, expect_tag: Optional[str] = None
    ) -> Tuple[Optional[Reply], bytes]:
        """Cut one complete reply off ``buf``; ``(None, buf)`` if incomplete."""
        raise NotImplementedError

    def capabilities(self, reply: Reply) -> FrozenSet[str]:
        raise NotImplementedError

    def greeting_ok(self, reply: Reply) -> bool:
        raise NotImplementedError

    def is_own_message(self, reply: Reply) -> bool:
        """Whether a reply :meth:`split_reply` cut is a message of this protocol.

        A framer that must cut *something* off any bytes (LDAP's BER reader
        passes junk on as a reply of its own) says here which replies are not
        the protocol's: a target is never named after bytes it only swallowed.
        """
        return True

    def final_line_of(self, command: bytes) -> LinePredicate:
        """Predicate for the final line of the answer to ``command``."""
        raise NotImplementedError

    def tag_of(self, command: bytes) -> Optional[str]:
        """The tag a reply to ``command`` ends with (IMAP), or None."""
        return None

    def is_resync(self, unit: bytes) -> bool:
        """Whether a client may send ``unit`` at once after the handshake, unread.

        A command that only asks the server to say where it stands (sieve-connect
        sends ``NOOP "STARTTLS-RESYNC-CAPA"`` before it reads the capabilities)
        shows nothing about what the client read: the path judge does not count
        it as running ahead of the server's first reply under TLS.
        """
        return False

    def is_goodbye(self, reply: Reply) -> bool:
        """Whether ``reply`` announces that the server is closing (SMTP 421, IMAP BYE).

        A goodbye is not an answer to the command before it: the evidence
        and the verdict call it what it is.
        """
        return False

    def answers(self, command: bytes, reply: Reply) -> bool:
        """Whether ``reply`` is the answer to ``command`` (not an unsolicited line)."""
        return True

    def is_continuation(self, reply: Reply) -> bool:
        """Whether ``reply`` invites the rest of a command (a literal, a body)."""
        return False

    def login(self, user: str, password: str) -> bytes:
        """The command that logs the test user in."""
        raise NotImplementedError

    def login_exchanges(self, user: str, password: str) -> Sequence[bytes]:
        """The login as the exchanges it takes, each sent once the one before is answered.

        One command for most protocols; XMPP's SASL success calls for a stream
        restart, which a server may refuse to read before it said success.
        """
        return (self.login(user, password),)

    def state_control(self) -> Optional[bytes]:
        """A command a fresh session must refuse (None: no control needed).

        A server that accepts it cannot show whether it resets its state at
        the upgrade, so the state scenarios cannot be decided.
        """
        return None

    def state_probe(self, after: str) -> bytes:
        """The command that shows whether state survived ``after`` (R8)."""
        raise NotImplementedError

    def state_kept(self, after: str, reply: Reply) -> Optional[str]:
        """Why ``reply`` to :meth:`state_probe` shows kept state (None: reset)."""
        raise NotImplementedError

    def truncated_unit(self, recipient: str) -> Sequence[UnitStep]:
        """The storage action whose last write is cut by a FIN (R6)."""
        raise NotImplementedError

    # ------------------------------------------- as followed by the proxy

    def proxy_command(self, line: bytes, verb: bytes) -> Optional[str]:
        """The tag if the client's ``line`` is the ``verb`` command, else None.

        ``verb`` is ``b"STARTTLS"`` or ``b"STOPTLS"``; an untagged dialect
        answers ``""``.  The on-path proxy reads only this and
        :meth:`proxy_answer` of a protocol, to find the upgrade and its undoing.
        """
        raise NotImplementedError

    def proxy_answer(self, line: bytes, tag: str) -> Optional[bool]:
        """None if the server's ``line`` is not the final answer to the command
        tagged ``tag``, else whether it accepts it."""
        raise NotImplementedError


#: Methods every dialect overrides (the registry checks it).
REQUIRED: Tuple[str, ...] = (
    "framer",
    "scripted_server",
    "fake_greeting",
    "hello",
    "starttls",
    "stoptls",
    "sentinel",
    "injected",
    "quit",
    "is_injected_reply",
    "is_sentinel_reply",
    "split_reply",
    "capabilities",
    "greeting_ok",
    "final_line_of",
    "login",
    "state_probe",
    "state_kept",
    "truncated_unit",
    "proxy_command",
    "proxy_answer",
)

#: Attributes every dialect sets to something non-empty.
REQUIRED_ATTRIBUTES: Tuple[str, ...] = (
    "name",
    "default_port",
    "url_scheme",
    "server_module",
    "client_module",
)


def missing(dialect: Dialect) -> List[str]:
    """What ``dialect`` lacks of :data:`REQUIRED` and :data:`REQUIRED_ATTRIBUTES`."""
    gaps = [a for a in REQUIRED_ATTRIBUTES if not getattr(dialect, a, None)]
    gaps += [m for m in REQUIRED if getattr(type(dialect), m, None) is getattr(Dialect, m)]
    return gaps
