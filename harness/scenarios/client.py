"""The client half of the conformance catalogue: the harness plays the server.

Scenarios are data, as in :mod:`starttls_harness.scenarios.server` (same :class:`Scenario`,
``S()`` steps and :class:`Expect` outcomes, ``role="client"``); their steps
are the verbs of :mod:`starttls_harness.run.client`.  Each run ends in one
observation label, decided from the client's *acts* -- its next command,
its close_notify, its close, its exit status -- never from silence.

Decision rules (label -> verdict; labels not listed fall back to
:data:`CLIENT_COMMON`, then to :data:`starttls_harness.scenarios.server.COMMON`):

``client.response-injection`` / ``-split`` (R1)
    A response is injected in plaintext after the STARTTLS answer (same
    segment / after the ClientHello, before the ServerHello).  SMTP injects
    ``554``: a client that read it takes it as the answer to its first
    command under TLS and gives up (QUIT, close, HELO or a retry right after
    it): ``injection-consumed`` = fail.  IMAP injects ``* CAPABILITY ...
    LOGINDISABLED`` completed with the client's next tag: a client that
    believed it never sends LOGIN.  ``aborted`` (the client ended the
    upgrade) and ``completed`` (it carried on under TLS) pass.
``client.response-injection-partial`` / ``-multi`` (R1)
    The same judgement for a response cut before its line end (glued to the
    first reply under TLS by a client that keeps its read buffer) and for
    several injected responses.  ``aborted`` means the client ended the
    upgrade without acting on the injection -- whether it never read the
    bytes or read them to detect the attack; both are safe.
``client.response-injection-capabilities`` / ``-tagged`` (R1)
    Forged replies of the dialect's own shape (``ScriptedServer.shaped_injection``):
    SMTP a capability list as the answer to EHLO (no AUTH, a marker); IMAP
    a tagged ``OK`` alone for the tag the client will use next.  A client
    that reads them takes them as our answer, so its replies fall out of
    step or it finds nothing it needs: the session it completes against the
    conforming server of the sanity probe breaks (``client-failed``, also
    when it stalls and then reports failure).  A completed session passes.
    The IMAP tag is predicted (a client numbering its tags uses the next
    number); where the STARTTLS tag has no number there is nothing to
    predict and the run is a skip.
``client.starttls-untagged`` (R8)
    Untagged ``* CAPABILITY ... LOGINDISABLED`` and ``* OK [ALERT]`` lines
    written *ahead of* the tagged STARTTLS answer (legal in plaintext; the
    Alpine CVE-2021-38370 shape): a client that keeps them after the upgrade
    never logs in and its session breaks (``client-failed``).
``client.starttls-stripped`` / ``-refused`` / ``-bad`` / ``-preauth`` (R9)
    STARTTLS is not advertised / answered ``454`` / ``NO`` / ``501`` /
    ``BAD`` / the IMAP greeting is ``PREAUTH``: AUTH, MAIL,
    RCPT, DATA, LOGIN, APPEND, SELECT... in plaintext fail
    (``sent-in-plaintext``); QUIT/LOGOUT or a close pass (``gave-up``).
``client.plaintext-in-tls`` (R2)
    The answer to the first command under TLS is written raw: another
    command afterwards fails (``plaintext-accepted``); a close or an alert
    passes (``refused``).
``client.one-sided-close`` (R4, server side)
    After the client's STOPTLS, answer + close_notify + plaintext greeting
    leave in one segment: a plaintext command afterwards fails
    (``resumed``); ending the connection passes (``refused``).
``client.stoptls-wait`` (R4, client side)
    A conforming STOPTLS closure: a client whose close_notify arrives glued
    to plaintext did not wait (``violation:R4``) and fails.
``client.truncation`` (R6)
    Half of the answer to the message (end of DATA / APPEND), then TCP FIN
    without close_notify: a client that reports failure passes
    (``reported``); one that reports success fails (``accepted``).
``client.close-notify-reply`` (R5)
    The server sends close_notify instead of an answer: the client's
    close_notify within ``ClientSettings.close_notify_bound`` passes
    (``answered``), a later one is a warn with the time it took
    (``answered-late``); a TCP close without it
    (``unanswered``) or another command first (``spoke-first``) is a warn.
``client.stoptls-cycle`` (positive control)
    A conforming server offering STOPTLS: the client makes its cycles (three
    when it can be asked) and completes its session (``completed``).
``client.state-reset`` (R8)
    The first command under TLS (and after STOPTLS) must be EHLO/HELO or
    CAPABILITY; anything else (AUTH/LOGIN relying on what the plaintext
    hello advertised, bait included) fails (``state-kept``).
"""

