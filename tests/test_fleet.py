"""Runs over many targets: several URLs, a targets file, side by side; JSON Lines;
going slowly (--max-connections, --rate); a load refusal named as the cause;
pcapng captures of the real bytes from the command line.

Real processes and sockets: ``starttls-harness serve`` reference servers on
loopback, the command line as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import AsyncIterator, Dict, List, Set, Tuple

import jsonschema
import pytest
from starttls_harness.report.verdicts import Verdict
from starttls_harness.run.pacing import Pacing, pacing, refusal
from starttls_harness.run.reference import reference_servers
from starttls_harness.run.server import RunSettings, run_server_target
from starttls_harness.scenarios.server import CATALOGUE, Scenario

pytest_plugins = ["pytester"]

SCHEMAS = Path(__file__).resolve().parent.parent / "harness" / "report" / "schemas"
CLI = [sys.executable, "-m", "starttls_harness"]
CLI_TIMEOUT = 180.0
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(
    TSHARK is None,
    reason="tshark is not installed (Debian package 'tshark'; .ci/install-test-tools.sh)",
)
FIELDS = ("frame.protocols", "smtp.req.command", "smtp.response", "frame.comment")


def dissect(path: Path) -> List[Dict[str, str]]:
    """One row per frame as tshark decodes it, with no key log file given."""
    assert TSHARK is not None
    fields = [arg for name in FIELDS for arg in ("-e", name)]
    shape = ["-T", "fields", "-E", "separator=/t", "-E", "occurrence=a", "-E", "aggregator=,"]
    proc = subprocess.run(
        [TSHARK, "-r", str(path), "-o", "tls.keylog_file:", *shape, *fields],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [dict(zip(FIELDS, line.split("\t"))) for line in proc.stdout.splitlines()]


def in_tls(row: Dict[str, str]) -> bool:
    return ":tls" in row["frame.protocols"]


class Served:
    """A ``starttls-harness serve`` process: its port."""

    def __init__(self, port: int) -> None:
        self.port = port


@contextlib.asynccontextmanager
async def _serve(*args: str) -> AsyncIterator[Served]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, "serve", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    text = ""
    try:
        while "Ctrl-C" not in text:
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line, f"serve exited early: {text}"
            text += line
        found = re.search(r"on 127\.0\.0\.1:(\d+)", text)
        assert found, text
        yield Served(int(found.group(1)))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


async def _cli(*args: str) -> Tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def _servers(*specs: Tuple[str, ...]) -> AsyncIterator[List[Served]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(_serve(*spec)) for spec in specs]


def _url(dialect: str, served: Served) -> str:
    return f"{dialect}://127.0.0.1:{served.port}"


def test_a_fleet_is_one_report_whose_results_name_their_target(tmp_path: Path) -> None:
    """Positional URLs plus a targets file; one conforming, one failing, one of each dialect."""
    json_path, jsonl_path, captures = tmp_path / "r.json", tmp_path / "r.jsonl", tmp_path / "cap"

    async def go() -> Tuple[int, str, str, List[str]]:
        specs = [("smtp",), ("imap",), ("smtp", "--behaviour", "keep-buffer")]
        async with _servers(*specs) as (good, imap, bad):
            urls = [_url("smtp", good), _url("imap", imap), _url("smtp", bad)]
            targets = tmp_path / "targets.txt"
            targets.write_text(f"# the fleet\n{urls[1]}   # imap\n\n{urls[2]}\n")
            result = await _cli(
                "check",
                urls[0],
                "--targets",
                str(targets),
                "--parallel",
                "3",
                "--only",
                "server.command-injection",
                "--tls-version",
                "1.3",
                "--json",
                str(json_path),
                "--jsonl",
                str(jsonl_path),
                "--capture",
                str(captures),
            )
            return (*result, urls)

    code, out, err, urls = asyncio.run(go())
    assert code == 1, out + err  # the exit status is over all targets: one failed
    doc = json.loads(json_path.read_text())
    jsonschema.validate(doc, json.loads((SCHEMAS / "report.schema.json").read_text()))
    assert doc["target"] == "3 targets"
    by_target = {r["target"]: r["verdict"] for r in doc["results"]}
    assert by_target == {urls[0]: "pass", urls[1]: "pass", urls[2]: "fail"}
    # The table: one group per target, in the order given, each with its tally.
    headers = [line for line in out.splitlines() if line.startswith("== ")]
    assert [h.split(": ")[0][3:] for h in headers] == urls
    assert headers[2].endswith("FAIL (1 fail)")
    # JSON Lines: one line per result, each naming its target.
    lines = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    assert sorted((r["target"], r["verdict"]) for r in lines) == sorted(by_target.items())
    assert stat.S_IMODE(jsonl_path.stat().st_mode) == 0o600
    # --capture: one pcapng, for the one result that did not pass, named by its target.
    files = sorted(captures.iterdir())
    assert [f.name for f in files] == [
        f"smtp_127.0.0.1_{urls[2].rsplit(':', 1)[1]}-server.command-injection-smtp-tls1.3.pcapng"
    ]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    if TSHARK is not None:
        rows = dissect(files[0])
        # keep-buffer answered the injected command inside TLS; tshark decrypts it alone.
        assert any(in_tls(r) and "XHARNESS-INJECTED" in r["smtp.response"] for r in rows)
        assert sum("injected by the harness" in r["frame.comment"] for r in rows) == 1


def test_a_fleet_of_mixed_dialects_with_an_unusable_target(tmp_path: Path) -> None:
    """LDAP, PostgreSQL and FTP side by side, and an LDAP URL that points at an SMTP
    server: one report, the unusable target's rows say what it answers like."""
    json_path = tmp_path / "r.json"

    async def go() -> Tuple[int, str, str, List[str]]:
        async with _servers(("ldap",), ("postgres",), ("ftp",), ("smtp",)) as servers:
            ldap, postgres, ftp, smtp = servers
            urls = [
                _url("ldap", ldap),
                _url("postgres", postgres),
                _url("ftp", ftp),
                _url("ldap", smtp),
            ]
            result = await _cli(
                "check",
                *urls,
                "--only",
                "server.command-injection",
                "--tls-version",
                "1.3",
                "--json",
                str(json_path),
            )
            return (*result, urls)

    code, out, err, urls = asyncio.run(go())
    assert code == 2, out + err  # an unusable target is an error of the run
    doc = json.loads(json_path.read_text())
    verdicts: Dict[str, Set[str]] = {}
    for r in doc["results"]:
        verdicts.setdefault(r["target"], set()).add(r["verdict"])
    assert verdicts == {urls[0]: {"pass"}, urls[1]: {"pass"}, urls[2]: {"pass"}, urls[3]: {"error"}}
    wrong = [r for r in doc["results"] if r["target"] == urls[3]]
    assert all("answers like SMTP, not LDAP" in r["summary"] for r in wrong)
    headers = [line for line in out.splitlines() if line.startswith("== ")]
    assert [h.split(": ")[0][3:] for h in headers] == urls


