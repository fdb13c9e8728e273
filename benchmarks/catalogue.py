"""(c) Scenario runs per second: the full catalogue against the reference peers.

Runs every server scenario x TLS version against the strict reference SMTP
and IMAP servers (in this process, as ``starttls-harness check`` does), at
concurrency 1 and at the default concurrency; each sanity probe is a
scenario run too and is counted as one.  When the modules exist, the
client catalogue (``starttls_harness.run.client`` against the reference clients)
and the path catalogue (``starttls_harness.run.path``: reference client -> fault
proxy -> reference server) are measured the same way; otherwise the result
says they were not.

Also checks that no scenario against a conforming target waits on a
timeout: the slowest scenario is reported, and the catalogue is run again
with ``reply_timeout`` (and the scenario bound) set high -- a scenario
decided by a timeout would make that run slower by the difference.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable, Dict, List, Optional, Sequence

from starttls_harness.report.verdicts import Result, Verdict, count_verdicts
from starttls_harness.run.reference import reference_servers
from starttls_harness.run.server import RunSettings, run_server_target
from starttls_harness.scenarios.server import CATALOGUE

__all__ = ["CatalogueRun", "catalogue_runs", "missing_roles"]

#: Modules that run client-role and path-role scenarios.
ROLE_MODULES = {
    "client": (
        "starttls_harness.run.client",
        "starttls_harness.run.targets",
        "starttls_harness.scenarios.client",
    ),
    "path": ("starttls_harness.run.path", "starttls_harness.scenarios.path"),
}


def missing_roles() -> Dict[str, List[str]]:
    """role -> the modules it needs that are not there."""
    return {
        role: missing
        for role, names in ROLE_MODULES.items()
        if (missing := [n for n in names if importlib.util.find_spec(n) is None])
    }


@dataclass
class CatalogueRun:
    """One pass over one role's catalogue against the reference peers."""

    role: str
    label: str
    concurrency: int
    seconds: float
    results: List[Result] = field(default_factory=list)
    sanity_runs: int = 0
    #: The process's CPU time for the pass (the harness and the peers share
    #: one thread): on a shared machine, the figure other work does not inflate.
    cpu_seconds: float = float("nan")

    @property
    def runs(self) -> int:
        """Scenario runs made, sanity probes included."""
        return len(self.results) + self.sanity_runs

    @property
    def per_second(self) -> float:
        return self.runs / self.seconds

    @property
    def slowest(self) -> Optional[Result]:
        return max(self.results, key=lambda r: r.duration, default=None)

    @property
    def verdicts(self) -> Dict[str, int]:
        return {k: v for k, v in count_verdicts(self.results).items() if v}

    def as_dict(self) -> Dict[str, object]:
        slow = self.slowest
        return {
            "role": self.role,
            "label": self.label,
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "runs": self.runs,
            "sanity_runs": self.sanity_runs,
            "per_second": self.per_second,
            "verdicts": self.verdicts,
            "slowest": None
            if slow is None
            else {
                "id": slow.id,
                "dialect": slow.dialect,
                "tls_version": slow.tls_version,
                "seconds": slow.duration,
            },
        }


Job = Callable[[RunSettings], Awaitable[List[Result]]]


def _jobs(role: str, targets: Sequence[object]) -> List[Job]:
    """One job per reference peer (or pair) for ``role``."""
    if role == "server":
        from starttls_harness.run.server import ServerTarget

        def server(target: ServerTarget) -> Job:
            return lambda settings: run_server_target(CATALOGUE, target, settings)

        return [server(t) for t in targets if isinstance(t, ServerTarget)]
    if role == "client":
        from starttls_harness.run.client import run_client_target
        from starttls_harness.run.targets import ReferenceClientTarget
        from starttls_harness.scenarios.client import CLIENT_SCENARIOS

        def client(dialect: str) -> Job:
            target = ReferenceClientTarget(dialect)
            return lambda settings: run_client_target(CLIENT_SCENARIOS, target, settings)

        return [client(d) for d in ("smtp", "imap")]
    from starttls_harness.run.path import run_path_target
    from starttls_harness.run.path_reference import reference_pair
    from starttls_harness.scenarios.path import PATH_SCENARIOS

    def path(dialect: str) -> Job:
        chosen = [s for s in PATH_SCENARIOS if dialect in s.dialects]
        return lambda settings: run_path_target(chosen, reference_pair(dialect), settings)

    return [path(d) for d in ("smtp", "imap")]


async def _one_pass(
    role: str, jobs: Sequence[Job], settings: RunSettings, label: str
) -> CatalogueRun:
    start = time.perf_counter()
    cpu = time.process_time()
    results: List[Result] = []
    sanity = 0
    for job in jobs:
        group = await job(settings)
        results.extend(group)
        if settings.sanity:
            # One probe before and one after each TLS version's group.
            sanity += 2 * len({r.tls_version for r in group})
    run = CatalogueRun(
        role,
        label,
        settings.concurrency,
        time.perf_counter() - start,
        results,
        sanity,
        time.process_time() - cpu,
    )
    errors = [r for r in results if r.verdict is Verdict.ERROR]
    if role == "server" and len(errors) < len(results):
        errors = [r for r in results if r.verdict is not Verdict.PASS]
    if errors:
        first = errors[0]
        raise RuntimeError(
            f"{role}: {len(errors)} result(s) against the strict reference peers are not "
            f"what they must be, e.g. {first.id} [{first.dialect} TLS {first.tls_version}]: "
            f"{first.verdict.value}, {first.summary}"
        )
    return run


async def catalogue_runs(
    repeats: int = 3, concurrencies: Sequence[int] = (), roles: Sequence[str] = ("server",)
) -> List[CatalogueRun]:
    """Best-of-``repeats`` passes per role and concurrency, then the high-timeout pass."""
    default = RunSettings()
    levels = list(concurrencies) or sorted({1, default.concurrency})
    slow = replace(default, reply_timeout=30.0, scenario_timeout=60.0, connect_timeout=30.0)
    out: List[CatalogueRun] = []
    async with reference_servers() as targets:
        for role in roles:
            jobs = _jobs(role, targets)
            await _one_pass(role, jobs, default, "warm-up")
            for level in levels:
                passes = [
                    await _one_pass(role, jobs, replace(default, concurrency=level), f"c={level}")
                    for _ in range(repeats)
                ]
                out.append(min(passes, key=lambda p: p.seconds))
            label = f"c={default.concurrency}, reply_timeout=30 s"
            passes = [await _one_pass(role, jobs, slow, label) for _ in range(repeats)]
            out.append(min(passes, key=lambda p: p.seconds))
    return out


def main() -> None:  # pragma: no cover - manual use
    for run in asyncio.run(catalogue_runs()):
        print(run.as_dict())


if __name__ == "__main__":  # pragma: no cover
    main()
