"""FTP in the default registry: every role's catalogue applies, the path matrix holds.

The server and client matrices are in tests/servers/test_ftp_server.py and
tests/clients/test_ftp_client.py; here: FTP is registered by default, the
scenarios that cannot be staged against a server that closes first do not
apply to it (and say so in their dialect view), and every reference pair on
a path gets exactly the verdicts of ``PATH_EXPECTED`` with FTP's overrides
(``harness/dialects/ftp.py``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, List, Tuple

import pytest
from starttls_harness.dialects import dialect_named, names
from starttls_harness.run.path_reference import validate_path
from starttls_harness.scenarios.catalogue import ALL_SCENARIOS
from starttls_harness.scenarios.client import REMOVAL_SCENARIOS
from starttls_harness.scenarios.expectations import PATH_EXPECTED, expected_path_verdicts
from starttls_harness.tls.certs import Pki

Run = Callable[..., Any]

#: Scenarios whose fault needs the client to start the closure.
CLIENT_FIRST = {"server.one-sided-close-stoptls", "path.inject-after-close"}


def test_ftp_is_registered_and_every_other_scenario_applies() -> None:
    assert "ftp" in names()
    ftp = dialect_named("ftp")
    for scenario in ALL_SCENARIOS:
        # No PREAUTH greeting, no capability-list hello, no tagged replies, and
        # the return is CCC, not LDAP's bare removal.
        flagged = {
            "client.starttls-preauth",
            "client.response-injection-capabilities",
            "client.response-injection-tagged",
            "client.starttls-untagged",
            "client.starttls-required-stripped",
            *REMOVAL_SCENARIOS,
        }
        wanted = scenario.id not in CLIENT_FIRST and scenario.id not in flagged
        assert ("ftp" in scenario.dialects) == wanted, scenario.id
        if scenario.id in CLIENT_FIRST:
            assert "smtp" in scenario.dialects, scenario.id
    assert ftp.server_may_close_first and ftp.has_return_to_plaintext


def _pairings() -> List[Tuple[str, str]]:
    ftp = dialect_named("ftp")
    out = []
    for side, behaviour in PATH_EXPECTED:
        module = ftp.client_module if side == "client" else ftp.server_module
        if behaviour in importlib.import_module(module).BEHAVIOURS:
            out.append((side, behaviour))
    return out


@pytest.mark.parametrize(("side", "behaviour"), _pairings())
def test_ftp_path_matrix(side: str, behaviour: str, tls_version: str, pki: Pki, run: Run) -> None:
    expected_path_verdicts("ftp", side, behaviour)  # known
    results, problems = run(
        lambda: validate_path("ftp", side, behaviour, (tls_version,), pki=pki), 60
    )
    assert results and problems == []
