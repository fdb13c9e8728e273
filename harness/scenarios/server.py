"""The server-role scenario catalogue, as data (see :mod:`.model` for what a scenario is)."""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

from starttls_harness.dialects import dialects_with
from starttls_harness.report.verdicts import Verdict
from starttls_harness.scenarios.model import (
    COMMON,
    Expect,
    S,
    Scenario,
    Step,
    needing_command_return,
    needing_return,
)
from starttls_harness.scenarios.model import select as select_from
from starttls_harness.tls.engine import Rule

P, F, W, K, E = Verdict.PASS, Verdict.FAIL, Verdict.WARN, Verdict.SKIP, Verdict.ERROR

__all__ = [
    "CATALOGUE",
    "COMMON",
    "Expect",
    "S",
    "Scenario",
    "Step",
    "by_id",
    "select",
]

_STARTTLS = (S("connect"), S("hello"), S("require", cap="STARTTLS"))
_UPGRADE = (*_STARTTLS, S("starttls"), S("handshake"), S("hello"))

_INJECTION_EXPECT = {
    "closed": Expect(P, "refused the injected plaintext by closing the connection"),
    # A refusal is the safe outcome: the injected command never ran.
    "refused-injection": Expect(P, "refused STARTTLS with plaintext pipelined after it"),
    "handshake-refused": Expect(
        P, "refused the handshake after the injected plaintext (alert or failed handshake)"
    ),
    "completed": Expect(P, "discarded the injected plaintext"),
    "injection-answered": Expect(F, "executed plaintext injected before the handshake"),
    # An asynchronous protocol (LDAP) may run a pipelined request before its
    # upgrade answer: in plaintext, as if sent before STARTTLS; never inside TLS.
    "injection-answered-plaintext": Expect(
        P, "answered the pipelined request in plaintext before its STARTTLS answer, not in TLS"
    ),
}

#: The split variant: the injected segment leaves once the upgrade answer
#: has arrived, before our ClientHello (``harness/run/server_upgrade.py``).
#: It cannot be refused with STARTTLS (that answer came first); what the
#: target does with the bytes after its switch decides, each outcome named.
_SPLIT_EXPECT = {
    "closed": Expect(P, "closed the connection on the plaintext sent after its STARTTLS answer"),
    "handshake-refused": Expect(
        P, "the plaintext sent after its STARTTLS answer broke the handshake; it never ran"
    ),
    "handshake-alert": Expect(
        P, "answered the plaintext sent after its STARTTLS answer with a TLS alert; it never ran"
    ),
    "completed": Expect(
        P, "discarded the plaintext sent after its STARTTLS answer; the handshake went on"
    ),
    "injection-answered": Expect(
        F, "executed inside TLS the plaintext sent after its STARTTLS answer, before the handshake"
    ),
    "injection-answered-in-plaintext": Expect(
        F, "answered in plaintext the command sent after its STARTTLS answer, instead of TLS"
    ),
}

#: A target that neither answers our close_notify nor closes TCP is asked a
#: plaintext command after the reply bound (see ``harness/run/server.py``):
#: answering it is R3 broken whatever else the scenario checks.
_SILENCE_ANSWERED = {
    "silent-then-answered": Expect(
        F, "answered plaintext while its side of TLS was still open (R3: no closure)"
    ),
    "spoke-after-close": Expect(F, "wrote plaintext after our close_notify (R3)"),
    "violation:R3": Expect(F, "wrote plaintext while its side of TLS was still open (R3)"),
}

#: What the target wrote where it must have closed, called what it is.
_GOODBYE = {
    "goodbye-in-tls": Expect(P, "refused with a goodbye under TLS"),
    "plaintext-goodbye": Expect(
        F, "wrote a plaintext goodbye (421/BYE) onto a connection that was in TLS (R3)"
    ),
    "plaintext-unsolicited": Expect(
        F, "wrote an unsolicited plaintext line onto a connection that was in TLS (R3)"
    ),
}

