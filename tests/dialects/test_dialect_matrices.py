"""The three validation matrices of POP3, ManageSieve, PostgreSQL and XMPP.

For each dialect, each reference server and client in each of its modes runs
the catalogue of its role on real TLS over loopback, and the path role runs
through the fault proxy: the strict peers pass every applicable scenario and
each misbehaving one gets exactly the verdicts of
:mod:`starttls_harness.scenarios.expectations` (with the dialect's own
overrides), the scenario that guards the broken rule among the failures.
What is particular to a dialect family stays in its own file
(``test_pop3_and_sieve_catalogue``, ``test_postgres_and_xmpp_catalogue``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Tuple

import pytest
from starttls_harness.dialects import dialect_named
from starttls_harness.report.verdicts import Verdict
from starttls_harness.run.client_checks import validate_client
from starttls_harness.run.path_reference import validate_path
from starttls_harness.run.targets import client_behaviours
from starttls_harness.run.validation import validate_server
from starttls_harness.scenarios.client import CLIENT_SCENARIOS
from starttls_harness.scenarios.expectations import (
    PATH_EXPECTED,
    expected_client_verdicts,
    expected_server_verdicts,
)
from starttls_harness.scenarios.path import PATH_SCENARIOS
from starttls_harness.scenarios.server import CATALOGUE, select
from starttls_harness.servers.base import Behaviour
from starttls_harness.tls.certs import Pki

Run = Callable[..., Any]
P = Verdict.PASS
DIALECTS = ("pop3", "sieve", "postgres", "xmpp")


def server_behaviours(name: str) -> Dict[str, Behaviour]:
    """The modes of the dialect's reference server."""
    module = importlib.import_module(dialect_named(name).server_module)
    behaviours: Dict[str, Behaviour] = module.BEHAVIOURS
    return behaviours


_SERVER = [(name, b) for name in DIALECTS for b in sorted(server_behaviours(name))]


@pytest.mark.parametrize(("name", "behaviour"), _SERVER)
def test_server_matrix(name: str, behaviour: str, tls_version: str, run: Run) -> None:
    results, problems = run(lambda: validate_server(name, behaviour, (tls_version,)), 120)
    assert len(results) == len(select(role="server", dialect=name))
    assert len(results) == len([s for s in CATALOGUE if name in s.dialects])
    assert problems == []
    if behaviour != "strict":
        guarded = next(iter(expected_server_verdicts(name, behaviour)))
        assert any(r.id == guarded and r.verdict is not P for r in results)


_CLIENT = [(name, b) for name in DIALECTS for b in client_behaviours(name)]


@pytest.mark.parametrize(("name", "behaviour"), _CLIENT)
def test_client_matrix(name: str, behaviour: str, tls_version: str, run: Run) -> None:
    results, problems = run(lambda: validate_client(name, behaviour, (tls_version,)), 60)
    assert len(results) == len([s for s in CLIENT_SCENARIOS if name in s.dialects])
    assert problems == []
    if behaviour != "strict":
        guarded = next(iter(expected_client_verdicts(name, behaviour)))
        assert any(r.id == guarded and r.verdict is not P for r in results)


def _pairings() -> List[Tuple[str, str, str]]:
    out = []
    for name in DIALECTS:
        servers, clients = set(server_behaviours(name)), set(client_behaviours(name))
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
    assert results and problems == []
    assert len(results) == len([s for s in PATH_SCENARIOS if name in s.dialects])