def test_jsonl_to_stdout_is_only_json(tmp_path: Path) -> None:
    async def go() -> Tuple[int, str, str]:
        async with _servers(("imap",)) as (imap,):
            return await _cli(
                "check", _url("imap", imap), "--only", "server.command-injection", "--jsonl", "-"
            )

    code, out, err = asyncio.run(go())
    assert code == 0, out + err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and {r["tls_version"] for r in rows} == {"1.2", "1.3"}
    assert "scenario runs in" in err  # the table went to stderr


def test_a_dead_target_of_a_fleet_is_an_error_result_not_the_end(tmp_path: Path) -> None:
    async def go() -> Tuple[int, str, str, str]:
        async with _servers(("smtp",)) as (good,):
            # A port nobody listens on: bind, note, close.
            probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
            dead = probe.sockets[0].getsockname()[1]
            probe.close()
            await probe.wait_closed()
            json_path = tmp_path / "r.json"
            code, out, err = await _cli(
                "check",
                _url("smtp", good),
                f"smtp://127.0.0.1:{dead}",
                "--only",
                "server.command-injection",
                "--json",
                str(json_path),
            )
            return code, out, err, json_path.read_text()

    code, out, err, text = asyncio.run(go())
    assert code == 2, out + err
    doc = json.loads(text)
    jsonschema.validate(doc, json.loads((SCHEMAS / "report.schema.json").read_text()))
    verdicts = sorted((r["id"], r["verdict"]) for r in doc["results"])
    assert verdicts == [
        ("server.command-injection", "pass"),
        ("server.command-injection", "pass"),
        ("target.reachable", "error"),
    ]


