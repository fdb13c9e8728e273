"""The proxy's event log of a path run as report evidence (both directions, faults marked)."""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

from starttls_harness.proxy import ProxyConnection, ProxyEvent
from starttls_harness.report.verdicts import Exchange
from starttls_harness.tls.aio import WireLog

__all__ = ["exchange", "exchanges", "proxy_legs"]

#: Proxy event kinds that carry bytes a sender sent, as the proxy received them.
_RECEIVED = ("plaintext", "record", "fragment")


def _address(side: Any, name: str) -> Optional[Tuple[str, int]]:
    transport = getattr(side, "transport", None)
    with contextlib.suppress(Exception):
        value = transport.get_extra_info(name) if transport is not None else None
        if isinstance(value, tuple) and len(value) >= 2:
            return str(value[0]), int(value[1])
    return None


def proxy_legs(conn: ProxyConnection, base: float) -> List[WireLog]:
    """The real bytes of a proxied connection as two wire logs, for pcapng captures.

    The client <-> proxy leg and the proxy <-> server leg: what each sender
    sent (the proxy's received units) and every write the proxy made
    (``sent`` events), so a fault shows as the difference between the legs;
    bytes the proxy injected are marked on the write that carried them.
    ``base`` is the monotonic time of the connection's start (event times
    are relative to it).
    """
    client_leg = WireLog(
        server_side=True,
        local=_address(conn.client, "sockname"),
        peer=_address(conn.client, "peername"),
    )
    server_leg = WireLog(
        local=_address(conn.upstream, "sockname"), peer=_address(conn.upstream, "peername")
    )
    # c2s arrives on the client leg and is written on the server leg; s2c the reverse.
    inbound = {"c2s": client_leg, "s2c": server_leg}
    outbound = {"c2s": server_leg, "s2c": client_leg}
    injected: Dict[str, List[bytes]] = {"c2s": [], "s2c": []}

    def add(leg: WireLog, t: float, direction: str, what: str, data: bytes = b"") -> None:
        leg.segments.append((base + t, direction, what, data))

    for e in conn.events:
        d = e.direction
        if d in inbound and e.kind in _RECEIVED:
            add(inbound[d], e.time, "in", "data", e.data)
        elif d in inbound and e.kind in ("eof", "reset"):
            add(inbound[d], e.time, "in", e.kind)
        elif d in outbound and e.kind == "sent":
            leg = outbound[d]
            raw, injected[d] = injected[d], []
            if raw:
                leg.injected[len(leg.segments)] = raw
            add(leg, e.time, "out", "injected" if raw else "data", e.data)
        elif d in outbound and e.kind in ("fin-sent", "rst-sent"):
            add(outbound[d], e.time, "out", "eof" if e.kind == "fin-sent" else "abort")
        if e.kind == "injected" and d in injected and e.data:
            injected[d].append(e.data)
    return [leg for leg in (client_leg, server_leg) if leg.segments]


def exchanges(
    run_notes: Sequence[Tuple[int, str]], events: Sequence[ProxyEvent], marker: int
) -> List[Exchange]:
    """The proxy's log as evidence: both directions, injected bytes and faults marked."""
    notes: Dict[int, List[str]] = {}
    for index, text in run_notes:
        notes.setdefault(index, []).append(text)
    notes.setdefault(marker, []).append("end of the session: the harness closes the client")
    out: List[Exchange] = []
    t = 0.0
    for i, e in enumerate(events):
        t = e.time
        for text in notes.pop(i, []):
            out.append(Exchange(t, "--", "note", b"", text))
        converted = exchange(e)
        if converted is not None:
            out.append(converted)
    for index in sorted(notes):
        for text in notes[index]:
            out.append(Exchange(t, "--", "note", b"", text))
    return out


def exchange(e: ProxyEvent) -> Optional[Exchange]:
    d = e.direction
    where = ",".join(p for p in e.points if p not in ("record", "plaintext"))
    text = "; ".join(x for x in (where, e.method, e.detail) if x)
    if e.action and e.action != "discarded":
        text = f"FAULT {e.action}: {text}" if text else f"FAULT {e.action}"
    elif e.action == "discarded":
        text = f"not relayed (direction ended by the harness): {text}"
    if e.kind in ("plaintext", "fragment"):
        return Exchange(e.time, d, "plaintext", e.data, text)
    if e.kind == "record":
        # Ciphertext says nothing to a reader: its size and classification do.
        # Application data the proxy decrypted is shown as its text.
        if e.clear is not None and "close-notify" not in e.points:
            return Exchange(e.time, d, "tls", e.clear, text)
        kind = "close_notify" if "close-notify" in e.points else "tls-wire"
        return Exchange(e.time, d, kind, b"", text)
    if e.kind in ("eof", "reset"):
        return Exchange(e.time, d, "eof", b"", text or e.kind)
    if e.kind == "injected":
        return Exchange(e.time, d, "injected", e.data, f"injected by the harness: {e.detail}")
    if e.kind == "fault":
        what = "FIN" if e.action == "fin" else ("RST" if e.action == "rst" else "")
        if what:
            return Exchange(e.time, d, "injected", b"", f"{what} by the harness: {e.detail}")
        return Exchange(e.time, "--", "note", b"", f"FAULT [{d}] {e.detail}")
    if e.kind == "note" and e.clear is not None:  # a record classified late: its text
        return Exchange(e.time, d, "tls", e.clear, f"proxy: {e.detail}")
    if e.kind in ("note", "error"):
        return Exchange(e.time, "--", "note", b"", f"proxy [{d or '--'}]: {e.detail}")
    return None  # sent, fin-sent, rst-sent, connect, closed: the relay's own bookkeeping
