"""``check-path``: the fault proxy between a client program and a running server.

Reference pairs where exactly one side misbehaves: the verdict blames that
side (table and JSON); a strict pair passes.  The server runs in a thread
of this process (as a real server runs beside the harness), the client is a
real program: the reference client run as ``starttls-harness client``, or a
script on Python's smtplib.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import jsonschema
import pytest
from starttls_harness.cli import main
from starttls_harness.run.reference import reference_server_module
from starttls_harness.scenarios.expectations import STOPTLS_SCENARIOS
from starttls_harness.scenarios.path import PATH_SCENARIOS
from starttls_harness.servers.base import ServerConfig
from starttls_harness.tls.certs import make_pki

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # realworld/ is a directory of the repository, not installed

from realworld.paths import EXPECTED_PATHS_FILE, PAIRS, differences  # noqa: E402

pytest_plugins = ["pytester"]

SCHEMA = Path(__file__).resolve().parents[2] / "harness/report/schemas/report.schema.json"
FAST = ["--reply-timeout", "2", "--timeout", "20", "-q"]

SMTPLIB_CLIENT = """
import smtplib, ssl, sys
port, cafile = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile)  # honours SSLKEYLOGFILE
with smtplib.SMTP("localhost", port, timeout=10) as smtp:
    smtp.ehlo()
    smtp.starttls(context=ctx)
    smtp.ehlo()
    smtp.noop()
"""


@contextlib.contextmanager
def served(
    tmp_path: Path, dialect: str, behaviour: str = "strict", keylog: Optional[Path] = None
) -> Iterator[Tuple[str, Path]]:
    """A reference server in a thread of its own: (its URL, its CA file)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    pki = make_pki(directory=tmp_path)
    pki.write(tmp_path)
    assert pki.cafile is not None
    config = ServerConfig(pki=pki, behaviour=behaviour, keylog=keylog)
    start = reference_server_module(dialect).start_server(config)
    running = asyncio.run_coroutine_threadsafe(start, loop).result(10)
    try:
        host, port = running.address[:2]
        yield f"{dialect}://{host}:{port}", Path(pki.cafile)
    finally:
        asyncio.run_coroutine_threadsafe(running.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def reference_client(dialect: str, behaviour: str = "strict") -> List[str]:
    return [
        *("--", sys.executable, "-m", "starttls_harness", "client", dialect),
        *("--port", "{port}", "--cafile", "{cafile}", "--tls-version", "{tls_version}"),
        *("--behaviour", behaviour),
    ]


def check_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str
) -> Tuple[int, str, Dict[str, Any]]:
    report = tmp_path / "report.json"
    code = main(["check-path", "--json", str(report), *FAST, *args])
    out = capsys.readouterr().out
    doc = json.loads(report.read_text()) if report.exists() else {}
    if doc:
        jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    return code, out, doc


def test_a_strict_pair_passes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with served(tmp_path, "smtp") as (url, ca):
        code, out, doc = check_path(
            capsys, tmp_path, url, "--cafile", str(ca), "--tls-version", "1.2",
            *reference_client("smtp"),
        )  # fmt: skip
    verdicts = {r["id"]: r["verdict"] for r in doc["results"]}
    assert code == 0, out
    assert set(verdicts.values()) <= {"pass"}, out
    assert len(verdicts) == len(PATH_SCENARIOS)
    assert all("side" not in r for r in doc["results"])


