"""The path role's wire judgements: what the proxy's log says a peer did (sans-I/O).

Kept apart from :mod:`starttls_harness.run.path` (which starts the pieces and
drives the session) so that the rules read from the log stay in one place.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Sequence, Tuple

from starttls_harness.dialects import Dialect, Reply
from starttls_harness.proxy import C2S, S2C, ProxyEvent
from starttls_harness.tls.engine import Violation

__all__ = [
    "SIDES",
    "TlsCount",
    "WireFinding",
    "alert_after",
    "client_ran_ahead",
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
    #: The server's first goodbye under TLS (PostgreSQL's FATAL, SMTP 421).
    goodbye: Optional[Reply] = None

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


_LATE = re.compile(r"record #(\d+) classified late")


def _clear_text(events: Sequence[ProxyEvent], fi: int) -> Tuple[str, List[Tuple[str, bytes]]]:
    """Why the application data after ``fi`` cannot be read ("" if it can), and
    its text as (direction, bytes) in wire order.  A record classified late
    (its secret came after it passed) takes its own place, not its note's."""
    placed: List[Tuple[int, str, bytes]] = []
    where: Dict[int, int] = {}
    pending = late = 0
    for i, e in enumerate(events[fi + 1 :], fi + 1):
        if e.direction not in SIDES:
            continue
        if e.kind == "record":
            where[e.index] = i
            if "classification pending" in e.detail:
                pending += 1
        if e.kind == "note" and _LATE.search(e.detail):
            late += 1
        if e.kind not in ("record", "note") or "application-data" not in e.points:
            continue
        if e.clear is None:
            if e.method == "position":
                return "no key log (TLS 1.3 followed by position)", []
            return "no key log secret for this connection, or a suite it cannot decrypt", []
        at = i
        if e.kind == "note":
            found = _LATE.search(e.detail)
            at = where.get(int(found.group(1)), i) if found else i
        placed.append((at, e.direction, e.clear))
    if pending > late:
        return "records still wait for their key log secret", []
    return "", [(d, text) for _, d, text in sorted(placed, key=lambda p: p[0])]


def count_tls_exchange(events: Sequence[ProxyEvent], fi: int, dialect: Dialect) -> TlsCount:
    """Walk the decrypted TLS data in wire order: every reply answers the
    oldest command still open; a reply with none open was asked by nobody.

    The client's data is cut by the dialect's framer; a reply is cut by its
    reply recogniser with the tag the oldest open command expects (as the
    prober does).  After a continuation (SMTP 354, IMAP ``+``) the client's
    units are the rest of that command until the next reply, and replies
    right after its answer, before the client writes again, are that
    answer's too (LMTP answers a body once per recipient).  A unit that
    never gets a reply (a non-synchronising literal, a terminate) stays
    open and can only hide an extra reply, never make one up: a server
    cannot answer a command before it passed the proxy.  A server that ran
    the injected command under TLS has answered once more than it was asked
    when the session ends.
    """
    unread, texts = _clear_text(events, fi)
    if unread:
        return TlsCount(unread)
    framer = dialect.framer()
    open_commands: Deque[bytes] = collections.deque()
    sent: List[bytes] = []
    replies: List[Reply] = []
    extra: List[Reply] = []
    c2s, s2c = b"", b""
    continued = False
    #: Replies right after a continued command's answer, before the client
    #: writes again, belong to it (LMTP answers a body once per recipient).
    after_body = False
    greeting = dialect.speaks_first_after_starttls  # ManageSieve's capabilities
    for direction, text in texts:
        if direction == C2S:
            c2s += text
            units, used = framer.split(c2s)
            c2s = c2s[used:]
            if not continued:
                open_commands.extend(units)
                sent.extend(units)
                after_body = after_body and not units
            continue
        s2c += text
        while s2c:
            head = open_commands[0] if open_commands else None
            tag = dialect.tag_of(head) if head is not None else None
            reply, rest = dialect.split_reply(s2c, tag or dialect.any_reply_tag)
            if reply is None or len(rest) >= len(s2c):
                break
            s2c = rest
            replies.append(reply)
            was_continued, continued = continued, dialect.is_continuation(reply)
            if head is not None:
                if not continued:
                    open_commands.popleft()
                    after_body = was_continued
            elif greeting:
                greeting = False
            elif not dialect.is_goodbye(reply) and not after_body:
                extra.append(reply)
    own_tag = dialect.tag_of(dialect.injected())
    injected = None
    if own_tag is not None and own_tag not in {dialect.tag_of(c) for c in sent}:
        injected = next((r for r in replies if r.key == own_tag), None)
    goodbye = next((r for r in replies if dialect.is_goodbye(r)), None)
    return TlsCount("", len(sent), len(replies), tuple(extra), injected, goodbye)


