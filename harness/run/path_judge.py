"""The path role's wire judgements: what the proxy's log says a peer did (sans-I/O).

Kept apart from :mod:`starttls_harness.run.path` (which starts the pieces and
drives the session) so that the rules read from the log stay in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from starttls_harness.dialects import Dialect, Reply
from starttls_harness.proxy import C2S, S2C, ProxyEvent
from starttls_harness.tls.engine import Violation

__all__ = [
    "SIDES",
    "TlsCount",
    "WireFinding",
    "count_tls_exchange",
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


@dataclass(frozen=True)
class TlsCount:
    """The client's commands and the server's replies under TLS after the fault.

    ``unread`` says why the proxy could not read the TLS data ("" when it
    could); ``extra`` are complete replies beyond one per command (an
    unprompted greeting allowed where the dialect speaks first after the
    upgrade, goodbyes not counted); ``injected`` is a reply to the injected
    command's own tag where the client sent no command with that tag.
    """

    unread: str
    commands: int = 0
    replies: int = 0
    extra: Tuple[Reply, ...] = ()
    injected: Optional[Reply] = None

    @property
    def answered(self) -> bool:
        return not self.unread and (bool(self.extra) or self.injected is not None)

    def describe(self) -> str:
        if self.unread:
            return f"the proxy cannot read the TLS data: {self.unread}"
        text = (
            f"under TLS the client sent {self.commands} unit(s), "
            f"the server {self.replies} reply(ies)"
        )
        if self.injected is not None:
            return f"{text}; one answers the injected command's tag: {self.injected.text[:60]!r}"
        if self.extra:
            return f"{text}; {len(self.extra)} more than asked for: {self.extra[0].text[:60]!r}"
        return f"{text}; none beyond the client's"


def _clear_text(events: Sequence[ProxyEvent], fi: int) -> Tuple[str, bytes, bytes]:
    """Why the application data after ``fi`` cannot be read (or ""), and its
    text per direction in order (records, and late notes that classified one)."""
    data = {C2S: bytearray(), S2C: bytearray()}
    pending = late = 0
    for e in events[fi + 1 :]:
        if e.direction not in data:
            continue
        if e.kind == "record" and "classification pending" in e.detail:
            pending += 1
        if e.kind == "note" and "classified late" in e.detail:
            late += 1
        if e.kind not in ("record", "note") or "application-data" not in e.points:
            continue
        if e.clear is None:
            if e.method == "position":
                return "no key log (TLS 1.3 followed by position)", b"", b""
            return "no key log secret for this connection, or a suite it cannot decrypt", b"", b""
        data[e.direction].extend(e.clear)
    if pending > late:
        return "records still wait for their key log secret", b"", b""
    return "", bytes(data[C2S]), bytes(data[S2C])


def count_tls_exchange(events: Sequence[ProxyEvent], fi: int, dialect: Dialect) -> TlsCount:
    """Count the client's units against the server's replies under TLS.

    The client's decrypted data is cut by the dialect's framer; each unit
    takes the next reply the dialect's reply recogniser cuts (with the tag
    that unit expects, as the prober does).  A unit that gets no reply (a
    message body line, a terminate) takes a reply that is not its own: that
    can hide an extra reply, never make one up.  A server that ran the
    injected command under TLS answers once more than the client asked.
    """
    unread, c2s, s2c = _clear_text(events, fi)
    if unread:
        return TlsCount(unread)
    commands, _ = dialect.framer().split(c2s)
    buf = s2c
    replies: List[Reply] = []

    def cut(tag: Optional[str]) -> Optional[Reply]:
        nonlocal buf
        reply, rest = dialect.split_reply(buf, tag)
        if reply is None or len(rest) >= len(buf):
            return None
        buf = rest
        replies.append(reply)
        return reply

    if dialect.speaks_first_after_starttls:
        cut(None)  # the unprompted greeting (ManageSieve's capabilities)
    for command in commands:
        if cut(dialect.tag_of(command) or dialect.any_reply_tag) is None:
            break
    extra: List[Reply] = []
    while buf:
        reply = cut(dialect.any_reply_tag)
        if reply is None:
            break
        if not dialect.is_goodbye(reply):
            extra.append(reply)
    own_tag = dialect.tag_of(dialect.injected())
    sent_tags = {dialect.tag_of(c) for c in commands}
    injected = None
    if own_tag is not None and own_tag not in sent_tags:
        injected = next((r for r in replies if r.key == own_tag), None)
    return TlsCount("", len(commands), len(replies), tuple(extra), injected)


def judge_upgrade(
    events: Sequence[ProxyEvent],
    fi: int,
    receiver: str,
    accepted: Sequence[Violation],
    completed: bool,
    stopped: Optional[Tuple[str, BaseException]],
    dialect: Dialect,
) -> Tuple[str, str]:
    """Plaintext injected at the upgrade: interpreted, refused or discarded (R1)?

    In order: the receiver's own report that it took the bytes in; its
    plaintext after the fault (not its STARTTLS answer) -- a refusal when it
    then ends the connection, an answer when it goes on to TLS; for a server,
    the TLS data counted (:func:`count_tls_exchange`): a reply the client did
    not ask for is the injected command's answer; the client's whole session
    completing -- the bytes were discarded if the count says so, and
    undecidable (``tls-unread``) for a server when the proxy cannot read the
    TLS data, since a client may survive replies shifted by one; the receiver
    ending the connection before the other side did (a refusal); and last,
    the session breaking under TLS, which only the injected bytes can explain
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
    count = count_tls_exchange(events, fi, dialect) if receiver == S2C else None
    if count is not None and count.answered:
        return "answered-in-tls", f"the server ran the injected command: {count.describe()}"
    if completed:
        if count is not None and count.unread:
            return "tls-unread", f"the client's session completed; {count.describe()}"
        counted = f" ({count.describe()})" if count is not None else ""
        return "discarded", f"the client's session completed under TLS{counted}"
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
