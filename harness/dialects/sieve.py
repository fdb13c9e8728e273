"""ManageSieve (RFC 5804, STARTTLS §2.2) as the harness speaks it, in every role.

A ManageSieve response is any number of data lines (quoted strings: the
capability list, the script list) closed by an ``OK``, ``NO`` or ``BYE``
line.  The greeting is the capability list; after the TLS handshake the
server speaks first again and re-issues it (RFC 5804 §2.2), and the client
must read it and forget what it learnt in plaintext.

That unprompted capability list would put the prober one reply behind, so
every command the prober sends after the handshake ends in ``NOOP "<tag>"``
(RFC 5804 §2.14: ``OK (TAG "<tag>")`` answers it, the synchronisation the RFC
suggests after STARTTLS): :meth:`ManageSieve.split_reply` collects every
response up to the one with the awaited TAG, so a re-issued capability list
is folded into the next reply instead of being taken for its answer.  Only
STARTTLS, STOPTLS and LOGOUT go alone (nothing may follow the first two).

The storage action is ``PUTSCRIPT`` with a non-synchronizing literal
(``{n+}``, the only literal form a client sends); the storage probe counts
the stored scripts.  ManageSieve has no return to plaintext: ``"STOPTLS"``
is the harness's test extension, listed only inside TLS.
"""

from __future__ import annotations

import base64
import re
from typing import FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple

from starttls_harness.dialects.base import Dialect, LinePredicate, Reply, UnitStep
from starttls_harness.dialects.roles import Command, ScriptedServer
from starttls_harness.report.verdicts import Verdict
from starttls_harness.tls.framing import Framer, line_framer

__all__ = ["BAIT", "SIEVE", "capability_lines", "final_status", "quoted", "response_tag"]

#: Capability the scripted server's plaintext list has and its TLS one never does (R8).
BAIT = "X-HARNESS-PLAINTEXT-ONLY"

_KINDS = {
    "CAPABILITY": "hello",
    "STARTTLS": "starttls",
    "STOPTLS": "stoptls",
    "AUTHENTICATE": "auth",
    "PUTSCRIPT": "append",
    "LOGOUT": "quit",
    "NOOP": "noop",
    "CHECKSCRIPT": "noop",
    "LISTSCRIPTS": "access",
    "GETSCRIPT": "access",
    "SETACTIVE": "access",
    "DELETESCRIPT": "access",
    "RENAMESCRIPT": "access",
    "HAVESPACE": "access",
}

_FINAL = re.compile(rb"(OK|NO|BYE)(?=[\s(]|\Z)", re.IGNORECASE)
_TAG = re.compile(rb'\(\s*TAG\s+"((?:[^"\\]|\\.)*)"\s*\)', re.IGNORECASE)
_LITERAL_AT_END = re.compile(rb"\{(\d{1,10})(\+?)\}\r?\n\Z")
_STRING = re.compile(rb'"((?:[^"\\]|\\.)*)"')

#: The script the storage probe announces at twice its size.
_TRUNCATED_SCRIPT = b"# cut by starttls-harness\r\nkeep;\r\n"


def quoted(text: str) -> bytes:
    """``text`` as a ManageSieve quoted string."""
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode("utf-8") + b'"'


def final_status(line: bytes) -> Optional[str]:
    """``OK``, ``NO`` or ``BYE`` if ``line`` closes a response, else None."""
    found = _FINAL.match(line)
    return found.group(1).upper().decode("ascii") if found is not None else None


def response_tag(line: bytes) -> Optional[str]:
    """The ``(TAG "...")`` of a final line (an answer to ``NOOP "..."``), if any."""
    found = _TAG.search(line)
    return found.group(1).decode("latin-1") if found is not None else None


def capability_lines(caps: Sequence[Tuple[str, Optional[str]]]) -> bytes:
    """The data lines of a capability list: ``"NAME"`` or ``"NAME" "value"``."""
    out = b""
    for name, value in caps:
        out += quoted(name) + (b" " + quoted(value) if value is not None else b"") + b"\r\n"
    return out


def _with_tag(command: bytes, tag: str) -> bytes:
    return command + b'NOOP "' + tag.encode("ascii") + b'"\r\n'


class _FinalLine(LinePredicate):
    """The line that closes a ManageSieve response."""

    kind = "sieve-final"

    def __call__(self, line: bytes) -> bool:
        return final_status(line) is not None


