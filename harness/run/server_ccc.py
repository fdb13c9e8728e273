"""Server-role steps of the CCC scenarios that go on past a silent target.

A target that neither answers nor closes after the plaintext sent without
our close_notify has not decided anything yet: silence is not an excuse to
stop.  Each later step is one segment of its own, sent only after the
bounded wait for the one before, so what the target does decides -- never
the timing, and never the bytes of our close_notify (encrypted, so
different on every run: a target that reads it as plaintext must not get
the chance to read it as part of a command line):

1. a second plaintext command, still without our close_notify.  A target
   that answers it resumed plaintext without the client's close_notify
   (R3): Pure-FTPd 1.0.50 takes the first five bytes of the early
   command for a broken TLS record header, drops TLS and reads on in
   plaintext;
2. our close_notify (answering the server's), then the sentinel: a target
   that then runs what came before the closure breaks R3; one that
   answers only the sentinel discarded it;
3. still silent: our TCP FIN.  Closing without having run anything is
   safe (it took the plaintext for a TLS record and never ran it).

Kept out of :mod:`.server` (the verb table's module) by a factory taking
the step it extends, so there is no import cycle: :mod:`.server` registers
``after_silence(step_expect_close)``.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Mapping, Optional, Protocol, TypeVar

from starttls_harness.dialects import Dialect, Reply
from starttls_harness.report.verdicts import Evidence
from starttls_harness.run.outcomes import Observed, violation
from starttls_harness.run.probe import PeerClosed, Probe, ProbeTimeout
from starttls_harness.tls.engine import Policy

__all__ = ["after_silence"]


class _RunLike(Protocol):
    """What these steps need of the server role's run state."""

    probe: Probe
    dialect: Dialect
    evidence: Evidence


R = TypeVar("R", bound=_RunLike)
Step = Callable[[R, Mapping[str, object]], Awaitable[None]]

#: Replies read after the closure before giving up on finding the answer
#: to our sentinel (a bound on a chatty target, not a wait).
_MAX_REPLIES = 8


def after_silence(expect_close: Step[R]) -> Step[R]:
    """``expect_close``; while the target stays silent, the next segment (module doc)."""

    async def step(run: R, args: Mapping[str, object]) -> None:
        try:
            await expect_close(run, args)
        except ProbeTimeout:
            pass  # neither answered nor closed: a second plaintext command
        await _second_plaintext(run, args, expect_close)
        await _close_then_sentinel(run)

    return step


async def _second_plaintext(run: R, args: Mapping[str, object], expect_close: Step[R]) -> None:
    """A second plaintext command alone, before our close_notify; returns if still silent."""
    probe = run.probe
    run.evidence.note(
        f"neither an answer nor a close within {probe.settings.reply_timeout:g} s:"
        " a second plaintext command, still without our close_notify"
    )
    probe.inject(run.dialect.sentinel())
    try:
        await expect_close(run, args)
    except ProbeTimeout:
        return
    except Observed as seen:
        if seen.label != "plaintext-answered":
            raise
        answer = (seen.detail.splitlines() or [""])[0]
        raise Observed(
            "resumed-without-close-notify",
            "silent to the first plaintext command, answered the second, both sent without"
            f" our close_notify ({answer})",
        ) from None


async def _close_then_sentinel(run: _RunLike) -> None:
    """Our close_notify, then the sentinel: what is answered first decides (always raises)."""
    probe, dialect = run.probe, run.dialect
    run.evidence.note(
        f"still silent after {probe.settings.reply_timeout:g} s: our close_notify now,"
        " then a sentinel command in plaintext"
    )
    transport = probe.transport
    assert transport is not None
    transport.engine.policy = Policy.strict()
    try:
        await probe.unwrap()
    except ProbeTimeout:
        raise Observed("silent", "stayed silent after our close_notify too") from None
    except PeerClosed as closed:
        raise _ended(closed) from None
    probe.write(dialect.sentinel())
    fin = False
    try:
        first: Optional[Reply] = await probe.reply(greeting=True)
    except ProbeTimeout:
        first, fin = await _end_our_side(run), True
    except PeerClosed as closed:
        if closed.how in ("violation", "overflow"):
            raise _ended(closed) from None
        first = None
    if first is None or dialect.is_goodbye(first):
        raise Observed("closed", "ended the session after the closure; ran nothing held")
    if not dialect.answers(dialect.sentinel(), first):
        raise Observed("unexpected-reply", f"after the closure: {first.text}")
    # Answered: ours, or the command held from before the closure?  A goodbye
    # asked for now (or the close after our FIN) comes right after the answer
    # to ours in either case.
    try:
        if not fin:
            probe.write(dialect.quit())
    except PeerClosed:
        detail = "closed after one answer: whose command it ran is unknown"
        raise Observed("unexpected-reply", detail) from None
    for _ in range(_MAX_REPLIES):
        reply = await _next_reply(run, "the goodbye asked for after the sentinel")
        if reply is None or dialect.is_goodbye(reply):
            raise Observed(
                "held-plaintext-discarded",
                "answered only the sentinel sent after the closure; the earlier plaintext"
                " was discarded",
            )
        if dialect.answers(dialect.sentinel(), reply):
            raise Observed(
                "held-plaintext-run",
                "answered the plaintext commands sent before our close_notify, after the"
                f" closure ({first.text}), and then the sentinel",
            )
        run.evidence.note(f"after the closure, not yet the goodbye: {reply.text}")
    raise Observed("unexpected-reply", f"no goodbye within {_MAX_REPLIES} replies")


async def _end_our_side(run: _RunLike) -> Reply:
    """Silent even to the sentinel after the closure: our FIN; what it says before closing.

    Returns an answer to judge; raises when the target closes having
    answered nothing (it never ran a command) or stays open.
    """
    probe = run.probe
    transport = probe.transport
    assert transport is not None
    note = (
        f"no answer to the sentinel within {probe.settings.reply_timeout:g} s: our TCP FIN"
        " (after the closure)"
    )
    run.evidence.add("c2s", "eof", note=note)
    transport.truncate()
    reply = await _next_reply(run, "anything after our FIN")
    if reply is None:
        raise Observed(
            "never-ran",
            "took the plaintext for a TLS record and never ran it: answered nothing sent"
            " before or after our close_notify, and closed at our FIN",
        )
    return reply


async def _next_reply(run: _RunLike, what: str) -> Optional[Reply]:
    """The next reply, or None when the target closed; silence is undecidable."""
    try:
        return await run.probe.reply(greeting=True)
    except ProbeTimeout:
        raise Observed("silent", f"no answer to {what}") from None
    except PeerClosed as closed:
        if closed.how in ("violation", "overflow"):
            raise _ended(closed) from None
        return None


def _ended(closed: PeerClosed) -> Exception:
    """A connection that ended during the closure: a rule broken, or a plain close."""
    if closed.how == "overflow":
        return closed  # the probe hung up: the target closed nothing
    if closed.how == "violation" and closed.rule is not None:
        return Observed(violation(closed.rule), closed.detail)
    return Observed("closed", closed.detail)
