"""The proxy's event log of a path run as report evidence (both directions, faults marked)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from starttls_harness.proxy import ProxyEvent
from starttls_harness.report.verdicts import Exchange

__all__ = ["exchange", "exchanges"]


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
