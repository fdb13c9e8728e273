"""POP3 and ManageSieve: every scenario applies, every mode has its expected verdicts.

Their three validation matrices against the reference peers run in
``test_dialect_matrices``: the strict server and client of each pass every
applicable scenario; each misbehaving one gets exactly the verdicts of
:mod:`starttls_harness.scenarios.expectations` (with the client's own entry,
:attr:`Dialect.reference_client_expected`), on real TLS over loopback.
"""

from __future__ import annotations

import pytest
from starttls_harness.dialects import dialect_named
from starttls_harness.run.targets import client_behaviours
from starttls_harness.scenarios.client import CLIENT_SCENARIOS, REMOVAL_SCENARIOS
from starttls_harness.scenarios.expectations import (
    PATH_EXPECTED,
    SERVER_EXPECTED,
)
from starttls_harness.scenarios.path import PATH_SCENARIOS
from starttls_harness.scenarios.server import CATALOGUE, select
from test_dialect_matrices import server_behaviours

#: The line dialects with STOPTLS whose every server scenario applies.
DIALECTS = ("pop3", "sieve")


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
    assert set(server_behaviours(name)) == set(SERVER_EXPECTED)
    known = {b for s, b in PATH_EXPECTED if s == "client"}
    assert set(client_behaviours(name)) <= known
