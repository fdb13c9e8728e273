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
    its close_notify: a conforming server refuses it (closes).
``server.ccc-late-close-notify`` (R4: the initiator waits)
    The client sends (or answers with) its close_notify only after
    :data:`LATE_CLOSE_NOTIFY_DELAY` seconds: the server must neither drop
    the session nor misread the next command.  The delay is a declared
    setting; the scenario runs concurrently with the others.
"""

from __future__ import annotations

from typing import Tuple

from starttls_harness.dialects import dialects_with
from starttls_harness.report.verdicts import Verdict
from starttls_harness.scenarios.model import Expect, S, Scenario
from starttls_harness.tls.engine import Rule

__all__ = ["CCC_SCENARIOS", "LATE_CLOSE_NOTIFY_DELAY", "SERVER_CCC_SCENARIOS"]

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
            S("expect-close"),
        ),
        expect={
            "closed": Expect(P, "refused plaintext that came without the client's close_notify"),
            "plaintext-answered": Expect(
                F, "answered plaintext after CCC without the client's close_notify"
            ),
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

#: Every CCC scenario (the catalogue includes them).
CCC_SCENARIOS: Tuple[Scenario, ...] = SERVER_CCC_SCENARIOS