from __future__ import annotations

from typing import Dict, Tuple

from starttls_harness.dialects import dialects_with
from starttls_harness.report.verdicts import Verdict
from starttls_harness.scenarios.expectations import (
    CLIENT_EXPECTED,
    client_expected_by_dialect,
    expected_client_verdicts,
)
from starttls_harness.scenarios.model import (
    Expect,
    S,
    Scenario,
    Step,
    needing_command_return,
    needing_return,
)
from starttls_harness.tls.engine import Rule

__all__ = [
    "CLIENT_COMMON",
    "CLIENT_EXPECTED",
    "CLIENT_SANITY",
    "CLIENT_SCENARIOS",
    "REMOVAL_SCENARIOS",
    "SPEC_CLIENT_IDS",
    "client_by_id",
    "client_expected_by_dialect",
    "expected_client_verdicts",
]

P, F, W, K, E = Verdict.PASS, Verdict.FAIL, Verdict.WARN, Verdict.SKIP, Verdict.ERROR

#: The minimum ids of ``docs/rules.md``.
SPEC_CLIENT_IDS = frozenset(
    {
        "client.response-injection",
        "client.starttls-stripped",
        "client.starttls-refused",
        "client.plaintext-in-tls",
        "client.one-sided-close",
        "client.truncation",
        "client.close-notify-reply",
        "client.stoptls-cycle",
        "client.state-reset",
    }
)

#: Outcomes with the same meaning in every client scenario.
CLIENT_COMMON: Dict[str, Expect] = {
    "sent-in-plaintext": Expect(
        F, "sent credentials or mail in plaintext although TLS is required (R9)"
    ),
    "client-did-not-connect": Expect(E, "the client did not connect to the fake server"),
    "no-stoptls": Expect(K, "the client does not use STOPTLS (no return to plaintext)"),
    "client-failed": Expect(E, "the client's session failed where the scenario does not judge"),
    "closed": Expect(E, "the client ended the connection where the scenario cannot decide"),
    "too-few-cycles": Expect(F, "the client made fewer STOPTLS cycles than asked"),
    "harness-error": Expect(E, "the harness failed"),
}


def _expect(**specific: Expect) -> Dict[str, Expect]:
    merged = dict(CLIENT_COMMON)
    merged.update({k.replace("_", "-"): v for k, v in specific.items()})
    return merged


_UPGRADE: Tuple[Step, ...] = (
    S("greet"),
    S("serve", until="starttls"),
    S("accept-starttls"),
    S("handshake"),
)

_INJECTION = _expect(
    aborted=Expect(P, "ended the upgrade without acting on the injected response"),
    completed=Expect(P, "ignored the injected response and carried on under TLS"),
    injection_consumed=Expect(F, "acted on a response injected before the handshake"),
)

#: A forged reply the client could only have read before the handshake: its
#: session under TLS breaks (it gives up, or its replies fall out of step).
_FORGED = _expect(
    aborted=Expect(P, "ended the upgrade without acting on the injected response"),
    completed=Expect(P, "ignored the injected response and completed its session under TLS"),
    client_failed=Expect(F, "took the injected response as a reply under TLS (its session broke)"),
    shape_not_applicable=Expect(K, "the client's next tag cannot be predicted"),
)

