"""IMAP (RFC 9051, STARTTLS §6.2.1) as the harness speaks it, in every role."""

from __future__ import annotations

import re
from typing import FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple

from starttls_harness.dialects.base import (
    TAKES_EVERY_INJECTION,
    Dialect,
    LinePredicate,
    Reply,
    UnitStep,
)
from starttls_harness.dialects.roles import Command, ScriptedServer
from starttls_harness.report.verdicts import Verdict
from starttls_harness.tls.framing import Framer, line_framer

__all__ = ["BAIT", "IMAP", "next_tag"]

#: Capability the scripted server's plaintext CAPABILITY advertises and its
#: TLS one never does (a client that still "knows" it kept its state, R8).
BAIT = "X-HARNESS-PLAINTEXT-ONLY"

_KINDS = {
    "CAPABILITY": "hello",
    "STARTTLS": "starttls",
    "STOPTLS": "stoptls",
    "LOGIN": "auth",
    "AUTHENTICATE": "auth",
    "APPEND": "append",
    "SELECT": "select",
    "EXAMINE": "select",
    "LOGOUT": "quit",
    "NOOP": "noop",
    "ID": "noop",
    "ENABLE": "noop",
}
#: Commands of the authenticated/selected states (mail access).
_ACCESS = frozenset(
    "LIST LSUB STATUS CREATE DELETE RENAME SUBSCRIBE UNSUBSCRIBE FETCH STORE SEARCH COPY MOVE"
    " UID EXPUNGE CLOSE UNSELECT CHECK IDLE NAMESPACE GETQUOTAROOT".split()
)

_LITERAL_AT_END = re.compile(rb"\{(\d{1,10})(\+?)\}\r?\n\Z")
_TAG_NUMBER = re.compile(rb"\A(.*?)(\d+)\Z")

#: The body the storage probe's APPEND announces twice the size of.
_TRUNCATED_BODY = b"Subject: truncated\r\n\r\nthis literal is cut short\r\n"


def next_tag(tag: bytes) -> Optional[bytes]:
    """The tag a client numbering its commands will use next (``a2`` -> ``a3``)."""
    found = _TAG_NUMBER.match(tag)
    if found is None:
        return None
    digits = found.group(2)
    return found.group(1) + str(int(digits) + 1).zfill(len(digits)).encode()


class _TaggedLine(LinePredicate):
    """The tagged line that completes the answer to the command tagged ``arg``."""

    kind = "imap-tagged"

    def __call__(self, line: bytes) -> bool:
        return line.split(b" ", 1)[0].decode("latin-1") == self.arg


