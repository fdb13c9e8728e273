"""The catalogue against a server it did not write: unmodified aiosmtpd.

aiosmtpd (>= 1.4.6, a dependency) speaks STARTTLS through asyncio's own
TLS layer and has no STOPTLS.  The verdicts below were read off the
evidence and are pinned, so a change in the harness that alters how a
foreign server is judged shows up here.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Dict, List

from aiosmtpd.smtp import SMTP
from starttls_harness.report.verdicts import Result
from starttls_harness.run.server import RunSettings, ServerTarget, run_server_target
from starttls_harness.scenarios.server import CATALOGUE
from starttls_harness.tls.certs import Pki

EXPECTED: Dict[str, str] = {
    "server.command-injection": "pass",  # 1.4.6 clears its buffer (CVE-2024-34083 fix)
    "server.command-injection-split": "pass",
    "server.command-injection-multi": "pass",
    "server.plaintext-in-tls": "pass",
    # aiosmtpd answers a second STARTTLS with 220 and tries nested TLS.
    "server.starttls-in-tls": "warn",
    "server.stoptls-outside-tls": "pass",
    "server.one-sided-close": "pass",
    "server.one-sided-close-stoptls": "skip",  # no STOPTLS
    "server.plaintext-after-close": "pass",
    "server.data-after-close-notify": "pass",
    "server.truncation": "pass",  # an unfinished DATA body is dropped
    "server.alert-then-plaintext": "pass",
    # asyncio's own TLS layer answers close_notify since its rewrite in
    # Python 3.11; before that it closes TCP without answering (R5: warn).
    "server.close-notify-reply": "pass" if sys.version_info >= (3, 11) else "warn",
    "server.stoptls-cycle": "skip",
    "server.state-reset": "pass",
}


class Sink:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.count += 1
        return "250 OK"


async def run(pki: Pki, tls_version: str) -> List[Result]:
    sink = Sink()
    ctx = pki.server_context(tls_version)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(sink, tls_context=ctx, require_starttls=False, hostname="localhost"),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    target = ServerTarget(
        "smtp", "127.0.0.1", port, cafile=pki.cafile, storage_count=lambda: sink.count
    )
    try:
        return await run_server_target(
            CATALOGUE, target, RunSettings(reply_timeout=3), tls_versions=(tls_version,)
        )
    finally:
        server.close()
        await server.wait_closed()


def test_unmodified_aiosmtpd(pki: Pki, tls_version: str) -> None:
    results = asyncio.run(run(pki, tls_version))
    seen = {r.id: r.verdict.value for r in results if r.id in EXPECTED}
    assert seen == EXPECTED
