"""One vocabulary for how a run ends, in every role: who broke the protocol.

Every role's interpreter (server, client, path) ends a scenario with one
*observation label* that the scenario turns into a verdict.  The labels and
the exceptions that carry them are the same in every role:

* :class:`Observed` -- the peer under test did something decisive; its
  ``label`` is looked up in the scenario's ``expect`` table;
* :class:`RemoteEnded` -- the peer under test (the *remote*) ended the
  connection; with ``rule`` set it broke that rule, as our engine saw it,
  and the label is :func:`violation` of it;
* :class:`WaitTimeout` -- nothing decisive happened within a bound: the label
  :data:`TIMEOUT`, an error, never a pass;
* anything else, including the engine's ``LocalProtocolError`` (the harness
  asked its own engine for something the rules forbid): the *local* side
  broke the protocol, which is a harness bug, :data:`HARNESS_ERROR`.
"""

from __future__ import annotations

from typing import Optional

from starttls_harness.tls.engine import LocalProtocolError, Rule

__all__ = [
    "COMPLETED",
    "HARNESS_ERROR",
    "TIMEOUT",
    "LocalProtocolError",
    "Observed",
    "RemoteEnded",
    "WaitTimeout",
    "harness_error",
    "rule_of",
    "violation",
]

#: The steps ran to their end without a decisive observation.
COMPLETED = "completed"
#: A bound ran out (see :class:`WaitTimeout`).
TIMEOUT = "timeout"
#: The harness itself failed (the local side broke the protocol).
HARNESS_ERROR = "harness-error"


def violation(rule: Rule) -> str:
    """The label of a rule the remote broke on the wire."""
    return f"violation:{rule.value}"


#: Labels that name the rule they break, whatever the scenario guards: the
#: rule column of a fail or warn says the rule its summary names.
_LABEL_RULES = {
    "spoke-after-close": Rule.R3,
    "plaintext-goodbye": Rule.R3,
    "plaintext-unsolicited": Rule.R3,
    "silent-then-answered": Rule.R3,
    "silent-then-closed": Rule.R5,
    "silent-open": Rule.R5,
    "close-notify-not-answered": Rule.R5,
}


def rule_of(label: str, default: Rule) -> Rule:
    """The rule a non-pass observation ``label`` is about (``default``: the scenario's)."""
    if label.startswith("violation:"):
        try:
            return Rule(label.split(":", 1)[1])
        except ValueError:
            return default
    return _LABEL_RULES.get(label, default)


def harness_error(exc: BaseException) -> str:
    """The evidence note of a harness failure."""
    return f"harness error: {type(exc).__name__}: {exc}"


class Observed(Exception):
    """The peer under test did something decisive; ``label`` names it."""

    def __init__(self, label: str, detail: str = "") -> None:
        super().__init__(detail or label)
        self.label = label
        self.detail = detail


class RemoteEnded(Exception):
    """The peer under test ended the connection; ``how`` says in which way.

    ``rule`` is set when ending it broke a rule (the remote broke the
    protocol, as the harness's engine saw it).
    """

    def __init__(self, how: str, detail: str, rule: Optional[Rule] = None) -> None:
        super().__init__(detail or how)
        self.how = how
        self.detail = detail
        self.rule = rule


class WaitTimeout(Exception):
    """Nothing decisive arrived within a bound."""
