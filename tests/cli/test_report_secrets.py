"""No password leaves in clear: JSON, JUnit, evidence ladders, the table.

And the files that carry conversations are private (0600, folders 0700).
"""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
from starttls_harness.report.formats import ladder, to_json, to_junit
from starttls_harness.report.redact import Redactor, mark
from starttls_harness.report.verdicts import Evidence, Exchange, Result, Verdict
from test_cli import IMAPLIB_CLIENT, SMTPLIB_CLIENT, _serve, run_cli

PASSWORD = "correct horse"  # the reference servers' test password
USER = "tester"


def _forms(password: str, user: str = USER) -> List[str]:
    """The password as it can appear on the wire: clear, AUTH PLAIN, AUTH LOGIN."""
    return [
        password,
        base64.b64encode(f"\0{user}\0{password}".encode()).decode(),
        base64.b64encode(password.encode()).decode(),
    ]


def _conversation(password: str, in_text: bool) -> List[Exchange]:
    plain = base64.b64encode(f"\0{USER}\0{password}".encode())
    return [
        Exchange(0.0, "c2s", "tls", f'l1 LOGIN "{USER}" "{password}"\r\n'.encode()),
        Exchange(0.1, "s2c", "tls", b"l1 OK LOGIN completed\r\n"),
        Exchange(0.2, "c2s", "tls", b"AUTH PLAIN " + plain + b"\r\n"),
        Exchange(0.3, "s2c", "tls", b"235 2.7.0 Authentication successful\r\n"),
        Exchange(0.4, "c2s", "tls", b"AUTH LOGIN\r\n"),
        Exchange(0.5, "s2c", "tls", b"334 VXNlcm5hbWU6\r\n"),
        Exchange(0.6, "c2s", "tls", base64.b64encode(USER.encode()) + b"\r\n"),
        Exchange(0.7, "s2c", "tls", b"334 UGFzc3dvcmQ6\r\n"),
        Exchange(0.8, "c2s", "tls", base64.b64encode(password.encode()) + b"\r\n"),
        Exchange(0.9, "s2c", "tls", b"235 2.7.0 Authentication successful\r\n"),
        Exchange(
            1.0, "c2s", "tls", b"a2 LOGIN u {%d+}\r\n%s\r\n" % (len(password), password.encode())
        ),
        Exchange(1.1, "c2s", "tls", b"MAIL FROM:<a@example.org>\r\n"),
        Exchange(
            1.2, "--", "note", note=f"logged in as {USER} with {password if in_text else 'it'}"
        ),
    ]


def _result(password: str, in_text: bool = True) -> Result:
    """A failed login conversation; ``in_text``: the summary and a note name the password."""
    return Result(
        id="server.state-reset",
        dialect="smtp",
        tls_version="1.3",
        verdict=Verdict.FAIL,
        rule="R8",
        summary=f"kept the login of {USER}/{password if in_text else 'it'} across STARTTLS",
        evidence=Evidence(exchanges=_conversation(password, in_text)),
    )


@pytest.mark.parametrize("known", [True, False], ids=["named", "unknown"])
def test_every_report_form_hides_the_password(known: bool) -> None:
    """By shape the login is hidden even when the harness never saw the password;
    a named password is hidden in free text too."""
    password = "s3cr3t-Pa55"
    result = _result(password, in_text=known)
    secrets = [password] if known else []
    doc = json.dumps(to_json([result], target="t", started=_now(), duration=1.0, secrets=secrets))
    junit = _xml(to_junit([result], target="t", duration=1.0, secrets=secrets))
    text = ladder(result, secrets=secrets)
    for shown in (doc, junit, text):
        for form in _forms(password):
            assert form not in shown, (form, shown)
        assert "MAIL FROM:" in shown and "a@example.org" in shown  # the rest stays
        assert mark(len(password)) in shown
    # the result itself is unchanged: redaction makes copies
    assert password.encode() in result.evidence.exchanges[0].data


