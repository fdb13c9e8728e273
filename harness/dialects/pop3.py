"""POP3 (RFC 1939, CAPA RFC 2449, STLS RFC 2595) as the harness speaks it, in every role.

POP3 replies are one status line (``+OK`` / ``-ERR``) or, for the commands in
:data:`MULTI_LINE`, a status line followed by lines closed by a lone ``.``.
The prober tells :meth:`Pop3.split_reply` which kind it waits for through
the tag hook (:meth:`Pop3.tag_of` gives :data:`MULTI` for those commands).

POP3 stores nothing: the one way a client hands a message to a POP3 server
is the old ``XTND XMIT`` extension (Qpopper), a dot-terminated body after a
``+OK`` invitation.  The reference peers use it as the storage action (R6);
a real server without it has no storage probe.  POP3 has no standard
return to plaintext: ``STOPTLS`` is the harness's test extension, listed in
the CAPA answer only inside TLS.
"""

from __future__ import annotations

import base64
from typing import FrozenSet, List, Mapping, Optional, Sequence, Tuple

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

__all__ = ["BAIT", "MULTI", "MULTI_LINE", "POP3", "dot_stuff"]

#: Capability the scripted server's plaintext CAPA lists and its TLS one never does (R8).
BAIT = "X-HARNESS-PLAINTEXT-ONLY"
#: The tag :meth:`Pop3.tag_of` gives a command answered by a multi-line reply.
MULTI = "multi-line"
#: Commands whose positive answer is multi-line (LIST/UIDL only without an argument).
MULTI_LINE = frozenset({"CAPA", "RETR", "TOP"})

_KINDS = {
    "CAPA": "hello",
    "STLS": "starttls",
    "STOPTLS": "stoptls",
    "USER": "auth",
    "PASS": "auth",
    "AUTH": "auth",
    "APOP": "auth",
    "XTND": "data",
    "QUIT": "quit",
    "NOOP": "noop",
    "STAT": "access",
    "LIST": "access",
    "RETR": "access",
    "DELE": "access",
    "UIDL": "access",
    "TOP": "access",
    "RSET": "access",
}

#: The body the storage probe's XTND XMIT never finishes (no final dot).
_TRUNCATED_BODY = b"Subject: truncated\r\n\r\nthis body never gets its final dot\r\n"


