"""NNTP (RFC 3977; STARTTLS RFC 4642) as the harness speaks it, in every role.

Replies are one status line ``ddd text``; a few codes announce a multi-line
block that follows, ended by a line holding a single ``.`` (:data:`MULTILINE`).
The capabilities are the block after ``101`` (``CAPABILITIES``), one per
line with the keyword first; the STOPTLS test extension is the line
``STOPTLS``, advertised only inside TLS.  ``STARTTLS`` -> ``382`` (``580``
when TLS cannot be started, ``502`` when not offered); after the upgrade the
capabilities are re-read (RFC 4642 §2.2.2: ``STARTTLS`` is not listed again)
and the server forgets the current group and the login.  There is no
standard return to plaintext: the test extension answers ``STOPTLS`` with
``382`` too.

The storage action is a reader ``POST`` (``340``, the article, ``.``;
``240``): no ``IHAVE`` (a transit feed needs peering set up on the server).
The article goes to the newsgroup given as the recipient, or
:data:`NEWSGROUP` when the recipient is a mail address.  The login is
``AUTHINFO SASL PLAIN`` with an initial response (RFC 4643 §2.4) in one
command; the reference peers also speak ``AUTHINFO USER``/``PASS``.

State (R8): after STARTTLS the probe re-reads ``CAPABILITIES``; after STOPTLS
it asks for ``GROUP`` :data:`NEWSGROUP`, which the reference server grants only
to a logged-in user (``480`` otherwise): a server that answers ``211`` kept
the login.  No control is needed before TLS (a server that lets anyone read
groups and offers STOPTLS would show a kept login falsely; only the
reference peers offer STOPTLS).
"""

from __future__ import annotations

import base64
import time
from typing import FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple

from starttls_harness.dialects.base import (
    TAKES_EVERY_INJECTION,
    Dialect,
    LinePredicate,
    Reply,
    UnitStep,
)
from starttls_harness.dialects.roles import Command, ScriptedServer, dot_body_end
from starttls_harness.report.verdicts import Verdict
from starttls_harness.tls.framing import Framer, line_framer

__all__ = ["BAIT", "MULTILINE", "NEWSGROUP", "NNTP", "article", "is_multiline"]

#: Capability the scripted server's plaintext list advertises and its TLS one
#: never does (a client that still "knows" it under TLS kept its state, R8).
BAIT = "XHARNESS-PLAINTEXT-ONLY"
#: The newsgroup the harness posts to and selects.
NEWSGROUP = "harness.test"
#: Status codes followed by a multi-line data block (RFC 3977 §3.2, Appendix C).
MULTILINE = frozenset({"100", "101", "215", "220", "221", "222", "224", "225", "230", "231", "282"})

_KINDS = {
    "CAPABILITIES": "hello",
    "STARTTLS": "starttls",
    "STOPTLS": "stoptls",
    "AUTHINFO": "auth",
    "POST": "data",
    "QUIT": "quit",
    "DATE": "noop",
    "MODE": "noop",
    "HELP": "noop",
}
#: Reading commands (the reference server wants a login for them).
_ACCESS = frozenset("GROUP LISTGROUP ARTICLE HEAD BODY STAT NEXT LAST OVER XOVER".split())


def is_multiline(status: bytes) -> bool:
    """Whether the status line ``status`` opens a multi-line block."""
    return status[:3].decode("latin-1") in MULTILINE and status[3:4] in (b" ", b"\r", b"\n")