def test_named_secret_is_hidden_in_free_text_too() -> None:
    redactor = Redactor(["hunter2!"])
    assert redactor.text("login hunter2! refused") == f"login {mark(8)} refused"
    token = base64.b64encode(b"\0me\0hunter2!").decode()
    assert redactor.text(f"sent {token}") == f"sent {mark(len(token))}"
    assert Redactor([]).text("login hunter2! refused") == "login hunter2! refused"


def test_a_one_letter_password_is_hidden_by_shape_only() -> None:
    """``--password p`` must not turn every "p" of a report into a mark."""
    redactor = Redactor(["p"])
    assert redactor.text("plaintext resumed") == "plaintext resumed"
    login = redactor.exchanges([Exchange(0.0, "c2s", "tls", b'l1 LOGIN "u" "p"\r\n')])
    assert login[0].data == b'l1 LOGIN "u" "' + mark(1).encode() + b'"\r\n'


def _now():  # type: ignore[no-untyped-def]
    import datetime

    return datetime.datetime.now(datetime.timezone.utc)


def _xml(tree) -> str:  # type: ignore[no-untyped-def]
    from xml.etree import ElementTree as ET

    return ET.tostring(tree.getroot(), encoding="unicode")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("protocol", "behaviour", "code"),
    [("smtp", "strict", 0), ("imap", "no-state-reset", 1)],
)
def test_check_reports_hide_the_password_and_are_private(
    tmp_path: Path, protocol: str, behaviour: str, code: int
) -> None:
    """state-reset logs in (the IMAP one fails after it: a ladder with the
    login); nothing written shows the password."""
    reports = tmp_path / "reports"  # created by the harness: 0700

    async def go() -> Tuple[int, str, str]:
        async with _serve(protocol, "--behaviour", behaviour) as served:
            return await asyncio.to_thread(
                run_cli,
                "check",
                f"{protocol}://127.0.0.1:{served.port}",
                "--user",
                USER,
                "--password",
                PASSWORD,
                "--only",
                "server.state-reset",
                "--json",
                str(reports / "r.json"),
                "--junit-xml",
                str(reports / "j.xml"),
                "--evidence",
                str(reports / "evidence"),
            )

    got, out, err = asyncio.run(go())
    assert got == code, out + err
    files = [reports / "r.json", reports / "j.xml", *(reports / "evidence").iterdir()]
    login = "AUTH PLAIN" if protocol == "smtp" else "LOGIN"
    shown = [f for f in files if login in f.read_text()]  # the login is in the reports...
    assert reports / "r.json" in shown
    if code:
        assert any(f.suffix == ".txt" for f in shown), files
    for f in files:
        text = f.read_text(errors="replace")
        for form in _forms(PASSWORD):
            assert form not in text, (f, form)  # ...its password is not
        assert _mode(f) == 0o600, f
    for folder in (reports, reports / "evidence"):
        assert _mode(folder) == 0o700, folder
    assert PASSWORD not in out + err
    assert "******** (" in (reports / "r.json").read_text()


