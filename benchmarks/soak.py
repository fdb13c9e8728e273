"""Soak: the full catalogue many times against every reference behaviour.

``python -m benchmarks.soak`` (not part of the test suite; a few minutes):

1. **Determinism.**  For every behaviour of ``starttls_harness.run.validation.SERVER_EXPECTED``
   (the strict servers and each misbehaving one) and both dialects, one
   reference server is started and the whole server catalogue is run
   against it ``--passes`` times (50 by default), both TLS versions, at the
   default concurrency.  Every verdict of every pass must equal the first
   pass's, and the first pass must match the exact expectation table.
2. **Resource bounds.**  ``--resource-runs`` scenario runs (5,000 by default)
   against the strict servers, after a warm-up pass: the process must hold
   the same number of file descriptors, sockets and asyncio tasks after as
   before (RSS is printed for information).

Prints the run counts, the total time and every change; exits non-zero on
any change, mismatch or leak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from starttls_harness.report.verdicts import Verdict
from starttls_harness.run.reference import reference_servers
from starttls_harness.run.server import RunSettings, run_server_target
from starttls_harness.run.validation import SERVER_EXPECTED, VALIDATION_SETTINGS, mismatches
from starttls_harness.scenarios.server import CATALOGUE
from starttls_harness.tls.certs import make_pki

Key = Tuple[str, str, str, str]  # behaviour, dialect, scenario, TLS version


@dataclass
class Soak:
    passes: int = 0
    runs: int = 0
    seconds: float = 0.0
    first: Dict[Key, Verdict] = field(default_factory=dict)
    changes: List[str] = field(default_factory=list)
    mismatches: List[str] = field(default_factory=list)


def usage() -> Dict[str, int]:
    fds = sockets = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            fds += 1
            sockets += target.startswith("socket:")
    return {"fds": fds, "sockets": sockets, "tasks": len(asyncio.all_tasks())}


def rss_mib() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


async def settle(baseline: Dict[str, int], timeout: float = 10.0) -> Dict[str, int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    now = usage()
    while any(now[k] > baseline[k] for k in baseline) and loop.time() < deadline:
        await asyncio.sleep(0.01)
        now = usage()
    return now


async def determinism(
    passes: int,
    behaviours: Sequence[str],
    dialects: Sequence[str],
    versions: Sequence[str],
    settings: RunSettings,
) -> Soak:
    soak = Soak()
    state = Path(tempfile.mkdtemp(prefix="starttls-harness-soak-"))
    pki = make_pki(directory=state)
    start = time.perf_counter()
    for behaviour in behaviours:
        expected = SERVER_EXPECTED[behaviour]
        for dialect in dialects:
            async with reference_servers(
                (dialect,), behaviour=behaviour, pki=pki, state_dir=state
            ) as (target,):
                for n in range(passes):
                    results = await run_server_target(
                        CATALOGUE, target, settings, tls_versions=versions
                    )
                    soak.runs += len(results) + 2 * len(versions)  # + sanity probes
                    if n == 0:
                        soak.mismatches += [
                            f"{behaviour}: {m}" for m in mismatches(results, expected)
                        ]
                    for r in results:
                        key = (behaviour, dialect, r.id, r.tls_version)
                        was = soak.first.setdefault(key, r.verdict)
                        if r.verdict is not was:
                            soak.changes.append(
                                f"pass {n + 1}: {behaviour} {dialect} {r.id} TLS {r.tls_version}: "
                                f"{was.value} -> {r.verdict.value} ({r.summary})"
                            )
            print(
                f"  {behaviour:22} {dialect}: {passes} passes, "
                f"{len(soak.changes)} change(s) so far, "
                f"{time.perf_counter() - start:7.1f} s",
                flush=True,
            )
    soak.passes = passes
    soak.seconds = time.perf_counter() - start
    return soak


async def resources(
    runs: int, versions: Sequence[str], settings: RunSettings
) -> Tuple[int, float, Dict[str, int], Dict[str, int], float, float]:
    async with reference_servers() as targets:

        async def one_pass() -> int:
            made = 0
            for target in targets:
                results = await run_server_target(
                    CATALOGUE, target, settings, tls_versions=versions
                )
                bad = [r for r in results if r.verdict is not Verdict.PASS]
                if bad:
                    raise RuntimeError(f"strict reference server did not pass: {bad[0].summary}")
                made += len(results) + 2 * len(versions)
            return made

        await one_pass()  # warm-up: lazy allocations are not leaks
        gc.collect()
        before = await settle(usage())
        rss_before = rss_mib()
        start = time.perf_counter()
        made = 0
        while made < runs:
            made += await one_pass()
        seconds = time.perf_counter() - start
        gc.collect()
        after = await settle(before)
        return made, seconds, before, after, rss_before, rss_mib()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--passes", type=int, default=50)
    parser.add_argument("--resource-runs", type=int, default=5000)
    parser.add_argument(
        "--behaviour", action="append", choices=sorted(SERVER_EXPECTED), help="repeatable"
    )
    parser.add_argument("--dialect", action="append", choices=("smtp", "imap"))
    parser.add_argument("--tls", action="append", choices=("1.2", "1.3"))
    args = parser.parse_args(argv)
    # aiosmtpd logs every unknown command the scenarios inject (as the CLI does).
    logging.getLogger("mail.log").setLevel(logging.CRITICAL)
    behaviours = args.behaviour or list(SERVER_EXPECTED)
    dialects = args.dialect or ["smtp", "imap"]
    versions = args.tls or ["1.2", "1.3"]
    settings = VALIDATION_SETTINGS
    failed = False
    print(
        f"soak: {args.passes} passes x {len(behaviours)} behaviours x "
        f"{'/'.join(dialects)} x TLS {'/'.join(versions)}; settings {settings}"
    )
    if args.passes > 0:
        soak = asyncio.run(determinism(args.passes, behaviours, dialects, versions, settings))
        print(
            f"determinism: {soak.runs} scenario runs (sanity probes included) in "
            f"{soak.seconds:.1f} s ({soak.runs / soak.seconds:.0f} runs/s); "
            f"{len(soak.first)} distinct (behaviour, dialect, scenario, TLS) results"
        )
        print(f"verdict changes between passes: {len(soak.changes)}")
        for line in soak.changes:
            print(f"  CHANGE {line}")
        print(f"mismatches with SERVER_EXPECTED: {len(soak.mismatches)}")
        for line in soak.mismatches:
            print(f"  MISMATCH {line}")
        failed |= bool(soak.changes or soak.mismatches)
    if args.resource_runs > 0:
        made, seconds, before, after, rss0, rss1 = asyncio.run(
            resources(args.resource_runs, versions, settings)
        )
        leak = any(after[k] > before[k] for k in before)
        print(
            f"resources: {made} scenario runs in {seconds:.1f} s ({made / seconds:.0f} runs/s): "
            f"fds {before['fds']} -> {after['fds']}, sockets {before['sockets']} -> "
            f"{after['sockets']}, tasks {before['tasks']} -> {after['tasks']}, "
            f"RSS {rss0:.1f} -> {rss1:.1f} MiB" + ("  LEAK" if leak else "")
        )
        failed |= leak
    print("soak: FAILED" if failed else "soak: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
