"""FTP's control connection (RFC 959, AUTH TLS RFC 4217, CCC RFC 2228) in every role.

The upgrade is ``AUTH TLS`` answered ``234``; the return to plaintext is
``CCC`` answered ``200`` (RFC 4217 §5 / RFC 2228): TLS is shut down on the
control connection and the session goes on in plaintext on the same TCP
connection, still logged in.  The run layer's generic names map onto it:
the capability ``STARTTLS`` is FEAT's ``AUTH TLS`` and ``STOPTLS`` is always
there, because CCC (RFC 2228) predates FEAT and need not be listed (Pure-FTPd
answers it unlisted): CCC is tried, and only its refusal means there is no
return to plaintext (:meth:`_Ftp.stoptls_unoffered`, a ``skip`` quoting the
reply).  The evidence shows the FTP bytes (``AUTH TLS``, ``CCC``) while the
catalogue stays written once.

Who sends the first close_notify after ``CCC``: RFC 4217 leaves the order
open.  Python's ``ftplib`` (``ccc()`` = ``SSLSocket.unwrap()``) and curl's
active CCC mode send theirs at once after the ``200``; ProFTPD sends its
close_notify right after its ``200`` and curl's passive mode waits for the
server's.  :attr:`closure_initiator` records this: ``either``.  The
reference FTP server and the scripted server send their close_notify right
behind the ``200`` and then wait for the client's (R4), so that both kinds
of client work; the probe answers such a close_notify at once (R5 is then
the harness's side), and a one-sided closure by the client cannot be staged
(those scenarios do not apply to FTP).  See docs/ftp.md.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple

from starttls_harness.dialects.base import CodedFinalLine, Dialect, LinePredicate, Reply, UnitStep
from starttls_harness.dialects.roles import Command, ScriptedServer
from starttls_harness.report.verdicts import Verdict
from starttls_harness.tls.framing import Framer, line_framer

__all__ = [
    "BAIT",
    "CLIENT_EXPECTED",
    "FTP",
    "LOGIN_TAG",
    "PATH_EXPECTED",
    "SERVER_EXPECTED",
    "feat_reply",
    "split_ftp_reply",
]

F, W, K, E = Verdict.FAIL, Verdict.WARN, Verdict.SKIP, Verdict.ERROR

#: A FEAT line the scripted server offers in plaintext only (R8 bait).
BAIT = "XHARNESS-PLAINTEXT-ONLY"

#: :meth:`_Ftp.tag_of` of the two-command login: its answer is two replies.
LOGIN_TAG = "ftp-login"

#: The RFC 4217 refusals of AUTH (``431`` no security resource, ``500``/
#: ``502`` unknown or unimplemented, ``504`` mechanism not supported, ``534``
#: policy) and of CCC (``533`` integrity required, ``534`` policy).
AUTH_REFUSALS = frozenset({"431", "500", "502", "504", "534"})
CCC_REFUSALS = frozenset({"500", "502", "533", "534"})

#: The reference FTP server's validation matrix (server catalogue and the
#: CCC scenarios): behaviour -> {scenario id: verdict}, the first entry the
#: scenario that guards the broken rule; every scenario not listed passes.
#: After CCC the strict reference server sends the first close_notify (as
#: ProFTPD does), which leaves no room for a one-sided closure by the client:
#: server.one-sided-close-stoptls does not apply to FTP (R4 of the server is
#: judged by server.ccc-late-close-notify).
SERVER_EXPECTED: Dict[str, Dict[str, Verdict]] = {
    "strict": {},
    "keep-buffer": {
        "server.command-injection": F,
        "server.command-injection-split": F,
        "server.command-injection-multi": F,
    },
    "plaintext-in-tls": {"server.plaintext-in-tls": F},
    "early-plaintext": {"server.ccc-no-close-notify": F},
    "no-close-notify-reply": {
        "server.close-notify-reply": W,
        "server.stoptls-cycle": F,
        "server.state-reset": W,
        "server.ccc-cycle": F,
        "server.ccc-late-close-notify": F,
    },
    # Pure-FTPd's way (realworld/README.md): its "211 Logout." under TLS is a
    # goodbye, so server.one-sided-close still passes.
    # (server.close-notify-reply goes through CCC, where it closes first.)
    "logout-at-close-notify": {
        "server.plaintext-after-close": W,
        "server.data-after-close-notify": W,
    },
    "impatient-ccc": {"server.ccc-late-close-notify": F},
    # Silent on plaintext before the client's close_notify after CCC (as
    # Pure-FTPd 1.0.50): running it after the closure is R3 broken ...
    "silent-hold": {"server.ccc-no-close-notify": F},
    # ... discarding it is not (the scenario goes on past the silence).
    "silent-discard": {},
    # Takes early plaintext's first five bytes for a broken TLS record header,
    # drops TLS and reads on in plaintext (Pure-FTPd 1.0.50 with OpenSSL 3).
    "header-drops-tls": {"server.ccc-no-close-notify": F},
    # Reads on for the record that header announces and never runs it: safe.
    "swallow-record": {},
    "ignore-truncation": {"server.truncation": F},
    "alert-as-close": {"server.alert-then-plaintext": F},
    # CCC tried though FEAT does not list it: it works (Pure-FTPd) ...
    "unlisted-ccc": {},
    # ... or is refused (vsftpd): every scenario that needs it is a skip.
    "no-ccc": {
        "server.ccc-cycle": K,
        "server.ccc-no-close-notify": K,
        "server.ccc-late-close-notify": K,
        "server.stoptls-cycle": K,
    },
}

#: The reference FTP client's validation matrix (client catalogue and the
#: CCC scenarios): behaviour -> {scenario id: verdict}, the first entry the
#: scenario that guards the broken rule.  The scripted FTP server sends the
#: first close_notify after CCC (as ProFTPD): a client's one-sided closure
#: (R4) then shows only where the server holds its close_notify back
#: (client.ccc-no-close-notify), and a client that hangs up instead of
#: answering (R5) ends the CCC positive controls.
_NO_CCC = {
    "client.ccc-cycle": K,
    "client.ccc-no-close-notify": K,
    "client.ccc-close-notify-reply": K,
}
CLIENT_EXPECTED: Dict[str, Dict[str, Verdict]] = {
    "strict": {},
    "accept-injected-response": {
        "client.response-injection": F,
        "client.response-injection-partial": F,
        "client.response-injection-multi": F,
        "client.response-injection-split": F,
    },
    "plaintext-in-tls": {"client.plaintext-in-tls": F},
    "early-plaintext": {"client.ccc-no-close-notify": F},
    "one-sided-close": {"client.ccc-no-close-notify": F},
    "no-close-notify-reply": {
        "client.ccc-close-notify-reply": W,
        "client.close-notify-reply": W,
        "client.ccc-cycle": F,
        "client.stoptls-wait": F,
        # The session ends at CCC, before any fault: neither can decide.
        "client.stoptls-cycle": E,
        "client.state-reset": E,
    },
    "passive-ccc": {
        "client.ccc-close-notify-reply": F,
        "client.ccc-cycle": F,
        "client.close-notify-reply": W,
        "client.stoptls-cycle": F,
        "client.stoptls-wait": F,
        "client.state-reset": F,
    },
    "no-state-reset": {
        "client.state-reset": F,
        "client.one-sided-close": K,
        "client.stoptls-wait": K,
        "client.stoptls-cycle": K,
        **_NO_CCC,
    },
    "downgrade": {
        "client.starttls-stripped": F,
        "client.starttls-refused": F,
        "client.starttls-bad": F,
    },
}

#: The path role where FTP differs from ``PATH_EXPECTED``: (side, behaviour)
#: -> the whole non-pass map.  The server sends the first close_notify after
#: CCC, so the client answers rather than starts the closure (a client's
#: one-sided closure never happens), and the faults around the server's
#: close_notify (s2c) meet the client's reaction, not the server's.
PATH_EXPECTED: Dict[Tuple[str, str], Dict[str, Verdict]] = {
    # R2 relaxed, but after its close_notify the server judges plaintext by R3.
    ("server", "plaintext-in-tls"): {"path.inject-in-tls-c2s": F},
    # R3: plaintext taken before the client's close_notify.
    ("server", "early-plaintext"): {"path.drop-close-notify-c2s": F},
    # R2: plaintext around the server's close_notify is taken in.
    ("client", "plaintext-in-tls"): {
        "path.inject-in-tls-s2c": F,
        "path.drop-close-notify-s2c": F,
        "path.inject-before-close-s2c": F,
    },
    # R4: never staged, the client answers the server's close_notify.
    ("client", "one-sided-close"): {},
    # R5: the client hangs up instead of answering the server's close_notify.
    ("client", "no-close-notify-reply"): {"path.drop-close-notify-c2s": W},
}

_KINDS = {
    "FEAT": "hello",
    "AUTH": "starttls",
    "CCC": "stoptls",
    "USER": "auth",
    "PASS": "auth",
    "STOR": "append",
    "MKD": "append",
    "LIST": "access",
    "RETR": "access",
    "CWD": "select",
    "QUIT": "quit",
    "NOOP": "noop",
}


def _code(line: bytes) -> Optional[str]:
    return line[:3].decode("latin-1") if len(line) >= 4 and line[:3].isdigit() else None


def split_ftp_reply(buf: bytes) -> Tuple[Optional[Reply], bytes]:
    """Cut one complete reply (RFC 959 §4.2: ``ccc-`` ... ``ccc ``) off ``buf``."""
    lines: List[bytes] = []
    pos = 0
    opened: Optional[str] = None
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            return None, buf
        line = buf[pos : nl + 1]
        lines.append(line)
        pos = nl + 1
        code = _code(line)
        if opened is None:
            if code is not None and line[3:4] == b"-":
                opened = code
                continue
            key = code or line[:3].decode("latin-1", "replace")
        elif code == opened and line[3:4] != b"-":
            key = opened
        else:
            continue  # a middle line of a multi-line reply
        return Reply(tuple(lines), key[:1] in ("1", "2", "3"), key), buf[pos:]


def feat_reply(features: Sequence[str]) -> bytes:
    """The FEAT answer listing ``features`` (RFC 2389: ``211-`` ... ``211 End``)."""
    body = "".join(f" {f}\r\n" for f in features)
    return f"211-Features:\r\n{body}211 End\r\n".encode("ascii")


class _FinalReplyLine(CodedFinalLine):
    """The last line of an FTP reply: three digits and a space (or the line end)."""

    kind = "ftp-final"


class _ScriptedFtp(ScriptedServer):
    """The scripted server's FTP: offers AUTH TLS, PBSZ, PROT and (inside TLS) CCC."""

    #: A client that read the injected 5xx takes it as the answer to its
    #: first command under TLS (USER, PBSZ) and gives up.
    injection_effect = "answer-taken"

    def parse(self, raw: bytes, tls: bool) -> Command:
        words = raw.strip().split(None, 1)
        verb = words[0].decode("latin-1").upper() if words else ""
        rest = words[1] if len(words) > 1 else b""
        kind = _KINDS.get(verb, "other")
        if verb == "AUTH" and rest.strip().upper() not in (b"TLS", b"TLS-C", b"SSL"):
            kind = "other"
        return Command(raw, tls, kind, verb, b"", rest)

    def greeting(self) -> bytes:
        return b"220 fake.invalid FTP starttls-harness\r\n"

    def hello(self, cmd: Command, *, tls: bool, starttls: bool, stoptls: bool) -> bytes:
        features = ["UTF8", "PASV"]
        if starttls and not tls:
            features[:0] = ["AUTH TLS", "PBSZ", "PROT"]
        if not tls:
            features.append(BAIT)
        elif stoptls:
            features += ["PBSZ", "PROT", "CCC"]
        return feat_reply(features)

    def starttls_ok(self, cmd: Command) -> bytes:
        return b"234 AUTH TLS successful\r\n"

    def starttls_refused(self, cmd: Command) -> bytes:
        return b"431 TLS not available now\r\n"

    def not_offered(self, cmd: Command) -> bytes:
        return b"502 Command not implemented\r\n"

    def stoptls_ok(self, cmd: Command) -> bytes:
        return b"200 Clearing control channel protection\r\n"

    def goodbye(self, cmd: Command) -> bytes:
        return b"221 Goodbye\r\n"

    def injection(self, starttls: Command) -> bytes:
        return b"530 injected by starttls-harness before the handshake\r\n"

    def stored(self, cmd: Command) -> bytes:
        if cmd.verb == "MKD":
            return b'257 "' + cmd.rest.strip() + b'" created\r\n'
        return b"226 Transfer complete\r\n"

    def simple(self, cmd: Command) -> bytes:
        if cmd.kind == "noop":
            return b"200 NOOP ok\r\n"
        if cmd.verb in ("PBSZ", "PROT", "TYPE", "MODE", "STRU", "OPTS"):
            return b"200 Ok\r\n"
        if cmd.verb == "SYST":
            return b"215 UNIX Type: L8\r\n"
        if cmd.verb == "PWD":
            return b'257 "/" is the current directory\r\n'
        return b"502 Command not implemented\r\n"

    def auth_prompts(self, cmd: Command) -> List[bytes]:
        return []

    def auth_done(self, cmd: Command, ok: bool) -> bytes:
        if cmd.verb == "USER":
            return b"331 Password required\r\n"
        return b"230 Logged in\r\n" if ok else b"530 Login incorrect\r\n"