@pytest.mark.parametrize(
    ("dialect", "side", "behaviour", "scenario"),
    [
        ("smtp", "server", "one-sided-resume", "path.inject-after-close"),
        ("smtp", "server", "early-plaintext", "path.drop-close-notify-s2c"),
        ("imap", "server", "plaintext-in-tls", "path.inject-in-tls-c2s"),
        ("smtp", "client", "one-sided-close", "path.inject-after-close"),
        ("imap", "client", "one-sided-close", "path.drop-close-notify-c2s"),
    ],
)
def test_the_verdict_blames_the_side_that_misbehaves(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    dialect: str,
    side: str,
    behaviour: str,
    scenario: str,
) -> None:
    server_behaviour = behaviour if side == "server" else "strict"
    client_behaviour = behaviour if side == "client" else "strict"
    with served(tmp_path, dialect, server_behaviour) as (url, ca):
        code, out, doc = check_path(
            capsys, tmp_path, url, "--cafile", str(ca), "--tls-version", "1.2",
            "--only", scenario, *reference_client(dialect, client_behaviour),
        )  # fmt: skip
    (result,) = doc["results"]
    assert code == 1, out
    assert result["verdict"] == "fail" and result["side"] == side, result["summary"]
    assert f"FAIL     {side}: " in out