class _ScriptedImap(ScriptedServer):
    """The scripted server's IMAP: one INBOX, STARTTLS, LOGIN and AUTH=PLAIN."""

    #: The injected capabilities say LOGINDISABLED; a client that believed
    #: them never sends LOGIN.
    injection_effect = "capabilities-believed"

    def parse(self, raw: bytes, tls: bool) -> Command:
        words = raw.split(None, 2)
        tag = words[0] if words else b""
        verb = words[1].decode("latin-1").upper() if len(words) > 1 else ""
        rest = words[2].strip() if len(words) > 2 else b""
        kind = _KINDS.get(verb, "access" if verb in _ACCESS else "other")
        return Command(raw, tls, kind, verb, tag, rest)

    def greeting(self) -> bytes:
        return b"* OK fake.invalid IMAP4rev1 starttls-harness ready\r\n"

    def _tagged(self, cmd: Command, text: str) -> bytes:
        return cmd.tag + b" " + text.encode("ascii") + b"\r\n"

    def hello(self, cmd: Command, *, tls: bool, starttls: bool, stoptls: bool) -> bytes:
        caps = ["IMAP4rev1", "AUTH=PLAIN"]
        if not tls:
            if starttls:
                caps.append("STARTTLS")
            caps.append(BAIT)
        elif stoptls:
            caps.append("STOPTLS")
        line = ("* CAPABILITY " + " ".join(caps) + "\r\n").encode("ascii")
        return line + self._tagged(cmd, "OK CAPABILITY completed")

    def starttls_ok(self, cmd: Command) -> bytes:
        return self._tagged(cmd, "OK Begin TLS negotiation now")

    def starttls_refused(self, cmd: Command) -> bytes:
        return self._tagged(cmd, "NO [UNAVAILABLE] TLS not available")

    def not_offered(self, cmd: Command) -> bytes:
        return self._tagged(cmd, "BAD command not offered here")

    def stoptls_ok(self, cmd: Command) -> bytes:
        return self._tagged(cmd, "OK Begin TLS closure")

    def goodbye(self, cmd: Command) -> bytes:
        return b"* BYE fake.invalid logging out\r\n" + self._tagged(cmd, "OK LOGOUT completed")

    def injection(self, starttls: Command) -> bytes:
        # Untagged capabilities that forbid LOGIN, completed with the tag the
        # client will most likely give its next command (CAPABILITY).
        out = b"* CAPABILITY IMAP4rev1 LOGINDISABLED\r\n"
        tag = next_tag(starttls.tag)
        if tag is not None:
            out += tag + b" OK CAPABILITY completed\r\n"
        return out

    def partial_injection(self, starttls: Command) -> bytes:
        # Glued to "* CAPABILITY IMAP4rev1 AUTH=PLAIN": LOGINDISABLED joins the list.
        return b"* CAPABILITY IMAP4rev1 LOGINDISABLED "

    def multi_injection(self, starttls: Command) -> bytes:
        out = (
            b"* OK [ALERT] injected by starttls-harness before the handshake\r\n"
            b"* CAPABILITY IMAP4rev1 LOGINDISABLED\r\n"
            b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] still injected\r\n"
        )
        tag = next_tag(starttls.tag)
        if tag is not None:
            out += tag + b" OK CAPABILITY completed\r\n"
        return out

    def shaped_injection(self, shape: str, starttls: Command) -> Optional[bytes]:
        if shape == "tagged":
            # The completion alone: a client that reads it has its CAPABILITY
            # answered with no capability list (and the real answer comes later,
            # under a tag it has finished with).
            tag = next_tag(starttls.tag)
            return None if tag is None else tag + b" OK CAPABILITY completed\r\n"
        if shape == "untagged-before-answer":
            # Legal in plaintext, but knowledge a client must drop at the upgrade (R8).
            return (
                b"* CAPABILITY IMAP4rev1 LOGINDISABLED\r\n"
                b"* OK [ALERT] injected by starttls-harness before the STARTTLS answer\r\n"
            )
        return None

    def starttls_bad(self, cmd: Command) -> bytes:
        return self._tagged(cmd, "BAD STARTTLS refused")

    def preauth_greeting(self) -> Optional[bytes]:
        return b"* PREAUTH fake.invalid IMAP4rev1 starttls-harness: logged in already\r\n"

    def stored(self, cmd: Command) -> bytes:
        return self._tagged(cmd, "OK [APPENDUID 1 1] APPEND completed")

    def simple(self, cmd: Command) -> bytes:
        if cmd.kind == "select":
            return (
                b"* 0 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1] UIDs valid\r\n"
                b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
                + self._tagged(cmd, f"OK [READ-WRITE] {cmd.verb} completed")
            )
        if cmd.kind in ("noop", "access", "auth"):
            return self._tagged(cmd, f"OK {cmd.verb} completed")
        return self._tagged(cmd, "BAD unknown command")

    def auth_prompts(self, cmd: Command) -> List[bytes]:
        if cmd.verb != "AUTHENTICATE":
            return []
        words = cmd.rest.split()
        if words[:1] and words[0].upper() == b"PLAIN" and len(words) == 1:
            return [b"+ \r\n"]
        return []

    def auth_done(self, cmd: Command, ok: bool) -> bytes:
        if cmd.verb == "AUTHENTICATE":
            words = cmd.rest.split()
            if not words or words[0].upper() != b"PLAIN":
                return self._tagged(cmd, "NO unsupported authentication mechanism")
            if not ok:
                return self._tagged(cmd, "BAD authentication cancelled")
        return self._tagged(cmd, f"OK {cmd.verb} completed")

    def literal_after(self, line: bytes) -> Optional[Tuple[int, bool]]:
        found = _LITERAL_AT_END.search(line)
        if found is None:
            return None
        return int(found.group(1)), not found.group(2)

    def literal_prompt(self) -> bytes:
        return b"+ Ready for literal data\r\n"


