"""The command line as a user meets it: real processes, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator, List, Tuple

import jsonschema
import pytest
import xmlschema
from starttls_harness.cli import main
from starttls_harness.dialects import names

SCHEMAS = Path(__file__).resolve().parents[2] / "harness" / "report" / "schemas"
CLI = [sys.executable, "-m", "starttls_harness"]


def run_cli(*args: str, timeout: float = 120) -> Tuple[int, str, str]:
    async def go() -> Tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    return asyncio.run(go())


class Served:
    """A ``starttls-harness serve`` process and what it printed."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, cafile: str) -> None:
        self.proc = proc
        self.port = port
        self.cafile = cafile


@contextlib.asynccontextmanager
async def _serve(*args: str) -> AsyncIterator[Served]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, "serve", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    lines: List[str] = []
    try:
        while not any("Ctrl-C" in line for line in lines):
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line, f"serve exited early: {lines}"
            lines.append(line)
        text = "".join(lines)
        port = int(re.search(r"on 127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
        cafile = re.search(r"trust this CA:\s+(\S+)", text).group(1)  # type: ignore[union-attr]
        yield Served(proc, port, cafile)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


def test_help_teaches_and_version_answers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in ("check", "serve", "proxy", "examples:"):
        assert word in out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert re.match(r"starttls-harness \d+\.\d+", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    assert "exit status" in capsys.readouterr().out


def test_main_job_passes_and_reports(tmp_path: Path) -> None:
    code, out, err = run_cli(
        "check",
        "--json",
        str(tmp_path / "r.json"),
        "--junit-xml",
        str(tmp_path / "j.xml"),
    )
    assert code == 0, out + err
    assert "FAIL" not in out and "ERROR" not in out
    doc = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(doc, json.loads((SCHEMAS / "report.schema.json").read_text()))
    assert doc["counts"]["pass"] == len(doc["results"]) > 0
    xmlschema.XMLSchema(str(SCHEMAS / "junit.xsd")).validate(str(tmp_path / "j.xml"))
    assert "Traceback" not in err


def test_check_names_the_failing_scenario(tmp_path: Path) -> None:
    evidence = tmp_path / "ev"

    async def go() -> Tuple[int, str, str]:
        async with _serve("smtp", "--behaviour", "keep-buffer") as served:
            return await asyncio.to_thread(
                run_cli,
                "check",
                f"smtp://127.0.0.1:{served.port}",
                "--cafile",
                served.cafile,
                "--server-name",
                "localhost",
                "--only",
                "server.command-injection*",
                "--evidence",
                str(evidence),
                "--json",
                str(tmp_path / "r.json"),
                "--junit-xml",
                str(tmp_path / "j.xml"),
            )

    code, out, err = asyncio.run(go())
    assert code == 1, out + err
    assert re.search(r"server\.command-injection\s+smtp\s+1\.3\s+FAIL", out)
    ladder = (evidence / "server.command-injection-smtp-tls1.3.txt").read_text()
    assert "INJECTED" in ladder and "XHARNESS-INJECTED" in ladder
    keys = evidence / "server.command-injection-smtp-tls1.3.keys"
    assert keys.stat().st_mode & 0o777 == 0o600
    assert "CLIENT_TRAFFIC_SECRET_0" in keys.read_text() or "CLIENT_RANDOM" in keys.read_text()
    doc = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(doc, json.loads((SCHEMAS / "report.schema.json").read_text()))
    failed = [r for r in doc["results"] if r["verdict"] == "fail"]
    assert failed and all(r["rule"] == "R1" for r in failed)
    assert any(e["kind"] == "injected" for e in failed[0]["evidence"])
    xmlschema.XMLSchema(str(SCHEMAS / "junit.xsd")).validate(str(tmp_path / "j.xml"))
    assert "<failure" in (tmp_path / "j.xml").read_text()


def test_unreachable_target_is_one_clear_line() -> None:
    code, _out, err = run_cli("check", "smtp://127.0.0.1:1", "--reply-timeout", "2")
    assert code == 2
    assert "cannot connect to 127.0.0.1:1" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["check", "ftp://x:21"],
        ["check", "smtp://host-without-port"],
        ["check", "--only", "no-such-scenario"],
        ["check", "--timeout", "0"],
        ["serve", "smtp", "--behaviour", "no-such-behaviour"],
        ["proxy", "--listen", "127.0.0.1:0"],
        ["proxy", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--fault", "nope"],
    ],
)
def test_wrong_usage_exits_2_without_traceback(args: List[str]) -> None:
    code, out, err = run_cli(*args)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert err.strip()


def test_serve_prints_address_and_stops_on_ctrl_c() -> None:
    async def go() -> int:
        async with _serve("imap", "--port", "0", "--tls-version", "1.3") as served:
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            greeting = await asyncio.wait_for(reader.readline(), 5)
            assert greeting.startswith(b"* OK")
            writer.close()
            served.proc.send_signal(signal.SIGINT)
            return await asyncio.wait_for(served.proc.wait(), 10)

    assert asyncio.run(go()) == 0


def test_behaviours_lists_every_mode() -> None:
    code, out, _ = run_cli("behaviours")
    assert code == 0
    for name in ("keep-buffer", "early-plaintext", "downgrade", "accept-injected-response"):
        assert name in out


def test_storage_probe_is_wired_and_checked() -> None:
    code, _, err = run_cli("check", "smtp://127.0.0.1:1", "--storage-probe", "/bin/false")
    assert code == 2 and "--storage-probe" in err and "Traceback" not in err

    async def go() -> Tuple[int, str, str]:
        async with _serve("smtp") as served:
            return await asyncio.to_thread(
                run_cli,
                "check",
                f"smtp://127.0.0.1:{served.port}",
                "--only",
                "server.truncation",
                "--storage-probe",
                f"{sys.executable} -c 'print(7)'",
            )

    code, out, err = asyncio.run(go())
    assert code == 0, out + err
    assert re.search(r"server\.truncation\s+smtp\s+1\.3\s+PASS\s+discarded", out)


SMTPLIB_CLIENT = """
import smtplib, ssl, sys
host, port, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=cafile)
with smtplib.SMTP(host, port, timeout=5) as s:
    s.starttls(context=ctx)
    s.login("tester", "secret")
    s.sendmail("a@example.org", ["b@example.org"], "Subject: x\\r\\n\\r\\nhi\\r\\n")
"""

IMAPLIB_CLIENT = """
import imaplib, ssl, sys
host, port, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=cafile)
m = imaplib.IMAP4(host, port, timeout=5)
m.starttls(ssl_context=ctx)
m.login("tester", "secret")
m.append("INBOX", None, None, b"Subject: x\\r\\n\\r\\nhi\\r\\n")
m.logout()
"""


@pytest.mark.parametrize(
    ("protocol", "script", "code", "verdicts"),
    [
        # smtplib reads a FIN without close_notify as a clean end (ragged EOFs
        # are suppressed) and takes the cut reply for a whole one.
        ("smtp", SMTPLIB_CLIENT, 1, {"client.truncation": "FAIL", "client.state-reset": "PASS"}),
        (
            "imap",
            IMAPLIB_CLIENT,
            0,
            {"client.truncation": "PASS", "client.starttls-stripped": "PASS"},
        ),
    ],
)
def test_check_client_with_stdlib_clients(
    tmp_path: Path,
    protocol: str,
    script: str,
    code: int,
    verdicts: dict,  # type: ignore[type-arg]
) -> None:
    path = tmp_path / "client.py"
    path.write_text(script)
    got, out, err = run_cli(
        "check-client",
        "--protocol",
        protocol,
        "--tls-version",
        "1.3",
        "--json",
        str(tmp_path / "r.json"),
        "--",
        sys.executable,
        str(path),
        "{host}",
        "{port}",
        "{cafile}",
    )
    assert got == code, out + err
    for scenario, verdict in verdicts.items():
        assert re.search(rf"{re.escape(scenario)}\s+{protocol}\s+1\.3\s+{verdict}", out), out
    doc = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(doc, json.loads((SCHEMAS / "report.schema.json").read_text()))


@pytest.mark.parametrize("protocol", ["smtp", "imap"])
def test_check_client_with_the_reference_client(protocol: str) -> None:
    code, out, err = run_cli(
        "check-client",
        "--protocol",
        protocol,
        "--",
        *CLI,
        "client",
        protocol,
        "--port",
        "{port}",
        "--cafile",
        "{cafile}",
        "--tls-version",
        "{tls_version}",
        "--cycles",
        "{cycles}",
    )
    assert code == 0, out + err
    assert "FAIL" not in out and "ERROR" not in out and "SKIP" not in out


def test_check_client_needs_a_command() -> None:
    code, _, err = run_cli("check-client", "--protocol", "smtp")
    assert code == 2 and "give the client command" in err
    code, _, err = run_cli("check-client", "--protocol", "smtp", "--", "/no/such/program")
    assert code == 2 and "not found" in err


# ------------------------------------------------- a newcomer's first hour


def _bad_inputs(tmp: Path) -> List[Tuple[List[str], str]]:
    """(arguments, what the one line must name): checked before anything runs."""
    blocker = tmp / "a-file"
    blocker.write_text("x")
    not_pem = tmp / "not-a-cert.pem"
    not_pem.write_text("hello\n")
    check = ["check", "--only", "server.command-injection"]
    client = ["check-client", "--protocol", "smtp"]
    command = ["--", sys.executable, "-c", "pass"]
    return [
        ([*check, "--json", str(blocker / "r.json")], "--json"),
        ([*check, "--json", "/proc/no-such/r.json"], "--json"),
        ([*check, "--json", str(tmp)], "--json"),
        ([*check, "--junit-xml", str(blocker / "j.xml")], "--junit-xml"),
        ([*check, "--evidence", str(blocker / "ev")], "--evidence"),
        ([*check, "--evidence", str(blocker)], "--evidence"),
        ([*check, "--cafile", str(not_pem)], "--cafile"),
        ([*check, "--cafile", str(tmp)], "--cafile"),
        ([*check, "--timeout", "nan"], "--timeout"),
        ([*check, "--timeout", "-1"], "--timeout"),
        ([*check, "--timeout", "inf"], "--timeout"),
        ([*check, "--reply-timeout", "nan"], "--reply-timeout"),
        ([*client, "--timeout", "nan", *command], "--timeout"),
        ([*client, "--json", str(blocker / "r.json"), *command], "--json"),
        (["client", "smtp", "--port", "1", "--cafile", str(not_pem)], "--cafile"),
        (["client", "smtp", "--port", "1", "--cafile", str(not_pem), "--timeout", "inf"], ""),
        (["serve", "smtp", "--state-dir", str(blocker / "state")], "--state-dir"),
        (["serve", "smtp", "--port", "70000"], "--port"),
        (["client", "smtp", "--port", "0", "--cafile", str(not_pem)], "--port"),
    ]


def test_bad_inputs_are_one_line_and_exit_2_before_running(tmp_path: Path) -> None:
    for args, named in _bad_inputs(tmp_path):
        started = time.monotonic()
        code, out, err = run_cli(*args)
        assert code == 2, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("starttls-harness: "), (args, err)
        assert named in lines[0], (args, err)
        assert "checking" not in out and "scenario runs" not in out, (args, out)
        assert time.monotonic() - started < 30
    assert not list((tmp_path / "a-file").parent.glob("*.json"))


def _closed_pipe_run(*args: str, timeout: float = 120) -> Tuple[int, str]:
    """Run the command with stdout a pipe whose reader is already gone (``| head``)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [*CLI, *args], stdout=write, stderr=subprocess.PIPE, timeout=timeout, check=False
        )
    finally:
        os.close(write)
    return proc.returncode, proc.stderr.decode()


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["check", "--help"],
        ["behaviours"],
        ["scenarios", "--long"],
        ["states"],
        ["states", "--dot"],
        ["proxy", "--list-faults"],
        ["check", "--only", "server.command-injection", "--only", "client.truncation", "-q"],
        [
            "check-client",
            "--protocol",
            "smtp",
            "--only",
            "client.starttls-refused",
            "--",
            sys.executable,
            "-c",
            "import sys; sys.exit(1)",
            "{port}",
        ],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_a_closed_pipe_is_no_traceback(args: List[str]) -> None:
    code, err = _closed_pipe_run(*args)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err
    assert code in (0, 1, 2), err  # the exit status of the command itself


def test_a_closed_pipe_still_writes_the_report(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    code, err = _closed_pipe_run("check", "--only", "server.truncation", "--json", str(report))
    assert code == 0 and "Traceback" not in err, err
    # one truncation run per TLS version against each registered dialect's server
    assert json.loads(report.read_text())["counts"]["pass"] == 2 * len(names())


def test_serve_and_client_survive_a_closed_pipe() -> None:
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.Popen([*CLI, "serve", "smtp"], stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    try:
        # serve keeps serving with nobody reading; it stops cleanly on Ctrl-C.
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in err.decode(), err.decode()


def test_scenarios_lists_every_role_and_filters() -> None:
    from starttls_harness.scenarios.catalogue import everything

    code, out, _ = run_cli("scenarios")
    assert code == 0
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert listed == {s.id for s in everything()}
    assert {i.split(".")[0] for i in listed} == {"server", "client", "path"}
    for role in ("server", "client", "path"):
        code, out, _ = run_cli("scenarios", "--role", role)
        ids = {line.split()[0] for line in out.splitlines() if line.strip()}
        assert code == 0 and ids and all(i.startswith(role + ".") for i in ids), out
    code, out, _ = run_cli("scenarios", "--role", "path", "--long")
    assert code == 0 and "reference:" in out and "why:" in out
    assert "docs/rules.md" in out and "closure-rules" not in out and "shared/" not in out


def test_rules_live_in_the_projects_own_docs() -> None:
    root = Path(__file__).resolve().parents[2]
    rules = (root / "docs" / "rules.md").read_text()
    for word in [f"R{n}" for n in range(1, 10)] + ["STOPTLS", "close_notify"]:
        assert f"**{word}**" in rules or word in rules, word
    for verdict in ("pass", "fail", "warn", "skip", "error"):
        assert f"`{verdict}`" in rules, verdict
    readme = (root / "README.md").read_text()
    assert "(docs/rules.md)" in readme
    assert "shared/spec" not in readme and "closure-rules" not in readme
    code, out, _ = run_cli("scenarios", "--help")
    assert code == 0 and "docs/rules.md" in out


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_removes_its_private_key_and_keeps_aiosmtpd_quiet(how: int) -> None:
    async def go() -> Tuple[int, Path, bytes]:
        async with _serve("smtp") as served:
            state = Path(served.cafile).parent
            assert (state / "server.key").exists()
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            await reader.readline()
            writer.write(b"EHLO x\r\nNO-SUCH-COMMAND\r\nQUIT\r\n")
            await writer.drain()
            while await asyncio.wait_for(reader.readline(), 5):
                pass  # until the server closes after QUIT
            writer.close()
            served.proc.send_signal(how)
            code = await asyncio.wait_for(served.proc.wait(), 10)
            assert served.proc.stderr is not None
            return code, state, await served.proc.stderr.read()

    code, state, err = asyncio.run(go())
    assert code == 0
    assert not state.exists()
    assert err == b"", err  # aiosmtpd's "unrecognised: NO-SUCH-COMMAND" stays out


def test_serve_keeps_a_state_dir_it_was_given(tmp_path: Path) -> None:
    async def go() -> None:
        async with _serve("imap", "--state-dir", str(tmp_path / "state")) as served:
            assert Path(served.cafile).parent == tmp_path / "state"

    asyncio.run(go())
    assert (tmp_path / "state" / "ca.pem").exists()


def test_proxy_banner_is_printed_once() -> None:
    async def go() -> str:
        async with _serve("smtp") as served:
            proc = await asyncio.create_subprocess_exec(
                *CLI,
                "proxy",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                f"127.0.0.1:{served.port}",
                "--fault",
                "inject-after-starttls:c2s",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            assert proc.stdout is not None
            lines = []
            while not lines or "Ctrl-C" not in lines[-1]:
                line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
                assert line, lines
                lines.append(line)
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 10)
            return "".join(lines)

    out = asyncio.run(go())
    assert out.count("127.0.0.1:") == 2, out  # listen -> upstream, once
    assert out.count("fault: ") == 1, out


def test_ci_log_has_no_line_per_scenario_and_a_closing_line() -> None:
    code, out, err = run_cli("check", "--only", "server.truncation", "--only", "client.truncation")
    assert code == 0, out + err
    assert "[  1/" not in err and "server.truncation (" not in err
    # one heartbeat per target, not per scenario: a server and a client per dialect
    assert len(err.strip().splitlines()) == 2 * len(names()), err
    last = out.strip().splitlines()[-1]
    assert last.startswith("proved:") and "check smtp://your-server:25" in last
    assert "check-client --protocol smtp -- your-client" in last


def test_terminal_progress_redraws_one_line() -> None:
    import fcntl
    import pty
    import struct
    import termios

    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [*CLI, "check", "--only", "server.truncation"],
        stdout=subprocess.PIPE,
        stderr=child,
        env=env,
    )
    os.close(child)
    out, _ = proc.communicate(timeout=120)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the child side is gone
        while True:
            data = os.read(parent, 4096)
            if not data:
                break
            chunks.append(data)
    os.close(parent)
    shown = b"".join(chunks).decode()
    assert proc.returncode == 0, out
    assert shown.count("\r\033[K") >= 4 and "\n" not in shown.replace("\r\n", "\n").strip("\n")
    # never wider than the (40-column) terminal, or \r could not redraw it
    drawn = shown.replace("\033[K", "").split("\r")
    assert drawn and max(len(line) for line in drawn) < 40, drawn


def test_ladder_fits_100_columns_and_keeps_words(tmp_path: Path) -> None:
    evidence = tmp_path / "ev"

    async def go() -> int:
        async with _serve("smtp", "--behaviour", "no-state-reset") as served:
            code, _, _ = await asyncio.to_thread(
                run_cli,
                "check",
                f"smtp://127.0.0.1:{served.port}",
                "--only",
                "server.state-reset",
                "--evidence",
                str(evidence),
            )
            return code

    assert asyncio.run(go()) == 1
    text = (evidence / "server.state-reset-smtp-tls1.3.txt").read_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "FROM:<state-control@harness.invalid>" in text  # not cut in two


# ------------------------------------------------- one cause, one line


def test_a_client_command_without_port_is_a_usage_error() -> None:
    code, out, err = run_cli("check-client", "--protocol", "smtp", "--", sys.executable, "-V")
    assert code == 2, out + err
    assert "{port}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_target_of_another_protocol_is_one_line() -> None:
    """An SMTP server checked as IMAP: one line that says what it looks like."""

    async def body() -> Tuple[int, str, str]:
        async with _serve("smtp", "--port", "0") as served:
            proc = await asyncio.create_subprocess_exec(
                *CLI,
                "check",
                f"imap://127.0.0.1:{served.port}",
                "--cafile",
                served.cafile,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

    code, out, err = asyncio.run(body())
    assert code == 2, out + err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "SMTP" in lines[0], err
    assert "ERROR" not in out  # no row per scenario for one cause


def test_the_reference_client_follows_the_servers_tls_version() -> None:
    """`client` offers what both sides speak by default (the README's example)."""
    code, out, err = run_cli(
        "check-client",
        "--protocol",
        "imap",
        "--tls-version",
        "1.2",
        "--only",
        "client.stoptls-cycle",
        "--",
        *CLI,
        "client",
        "imap",
        "--port",
        "{port}",
        "--cafile",
        "{cafile}",
    )
    assert code == 0, out + err
    assert "PASS" in out and "ERROR" not in out
