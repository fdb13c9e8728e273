"""The command line as a user meets it: real processes, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
from pathlib import Path
from typing import AsyncIterator, List, Tuple

import jsonschema
import pytest
import xmlschema
from starttls_harness.cli import main

SCHEMAS = Path(__file__).resolve().parent.parent / "harness" / "report" / "schemas"
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
