"""pytest over a fleet: one test per target x scenario x TLS version.

Loaded by the starttls-harness pytest plugin (``pytest_plugins`` there).
``--starttls-targets FILE`` names the servers (one URL per line, ``#``
comments, as ``starttls-harness check --targets``); a test function that asks
for ``starttls_target_result`` becomes one test per target x server scenario x
TLS version, so pytest-xdist (``-n auto``, or ``--dist`` over hosts) spreads
the fleet, and ``--junitxml`` is the fleet report (each test case carries a
``target`` property)::

    # test_fleet.py
    def test_starttls(starttls_target_result):
        starttls_target_result.check()

    pytest -n auto --starttls-targets fleet.txt --junitxml fleet.xml test_fleet.py

Options: ``--starttls-only GLOB`` (repeatable), ``--starttls-tls-version``
(1.2, 1.3 or all), ``--starttls-cafile`` (verify the targets' certificates).
Each test runs the harness's sanity probe first (a target whose normal
session is broken errors instead of passing a refusal test).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import pytest
from starttls_harness.dialects import dialect_of_scheme
from starttls_harness.report.formats import ladder
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.server import RunSettings, ServerTarget, run_server_scenario, sanity_probe
from starttls_harness.scenarios.catalogue import everything, select
from starttls_harness.scenarios.model import Scenario

__all__ = ["FleetOutcome", "read_targets"]

FIXTURE = "starttls_target_case"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("starttls-harness", "starttls-harness over a fleet of servers")
    group.addoption(
        "--starttls-targets",
        metavar="FILE",
        help="server URLs, one per line ('#' comments): one test per target x scenario x TLS "
        "version for tests that use starttls_target_result",
    )
    group.addoption(
        "--starttls-only",
        action="append",
        metavar="GLOB",
        help="only scenario ids matching this glob (repeatable)",
    )
    group.addoption(
        "--starttls-tls-version", choices=("1.2", "1.3", "all"), default="all", help="TLS versions"
    )
    group.addoption("--starttls-cafile", metavar="PEM", help="verify the targets with this CA")


def read_targets(path: Path) -> List[Tuple[str, str, str, int]]:
    """(url, dialect, host, port) for each line of a targets file."""
    out: List[Tuple[str, str, str, int]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        url = line.split("#", 1)[0].strip()
        if not url:
            continue
        parsed = urllib.parse.urlsplit(url)
        try:
            dialect = dialect_of_scheme(parsed.scheme).name
            port = parsed.port
        except ValueError as exc:
            raise pytest.UsageError(f"--starttls-targets {path}: {url!r}: {exc}") from None
        if not parsed.hostname or port is None:
            raise pytest.UsageError(f"--starttls-targets {path}: {url!r}: give HOST:PORT")
        out.append((url, dialect, parsed.hostname, port))
    if not out:
        raise pytest.UsageError(f"--starttls-targets {path}: no target in the file")
    return list(dict.fromkeys(out))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per target x scenario x TLS version."""
    if FIXTURE not in metafunc.fixturenames:
        return
    option = metafunc.config.getoption("--starttls-targets")
    if not option:
        raise pytest.UsageError(f"{metafunc.function.__name__} needs --starttls-targets FILE")
    only = metafunc.config.getoption("--starttls-only")
    chosen = metafunc.config.getoption("--starttls-tls-version")
    versions = ("1.2", "1.3") if chosen == "all" else (chosen,)
    params = []
    for url, dialect, host, port in read_targets(Path(option)):
        for s in select(only, role="server", dialect=dialect, catalogue=everything()):
            for v in versions:
                if v in s.tls_versions:
                    case = (url, dialect, host, port, s.id, v)
                    params.append(pytest.param(case, id=f"{url}-{s.id}-tls{v}"))
    if not params:
        raise pytest.UsageError("--starttls-targets: no scenario applies to these targets")
    metafunc.parametrize(FIXTURE, params)


class FleetOutcome:
    """One target's result for one scenario and TLS version; ``check`` judges it."""

    def __init__(self, target: str, scenario: Scenario, result: Result) -> None:
        self.target = target
        self.scenario = scenario
        self.result = result

    def check(self) -> None:
        """Pass; skip (not applicable); or fail with the evidence ladder."""
        verdict = self.result.verdict
        if verdict is Verdict.PASS:
            return
        if verdict is Verdict.SKIP:
            pytest.skip(self.result.summary)
        if verdict is Verdict.WARN:
            return  # a deviation that exposes nothing: a pass with a note in the report
        rule = f" [{self.result.rule}]" if self.result.rule else ""
        pytest.fail(
            f"{self.target}: {self.scenario.id} (TLS {self.result.tls_version}): "
            f"{verdict.value}{rule}: {self.result.summary}\n\n{ladder(self.result)}",
            pytrace=False,
        )


@pytest.fixture
def starttls_target_result(
    request: pytest.FixtureRequest,
    starttls_target_case: Tuple[str, str, str, int, str, str],
    record_property: Callable[[str, object], None],
) -> FleetOutcome:
    """Run this test's scenario against this test's target."""
    url, dialect, host, port, scenario_id, tls_version = starttls_target_case
    record_property("target", url)
    scenario = next(s for s in everything() if s.id == scenario_id)
    cafile: Optional[str] = request.config.getoption("--starttls-cafile")
    target = ServerTarget(dialect, host, port, cafile=Path(cafile) if cafile else None)
    settings = RunSettings(reply_timeout=5.0, scenario_timeout=20.0, sanity=False)
    result = asyncio.run(_run(scenario, target, tls_version, settings))
    result.target = url
    record_property("verdict", result.verdict.value)
    return FleetOutcome(url, scenario, result)


async def _run(
    scenario: Scenario, target: ServerTarget, tls_version: str, settings: RunSettings
) -> Result:
    problem = await sanity_probe(target, tls_version, settings)
    if problem is not None:
        return Result(
            scenario.id,
            target.dialect,
            tls_version,
            Verdict.ERROR,
            None,
            f"sanity probe failed: {problem}",
            title=scenario.title,
        )
    return await run_server_scenario(scenario, target, tls_version, settings)
