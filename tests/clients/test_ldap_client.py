"""The reference LDAP client: against the client catalogue and against the reference server.

The client catalogue's validation matrix (the strict client passes, each
misbehaving one gets exactly its non-pass verdicts, LDAP's differences in
``dialects/ldap.py``), and one interoperability session: the reference
client and server remove the TLS layer in both directions on one
connection and the bind is gone after each removal (R8).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Iterator

import pytest
from starttls_harness.clients.ldap import BEHAVIOURS, LdapClient, TLSRequired
from starttls_harness.dialects import DIALECTS, Dialect, register, unregister
from starttls_harness.dialects.ldap import LDAP
from starttls_harness.run.client_checks import validate_client
from starttls_harness.scenarios.client import CLIENT_SCENARIOS
from starttls_harness.servers.base import ServerConfig
from starttls_harness.servers.ldap import start_server
from starttls_harness.tls.certs import client_context, make_pki


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


def test_the_removal_scenarios_apply_to_ldap_alone(ldap: Dialect) -> None:
    removal = {s.id for s in CLIENT_SCENARIOS if s.id.startswith("client.removal-")}
    assert removal == {"client.removal-by-server", "client.removal-one-sided"}
    for s in CLIENT_SCENARIOS:
        if s.id in removal:
            assert list(s.dialects) == ["ldap"]
    left_out = {s.id for s in CLIENT_SCENARIOS if "ldap" not in s.dialects}
    # The command-staged one-sided closure is replaced by the removal one;
    # LDAP has no PREAUTH greeting and needs no root DSE search after StartTLS;
    # its replies are neither capability lists nor tagged (no such shapes).
    assert left_out == {
        "client.one-sided-close",
        "client.starttls-preauth",
        "client.state-reset",
        "client.response-injection-capabilities",
        "client.response-injection-tagged",
        "client.starttls-untagged",
        "client.starttls-required-stripped",  # XMPP's <required/> mark
    }


@pytest.mark.parametrize("behaviour", sorted(BEHAVIOURS))
def test_the_reference_client_matches_its_matrix(ldap: Dialect, behaviour: str) -> None:
    results, problems = asyncio.run(validate_client("ldap", behaviour))
    assert results and not problems, "\n".join(problems)


def test_removal_both_ways_against_the_reference_server(tmp_path: Path) -> None:
    async def body() -> None:
        pki = make_pki(directory=tmp_path)
        pki.write(tmp_path)
        running = await start_server(ServerConfig(pki=pki))
        ctx = client_context("1.3", cafile=Path(str(pki.cafile)))
        client = await LdapClient.connect(
            running.host, running.port, ssl_context=ctx, server_hostname="localhost", timeout=5
        )
        try:
            with pytest.raises(TLSRequired):
                await client.bind("tester", "correct horse")  # never in plaintext (R9)
            assert await client.starttls()
            await client.bind("tester", "correct horse")
            assert await client.whoami() == b"dn:cn=tester"
            await client.remove_tls()  # the client starts the removal
            assert not client.transport.tls_active
            assert await client.whoami() == b""  # the bind is gone (R8)
            await client.search_root()  # plaintext PDUs flow after the removal
            assert await client.starttls()
            await client.bind("tester", "correct horse")
            await client.add(b"cn=x,dc=example,dc=invalid", b"entry")
            assert len(running.messages) == 1
            await client.unbind()
        finally:
            client.close()
            await running.close()

    asyncio.run(body())
