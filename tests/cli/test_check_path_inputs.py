"""check-path, the command added after issue 11: bad inputs are one line, exit 2, up front.

The same promises as ``check`` and ``check-client`` (issue 11.4, 11.5): an
option that cannot work is named before anything runs, and a closed pipe is
no traceback.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import List, Tuple

from test_cli import _closed_pipe_run, _serve, run_cli

CLIENT = ["--", sys.executable, "-c", "pass", "{port}"]


def _bad_inputs(tmp: Path) -> List[Tuple[List[str], str]]:
    blocker = tmp / "a-file"
    blocker.write_text("x")
    not_pem = tmp / "not-a-cert.pem"
    not_pem.write_text("hello\n")
    path = ["check-path", "ftp://127.0.0.1:1"]
    return [
        ([*path, "--json", str(blocker / "r.json"), *CLIENT], "--json"),
        ([*path, "--json", str(tmp), *CLIENT], "--json"),
        ([*path, "--junit-xml", str(blocker / "j.xml"), *CLIENT], "--junit-xml"),
        ([*path, "--jsonl", str(blocker / "r.jsonl"), *CLIENT], "--jsonl"),
        ([*path, "--evidence", str(blocker), *CLIENT], "--evidence"),
        ([*path, "--capture", str(blocker), *CLIENT], "--capture"),
        ([*path, "--capture-all", *CLIENT], "--capture-all"),
        ([*path, "--cafile", str(not_pem), *CLIENT], "--cafile"),
        ([*path, "--timeout", "nan", *CLIENT], "--timeout"),
        ([*path, "--reply-timeout", "-1", *CLIENT], "--reply-timeout"),
        ([*path, "--concurrency", "0", *CLIENT], "--concurrency"),
        ([*path, "--server-keylog", str(tmp), *CLIENT], "--server-keylog"),
        ([*path, "--only", "no-such-*", *CLIENT], "--only"),
        ([*path, "--", "no-such-client-program", "{port}"], "no-such-client-program"),
        (path, "give the client command"),
        (["check-path", "gopher://127.0.0.1:70", *CLIENT], "gopher://"),
        (["check-path", "ftp://127.0.0.1", *CLIENT], "PORT"),
        ([*path, *CLIENT], "cannot connect to 127.0.0.1:1"),
    ]


def test_check_path_bad_inputs_are_one_line_and_exit_2(tmp_path: Path) -> None:
    for args, named in _bad_inputs(tmp_path):
        started = time.monotonic()
        code, out, err = run_cli(*args)
        assert code == 2, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("starttls-harness: "), (args, err)
        assert named in lines[0], (args, err)
        assert "scenario runs" not in out and "ERROR" not in out, (args, out)
        assert time.monotonic() - started < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "not-a-cert.pem"]


def test_check_path_into_a_closed_pipe_is_no_traceback() -> None:
    code, err = _closed_pipe_run("check-path", "--help")
    assert code == 0 and "Traceback" not in err, err


def test_a_client_command_without_port_is_one_line_before_any_run() -> None:
    """Was 13 error rows ("harness error: MissingPortPlaceholder"), exit 2."""

    async def body() -> Tuple[int, str, str]:
        async with _serve("ftp") as served:
            return await asyncio.to_thread(
                run_cli,
                "check-path",
                f"ftp://127.0.0.1:{served.port}",
                "--",
                sys.executable,
                "-c",
                "pass",
            )

    code, out, err = asyncio.run(body())
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "{port}" in lines[0], err
    assert "scenario runs" not in out and "ERROR" not in out, out
