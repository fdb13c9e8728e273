"""The CCC scenarios: a return to plaintext whose closure the server may start (FTP CCC).

RFC 4217 §5 does not say which side sends the first close_notify after the
``200`` to ``CCC``; in the wild the server often does (ProFTPD), and some
clients never answer it (curl's passive CCC mode).  These scenarios apply
to the dialects whose return to plaintext allows that
(``Dialect.server_may_close_first``), never by a dialect's name.

Server role (the harness is the FTP client):

``server.ccc-cycle`` (positive control)
    CCC after a login; the close_notify alerts cross (in either order); a
    plaintext command is answered in plaintext.
``server.ccc-no-close-notify`` (R3)
    After the CCC answer the client sends a plaintext command and never
    its close_notify: a conforming server refuses it (closes).  A server
    that stays silent is sent one segment at a time, each after a bounded
    wait (:mod:`starttls_harness.run.server_ccc`): a second plaintext
    command (answering it fails: plaintext resumed without the client's
    close_notify, as Pure-FTPd does), then our close_notify and a sentinel
    (running the early commands after the closure fails, discarding them
    passes), then our FIN (closing having run nothing passes).
``server.ccc-late-close-notify`` (R4: the initiator waits)
    The client sends (or answers with) its close_notify only after
    :data:`LATE_CLOSE_NOTIFY_DELAY` seconds: the server must neither drop
    the session nor misread the next command.  The delay is a declared
    setting; the scenario runs concurrently with the others.

Client role (the harness is the FTP server; it sends its close_notify
right behind CCC's ``200``, as ProFTPD does):

``client.ccc-cycle`` (positive control)
    The client answers (or crosses) the server's close_notify and goes on
    in plaintext.
``client.ccc-no-close-notify`` (R3)
    After the ``200`` the server writes plaintext and never its
    close_notify: a conforming client refuses it (ends the connection).
``client.ccc-close-notify-reply`` (R5, the client-side mirror)
    The ``200`` and the server's close_notify: the client's close_notify
    must come first (plaintext before it is R3: a fail; a TCP close a warn).
"""

from __future__ import annotations

from typing import Tuple

from starttls_harness.dialects import dialects_with
from starttls_harness.report.verdicts import Verdict
from starttls_harness.scenarios.client import CLIENT_COMMON
from starttls_harness.scenarios.model import Expect, S, Scenario
from starttls_harness.tls.engine import Rule

__all__ = [
    "CCC_SCENARIOS",
    "CLIENT_CCC_SCENARIOS",
    "LATE_CLOSE_NOTIFY_DELAY",
    "SERVER_CCC_SCENARIOS",
]

P, F, W, K, E = Verdict.PASS, Verdict.FAIL, Verdict.WARN, Verdict.SKIP, Verdict.ERROR

#: Seconds the client holds its close_notify back in ``*-late-close-notify``
#: (longer than the few seconds ProFTPD waits before it guesses).
LATE_CLOSE_NOTIFY_DELAY = 5.0

_CCC_DIALECTS = dialects_with("server_may_close_first")
_REFERENCE = "RFC 4217 §5; RFC 2228 (CCC); RFC 5246 §7.2.1"

_UPGRADE_AND_LOGIN = (
    S("connect"),
    S("hello"),
    S("require", cap="STARTTLS"),
    S("starttls"),
    S("handshake"),
    S("hello"),
    S("require", cap="STOPTLS"),
    S("login", optional=True),
)