_CLIENT: Tuple[Scenario, ...] = (
    Scenario(
        id="client.response-injection",
        title="Plaintext response injected in the same segment as the STARTTLS answer",
        role="client",
        rule=Rule.R1,
        reference="GHSA-vxj7-4xrp-5vr4; RFC 3207 §4.2; RFC 3501 §6.2.1; 'NO STARTTLS' (2021)",
        reason="A response read before the handshake must never be taken as a TLS response.",
        steps=(
            S("greet"),
            S("serve", until="starttls"),
            S("accept-starttls", fault=True, inject="same"),
            S("handshake"),
            S("judge-injection"),
        ),
        expect=_INJECTION,
    ),
    Scenario(
        id="client.response-injection-split",
        title="Plaintext response injected after the ClientHello, before the ServerHello",
        role="client",
        rule=Rule.R1,
        reference="RFC 3207 §4.2; RFC 8446 §5.1; 'NO STARTTLS' (2021)",
        reason="Injected plaintext may arrive in a later read, once the handshake has begun.",
        steps=(
            S("greet"),
            S("serve", until="starttls"),
            S("accept-starttls", fault=True, inject="after-hello"),
            S("handshake"),
            S("judge-injection"),
        ),
        expect=_INJECTION,
    ),
    Scenario(
        id="client.response-injection-partial",
        title="A plaintext response without its line end, to be glued to the first TLS reply",
        role="client",
        rule=Rule.R1,
        reference="RFC 3207 §4.2; RFC 3501 §6.2.1; 'NO STARTTLS' (2021)",
        reason="A read buffer kept across the upgrade joins injected bytes to a TLS reply.",
        steps=(
            S("greet"),
            S("serve", until="starttls"),
            S("accept-starttls", fault=True, inject="partial"),
            S("handshake"),
            S("judge-injection"),
        ),
        expect=_INJECTION,
    ),
    Scenario(
        id="client.response-injection-multi",
        title="Several plaintext responses injected with the STARTTLS answer",
        role="client",
        rule=Rule.R1,
        reference="RFC 3207 §4.2; RFC 3501 §6.2.1; 'NO STARTTLS' (2021)",
        reason="Every line read before the handshake must be discarded or refused, not one.",
        steps=(
            S("greet"),
            S("serve", until="starttls"),
            S("accept-starttls", fault=True, inject="multi"),
            S("handshake"),
            S("judge-injection"),
        ),
        expect=_INJECTION,
    ),
    Scenario(
        id="client.response-injection-capabilities",
        title="A forged capability list (EHLO answer) injected with the STARTTLS answer",
        role="client",
        rule=Rule.R1,
        reference="RFC 3207 §4.2; CVE-2021-38371; 'NO STARTTLS' (2021)",
        reason="Capabilities read before the handshake are the attacker's, not the server's.",
        dialects=dialects_with("has_capability_list_reply"),
        steps=(
            S("greet"),
            S("serve", until="starttls"),
            S("accept-starttls", fault=True, inject="capabilities"),
            S("handshake"),
            S("serve", until="end"),
        ),
        expect=_FORGED,
    ),
    Scenario(
        id="client.response-injection-tagged",
        title="A tagged OK for the client's next command injected with the STARTTLS answer",
        role="client",
        rule=Rule.R1,
        reference="RFC 9051 §6.2.1; RFC 3501 §6.2.1; 'NO STARTTLS' (2021)",
        reason="A completion read before the handshake answers a command not yet sent.",
        dialects=dialects_with("has_tagged_replies"),
        steps=(
            S("greet"),
            S("serve", until="starttls"),
            S("accept-starttls", fault=True, inject="tagged"),
            S("handshake"),
            S("serve", until="end"),
        ),
        expect=_FORGED,
    ),
    Scenario(
        id="client.starttls-untagged",
        title="Untagged responses ahead of the STARTTLS answer (capabilities, an ALERT)",
        role="client",
        rule=Rule.R8,
        reference="CVE-2021-38370; RFC 9051 §6.2.1; 'NO STARTTLS' (2021)",
        reason="What the plaintext phase said, untagged or not, is forgotten at the upgrade.",
        dialects=dialects_with("has_tagged_replies"),
        steps=(
            S("greet"),
            S("serve", until="starttls"),
            S("accept-starttls", fault=True, inject="untagged-before-answer", before_answer=True),
            S("handshake"),
            S("serve", until="end"),
        ),
        expect=_expect(
            aborted=Expect(P, "ended the upgrade on the untagged responses"),
            completed=Expect(P, "forgot the untagged responses at the upgrade"),
            client_failed=Expect(
                F, "kept what untagged responses before the upgrade said (its session broke)"
            ),
        ),
    ),
    Scenario(
        id="client.starttls-stripped",
        title="STARTTLS not advertised (stripped by an attacker)",
        role="client",
        rule=Rule.R9,
        reference="RFC 3207 §4; RFC 8314 §3; 'NO STARTTLS' (2021)",
        reason="A client that requires TLS must not fall back to plaintext.",
        steps=(S("greet"), S("watch-plaintext", fault=True, starttls=False)),
        expect=_expect(gave_up=Expect(P, "gave up without sending credentials or mail")),
    ),
    Scenario(
        id="client.starttls-required-stripped",
        title="STARTTLS offered without the mark that it is mandatory (XMPP <required/>)",
        role="client",
        rule=Rule.R9,
        reference="RFC 6120 §5.3.1, §5.4.1; CVE-2016-10027 (Smack)",
        reason="A client that requires TLS upgrades whether or not the server says it must.",
        dialects=dialects_with("marks_starttls_required"),
        steps=(S("greet"), S("serve", until="end", fault=True, required=False)),
        expect=_expect(completed=Expect(P, "upgraded although STARTTLS was not marked required")),
    ),
    Scenario(
        id="client.starttls-refused",
        title="STARTTLS answered 454 / NO",
        role="client",
        rule=Rule.R9,
        reference="RFC 3207 §4; RFC 3501 §6.2.1; RFC 8314 §3",
        reason="A refused upgrade is no licence to carry on in plaintext.",
        steps=(
            S("greet"),
            S("serve", until="starttls"),
            S("refuse-starttls", fault=True),
            S("watch-plaintext", starttls=True),
        ),
        expect=_expect(gave_up=Expect(P, "gave up without sending credentials or mail")),
    ),
    Scenario(
        id="client.starttls-bad",
        title="STARTTLS answered as a bad command (SMTP 501 / IMAP BAD)",
        role="client",
        rule=Rule.R9,
        reference="RFC 3207 §4; RFC 9051 §7.1.3; RFC 8314 §3",
        reason="A rejected STARTTLS is no licence to carry on in plaintext either.",
        steps=(
            S("greet"),
            S("serve", until="starttls"),
            S("refuse-starttls", fault=True, how="bad"),
            S("watch-plaintext", starttls=True),
        ),
        expect=_expect(gave_up=Expect(P, "gave up without sending credentials or mail")),
    ),
    Scenario(
        id="client.starttls-preauth",
        title="The greeting says PREAUTH: the session is authenticated without TLS",
        role="client",
        rule=Rule.R9,
        reference="RFC 9051 §7.1.4; RFC 8314 §3; 'NO STARTTLS' (2021)",
        reason="PREAUTH forbids STARTTLS: a client that requires TLS must not go on.",
        dialects=dialects_with("has_preauth"),
        steps=(S("greet", fault=True, preauth=True), S("watch-plaintext", starttls=False)),
        expect=_expect(gave_up=Expect(P, "gave up on a pre-authenticated plaintext session")),
    ),
    Scenario(
        id="client.plaintext-in-tls",
        title="A plaintext reply written raw while TLS is up",
        role="client",
        rule=Rule.R2,
        reference="RFC 8446 §5.1; RFC 5246 §6.2",
        reason="Bytes that are not TLS records must end the connection, never be read as a reply.",
        steps=(
            *_UPGRADE,
            S("serve", until="tls-first"),
            S("raw-reply", fault=True),
            S("expect-abort"),
        ),
        expect=_expect(
            refused=Expect(P, "ended the connection on plaintext inside TLS"),
            plaintext_accepted=Expect(F, "took a plaintext reply inside TLS and carried on"),
        ),
    ),
    Scenario(
        id="client.one-sided-close",
        title="STOPTLS answered with close_notify and the plaintext greeting in one segment",
        role="client",
        rule=Rule.R4,
        reference="RFC 5246 §7.2.1; RFC 4511 §4.14.3; docs/rules.md (STOPTLS)",
        reason="Plaintext that did not wait for the client's close_notify is not from the server.",
        steps=(
            *_UPGRADE,
            S("serve", until="stoptls", stoptls=True, otherwise="no-stoptls"),
            S("one-sided-stoptls", fault=True),
            S("expect-no-resume"),
        ),
        expect=_expect(
            refused=Expect(P, "did not resume plaintext after a one-sided closure"),
            resumed=Expect(F, "resumed plaintext although the server did not wait"),
            ignored_closure=Expect(W, "kept sending under TLS after the server's close_notify"),
        ),
    ),
    Scenario(
        id="client.stoptls-wait",
        title="The client's STOPTLS closure waits for the server's close_notify",
        role="client",
        rule=Rule.R4,
        reference="RFC 5246 §7.2.1; RFC 4511 §4.14.3; docs/rules.md (STOPTLS)",
        reason="The initiator of the closure sends nothing until the peer's close_notify.",
        steps=(
            *_UPGRADE,
            S("serve", until="stoptls", stoptls=True, otherwise="no-stoptls"),
            S("accept-stoptls", fault=True),
            S("serve", until="end", stoptls=True),
        ),
        expect=_expect(
            completed=Expect(P, "waited for the server's close_notify before plaintext"),
            client_failed=Expect(F, "the conforming STOPTLS path broke"),
            closed=Expect(F, "the conforming STOPTLS path broke"),
        ),
    ),
    Scenario(
        id="client.truncation",
        title="TCP FIN without close_notify in the middle of the answer to a message",
        role="client",
        rule=Rule.R6,
        reference="RFC 8446 §6.1; RFC 5246 §7.2.1; RFC 5321 §4.1.1.4",
        reason="A reply cut by a truncation is not a reply; the client must report it.",
        steps=(
            *_UPGRADE,
            S("serve", until="message", otherwise="no-message"),
            S("truncate-reply", fault=True),
            S("client-outcome"),
        ),
        expect=_expect(
            reported=Expect(P, "reported the truncated session as a failure"),
            accepted=Expect(F, "took a reply cut by a truncation as complete"),
            no_message=Expect(K, "the client sent no message, so no answer could be cut"),
        ),
    ),
    Scenario(
        id="client.close-notify-reply",
        title="The server sends close_notify first; the client answers at once",
        role="client",
        rule=Rule.R5,
        reference="RFC 5246 §7.2.1; RFC 4511 §4.14.3; RFC 8446 §6.1",
        reason="The responder must answer close_notify with its own before anything else.",
        steps=(
            *_UPGRADE,
            S("serve", until="tls-after-hello"),
            S("close-notify", fault=True),
            S("expect-close-notify"),
        ),
        expect=_expect(
            answered=Expect(P, "answered close_notify at once"),
            answered_late=Expect(W, "answered close_notify, but not at once"),
            unanswered=Expect(W, "closed TCP instead of answering close_notify (no data exposed)"),
            spoke_first=Expect(W, "sent another command before answering close_notify"),
        ),
    ),
    Scenario(
        id="client.stoptls-cycle",
        title="Positive control: STARTTLS/STOPTLS cycles against a conforming server",
        role="client",
        rule=Rule.R3,
        reference="docs/rules.md (STOPTLS)",
        reason="The conforming path must work, or every refusal above means nothing.",
        steps=(*_UPGRADE, S("serve", until="end", stoptls=True, cycles=3)),
        expect=_expect(
            completed=Expect(P, "made its STOPTLS cycles and completed the session"),
            client_failed=Expect(F, "the conforming STOPTLS path broke"),
            closed=Expect(F, "the conforming STOPTLS path broke"),
        ),
    ),
    Scenario(
        id="client.state-reset",
        title="The client forgets the plaintext capabilities at STARTTLS and at STOPTLS",
        role="client",
        rule=Rule.R8,
        reference="RFC 3207 §4.2; RFC 3501 §6.2.1; RFC 9051 §6.2.1",
        reason="Knowledge from one phase must never be trusted in the next.",
        # Judged by the first command after a transition: only where that must be a hello.
        dialects=dialects_with("rereads_capabilities"),
        steps=(
            *_UPGRADE,
            S("expect-hello", fault=True, after="starttls", stoptls=True),
            S("serve", until="stoptls", stoptls=True, otherwise="completed"),
            S("accept-stoptls"),
            S("expect-hello", after="stoptls"),
            S("serve", until="end", stoptls=True),
        ),
        expect=_expect(
            completed=Expect(P, "asked for the capabilities again after every transition"),
            state_kept=Expect(F, "relied on capabilities learned before a TLS transition"),
            closed_before_check=Expect(E, "the client ended the session before the check"),
        ),
    ),
)


