"""``proxy --capture DIR``: one pcapng per proxied connection, both legs, real bytes.

The proxy sees the real bytes: what each sender sent (its received units) and
every write it made to each receiver (``sent`` events), with times.  A
connection becomes two TCP connections in one file -- client <-> proxy and
proxy <-> server -- so the faults are visible as the difference between the
legs; each fault and injection is a packet comment, and the bytes the proxy
injected are marked on the segment that carried them.  The proxy's key log
(``--keylog``) goes in the Decryption Secrets Block.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional, Tuple

from starttls_harness.dialects import dialect_named
from starttls_harness.proxy import Proxy, ProxyConnection, ProxyEvent
from starttls_harness.report.capture import wire_capture_bytes
from starttls_harness.report.formats import write_private
from starttls_harness.report.verdicts import Evidence, Exchange
from starttls_harness.run.path_evidence import proxy_legs
from starttls_harness.tls.aio import WireLog

__all__ = ["connection_capture", "on_closed_capture"]


def _legs(conn: ProxyConnection, base: float) -> Tuple[List[WireLog], Evidence]:
    """The two legs as wire logs, and the proxy's notes as evidence."""
    evidence = Evidence(start=base)
    for e in conn.events:
        if e.kind not in ("plaintext", "record", "fragment", "sent"):
            evidence.exchanges.append(Exchange(e.time, "--", "note", b"", _describe(e)))
    return proxy_legs(conn, base), evidence


def _describe(e: ProxyEvent) -> str:
    words = [f"proxy {e.kind}"]
    if e.direction:
        words.append(f"[{e.direction}]")
    words += [w for w in (e.point, e.action, e.detail) if w]
    return " ".join(words)


def connection_capture(conn: ProxyConnection, keylog: Optional[bytes], dialect: str) -> bytes:
    """The pcapng of one finished proxied connection."""
    last = conn.events[-1].time if conn.events else 0.0
    base = time.monotonic() - last  # written as the connection closes
    legs, evidence = _legs(conn, base)
    evidence.wires = list(legs)
    comment = (
        f"starttls-harness proxy, connection #{conn.number}: the client <-> proxy leg and "
        "the proxy <-> server leg; faults and injections are packet comments"
    )
    if not keylog:
        comment += "; no --keylog was given, so TLS stays encrypted"
    port = dialect_named(dialect).default_port or None
    data = wire_capture_bytes(evidence, keylog, comment=comment, service_port=port)
    if data is None:  # nothing crossed the proxy: still a file that says so
        data = wire_capture_bytes(
            Evidence(wires=[WireLog(segments=[(base, "in", "eof", b"")])]), keylog, comment=comment
        )
    assert data is not None
    return data


def on_closed_capture(proxy: Proxy, folder: Path, keylog: Optional[Path], dialect: str) -> None:
    """Wrap ``proxy.on_event`` so each connection is written when it closes."""
    shown = proxy.on_event

    def on_event(event: ProxyEvent) -> None:
        conn = next((c for c in proxy.connections if c.number == event.connection), None)
        if event.kind == "closed" and conn is not None:  # written before "closed" is shown
            keys = keylog.read_bytes() if keylog is not None and keylog.is_file() else None
            path = folder / f"proxy-{conn.number:04d}.pcapng"
            write_private(path, connection_capture(conn, keys, dialect))
        if shown is not None:
            shown(event)

    proxy.on_event = on_event
