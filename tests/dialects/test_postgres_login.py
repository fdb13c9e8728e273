"""PostgreSQL password logins (issue 14): cleartext, MD5 and SCRAM-SHA-256.

The harness logs the test user in at the session start where the server asks
for a password; a wrong or missing password is one line ("the login was
refused"), exit 2, and the password is never in a report.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import pytest
from starttls_harness.dialects.base import LoginRefused
from starttls_harness.dialects.pg_auth import (
    ClientLogin,
    ScramServer,
    auth_code,
    scram_verifier,
)
from starttls_harness.dialects.postgres import auth
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.sanity import TargetUnusable
from starttls_harness.run.server import RunSettings, ServerTarget, run_server_target
from starttls_harness.scenarios.server import CATALOGUE
from starttls_harness.servers.postgres import AUTH_METHODS, PgServerConfig, start_server
from starttls_harness.tls.certs import Pki

USER, PASSWORD = "tester", "correct horse"
SETTINGS = RunSettings(reply_timeout=3.0, scenario_timeout=20.0)
CLI = [sys.executable, "-m", "starttls_harness"]
ASKING = [m for m in AUTH_METHODS if m != "trust"]


# ------------------------------------------------------------ SCRAM itself


def test_scram_matches_rfc_7677s_example() -> None:
    """RFC 7677 §3: user "user", password "pencil" (PostgreSQL leaves n= empty)."""
    login = ClientLogin("user", "pencil")
    login._first_bare = b"n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = (
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    final = login.answer([auth(11, server_first)])
    assert final[5:] == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    # The server's signature is checked: the right one passes, any other is refused.
    login.answer([auth(12, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="), auth(0)])
    assert login.authenticated
    with pytest.raises(LoginRefused, match="signature"):
        login.answer([auth(12, b"v=" + base64.b64encode(b"\0" * 32))])


def test_scram_client_and_server_agree_and_a_wrong_password_fails() -> None:
    verifier = scram_verifier(PASSWORD)
    for password, ok in ((PASSWORD, True), ("wrong", False)):
        client, server = ClientLogin(USER, password), ScramServer(verifier)
        initial = client.answer([auth(10, b"SCRAM-SHA-256\0\0")])
        first = server.first(initial[5:])
        assert first is not None
        final = server.final(client.answer([auth(11, first)])[5:])
        assert (final is not None) is ok


def test_no_password_where_one_is_asked_is_refused_in_words() -> None:
    for code in (3, 5, 10):
        request = auth(code, b"salt" if code == 5 else b"SCRAM-SHA-256\0\0" if code == 10 else b"")
        with pytest.raises(LoginRefused, match="no --password was given"):
            ClientLogin(USER, None).answer([request])
    assert auth_code(auth(10)) == 10


# ------------------------------------------------- against the reference server


@pytest.fixture(params=ASKING)
def asking(request: pytest.FixtureRequest, pki: Pki) -> Iterator[ServerTarget]:
    """The strict reference server asking for the test user's password."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def serve() -> Any:
        return await start_server(PgServerConfig(pki=pki, auth=request.param))

    running = asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    try:
        yield ServerTarget("postgres", "127.0.0.1", running.port, cafile=pki.cafile)
    finally:
        asyncio.run_coroutine_threadsafe(running.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _run(target: ServerTarget, ids: Optional[List[str]] = None) -> List[Result]:
    scenarios = [s for s in CATALOGUE if ids is None or s.id in ids]
    return asyncio.run(
        asyncio.wait_for(run_server_target(scenarios, target, SETTINGS, raise_unusable=True), 120)
    )


def _with(target: ServerTarget, user: Optional[str], password: Optional[str]) -> ServerTarget:
    return ServerTarget(
        target.dialect, target.host, target.port, cafile=target.cafile, user=user, password=password
    )


def test_the_catalogue_runs_logged_in(asking: ServerTarget) -> None:
    results = _run(_with(asking, USER, PASSWORD))
    applicable = [r for r in results if r.verdict is not Verdict.SKIP]
    assert applicable and all(r.verdict is Verdict.PASS for r in applicable), [
        (r.id, r.tls_version, r.summary) for r in results if r.verdict is not Verdict.PASS
    ]
    # The state-reset scenario logs in and runs (it needs a login).
    assert any(r.id == "server.state-reset" and r.verdict is Verdict.PASS for r in results)


@pytest.mark.parametrize(
    ("user", "password"), [(USER, "wrong"), ("nobody", PASSWORD), (USER, None), (None, None)]
)
def test_a_refused_login_is_one_line(
    asking: ServerTarget, user: Optional[str], password: Optional[str]
) -> None:
    with pytest.raises(TargetUnusable) as raised:
        _run(_with(asking, user, password), ["server.command-injection"])
    line = raised.value.line
    assert line.startswith("the login was refused") and "\n" not in line, line
    assert PASSWORD not in line


# ------------------------------------------------------------------ the CLI


def _cli(*args: str) -> Tuple[int, str, str]:
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=240, check=False)
    return done.returncode, done.stdout, done.stderr


def test_check_with_a_password_exit_codes_and_no_password_in_the_report(
    asking: ServerTarget, tmp_path: Path
) -> None:
    url = f"postgres://127.0.0.1:{asking.port}"
    base = [url, "--cafile", str(asking.cafile), "--only", "server.command-injection*"]
    report = tmp_path / "report.json"
    code, out, err = _cli(
        "check", *base, "--user", USER, "--password", PASSWORD, "--json", str(report)
    )
    assert code == 0, out + err
    assert PASSWORD not in out + err and PASSWORD not in report.read_text()
    assert json.loads(report.read_text())
    for extra, words in ((["--user", USER, "--password", "wrong"], "28P01"), ([], "no --password")):
        code, out, err = _cli("check", *base, *extra)
        assert code == 2 and err.strip().count("\n") == 0, out + err
        assert "the login was refused" in err and words in err and "Traceback" not in err, err
