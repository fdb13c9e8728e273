"""ManageSieve in every role: the three validation matrices against the reference peers.

The strict ManageSieve server and client pass every applicable scenario; each
misbehaving one gets exactly the verdicts of
:mod:`starttls_harness.scenarios.expectations` (with the ManageSieve client's own
entry, :attr:`Dialect.reference_client_expected`), on real TLS over loopback.
"""

from __future__ import annotations

from typing import Any, List, Tuple

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
from starttls_harness.servers.sieve import BEHAVIOURS as SERVER_BEHAVIOURS
from starttls_harness.tls.certs import Pki

NAME = "sieve"
Run = Any


def test_every_scenario_applies_to_sieve() -> None:
    assert dialect_named(NAME).has_return_to_plaintext
    every = {s.id for s in CATALOGUE if s.role == "server"}
    assert {s.id for s in select(role="server", dialect=NAME)} == every
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
        wanted = flag is None or getattr(dialect_named(NAME), flag)
        wanted = wanted and scenario.id not in REMOVAL_SCENARIOS  # LDAP only
        assert (NAME in scenario.dialects) == wanted, scenario.id
    assert all(NAME in s.dialects for s in PATH_SCENARIOS)


def test_every_behaviour_has_an_expectation() -> None:
    assert set(SERVER_BEHAVIOURS) == set(SERVER_EXPECTED)
    known = {b for s, b in PATH_EXPECTED if s == "client"}
    assert set(client_behaviours(NAME)) <= known


@pytest.mark.parametrize("behaviour", sorted(SERVER_EXPECTED))
def test_server_matrix(behaviour: str, tls_version: str, run: Run) -> None:
    results, problems = run(lambda: validate_server(NAME, behaviour, (tls_version,)), 120)
    assert len(results) == len(select(role="server", dialect=NAME))
    assert problems == []
    if behaviour != "strict":
        guarded = next(iter(SERVER_EXPECTED[behaviour]))
        assert any(r.id == guarded and r.verdict is not Verdict.PASS for r in results)


@pytest.mark.parametrize("behaviour", client_behaviours(NAME))
def test_client_matrix(behaviour: str, tls_version: str, run: Run) -> None:
    results, problems = run(lambda: validate_client(NAME, behaviour, (tls_version,)), 60)
    assert len(results) == len([s for s in CLIENT_SCENARIOS if NAME in s.dialects])
    assert problems == []
    if behaviour != "strict":
        guarded = next(iter(expected_client_verdicts(NAME, behaviour)))
        assert any(r.id == guarded and r.verdict is not Verdict.PASS for r in results)


def _pairings() -> List[Tuple[str, str]]:
    clients = set(client_behaviours(NAME))
    return [
        (side, behaviour)
        for side, behaviour in PATH_EXPECTED
        if behaviour in (SERVER_BEHAVIOURS if side == "server" else clients)
    ]


@pytest.mark.parametrize(("side", "behaviour"), _pairings())
def test_path_matrix(side: str, behaviour: str, tls_version: str, pki: Pki, run: Run) -> None:
    results, problems = run(
        lambda: validate_path(NAME, side, behaviour, (tls_version,), pki=pki), 60
    )
    assert len(results) == len(PATH_SCENARIOS)
    assert problems == []
