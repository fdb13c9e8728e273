"""What a scenario is, in every role: steps, observations, verdicts.

A scenario is an id, a title, the role it tests, the dialects and TLS
versions it applies to, its steps, its expected outcomes, the rule it
guards, its RFC/CVE reference and a one-line reason (principle 5).

A run of the steps ends in exactly one *observation* (a label such as
``closed``, ``injection-answered`` or ``completed``); ``expect`` maps each
label to a verdict.  Labels a scenario does not list fall back to
:data:`COMMON`, and anything unknown is an ``error``: the harness never
guesses a ``pass``.  Observations made *before* the step that applies the
fault (``fault=True``) are errors too: a target that is already gone when
the fault would be applied has not refused anything.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from starttls_harness.dialects import EVERY_DIALECT, RETURN_TO_PLAINTEXT, dialects_with
from starttls_harness.report.verdicts import Verdict
from starttls_harness.tls.engine import Rule

__all__ = [
    "COMMON",
    "Expect",
    "S",
    "Scenario",
    "Step",
    "needing_command_return",
    "needing_return",
    "select",
]


@dataclass(frozen=True)
class Step:
    """One action of the scripted peer; ``fault`` marks where the fault is."""

    action: str
    args: Mapping[str, Any] = field(default_factory=dict)
    fault: bool = False


def S(action: str, fault: bool = False, **args: Any) -> Step:
    return Step(action, args, fault)


@dataclass(frozen=True)
class Expect:
    verdict: Verdict
    summary: str


P, F, W, K, E = Verdict.PASS, Verdict.FAIL, Verdict.WARN, Verdict.SKIP, Verdict.ERROR


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    role: str  # "server", "client" or "path"
    rule: Rule
    reference: str
    reason: str
    steps: Tuple[Step, ...]
    expect: Mapping[str, Expect]
    #: The dialects it applies to (default: every registered one, read when asked).
    dialects: Sequence[str] = EVERY_DIALECT
    tls_versions: Tuple[str, ...] = ("1.2", "1.3")

    def outcome(self, label: str) -> Expect:
        if label in self.expect:
            return self.expect[label]
        if label in COMMON:
            return COMMON[label]
        if label.startswith("violation:"):
            return Expect(F, f"the target broke {label.split(':', 1)[1]} on the wire")
        return Expect(E, f"unexpected outcome {label!r}: the harness cannot decide")


#: Outcomes with the same meaning in every scenario.
COMMON: Dict[str, Expect] = {
    "no-starttls": Expect(K, "the target does not offer STARTTLS"),
    "no-stoptls": Expect(K, "the target does not offer STOPTLS (no return to plaintext)"),
    "no-credentials": Expect(K, "the scenario needs a test user (--user/--password)"),
    "no-storage-probe": Expect(K, "the target's stored messages cannot be observed"),
    "storage-refused": Expect(K, "the target refused the storage command: no unit to cut"),
    "timeout": Expect(E, "nothing decisive happened within the time bound"),
    "refused": Expect(E, "cannot connect to the target"),
    "bad-greeting": Expect(E, "the target's greeting is not a ready greeting"),
    "starttls-refused": Expect(E, "the target refused STARTTLS"),
    "stoptls-refused": Expect(E, "the target refused STOPTLS although it offers it"),
    "handshake-failed": Expect(E, "the TLS handshake failed"),
    "unexpected-reply": Expect(E, "the target answered something the scenario cannot classify"),
    "closed-before-fault": Expect(E, "the target closed the connection before the fault"),
    "server-closed-first": Expect(
        K, "the server sent the first close_notify: a one-sided client closure cannot be staged"
    ),
    "reply-bound": Expect(
        E, "the target sent more than the reply bound without completing a reply"
    ),
}


def needing_return(scenarios: Sequence[Scenario], ids: Sequence[str]) -> Tuple[Scenario, ...]:
    """``scenarios`` with those in ``ids`` limited to dialects that can return to plaintext.

    Such a scenario means nothing for a dialect without a return to
    plaintext (it would only ever be skipped), so it does not apply there.
    """
    known = {s.id for s in scenarios}
    unknown = sorted(set(ids) - known)
    if unknown:
        raise ValueError(f"no such scenarios: {', '.join(unknown)}")
    return tuple(replace(s, dialects=RETURN_TO_PLAINTEXT) if s.id in ids else s for s in scenarios)


def needing_command_return(
    scenarios: Sequence[Scenario], ids: Sequence[str]
) -> Tuple[Scenario, ...]:
    """``scenarios`` with those in ``ids`` limited to dialects whose bare closure ends the
    connection (``Dialect.return_by_closure`` false).

    On LDAP a bidirectional closure *is* the return to plaintext (RFC 4511
    §4.14.3), so a scenario that calls plaintext after one a violation, or
    sends a STOPTLS command, does not apply there.
    """
    known = {s.id for s in scenarios}
    unknown = sorted(set(ids) - known)
    if unknown:
        raise ValueError(f"no such scenarios: {', '.join(unknown)}")
    return tuple(
        replace(s, dialects=_without_closure_return(s)) if s.id in ids else s for s in scenarios
    )


def _without_closure_return(scenario: Scenario) -> Sequence[str]:
    """The scenario's dialects, less those whose bare closure is the return to plaintext."""
    if scenario.dialects is RETURN_TO_PLAINTEXT:
        return dialects_with("has_return_to_plaintext", "!return_by_closure")
    if scenario.dialects is EVERY_DIALECT:
        return dialects_with("!return_by_closure")
    raise ValueError(f"{scenario.id}: its dialects cannot be narrowed by a capability")


def select(
    patterns: Optional[List[str]],
    *,
    role: Optional[str] = None,
    dialect: Optional[str] = None,
    catalogue: Sequence[Scenario],
) -> List[Scenario]:
    """Scenarios of ``catalogue`` whose id matches any glob in ``patterns`` (all if None)."""
    chosen = []
    for s in catalogue:
        if role is not None and s.role != role:
            continue
        if dialect is not None and dialect not in s.dialects:
            continue
        if patterns and not any(fnmatch.fnmatchcase(s.id, p) for p in patterns):
            continue
        chosen.append(s)
    return chosen
