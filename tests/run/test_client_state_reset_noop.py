"""``client.state-reset``: a NOOP after STARTTLS carries no state, the next command decides.

sieve-connect (Debian) resynchronises after STARTTLS with ``NOOP
"STARTTLS-RESYNC-CAPA"``, reads what comes back up to the tagged OK and,
having no capabilities then, asks ``CAPABILITY``: it relies on nothing
learned in plaintext.  A client that sends the same NOOP and then
authenticates at once still fails.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any, Callable

from starttls_harness.report.verdicts import Verdict
from starttls_harness.run.client import run_client_scenario
from starttls_harness.run.targets import ClientOutcome, ClientTarget
from starttls_harness.run.validation import CLIENT_VALIDATION_SETTINGS
from starttls_harness.scenarios.client import client_by_id
from starttls_harness.tls.certs import client_context

Run = Callable[..., Any]


async def _read_until_ok(reader: asyncio.StreamReader, tag: bytes = b"") -> bytes:
    """Lines up to the closing ``OK`` (with ``tag`` in it when given)."""
    seen = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), 3.0)
        if not line:
            raise ConnectionError("the server closed the connection")
        seen += line
        if line.startswith((b"NO", b"BYE")):
            raise ConnectionError(line.decode("latin-1").strip())
        if line.startswith(b"OK") and tag in line:
            return seen


async def _start_tls(writer: asyncio.StreamWriter, context: ssl.SSLContext) -> None:
    """``StreamWriter.start_tls`` (Python 3.11+), or the loop's on older ones."""
    if hasattr(writer, "start_tls"):
        await writer.start_tls(context, server_hostname="localhost")
        return
    loop = asyncio.get_running_loop()
    transport = writer.transport
    tls = await loop.start_tls(
        transport, transport.get_protocol(), context, server_hostname="localhost"
    )
    setattr(writer, "_transport", tls)  # noqa: B010 (as 3.11's start_tls does)


def _resyncing_client(then: bytes) -> Callable[..., Any]:
    async def client(host: str, port: int, cafile: Path, tls_version: str) -> ClientOutcome:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await _read_until_ok(reader)
            writer.write(b"STARTTLS\r\n")
            await _read_until_ok(reader)
            context: ssl.SSLContext = client_context(tls_version, cafile=cafile)
            await _start_tls(writer, context)
            writer.write(b'NOOP "STARTTLS-RESYNC-CAPA"\r\n')
            await _read_until_ok(reader, b"STARTTLS-RESYNC-CAPA")
            writer.write(then)
            await _read_until_ok(reader)
            writer.write(b"LOGOUT\r\n")
            await _read_until_ok(reader)
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            return ClientOutcome(False, repr(exc))
        finally:
            writer.close()
        return ClientOutcome(True, "done")

    return client


def _state_reset(run: Run, client: Callable[..., Any], tls_version: str) -> Any:
    target = ClientTarget("sieve", client, "resyncing test client")
    return run(
        lambda: run_client_scenario(
            client_by_id("client.state-reset"), target, tls_version, CLIENT_VALIDATION_SETTINGS
        )
    )


def test_a_noop_resync_then_capability_passes(tls_version: str, run: Run) -> None:
    result = _state_reset(run, _resyncing_client(b"CAPABILITY\r\n"), tls_version)
    assert result.verdict is Verdict.PASS, result.summary


def test_a_noop_resync_then_authenticate_still_fails(tls_version: str, run: Run) -> None:
    result = _state_reset(run, _resyncing_client(b'AUTHENTICATE "PLAIN" ""\r\n'), tls_version)
    assert result.verdict is Verdict.FAIL, result.summary
    assert result.rule == "R8"