def test_load_refusal_is_reported_as_the_cause(tmp_path: Path) -> None:
    """A server that greets with 421 "too many connections" is not a STARTTLS failure."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"421 4.7.0 mx.example Too many connections from your host\r\n")
        await writer.drain()
        writer.close()

    async def go() -> Tuple[int, str, str]:
        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await _cli(
                "check", f"smtp://127.0.0.1:{port}", "--only", "server.command-injection", "-q"
            )
        finally:
            server.close()
            await server.wait_closed()

    code, out, err = asyncio.run(go())
    assert code == 2, out + err
    # One target, one cause: one line on stderr, no row per scenario.
    assert not [line for line in out.splitlines() if line.startswith("server.")]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "refused the connection for load" in lines[0] and "--max-connections" in lines[0]


@pytest.mark.parametrize(
    "greeting",
    [
        b"421 4.7.0 mx.example Too many connections from your host\r\n",
        b"* BYE Too many connections\r\n",
        b"421 There are too many connected users, please try later.\r\n",  # vsftpd
        b"421 Sorry, the maximum number of clients (5) from your host are already connected.\r\n",
        b"E\x00\x00\x00\x3eSFATAL\x00C53300\x00Msorry, too many clients already\x00\x00",
    ],
)
def test_load_refusals_of_every_kind_of_server_are_recognised(greeting: bytes) -> None:
    assert refusal(greeting) is not None


def test_a_greeting_is_not_a_load_refusal() -> None:
    assert refusal(b"220 ProFTPD Server (Debian) [127.0.0.1]\r\n") is None
    assert refusal(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready.\r\n") is None


def _connection_scenarios() -> List[Scenario]:
    return [s for s in CATALOGUE if "smtp" in s.dialects][:6]


@pytest.mark.parametrize("limit", [1, 2])
def test_max_connections_is_never_exceeded(limit: int) -> None:
    scenarios = _connection_scenarios()

    async def go() -> Tuple[Pacing, List[Verdict]]:
        async with reference_servers(("smtp",)) as (target,):
            with pacing(Pacing(max_connections=limit)) as paced:
                results = await run_server_target(
                    scenarios, target, RunSettings(concurrency=8), None, ("1.3",)
                )
        assert paced is not None
        return paced, [r.verdict for r in results]

    paced, verdicts = asyncio.run(asyncio.wait_for(go(), 120))
    assert Verdict.FAIL not in verdicts and Verdict.ERROR not in verdicts
    (gate,) = paced.gates.values()
    assert gate.opened >= len(scenarios)
    assert gate.most_open == limit  # reached, never passed
    assert gate.open == 0  # every slot given back


def test_rate_spaces_connection_starts() -> None:
    scenarios = _connection_scenarios()
    rate = 20.0

    async def go() -> Tuple[Pacing, float]:
        async with reference_servers(("smtp",)) as (target,):
            with pacing(Pacing(rate=rate)) as paced:
                t0 = time.monotonic()
                await run_server_target(
                    scenarios, target, RunSettings(concurrency=8), None, ("1.3",)
                )
                took = time.monotonic() - t0
        assert paced is not None
        return paced, took

    paced, took = asyncio.run(asyncio.wait_for(go(), 120))
    (gate,) = paced.gates.values()
    assert gate.opened >= len(scenarios)
    assert took >= (gate.opened - 1) / rate


@needs_tshark
def test_check_client_capture_shows_the_client_inside_tls(tmp_path: Path) -> None:
    code, out, err = asyncio.run(
        _cli(
            "check-client",
            "--protocol",
            "smtp",
            "--only",
            "client.truncation",
            "--tls-version",
            "1.3",
            "--capture",
            str(tmp_path),
            "--capture-all",
            "--",
            *CLI,
            "client",
            "smtp",
            "--port",
            "{port}",
            "--cafile",
            "{cafile}",
            "--tls-version",
            "{tls_version}",
            "--cycles",
            "{cycles}",
        )
    )
    assert code == 0, out + err
    (path,) = tmp_path.iterdir()
    rows = dissect(path)
    commands = [r["smtp.req.command"] for r in rows if in_tls(r) and r["smtp.req.command"]]
    assert "MAIL" in commands and "EHLO" in commands


@contextlib.asynccontextmanager
async def _proxy(*args: str) -> AsyncIterator[Tuple[int, asyncio.StreamReader]]:
    """A ``starttls-harness proxy`` process; yields its port and its output."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, "proxy", "--listen", "127.0.0.1:0", *args, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    text = ""
    try:
        while "Ctrl-C" not in text:
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line, f"proxy exited early: {text}"
            text += line
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
        assert found, text
        yield int(found.group(1)), proc.stdout
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