class _Ftp(Dialect):
    awaits_first_tls_reply = True
    name = "ftp"
    default_port = 21
    url_scheme = "ftp"
    server_module = "starttls_harness.servers.ftp"
    client_module = "starttls_harness.clients.ftp"
    has_return_to_plaintext = True
    storage_needs_login = True
    #: RFC 4217 leaves open which side sends the first close_notify after CCC.
    closure_initiator = "either"
    server_may_close_first = True
    #: After CCC the server says nothing: the client speaks first in plaintext.
    greets_after_stoptls = False
    stoptls_needs_login = True
    reference_server_expected: Mapping[str, Mapping[str, Verdict]] = SERVER_EXPECTED
    reference_client_expected: Mapping[str, Mapping[str, Verdict]] = CLIENT_EXPECTED
    reference_path_expected: Mapping[Tuple[str, str], Mapping[str, Verdict]] = PATH_EXPECTED

    def framer(self) -> Framer:
        return line_framer()

    def scripted_server(self) -> ScriptedServer:
        return _SCRIPTED

    def fake_greeting(self) -> bytes:
        return b"220 attacker.invalid FTP injected greeting\r\n"

    def hello(self) -> bytes:
        return b"FEAT\r\n"

    def starttls(self) -> bytes:
        return b"AUTH TLS\r\n"

    def stoptls(self) -> bytes:
        return b"CCC\r\n"

    def sentinel(self) -> bytes:
        # FEAT, not NOOP: vsftpd answers NOOP before a login with the same
        # 530 as any unknown (injected) command; FEAT's 211 is unmistakable.
        return b"FEAT\r\n"

    def injected(self) -> bytes:
        # An unknown verb: its 500 cannot be mistaken for NOOP's 200.
        return b"XHARNESS-INJECTED\r\n"

    def quit(self) -> bytes:
        return b"QUIT\r\n"

    def is_injected_reply(self, reply: Reply) -> bool:
        # "500 OOPS: ..." is vsftpd's fatal error (e.g. a TLS handshake that
        # failed on the injected bytes), not an answer to a command; a 421 is
        # a server hanging up (ProFTPD after such a handshake).
        return reply.key.startswith("5") and not reply.text[3:].strip().startswith("OOPS:")

    def is_sentinel_reply(self, reply: Reply) -> bool:
        return reply.key == "211" and not self.is_goodbye(reply)

    def is_goodbye(self, reply: Reply) -> bool:
        # 221/421: the server closes the control connection (RFC 959 §4.2).  A
        # one-line 211 is a status line, never FEAT's answer from a server that
        # lists AUTH TLS (RFC 2389 §3.2: features make it multi-line): Pure-FTPd
        # says "211 Logout." under TLS when the client's close_notify comes, and
        # hangs up.  Taken for FEAT's answer it read as plaintext answered (R4).
        return reply.key in ("221", "421") or (reply.key == "211" and len(reply.lines) == 1)

    def split_reply(
        self, buf: bytes, expect_tag: Optional[str] = None
    ) -> Tuple[Optional[Reply], bytes]:
        first, rest = split_ftp_reply(buf)
        if first is None or expect_tag != LOGIN_TAG or first.key != "331":
            return first, rest
        second, rest = split_ftp_reply(rest)  # USER's 331, then PASS's answer
        if second is None:
            return None, buf
        return Reply(first.lines + second.lines, second.ok, second.key), rest

    def capabilities(self, reply: Reply) -> FrozenSet[str]:
        """FEAT's feature lines; ``AUTH TLS`` also as STARTTLS, and always STOPTLS.

        CCC (RFC 2228) predates FEAT (RFC 2389): a server need not list it,
        and Pure-FTPd 1.0.50 does not, yet answers it.  So CCC is always
        tried, and only the server's refusal of it (:meth:`stoptls_unoffered`)
        means there is no return to plaintext.
        """
        words: Set[str] = {"STOPTLS"}
        for line in reply.lines[1:-1]:
            text = line.decode("latin-1").strip().upper()
            if not text:
                continue
            head, _, args = text.partition(" ")
            words.add(head)
            if head == "AUTH":
                words.update(f"AUTH {a}" for a in args.replace(";", " ").split())
                if {"TLS", "TLS-C"} & set(args.replace(";", " ").split()):
                    words.add("STARTTLS")
        return frozenset(words)

    def stoptls_unoffered(self, reply: Reply) -> Optional[str]:
        # 500/502 unknown or unimplemented (vsftpd), 533/534 policy (RFC 4217
        # §5 / RFC 2228): the server has no CCC for us.  A 421 is a hang-up.
        if reply.ok or self.is_goodbye(reply):
            return None
        if reply.key == "530":  # vsftpd asks for a login before any command
            return f"the server refused CCC before a login (no test user): {reply.text.strip()}"
        return f"the server refused CCC: {reply.text.strip()}"

    def greeting_ok(self, reply: Reply) -> bool:
        return reply.key == "220"

    def final_line_of(self, command: bytes) -> LinePredicate:
        return _FinalReplyLine()

    def tag_of(self, command: bytes) -> Optional[str]:
        return LOGIN_TAG if command[:5].upper() == b"USER " and b"\nPASS " in command else None

    def login(self, user: str, password: str) -> bytes:
        # Two commands, one answer awaited (split_reply joins 331 and 230).
        return f"USER {user}\r\nPASS {password}\r\n".encode()

    def state_control(self) -> Optional[bytes]:
        return b"PWD\r\n"

    def state_probe(self, after: str) -> bytes:
        return b"PWD\r\n"

    def state_kept(self, after: str, reply: Reply) -> Optional[str]:
        if after == "stoptls":
            return None  # CCC keeps the login by design (RFC 4217 §5): nothing to reset
        return f"PWD answered without a login after {after}" if reply.ok else None

    def truncated_unit(self, recipient: str) -> Sequence[UnitStep]:
        # A command cut before its line end: never to be executed (R6).
        return (UnitStep(b"MKD harness-truncated", "none"),)

    # -- as followed by the on-path proxy

    def proxy_command(self, line: bytes, verb: bytes) -> Optional[str]:
        # STARTTLS is AUTH TLS (RFC 4217 §4); the return to plaintext is CCC.
        wanted = b"AUTH TLS" if verb == b"STARTTLS" else b"CCC"
        return "" if b" ".join(line.split()).upper() == wanted else None

    def proxy_answer(self, line: bytes, tag: str) -> Optional[bool]:
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b" ", b"\r", b"\n", b""):
            return None  # not a reply, or a line of a multi-line one
        return line[:3] in (b"234", b"200")


_SCRIPTED = _ScriptedFtp()
FTP = _Ftp()
