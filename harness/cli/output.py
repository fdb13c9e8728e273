"""Terminal output: the progress line, pipe safety, the closing line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from typing import (
    Any,
    Dict,
    Iterator,
    List,
    Optional,
    Set,
    TextIO,
)

from starttls_harness.report.verdicts import Result, Verdict


class _Progress:
    """On a terminal, one line redrawn in place; elsewhere (CI logs) one line
    per target when its runs are done, never one per scenario."""

    def __init__(self, total: int, out: TextIO, quiet: bool) -> None:
        self.total = total
        self.done = 0
        self.out = out
        self.quiet = quiet
        self.tty = out.isatty()
        self.job_done = 0
        self.job_t0 = time.monotonic()
        self.counts: Dict[str, int] = {}

    def __call__(self, result: Result) -> None:
        self.done += 1
        self.job_done += 1
        self.counts[result.verdict.value] = self.counts.get(result.verdict.value, 0) + 1
        if self.quiet or not self.tty:
            return
        line = (
            f"[{self.done:>3}/{self.total}] {result.verdict.value:<5} "
            f"{result.id} ({result.dialect}, TLS {result.tls_version})"
        )
        # A line wider than the terminal would wrap, and \r redraws only the last row.
        self.out.write("\r\033[K" + line[: max(1, self._columns() - 1)])
        self.out.flush()

    def _columns(self) -> int:
        """The width of the terminal the progress goes to (not stdout's)."""
        try:
            return os.get_terminal_size(self.out.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            return shutil.get_terminal_size((80, 24)).columns

    def job_finished(
        self, label: str, mine: Optional[List[Result]] = None, started: Optional[float] = None
    ) -> None:
        """One target's runs are over: a heartbeat line in a log.

        ``mine``/``started``: that target's results and start (monotonic), when
        targets run side by side (the running tallies then mix targets).
        """
        if not self.quiet and not self.tty:
            counts, done = self.counts, self.job_done
            if mine is not None:
                counts = {}
                for r in mine:
                    counts[r.verdict.value] = counts.get(r.verdict.value, 0) + 1
                done = len(mine)
            verdicts = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
            took = time.monotonic() - (self.job_t0 if started is None else started)
            self.out.write(f"{label}: {done} runs in {took:.2f} s ({verdicts})\n")
            self.out.flush()
        self.job_done = 0
        self.counts = {}
        self.job_t0 = time.monotonic()

    def close(self) -> None:
        """Leave the terminal line empty for the table."""
        if not self.quiet and self.tty and self.done:
            self.out.write("\r\033[K")
            self.out.flush()


def _after_reference_run(runs: int, verdicts: Set[Verdict]) -> str:
    """One line: what a run against the built-in peers proved, and what next."""

    if Verdict.FAIL in verdicts or Verdict.ERROR in verdicts:
        return (
            "the built-in reference peers should pass everything: this is a bug in "
            "starttls-harness or its set-up here; please report it with the --evidence files"
        )
    return (
        f"proved: all {runs} runs pass against the built-in conforming peers, so the harness "
        "works on this machine. Next, yours: `starttls-harness check smtp://your-server:25` "
        "(a server), `starttls-harness check-client --protocol smtp -- your-client ...` "
        "(a client)"
    )


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _PipeSafe:
    """A text stream that survives its reader going away (``| head``).

    The first write to a closed pipe points the file descriptor at
    /dev/null, so the command runs to its end -- reports written, the exit
    status true to the verdicts -- without a BrokenPipeError traceback, now
    or when the interpreter flushes the stream at exit.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._divert()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._divert()

    def _divert(self) -> None:
        self.broken = True
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError, AttributeError):
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)

    def isatty(self) -> bool:
        return not self.broken and self._stream.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _pipe_safe_streams() -> Iterator[None]:
    """sys.stdout and sys.stderr as _PipeSafe streams, for one command."""
    saved = sys.stdout, sys.stderr
    sys.stdout = _PipeSafe(saved[0])
    sys.stderr = _PipeSafe(saved[1])
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        sys.stdout, sys.stderr = saved
