"""One cause, one line (issue 11.7) for every kind of dialect, the newer ones too.

A target of another protocol is named as what it answers like -- also where
several protocols greet alike (SMTP, LMTP and FTP all greet ``220``) and
where the client speaks first (LDAP, PostgreSQL: the bytes the target sent
back are recognised) -- and a refused login stays one line when the server
answers in two (FTP ``331`` then ``530``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

import pytest
from starttls_harness.dialects import names
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.reference import reference_servers, server_module
from starttls_harness.run.sanity import TargetUnusable
from starttls_harness.run.server import RunSettings, ServerTarget, run_server_target
from starttls_harness.scenarios.server import CATALOGUE, by_id
from starttls_harness.servers.base import ServerConfig
from starttls_harness.tls.certs import Pki

Runner = Any
SETTINGS = RunSettings(reply_timeout=0.5, scenario_timeout=5.0, connect_timeout=1.0)


@pytest.mark.parametrize(
    ("server", "change", "line"),
    [
        ("smtp", {"dialect": "imap"}, "answers like SMTP, not IMAP"),
        ("smtp", {"dialect": "ftp"}, "answers like SMTP, not FTP"),
        ("smtp", {"dialect": "lmtp"}, "answers like SMTP, not LMTP"),
        ("smtp", {"dialect": "nntp"}, "answers like SMTP, not NNTP"),
        ("smtp", {"dialect": "ldap"}, "answers like SMTP, not LDAP"),
        ("smtp", {"dialect": "postgres"}, "answers like SMTP, not POSTGRES"),
        ("ftp", {"dialect": "smtp"}, "answers like FTP, not SMTP"),
        ("ldap", {"dialect": "postgres"}, "answers like LDAP, not POSTGRES"),
        ("imap", {"dialect": "ftp"}, "answers like IMAP, not FTP"),
        ("ftp", {"password": "wrong"}, "the login was refused: 331"),
        ("ldap", {"password": "wrong"}, "the login was refused"),
        ("ftp", {"server_hostname": "wrong.example"}, "the certificate check failed"),
        ("postgres", {"server_hostname": "wrong.example"}, "the certificate check failed"),
        ("postgres", {"port": 1}, "cannot connect"),
    ],
)
def test_an_unusable_target_of_any_dialect_is_one_line(
    server: str, change: Dict[str, Any], line: str, run: Runner
) -> None:
    async def body() -> str:
        async with reference_servers((server,)) as (target,):
            target = dataclasses.replace(target, **change)
            scenarios = [s for s in CATALOGUE if target.dialect in s.dialects]
            with pytest.raises(TargetUnusable) as raised:
                await run_server_target(scenarios, target, SETTINGS, raise_unusable=True)
            return raised.value.line

    said = run(body, 30.0)
    assert line in said, said
    assert "\n" not in said and "\r" not in said and said.isprintable(), said


def test_a_server_of_its_own_protocol_is_not_called_another(run: Runner) -> None:
    """An FTP server's ``220`` also fits SMTP's greeting: not a reason to call it SMTP."""

    async def body() -> str:
        async with reference_servers(("ftp",)) as (target,):
            target = dataclasses.replace(target, password="wrong")
            scenarios = [s for s in CATALOGUE if "ftp" in s.dialects]
            with pytest.raises(TargetUnusable) as raised:
                await run_server_target(scenarios, target, SETTINGS, raise_unusable=True)
            return raised.value.line

    assert "answers like" not in run(body, 30.0)


def test_a_fleet_names_the_cause_in_the_error_row(run: Runner) -> None:
    """In a fleet the same cause is one error row of that target, not an exception."""

    async def body() -> Any:
        async with reference_servers(("smtp",)) as (target,):
            target = ServerTarget("ldap", target.host, target.port)
            scenarios = [s for s in CATALOGUE if "ldap" in s.dialects]
            return await run_server_target(scenarios, target, SETTINGS)

    results = run(body, 30.0)
    assert results and all("answers like SMTP, not LDAP" in r.summary for r in results)


@pytest.mark.parametrize("dialect", names())
def test_a_tls13_only_target_of_any_dialect_skips_12(dialect: str, pki: Pki, run: Runner) -> None:
    """Issue 11.8 for every registered dialect (the test beside the run layer's
    covers SMTP and IMAP): no error rows, TLS 1.2 skipped, TLS 1.3 run."""

    async def body() -> List[Result]:
        config = ServerConfig(pki=pki, tls_version="1.3")
        server = await server_module(dialect).start_server(config)
        try:
            target = ServerTarget(
                dialect,
                server.host,
                server.port,
                cafile=pki.cafile,
                user=config.user,
                password=config.password,
            )
            chosen = [by_id("server.command-injection")]
            return await run_server_target(chosen, target, SETTINGS, raise_unusable=True)
        finally:
            await server.close()

    results = run(body, 30.0)
    by_version = {r.tls_version: r for r in results}
    assert by_version["1.2"].verdict is Verdict.SKIP, by_version["1.2"].summary
    assert by_version["1.2"].summary == "target does not offer TLS 1.2"
    assert by_version["1.3"].verdict is Verdict.PASS, by_version["1.3"].summary