@needs_tshark
def test_proxy_capture_holds_both_legs_decrypted(tmp_path: Path) -> None:
    """client -> proxy -> server: one pcapng per connection, both legs, TLS decrypted."""
    state, captures = tmp_path / "state", tmp_path / "cap"

    async def go() -> Tuple[int, str]:
        async with _serve("smtp", "--state-dir", str(state)) as server:
            upstream = f"127.0.0.1:{server.port}"
            keys = str(state / "keys.log")
            async with _proxy(
                "--upstream", upstream, "--keylog", keys, "--capture", str(captures)
            ) as (port, output):
                code, out, err = await _cli(
                    "client",
                    "smtp",
                    "--port",
                    str(port),
                    "--cafile",
                    str(state / "ca.pem"),
                    "--tls-version",
                    "1.3",
                )
                # The proxy writes the file, then prints the connection's close.
                line = b""
                while b"both sockets closed" not in line:
                    line = await asyncio.wait_for(output.readline(), 20)
                    assert line, "the proxy stopped before the connection closed"
                return code, out + err

    code, text = asyncio.run(go())
    assert code == 0, text
    (path,) = captures.glob("*.pcapng")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rows = dissect(path)
    mail = [r for r in rows if in_tls(r) and r["smtp.req.command"] == "MAIL"]
    assert len(mail) == 2  # the same command on the client leg and on the server leg


FLEET_TEST = """
def test_starttls(starttls_target_result):
    starttls_target_result.check()
"""


def test_pytest_spreads_a_fleet_and_junit_is_the_report(pytester: pytest.Pytester) -> None:
    """Four reference servers (one misbehaving), xdist over two workers, one JUnit file."""
    pytester.makepyfile(test_fleet=FLEET_TEST)
    specs = [("smtp",), ("smtp",), ("imap",), ("imap", "--behaviour", "keep-buffer")]
    junit = pytester.path / "fleet.xml"

    async def go() -> Tuple[List[str], pytest.RunResult]:
        async with _servers(*specs) as served:
            urls = [_url(spec[0], s) for spec, s in zip(specs, served)]
            targets = pytester.path / "fleet.txt"
            targets.write_text("# the fleet\n" + "".join(f"{u}  # server\n" for u in urls))
            run = await asyncio.to_thread(
                pytester.runpytest_subprocess,
                "-p",
                "no:cacheprovider",
                "-n",
                "2",
                "--starttls-targets",
                str(targets),
                "--starttls-only",
                "server.command-injection",
                "--starttls-tls-version",
                "1.3",
                f"--junitxml={junit}",
                timeout=CLI_TIMEOUT,
            )
            return urls, run

    urls, run = asyncio.run(go())
    run.assert_outcomes(passed=3, failed=1)
    run.stdout.fnmatch_lines(["*2 workers*"])
    cases = ET.parse(junit).getroot().iter("testcase")
    seen = {}
    for case in cases:
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        seen[props["target"]] = (props["verdict"], case.find("failure") is not None)
        assert props["target"] in case.get("name", "")
    assert seen == {
        urls[0]: ("pass", False),
        urls[1]: ("pass", False),
        urls[2]: ("pass", False),
        urls[3]: ("fail", True),
    }
