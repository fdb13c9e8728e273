"""The validation matrices of all three roles: what the catalogue must say of each reference peer.

Like tlsfuzzer's expectation files, every entry is an *exact* expectation:
the strict peers must pass every scenario, and each misbehaving peer must
get exactly the listed non-pass verdicts -- a scenario that unexpectedly
passes is as much a failure of the harness as one that unexpectedly fails.
Each entry's first line is the scenario that guards the broken rule.

Where one dialect's reference client differs, the dialect module says so
(``Dialect.reference_client_expected``); this module holds no per-dialect
table.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

from starttls_harness.dialects import DIALECTS, dialect_named
from starttls_harness.report.verdicts import Result, Verdict

__all__ = [
    "CLIENT_EXPECTED",
    "PATH_EXPECTED",
    "SERVER_EXPECTED",
    "STOPTLS_SCENARIOS",
    "client_expected_by_dialect",
    "expected_client_verdicts",
    "expected_path_verdicts",
    "expected_server_verdicts",
    "mismatches",
]

F, W, K = Verdict.FAIL, Verdict.WARN, Verdict.SKIP


def mismatches(results: Sequence[Result], expected: Mapping[str, Verdict]) -> List[str]:
    """Every result whose verdict differs from the expectation, explained."""
    problems = []
    for r in results:
        want = expected.get(r.id, Verdict.PASS)
        if r.verdict is not want:
            problems.append(
                f"{r.id} [{r.dialect}, TLS {r.tls_version}]: expected {want.value}, "
                f"got {r.verdict.value} ({r.summary})"
            )
    return problems


# ------------------------------------------------------------ server role

_STOPTLS_BROKEN = {
    "server.close-notify-reply": F,
    "server.stoptls-cycle": F,
    "server.one-sided-close-stoptls": F,
    "server.state-reset": F,
}

#: behaviour -> {scenario id: verdict}; every scenario not listed must pass.
SERVER_EXPECTED: Dict[str, Dict[str, Verdict]] = {
    "strict": {},
    # R1: the injected commands are executed inside TLS.
    "keep-buffer": {
        "server.command-injection": F,
        "server.command-injection-split": F,
        "server.command-injection-multi": F,
    },
    # R2: plaintext inside TLS is answered.
    "plaintext-in-tls": {"server.plaintext-in-tls": F},
    # R3: after STOPTLS the server's greeting does not wait for our
    # close_notify; every STOPTLS path sees plaintext too early.
    "early-plaintext": dict(_STOPTLS_BROKEN),
    # R4: plaintext glued to the client's close_notify is accepted.
    "one-sided-resume": {"server.one-sided-close-stoptls": F},
    # R5: close_notify unanswered (TCP closed instead): a warn where only
    # the answer is at stake, a fail where STOPTLS cannot work without it.
    "no-close-notify-reply": {
        "server.close-notify-reply": W,
        "server.stoptls-cycle": F,
        "server.state-reset": W,
    },
    # R6: a message cut by a truncation is stored.
    "ignore-truncation": {"server.truncation": F},
    # R7: a fatal alert is taken for a closure.
    "alert-as-close": {"server.alert-then-plaintext": F},
    # R8: EHLO/login state survives a TLS transition.
    "no-state-reset": {"server.state-reset": F},
    # R3: a bare closure (no STOPTLS) returns to plaintext with a greeting.
    "resume-without-stoptls": {
        "server.plaintext-after-close": F,
        "server.data-after-close-notify": F,
    },
    # R4: plaintext glued to a bare close_notify is answered (the bare
    # closure returns to plaintext, so the closure scenarios see it too).
    "one-sided-bare-resume": {
        "server.one-sided-close": F,
        "server.one-sided-close-stoptls": F,
        "server.plaintext-after-close": F,
        "server.data-after-close-notify": F,
    },
    # R8: a second STARTTLS inside TLS is accepted (nested TLS: a warn).
    "accept-starttls-in-tls": {"server.starttls-in-tls": W},
    # R3: a plaintext goodbye written after the bare closure.
    "plaintext-goodbye": {
        "server.plaintext-after-close": F,
        "server.data-after-close-notify": F,
        "server.truncation": F,
    },
    # R3: STOPTLS accepted where there is no TLS to end.
    "accept-stoptls-in-plaintext": {"server.stoptls-outside-tls": W},
}

# ------------------------------------------------------------ client role

_STOPTLS_INITIATOR_BROKEN = {
    "client.stoptls-wait": F,
    "client.stoptls-cycle": F,
    # The STOPTLS half of the state check sees the same R4 violation.
    "client.state-reset": F,
}

#: behaviour -> {scenario id: verdict}; every scenario not listed must pass.
CLIENT_EXPECTED: Dict[str, Dict[str, Verdict]] = {
    "strict": {},
    # R1: the injected response is read as the first TLS response.
    "accept-injected-response": {
        "client.response-injection": F,
        "client.response-injection-partial": F,
        "client.response-injection-multi": F,
        "client.response-injection-capabilities": F,
    },
    # R2: the raw plaintext reply is taken and the session goes on.
    "plaintext-in-tls": {"client.plaintext-in-tls": F},
    # R4: close_notify and the next plaintext command leave together.
    "one-sided-close": dict(_STOPTLS_INITIATOR_BROKEN),
    # R5: close_notify unanswered, TCP closed instead (no data exposed).
    "no-close-notify-reply": {"client.close-notify-reply": W},
    # R6 (a client that has the behaviour): the cut answer is completed and
    # the message counts as sent.
    "ignore-truncation": {"client.truncation": F},
    # R8: AUTH/LOGIN straight after the handshake, on plaintext knowledge.
    # It never re-reads the TLS capabilities, so it never learns of STOPTLS:
    # the STOPTLS scenarios cannot be applied to it.
    "no-state-reset": {
        "client.state-reset": F,
        # IMAP: the capabilities of the untagged lines ahead of the STARTTLS answer.
        "client.starttls-untagged": F,
        "client.one-sided-close": K,
        "client.stoptls-wait": K,
        "client.stoptls-cycle": K,
    },
    # R9: AUTH/LOGIN in plaintext when STARTTLS is missing or refused.
    "downgrade": {
        "client.starttls-stripped": F,
        "client.starttls-refused": F,
        "client.starttls-bad": F,
        "client.starttls-preauth": F,
    },
}


def expected_server_verdicts(dialect: str, behaviour: str) -> Mapping[str, Verdict]:
    """The exact non-pass verdicts expected of one reference server."""
    specific = dialect_named(dialect).reference_server_expected.get(behaviour)
    if specific is not None:
        return specific
    return SERVER_EXPECTED[behaviour]


def client_expected_by_dialect() -> Dict[Tuple[str, str], Mapping[str, Verdict]]:
    """(dialect, behaviour) -> where that dialect's reference client differs."""
    return {
        (d.name, behaviour): verdicts
        for d in DIALECTS.values()
        for behaviour, verdicts in d.reference_client_expected.items()
    }