#: The server starts the return to plaintext (LDAP's removal of the TLS
#: layer, RFC 4511 §4.14.3: either peer may): only where a bare closure is
#: the return, i.e. no command asks for it.
_REMOVAL_DIALECTS = dialects_with("return_by_closure")
_REMOVAL_START = (*_UPGRADE, S("serve", until="tls-after-hello", stoptls=True))

_REMOVAL: Tuple[Scenario, ...] = (
    Scenario(
        id="client.removal-by-server",
        title="Positive control: the server removes the TLS layer, the client answers at once",
        role="client",
        rule=Rule.R5,
        reference="RFC 4511 §4.14.3; RFC 5246 §7.2.1",
        reason="Either peer may remove the TLS layer; the other MUST answer its closure at once.",
        dialects=_REMOVAL_DIALECTS,
        steps=(*_REMOVAL_START, S("server-removal", fault=True), S("serve", until="end")),
        expect=_expect(
            completed=Expect(P, "answered the server's removal, started TLS again, completed"),
            # RFC 4511 §4.14.3: peers MAY end the session after the closure alerts.
            ended_after_removal=Expect(P, "answered the server's removal, then ended the session"),
            client_failed=Expect(F, "started TLS again after the removal, then its session broke"),
            closed=Expect(W, "closed TCP instead of answering the server's close_notify (R5)"),
        ),
    ),
    Scenario(
        id="client.removal-one-sided",
        title="The server's close_notify and a plaintext response in one segment",
        role="client",
        rule=Rule.R4,
        reference="RFC 4511 §4.14.3; RFC 5246 §7.2.1",
        reason="Plaintext that did not wait for the client's closure alert is not the server's.",
        dialects=_REMOVAL_DIALECTS,
        steps=(
            *_REMOVAL_START,
            S("server-removal", fault=True, one_sided=True),
            S("expect-no-resume"),
        ),
        expect=_expect(
            refused=Expect(P, "did not resume plaintext after a one-sided removal"),
            resumed=Expect(F, "resumed plaintext although the server did not wait"),
            ignored_closure=Expect(W, "kept sending under TLS after the server's close_notify"),
        ),
    ),
)

