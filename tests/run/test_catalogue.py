"""The catalogue is sound, and the validation matrix holds on real sockets.

Every scenario passes against the strict reference servers, and every
misbehaving server gets exactly the verdicts listed in
:data:`starttls_harness.run.validation.SERVER_EXPECTED` -- no more, no fewer.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from starttls_harness.dialects import names
from starttls_harness.report.verdicts import Verdict
from starttls_harness.run.server import unknown_steps
from starttls_harness.run.validation import SERVER_EXPECTED, validate_server
from starttls_harness.scenarios.server import CATALOGUE, COMMON, Scenario

SPEC_SERVER_IDS = {
    "server.command-injection",
    "server.command-injection-split",
    "server.plaintext-in-tls",
    "server.one-sided-close",
    "server.plaintext-after-close",
    "server.truncation",
    "server.data-after-close-notify",
    "server.close-notify-reply",
    "server.stoptls-cycle",
    "server.state-reset",
}


def test_ids_are_unique_and_cover_the_spec() -> None:
    ids = [s.id for s in CATALOGUE]
    assert len(ids) == len(set(ids))
    assert SPEC_SERVER_IDS <= set(ids)


@pytest.mark.parametrize("scenario", CATALOGUE, ids=lambda s: s.id)
def test_scenario_is_complete_data(scenario: Scenario) -> None:
    assert scenario.title and scenario.reason and scenario.reference
    assert scenario.role in ("server", "client", "path")
    assert set(scenario.dialects) <= set(names())
    assert set(scenario.tls_versions) <= {"1.2", "1.3"}
    verdicts = {e.verdict for e in scenario.expect.values()}
    # A check that cannot fail (or cannot pass) is a defect.
    assert Verdict.PASS in verdicts
    assert verdicts & {Verdict.FAIL, Verdict.WARN}
    assert sum(step.fault for step in scenario.steps) >= 1 or scenario.id.endswith("cycle")
    assert scenario.outcome("something-new").verdict is Verdict.ERROR
    assert scenario.outcome("timeout").verdict is Verdict.ERROR


def test_every_step_is_in_the_verb_table() -> None:
    assert unknown_steps(CATALOGUE) == []


def test_common_outcomes_never_pass() -> None:
    assert all(e.verdict is not Verdict.PASS for e in COMMON.values())


def _behaviours(dialect: str) -> Any:
    module = importlib.import_module(f"starttls_harness.servers.{dialect}")
    return list(module.BEHAVIOURS)


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_every_server_behaviour_has_an_expectation(dialect: str) -> None:
    assert set(_behaviours(dialect)) == set(SERVER_EXPECTED)


@pytest.mark.parametrize("behaviour", sorted(SERVER_EXPECTED))
@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_validation_matrix(dialect: str, behaviour: str, tls_version: str, run) -> None:  # type: ignore[no-untyped-def]
    results, problems = run(lambda: validate_server(dialect, behaviour, (tls_version,)), 120)
    assert results, "no scenario ran"
    assert problems == []
    if behaviour != "strict":
        guarded = next(iter(SERVER_EXPECTED[behaviour]))
        assert any(r.id == guarded and r.verdict is not Verdict.PASS for r in results)
