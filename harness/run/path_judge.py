"""The path role's wire judgements: what the proxy's log says a peer did (sans-I/O).

Kept apart from :mod:`starttls_harness.run.path` (which starts the pieces and
drives the session) so that the rules read from the log stay in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from starttls_harness.proxy import C2S, S2C, ProxyEvent
from starttls_harness.tls.engine import Violation

__all__ = [
    "SIDES",
    "WireFinding",
    "fault_index",
    "is_app_record",
    "is_end",
    "is_plaintext",
    "judge_upgrade",
    "other",
    "wire_findings",
]

SIDES = {C2S: "client", S2C: "server"}


def other(direction: str) -> str:
    return S2C if direction == C2S else C2S


def fault_index(events: Sequence[ProxyEvent]) -> Optional[int]:
    for i, e in enumerate(events):
        if e.kind in ("fault", "injected"):
            return i
    return None


def is_plaintext(e: ProxyEvent) -> bool:
    return e.kind == "plaintext" or (e.kind == "fragment" and "incomplete line" in e.detail)


def is_app_record(e: ProxyEvent) -> bool:
    """Application data for sure: without a key log (TLS 1.3 by position) a
    server record may be a NewSessionTicket, so it decides nothing."""
    return e.kind == "record" and "application-data" in e.points and e.method != "position"


def is_end(e: ProxyEvent) -> bool:
    return e.kind in ("eof", "reset")


@dataclass(frozen=True)
class WireFinding:
    label: str
    side: str
    detail: str
    index: int


def wire_findings(events: Sequence[ProxyEvent]) -> List[WireFinding]:
    """Rules the proxy saw a peer break on the wire, in order.

    Plaintext after a direction's close_notify but before the other's is a
    one-sided closure by that direction's sender (R4: the initiator did not
    wait); plaintext the follower marks as inside TLS is R2.  A first
    close_notify answered by TCP close instead of close_notify is R5.
    """
    out: List[WireFinding] = []
    closed = {C2S: False, S2C: False}
    first: Optional[str] = None
    for i, e in enumerate(events):
        d = e.direction
        if d not in closed:
            continue
        if e.kind in ("record", "note") and "close-notify" in e.points:
            if not closed[d]:
                closed[d] = True
                first = first or d
            if all(closed.values()):
                closed = {C2S: False, S2C: False}
                first = None
        elif is_plaintext(e):
            if closed[d] and not closed[other(d)]:
                out.append(
                    WireFinding(
                        "violation:R4",
                        SIDES[d],
                        "plaintext after its own close_notify, before the peer's "
                        f"({e.data[:40]!r})",
                        i,
                    )
                )
            elif "plaintext-in-tls" in e.points:
                out.append(
                    WireFinding(
                        "violation:R2",
                        SIDES[d],
                        f"plaintext while TLS was up ({e.data[:40]!r})",
                        i,
                    )
                )
        elif is_end(e) and first is not None and d != first and not closed[d]:
            out.append(
                WireFinding(
                    "close-notify-not-answered",
                    SIDES[d],
                    f"closed TCP instead of answering the {SIDES[first]}'s close_notify",
                    i,
                )
            )
            first = None
    return out


def judge_upgrade(
    events: Sequence[ProxyEvent],
    fi: int,
    receiver: str,
    accepted: Sequence[Violation],
    completed: bool,
    stopped: Optional[Tuple[str, BaseException]],
) -> Tuple[str, str]:
    """Plaintext injected at the upgrade: interpreted, refused or discarded (R1)?

    In order: the receiver's own report that it took the bytes in; its
    plaintext after the fault (not its STARTTLS answer) -- a refusal when it
    then ends the connection, an answer when it goes on to TLS; the client's
    whole session completing (the bytes were discarded); the receiver ending
    the connection before the other side did (a refusal); and last, the
    session breaking under TLS, which only the injected bytes can explain
    (a sanity run of the same pair completed the same session).
    """
    side = SIDES[receiver]
    if accepted:
        v = accepted[0]
        return "accepted", f"the {side} reported {v.rule.value} and took the bytes in: {v.message}"
    after = [(i, e) for i, e in enumerate(events) if i > fi and e.direction == receiver]
    for n, (_, e) in enumerate(after):
        if "starttls-reply" in e.points or not is_plaintext(e):
            if is_app_record(e) or is_end(e):
                break
            continue
        tls_later = any(x.kind == "record" for _, x in after[n + 1 :])
        if tls_later:
            return "plaintext-answered", f"the {side} sent plaintext, then TLS: {e.data[:60]!r}"
        return "refused", f"the {side} answered in plaintext and did not start TLS: {e.data[:60]!r}"
    if completed:
        return "discarded", "the client's session completed under TLS"
    mine, theirs = _first_end(events, fi, receiver), _first_end(events, fi, other(receiver))
    if mine is not None and (theirs is None or mine < theirs):
        return "refused", f"the {side} closed the connection"
    if stopped is None:
        return "timeout", "the session neither completed nor stopped within the bound"
    action, exc = stopped
    broke = f"the client's {action} failed: {type(exc).__name__}: {exc}"
    if receiver == S2C:
        return "answered-in-tls", f"{broke} (the server's answers were out of step)"
    handshake_done = any(
        e.direction == C2S and is_app_record(e) for i, e in enumerate(events) if i > fi
    )
    if not handshake_done:
        return "refused", f"the client ended the upgrade: {broke}"
    return "injection-consumed", broke


def _first_end(events: Sequence[ProxyEvent], fi: int, direction: str) -> Optional[int]:
    ends = (i for i, e in enumerate(events) if i > fi and e.direction == direction and is_end(e))
    return next(ends, None)
