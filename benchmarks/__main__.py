"""``python -m benchmarks``: run every benchmark and print the ratios to the floor.

Options: ``--quick`` (fewer cycles, for a smoke run), ``--only`` to pick
parts (``floor``, ``catalogue``, ``proxy``), ``--tls`` to pick versions,
``--json FILE`` to keep the numbers.  Run it from the repository root on an
otherwise idle machine.  Every figure is the best of interleaved batches (other
work on the machine only ever adds time); medians are printed to show the spread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional

from starttls_harness.run.server import RunSettings
from starttls_harness.scenarios.server import by_id
from starttls_harness.tls.certs import make_pki

from ._common import Timing, machine, time_batches
from .bare_asyncio import BareBench
from .bare_asyncio import loop_runner as bare_runner
from .catalogue import CatalogueRun, catalogue_runs, missing_roles
from .engine import EngineBench, loop_runner, pair_cycle
from .floor import Floor
from .proxy import proxy_latency

FLOOR = "floor: SSLObject lock-step, 1 thread"
TARGET_ENGINE = 1.5
TARGET_CATALOGUE = 2.0
#: Issue 9: the whole catalogue (all roles) within this of runs x floor.
TARGET_WHOLE = 3.0


def _loops() -> Dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    loops: Dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return loops
    loops["uvloop"] = uvloop.new_event_loop
    return loops


def _repeat(n: int, func: Callable[..., None], *args: Any) -> None:
    for _ in range(n):
        func(*args)


def bench_cycles(version: str, n: int, batches: int) -> Dict[str, Timing]:
    """(a) and (b) for one TLS version, all runners interleaved."""
    pki = make_pki()
    cctx, sctx = pki.client_context(version), pki.server_context(version)
    floor = Floor(cctx, sctx)
    lockstep, threaded, memory = floor.runners()
    runners: Dict[str, Callable[[int], None]] = {
        FLOOR: lockstep,
        "ssl.SSLSocket, server thread": threaded,
        "in memory: SSLObject pair": memory,
        "in memory: engine Pair": lambda k: _repeat(k, pair_cycle, cctx, sctx),
    }
    loops: List[asyncio.AbstractEventLoop] = []
    benches: List[Any] = []
    try:
        for name, factory in _loops().items():
            loop = factory()
            bare = BareBench(cctx, sctx)
            bench = EngineBench(cctx, sctx)
            loop.run_until_complete(bare.start())
            loop.run_until_complete(bench.start())
            loops += [loop, loop]
            benches += [bare, bench]
            runners[f"{name} + SSLObject, no engine"] = bare_runner(loop, bare)
            runners[f"engine + starttls_harness.tls.aio ({name})"] = loop_runner(loop, bench)
        timings = {name: Timing(name) for name in runners}
        time_batches(timings, runners, n, batches)
        return timings
    finally:
        for loop, bench in zip(loops, benches):
            loop.run_until_complete(bench.close())
        for loop in set(loops):
            loop.close()
        floor.close()


def _weight(run: CatalogueRun) -> int:
    """Scenario runs weighted by TLS handshakes (a stoptls-cycle run does 4)."""
    total = run.sanity_runs
    for r in run.results:
        try:
            steps = by_id(r.id).steps
        except KeyError:
            total += 1
            continue
        total += max(1, sum(1 for s in steps if s.action == "handshake"))
    return total


def _print_cycles(version: str, timings: Dict[str, Timing]) -> None:
    floor = timings[FLOOR].cpu
    print(f"\nTLS {version}: one STARTTLS -> NOOP -> bidirectional close -> plaintext cycle")
    print(
        f"  {'(CPU time per cycle)':40} {'best ms':>8} {'median ms':>10} "
        f"{'cycles/s':>9} {'x floor':>8}"
    )
    for name, t in timings.items():
        mark = ""
        if name.startswith("engine"):
            mark = "  ok" if t.cpu / floor <= TARGET_ENGINE else f"  > {TARGET_ENGINE}x"
        print(
            f"  {name:40} {t.cpu * 1e3:8.3f} {t.cpu_median * 1e3:10.3f} {t.rate:9.0f} "
            f"{t.cpu / floor:8.2f}{mark}"
        )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer cycles (smoke run)")
    parser.add_argument(
        "--only", action="append", choices=("floor", "catalogue", "proxy"), help="repeatable"
    )
    parser.add_argument("--tls", action="append", choices=("1.2", "1.3"), help="repeatable")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    # aiosmtpd logs every unknown command the scenarios inject (as the CLI does).
    logging.getLogger("mail.log").setLevel(logging.CRITICAL)
    parts = set(args.only or ("floor", "catalogue", "proxy"))
    versions = args.tls or ["1.2", "1.3"]
    n, batches = (50, 3) if args.quick else (150, 11)
    info = machine()
    if sys.flags.dev_mode or os.environ.get("PYTHONASYNCIODEBUG"):
        print("warning: Python development mode / asyncio debug is on: the numbers are slower")
    out: Dict[str, Any] = {"machine": info}
    print(
        f"machine: {info['nproc']} cpu(s), {info['cpu']}; Python {info['python']}; "
        f"{info['openssl']}; load {info['loadavg']}"
    )
    floors: Dict[str, float] = {}
    if "floor" in parts or "catalogue" in parts:
        out["cycles"] = {}
        for version in versions:
            timings = bench_cycles(version, n, batches)
            floors[version] = timings[FLOOR].cpu
            out["cycles"][version] = {k: t.as_dict() for k, t in timings.items()}
            _print_cycles(version, timings)
    if "catalogue" in parts:
        floor = sum(floors.values()) / len(floors)
        missing = missing_roles()
        roles = ["server"] + [r for r in ("client", "path") if r not in missing]
        runs = asyncio.run(catalogue_runs(repeats=1 if args.quick else 3, roles=roles))
        cores = 1  # one event loop thread runs the harness and the peers
        print(
            f"\nfull catalogue vs the strict reference peers (floor {floor * 1e3:.3f} ms = "
            f"mean of TLS {'/'.join(versions)}; cores used: {cores}, the event loop's thread)"
        )
        print(
            f"  {'':34} {'runs':>5} {'seconds':>8} {'cpu s':>6} {'runs/s':>7} {'x floor':>8} "
            f"{'cpu x':>6} {'x floor/hs':>10}  slowest scenario"
        )
        out["catalogue"] = []
        for run in runs:
            ratio = run.seconds / (run.runs * floor / cores)
            cpu_ratio = run.cpu_seconds / (run.runs * floor / cores)
            weighted = run.seconds / (_weight(run) * floor / cores)
            slow = run.slowest
            slow_text = (
                f"{slow.id} [{slow.dialect} {slow.tls_version}] {slow.duration * 1e3:.1f} ms"
                if slow is not None
                else "-"
            )
            mark = "ok" if ratio <= TARGET_CATALOGUE else f"> {TARGET_CATALOGUE}x"
            print(
                f"  {run.role + ' ' + run.label:34} {run.runs:5d} {run.seconds:8.3f} "
                f"{run.cpu_seconds:6.3f} {run.per_second:7.0f} {ratio:8.2f} {cpu_ratio:6.2f} "
                f"{weighted:10.2f}  {slow_text}  {mark}"
            )
            entry = run.as_dict()
            entry.update(
                ratio_to_floor=ratio,
                cpu_ratio_to_floor=cpu_ratio,
                ratio_to_floor_per_handshake=weighted,
            )
            out["catalogue"].append(entry)
        for role in roles:
            mine = [r for r in runs if r.role == role]
            default = next(r for r in mine if r.label == f"c={RunSettings().concurrency}")
            high = mine[-1]
            verdict = (
                "no scenario waits on a timeout"
                if high.seconds < default.seconds + 1.0
                else "SOMETHING WAITS ON A TIMEOUT"
            )
            print(
                f"  {role}: reply_timeout 30 s vs default: {high.seconds:.3f} s vs "
                f"{default.seconds:.3f} s: {verdict}; verdicts {default.verdicts}"
            )
        at_default = [r for r in runs if r.label == f"c={RunSettings().concurrency}"]
        total_runs = sum(r.runs for r in at_default)
        total_s = sum(r.seconds for r in at_default)
        total_cpu = sum(r.cpu_seconds for r in at_default)
        whole = total_s / (total_runs * floor)
        mark = "ok" if whole <= TARGET_WHOLE else f"> {TARGET_WHOLE}x"
        print(
            f"  all roles at the default concurrency: {total_runs} runs in {total_s:.3f} s "
            f"({total_runs / total_s:.0f} runs/s, {whole:.2f} x floor; "
            f"CPU {total_cpu:.3f} s, {total_cpu / (total_runs * floor):.2f} x floor)  {mark}"
        )
        out["catalogue_whole"] = {
            "runs": total_runs,
            "seconds": total_s,
            "cpu_seconds": total_cpu,
            "ratio_to_floor": whole,
            "cpu_ratio_to_floor": total_cpu / (total_runs * floor),
        }
        for role, names in missing.items():
            print(f"  not measured: {role} scenarios (missing {', '.join(names)})")
        out["catalogue_missing_roles"] = missing
    if "proxy" in parts:
        version = versions[-1]
        timings = asyncio.run(
            proxy_latency(
                n=100 if args.quick else 500, batches=3 if args.quick else 7, tls_version=version
            )
        )
        print(f"\nproxy: NOOP round trips with the reference SMTP server (TLS {version})")
        print(f"  {'':18} {'us/round trip':>14} {'added us':>9} {'x direct':>9}")
        for kind in ("plain", "tls"):
            direct = timings[f"{kind} direct"].best
            via = timings[f"{kind} via proxy"].best
            print(f"  {kind + ' direct':18} {direct * 1e6:14.1f}")
            print(
                f"  {kind + ' via proxy':18} {via * 1e6:14.1f} {(via - direct) * 1e6:9.1f} "
                f"{via / direct:9.2f}"
            )
        out["proxy"] = {k: t.as_dict() for k, t in timings.items()}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