def dot_stuff(body: bytes) -> bytes:
    """``body`` as the lines of a multi-line block, with its final ``.`` line."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    lines = body.split(b"\r\n")[:-1] if body else []
    out = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in out) + b".\r\n"


def is_multi_line(command: bytes) -> bool:
    """Whether the positive answer to ``command`` is a multi-line block."""
    words = command.split()
    if not words:
        return False
    verb = words[0].decode("latin-1").upper()
    return verb in MULTI_LINE or (verb in ("LIST", "UIDL") and len(words) == 1)


class _StatusLine(LinePredicate):
    """The last line of a POP3 answer: the status line, or ``.`` for a multi-line one."""

    kind = "pop3-final"

    def __call__(self, line: bytes) -> bool:
        if self.arg == MULTI:
            return line.rstrip(b"\r\n") == b"." or line.startswith(b"-ERR")
        return True


class _ScriptedPop3(ScriptedServer):
    """The scripted server's POP3: CAPA, STLS, USER/PASS, AUTH PLAIN, XTND XMIT."""

    injection_effect = "answer-taken"

    def parse(self, raw: bytes, tls: bool) -> Command:
        words = raw.strip().split(None, 1)
        verb = words[0].decode("latin-1").upper() if words else ""
        rest = words[1] if len(words) > 1 else b""
        return Command(raw, tls, _KINDS.get(verb, "other"), verb, b"", rest)

    def greeting(self) -> bytes:
        return b"+OK fake.invalid POP3 starttls-harness ready\r\n"

    def hello(self, cmd: Command, *, tls: bool, starttls: bool, stoptls: bool) -> bytes:
        caps = ["USER", "SASL PLAIN", "UIDL", "XTND"]
        if not tls:
            if starttls:
                caps.append("STLS")
            caps.append(BAIT)
        elif stoptls:
            caps.append("STOPTLS")
        return b"+OK Capability list follows\r\n" + dot_stuff("\r\n".join(caps).encode())

    def starttls_ok(self, cmd: Command) -> bytes:
        return b"+OK Begin TLS negotiation\r\n"

    def starttls_refused(self, cmd: Command) -> bytes:
        return b"-ERR [SYS/TEMP] TLS not available\r\n"

    def not_offered(self, cmd: Command) -> bytes:
        return b"-ERR command not offered here\r\n"

    def stoptls_ok(self, cmd: Command) -> bytes:
        return b"+OK Begin TLS closure\r\n"

    def goodbye(self, cmd: Command) -> bytes:
        return b"+OK bye\r\n"

    def injection(self, starttls: Command) -> bytes:
        return b"-ERR injected by starttls-harness before the handshake\r\n"

    def stored(self, cmd: Command) -> bytes:
        return b"+OK message sent\r\n"

    def simple(self, cmd: Command) -> bytes:
        if cmd.kind == "noop":
            return b"+OK\r\n"
        if cmd.verb == "STAT":
            return b"+OK 0 0\r\n"
        if cmd.verb in ("LIST", "UIDL") and not cmd.rest:
            return b"+OK 0 messages\r\n.\r\n"
        if cmd.verb == "RSET":
            return b"+OK\r\n"
        return b"-ERR unknown command\r\n"

    def auth_prompts(self, cmd: Command) -> List[bytes]:
        words = cmd.rest.split()
        if cmd.verb == "AUTH" and words[:1] and words[0].upper() == b"PLAIN" and len(words) == 1:
            return [b"+ \r\n"]
        return []

    def auth_done(self, cmd: Command, ok: bool) -> bytes:
        if cmd.verb == "AUTH":
            words = cmd.rest.split()
            if not words or words[0].upper() != b"PLAIN":
                return b"-ERR unsupported mechanism\r\n"
            if not ok:
                return b"-ERR authentication cancelled\r\n"
            return b"+OK logged in\r\n"
        if cmd.verb == "USER":
            return b"+OK send PASS\r\n"
        return b"+OK logged in\r\n"

    def body_prompt(self, cmd: Command) -> Optional[bytes]:
        if cmd.kind != "data" or cmd.rest.strip().upper() != b"XMIT":
            return None
        return b"+OK Start sending message\r\n"

    def body_end(self, data: bytes) -> Optional[Tuple[int, int]]:
        return dot_body_end(data)

    def parse_body(self, body: bytes, tls: bool) -> Command:
        return Command(body, tls, "message", "XTND")


