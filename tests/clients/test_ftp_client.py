"""The reference FTP client and the client role's CCC scenarios.

The dialect is registered by these tests (FTP is not in the default
registry yet).  The harness plays the FTP server and sends its close_notify
right behind CCC's ``200`` (as ProFTPD): the strict reference client passes
the whole client catalogue and the three ``client.ccc-*`` scenarios; each
misbehaving one gets exactly the verdicts of
:data:`starttls_harness.dialects.ftp.CLIENT_EXPECTED`.  The reference client
also runs against the reference FTP server (AUTH TLS, login, CCC, plaintext).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Iterator, List, Tuple

import pytest
from starttls_harness.clients.ftp import BEHAVIOURS, FtpClient
from starttls_harness.dialects import DIALECTS, Dialect, register, unregister
from starttls_harness.dialects.ftp import CLIENT_EXPECTED, FTP
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.client import run_client_target
from starttls_harness.run.reference import reference_servers
from starttls_harness.run.targets import ReferenceClientTarget
from starttls_harness.run.validation import CLIENT_VALIDATION_SETTINGS
from starttls_harness.scenarios.ccc import CLIENT_CCC_SCENARIOS
from starttls_harness.scenarios.client import CLIENT_SCENARIOS
from starttls_harness.scenarios.expectations import expected_client_verdicts, mismatches
from starttls_harness.tls.engine import ClosureComplete


@pytest.fixture
def ftp() -> Iterator[Dialect]:
    registered_here = "ftp" not in DIALECTS
    if registered_here:
        register(FTP)
    try:
        yield FTP
    finally:
        if registered_here:
            unregister("ftp")


def test_the_client_ccc_scenarios_apply_by_flag(ftp: Dialect) -> None:
    assert {s.id for s in CLIENT_CCC_SCENARIOS} == {
        "client.ccc-cycle",
        "client.ccc-no-close-notify",
        "client.ccc-close-notify-reply",
    }
    for scenario in CLIENT_CCC_SCENARIOS:
        assert list(scenario.dialects) == ["ftp"] and scenario.role == "client"
        verdicts = {e.verdict for e in scenario.expect.values()}
        assert Verdict.PASS in verdicts and Verdict.FAIL in verdicts


async def _matrix() -> List[Tuple[str, List[Result]]]:
    scenarios = [*CLIENT_SCENARIOS, *CLIENT_CCC_SCENARIOS]
    settings = CLIENT_VALIDATION_SETTINGS

    async def one(behaviour: str) -> Tuple[str, List[Result]]:
        target = ReferenceClientTarget("ftp", behaviour, timeout=settings.reply_timeout)
        return behaviour, await run_client_target(scenarios, target, settings)

    return list(await asyncio.gather(*(one(b) for b in BEHAVIOURS)))


def test_the_ftp_client_validation_matrix_holds(ftp: Dialect) -> None:
    assert set(BEHAVIOURS) == set(CLIENT_EXPECTED)
    problems: List[str] = []
    for behaviour, results in asyncio.run(_matrix()):
        expected = expected_client_verdicts("ftp", behaviour)
        problems += [f"{behaviour}: {p}" for p in mismatches(results, expected)]
        if behaviour != "strict":
            guarded = next(iter(expected))
            assert any(r.id == guarded and r.verdict is not Verdict.PASS for r in results)
    assert problems == [], "\n".join(problems)


def test_the_reference_client_clears_the_control_channel_of_the_reference_server(
    ftp: Dialect,
) -> None:
    async def session() -> None:
        async with reference_servers(("ftp",)) as (target,):
            assert target.cafile is not None
            context = ssl.create_default_context(cafile=str(target.cafile))
            client = await FtpClient.connect(
                target.host,
                target.port,
                ssl_context=context,
                server_hostname="localhost",
                timeout=5.0,
            )
            assert await client.auth_tls()
            await client.login(target.user or "", target.password or "")
            await client.protect()
            await client.ccc()
            assert not client.transport.tls_active and "AUTH TLS" in (client.features or ())
            assert (await client.pwd()).startswith(b"257")  # still logged in (RFC 4217 §5)
            closures = [e for e in client.transport.events if isinstance(e, ClosureComplete)]
            assert closures and closures[-1].resumed and client.transport.violations == []
            assert (await client.mkd("made-in-plaintext")).startswith(b"257")
            await client.quit()

    asyncio.run(session())
