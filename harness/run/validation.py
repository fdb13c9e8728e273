"""The validation matrix: what the catalogue must say about each reference peer.

Like tlsfuzzer's expectation files, every entry is an *exact* expectation:
the strict peers must pass every scenario, and each misbehaving peer must get
exactly the listed non-pass verdicts -- a scenario that unexpectedly passes
is as much a failure of the harness as one that unexpectedly fails.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.reference import reference_servers
from starttls_harness.run.server import RunSettings, run_server_target
from starttls_harness.scenarios.server import CATALOGUE, Scenario

__all__ = ["SERVER_EXPECTED", "mismatches", "validate_server"]

F, W = Verdict.FAIL, Verdict.WARN

#: Bounds for validation runs: generous, never waited on by a conforming peer.
VALIDATION_SETTINGS = RunSettings(reply_timeout=3.0, scenario_timeout=10.0)

_STOPTLS_BROKEN = {
    "server.close-notify-reply": F,
    "server.stoptls-cycle": F,
    "server.one-sided-close-stoptls": F,
    "server.state-reset": F,
}

#: behaviour -> {scenario id: verdict}; every scenario not listed must pass.
#: Each entry's first line is the scenario that guards the broken rule.
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
}


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


async def validate_server(
    dialect: str,
    behaviour: str,
    tls_versions: Sequence[str] = ("1.2", "1.3"),
    scenarios: Tuple[Scenario, ...] = CATALOGUE,
    settings: RunSettings = VALIDATION_SETTINGS,
) -> Tuple[List[Result], List[str]]:
    """Run the catalogue against one reference server; return the mismatches."""
    async with reference_servers((dialect,), behaviour=behaviour) as (target,):
        results = await run_server_target(scenarios, target, settings, tls_versions=tls_versions)
    return results, mismatches(results, SERVER_EXPECTED[behaviour])
