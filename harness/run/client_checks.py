"""Entry points of the client role: a client command, and a reference client
judged by the validation matrix (:mod:`starttls_harness.scenarios.expectations`)."""

from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.client import run_client_target
from starttls_harness.run.server import Progress, RunSettings
from starttls_harness.run.targets import (
    DEFAULT_SETTINGS,
    CommandClientTarget,
    ReferenceClientTarget,
)
from starttls_harness.run.validation import CLIENT_VALIDATION_SETTINGS
from starttls_harness.scenarios.client import CLIENT_SCENARIOS
from starttls_harness.scenarios.expectations import expected_client_verdicts, mismatches
from starttls_harness.scenarios.model import Scenario

__all__ = ["check_client", "validate_client"]


async def check_client(
    dialect: str,
    argv: Sequence[str],
    scenarios: Optional[Sequence[Scenario]] = None,
    settings: RunSettings = DEFAULT_SETTINGS,
    progress: Optional[Progress] = None,
    *,
    tls_versions: Optional[Sequence[str]] = None,
    timeout: Optional[float] = None,
) -> List[Result]:
    """Run the client catalogue against an external client command."""
    chosen = list(scenarios) if scenarios is not None else list(CLIENT_SCENARIOS)
    target = CommandClientTarget(
        dialect, argv, timeout=timeout if timeout is not None else settings.scenario_timeout
    )
    return await run_client_target(
        chosen,
        target,
        settings,
        progress=progress,
        tls_versions=tls_versions,
    )


async def validate_client(
    dialect: str,
    behaviour: str,
    tls_versions: Sequence[str] = ("1.2", "1.3"),
    settings: Optional[RunSettings] = None,
) -> Tuple[List[Result], List[str]]:
    """Run the client catalogue against one reference client; return mismatches."""
    chosen = settings or CLIENT_VALIDATION_SETTINGS
    target = ReferenceClientTarget(dialect, behaviour, timeout=chosen.reply_timeout)
    results = await run_client_target(CLIENT_SCENARIOS, target, chosen, tls_versions=tls_versions)
    expected: Mapping[str, Verdict] = expected_client_verdicts(dialect, behaviour)
    return results, mismatches(results, expected)
