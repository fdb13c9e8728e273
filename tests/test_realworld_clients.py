"""The client tier's logic, without curl, msmtp or the npm clients.

The tier itself (``python -m realworld.clients``, run by ``tox -e realworld``
after the servers) needs the real clients; what decides its verdict --
parsing expected-clients.json, comparing runs with it, the determinism
check of ``--repeat``, ``--update`` merging, the README table and the
command lines handed to ``check-client`` -- is tested here.  One test runs
the standard library's smtplib driver through the whole tier for one
scenario: it needs nothing but this interpreter.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # realworld/ is a directory of the repository, not part of the installed
    # distribution; appended so the installed harness still wins.
    sys.path.append(str(ROOT))

from starttls_harness.scenarios.ccc import CLIENT_CCC_SCENARIOS  # noqa: E402
from starttls_harness.scenarios.client import CLIENT_SCENARIOS  # noqa: E402

from realworld import clients, compare  # noqa: E402
from realworld.client_specs import python_with  # noqa: E402
from realworld.compare import Cell, Outcome, ServerTable  # noqa: E402

K12 = ("client.x", "1.2")
K13 = ("client.x", "1.3")


def table(name: str = "c/smtp", **cells: Cell) -> ServerTable:
    results = {(f"client.{k.replace('_', '-')}", v): c for k, c in cells.items() for v in ("1.3",)}
    return ServerTable(name, "smtp", "c (test)", "1.0", results, {})


def run_of(**verdicts: str) -> Dict[compare.Key, Outcome]:
    return {
        (f"client.{k.replace('_', '-')}", "1.3"): Outcome(v, "seen") for k, v in verdicts.items()
    }


# ------------------------------------------------------------ the real table


def test_expected_clients_json_covers_every_client_and_scenario() -> None:
    tables = clients.load_expected_clients()
    assert set(tables) == {s.name for s in clients.CLIENTS}
    assert len({s.client for s in clients.CLIENTS}) >= 4
    for spec in clients.CLIENTS:
        ids = {
            s.id for s in (*CLIENT_SCENARIOS, *CLIENT_CCC_SCENARIOS) if spec.dialect in s.dialects
        }
        t = tables[spec.name]
        assert t.dialect == spec.dialect
        assert t.tested_version
        assert {k for k in t.results} == {(i, v) for i in ids for v in compare.TLS_VERSIONS}
        for (scenario, _), cell in t.results.items():
            if cell.verdict != "pass":
                assert t.notes.get(scenario), f"{spec.name}: {scenario} has no note"


def test_readme_client_table_is_generated_from_expected_clients_json() -> None:
    tables = clients.load_expected_clients()
    assert compare.README_FILE.read_text(encoding="utf-8") == clients.expected_readme(tables), (
        "realworld/README.md is out of date: run 'python -m realworld.clients --table'"
    )


def test_table_command_checks_and_rewrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(compare.README_FILE.read_text(encoding="utf-8"), encoding="utf-8")
    assert clients.main(["--table", "--check", "--readme", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    begin = text.index(clients.CLIENT_TABLE_BEGIN)  # a cell of the client table
    broken = text[:begin] + text[begin:].replace("| **fail** |", "| **pass** |", 1)
    readme.write_text(broken, encoding="utf-8")
    assert clients.main(["--table", "--check", "--readme", str(readme)]) == 1
    assert "out of date" in capsys.readouterr().out
    assert clients.main(["--table", "--readme", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == text


def test_expected_clients_json_round_trips() -> None:
    doc = json.loads(clients.EXPECTED_CLIENTS_FILE.read_text(encoding="utf-8"))
    again = clients.to_expected_clients_doc(clients.parse_expected_clients(doc))
    assert again == doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"format": 1}, "'clients' must be a non-empty object"),
        ({"format": 1, "clients": {}}, "'clients' must be a non-empty object"),
        ({"format": 2, "clients": {"c/smtp": {}}}, "format 2"),
        (
            {
                "format": 1,
                "clients": {"c/smtp": {"dialect": "smtp", "scenarios": {"x": {"1.4": 1}}}},
            },
            "clients.c/smtp.scenarios.x: unknown key '1.4'",
        ),
    ],
)
def test_malformed_client_tables_name_their_place(doc: Dict[str, object], message: str) -> None:
    with pytest.raises(compare.TableError) as caught:
        clients.parse_expected_clients(doc)
    assert message in str(caught.value)


def test_client_table_markers_are_distinct_from_the_server_table() -> None:
    server = f"{compare.TABLE_BEGIN}\nS\n{compare.TABLE_END}"
    doc = f"a\n{server}\n{clients.CLIENT_TABLE_BEGIN}\nC\n{clients.CLIENT_TABLE_END}\n"
    out = compare.replace_table(doc, "NEW\n", clients.CLIENT_TABLE_BEGIN, clients.CLIENT_TABLE_END)
    assert "\nS\n" in out and "NEW\n" in out and "\nC\n" not in out
    with pytest.raises(compare.TableError):
        compare.replace_table(
            "no markers", "x", clients.CLIENT_TABLE_BEGIN, clients.CLIENT_TABLE_END
        )


# ---------------------------------------------------------------- comparing


def test_a_run_like_the_table_has_no_difference() -> None:
    expected = {"c/smtp": table(a=Cell("pass", ("seen",)), b=Cell("warn", ("seen",)))}
    differences, total = clients.compare_run(
        expected, {"c/smtp": run_of(a="pass", b="warn")}, ("1.3",)
    )
    assert differences == [] and total == 2


def test_a_changed_verdict_and_a_client_without_table_fail() -> None:
    expected = {"c/smtp": table(a=Cell("pass", ("seen",)))}
    observed = {"c/smtp": run_of(a="fail"), "d/imap": run_of(a="pass")}
    differences, total = clients.compare_run(expected, observed, ("1.3",))
    assert [(d.server, d.kind) for d in differences] == [("c/smtp", "verdict"), ("d/imap", "new")]
    assert all(d.fails for d in differences) and total == 2


def test_only_narrows_the_expected_cells_to_the_scenarios_run() -> None:
    expected = {"c/smtp": table(a=Cell("pass", ("seen",)), b=Cell("pass", ("seen",)))}
    observed = {"c/smtp": run_of(a="pass")}
    missing, _ = clients.compare_run(expected, observed, ("1.3",))
    assert [d.kind for d in missing] == ["missing"]
    narrowed, total = clients.compare_run(expected, observed, ("1.3",), only=("client.a*",))
    assert narrowed == [] and total == 1


def test_instability_lists_only_cells_whose_verdict_changed() -> None:
    runs: List[Dict[compare.Key, Outcome]] = [
        {K12: Outcome("pass", "x"), K13: Outcome("warn", "y")},
        {K12: Outcome("pass", "other way"), K13: Outcome("pass", "z")},
        {K12: Outcome("pass", "x")},
    ]
    assert clients.instability(runs) == {K13: Counter({"warn": 1, "pass": 1, "missing": 1})}
    assert clients.instability(runs[:1]) == {}
    assert clients.instability([]) == {}


def test_combine_status_prefers_could_not_run_then_differs() -> None:
    assert clients.combine_status(0, 0) == clients.EXIT_MATCH
    assert clients.combine_status(0, 1) == clients.EXIT_DIFFER
    assert clients.combine_status(1, 2, 0) == clients.EXIT_ERROR


def test_update_merges_runs_keeps_notes_and_skips_changed_cells() -> None:
    spec = clients.client_by_name("curl/smtp")[0]
    old = ServerTable(
        spec.name,
        "smtp",
        "curl (Debian)",
        "7.0",
        {
            K12: Cell("pass", ("a",)),
            K13: Cell("pass", ("a",)),
            ("client.y", "1.3"): Cell("warn", ("w",)),
        },
        {"client.x": "a note"},
    )
    result = clients.TierResult(
        0,
        observed={
            spec.name: [
                {K13: Outcome("pass", "b"), ("client.y", "1.3"): Outcome("warn", "w")},
                {K13: Outcome("pass", "a"), ("client.y", "1.3"): Outcome("pass", "p")},
            ]
        },
        versions={spec.name: "8.0"},
    )
    merged = clients.updated_tables({spec.name: old}, [spec], result, ("1.3",))[spec.name]
    assert merged.tested_version == "8.0" and merged.notes == {"client.x": "a note"}
    assert merged.results[K12] == Cell("pass", ("a",))  # TLS 1.2 was not run: kept
    assert merged.results[K13] == Cell("pass", ("a", "b"))
    assert ("client.y", "1.3") not in merged.results  # changed between runs: a person decides


# ------------------------------------------------------------ the clients


def test_every_client_command_takes_host_port_and_cafile(tmp_path: Path) -> None:
    paths = clients.Paths(message=tmp_path / "m.eml", npm_dir=tmp_path / "npm")
    for spec in clients.CLIENTS:
        argv = spec.argv(paths)
        text = " ".join(argv)
        # The address, or the certificate's name for clients that match names only.
        assert "{host}" in text or "{hostname}" in text, f"{spec.name} lacks {{host}}"
        for placeholder in ("{port}", "{cafile}"):
            assert placeholder in text, f"{spec.name} lacks {placeholder}"
        # Certificate checking stays on: nothing that turns verification off.
        assert not {"--insecure", "-k", "--tls-certcheck=off"} & set(argv)
    for script in ("smtplib_send.py", "imaplib_append.py", "aiosmtplib_send.py"):
        assert (clients.DRIVERS / script).is_file()
    for script in ("nodemailer_send.cjs", "imapflow_append.cjs"):
        text = (clients.DRIVERS / script).read_text(encoding="utf-8")
        assert "rejectUnauthorized: true" in text


def test_select_by_client_or_by_client_and_dialect() -> None:
    assert [s.name for s in clients.select(["curl"])] == [
        "curl/smtp",
        "curl/imap",
        "curl/pop3",
        "curl/ftp",
    ]
    assert [s.name for s in clients.select(["curl/imap", "curl"])] == [
        "curl/imap",
        "curl/smtp",
        "curl/pop3",
        "curl/ftp",
    ]
    assert clients.select(None) == list(clients.CLIENTS)
    with pytest.raises(ValueError, match="unknown client 'mutt'"):
        clients.select(["mutt"])


def test_a_missing_program_is_could_not_run(tmp_path: Path) -> None:
    spec = clients.ClientSpec(
        "ghost", "smtp", "none", lambda p: ["{host}{port}{cafile}"], lambda p: "0",
        needs=("starttls-no-such-program",),
    )  # fmt: skip
    lines: List[str] = []
    result = clients.run_tier([spec], {}, npm_dir=tmp_path, out=lines.append)
    assert result.status == clients.EXIT_ERROR
    assert "starttls-no-such-program not found" in lines[0]


def test_npm_packages_already_there_are_not_installed_again(tmp_path: Path) -> None:
    for package, version in clients.NPM_PACKAGES.items():
        folder = tmp_path / "node_modules" / package
        folder.mkdir(parents=True)
        (folder / "package.json").write_text(json.dumps({"version": version}))
    assert clients.ensure_npm(tmp_path, sorted(clients.NPM_PACKAGES)) == []
    assert clients.npm_installed_version(tmp_path, "imapflow") == clients.NPM_PACKAGES["imapflow"]
    assert clients.npm_installed_version(tmp_path / "elsewhere", "imapflow") is None


def test_run_parser_takes_the_client_options() -> None:
    from realworld.run import build_parser

    args = build_parser().parse_args(["--no-clients", "--client", "curl", "--npm-dir", "/x"])
    assert args.no_clients and args.client == ["curl"] and args.npm_dir == Path("/x")


def test_repeat_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert clients.main(["--repeat", "0"]) == clients.EXIT_ERROR
    assert "--repeat" in capsys.readouterr().err


# ------------------------------------------- one real run: the stdlib driver


def test_the_tier_runs_the_smtplib_driver_and_judges_it(tmp_path: Path) -> None:
    """smtplib through check-client, twice, one scenario: it matches; a changed table fails."""
    spec = clients.client_by_name("smtplib/smtp")
    expected = clients.load_expected_clients()
    lines: List[str] = []
    result = clients.run_tier(
        spec,
        expected,
        repeat=2,
        tls_version="1.3",
        npm_dir=tmp_path,
        only=("client.starttls-stripped",),
        out=lines.append,
    )
    assert result.status == clients.EXIT_MATCH, "\n".join(lines)
    assert result.total == 3 and result.failed == 0  # two runs and the trust control
    assert any("refused a certificate from another CA" in line for line in lines)
    runs = result.observed["smtplib/smtp"]
    assert len(runs) == 2 and clients.instability(runs) == {}
    assert runs[0][("client.starttls-stripped", "1.3")].verdict == "pass"

    changed = dict(expected)
    old = expected["smtplib/smtp"]
    key = ("client.starttls-stripped", "1.3")
    changed["smtplib/smtp"] = ServerTable(
        old.name, old.dialect, old.package, old.tested_version,
        {**old.results, key: Cell("fail", ("made up",))}, old.notes,
    )  # fmt: skip
    lines.clear()
    again = clients.run_tier(
        spec,
        changed,
        tls_version="1.3",
        npm_dir=tmp_path,
        only=("client.starttls-stripped",),
        out=lines.append,
        trust=False,
    )
    assert again.status == clients.EXIT_DIFFER and again.failed == 1
    assert any("expected fail (made up), observed pass" in line for line in lines)


#: An SMTP client that switches certificate checking off: the trust control must catch it.
UNCHECKED_CLIENT = (
    "import smtplib, ssl, sys\n"
    "smtp = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), local_hostname='localhost', timeout=10)\n"
    "smtp.starttls(context=ssl._create_unverified_context())\n"
    "smtp.ehlo()\n"
    "smtp.sendmail('a@localhost', ['b@localhost'], 'Subject: x\\r\\n\\r\\nx\\r\\n')\n"
    "smtp.quit()\n"
)


def test_trust_control_tells_a_checking_client_from_one_that_does_not(tmp_path: Path) -> None:
    from starttls_harness.tls.certs import make_pki

    other = make_pki(directory=tmp_path / "other").cafile
    assert other is not None
    paths = clients.Paths(message=tmp_path / "m.eml", npm_dir=tmp_path / "npm")
    checking = clients.client_by_name("smtplib/smtp")[0]
    refused, detail = clients.trust_control(checking, paths, other, tmp_path, 60.0)
    assert refused, detail
    assert "CERTIFICATE_VERIFY_FAILED" in detail
    unchecked = clients.ClientSpec(
        "unchecked", "smtp", "test", lambda p: [sys.executable, "-c", UNCHECKED_CLIENT,
        "{host}", "{port}", "{cafile}"], lambda p: "0",
    )  # fmt: skip
    refused, detail = clients.trust_control(unchecked, paths, other, tmp_path, 60.0)
    assert not refused, detail


def test_every_client_runs_with_certificate_checking() -> None:
    """fetchmail too, since the certificate has CN/DNS ``localhost`` and ``{hostname}``."""
    assert [s.name for s in clients.CLIENTS if not s.checks_certificate] == []
    fetchmail = next(s for s in clients.CLIENTS if s.client == "fetchmail")
    assert "{hostname}" in fetchmail.argv(clients.Paths(message=Path("m"), npm_dir=Path("n")))
    driver = (clients.DRIVERS / "fetchmail_fetch.sh").read_text(encoding="utf-8")
    assert " sslcertck " in driver and "no sslcertck" not in driver


@pytest.mark.parametrize(
    ("checks", "refused", "as_recorded", "words"),
    [
        (True, True, True, "refused a certificate from another CA"),
        (True, False, False, "the verdicts above mean nothing"),
        (False, False, True, "runs WITHOUT certificate checking"),
        (False, True, False, "recorded as running without certificate checking"),
    ],
)
def test_the_trust_control_is_judged_against_what_the_spec_records(
    checks: bool, refused: bool, as_recorded: bool, words: str
) -> None:
    spec = clients.ClientSpec(
        "c", "smtp", "test", lambda p: [], lambda p: "0", checks_certificate=checks,
        unchecked_why="" if checks else "no CN",
    )  # fmt: skip
    ok, line = clients.judge_trust(spec, refused, "detail")
    assert ok is as_recorded and words in line


def test_python_with_finds_an_interpreter_that_has_the_module() -> None:
    assert python_with("json") == sys.executable  # this one, when it has it
    assert python_with("no_such_module_anywhere") == sys.executable  # none has it: this one
    nntp = python_with("nntplib")  # gone from 3.13's standard library
    if sys.version_info < (3, 13):
        assert nntp == sys.executable
    spec = clients.client_by_name("nntplib/nntp")[0]
    paths = clients.Paths(message=Path("m"), npm_dir=Path("n"))
    assert spec.argv(paths)[0] == nntp and spec.argv(paths)[1].endswith("nntplib_post.py")


def test_psycopg_is_a_client_checking_the_name_and_pinned_in_tox() -> None:
    """psycopg's libpq needs ``{hostname}`` for verify-full; tox installs the tabled version."""
    spec = clients.client_by_name("psycopg/postgres")[0]
    argv = spec.argv(clients.Paths(message=Path("m"), npm_dir=Path("n")))
    assert argv[1].endswith("psycopg_client.py") and (clients.DRIVERS / argv[1]).is_file()
    assert argv[argv.index("--hostname") + 1] == "{hostname}" and "--sslmode" not in argv
    driver = (clients.DRIVERS / "psycopg_client.py").read_text(encoding="utf-8")
    assert 'default="verify-full"' in driver and "sslrootcert={cafile}" in driver
    tested = clients.load_expected_clients()[spec.name].tested_version
    tox = (ROOT / "tox.ini").read_text(encoding="utf-8")
    assert f"psycopg[binary]=={tested}\n" in tox
