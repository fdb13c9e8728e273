"""SMTP (RFC 5321, STARTTLS RFC 3207) as the harness speaks it, in every role."""

from __future__ import annotations

import base64
from typing import FrozenSet, List, Optional, Sequence, Set, Tuple

from starttls_harness.dialects.base import CodedFinalLine, Dialect, LinePredicate, Reply, UnitStep
from starttls_harness.dialects.roles import Command, ScriptedServer, dot_body_end
from starttls_harness.tls.framing import Framer, line_framer

__all__ = ["BAIT", "SMTP"]

#: Capability the scripted server's plaintext EHLO advertises and its TLS one
#: never does (a client that still "knows" it under TLS kept its state, R8).
BAIT = "XHARNESS-PLAINTEXT-ONLY"

_KINDS = {
    "EHLO": "hello",
    "HELO": "hello",
    "STARTTLS": "starttls",
    "STOPTLS": "stoptls",
    "AUTH": "auth",
    "MAIL": "mail",
    "RCPT": "rcpt",
    "DATA": "data",
    "BDAT": "bdat",
    "QUIT": "quit",
    "NOOP": "noop",
    "RSET": "noop",
}


def _lines(code: str, lines: Sequence[str]) -> bytes:
    out = [f"{code}-{line}\r\n" for line in lines[:-1]]
    out.append(f"{code} {lines[-1]}\r\n")
    return "".join(out).encode("ascii")


class _FinalReplyLine(CodedFinalLine):
    """The last line of an SMTP reply: a code followed by a space (or the line end)."""

    kind = "smtp-final"


class _ScriptedSmtp(ScriptedServer):
    """The scripted server's SMTP: a sink that offers STARTTLS and AUTH."""

    #: A client that read the injected 554 takes it as the answer to its
    #: first command under TLS and gives up right after it.
    injection_effect = "answer-taken"
    #: Falling back to the old hello after a refusal.
    retreat_verbs = frozenset({"HELO"})

    def parse(self, raw: bytes, tls: bool) -> Command:
        words = raw.strip().split(None, 1)
        verb = words[0].decode("latin-1").upper() if words else ""
        rest = words[1] if len(words) > 1 else b""
        return Command(raw, tls, _KINDS.get(verb, "other"), verb, b"", rest)

    def greeting(self) -> bytes:
        return b"220 fake.invalid ESMTP starttls-harness\r\n"

    def hello(self, cmd: Command, *, tls: bool, starttls: bool, stoptls: bool) -> bytes:
        if cmd.verb == "HELO":
            return b"250 fake.invalid\r\n"
        words = ["fake.invalid", "8BITMIME", "AUTH PLAIN LOGIN"]
        if not tls:
            if starttls:
                words.insert(1, "STARTTLS")
            words.append(BAIT)
        elif stoptls:
            words.append("STOPTLS")
        return _lines("250", words)

    def starttls_ok(self, cmd: Command) -> bytes:
        return b"220 2.0.0 Ready to start TLS\r\n"

    def starttls_refused(self, cmd: Command) -> bytes:
        return b"454 4.7.0 TLS not available due to temporary reason\r\n"

    def not_offered(self, cmd: Command) -> bytes:
        return b"502 5.5.1 Command not offered here\r\n"

    def stoptls_ok(self, cmd: Command) -> bytes:
        return b"220 2.0.0 Ready to end TLS\r\n"

    def goodbye(self, cmd: Command) -> bytes:
        return b"221 2.0.0 Bye\r\n"

    def injection(self, starttls: Command) -> bytes:
        return b"554 5.7.0 injected by starttls-harness before the handshake\r\n"

    def partial_injection(self, starttls: Command) -> bytes:
        # Glued to "250-fake.invalid": one line with the code 554.
        return b"554 5.7.0 injected by starttls-harness, no line end: "

    def multi_injection(self, starttls: Command) -> bytes:
        return (
            b"554-5.7.0 injected by starttls-harness\r\n"
            b"554 5.7.0 a multi-line reply before the handshake\r\n"
            b"421 4.7.0 and a second injected reply\r\n"
        )

    def shaped_injection(self, shape: str, starttls: Command) -> Optional[bytes]:
        if shape == "capabilities":
            # A forged EHLO answer: no AUTH, a marker, and no line a client needs.
            return _lines("250", ["injected.invalid", "8BITMIME", "XHARNESS-INJECTED"])
        return None

    def starttls_bad(self, cmd: Command) -> bytes:
        return b"501 5.5.4 Syntax error (STARTTLS refused)\r\n"

    def stored(self, cmd: Command) -> bytes:
        return b"250 2.0.0 Ok: queued as HARNESS\r\n"

    def simple(self, cmd: Command) -> bytes:
        if cmd.kind == "mail":
            return b"250 2.1.0 Ok\r\n"
        if cmd.kind == "rcpt":
            return b"250 2.1.5 Ok\r\n"
        if cmd.kind == "noop":
            return b"250 2.0.0 Ok\r\n"
        if cmd.kind == "bdat":
            return b"502 5.5.1 CHUNKING not offered\r\n"
        return b"502 5.5.2 Command not recognized\r\n"

    def auth_prompts(self, cmd: Command) -> List[bytes]:
        words = cmd.rest.split()
        mech = words[0].upper() if words else b""
        if mech == b"PLAIN":
            return [] if len(words) > 1 else [b"334 \r\n"]
        if mech == b"LOGIN":
            password = b"334 UGFzc3dvcmQ6\r\n"
            return [password] if len(words) > 1 else [b"334 VXNlcm5hbWU6\r\n", password]
        return []

    def auth_done(self, cmd: Command, ok: bool) -> bytes:
        mech = cmd.rest.split()[:1]
        if not mech or mech[0].upper() not in (b"PLAIN", b"LOGIN"):
            return b"504 5.5.4 Unrecognized authentication type\r\n"
        if not ok:
            return b"501 5.7.0 Authentication cancelled\r\n"
        return b"235 2.7.0 Authentication successful\r\n"

    def body_prompt(self, cmd: Command) -> Optional[bytes]:
        if cmd.kind != "data":
            return None
        return b"354 End data with <CR><LF>.<CR><LF>\r\n"

    def body_end(self, data: bytes) -> Optional[Tuple[int, int]]:
        """The DATA body up to (not including) its final dot line."""
        return dot_body_end(data)

    def parse_body(self, body: bytes, tls: bool) -> Command:
        return Command(body, tls, "message", "DATA")


