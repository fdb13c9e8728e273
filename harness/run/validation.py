"""Validation runs: the catalogue against each reference peer, judged by the matrix.

The matrices themselves (all three roles) are in
:mod:`starttls_harness.scenarios.expectations`.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from starttls_harness.report.verdicts import Result
from starttls_harness.run.reference import reference_servers
from starttls_harness.run.server import RunSettings, run_server_target
from starttls_harness.scenarios.expectations import (
    SERVER_EXPECTED,
    expected_server_verdicts,
    mismatches,
)
from starttls_harness.scenarios.server import CATALOGUE, Scenario

__all__ = [
    "CLIENT_VALIDATION_SETTINGS",
    "SERVER_EXPECTED",
    "VALIDATION_SETTINGS",
    "mismatches",
    "validate_server",
]

#: Bounds for validation runs: generous, never waited on by a conforming peer.
VALIDATION_SETTINGS = RunSettings(reply_timeout=3.0, scenario_timeout=10.0)
CLIENT_VALIDATION_SETTINGS = RunSettings(reply_timeout=3.0, scenario_timeout=10.0)


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
    return results, mismatches(results, expected_server_verdicts(dialect, behaviour))
