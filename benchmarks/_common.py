"""Timing helpers and the description of the machine a result came from."""

from __future__ import annotations

import os
import platform
import ssl
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

__all__ = ["Timing", "machine", "time_batches"]


@dataclass
class Timing:
    """Seconds per operation over several batches.

    ``per_op`` is wall-clock time, ``cpu_per_op`` the process's CPU time
    (user + system, all threads).  On a shared machine other work only ever
    adds time, so the *best* batch is the least disturbed estimate (as
    ``timeit`` advises): the ratios to the floor are best-to-best CPU time;
    the median is printed next to it to show the spread.
    """

    name: str
    per_op: List[float] = field(default_factory=list)
    cpu_per_op: List[float] = field(default_factory=list)
    ops: int = 0

    @property
    def cpu(self) -> float:
        """Best batch, CPU time per operation (the figure ratios use)."""
        return min(self.cpu_per_op) if self.cpu_per_op else float("nan")

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_per_op) if self.cpu_per_op else float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.per_op) if self.per_op else float("nan")

    @property
    def best(self) -> float:
        return min(self.per_op) if self.per_op else float("nan")

    @property
    def rate(self) -> float:
        """Operations per CPU second (best batch)."""
        return 1.0 / self.cpu if self.cpu_per_op else float("nan")

    def add(self, seconds: float, ops: int, cpu: Optional[float] = None) -> None:
        self.per_op.append(seconds / ops)
        if cpu is not None:
            self.cpu_per_op.append(cpu / ops)
        self.ops += ops

    def as_dict(self) -> Dict[str, object]:
        return {
            "name": self.name,
            "median_s": self.median,
            "cpu_best_s": self.cpu,
            "cpu_median_s": self.cpu_median,
            "best_s": self.best,
            "per_second": self.rate,
            "ops": self.ops,
            "batches": len(self.per_op),
        }


def time_batches(
    timings: Dict[str, Timing], runners: Dict[str, Callable[[int], None]], n: int, batches: int
) -> None:
    """Run the batches of every runner *interleaved*, so that noise from the
    rest of the machine hits all of them alike."""
    for runner in runners.values():
        runner(max(1, n // 10))  # warm up caches, imports, the allocator
    for _ in range(batches):
        for name, runner in runners.items():
            cpu = time.process_time()
            start = time.perf_counter()
            runner(n)
            wall = time.perf_counter() - start
            timings[name].add(wall, n, time.process_time() - cpu)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> Dict[str, object]:
    """nproc, CPU model, Python and OpenSSL versions, load (for the README)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = (float("nan"),) * 3
    return {
        "nproc": cores,
        "cpu": _cpu_model(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "openssl": ssl.OPENSSL_VERSION,
        "platform": platform.platform(),
        "loadavg": tuple(round(x, 2) for x in load),
    }
