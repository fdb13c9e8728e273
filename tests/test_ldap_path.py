"""LDAP on path: the reference LDAP client and server through the proxy.

The proxy follows LDAP from the registry (BER units, StartTLS by its OID,
the removal of the TLS layer as a bare closure seen in both directions);
each misbehaving reference peer gets exactly the path matrix's verdicts.
"""

from __future__ import annotations

import asyncio
from typing import Iterator

import pytest
from starttls_harness.clients.ldap import BEHAVIOURS as CLIENT_BEHAVIOURS
from starttls_harness.dialects import DIALECTS, Dialect, register, unregister
from starttls_harness.dialects.ldap import LDAP
from starttls_harness.run.path_reference import validate_path
from starttls_harness.servers.ldap import BEHAVIOURS as SERVER_BEHAVIOURS


@pytest.fixture
def ldap() -> Iterator[Dialect]:
    ours = "ldap" not in DIALECTS
    if ours:
        register(LDAP)
    try:
        yield LDAP
    finally:
        if ours:
            unregister("ldap")


_CASES = [("server", b) for b in sorted(SERVER_BEHAVIOURS)] + [
    ("client", b) for b in sorted(CLIENT_BEHAVIOURS)
]


@pytest.mark.parametrize(("side", "behaviour"), _CASES)
def test_the_ldap_pair_matches_the_path_matrix(ldap: Dialect, side: str, behaviour: str) -> None:
    results, problems = asyncio.run(validate_path("ldap", side, behaviour))
    assert results and not problems, "\n".join(problems)
