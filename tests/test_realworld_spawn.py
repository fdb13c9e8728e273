"""The real tier's server start: ready, exited or too slow, and nothing left running."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from realworld.instances import NotReady, spawn_until_ready, stop_session

SLEEPER = [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)"]


def test_a_ready_server_is_returned_running_and_stopped_with_its_session(tmp_path: Path) -> None:
    process = spawn_until_ready(SLEEPER, tmp_path / "out", lambda: True, "sleeper", 5.0, str)
    assert process.poll() is None
    stop_session(process, 5.0)
    assert process.poll() is not None
    stop_session(process, 5.0)  # twice is harmless


def test_a_server_that_exits_is_not_ready_with_its_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(NotReady, match=r"quitter exited \(3\):\nthe log"):
        spawn_until_ready(argv, tmp_path / "out", lambda: False, "quitter", 5.0, lambda: "the log")


def test_a_server_too_slow_is_not_ready_and_killed(tmp_path: Path) -> None:
    seen = []

    def never() -> bool:
        seen.append(1)
        return False

    out = tmp_path / "out"
    with pytest.raises(NotReady, match=r"slow did not answer within 2 s"):
        spawn_until_ready(SLEEPER, out, never, "slow", 2.0, str)
    assert len(seen) >= 2  # polled, not waited once
    pid = int(out.read_text().split()[0])  # written at once: a Python starts well within 2 s
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped before NotReady was raised
