"""LMTP and NNTP run the whole catalogue of every role, judged by the matrices.

The dialects were added by the registry alone (``harness/dialects/lmtp.py``,
``nntp.py``): every server, client and path scenario applies to them (but
client.starttls-preauth, which needs ``has_preauth``), the strict reference
peers pass every one, and each misbehaving reference peer gets exactly the
verdicts of :mod:`starttls_harness.scenarios.expectations` (LMTP with no
dialect override, as the SMTP peers; the NNTP client takes in every injected
line, as the IMAP client, so its dialect overrides the injection verdicts).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, List, Tuple

import pytest
from starttls_harness.dialects import dialect_named, names
from starttls_harness.report.verdicts import Verdict
from starttls_harness.run.client_checks import validate_client
from starttls_harness.run.path_reference import validate_path
from starttls_harness.run.targets import client_behaviours
from starttls_harness.run.validation import validate_server
from starttls_harness.scenarios.catalogue import ALL_SCENARIOS
from starttls_harness.scenarios.ccc import CCC_SCENARIOS
from starttls_harness.scenarios.client import CLIENT_SCENARIOS, REMOVAL_SCENARIOS
from starttls_harness.scenarios.expectations import (
    PATH_EXPECTED,
    SERVER_EXPECTED,
    expected_client_verdicts,
)
from starttls_harness.scenarios.server import CATALOGUE
from starttls_harness.tls.certs import Pki

Run = Callable[..., Any]
DIALECTS = ("lmtp", "nntp")
P = Verdict.PASS


@pytest.mark.parametrize("dialect", DIALECTS)
def test_registered_with_every_scenario(dialect: str) -> None:
    assert dialect in names()
    assert dialect_named(dialect).has_return_to_plaintext  # the STOPTLS test extension
    # Every scenario applies, but for the PREAUTH one, which needs a dialect
    # whose greeting can authenticate (IMAP PREAUTH), and the CCC ones, which
    # need a server that may end TLS first (FTP): exact both ways.
    d = dialect_named(dialect)
    ccc = {s.id for s in CCC_SCENARIOS}
    for scenario in ALL_SCENARIOS:
        wanted = True
        if scenario.id == "client.starttls-preauth":
            wanted = d.has_preauth
        elif scenario.id == "client.response-injection-capabilities":
            wanted = d.has_capability_list_reply
        elif scenario.id in ("client.response-injection-tagged", "client.starttls-untagged"):
            wanted = d.has_tagged_replies
        elif scenario.id == "client.starttls-required-stripped":
            wanted = d.marks_starttls_required
        elif scenario.id in ccc:
            wanted = d.server_may_close_first
        elif scenario.id in REMOVAL_SCENARIOS:
            wanted = d.return_by_closure  # LDAP's removal of the TLS layer
        assert (dialect in scenario.dialects) == wanted, scenario.id


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_behaviour_has_an_expectation(dialect: str) -> None:
    server = importlib.import_module(dialect_named(dialect).server_module)
    assert set(server.BEHAVIOURS) == set(SERVER_EXPECTED)
    for behaviour in client_behaviours(dialect):
        expected_client_verdicts(dialect, behaviour)  # raises if unknown


_SERVER = [(d, b) for d in DIALECTS for b in sorted(SERVER_EXPECTED)]


@pytest.mark.parametrize(("dialect", "behaviour"), _SERVER, ids=[f"{d}-{b}" for d, b in _SERVER])
def test_server_matrix(dialect: str, behaviour: str, tls_version: str, run: Run) -> None:
    results, problems = run(lambda: validate_server(dialect, behaviour, (tls_version,)), 120)
    assert len(results) == len([s for s in CATALOGUE if s.role == "server"])
    assert problems == []
    if behaviour != "strict":
        guarded = next(iter(SERVER_EXPECTED[behaviour]))
        assert any(r.id == guarded and r.verdict is not P for r in results)


_CLIENT = [(d, b) for d in DIALECTS for b in client_behaviours(d)]


@pytest.mark.parametrize(("dialect", "behaviour"), _CLIENT, ids=[f"{d}-{b}" for d, b in _CLIENT])
def test_client_matrix(dialect: str, behaviour: str, tls_version: str, run: Run) -> None:
    results, problems = run(lambda: validate_client(dialect, behaviour, (tls_version,)), 60)
    assert len(results) == len([s for s in CLIENT_SCENARIOS if dialect in s.dialects])
    assert problems == []
    if behaviour != "strict":
        guarded = next(iter(expected_client_verdicts(dialect, behaviour)))
        assert any(r.id == guarded and r.verdict is not P for r in results)


def _pairings() -> List[Tuple[str, str, str]]:
    out = []
    for dialect in DIALECTS:
        for side, behaviour in PATH_EXPECTED:
            module = dialect_named(dialect).server_module
            if side == "client":
                module = dialect_named(dialect).client_module
            if behaviour in importlib.import_module(module).BEHAVIOURS:
                out.append((dialect, side, behaviour))
    return out


@pytest.mark.parametrize(("dialect", "side", "behaviour"), _pairings())
def test_path_matrix(
    dialect: str, side: str, behaviour: str, tls_version: str, pki: Pki, run: Run
) -> None:
    results, problems = run(
        lambda: validate_path(dialect, side, behaviour, (tls_version,), pki=pki), 60
    )
    assert results and problems == []
