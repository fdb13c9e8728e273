"""The real-server tier's logic, without Postfix or Dovecot.

The tier itself (``tox -e realworld``) needs root and the Debian packages;
what decides its verdict -- parsing expected.json, diffing a run against
it, merging on ``--update``, the README table, the generated server
configuration and the storage count -- is tested here, in the normal suite.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # realworld/ is a directory of the repository, not part of the installed
    # distribution; appended so the installed harness still wins.
    sys.path.append(str(ROOT))

from starttls_harness.scenarios.ccc import SERVER_CCC_SCENARIOS  # noqa: E402
from starttls_harness.scenarios.server import CATALOGUE  # noqa: E402

from realworld import compare, count_stored, instances, table  # noqa: E402
from realworld.compare import Cell, Outcome  # noqa: E402
from realworld.ftpservers import DEFAULT_RUN as FTP_DEFAULT_RUN  # noqa: E402
from realworld.run import SERVERS  # noqa: E402

P12 = ("server.x", "1.2")
P13 = ("server.x", "1.3")


def cells(**verdicts: str) -> Dict[compare.Key, Cell]:
    return {
        (f"server.{k.replace('_', '-')}", v): Cell(verdict, ("seen",))
        for k, verdict in verdicts.items()
        for v in ("1.2", "1.3")
    }


# ------------------------------------------------------------ the real table


def test_expected_json_parses_and_covers_the_catalogue() -> None:
    tables = compare.load_expected()
    assert set(tables) == set(SERVERS) | set(FTP_DEFAULT_RUN)
    for name, t in tables.items():
        dialect_scenarios = {
            s.id
            for s in (*CATALOGUE, *SERVER_CCC_SCENARIOS)
            if s.role == "server" and t.dialect in s.dialects
        }
        # Every scenario has its cell: none is left out for timing (issue 14).
        covered = {k[0] for k in t.results}
        assert covered == dialect_scenarios, f"{name}: table and catalogue disagree"
        for scenario in dialect_scenarios:
            for version in compare.TLS_VERSIONS:
                assert (scenario, version) in t.results, (name, scenario, version)
            assert t.notes.get(scenario), f"{name}: {scenario} has no note"


def test_readme_table_is_generated_from_expected_json() -> None:
    wanted = table.expected_readme(compare.load_expected())
    assert compare.README_FILE.read_text(encoding="utf-8") == wanted, (
        "realworld/README.md is out of date: run 'python -m realworld.table'"
    )


def test_expected_json_round_trips() -> None:
    doc = json.loads(compare.EXPECTED_FILE.read_text(encoding="utf-8"))
    tables = compare.parse_expected(doc)
    again = compare.to_expected_doc(tables, doc.get("comment", ""))
    assert again == doc


# ---------------------------------------------------------------- comparing


def test_identical_run_has_no_difference() -> None:
    expected = {P12: Cell("pass", ("a",)), P13: Cell("warn", ("b",))}
    observed = {P12: Outcome("pass", "a"), P13: Outcome("warn", "b")}
    assert compare.compare("srv", expected, observed) == []


def test_changed_verdict_fails() -> None:
    expected = {P12: Cell("pass", ("a",))}
    observed = {P12: Outcome("fail", "answered")}
    (d,) = compare.compare("srv", expected, observed)
    assert d.kind == "verdict" and d.fails
    assert str(d) == "srv: server.x [TLS 1.2]: expected pass (a), observed fail (answered)"


def test_new_outcome_with_the_same_verdict_is_news_not_failure() -> None:
    expected = {P12: Cell("pass", ("discarded",))}
    observed = {P12: Outcome("pass", "closed")}
    (d,) = compare.compare("srv", expected, observed)
    assert d.kind == "outcome" and not d.fails
    assert "by a new way" in str(d)


def test_missing_and_new_cells_fail() -> None:
    expected = {P12: Cell("pass", ("a",))}
    observed = {("server.y", "1.2"): Outcome("skip", "no stoptls")}
    diffs = compare.compare("srv", expected, observed)
    assert [(d.scenario, d.kind, d.fails) for d in diffs] == [
        ("server.x", "missing", True),
        ("server.y", "new", True),
    ]
    assert "did not report it" in str(diffs[0])
    assert "not in expected.json" in str(diffs[1])


def test_only_the_versions_run_are_compared() -> None:
    expected = {P12: Cell("pass", ("a",)), P13: Cell("pass", ("a",))}
    observed = {P13: Outcome("pass", "a")}
    assert compare.compare("srv", expected, observed, tls_versions=["1.3"]) == []
    (d,) = compare.compare("srv", expected, observed)
    assert d.kind == "missing" and d.tls_version == "1.2"


def test_differences_are_sorted_and_formatted() -> None:
    expected = {P13: Cell("pass", ("a",)), P12: Cell("pass", ("a",))}
    observed = {P13: Outcome("error", "timeout"), P12: Outcome("pass", "b")}
    diffs = compare.compare("srv", expected, observed)
    assert [d.tls_version for d in diffs] == ["1.2", "1.3"]
    text = compare.format_differences(diffs)
    assert "1 cell(s) reached the expected verdict by a new outcome" in text
    assert "1 cell(s) differ from realworld/expected.json" in text
    assert "  - srv: server.x [TLS 1.3]: expected pass (a), observed error (timeout)" in text
    assert "--update" in text
    assert compare.format_differences([]) == "the verdicts match realworld/expected.json\n"


def test_merge_accumulates_outcomes_until_the_verdict_changes() -> None:
    first = compare.merge(None, Outcome("pass", "a"))
    assert first == Cell("pass", ("a",))
    assert compare.merge(first, Outcome("pass", "a")) is first
    assert compare.merge(first, Outcome("pass", "b")) == Cell("pass", ("a", "b"))
    assert compare.merge(first, Outcome("fail", "c")) == Cell("fail", ("c",))


# ------------------------------------------------------------------ reports


def test_observed_cells_come_from_a_real_check_report(tmp_path: Path) -> None:
    """The JSON contract: what ``check --json`` writes is what the tier reads."""
    from starttls_harness.cli import main

    report = tmp_path / "r.json"
    code = main(["check", "--only", "server.starttls-in-tls", "--json", str(report), "-q"])
    assert code == 0
    doc = json.loads(report.read_text())
    with pytest.raises(compare.TableError, match="twice"):  # two targets, one key space
        compare.observed_from_report(doc)
    observed = compare.observed_from_report(doc, "imap")
    assert set(observed) == {("server.starttls-in-tls", "1.2"), ("server.starttls-in-tls", "1.3")}
    assert {o.verdict for o in observed.values()} == {"pass"}


def test_a_report_with_a_cell_twice_is_refused() -> None:
    result = {"id": "server.x", "tls_version": "1.2", "verdict": "pass", "summary": "ok"}
    with pytest.raises(compare.TableError, match="twice"):
        compare.observed_from_report({"results": [result, dict(result)]})


# -------------------------------------------------------------- validation


def _doc(**cell: Any) -> Dict[str, Any]:
    return {
        "format": 1,
        "servers": {"p": {"dialect": "smtp", "scenarios": {"server.x": cell}}},
    }


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"format": 2, "servers": {}}, "format 2"),
        ({"format": 1, "servers": {}}, "non-empty"),
        (
            {"format": 1, "servers": {"p": {"dialect": "gopher", "scenarios": {}}}},
            "'gopher' is not one of smtp, imap",
        ),
        (_doc(**{"1.2": {"verdict": "fine", "seen": ["a"]}}), "verdict 'fine'"),
        (_doc(**{"1.2": {"verdict": "pass", "seen": []}}), "non-empty list"),
        (_doc(**{"1.2": {"verdict": "pass"}}), "non-empty list"),
        (_doc(**{"1.2": "pass"}), "expected an object"),
        (_doc(**{"1.4": {"verdict": "pass", "seen": ["a"]}}), "unknown key '1.4'"),
        (_doc(note=3), "note: expected a string"),
    ],
)
def test_malformed_tables_are_refused_with_their_place(doc: Dict[str, Any], message: str) -> None:
    with pytest.raises(compare.TableError, match=message):
        compare.parse_expected(doc)


def test_not_json_is_a_table_error(tmp_path: Path) -> None:
    bad = tmp_path / "e.json"
    bad.write_text("{")
    with pytest.raises(compare.TableError, match="not JSON"):
        compare.load_expected(bad)


# -------------------------------------------------------------------- docs


def _tables() -> Dict[str, compare.ServerTable]:
    a = compare.ServerTable(
        "alpha",
        "smtp",
        "alpha",
        "1.0",
        {
            ("server.x", "1.2"): Cell("pass", ("ok",)),
            ("server.x", "1.3"): Cell("warn", ("meh",)),
            ("server.y", "1.2"): Cell("skip", ("n/a",)),
            ("server.y", "1.3"): Cell("skip", ("n/a",)),
        },
        {"server.x": "does | things"},
    )
    return {"alpha": a}


def test_table_shows_split_verdicts_per_version_and_escapes_notes() -> None:
    text = compare.render_table(_tables(), {"server.x": "R5"})
    assert "| `server.x` | R5 | **pass** (1.2) / **warn** (1.3) |" in text
    assert "| `server.y` | ? | **skip** |" in text
    assert "does \\| things" in text
    # No note: the outcomes seen stand in.
    assert "| `server.y` | **skip** | n/a |" in text


def test_replace_table_needs_both_markers() -> None:
    doc = f"head\n{compare.TABLE_BEGIN}\nold\n{compare.TABLE_END}\ntail\n"
    assert compare.replace_table(doc, "new\n") == (
        f"head\n{compare.TABLE_BEGIN}\nnew\n{compare.TABLE_END}\ntail\n"
    )
    with pytest.raises(compare.TableError, match="markers"):
        compare.replace_table("no markers", "x")


def test_table_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{compare.TABLE_BEGIN}\n{compare.TABLE_END}\n")
    args = ["--readme", str(readme)]
    assert table.main([*args, "--check"]) == 1
    assert table.main(args) == 0
    assert table.main([*args, "--check"]) == 0
    assert "matches" in capsys.readouterr().out


# ------------------------------------------------------- update of one server


def test_update_keeps_notes_and_the_cells_of_versions_not_run() -> None:
    from realworld.run import updated_table

    old = _tables()["alpha"]
    instance = instances.Postfix("alpha", "smtp", Path("/nonexistent"), 1)
    new = updated_table(
        old, instance, "1.1", {("server.x", "1.3"): Outcome("pass", "fixed")}, ["1.3"]
    )
    assert new.tested_version == "1.1"
    assert new.notes == old.notes
    assert new.results[("server.x", "1.2")] == Cell("pass", ("ok",))
    assert new.results[("server.x", "1.3")] == Cell("pass", ("fixed",))
    assert ("server.y", "1.3") not in new.results  # not reported any more: dropped


# ---------------------------------------------------------- configurations


def test_postfix_is_a_loopback_sink_that_never_relays(tmp_path: Path) -> None:
    main_cf = instances.postfix_main_cf(
        queue=tmp_path / "q",
        data=tmp_path / "d",
        log=tmp_path / "maillog",
        mail_base=tmp_path / "m",
        certfile=tmp_path / "c.pem",
        keyfile=tmp_path / "k.pem",
    )
    settings = dict(
        (k.strip(), v.strip())
        for k, _, v in (
            line.partition("=") for line in main_cf.splitlines() if "=" in line and line[0] != "#"
        )
    )
    assert settings["inet_interfaces"] == "127.0.0.1"
    assert settings["relayhost"] == "" and settings["relay_domains"] == ""
    assert "permit_mynetworks" not in main_cf
    assert settings["smtpd_relay_restrictions"] == "reject_unauth_destination"
    for transport in ("default_transport", "relay_transport", "local_transport"):
        assert settings[transport].startswith("error:")
    assert settings["smtpd_tls_security_level"] == "may"
    assert settings["smtpd_helo_required"] == "yes"
    assert settings["maillog_file_prefixes"] == str(tmp_path)

    master = instances.postfix_master_cf(10025)
    listeners = [line for line in master.splitlines() if " inet " in line]
    assert listeners == ["127.0.0.1:10025 inet n - n - - smtpd"]
    assert not any(line.split()[4:5] == ["y"] for line in master.splitlines()[1:])


def test_dovecot_listens_on_loopback_only_with_starttls(tmp_path: Path) -> None:
    conf = instances.dovecot_conf(
        port=10143,
        base_dir=tmp_path / "run",
        state_dir=tmp_path / "state",
        log=tmp_path / "log",
        passwd=tmp_path / "passwd",
        mail_root=tmp_path / "mail",
        certfile=tmp_path / "c.pem",
        keyfile=tmp_path / "k.pem",
    )
    lines = [line.strip() for line in conf.splitlines()]
    assert "listen = 127.0.0.1" in lines
    assert "protocols = imap" in lines
    assert "ssl = yes" in lines
    assert "address = 127.0.0.1" in lines and "port = 10143" in lines
    assert "port = 0" in lines  # no imaps listener
    assert f"base_dir = {tmp_path / 'run'}" in lines


# ----------------------------------------------------------- storage probe


def _touch(path: Path, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    path.chmod(mode)


def test_maildir_counts_new_and_cur_not_tmp(tmp_path: Path) -> None:
    _touch(tmp_path / "new" / "1", 0o600)
    _touch(tmp_path / "cur" / "2", 0o600)
    _touch(tmp_path / "tmp" / "3", 0o600)
    assert count_stored.count_maildir(tmp_path) == 2
    assert count_stored.count_maildir(tmp_path / "absent") == 0


def test_postfix_queue_counts_only_finished_files(tmp_path: Path) -> None:
    _touch(tmp_path / "incoming" / "A1", 0o700)  # complete
    _touch(tmp_path / "incoming" / "A2", 0o600)  # cleanup still writing
    _touch(tmp_path / "deferred" / "B" / "B1", 0o700)  # hashed subdirectory
    _touch(tmp_path / "defer" / "B" / "B1", 0o700)  # delivery logs are not messages
    assert count_stored.count_postfix_queue(tmp_path) == 2


def test_count_stored_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _touch(tmp_path / "queue" / "active" / "Q", 0o700)
    _touch(tmp_path / "mail" / "sink" / "new" / "m", 0o600)
    _touch(tmp_path / "mail" / "tester" / "cur" / "m", 0o600)
    assert count_stored.main(["postfix", str(tmp_path)]) == 0
    assert count_stored.main(["dovecot", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == ["2", "1"]
    assert count_stored.main(["exim", str(tmp_path)]) == 2
    assert count_stored.main([]) == 2


def test_storage_probe_command_names_the_instance(tmp_path: Path) -> None:
    postfix = instances.Postfix("postfix", "smtp", tmp_path, 1)
    command = postfix.storage_probe_command()
    assert command.endswith(f"count_stored.py postfix {tmp_path}")
    assert postfix.stored() == 0


# --------------------------------------------------------------- readiness


@pytest.fixture
def greeter() -> Iterator[List[Any]]:
    """A one-shot loopback server that sends a greeting; yields [port, greeting]."""
    server = socket.create_server(("127.0.0.1", 0))
    box: List[Any] = [server.getsockname()[1], b"220 ready\r\n"]

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.sendall(box[1])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield box
    thread.join(5)


def test_wait_for_greeting_returns_the_greeting(greeter: List[Any]) -> None:
    got = instances.wait_for_greeting("127.0.0.1", greeter[0], b"220 ", 5.0)
    assert got == b"220 ready\r\n"


def test_wait_for_greeting_is_bounded_on_a_closed_port() -> None:
    port = instances.free_port()
    with pytest.raises(instances.NotReady, match=r"did not greet within 0\.2 s"):
        instances.wait_for_greeting("127.0.0.1", port, b"220 ", 0.2)


def test_wait_for_greeting_stops_when_the_server_died() -> None:
    port = instances.free_port()
    with pytest.raises(instances.NotReady, match="process exited"):
        instances.wait_for_greeting("127.0.0.1", port, b"220 ", 30.0, alive=lambda: False)


def test_stop_before_start_is_a_no_op(tmp_path: Path) -> None:
    for made in (
        instances.Postfix("postfix", "smtp", tmp_path, 1),
        instances.Dovecot("dovecot", "imap", tmp_path, 1),
    ):
        made.stop()
        assert not made.started


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_run_refuses_politely_without_the_servers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from realworld import run

    monkeypatch.setattr(run, "binaries_missing", lambda: ["/usr/sbin/postfix"])
    assert run.main([]) == run.EXIT_ERROR
    assert "realworld/install.sh" in capsys.readouterr().err