_SERVER: List[Scenario] = [
    Scenario(
        id="server.command-injection",
        title="Plaintext command pipelined with STARTTLS in one segment",
        role="server",
        rule=Rule.R1,
        reference="CVE-2011-0411; CVE-2024-34083; RFC 3207 §4.2; RFC 3501 §6.2.1",
        reason="A command received before the handshake must never run inside TLS.",
        steps=(
            *_STARTTLS,
            S("starttls", fault=True, inject=True, segment="same"),
            S("handshake"),
            S("sentinel"),
            S("quit"),
        ),
        expect=_INJECTION_EXPECT,
    ),
    Scenario(
        id="server.command-injection-split",
        title=(
            "Plaintext command in its own segment after the STARTTLS answer, before the ClientHello"
        ),
        role="server",
        rule=Rule.R1,
        reference="CVE-2011-0411; RFC 3207 §4.2",
        reason=(
            "Injected plaintext may arrive in a later read than STARTTLS itself; it is sent "
            "once the upgrade answer has arrived, so every run tests the same thing."
        ),
        steps=(
            *_STARTTLS,
            S("starttls", fault=True, inject=True, segment="after-answer"),
            S("handshake"),
            S("sentinel"),
            S("quit"),
        ),
        expect=_SPLIT_EXPECT,
    ),
    Scenario(
        id="server.command-injection-multi",
        title="Several plaintext commands pipelined with STARTTLS",
        role="server",
        rule=Rule.R1,
        reference="CVE-2011-0411; 'NO STARTTLS' (USENIX Security 2021)",
        reason="A buffer of several commands must be dropped as a whole.",
        steps=(
            *_STARTTLS,
            S("starttls", fault=True, inject=True, segment="same", count=3),
            S("handshake"),
            S("sentinel"),
            S("quit"),
        ),
        expect=_INJECTION_EXPECT,
    ),
    Scenario(
        id="server.plaintext-in-tls",
        title="Plaintext command while TLS is up",
        role="server",
        rule=Rule.R2,
        reference="RFC 8446 §5.1; RFC 5246 §6.2",
        reason="Bytes that are not TLS records must end the connection unanswered.",
        steps=(*_UPGRADE, S("raw-sentinel", fault=True), S("expect-close")),
        expect={
            **_GOODBYE,
            "closed": Expect(P, "closed the connection on plaintext inside TLS"),
            "plaintext-answered": Expect(F, "answered a plaintext command while TLS was up"),
        },
    ),
    Scenario(
        id="server.starttls-in-tls",
        title="A second STARTTLS inside TLS",
        role="server",
        rule=Rule.R8,
        reference="RFC 3207 §4.2; RFC 3501 §6.2.1",
        reason="STARTTLS is not offered inside TLS; a second upgrade must be refused.",
        steps=(*_UPGRADE, S("command", fault=True, what="starttls", refuse=True), S("quit")),
        expect={
            "completed": Expect(P, "refused a second STARTTLS inside TLS"),
            "closed": Expect(P, "closed the connection on a second STARTTLS"),
            # Nested TLS confuses the state machine but exposes no data.
            "accepted": Expect(
                W, "accepted STARTTLS inside TLS (RFC 3207 §4.2: not offered there)"
            ),
        },
    ),
    Scenario(
        id="server.stoptls-outside-tls",
        title="STOPTLS in plaintext",
        role="server",
        rule=Rule.R3,
        reference="docs/rules.md (STOPTLS)",
        reason="There is no TLS to end; accepting it would confuse the state machine.",
        steps=(*_STARTTLS, S("command", fault=True, what="stoptls", refuse=True), S("quit")),
        expect={
            "completed": Expect(P, "refused STOPTLS outside TLS"),
            "closed": Expect(P, "closed the connection on STOPTLS outside TLS"),
            "accepted": Expect(W, "accepted STOPTLS outside TLS"),
        },
    ),
    Scenario(
        id="server.one-sided-close",
        title="close_notify and a plaintext command in one segment",
        role="server",
        rule=Rule.R4,
        reference="RFC 5246 §7.2.1; RFC 4511 §4.14.3",
        reason="Plaintext sent before the closure was answered is not from a closed TLS session.",
        steps=(*_UPGRADE, S("close-then-sentinel", fault=True), S("expect-close")),
        expect={
            **_GOODBYE,
            "closed": Expect(P, "refused plaintext that followed close_notify unanswered"),
            "plaintext-answered": Expect(F, "answered plaintext sent right after close_notify"),
        },
    ),
    Scenario(
        id="server.one-sided-close-stoptls",
        title="STOPTLS, then close_notify and plaintext in one segment",
        role="server",
        rule=Rule.R4,
        reference="docs/rules.md (STOPTLS); RFC 4511 §4.14.3",
        reason="Even after STOPTLS, plaintext may only follow the server's close_notify.",
        steps=(
            *_UPGRADE,
            S("require", cap="STOPTLS"),
            S("stoptls"),
            S("close-then-sentinel", fault=True),
            S("expect-close"),
        ),
        expect={
            **_GOODBYE,
            "closed": Expect(P, "refused plaintext that did not wait for its close_notify"),
            "plaintext-answered": Expect(F, "resumed plaintext on a one-sided closure"),
        },
    ),
    Scenario(
        id="server.plaintext-after-close",
        title="Bidirectional closure without STOPTLS, then plaintext",
        role="server",
        rule=Rule.R3,
        reference="RFC 3207 §4.2; RFC 8446 §6.1",
        reason="A protocol without a return to plaintext must close TCP after the closure.",
        steps=(
            *_UPGRADE,
            S("unwrap", fault=True, silence="probe"),
            S("plain-sentinel"),
            S("expect-close"),
        ),
        expect={
            **_GOODBYE,
            "closed": Expect(P, "closed the connection after the TLS closure"),
            "close-notify-not-answered": Expect(P, "closed the connection instead of resuming"),
            "plaintext-answered": Expect(F, "answered plaintext after TLS ended without STOPTLS"),
            **_SILENCE_ANSWERED,
            # R3 holds; the unanswered close_notify is server.close-notify-reply's business.
            "silent-then-closed": Expect(P, "closed the connection on plaintext after the closure"),
            "silent-open": Expect(P, "never answered plaintext after the closure"),
            "violation:R5": Expect(
                W, "sent TLS data after our close_notify instead of answering it (R5)"
            ),
        },
    ),
    Scenario(
        id="server.data-after-close-notify",
        title="After the client's close_notify the server sends nothing but its own",
        role="server",
        rule=Rule.R3,
        reference="RFC 8446 §6.1; RFC 5246 §7.2.1",
        reason="Plaintext written onto a connection that was in TLS is unprotected data.",
        steps=(*_UPGRADE, S("close-notify-only", fault=True), S("expect-silent-close")),
        expect={
            "closed": Expect(P, "closed without writing plaintext after the closure"),
            "plaintext-answered": Expect(F, "answered plaintext after the TLS closure"),
            **_SILENCE_ANSWERED,
            "silent-then-closed": Expect(P, "wrote no plaintext after the closure"),
            "silent-open": Expect(P, "wrote no plaintext after the closure"),
            # What it wrote is still protected: the answer it owed (R5) is
            # what is missing, decided at the first record, whatever follows.
            "violation:R5": Expect(
                W, "sent TLS data after our close_notify instead of answering it (R5)"
            ),
        },
    ),
    Scenario(
        id="server.truncation",
        title="TCP FIN in the middle of a message under TLS",
        role="server",
        rule=Rule.R6,
        reference="RFC 8446 §6.1; RFC 5321 §4.1.1.4",
        reason="A unit cut by a truncation must be discarded, never treated as complete.",
        steps=(*_UPGRADE, S("truncate-unit", fault=True), S("check-storage")),
        expect={
            "not-stored": Expect(P, "discarded the truncated message"),
            "stored-truncated": Expect(F, "stored a message cut by a truncation"),
            # Decided from the wire, with or without a storage probe.
            "plaintext-goodbye": Expect(
                F, "wrote plaintext onto the truncated TLS connection (R3)"
            ),
            "violation:R2": Expect(
                F, "wrote non-TLS bytes onto the truncated TLS connection (R2 on the wire)"
            ),
        },
    ),
    Scenario(
        id="server.alert-then-plaintext",
        title="A fatal alert followed by a plaintext command",
        role="server",
        rule=Rule.R7,
        reference="RFC 8446 §6.2; RFC 5246 §7.2.2",
        reason="Only close_notify ends TLS for a return to plaintext; an error alert ends it all.",
        steps=(*_UPGRADE, S("alert-then-sentinel", fault=True), S("expect-close")),
        expect={
            **_GOODBYE,
            "closed": Expect(P, "ended the connection after the alert"),
            "plaintext-answered": Expect(
                F, "took a fatal alert for a closure and resumed plaintext"
            ),
        },
    ),
    Scenario(
        id="server.close-notify-reply",
        title="STOPTLS closure: the server answers close_notify at once",
        role="server",
        rule=Rule.R5,
        reference="RFC 5246 §7.2.1; RFC 4511 §4.14.3; docs/rules.md (STOPTLS)",
        reason="The responder must answer with its own close_notify before anything else.",
        steps=(
            *_UPGRADE,
            # With STOPTLS the closure leads back to plaintext; without it the
            # server must still answer close_notify before it closes TCP.
            S("stoptls", if_cap="STOPTLS"),
            S("unwrap", fault=True, silence="probe"),
            S("greeting", if_cap="STOPTLS"),
            S("quit"),
        ),
        expect={
            "completed": Expect(P, "answered close_notify at once"),
            "close-notify-not-answered": Expect(
                W, "closed TCP instead of answering close_notify (no data exposed)"
            ),
            **_SILENCE_ANSWERED,
            # Staying open and silent is no milder than closing TCP.
            "silent-then-closed": Expect(
                W, "never answered close_notify; closed on a plaintext probe (no data exposed)"
            ),
            "silent-open": Expect(
                W, "never answered close_notify and kept the connection open (no data exposed)"
            ),
            "violation:R5": Expect(
                W, "sent TLS data after our close_notify instead of answering it (R5)"
            ),
            "closed": Expect(W, "closed the connection instead of returning to plaintext"),
        },
    ),
    Scenario(
        id="server.stoptls-cycle",
        title="Positive control: three STARTTLS/STOPTLS cycles on one connection",
        role="server",
        rule=Rule.R3,
        reference="docs/rules.md (STOPTLS)",
        reason="The conforming path must work, or every refusal above means nothing.",
        steps=(
            *_UPGRADE,
            S("require", cap="STOPTLS"),
            *(
                step
                for _ in range(3)
                for step in (
                    S("sentinel"),
                    S("stoptls"),
                    S("unwrap"),
                    S("greeting"),
                    S("hello"),
                    S("sentinel"),
                    S("starttls"),
                    S("handshake"),
                    S("hello"),
                )
            ),
            S("quit"),
        ),
        expect={
            "completed": Expect(P, "three STARTTLS/STOPTLS cycles worked"),
            "closed": Expect(F, "the conforming STOPTLS path broke"),
            "close-notify-not-answered": Expect(F, "the conforming STOPTLS path broke"),
        },
    ),
    Scenario(
        id="server.state-reset",
        title="Protocol state is reset at STARTTLS and at STOPTLS",
        role="server",
        rule=Rule.R8,
        reference="RFC 3207 §4.2; RFC 3501 §6.2.1; RFC 9051 §6.2.1",
        reason="Knowledge from one phase must never be trusted in the next.",
        steps=(
            S("connect"),
            S("state-control"),
            S("hello"),
            S("require", cap="STARTTLS"),
            S("starttls"),
            S("handshake"),
            S("state-probe", fault=True, after="starttls"),
            S("hello"),
            S("login", optional=True),
            S("stoptls", if_cap="STOPTLS"),
            S("unwrap", if_cap="STOPTLS"),
            S("greeting", if_cap="STOPTLS"),
            S("state-probe", after="stoptls", if_cap="STOPTLS"),
            S("quit"),
        ),
        expect={
            "completed": Expect(P, "required a new hello/login after each transition"),
            "state-kept": Expect(F, "kept session state across a TLS transition"),
            "close-notify-not-answered": Expect(
                W,
                "reset at STARTTLS; STOPTLS side unreachable (close_notify unanswered)",
            ),
            "closed": Expect(E, "the target closed the connection during the state check"),
            "no-hello-required": Expect(
                K, "the target accepts MAIL without any EHLO, so a reset cannot be observed"
            ),
            # Without a test user the login state cannot be observed: no pass.
            "no-credentials": Expect(
                K, "no test user (--user/--password): the login state cannot be checked"
            ),
        },
    ),
]

