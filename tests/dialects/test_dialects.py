"""The dialect registry: what feeds from it, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starttls_harness.dialects import (
    DIALECTS,
    EVERY_DIALECT,
    dialect_named,
    dialect_of_scheme,
    names,
)
from starttls_harness.dialects.base import missing
from starttls_harness.run.path_reference import reference_pair
from starttls_harness.run.server import ServerTarget
from starttls_harness.run.targets import ReferenceClientTarget
from starttls_harness.scenarios.server import CATALOGUE, select
from starttls_harness.tls.framing import LineFramer

SCHEMA = Path(__file__).resolve().parents[2] / "harness" / "report" / "schemas"


def test_the_report_schema_knows_exactly_the_registered_dialects() -> None:
    schema = json.loads((SCHEMA / "report.schema.json").read_text())
    enum = schema["properties"]["results"]["items"]["properties"]["dialect"]["enum"]
    assert enum == list(names())


def test_every_registered_dialect_is_complete() -> None:
    for dialect in DIALECTS.values():
        assert missing(dialect) == [], dialect.name
        assert dialect_of_scheme(dialect.url_scheme) is dialect


def test_the_mail_dialects_cut_crlf_lines() -> None:
    for name in ("smtp", "imap"):
        framer = dialect_named(name).framer()
        assert isinstance(framer, LineFramer)
        assert framer.split(b"A\r\nB\r\nC") == ([b"A\r\n", b"B\r\n"], 6)
        assert dialect_named(name).framer() is not framer  # one per stream


def test_unknown_dialects_and_schemes_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown dialect 'gopher'; known: smtp, imap"):
        dialect_named("gopher")
    with pytest.raises(ValueError, match="unknown URL scheme 'gopher'"):
        dialect_of_scheme("gopher")


def test_scenarios_apply_to_every_registered_dialect_unless_they_say_otherwise() -> None:
    assert list(EVERY_DIALECT) == list(names())
    assert "smtp" in EVERY_DIALECT and "gopher" not in EVERY_DIALECT
    # Where a bare closure is the return to plaintext (LDAP), the scenarios that
    # call plaintext after one a violation, or refuse a STOPTLS command, do not apply.
    by_closure = {
        "server.plaintext-after-close",
        "server.data-after-close-notify",
        "server.stoptls-outside-tls",
    }
    for name in names():
        left_out = {s.id for s in CATALOGUE} - {s.id for s in select(dialect=name)}
        dialect = dialect_named(name)
        if not dialect.has_return_to_plaintext:  # postgres: no STOPTLS scenario applies
            wanted = {"server.one-sided-close-stoptls", "server.stoptls-cycle"}
        elif dialect.return_by_closure:  # LDAP
            wanted = by_closure
        elif dialect.server_may_close_first:  # FTP: no one-sided client closure to stage
            wanted = {"server.one-sided-close-stoptls"}
        else:
            wanted = set()
        assert left_out == wanted, name
    assert select(dialect="gopher") == []


def test_targets_of_an_unknown_dialect_are_refused_when_made() -> None:
    with pytest.raises(ValueError, match="unknown dialect 'gopher'"):
        ServerTarget("gopher", "127.0.0.1", 110)
    with pytest.raises(ValueError, match="unknown dialect 'gopher'"):
        ReferenceClientTarget("gopher")
    with pytest.raises(ValueError, match="unknown dialect 'gopher'"):
        reference_pair("gopher")