def expected_client_verdicts(dialect: str, behaviour: str) -> Mapping[str, Verdict]:
    """The exact non-pass verdicts expected of one reference client."""
    specific = dialect_named(dialect).reference_client_expected.get(behaviour)
    if specific is not None:
        return specific
    return CLIENT_EXPECTED[behaviour]


# -------------------------------------------------------------- path role

#: The path scenarios that need the return to plaintext (STOPTLS).
STOPTLS_SCENARIOS = (
    "path.drop-close-notify-c2s",
    "path.drop-close-notify-s2c",
    "path.inject-after-close",
    "path.inject-before-close-s2c",
)


def _all(verdict: Verdict) -> Dict[str, Verdict]:
    return {sid: verdict for sid in STOPTLS_SCENARIOS}


#: (side, behaviour) -> {scenario id: verdict}, the other side strict; every
#: path scenario not listed must pass.  Behaviours whose rule no path
#: scenario exercises (R1, R7, R8 on the server; R1, R5, R9 on the client)
#: pass everything.
PATH_EXPECTED: Dict[Tuple[str, str], Dict[str, Verdict]] = {
    ("server", "strict"): {},
    ("client", "strict"): {},
    # R2: the injected plaintext is taken in as TLS data (and answered).
    ("server", "plaintext-in-tls"): {
        "path.inject-in-tls-c2s": F,
        "path.drop-close-notify-c2s": F,
    },
    # R3: close_notify and the plaintext greeting leave before the client's
    # close_notify: the proxy sees the one-sided closure in every STOPTLS run.
    ("server", "early-plaintext"): _all(F),
    # R4: plaintext glued to the client's close_notify is answered.
    ("server", "one-sided-resume"): {"path.inject-after-close": F},
    # R5: the server's close_notify, where the s2c faults aim, never comes.
    ("server", "no-close-notify-reply"): {
        "path.drop-close-notify-s2c": W,
        "path.inject-before-close-s2c": W,
    },
    # R6: the cut message unit (a DATA body, an APPEND literal) is stored.
    # (a reset read as a clean end, too).
    ("server", "ignore-truncation"): {"path.truncate-c2s": F, "path.reset-c2s": F},
    # R4 as one-sided-resume (the bare return to plaintext is out of any
    # path scenario's reach: the reference client always ends TLS by STOPTLS).
    ("server", "one-sided-bare-resume"): {"path.inject-after-close": F},
    ("server", "resume-without-stoptls"): {},
    ("server", "accept-stoptls-in-plaintext"): {},
    ("server", "accept-starttls-in-tls"): {},
    # R3: the plaintext goodbye after a truncation reaches the proxy's client side.
    ("server", "plaintext-goodbye"): {"path.truncate-c2s": F},
    # R1: plaintext pipelined after STARTTLS is run inside TLS.
    ("server", "keep-buffer"): {
        "path.inject-after-starttls-c2s": F,
        "path.inject-after-starttls-c2s-split": F,
    },
    ("server", "alert-as-close"): {},
    ("server", "no-state-reset"): {},
    # R2: a plaintext reply inside TLS is taken in.
    ("client", "plaintext-in-tls"): {"path.inject-in-tls-s2c": F},
    # R4: close_notify and the next command in one segment, in every STOPTLS run.
    ("client", "one-sided-close"): _all(F),
    # R6 (a client that has the behaviour): a reply cut by FIN is completed and accepted.
    ("client", "ignore-truncation"): {"path.truncate-s2c": F, "path.reset-s2c": F},
    # R8: the plaintext capabilities kept after STARTTLS do not list STOPTLS,
    # so the client never returns to plaintext: those scenarios do not apply.
    ("client", "no-state-reset"): _all(K),
    # R1: the response injected behind the STARTTLS answer is read under TLS
    # (the split variant where the dialect's reference client takes plaintext
    # after its ClientHello too: see PATH_FROM_CLIENT).
    ("client", "accept-injected-response"): {"path.inject-after-starttls-s2c": F},
    ("client", "no-close-notify-reply"): {},
    ("client", "downgrade"): {},
}


#: Path scenario -> the client scenario whose verdict it shares for a reference
#: client: the same engine meets the same bytes at the same point (a response
#: after its ClientHello), so where the dialect's reference client differs in
#: the client role (``Dialect.reference_client_expected``) it differs here too.
PATH_FROM_CLIENT: Mapping[str, str] = {
    "path.inject-after-starttls-s2c-split": "client.response-injection-split",
}


def expected_path_verdicts(dialect: str, side: str, behaviour: str) -> Mapping[str, Verdict]:
    """The exact non-pass verdicts of a reference pair with one side misbehaving
    (a dialect's own table first, FTP's; then the shared one)."""
    specific = dialect_named(dialect).reference_path_expected.get((side, behaviour))
    out = dict(specific if specific is not None else PATH_EXPECTED[(side, behaviour)])
    if side == "client":
        client = expected_client_verdicts(dialect, behaviour)
        for path_id, client_id in PATH_FROM_CLIENT.items():
            if client.get(client_id) is F:
                out[path_id] = F
    return out