def article(newsgroup: str, subject: str, body: bytes, message_id: str = "") -> bytes:
    """A minimal article (RFC 5536 headers) with CRLF line ends, not dot-stuffed."""
    head = [
        "From: harness <harness@harness.invalid>",
        f"Newsgroups: {newsgroup}",
        f"Subject: {subject}",
    ]
    if message_id:
        head.append(f"Message-ID: {message_id}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class _StatusLine(LinePredicate):
    """The final line of a single-line NNTP answer (or a block's ``.`` line)."""

    kind = "nntp-final"

    def __call__(self, line: bytes) -> bool:
        if line.rstrip(b"\r\n") == b".":
            return True
        return len(line) >= 4 and line[:3].isdigit() and not is_multiline(line)


class _ScriptedNntp(ScriptedServer):
    """The scripted server's NNTP: a reader server that takes POSTs and logins."""

    #: A client that read the injected 502 takes it as the answer to its
    #: first command under TLS (CAPABILITIES) and gives up.
    injection_effect = "answer-taken"

    def parse(self, raw: bytes, tls: bool) -> Command:
        words = raw.strip().split(None, 1)
        verb = words[0].decode("latin-1").upper() if words else ""
        rest = words[1] if len(words) > 1 else b""
        kind = _KINDS.get(verb, "access" if verb in _ACCESS else "other")
        return Command(raw, tls, kind, verb, b"", rest)

    def greeting(self) -> bytes:
        return b"200 fake.invalid NNTP starttls-harness ready (posting ok)\r\n"

    def hello(self, cmd: Command, *, tls: bool, starttls: bool, stoptls: bool) -> bytes:
        caps = ["VERSION 2", "READER", "POST", "LIST ACTIVE NEWSGROUPS", "AUTHINFO SASL"]
        caps.append("SASL PLAIN")
        if not tls:
            if starttls:
                caps.append("STARTTLS")
            caps.append(BAIT)
        elif stoptls:
            caps.append("STOPTLS")
        return ("101 Capability list:\r\n" + "".join(c + "\r\n" for c in caps) + ".\r\n").encode()

    def starttls_ok(self, cmd: Command) -> bytes:
        return b"382 Continue with TLS negotiation\r\n"

    def starttls_refused(self, cmd: Command) -> bytes:
        return b"580 Can not initiate TLS negotiation\r\n"

    def not_offered(self, cmd: Command) -> bytes:
        return b"502 Command unavailable\r\n"

    def stoptls_ok(self, cmd: Command) -> bytes:
        return b"382 Continue with TLS closure\r\n"

    def goodbye(self, cmd: Command) -> bytes:
        return b"205 Connection closing\r\n"

    def injection(self, starttls: Command) -> bytes:
        return b"502 injected by starttls-harness before the handshake\r\n"

    def stored(self, cmd: Command) -> bytes:
        return b"240 Article received OK\r\n"

    def simple(self, cmd: Command) -> bytes:
        if cmd.verb == "DATE":
            return time.strftime("111 %Y%m%d%H%M%S\r\n", time.gmtime()).encode()
        if cmd.verb == "MODE":
            return b"200 Posting allowed\r\n"
        if cmd.verb == "HELP":
            return b"100 Help text follows\r\n.\r\n"
        if cmd.verb == "GROUP":
            return f"211 0 1 0 {NEWSGROUP}\r\n".encode()
        if cmd.kind == "access":
            return b"412 No newsgroup selected\r\n"
        return b"500 Unknown command\r\n"

    def auth_prompts(self, cmd: Command) -> List[bytes]:
        words = cmd.rest.split()
        sub = words[0].upper() if words else b""
        if sub == b"USER":
            return [b"381 Password required\r\n"]
        if sub == b"SASL" and len(words) == 2:
            return [b"383 \r\n"]
        return []

    def auth_done(self, cmd: Command, ok: bool) -> bytes:
        words = cmd.rest.split()
        sub = words[0].upper() if words else b""
        if sub == b"SASL" and (len(words) < 2 or words[1].upper() != b"PLAIN"):
            return b"503 Mechanism not recognized\r\n"
        if sub not in (b"USER", b"SASL"):
            return b"501 Syntax error\r\n"
        if not ok:
            return b"481 Authentication failed\r\n"
        return b"281 Authentication accepted\r\n"

    def body_prompt(self, cmd: Command) -> Optional[bytes]:
        return b"340 Send article to be posted\r\n" if cmd.kind == "data" else None

    def body_end(self, data: bytes) -> Optional[Tuple[int, int]]:
        """The article up to (not including) its final dot line."""
        return dot_body_end(data)

    def parse_body(self, body: bytes, tls: bool) -> Command:
        return Command(body, tls, "message", "POST")


class _Nntp(Dialect):
    awaits_first_tls_reply = True
    name = "nntp"
    default_port = 119
    url_scheme = "nntp"
    server_module = "starttls_harness.servers.nntp"
    client_module = "starttls_harness.clients.nntp"
    has_return_to_plaintext = True
    state_needs_login = ("stoptls",)  # GROUP after STOPTLS: is the login gone?
    #: The reference NNTP client breaks R1 as the IMAP one does (its engine
    #: relaxed), so it also takes plaintext that arrives after its ClientHello.
    reference_client_expected: Mapping[str, Mapping[str, Verdict]] = {
        "accept-injected-response": TAKES_EVERY_INJECTION,
    }

    def framer(self) -> Framer:
        return line_framer()

    def scripted_server(self) -> ScriptedServer:
        return _SCRIPTED

    def fake_greeting(self) -> bytes:
        return b"200 attacker.invalid NNTP injected greeting\r\n"

    def hello(self) -> bytes:
        return b"CAPABILITIES\r\n"

    def starttls(self) -> bytes:
        return b"STARTTLS\r\n"

    def stoptls(self) -> bytes:
        return b"STOPTLS\r\n"

    def sentinel(self) -> bytes:
        return b"DATE\r\n"

    def injected(self) -> bytes:
        # An unknown command: its 5xx answer cannot be mistaken for DATE's 111.
        return b"XHARNESS-INJECTED\r\n"

    def quit(self) -> bytes:
        return b"QUIT\r\n"

    def is_injected_reply(self, reply: Reply) -> bool:
        return reply.key.startswith("5")

    def is_sentinel_reply(self, reply: Reply) -> bool:
        return reply.key == "111"

    def is_goodbye(self, reply: Reply) -> bool:
        # RFC 3977 §3.2.1: 400 is the server ending the session.
        return reply.key == "400"

    def split_reply(
        self, buf: bytes, expect_tag: Optional[str] = None
    ) -> Tuple[Optional[Reply], bytes]:
        nl = buf.find(b"\n")
        if nl < 0:
            return None, buf
        status = buf[: nl + 1]
        lines: List[bytes] = [status]
        pos = nl + 1
        if is_multiline(status):
            while True:
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    return None, buf
                line = buf[pos : nl + 1]
                lines.append(line)
                pos = nl + 1
                if line.rstrip(b"\r\n") == b".":
                    break
        code = status[:3].decode("latin-1", "replace")
        return Reply(tuple(lines), code[:1] in ("1", "2", "3"), code), buf[pos:]

    def capabilities(self, reply: Reply) -> FrozenSet[str]:
        if reply.key != "101":
            return frozenset()
        words: Set[str] = set()
        for line in reply.lines[1:-1]:
            text = line.decode("latin-1").strip()
            if text:
                words.add(text.split()[0].upper())
        return frozenset(words)

    def greeting_ok(self, reply: Reply) -> bool:
        return reply.key in ("200", "201")

    def final_line_of(self, command: bytes) -> LinePredicate:
        return _StatusLine()

    def login(self, user: str, password: str) -> bytes:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return f"AUTHINFO SASL PLAIN {token}\r\n".encode()

    def state_probe(self, after: str) -> bytes:
        if after == "starttls":
            return b"CAPABILITIES\r\n"
        return f"GROUP {NEWSGROUP}\r\n".encode()

    def state_kept(self, after: str, reply: Reply) -> Optional[str]:
        if after == "starttls":
            stale = self.capabilities(reply) & {"STARTTLS", BAIT}
            return f"still advertises {sorted(stale)} inside TLS" if stale else None
        if reply.key == "211":
            return "GROUP answered without a new login after STOPTLS"
        return None

    def truncated_unit(self, recipient: str) -> Sequence[UnitStep]:
        group = recipient if recipient and "@" not in recipient else NEWSGROUP
        body = b"this article never gets its final dot\r\n"
        return (
            UnitStep(b"POST\r\n"),
            UnitStep(article(group, "truncated", body), "none"),
        )

    # -- as followed by the on-path proxy

    def proxy_command(self, line: bytes, verb: bytes) -> Optional[str]:
        return "" if line.strip().upper() == verb else None

    def proxy_answer(self, line: bytes, tag: str) -> Optional[bool]:
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b" ", b"\r", b"\n", b""):
            return None
        return line[:3] == b"382"  # RFC 4642: go ahead (STARTTLS, and STOPTLS here)


_SCRIPTED = _ScriptedNntp()
NNTP = _Nntp()