class _Smtp(Dialect):
    awaits_first_tls_reply = True
    name = "smtp"
    default_port = 25
    url_scheme = "smtp"
    server_module = "starttls_harness.servers.smtp"
    client_module = "starttls_harness.clients.smtp"
    has_return_to_plaintext = True
    has_capability_list_reply = True

    def framer(self) -> Framer:
        return line_framer()

    def scripted_server(self) -> ScriptedServer:
        return _SCRIPTED

    def fake_greeting(self) -> bytes:
        return b"220 attacker.invalid ESMTP injected greeting\r\n"

    def hello(self) -> bytes:
        return b"EHLO harness.invalid\r\n"

    def starttls(self) -> bytes:
        return b"STARTTLS\r\n"

    def stoptls(self) -> bytes:
        return b"STOPTLS\r\n"

    def sentinel(self) -> bytes:
        return b"NOOP\r\n"

    def injected(self) -> bytes:
        # An unknown verb: its 5xx answer cannot be mistaken for NOOP's 250.
        return b"XHARNESS-INJECTED\r\n"

    def quit(self) -> bytes:
        return b"QUIT\r\n"

    def is_injected_reply(self, reply: Reply) -> bool:
        return reply.key.startswith("5")

    def is_sentinel_reply(self, reply: Reply) -> bool:
        return reply.key.startswith("2")

    def is_goodbye(self, reply: Reply) -> bool:
        return reply.key == "421"

    def is_continuation(self, reply: Reply) -> bool:
        return reply.key in ("354", "334")  # DATA's body, an AUTH exchange

    def split_reply(
        self, buf: bytes, expect_tag: Optional[str] = None
    ) -> Tuple[Optional[Reply], bytes]:
        lines: List[bytes] = []
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                return None, buf
            line = buf[pos : nl + 1]
            lines.append(line)
            pos = nl + 1
            if len(line) < 4 or line[3:4] != b"-":
                code = line[:3].decode("latin-1", "replace")
                ok = code[:1] in ("2", "3")
                return Reply(tuple(lines), ok, code), buf[pos:]

    def capabilities(self, reply: Reply) -> FrozenSet[str]:
        words: Set[str] = set()
        for line in reply.lines[1:]:
            text = line[4:].decode("latin-1").strip()
            if text:
                words.add(text.split()[0].upper())
        return frozenset(words)

    def greeting_ok(self, reply: Reply) -> bool:
        return reply.key == "220"

    def final_line_of(self, command: bytes) -> LinePredicate:
        return _FinalReplyLine()

    def login(self, user: str, password: str) -> bytes:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return f"AUTH PLAIN {token}\r\n".encode()

    def state_control(self) -> Optional[bytes]:
        return b"MAIL FROM:<state-control@harness.invalid>\r\n"

    def state_probe(self, after: str) -> bytes:
        return b"MAIL FROM:<state-probe@harness.invalid>\r\n"

    def state_kept(self, after: str, reply: Reply) -> Optional[str]:
        return f"MAIL accepted without a new EHLO after {after}" if reply.ok else None

    def truncated_unit(self, recipient: str) -> Sequence[UnitStep]:
        return (
            UnitStep(b"MAIL FROM:<truncation@harness.invalid>\r\n"),
            UnitStep(f"RCPT TO:<{recipient}>\r\n".encode()),
            UnitStep(b"DATA\r\n"),
            UnitStep(b"Subject: truncated\r\n\r\nthis body never gets its final dot\r\n", "none"),
        )

    # ------------------------------------------- as followed by the proxy

    def proxy_command(self, line: bytes, verb: bytes) -> Optional[str]:
        return "" if line.strip().upper() == verb else None

    def proxy_answer(self, line: bytes, tag: str) -> Optional[bool]:
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b" ", b"\r", b"\n", b""):
            return None
        return line[:3] == b"220"


_SCRIPTED = _ScriptedSmtp()
SMTP = _Smtp()
