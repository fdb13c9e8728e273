"""CVE-2024-34083: unmodified aiosmtpd, command injection at STARTTLS.

aiosmtpd < 1.4.6 kept plaintext that was pipelined after ``STARTTLS`` and
executed it inside TLS.  The ``cve`` tox environment installs 1.4.5 and then
1.4.6 from PyPI and runs this module with ``CVE_AIOSMTPD_EXPECT`` set to
``fail`` and ``pass``; without the variable it checks the installed aiosmtpd
(>= 1.4.6, a project dependency) and expects ``pass``.
"""

from __future__ import annotations

import asyncio
import os
from typing import List

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP
from starttls_harness.report.verdicts import Result
from starttls_harness.run.server import RunSettings, ServerTarget, run_server_scenario
from starttls_harness.scenarios.server import by_id
from starttls_harness.tls.certs import Pki

EXPECT = os.environ.get("CVE_AIOSMTPD_EXPECT", "pass")
VERSION = os.environ.get("CVE_AIOSMTPD_VERSION")


class Sink:
    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        return "250 OK"


async def check(pki: Pki, scenario_id: str, tls_version: str) -> Result:
    ctx = pki.server_context(tls_version)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Sink(), tls_context=ctx, require_starttls=False, hostname="localhost"),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    target = ServerTarget("smtp", "127.0.0.1", port, cafile=pki.cafile)
    try:
        return await run_server_scenario(
            by_id(scenario_id), target, tls_version, RunSettings(reply_timeout=5)
        )
    finally:
        server.close()
        await server.wait_closed()


def test_installed_version_is_the_one_under_test() -> None:
    if VERSION is not None:
        assert aiosmtpd.__version__ == VERSION


@pytest.mark.parametrize(
    "scenario_id", ["server.command-injection", "server.command-injection-multi"]
)
def test_command_injection_verdict(pki: Pki, tls_version: str, scenario_id: str) -> None:
    result = asyncio.run(check(pki, scenario_id, tls_version))
    ladder: List[str] = [
        f"{e.direction} {e.kind} {e.data!r} {e.note}" for e in result.evidence.exchanges
    ]
    assert result.verdict.value == EXPECT, "\n".join([result.summary, *ladder])
    if EXPECT == "fail":
        assert result.rule == "R1"
        assert result.evidence.injected(), "the evidence must show what was injected"
