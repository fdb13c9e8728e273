"""The on-path part of the conformance catalogue, as data.

Here the harness is neither peer: it is the proxy of :mod:`starttls_harness.proxy`
between a client and a server, both under test, and it plays the attacker
who owns the wire.  A scenario is the client's session (the steps, run by
a :class:`starttls_harness.run.path.ClientDriver`) with one step that arms a fault:
a :class:`starttls_harness.proxy.Fault` in the step's arguments.  The *receiver* of
the fault -- the server for ``c2s``, the client for ``s2c`` -- is the side
whose reaction decides the verdict (principle 5: scenarios are data).

Step actions (the client's verbs; see ``starttls_harness.run.path``):

``connect``     connect through the proxy, read the greeting, say hello
``starttls``    STARTTLS, handshake, hello again (R8)
``command``     one harmless command (NOOP) in the current phase
``stoptls``     STOPTLS, the bidirectional closure, the new greeting, hello
``send-unit``   a unit the client sends over several TLS records (SMTP: a
                DATA body; IMAP: an APPEND literal), the fault armed by the
                driver right before its records
``fetch-unit``  a reply the server sends over several TLS records (SMTP: the
                EHLO reply, one record per line; IMAP: a FETCH literal)
``quit``        QUIT / LOGOUT

Arguments of the fault step: ``direction``, ``at`` (a protocol point),
``op`` (the fault action), ``data`` (symbolic: ``command`` is the
dialect's injected command, ``greeting`` a fake greeting; see
:func:`fault_data`), ``same_segment``, ``before``; ``arm`` says when the
fault is armed: ``before`` the verb (the default; it then hits the first
matching unit) or by the driver (``verb``), which knows which record of its
unit to hit; ``judge`` names the decision rule:

``injection``
    After the harness wrote its bytes, the receiver must refuse: close the
    connection (``refused``) and never answer -- not in plaintext
    (``plaintext-answered``), not inside TLS (``answered-in-tls``); its own
    report, when it can give one, must not show the bytes accepted
    (``accepted``).
``upgrade``
    Plaintext injected at the upgrade (after the STARTTLS command or its
    answer) must never be interpreted (R1): a receiver that refuses --
    ends the connection, in plaintext or not, before it carries on under
    TLS -- passes (``refused``), and so does one that discards the bytes
    and carries on (``discarded``: the client's whole session completed).
    It fails when its own report shows the bytes taken in (``accepted``),
    when it answers them in plaintext and then goes on to TLS
    (``plaintext-answered``), or when the session breaks under TLS because
    of them: the server's answers fell out of step (``answered-in-tls``),
    or the client took the injected response as a reply and gave up after
    its first command under TLS (``injection-consumed``).
``truncation``
    After the harness sent FIN in the middle of a unit, the receiver must
    not resume plaintext (``plaintext-resumed``), must not treat the unit
    as complete (``stored-truncated`` for a server that stored it,
    ``unit-accepted`` for a client that took the cut reply) and reports a
    truncation, not a clean end (``truncation-not-reported``).  The
    ``path.reset-*`` twins send a TCP RST instead: nothing can follow it, so
    the RST itself ends the wait (``reset`` when the receiver's own report
    shows nothing wrong).

Outcomes shared by every path scenario: a rule the proxy saw either peer
break on the wire (unless the receiver's reaction is a fail already) is
``violation:Rn``, a fail; a closure the responder never answered, so that
the fault point never came, is ``close-notify-not-answered`` (a warn, as R5
is elsewhere); the labels of :data:`starttls_harness.scenarios.server.COMMON`
(``no-stoptls`` is a skip: the pair has no way back to plaintext).

Why plaintext is appended to the *client's* close_notify only: in a STOPTLS
closure the client speaks first, so bytes behind its close_notify were sent
before the answer could be seen (R4).  Bytes behind the server's answering
close_notify come after a complete closure and look exactly like the
server's own new greeting -- no client can refuse them, and none is asked
to.  The client's side of the same-segment trick is plaintext glued *in
front of* the server's close_notify (``path.inject-before-close-s2c``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Tuple

from starttls_harness.dialects import Dialect, dialects_with
from starttls_harness.report.verdicts import Verdict
from starttls_harness.scenarios.expectations import STOPTLS_SCENARIOS
from starttls_harness.scenarios.model import Expect, S, Scenario, Step, needing_return
from starttls_harness.tls.engine import Rule

__all__ = [
    "PATH_COMMON",
    "PATH_SCENARIOS",
    "fault_data",
    "fault_step",
    "path_by_id",
]

P, F, W, K = Verdict.PASS, Verdict.FAIL, Verdict.WARN, Verdict.SKIP


def fault_data(symbol: str, dialect: Dialect) -> bytes:
    """The bytes a symbolic ``data`` argument stands for in ``dialect``."""
    if symbol == "command":
        return dialect.injected()
    if symbol == "greeting":
        return dialect.fake_greeting()
    if symbol == "":
        return b""
    raise ValueError(f"unknown fault data {symbol!r}; use 'command' or 'greeting'")


def fault_step(scenario: Scenario) -> Step:
    """The one step of ``scenario`` that arms the fault."""
    steps = [s for s in scenario.steps if s.fault]
    if len(steps) != 1:
        raise ValueError(f"{scenario.id}: a path scenario has exactly one fault step")
    return steps[0]


#: Outcomes every path scenario shares (on top of starttls_harness.scenarios.server.COMMON).
PATH_COMMON: Dict[str, Expect] = {
    "close-notify-not-answered": Expect(
        W,
        "the responder closed TCP instead of answering close_notify (R5), so the fault point "
        "never came; nothing was exposed",
    ),
    "fault-not-armed": Expect(
        Verdict.ERROR, "the client driver never reached the point where the fault is armed"
    ),
}

_INJECTION: Dict[str, Expect] = {
    "accepted": Expect(F, "its TLS layer took the injected plaintext in (its own report)"),
    "answered-in-tls": Expect(F, "answered the injected plaintext inside TLS"),
}

_TRUNCATION: Dict[str, Expect] = {
    "truncation-reported": Expect(P, "reported the truncation and discarded the cut unit"),
    "closed": Expect(P, "closed without resuming plaintext (the unit's fate is not observable)"),
    "reset": Expect(P, "the connection was reset and the cut unit was not taken as complete"),
    "plaintext-resumed": Expect(F, "took the truncation for a closure and resumed plaintext"),
    "truncation-not-reported": Expect(F, "took the truncation for a clean end of the connection"),
}

_UPGRADE: Dict[str, Expect] = {
    "accepted": Expect(F, "its TLS layer took the injected plaintext in (its own report)"),
    "discarded": Expect(P, "discarded the injected plaintext and carried on under TLS"),
}

_SESSION = (S("connect"), S("starttls"), S("command"))
_AFTER = (S("command"), S("quit"))


def _with(*parts: Dict[str, Expect]) -> Dict[str, Expect]:
    out = dict(PATH_COMMON)
    for part in parts:
        out.update(part)
    return out


_PATH = [
    Scenario(
        id="path.drop-close-notify-c2s",
        title="The client's close_notify is dropped; plaintext is injected to the server",
        role="path",
        rule=Rule.R3,
        reference="RFC 5246 §7.2.1; RFC 8446 §6.1; RFC 4511 §4.14.3; docs/rules.md (STOPTLS)",
        reason=(
            "Without the client's close_notify the server is still in TLS: plaintext that "
            "looks like the client's resumption is the attacker's."
        ),
        steps=(
            *_SESSION,
            S(
                "stoptls",
                fault=True,
                direction="c2s",
                at="close-notify",
                op="drop",
                data="command",
                judge="injection",
            ),
            *_AFTER,
        ),
        expect=_with(
            _INJECTION,
            {
                "refused": Expect(P, "the server closed without answering the injected command"),
                "plaintext-answered": Expect(
                    F, "the server answered plaintext injected in place of the client's closure"
                ),
            },
        ),
    ),
    Scenario(
        id="path.drop-close-notify-s2c",
        title="The server's close_notify is dropped; a fake greeting is injected to the client",
        role="path",
        rule=Rule.R3,
        reference="RFC 5246 §7.2.1; RFC 8446 §6.1; RFC 4511 §4.14.3; docs/rules.md (STOPTLS)",
        reason=(
            "A client that resumes at the first plaintext after its own close_notify takes "
            "the attacker's greeting for the server's."
        ),
        steps=(
            *_SESSION,
            S(
                "stoptls",
                fault=True,
                direction="s2c",
                at="close-notify",
                op="drop",
                data="greeting",
                judge="injection",
            ),
            *_AFTER,
        ),
        expect=_with(
            _INJECTION,
            {
                "refused": Expect(P, "the client closed instead of resuming on a fake greeting"),
                "plaintext-answered": Expect(
                    F, "the client resumed plaintext on a greeting not preceded by close_notify"
                ),
            },
        ),
    ),
    Scenario(
        id="path.inject-after-close",
        title="Plaintext appended to the client's close_notify in one segment",
        role="path",
        rule=Rule.R4,
        reference="RFC 5246 §7.2.1; RFC 4511 §4.14.3; docs/rules.md (STOPTLS)",
        reason=(
            "Bytes behind the first close_notify were sent before its answer could be seen: "
            "a one-sided closure, never the peer's resumption."
        ),
        steps=(
            *_SESSION,
            S(
                "stoptls",
                fault=True,
                direction="c2s",
                at="close-notify",
                op="inject",
                data="command",
                same_segment=True,
                judge="injection",
            ),
            *_AFTER,
        ),
        expect=_with(
            _INJECTION,
            {
                "refused": Expect(P, "the server refused plaintext glued to the close_notify"),
                "plaintext-answered": Expect(
                    F, "the server resumed plaintext on a one-sided closure"
                ),
            },
        ),
    ),
    Scenario(
        id="path.inject-before-close-s2c",
        title="Plaintext glued in front of the server's close_notify in one segment",
        role="path",
        rule=Rule.R3,
        reference="RFC 5246 §7.2.1; RFC 8446 §6.1; docs/rules.md (STOPTLS)",
        reason=(
            "The client's direction of R4: after its close_notify, plaintext that precedes "
            "the server's close_notify is not the server's, even in the same segment."
        ),
        steps=(
            *_SESSION,
            S(
                "stoptls",
                fault=True,
                direction="s2c",
                at="close-notify",
                op="inject",
                data="greeting",
                same_segment=True,
                before=True,
                judge="injection",
            ),
            *_AFTER,
        ),
        expect=_with(
            _INJECTION,
            {
                "refused": Expect(P, "the client refused plaintext ahead of the close_notify"),
                "plaintext-answered": Expect(
                    F, "the client resumed plaintext on bytes that preceded close_notify"
                ),
            },
        ),
    ),
    Scenario(
        id="path.inject-in-tls-c2s",
        title="Plaintext injected to the server while TLS is up",
        role="path",
        rule=Rule.R2,
        reference="RFC 8446 §5.1; RFC 5246 §6.2; docs/rules.md R2",
        reason="Bytes that are not TLS records inside TLS must end the connection unanswered.",
        steps=(
            S("connect"),
            S(
                "starttls",
                fault=True,
                direction="c2s",
                at="handshake-done",
                op="inject",
                data="command",
                same_segment=False,
                before=True,
                judge="injection",
            ),
            S("command"),
            S("quit"),
        ),
        expect=_with(
            _INJECTION,
            {
                "refused": Expect(P, "the server closed on plaintext inside TLS"),
                "plaintext-answered": Expect(
                    F, "the server answered plaintext inside TLS in plaintext"
                ),
            },
        ),
    ),
    Scenario(
        id="path.inject-in-tls-s2c",
        title="A plaintext reply injected to the client while TLS is up",
        role="path",
        rule=Rule.R2,
        reference="RFC 8446 §5.1; RFC 5246 §6.2; GHSA-vxj7-4xrp-5vr4",
        reason="A reply that did not come through TLS must never be read as the server's.",
        steps=(
            S("connect"),
            S(
                "starttls",
                fault=True,
                direction="s2c",
                at="handshake-done",
                op="inject",
                data="greeting",
                same_segment=False,
                before=True,
                judge="injection",
            ),
            S("command"),
            S("quit"),
        ),
        expect=_with(
            _INJECTION,
            {
                "refused": Expect(P, "the client closed on plaintext inside TLS"),
                "plaintext-answered": Expect(F, "the client went back to plaintext on it"),
            },
        ),
    ),
    Scenario(
        id="path.truncate-c2s",
        title="FIN to the server in the middle of a unit under TLS",
        role="path",
        rule=Rule.R6,
        reference="RFC 8446 §6.1; RFC 5246 §7.2.1; RFC 5321 §4.1.1.4; RFC 3501 §4.3",
        reason=(
            "A cut DATA body or APPEND literal must be discarded, and a cut TLS stream "
            "is no closure to resume plaintext after."
        ),
        steps=(
            *_SESSION,
            S(
                "send-unit",
                fault=True,
                direction="c2s",
                at="application-data",
                op="fin",
                arm="verb",
                judge="truncation",
            ),
            S("quit"),
        ),
        expect=_with(
            _TRUNCATION,
            {"stored-truncated": Expect(F, "the server stored a unit cut by a truncation")},
        ),
    ),
    Scenario(
        id="path.truncate-s2c",
        title="FIN to the client in the middle of a reply under TLS",
        role="path",
        rule=Rule.R6,
        reference="RFC 8446 §6.1; RFC 5246 §7.2.1; GHSA-vxj7-4xrp-5vr4",
        reason="A reply cut by a truncation must not be taken as complete by the client.",
        steps=(
            *_SESSION,
            S(
                "fetch-unit",
                fault=True,
                direction="s2c",
                at="application-data",
                op="fin",
                arm="verb",
                judge="truncation",
            ),
            S("quit"),
        ),
        expect=_with(
            _TRUNCATION,
            {"unit-accepted": Expect(F, "the client took a reply cut by a truncation as complete")},
        ),
    ),
]


def _reset_scenario(direction: str) -> Scenario:
    """As ``path.truncate-*``, with a TCP RST where the FIN was."""
    to_server = direction == "c2s"
    verb = "send-unit" if to_server else "fetch-unit"
    if to_server:
        title = "RST to the server in the middle of a unit under TLS"
        outcome = {"stored-truncated": Expect(F, "the server stored a unit cut by a TCP reset")}
        reference = "RFC 8446 §6.1; RFC 5246 §7.2.1; RFC 5321 §4.1.1.4; RFC 3501 §4.3"
    else:
        title = "RST to the client in the middle of a reply under TLS"
        outcome = {"unit-accepted": Expect(F, "the client took a reply cut by a TCP reset")}
        reference = "RFC 8446 §6.1; RFC 5246 §7.2.1; GHSA-vxj7-4xrp-5vr4"
    return Scenario(
        id=f"path.reset-{direction}",
        title=title,
        role="path",
        rule=Rule.R6,
        reference=reference,
        reason="A reset is no closure either: the unit it cuts is incomplete.",
        steps=(
            *_SESSION,
            S(
                verb,
                fault=True,
                direction=direction,
                at="application-data",
                op="rst",
                arm="verb",
                judge="truncation",
            ),
            S("quit"),
        ),
        expect=_with(_TRUNCATION, outcome),
    )


def _upgrade_scenario(direction: str, split: bool) -> Scenario:
    """Plaintext injected at the upgrade, toward the server (``c2s``) or the client."""
    to_server = direction == "c2s"
    if to_server:
        # Same segment: behind the STARTTLS command.  Split: a segment of its
        # own just before the ClientHello (the server has answered STARTTLS).
        at, before = ("client-hello", True) if split else ("starttls-command", False)
        data = "command"
        outcomes = {
            "refused": Expect(P, "the server refused the plaintext pipelined after STARTTLS"),
            "plaintext-answered": Expect(
                F, "the server answered the injected command in plaintext, then started TLS"
            ),
            "answered-in-tls": Expect(
                F, "the server's answers under TLS fell out of step: it ran the injected command"
            ),
            "tls-unread": Expect(
                K,
                "the proxy cannot read the TLS data (no key log, or a suite it cannot decrypt): "
                "a session that completes does not show the injected command was not run",
            ),
        }
    else:
        # Same segment: behind the STARTTLS answer.  Split: a segment of its
        # own just before the ServerHello (the client has sent its ClientHello).
        at, before = ("server-hello", True) if split else ("starttls-reply", False)
        data = "greeting"
        outcomes = {
            "refused": Expect(P, "the client ended the upgrade on the injected response"),
            "plaintext-answered": Expect(
                F, "the client answered the injected response in plaintext, then started TLS"
            ),
            "injection-consumed": Expect(
                F, "the client took the injected response as a reply under TLS"
            ),
            "tls-unread": Expect(
                K,
                "the proxy cannot read the TLS data (no key log, or a suite it cannot decrypt), "
                "or the dialect lets the client pipeline: a session that completes does not "
                "show the injected response was discarded",
            ),
        }
    where = "in a segment of its own" if split else "in the same segment"
    if to_server:
        title = f"Plaintext command injected after STARTTLS, {where}"
        reference = "CVE-2011-0411; CVE-2024-34083; RFC 3207 §4.2; RFC 2595 §3.1"
        reason = "Bytes pipelined behind STARTTLS were never protected: never run them."
    else:
        title = f"Plaintext response injected after the STARTTLS answer, {where}"
        reference = "GHSA-vxj7-4xrp-5vr4; CVE-2021-38371; RFC 3207 §4.2; 'NO STARTTLS' (2021)"
        reason = "A response read before the handshake must never be taken as a TLS response."
    return Scenario(
        id=f"path.inject-after-starttls-{direction}" + ("-split" if split else ""),
        title=title,
        role="path",
        rule=Rule.R1,
        reference=reference,
        reason=reason,
        steps=(
            S("connect"),
            S(
                "starttls",
                fault=True,
                direction=direction,
                at=at,
                op="inject",
                data=data,
                same_segment=not split,
                before=before,
                judge="upgrade",
            ),
            S("command"),
            S("quit"),
        ),
        expect=_with(_UPGRADE, outcomes),
    )


_PATH.extend(
    _upgrade_scenario(direction, split) for direction in ("c2s", "s2c") for split in (False, True)
)
_PATH.extend(_reset_scenario(direction) for direction in ("c2s", "s2c"))

#: Plaintext behind the client's close_notify is a one-sided closure only where
#: the client closes first: where the server may (FTP CCC) it is a resumption.
_CLIENT_FIRST = dialects_with("has_return_to_plaintext", "!server_may_close_first")
PATH_SCENARIOS: Tuple[Scenario, ...] = tuple(
    replace(s, dialects=_CLIENT_FIRST) if s.id == "path.inject-after-close" else s
    for s in needing_return(_PATH, STOPTLS_SCENARIOS)
)


def path_by_id(scenario_id: str) -> Scenario:
    for s in PATH_SCENARIOS:
        if s.id == scenario_id:
            return s
    raise KeyError(scenario_id)