class _Imap(Dialect):
    name = "imap"
    default_port = 143
    url_scheme = "imap"
    server_module = "starttls_harness.servers.imap"
    client_module = "starttls_harness.clients.imap"
    has_return_to_plaintext = True
    storage_needs_login = True
    state_needs_login = ("stoptls",)  # SELECT after STOPTLS: is the login gone?
    has_preauth = True
    has_tagged_replies = True
    any_reply_tag = "*"
    #: The reference IMAP client's relaxed engine also takes plaintext that
    #: arrives after its ClientHello (the SMTP one refuses it: only its hold
    #: gate is off, and aiosmtplib drops bytes no command waits for).
    reference_client_expected: Mapping[str, Mapping[str, Verdict]] = {
        "accept-injected-response": {
            **TAKES_EVERY_INJECTION,
            "client.response-injection-tagged": Verdict.FAIL,
        },
        "downgrade": {
            "client.starttls-stripped": Verdict.FAIL,
            "client.starttls-refused": Verdict.FAIL,
            "client.starttls-bad": Verdict.FAIL,
            "client.starttls-preauth": Verdict.FAIL,
        },
    }

    def framer(self) -> Framer:
        return line_framer()

    def scripted_server(self) -> ScriptedServer:
        return _SCRIPTED

    def fake_greeting(self) -> bytes:
        return b"* OK [CAPABILITY IMAP4rev1] injected greeting\r\n"

    def hello(self) -> bytes:
        return b"h1 CAPABILITY\r\n"

    def starttls(self) -> bytes:
        return b"s1 STARTTLS\r\n"

    def stoptls(self) -> bytes:
        return b"x1 STOPTLS\r\n"

    def sentinel(self) -> bytes:
        return b"n1 NOOP\r\n"

    def injected(self) -> bytes:
        return b"i1 NOOP\r\n"

    def quit(self) -> bytes:
        return b"q1 LOGOUT\r\n"

    def is_injected_reply(self, reply: Reply) -> bool:
        return reply.key == "i1"

    def is_sentinel_reply(self, reply: Reply) -> bool:
        return reply.key == "n1"

    def is_goodbye(self, reply: Reply) -> bool:
        return any(line.upper().startswith(b"* BYE") for line in reply.lines)

    def answers(self, command: bytes, reply: Reply) -> bool:
        return reply.key == self.tag_of(command)

    def split_reply(
        self, buf: bytes, expect_tag: Optional[str] = None
    ) -> Tuple[Optional[Reply], bytes]:
        """One tagged reply with its untagged lines, or one lone greeting.

        With ``expect_tag`` None, the first complete line is a reply of its
        own (greetings, ``+`` continuations); otherwise untagged lines are
        collected until a tagged line.  Literals in responses are not
        needed by any scenario and are not parsed.
        """
        lines: List[bytes] = []
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                return None, buf
            line = buf[pos : nl + 1]
            lines.append(line)
            pos = nl + 1
            first = line.split(b" ", 2)
            tag = first[0].decode("latin-1", "replace")
            status = first[1].upper() if len(first) > 1 else b""
            if expect_tag is None or (tag not in ("*", "+")):
                ok = status == b"OK" or tag == "+"
                return Reply(tuple(lines), ok, tag), buf[pos:]

    def capabilities(self, reply: Reply) -> FrozenSet[str]:
        words: Set[str] = set()
        for line in reply.lines:
            text = line.decode("latin-1").strip()
            upper = text.upper()
            start = upper.find("CAPABILITY ")
            if start >= 0:
                rest = text[start + len("CAPABILITY ") :].split("]")[0]
                words.update(w.upper() for w in rest.split())
        return frozenset(words)

    def greeting_ok(self, reply: Reply) -> bool:
        return reply.key == "*" and reply.ok

    def final_line_of(self, command: bytes) -> LinePredicate:
        return _TaggedLine(command.split(b" ", 1)[0].decode("latin-1"))

    def tag_of(self, command: bytes) -> Optional[str]:
        return command.split(b" ", 1)[0].decode("latin-1")

    def is_continuation(self, reply: Reply) -> bool:
        return reply.key.startswith("+")

    def login(self, user: str, password: str) -> bytes:
        return f'l1 LOGIN "{user}" "{password}"\r\n'.encode()

    def state_probe(self, after: str) -> bytes:
        # After STARTTLS the capabilities must be asked anew; after STOPTLS the
        # login must be gone.
        return b"c1 CAPABILITY\r\n" if after == "starttls" else b"r1 SELECT INBOX\r\n"

    def state_kept(self, after: str, reply: Reply) -> Optional[str]:
        if after == "starttls":
            stale = self.capabilities(reply) & {"STARTTLS", "LOGINDISABLED"}
            return f"still advertises {sorted(stale)} inside TLS" if stale else None
        return "SELECT accepted without a new login after STOPTLS" if reply.ok else None

    def truncated_unit(self, recipient: str) -> Sequence[UnitStep]:
        return (
            UnitStep(b"t1 APPEND INBOX {%d}\r\n" % (len(_TRUNCATED_BODY) * 2), "continue"),
            UnitStep(_TRUNCATED_BODY, "none"),
        )

    # ------------------------------------------- as followed by the proxy

    def proxy_command(self, line: bytes, verb: bytes) -> Optional[str]:
        parts = line.split()
        if len(parts) == 2 and parts[1].upper() == verb and parts[0] not in (b"*", b"+"):
            return parts[0].decode("latin-1")
        return None

    def proxy_answer(self, line: bytes, tag: str) -> Optional[bool]:
        parts = line.split(None, 2)
        if not parts or parts[0].decode("latin-1") != tag:
            return None
        return len(parts) > 1 and parts[1].upper() == b"OK"


_SCRIPTED = _ScriptedImap()
IMAP = _Imap()