def test_the_evidence_says_where_the_tls_secrets_came_from(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The client's key log (smtplib writes SSLKEYLOGFILE), else the
    server's, else none: TLS 1.3 followed by record position.

    Every sender logs a secret before it sends under it, so a key log is
    never late for its writer's own records; the other side's it learns only
    when it reads them (the server logs the client's traffic secret once it
    has the client's Finished, which may reach the proxy in the same read as
    the client's first record).  So the server's key log alone is exact for
    a fault aimed at the server's records, and that is what is asked of it
    here; with both key logs (a client that writes one) every record is.
    """
    script = tmp_path / "send.py"
    script.write_text(SMTPLIB_CLIENT)
    keys = tmp_path / "server.keys"
    version = ["--tls-version", "1.3"]
    c2s = ["--only", "path.inject-in-tls-c2s", *version]
    s2c = ["--only", "path.inject-in-tls-s2c", *version]
    notes: List[str] = []
    # The reference client writes SSLKEYLOGFILE too: without it in its environment
    # it is a client that writes no key log.
    no_keylog = ["--", "env", "-u", "SSLKEYLOGFILE", *reference_client("smtp")[1:]]
    with served(tmp_path, "smtp", keylog=keys) as (url, ca):
        runs = [
            [*c2s, "--", sys.executable, str(script), "{port}", "{cafile}"],
            [*s2c, "--server-keylog", str(keys), *no_keylog],
            [*c2s, *no_keylog],
        ]
        for extra in runs:
            code, out, doc = check_path(capsys, tmp_path, url, "--cafile", str(ca), *extra)
            (result,) = doc["results"]
            assert code == 0, out
            assert result["verdict"] == "pass", out
            found = [e["note"] for e in result["evidence"] if "TLS secrets" in e.get("note", "")]
            notes.extend(found)
    assert len(notes) == 3
    assert "the client's key log" in notes[0]
    assert "the server's key log" in notes[1]
    assert "record position" in notes[2]


def test_stoptls_scenarios_skip_when_the_client_never_returns_to_plaintext(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """smtplib never sends STOPTLS: with its key log the proxy knows."""
    script = tmp_path / "send.py"
    script.write_text(SMTPLIB_CLIENT)
    with served(tmp_path, "smtp") as (url, ca):
        code, out, doc = check_path(
            capsys, tmp_path, url, "--cafile", str(ca), "--tls-version", "1.3",
            "--", sys.executable, str(script), "{port}", "{cafile}",
        )  # fmt: skip
    verdicts = {r["id"]: r["verdict"] for r in doc["results"]}
    assert code == 0, out
    assert {i for i, v in verdicts.items() if v == "skip"} == set(STOPTLS_SCENARIOS)
    assert {v for i, v in verdicts.items() if i not in STOPTLS_SCENARIOS} == {"pass"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["smtp://127.0.0.1:1"], "give the client command after --"),
        (["smtp://127.0.0.1:1", "--", "no-such-program-xyz"], "command not found"),
        (["gopher://127.0.0.1:1", "--", sys.executable], "use smtp://HOST:PORT"),
        (["smtp://127.0.0.1:1", "--", sys.executable], "cannot connect"),
        (["smtp://127.0.0.1:1", "--cafile", "/nonexistent.pem", "--", sys.executable], "cafile"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: List[str], message: str
) -> None:
    code = main(["check-path", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


PLUGIN_PATH = """
import pytest

@pytest.mark.starttls(dialect="smtp", role="path", only={only!r}, tls_versions=("1.2",))
def test_path(starttls_result):
    starttls_result.check()
"""


def test_the_pytest_plugin_runs_the_path_role(pytester: pytest.Pytester) -> None:
    """The default server (strict reference) and client program (the strict
    reference client): every selected path scenario passes."""
    pytester.makepyfile(PLUGIN_PATH.format(only=["path.inject-in-tls*", "path.truncate-c2s"]))
    result = pytester.runpytest("-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_the_pytest_plugin_path_role_fails_a_misbehaving_client(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        PLUGIN_PATH.format(only=["path.inject-after-close"])
        + """
import sys

@pytest.fixture
def starttls_path_client():
    return [sys.executable, "-m", "starttls_harness", "client", "smtp", "--port", "{port}",
            "--cafile", "{cafile}", "--tls-version", "{tls_version}",
            "--behaviour", "one-sided-close"]
"""
    )
    result = pytester.runpytest("-v", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*client: broke R4 on the wire*"])


def test_the_path_tier_table_names_every_pair_and_scenario() -> None:
    """realworld/expected-paths.json: every pair, every path scenario, both
    TLS versions; a cell is a verdict, with the side it blames if not a pass."""

    table = json.loads(EXPECTED_PATHS_FILE.read_text())["pairs"]
    assert set(table) == {p.name for p in PAIRS}
    for name, cells in table.items():
        wanted = {s.id for s in PATH_SCENARIOS}
        if name.startswith("postgresql+"):  # no return to plaintext: no STOPTLS scenario
            wanted = {s.id for s in PATH_SCENARIOS if "postgres" in s.dialects}
        assert set(cells) == wanted
        for by_version in cells.values():
            assert set(by_version) == {"1.2", "1.3"}
            for c in by_version.values():
                verdict, _, side = c.partition("/")
                assert verdict in ("pass", "skip") or side in ("client", "server")
    assert differences(table, table) == []
    changed = json.loads(json.dumps(table))
    changed["dovecot+curl"]["path.truncate-c2s"]["1.2"] = "fail/server"
    (line,) = differences(table, changed)
    assert "dovecot+curl path.truncate-c2s TLS 1.2: expected pass, got fail/server" == line


COUNTER = """
import pathlib, sys
path = pathlib.Path(sys.argv[1])
count = int(path.read_text()) if path.exists() else 0
print(count)
if sys.argv[2:] == ["grow"]:
    path.write_text(str(count + 1))
"""


@pytest.mark.parametrize(("mode", "verdict"), [("still", "pass"), ("grow", "fail")])
def test_the_storage_probe_decides_a_stored_truncated_unit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mode: str, verdict: str
) -> None:
    """--storage-probe as in check: counted before the client runs and after
    the session; a count that went up after the cut is a stored unit (the
    server's fail).  The probe here is a counter, so the wiring is what is
    shown: a count that stays is the pass it would be without the probe."""
    script = tmp_path / "count.py"
    script.write_text(COUNTER)
    probe = f"{sys.executable} {script} {tmp_path / 'count.txt'} {mode}"
    with served(tmp_path, "smtp") as (url, ca):
        code, out, doc = check_path(
            capsys, tmp_path, url, "--cafile", str(ca), "--tls-version", "1.3",
            "--only", "path.truncate-c2s", "--storage-probe", probe,
            *reference_client("smtp"),
        )  # fmt: skip
    (result,) = doc["results"]
    assert result["verdict"] == verdict, out
    if verdict == "fail":
        assert code == 1 and result["side"] == "server", out
        assert "stored" in result["summary"], result["summary"]


def test_a_storage_probe_that_cannot_count_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with served(tmp_path, "smtp") as (url, ca):
        code = main(
            ["check-path", url, "--cafile", str(ca), "--storage-probe", "false",
             *FAST, *reference_client("smtp")]
        )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    assert "--storage-probe" in captured.err and "Traceback" not in captured.err