#: The ids of the server-started removal scenarios (only where ``return_by_closure``).
REMOVAL_SCENARIOS = tuple(s.id for s in _REMOVAL)

CLIENT_SCENARIOS: Tuple[Scenario, ...] = (
    needing_command_return(
        needing_return(
            _CLIENT, ("client.one-sided-close", "client.stoptls-wait", "client.stoptls-cycle")
        ),
        # Staged on the answer to a STOPTLS command: client.removal-one-sided instead.
        ("client.one-sided-close",),
    )
    + _REMOVAL
)


#: The sanity probe that brackets every client target x TLS version: the
#: client must complete a normal session against the conforming fake server.
CLIENT_SANITY = Scenario(
    id="client.sanity",
    title="sanity probe: a normal STARTTLS session",
    role="client",
    rule=Rule.R1,
    reference="",
    reason="A client that cannot complete the conforming path makes every refusal meaningless.",
    steps=(
        S("greet"),
        S("serve", until="starttls"),
        S("accept-starttls", fault=True),
        S("handshake"),
        S("serve", until="end"),
    ),
    expect=_expect(completed=Expect(P, "the client completed a normal session")),
)


def client_by_id(scenario_id: str) -> Scenario:
    for s in CLIENT_SCENARIOS:
        if s.id == scenario_id:
            return s
    raise KeyError(scenario_id)


#: The client role's sanity probe (not in the catalogue).
CLIENT_SANITY = Scenario(
    id="client.sanity",
    title="sanity probe: a normal STARTTLS session",
    role="client",
    rule=Rule.R1,
    reference="",
    reason="A client that cannot complete the conforming path makes every refusal meaningless.",
    steps=(
        Step("greet"),
        Step("serve", {"until": "starttls"}),
        Step("accept-starttls", fault=True),
        Step("handshake"),
        Step("serve", {"until": "end"}),
    ),
    expect={
        **CLIENT_COMMON,
        "completed": Expect(Verdict.PASS, "the client completed a normal session"),
    },
)