def client_ran_ahead(events: Sequence[ProxyEvent], fi: int, dialect: Dialect) -> Tuple[str, str]:
    """Did the client send more under TLS than it may before the server's
    first reply there passed the proxy?  (why the data cannot be read, or
    "" -- and what the client sent ahead, or "")

    Where the dialect makes the client wait for the reply to its first
    command under TLS (:attr:`Dialect.awaits_first_tls_reply`; for the
    first reply itself where the server speaks first), a second command
    before it can only follow a reply the client already had: the response
    injected behind the STARTTLS answer.  A resync the dialect allows
    unread (:meth:`Dialect.is_resync`) is not counted.
    """
    unread, texts = _clear_text(events, fi)
    if unread:
        return unread, ""
    framer = dialect.framer()
    allowed = 0 if dialect.speaks_first_after_starttls else 1
    units: List[bytes] = []
    c2s = s2c = b""
    for direction, text in texts:
        if direction == S2C:
            s2c += text
            reply, _ = dialect.split_reply(s2c, dialect.any_reply_tag)
            if reply is not None:
                break  # a whole first reply passed: the client may go on
            continue
        c2s += text
        cut, used = framer.split(c2s)
        c2s = c2s[used:]
        units.extend(u for u in cut if not dialect.is_resync(u))
        if len(units) > allowed:
            return "", units[allowed][:60].decode("latin-1")
    return "", ""


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
    not ask for is the injected command's answer; for a client, its next
    command under TLS sent before the server's first reply there passed
    (:func:`client_ran_ahead`, where the dialect makes it wait): it took the
    injected response as that reply; the client's whole session
    completing -- the bytes were discarded if the count says so, and
    undecidable (``tls-unread``) when the proxy cannot read the TLS data
    (or, for a client, the dialect lets it pipeline), since a client may
    survive replies shifted by one; a session
    that broke after the server wrote under TLS, unread, is undecidable too
    (a refusal under TLS breaks it as well as an answer out of step); a
    goodbye the server said under TLS (a refusal); the receiver ending the
    connection before the other side did (a refusal); and last, the session
    breaking under TLS, which only the injected bytes can explain (a sanity
    run of the same pair completed the same session).
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
    unread, ahead = client_ran_ahead(events, fi, dialect) if receiver == C2S else ("", "")
    if ahead and dialect.awaits_first_tls_reply:
        return (
            "injection-consumed",
            "under TLS the client sent its next unit before the server's first reply "
            f"passed the proxy, so it took the injected response as it: {ahead!r}",
        )
    if completed:
        if count is not None and count.unread:
            return "tls-unread", f"the client's session completed; {count.describe()}"
        if receiver == C2S and unread:
            return (
                "tls-unread",
                f"the client's session completed; the proxy cannot read the TLS data: {unread}",
            )
        if receiver == C2S and not dialect.awaits_first_tls_reply:
            return (
                "tls-unread",
                "the client's session completed, but the dialect lets a client pipeline "
                "under TLS, so its order does not show whether it took the injected response",
            )
        counted = f" ({count.describe()})" if count is not None else ""
        return "discarded", f"the client's session completed under TLS{counted}"
    if count is not None and count.unread and _wrote_under_tls(events, fi, S2C):
        # What it wrote may be a refusal (PostgreSQL's FATAL) or the injected
        # command's answer; which side closes first is then a race.
        return (
            "tls-unread",
            f"the session broke after the server wrote under TLS; {count.describe()}",
        )
    if count is not None and count.goodbye is not None:
        return "refused", f"the server said goodbye under TLS: {count.goodbye.text[:60]!r}"
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
    if not handshake_done and unread and _wrote_under_tls(events, fi, C2S):
        # By position its records after the handshake may be commands sent
        # on the injected response, or its Finished before it gave up.
        return "tls-unread", f"{broke}; the proxy cannot read the TLS data: {unread}"
    if not handshake_done:
        return "refused", f"the client ended the upgrade: {broke}"
    return "injection-consumed", broke


def alert_after(events: Sequence[ProxyEvent], fi: int, direction: str) -> Optional[ProxyEvent]:
    """The first alert ``direction`` sent after the fault (TLS 1.2 cannot tell
    close_notify from a fatal alert; either ends its TLS), if any."""
    alerts = (
        e
        for e in events[fi + 1 :]
        if e.direction == direction and e.kind in ("record", "note") and "close-notify" in e.points
    )
    return next(alerts, None)


def _wrote_under_tls(events: Sequence[ProxyEvent], fi: int, direction: str) -> bool:
    """Did ``direction`` send a protected record after the handshake (data,
    or by position perhaps a ticket) since the fault?"""
    return any(
        e.direction == direction and "application-data" in e.points for e in events[fi + 1 :]
    )


def _first_end(events: Sequence[ProxyEvent], fi: int, direction: str) -> Optional[int]:
    ends = (i for i, e in enumerate(events) if i > fi and e.direction == direction and is_end(e))
    return next(ends, None)