class _ScriptedSieve(ScriptedServer):
    """The scripted server's ManageSieve: capabilities, STARTTLS, AUTHENTICATE PLAIN, PUTSCRIPT."""

    #: The injected capability list offers no SASL mechanism (``"SASL" ""``);
    #: a client that believed it never authenticates.
    injection_effect = "capabilities-believed"

    def parse(self, raw: bytes, tls: bool) -> Command:
        words = raw.strip().split(None, 1)
        verb = words[0].decode("latin-1").upper() if words else ""
        rest = words[1] if len(words) > 1 else b""
        return Command(raw, tls, _KINDS.get(verb, "other"), verb, b"", rest)

    def _caps(self, *, tls: bool, starttls: bool, stoptls: bool) -> bytes:
        caps: List[Tuple[str, Optional[str]]] = [
            ("IMPLEMENTATION", "starttls-harness"),
            ("SIEVE", "fileinto"),
            ("VERSION", "1.0"),
        ]
        # SASL PLAIN in plaintext too: the server would take a password in
        # clear; a client that requires TLS must not offer it one (R9).
        caps.append(("SASL", "PLAIN"))
        if not tls:
            if starttls:
                caps.append(("STARTTLS", None))
            caps.append((BAIT, None))
        elif stoptls:
            caps.append(("STOPTLS", None))
        return capability_lines(caps)

    def greeting(self) -> bytes:
        return self._caps(tls=False, starttls=True, stoptls=False) + b'OK "ready"\r\n'

    def hello(self, cmd: Command, *, tls: bool, starttls: bool, stoptls: bool) -> bytes:
        caps = self._caps(tls=tls, starttls=starttls, stoptls=stoptls)
        return caps + b'OK "Capability completed."\r\n'

    def starttls_ok(self, cmd: Command) -> bytes:
        return b'OK "Begin TLS negotiation now."\r\n'

    def starttls_refused(self, cmd: Command) -> bytes:
        return b'NO "TLS not available"\r\n'

    def not_offered(self, cmd: Command) -> bytes:
        return b'NO "command not offered here"\r\n'

    def stoptls_ok(self, cmd: Command) -> bytes:
        return b'OK "Begin TLS closure."\r\n'

    def goodbye(self, cmd: Command) -> bytes:
        return b'OK "Logout completed."\r\n'

    def injection(self, starttls: Command) -> bytes:
        caps = [("IMPLEMENTATION", "injected"), ("SASL", ""), ("VERSION", "1.0")]
        return capability_lines(caps) + b"OK\r\n"

    def stored(self, cmd: Command) -> bytes:
        return b'OK "PUTSCRIPT completed."\r\n'

    def simple(self, cmd: Command) -> bytes:
        if cmd.verb == "NOOP":
            found = _STRING.search(cmd.rest)
            if found is not None:
                return b'OK (TAG "' + found.group(1) + b'") "Done"\r\n'
            return b'OK "Done"\r\n'
        if cmd.kind in ("noop", "access"):
            return b"OK\r\n"
        return b'NO "unknown command"\r\n'

    def auth_prompts(self, cmd: Command) -> List[bytes]:
        strings = _STRING.findall(cmd.rest)
        if strings[:1] and strings[0].upper() == b"PLAIN" and len(strings) == 1:
            return [b'""\r\n']
        return []

    def auth_done(self, cmd: Command, ok: bool) -> bytes:
        strings = _STRING.findall(cmd.rest)
        if not strings or strings[0].upper() != b"PLAIN":
            return b'NO "unsupported mechanism"\r\n'
        if not ok:
            return b'NO "authentication cancelled"\r\n'
        return b'OK "Logged in."\r\n'

    def literal_after(self, line: bytes) -> Optional[Tuple[int, bool]]:
        found = _LITERAL_AT_END.search(line)
        if found is None:
            return None
        # Clients send only non-synchronizing literals (RFC 5804 literal-c2s).
        return int(found.group(1)), False


