"""POP3 and ManageSieve in every role: the three validation matrices against the reference peers.

The strict server and client of each pass every applicable scenario; each
misbehaving one gets exactly the verdicts of
:mod:`starttls_harness.scenarios.expectations` (with the client's own entry,
:attr:`Dialect.reference_client_expected`), on real TLS over loopback.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List, Tuple

import pytest
from starttls_harness.dialects import dialect_named
from starttls_harness.report.verdicts import Verdict
from starttls_harness.run.client_checks import validate_client
from starttls_harness.run.path_reference import validate_path
from starttls_harness.run.targets import client_behaviours
from starttls_harness.run.validation import validate_server
from starttls_harness.scenarios.client import CLIENT_SCENARIOS, REMOVAL_SCENARIOS
from starttls_harness.scenarios.expectations import (
    PATH_EXPECTED,
    SERVER_EXPECTED,
    expected_client_verdicts,
)
from starttls_harness.scenarios.path import PATH_SCENARIOS
from starttls_harness.scenarios.server import CATALOGUE, select
from starttls_harness.servers.base import Behaviour
from starttls_harness.tls.certs import Pki

#: The line dialects with STOPTLS whose every server scenario applies.
DIALECTS = ("pop3", "sieve")
Run = Any


def _server_behaviours(name: str) -> Dict[str, Behaviour]:
    behaviours: Dict[str, Behaviour] = importlib.import_module(
        dialect_named(name).server_module
    ).BEHAVIOURS
    return behaviours


@pytest.mark.parametrize("name", DIALECTS)
def test_every_scenario_applies(name: str) -> None:
    assert dialect_named(name).has_return_to_plaintext
    every = {s.id for s in CATALOGUE if s.role == "server"}
    assert {s.id for s in select(role="server", dialect=name)} == every
    # Every client scenario applies, but for those that need a dialect flag:
    # PREAUTH (a greeting that authenticates), a forged capability-list hello,
    # tagged replies.
    flags = {
        "client.starttls-preauth": "has_preauth",
        "client.response-injection-capabilities": "has_capability_list_reply",
        "client.response-injection-tagged": "has_tagged_replies",
        "client.starttls-untagged": "has_tagged_replies",
        "client.starttls-required-stripped": "marks_starttls_required",
    }
    for scenario in CLIENT_SCENARIOS:
        flag = flags.get(scenario.id)
        wanted = flag is None or getattr(dialect_named(name), flag)
        wanted = wanted and scenario.id not in REMOVAL_SCENARIOS  # LDAP only
        assert (name in scenario.dialects) == wanted, scenario.id
    assert all(name in s.dialects for s in PATH_SCENARIOS)


@pytest.mark.parametrize("name", DIALECTS)
def test_every_behaviour_has_an_expectation(name: str) -> None:
    assert set(_server_behaviours(name)) == set(SERVER_EXPECTED)
    known = {b for s, b in PATH_EXPECTED if s == "client"}
    assert set(client_behaviours(name)) <= known


@pytest.mark.parametrize(
    ("name", "behaviour"), [(n, b) for n in DIALECTS for b in sorted(SERVER_EXPECTED)]
)
def test_server_matrix(name: str, behaviour: str, tls_version: str, run: Run) -> None:
    results, problems = run(lambda: validate_server(name, behaviour, (tls_version,)), 120)
    assert len(results) == len(select(role="server", dialect=name))
    assert problems == []
    if behaviour != "strict":
        guarded = next(iter(SERVER_EXPECTED[behaviour]))
        assert any(r.id == guarded and r.verdict is not Verdict.PASS for r in results)


@pytest.mark.parametrize(
    ("name", "behaviour"), [(n, b) for n in DIALECTS for b in client_behaviours(n)]
)
def test_client_matrix(name: str, behaviour: str, tls_version: str, run: Run) -> None:
    results, problems = run(lambda: validate_client(name, behaviour, (tls_version,)), 60)
    assert len(results) == len([s for s in CLIENT_SCENARIOS if name in s.dialects])
    assert problems == []
    if behaviour != "strict":
        guarded = next(iter(expected_client_verdicts(name, behaviour)))
        assert any(r.id == guarded and r.verdict is not Verdict.PASS for r in results)


def _pairings() -> List[Tuple[str, str, str]]:
    out = []
    for name in DIALECTS:
        servers, clients = set(_server_behaviours(name)), set(client_behaviours(name))
        for side, behaviour in PATH_EXPECTED:
            if behaviour in (servers if side == "server" else clients):
                out.append((name, side, behaviour))
    return out


@pytest.mark.parametrize(("name", "side", "behaviour"), _pairings())
def test_path_matrix(
    name: str, side: str, behaviour: str, tls_version: str, pki: Pki, run: Run
) -> None:
    results, problems = run(
        lambda: validate_path(name, side, behaviour, (tls_version,), pki=pki), 60
    )
    assert len(results) == len(PATH_SCENARIOS)
    assert problems == []
