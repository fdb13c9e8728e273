"""The proxy on the command line: readable event lines, addresses, the run loop.

``starttls-harness proxy`` prints every :class:`~starttls_harness.proxy.events.ProxyEvent`
as one line (:func:`format_event`) while :func:`run_proxy` relays until stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import IO, Any, Callable, Optional, Sequence, Union

from starttls_harness.proxy.connection import Address
from starttls_harness.proxy.events import ProxyEvent
from starttls_harness.proxy.faults import Fault, escape_bytes, parse_fault
from starttls_harness.proxy.relay import Proxy
from starttls_harness.tls.records import HEADER_LEN, check_header

__all__ = ["format_event", "parse_address", "run_proxy"]


def format_event(event: ProxyEvent) -> str:
    """One readable line for ``starttls-harness proxy`` output."""
    where = f"[{event.connection}] {event.time:8.4f}s"
    direction = event.direction or "---"
    parts = [where, direction, event.kind]
    if event.points:
        parts.append(",".join(event.points))
    if event.method:
        parts.append(f"({event.method})")
    if event.action:
        parts.append(f"FAULT {event.action}")
    if event.data:
        if len(event.data) >= HEADER_LEN and check_header(event.data[:HEADER_LEN]) is None:
            parts.append(f"{len(event.data)} bytes")
        else:
            preview = escape_bytes(event.data[:120]) + ("..." if len(event.data) > 120 else "")
            parts.append(f"{len(event.data)} bytes '{preview}'")
    if event.detail:
        parts.append("- " + event.detail)
    return " ".join(parts)


def parse_address(value: Union[str, Address]) -> Address:
    """``HOST:PORT`` (``[v6]:PORT``; an empty host is 127.0.0.1) as an address."""
    if isinstance(value, tuple):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, not {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def run_proxy(
    listen: Union[str, Address],
    upstream: Union[str, Address],
    dialect: str = "smtp",
    faults: Sequence[Union[Fault, str]] = (),
    keylog: Union[str, os.PathLike[str], None] = None,
    out: Optional[IO[str]] = None,
    *,
    stop: Optional[asyncio.Event] = None,
    on_start: Optional[Callable[[Proxy], None]] = None,
    **limits: Any,
) -> Proxy:
    """Run the proxy, printing each event as a line to ``out``, until ``stop``
    is set (or the task is cancelled).  ``on_start`` gets the listening proxy;
    ``limits`` go to :meth:`Proxy.start`.  Returns the proxy (closed)."""
    stream = out if out is not None else sys.stdout
    parsed = [f if isinstance(f, Fault) else parse_fault(f) for f in faults]

    def show(event: ProxyEvent) -> None:
        stream.write(format_event(event) + "\n")
        stream.flush()

    proxy = await Proxy.start(
        parse_address(listen),
        parse_address(upstream),
        dialect,
        parsed,
        keylog,
        on_event=show,
        **limits,
    )
    host, port = proxy.address
    up_host, up_port = proxy.upstream
    stream.write(
        f"proxy listening on {host}:{port} -> {up_host}:{up_port} ({dialect}); "
        f"key log: {keylog or 'none (TLS 1.3 followed by position)'}\n"
    )
    for fault in parsed:
        stream.write(f"fault: {fault}\n")
    stream.flush()
    if on_start is not None:
        on_start(proxy)
    try:
        if stop is None:
            stop = asyncio.Event()
        await stop.wait()
    finally:
        proxy.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await proxy.wait_closed()
    return proxy