class _Pop3(Dialect):
    awaits_first_tls_reply = True
    name = "pop3"
    default_port = 110
    url_scheme = "pop3"
    server_module = "starttls_harness.servers.pop3"
    client_module = "starttls_harness.clients.pop3"
    has_return_to_plaintext = True
    storage_needs_login = True
    state_needs_login = ("stoptls",)  # STAT after STOPTLS: is the login gone?
    #: As the reference IMAP client: its relaxed engine also takes plaintext
    #: that arrives after its ClientHello (only the hold gate is at stake for
    #: SMTP's), so the split injection is acted on too.
    reference_client_expected: Mapping[str, Mapping[str, Verdict]] = {
        "accept-injected-response": TAKES_EVERY_INJECTION,
    }

    def framer(self) -> Framer:
        return line_framer()

    def scripted_server(self) -> ScriptedServer:
        return _SCRIPTED

    def fake_greeting(self) -> bytes:
        return b"+OK attacker.invalid injected greeting\r\n"

    def hello(self) -> bytes:
        return b"CAPA\r\n"

    def starttls(self) -> bytes:
        return b"STLS\r\n"

    def stoptls(self) -> bytes:
        return b"STOPTLS\r\n"

    def sentinel(self) -> bytes:
        # CAPA is valid in every state (NOOP only after login, RFC 1939).
        return b"CAPA\r\n"

    def injected(self) -> bytes:
        return b"XHARNESS-INJECTED\r\n"

    def quit(self) -> bytes:
        return b"QUIT\r\n"

    def is_injected_reply(self, reply: Reply) -> bool:
        return reply.key == "-ERR"

    def is_sentinel_reply(self, reply: Reply) -> bool:
        return reply.ok and len(reply.lines) > 1

    def split_reply(
        self, buf: bytes, expect_tag: Optional[str] = None
    ) -> Tuple[Optional[Reply], bytes]:
        nl = buf.find(b"\n")
        if nl < 0:
            return None, buf
        first = buf[: nl + 1]
        key = first.split(b" ", 1)[0].strip().decode("latin-1", "replace")
        ok = key == "+OK"
        if expect_tag != MULTI or not ok:
            return Reply((first,), ok or key == "+", key), buf[nl + 1 :]
        lines = [first]
        pos = nl + 1
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                return None, buf
            line = buf[pos : nl + 1]
            lines.append(line)
            pos = nl + 1
            if line.rstrip(b"\r\n") == b".":
                return Reply(tuple(lines), True, key), buf[pos:]

    def capabilities(self, reply: Reply) -> FrozenSet[str]:
        """The CAPA words, with ``STLS`` also under the harness's name ``STARTTLS``."""
        words = set()
        for line in reply.lines[1:]:
            text = line.decode("latin-1").strip()
            if text and text != ".":
                words.add(text.split()[0].upper())
        if "STLS" in words:
            words.add("STARTTLS")  # the harness's name of the upgrade capability
        return frozenset(words)

    def greeting_ok(self, reply: Reply) -> bool:
        return reply.key == "+OK"

    def final_line_of(self, command: bytes) -> LinePredicate:
        return _StatusLine(MULTI if is_multi_line(command) else "")

    def tag_of(self, command: bytes) -> Optional[str]:
        return MULTI if is_multi_line(command) else None

    def is_continuation(self, reply: Reply) -> bool:
        # SASL's "+ " and XTND XMIT's "+OK" invitation.
        return reply.key in ("+", "+OK")

    def login(self, user: str, password: str) -> bytes:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return f"AUTH PLAIN {token}\r\n".encode()

    def state_probe(self, after: str) -> bytes:
        # After STLS the capabilities must be asked anew; after STOPTLS the
        # login must be gone (STAT is a TRANSACTION-state command).
        return b"CAPA\r\n" if after == "starttls" else b"STAT\r\n"

    def state_kept(self, after: str, reply: Reply) -> Optional[str]:
        if after == "starttls":
            stale = self.capabilities(reply) & {"STLS", BAIT}
            return f"still advertises {sorted(stale)} inside TLS" if stale else None
        return "STAT accepted without a new login after STOPTLS" if reply.ok else None

    def truncated_unit(self, recipient: str) -> Sequence[UnitStep]:
        return (UnitStep(b"XTND XMIT\r\n", "continue"), UnitStep(_TRUNCATED_BODY, "none"))

    # -- as followed by the on-path proxy

    def proxy_command(self, line: bytes, verb: bytes) -> Optional[str]:
        wanted = b"STLS" if verb == b"STARTTLS" else verb  # RFC 2595 spells it STLS
        return "" if line.strip().upper() == wanted else None

    def proxy_answer(self, line: bytes, tag: str) -> Optional[bool]:
        if line.startswith(b"+OK"):
            return True
        return False if line.startswith(b"-ERR") else None


_SCRIPTED = _ScriptedPop3()
POP3 = _Pop3()
