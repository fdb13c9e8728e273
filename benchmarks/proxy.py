"""(d) The proxy's added latency per round trip.

A client does ``NOOP`` round trips with the strict reference SMTP server,
once directly and once through :class:`starttls_harness.proxy.Proxy` with no
faults, on one event loop.  Two clients: a bare asyncio stream in
plaintext (the proxy's line path), and :class:`clients.smtp.SMTPClient`
after ``STARTTLS`` (the proxy's record path; TLS 1.3 followed by
position, no key log).  Batches alternate direct and proxied, so machine
noise hits both alike; the figure is the best batch's wall time per round trip.
"""

from __future__ import annotations

import asyncio
import time
from typing import Dict, List, Tuple

from starttls_harness.clients.smtp import SMTPClient
from starttls_harness.proxy import Proxy
from starttls_harness.run.reference import reference_servers
from starttls_harness.tls.certs import client_context

from ._common import Timing

__all__ = ["proxy_latency"]

NOOP = b"NOOP\r\n"


async def _plain_round_trips(host: str, port: int, n: int) -> float:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await asyncio.wait_for(reader.readline(), 5.0)  # greeting
        start = time.perf_counter()
        for _ in range(n):
            writer.write(NOOP)
            line = await asyncio.wait_for(reader.readline(), 5.0)
            assert line.startswith(b"250"), line
        return time.perf_counter() - start
    finally:
        writer.write(b"QUIT\r\n")
        writer.close()
        await writer.wait_closed()


async def _tls_round_trips(host: str, port: int, n: int, cafile: str, version: str) -> float:
    client = SMTPClient(
        host,
        port,
        tls_context=client_context(version, cafile=cafile),
        server_hostname="localhost",
        timeout=5.0,
    )
    await client.connect()
    try:
        await client.ehlo()
        await client.starttls()
        start = time.perf_counter()
        for _ in range(n):
            reply = await client.execute_command(NOOP.rstrip())
            assert reply.code == 250, reply
        return time.perf_counter() - start
    finally:
        await client.quit()
        client.close()


async def proxy_latency(
    n: int = 500, batches: int = 7, tls_version: str = "1.3"
) -> Dict[str, Timing]:
    """Median seconds per NOOP round trip: direct and proxied, plain and TLS."""
    timings = {
        name: Timing(name)
        for name in ("plain direct", "plain via proxy", "tls direct", "tls via proxy")
    }
    async with reference_servers(("smtp",)) as (target,):
        assert target.cafile is not None
        cafile = str(target.cafile)
        upstream = (target.host, target.port)
        proxy = await Proxy.start(upstream=upstream, dialect="smtp", max_connections=64)
        try:
            via = proxy.address
            plans: List[Tuple[str, Tuple[str, int], bool]] = [
                ("plain direct", upstream, False),
                ("plain via proxy", via, False),
                ("tls direct", upstream, True),
                ("tls via proxy", via, True),
            ]
            for _, address, tls in plans:  # warm up
                if tls:
                    await _tls_round_trips(*address, max(1, n // 10), cafile, tls_version)
                else:
                    await _plain_round_trips(*address, max(1, n // 10))
            for _ in range(batches):
                for name, address, tls in plans:
                    if tls:
                        seconds = await _tls_round_trips(*address, n, cafile, tls_version)
                    else:
                        seconds = await _plain_round_trips(*address, n)
                    timings[name].add(seconds, n)
        finally:
            proxy.close()
            await proxy.wait_closed()
    return timings
