"""The reference LDAP server against the server catalogue: its validation matrix.

The strict server passes every scenario that applies to LDAP (the removal
of the TLS layer runs where the mail dialects use STOPTLS), and each
misbehaving server gets exactly the non-pass verdicts of
``dialects/ldap.py``'s ``SERVER_EXPECTED``.
"""

from __future__ import annotations

import asyncio
from typing import Iterator, List

import pytest
from starttls_harness.dialects import DIALECTS, Dialect, register, unregister
from starttls_harness.dialects.ldap import LDAP, SERVER_EXPECTED
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.validation import validate_server
from starttls_harness.scenarios.ccc import CCC_SCENARIOS
from starttls_harness.scenarios.server import CATALOGUE, select
from starttls_harness.servers.ldap import BEHAVIOURS


@pytest.fixture
def ldap() -> Iterator[Dialect]:
    """LDAP in the registry (registered here unless the registry has it already)."""
    ours = "ldap" not in DIALECTS
    if ours:
        register(LDAP)
    try:
        yield LDAP
    finally:
        if ours:
            unregister("ldap")


def test_every_behaviour_has_its_matrix_entry() -> None:
    assert set(SERVER_EXPECTED) == set(BEHAVIOURS)


def test_what_does_not_apply_to_ldap_and_why(ldap: Dialect) -> None:
    chosen = {s.id for s in select(role="server", dialect="ldap")}
    left_out = {s.id for s in CATALOGUE} - chosen
    # A bare closure is LDAP's return to plaintext; there is no command to refuse.
    assert left_out == {
        "server.plaintext-after-close",
        "server.data-after-close-notify",
        "server.stoptls-outside-tls",
    }
    assert not any("ldap" in s.dialects for s in CCC_SCENARIOS)  # CCC needs a command


@pytest.mark.parametrize("behaviour", sorted(BEHAVIOURS))
def test_the_reference_server_matches_its_matrix(ldap: Dialect, behaviour: str) -> None:
    results: List[Result]
    results, problems = asyncio.run(validate_server("ldap", behaviour))
    assert results and not problems, "\n".join(problems)
    if behaviour == "strict":
        assert all(r.verdict is Verdict.PASS for r in results)
        ids = {r.id for r in results}
        assert {"server.stoptls-cycle", "server.close-notify-reply"} <= ids