#: A one-sided closure by the client can only be staged where the client
#: closes first: a server that may end TLS first (FTP CCC) is left out.
_CLIENT_FIRST = dialects_with("has_return_to_plaintext", "!server_may_close_first")
CATALOGUE: Tuple[Scenario, ...] = tuple(
    replace(s, dialects=_CLIENT_FIRST) if s.id == "server.one-sided-close-stoptls" else s
    for s in needing_command_return(
        needing_return(_SERVER, ("server.one-sided-close-stoptls", "server.stoptls-cycle")),
        # On LDAP a bare closure is the return itself, and there is no command to refuse.
        (
            "server.plaintext-after-close",
            "server.data-after-close-notify",
            "server.stoptls-outside-tls",
        ),
    )
)


def by_id(scenario_id: str) -> Scenario:
    for s in CATALOGUE:
        if s.id == scenario_id:
            return s
    raise KeyError(scenario_id)


def select(
    patterns: Optional[List[str]] = None,
    *,
    role: Optional[str] = None,
    dialect: Optional[str] = None,
    catalogue: Sequence[Scenario] = CATALOGUE,
) -> List[Scenario]:
    """Scenarios whose id matches any glob in ``patterns`` (all if None)."""
    return select_from(patterns, role=role, dialect=dialect, catalogue=catalogue)
