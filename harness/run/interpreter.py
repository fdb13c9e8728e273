"""The one scenario interpreter of the roles that play a peer step by step.

The server role (the harness as a client, :mod:`.server`), the client
role (the harness as a scripted server, :mod:`.client`) and the path role
(the client under test driven through the proxy, :mod:`.path`) all walk a
scenario's steps through a verb table and end with one observation label
(see :mod:`.outcomes`).  They differ only in what they know of their own
peer: which steps to skip, what to remember when the fault step begins,
and what the peer ending the connection means at a given step.
"""

from __future__ import annotations

from typing import Awaitable, Callable, List, Mapping, Optional, Protocol, Sequence, Tuple, TypeVar

from starttls_harness.run.outcomes import (
    COMPLETED,
    TIMEOUT,
    Observed,
    RemoteEnded,
    WaitTimeout,
)
from starttls_harness.scenarios.model import Scenario, Step

__all__ = ["Interpreted", "interpret", "unknown_actions"]


class Interpreted(Protocol):
    """What the interpreter needs of a role's run state."""

    fault_applied: bool


R = TypeVar("R", bound=Interpreted)


async def interpret(
    run: R,
    verbs: Mapping[str, Callable[[R, Mapping[str, object]], Awaitable[None]]],
    steps: Sequence[Step],
    note: Callable[[str], None],
    *,
    ended: Callable[[R, Step, RemoteEnded], str],
    skip: Optional[Callable[[R, Step], Optional[str]]] = None,
    at_fault: Optional[Callable[[R], None]] = None,
    before: Optional[Callable[[R, Step], None]] = None,
) -> str:
    """Run ``steps`` (a scenario's, or a role's own session); return the label.

    ``verbs[step.action](run, step.args)`` runs one step; ``note`` writes to
    the run's evidence; ``skip(run, step)`` gives the note of a step not to
    run (None: run it); ``at_fault(run)`` is called as the fault step begins,
    ``before(run, step)`` before every step that runs; ``ended(run, step,
    exc)`` labels the peer ending the connection during ``step``.
    """
    for step in steps:
        if skip is not None:
            why = skip(run, step)
            if why is not None:
                note(why)
                continue
        if step.fault:
            run.fault_applied = True
            if at_fault is not None:
                at_fault(run)
        if before is not None:
            before(run, step)
        try:
            await verbs[step.action](run, step.args)
        except Observed as seen:
            if seen.detail:
                note(seen.detail)
            return seen.label
        except WaitTimeout as exc:
            note(str(exc))
            return TIMEOUT
        except RemoteEnded as gone:
            note(gone.detail or gone.how)
            return ended(run, step, gone)
    return COMPLETED


def unknown_actions(
    scenarios: Sequence[Scenario], role: str, verbs: Mapping[str, object]
) -> List[Tuple[str, str]]:
    """(scenario id, action) pairs of ``role``'s scenarios that ``verbs`` does not know."""
    return [
        (s.id, step.action)
        for s in scenarios
        if s.role == role
        for step in s.steps
        if step.action not in verbs
    ]