class _ManageSieve(Dialect):
    awaits_first_tls_reply = True
    name = "sieve"
    default_port = 4190
    url_scheme = "sieve"
    server_module = "starttls_harness.servers.sieve"
    client_module = "starttls_harness.clients.sieve"
    has_return_to_plaintext = True
    storage_needs_login = True
    state_needs_login = ("stoptls",)  # LISTSCRIPTS after STOPTLS: is the login gone?
    speaks_first_after_starttls = True
    #: As the reference IMAP client: its relaxed engine also takes plaintext
    #: that arrives after its ClientHello, so the split injection is believed too.
    reference_client_expected: Mapping[str, Mapping[str, Verdict]] = {
        "accept-injected-response": {
            "client.response-injection": Verdict.FAIL,
            "client.response-injection-split": Verdict.FAIL,
            # Every injected line is taken in, not only the first.
            "client.response-injection-multi": Verdict.FAIL,
        },
    }

    def framer(self) -> Framer:
        return line_framer()

    def is_resync(self, unit: bytes) -> bool:
        # RFC 5804 §2.2 has the server re-send its capabilities after TLS; a
        # client may still ask (CAPABILITY) or mark where they end (NOOP with a
        # tag, as sieve-connect does for servers that did not re-send them).
        word = unit.split(None, 1)[0].upper() if unit.strip() else b""
        return word in (b"NOOP", b"CAPABILITY")

    def scripted_server(self) -> ScriptedServer:
        return _SCRIPTED

    def fake_greeting(self) -> bytes:
        return capability_lines([("IMPLEMENTATION", "attacker"), ("VERSION", "1.0")]) + b"OK\r\n"

    def hello(self) -> bytes:
        return _with_tag(b"CAPABILITY\r\n", "hello")

    def starttls(self) -> bytes:
        return b"STARTTLS\r\n"

    def stoptls(self) -> bytes:
        return b"STOPTLS\r\n"

    def sentinel(self) -> bytes:
        return b'NOOP "sentinel"\r\n'

    def injected(self) -> bytes:
        return b'NOOP "injected"\r\n'

    def quit(self) -> bytes:
        return b"LOGOUT\r\n"

    def is_injected_reply(self, reply: Reply) -> bool:
        return reply.key == "injected"

    def is_sentinel_reply(self, reply: Reply) -> bool:
        return reply.key == "sentinel" and reply.ok

    def is_goodbye(self, reply: Reply) -> bool:
        # RFC 5804 §1.3: BYE is the server closing the connection.
        return any(final_status(line) == "BYE" for line in reply.lines)

    def split_reply(
        self, buf: bytes, expect_tag: Optional[str] = None
    ) -> Tuple[Optional[Reply], bytes]:
        """One response; with ``expect_tag``, every response up to a tagged one.

        Without a tag the first response is the reply (greetings, STARTTLS).
        With one, untagged responses (a re-issued capability list, the answer
        to the command the NOOP follows) are collected until a final line
        that carries a TAG -- its tag is the key -- or a ``BYE``; the reply is
        ok only if every collected response is.  Literals in responses are
        not needed by any scenario and are not parsed.
        """
        lines: List[bytes] = []
        ok = True
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                return None, buf
            line = buf[pos : nl + 1]
            lines.append(line)
            pos = nl + 1
            status = final_status(line)
            if status is None:
                continue
            ok = ok and status == "OK"
            tag = response_tag(line)
            if expect_tag is None or tag is not None or status == "BYE":
                return Reply(tuple(lines), ok, tag if tag is not None else status), buf[pos:]

    def capabilities(self, reply: Reply) -> FrozenSet[str]:
        words: Set[str] = set()
        for line in reply.lines:
            if line.startswith(b'"'):
                found = _STRING.match(line)
                if found is not None:
                    words.add(found.group(1).decode("latin-1").upper())
        return frozenset(words)

    def greeting_ok(self, reply: Reply) -> bool:
        return reply.ok and reply.key == "OK"

    def final_line_of(self, command: bytes) -> LinePredicate:
        return _FinalLine()

    def tag_of(self, command: bytes) -> Optional[str]:
        last = command.rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
        if last.upper().startswith(b"NOOP "):
            found = _STRING.search(last)
            if found is not None:
                return found.group(1).decode("latin-1")
        return None

    def login(self, user: str, password: str) -> bytes:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return _with_tag(f'AUTHENTICATE "PLAIN" "{token}"\r\n'.encode(), "login")

    def state_probe(self, after: str) -> bytes:
        # After STARTTLS the capabilities must be new; after STOPTLS the login
        # must be gone (LISTSCRIPTS needs it).
        first = b"CAPABILITY\r\n" if after == "starttls" else b"LISTSCRIPTS\r\n"
        return _with_tag(first, "probe")

    def state_kept(self, after: str, reply: Reply) -> Optional[str]:
        if after == "starttls":
            stale = self.capabilities(reply) & {"STARTTLS", BAIT}
            return f"still advertises {sorted(stale)} inside TLS" if stale else None
        return "LISTSCRIPTS accepted without a new login after STOPTLS" if reply.ok else None

    def truncated_unit(self, recipient: str) -> Sequence[UnitStep]:
        size = 2 * len(_TRUNCATED_SCRIPT)
        head = b'PUTSCRIPT "harness-truncated" {%d+}\r\n' % size
        return (UnitStep(head + _TRUNCATED_SCRIPT, "none"),)

    # -- as followed by the on-path proxy

    def proxy_command(self, line: bytes, verb: bytes) -> Optional[str]:
        return "" if line.strip().upper() == verb else None

    def proxy_answer(self, line: bytes, tag: str) -> Optional[bool]:
        word = line.split(None, 1)[:1]
        if not word or word[0].upper() not in (b"OK", b"NO", b"BYE"):
            return None  # a capability line before the final one
        return word[0].upper() == b"OK"


_SCRIPTED = _ScriptedSieve()
SIEVE = _ManageSieve()