def test_existing_report_file_becomes_private(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    report.write_text("old")
    report.chmod(0o644)
    code, out, err = run_cli("check", "--only", "server.state-reset", "--json", str(report), "-q")
    assert code == 0, out + err
    assert _mode(report) == 0o600
    assert PASSWORD not in report.read_text()


@pytest.mark.parametrize(
    ("protocol", "script", "sent"),
    [("smtp", SMTPLIB_CLIENT, "secret"), ("imap", IMAPLIB_CLIENT, "secret")],
)
def test_check_client_hides_a_password_it_never_knew(
    tmp_path: Path, protocol: str, script: str, sent: str
) -> None:
    """The client under test logs in with its own password: hidden by shape."""
    client = tmp_path / "client.py"
    client.write_text(script)
    report = tmp_path / "r.json"
    code, out, err = run_cli(
        "check-client",
        "--protocol",
        protocol,
        "--tls-version",
        "1.3",
        "--only",
        "client.state-reset",
        "--json",
        str(report),
        "--",
        sys.executable,
        str(client),
        "{host}",
        "{port}",
        "{cafile}",
    )
    assert code in (0, 1), out + err
    text = report.read_text()
    assert "LOGIN" in text or "AUTH" in text
    for form in _forms(sent):
        assert form not in text, form
    assert _mode(report) == 0o600


def _strings(value: object) -> List[str]:
    """Every string in a JSON document, and what it decodes to as base64 or hex."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if not isinstance(value, str):
        return []
    found = [value]
    for decode in (lambda t: base64.b64decode(t, validate=True), bytes.fromhex):
        try:
            found.append(decode(value).decode("latin-1"))
        except ValueError:
            pass
    return found


@pytest.mark.parametrize("protocol", ["ftp", "ldap", "pop3", "sieve", "nntp", "lmtp"])
def test_newer_dialects_hide_the_password_in_every_report(tmp_path: Path, protocol: str) -> None:
    """The logins of the dialects added after issue 11 (FTP PASS, an LDAP bind,
    SASL PLAIN) are redacted like SMTP's and IMAP's, in every report form."""
    reports = tmp_path / "reports"

    async def go() -> Tuple[int, str, str]:
        async with _serve(protocol) as served:
            return await asyncio.to_thread(
                run_cli,
                "check",
                f"{protocol}://127.0.0.1:{served.port}",
                "--cafile",
                served.cafile,
                "--user",
                USER,
                "--password",
                PASSWORD,
                "--only",
                "server.state-reset",
                "--json",
                str(reports / "r.json"),
                "--jsonl",
                str(reports / "r.jsonl"),
                "--junit-xml",
                str(reports / "j.xml"),
                "--evidence",
                str(reports / "evidence"),
            )

    got, out, err = asyncio.run(go())
    assert got == 0, out + err
    assert "******** (" in (reports / "r.json").read_text()  # a login was there, hidden
    docs = [json.loads((reports / "r.json").read_text())]
    docs += [json.loads(line) for line in (reports / "r.jsonl").read_text().splitlines()]
    for text in [s for doc in docs for s in _strings(doc)]:
        for form in _forms(PASSWORD):
            assert form not in text, (protocol, form)
    for f in [reports / "r.json", reports / "r.jsonl", reports / "j.xml"]:
        assert PASSWORD not in f.read_text(errors="replace")
        assert _mode(f) == 0o600, f
    assert PASSWORD not in out + err


def test_check_path_hides_the_password_it_passes_to_the_client(tmp_path: Path) -> None:
    """check-path hands {password} to the client; the reports show the placeholder only."""
    reports = tmp_path / "reports"
    client = tmp_path / "ftp_client.py"
    client.write_text(FTPLIB_CLIENT)

    async def go() -> Tuple[int, str, str]:
        async with _serve("ftp") as served:
            return await asyncio.to_thread(
                run_cli,
                "check-path",
                f"ftp://127.0.0.1:{served.port}",
                "--cafile",
                served.cafile,
                "--user",
                USER,
                "--password",
                PASSWORD,
                "--json",
                str(reports / "r.json"),
                "--junit-xml",
                str(reports / "j.xml"),
                "--evidence",
                str(reports / "evidence"),
                "--",
                sys.executable,
                str(client),
                "{host}",
                "{port}",
                "{cafile}",
                "{user}",
                "{password}",
                timeout=300,
            )

    got, out, err = asyncio.run(go())
    assert got == 0, out + err
    files = [reports / "r.json", reports / "j.xml", *(reports / "evidence").iterdir()]
    for f in files:
        text = f.read_text(errors="replace")
        for form in _forms(PASSWORD):
            assert form not in text, (f, form)
        assert _mode(f) == 0o600, f
    assert "{password}" in (reports / "r.json").read_text()  # the command, as given
    assert PASSWORD not in out + err


FTPLIB_CLIENT = """\
import ftplib, ssl, sys
host, port, cafile, user, password = sys.argv[1:6]
ftp = ftplib.FTP_TLS(context=ssl.create_default_context(cafile=cafile), timeout=10)
ftp.connect(host, int(port))
ftp.auth()
ftp.login(user, password)
ftp.pwd()
ftp.quit()
"""