SERVER_CCC_SCENARIOS: Tuple[Scenario, ...] = (
    Scenario(
        id="server.ccc-cycle",
        title="Positive control: CCC after login, both close_notify, a plaintext command",
        role="server",
        rule=Rule.R3,
        reference=_REFERENCE,
        reason="The conforming CCC path must work, or every refusal of it means nothing.",
        steps=(
            *_UPGRADE_AND_LOGIN,
            S("stoptls"),
            S("unwrap"),
            S("sentinel"),
            S("quit"),
        ),
        expect={
            "completed": Expect(P, "CCC worked: both close_notify crossed, plaintext answered"),
            "closed": Expect(F, "the conforming CCC path broke"),
            "close-notify-not-answered": Expect(F, "the conforming CCC path broke"),
        },
        dialects=_CCC_DIALECTS,
    ),
    Scenario(
        id="server.ccc-no-close-notify",
        title="CCC, then a plaintext command without the client's close_notify",
        role="server",
        rule=Rule.R3,
        reference=_REFERENCE + "; ProFTPD issue #954",
        reason="Plaintext may flow only after close_notify crossed both ways after CCC.",
        steps=(
            *_UPGRADE_AND_LOGIN,
            S("stoptls-unanswered"),
            S("raw-sentinel", fault=True),
            S("expect-close-or-closure"),
        ),
        expect={
            "closed": Expect(P, "refused plaintext that came without the client's close_notify"),
            "plaintext-answered": Expect(
                F, "answered plaintext after CCC without the client's close_notify"
            ),
            "resumed-without-close-notify": Expect(
                F,
                "took plaintext after CCC for a broken TLS record and went on in plaintext"
                " without the client's close_notify",
            ),
            "held-plaintext-discarded": Expect(
                P, "silent until our close_notify, then discarded the early plaintext"
            ),
            "held-plaintext-run": Expect(
                F, "ran plaintext from before the bidirectional closure after it (R3)"
            ),
            "never-ran": Expect(
                P, "took the plaintext for a TLS record and never ran it; closed at our FIN"
            ),
            "silent": Expect(E, "stayed silent: whether it runs the early plaintext is unknown"),
        },
        dialects=_CCC_DIALECTS,
    ),
    Scenario(
        id="server.ccc-late-close-notify",
        title=f"CCC, the client's close_notify {LATE_CLOSE_NOTIFY_DELAY:g} s late, then a command",
        role="server",
        rule=Rule.R4,
        reference=_REFERENCE + "; ProFTPD issue #954",
        reason="The closure's initiator waits for the peer's close_notify, however late.",
        steps=(
            *_UPGRADE_AND_LOGIN,
            S("stoptls-unanswered"),
            S("late-close-notify", fault=True, delay=LATE_CLOSE_NOTIFY_DELAY),
            S("quit"),
        ),
        expect={
            "completed": Expect(P, "waited for the late close_notify and read the next command"),
            "closed": Expect(F, "dropped the session before the late close_notify"),
            "close-notify-not-answered": Expect(F, "dropped the session at the late close_notify"),
            "misread": Expect(F, "misread the command after the late close_notify"),
        },
        dialects=_CCC_DIALECTS,
    ),
)

_CLIENT_UPGRADE = (
    S("greet"),
    S("serve", until="starttls"),
    S("accept-starttls"),
    S("handshake"),
    S("serve", until="stoptls", stoptls=True, otherwise="no-stoptls"),
)

_CLIENT_COMMON = {
    **CLIENT_COMMON,
    "no-stoptls": Expect(K, "the client does not use CCC"),
    "closed-before-fault": Expect(E, "the client ended the session before CCC"),
}

#: Client role (the harness is the FTP server): the server sends the first
#: close_notify after CCC, as ProFTPD does.
CLIENT_CCC_SCENARIOS: Tuple[Scenario, ...] = (
    Scenario(
        id="client.ccc-cycle",
        title="Positive control: CCC answered with 200 and the server's close_notify",
        role="client",
        rule=Rule.R3,
        reference=_REFERENCE,
        reason="The conforming CCC path must work, or every refusal of it means nothing.",
        steps=(*_CLIENT_UPGRADE[:-1], S("serve", until="end", stoptls=True, cycles=1)),
        expect={
            **_CLIENT_COMMON,
            "completed": Expect(P, "answered the server's close_notify and went on in plaintext"),
            "client-failed": Expect(F, "the conforming CCC path broke"),
            "closed": Expect(F, "the conforming CCC path broke"),
            "closed-before-fault": Expect(F, "the conforming CCC path broke"),
        },
        dialects=_CCC_DIALECTS,
    ),
    Scenario(
        id="client.ccc-no-close-notify",
        title="CCC answered, then plaintext from the server without its close_notify",
        role="client",
        rule=Rule.R3,
        reference=_REFERENCE,
        reason="Plaintext may be read only after close_notify crossed both ways after CCC.",
        steps=(*_CLIENT_UPGRADE, S("ccc-plaintext", fault=True), S("expect-no-resume")),
        expect={
            **_CLIENT_COMMON,
            "refused": Expect(P, "did not take plaintext that came without the server's closure"),
            "resumed": Expect(F, "went on in plaintext without the server's close_notify"),
            "ignored-closure": Expect(W, "kept sending under TLS after CCC"),
        },
        dialects=_CCC_DIALECTS,
    ),
    Scenario(
        id="client.ccc-close-notify-reply",
        title="CCC answered with 200 and close_notify: the client answers at once",
        role="client",
        rule=Rule.R5,
        reference=_REFERENCE + "; curl --ftp-ssl-ccc (passive)",
        reason="The responder answers close_notify before anything else; plaintext before it "
        "is unprotected (R3).",
        steps=(*_CLIENT_UPGRADE, S("ccc-close-notify", fault=True), S("expect-close-notify")),
        expect={
            **_CLIENT_COMMON,
            "answered": Expect(P, "answered the server's close_notify at once"),
            "answered-late": Expect(W, "answered the server's close_notify, but not at once"),
            "unanswered": Expect(W, "closed TCP instead of answering close_notify"),
            "spoke-first": Expect(F, "spoke before answering the server's close_notify"),
        },
        dialects=_CCC_DIALECTS,
    ),
)

#: Every CCC scenario (the catalogue includes them).
CCC_SCENARIOS: Tuple[Scenario, ...] = SERVER_CCC_SCENARIOS + CLIENT_CCC_SCENARIOS
