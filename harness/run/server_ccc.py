"""Server-role steps of the CCC scenarios that go on past a silent target.

A target that neither answers nor closes after the plaintext sent without
our close_notify (Pure-FTPd 1.0.50 after CCC) has not decided anything yet:
silence is not an excuse to stop.  After the bounded wait we send our
close_notify (answering the server's) and a sentinel command in plaintext;
what the target answers first tells whether it held the early plaintext
and ran it after the closure (R3 broken) or discarded it.

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
    """``expect_close``, and when the target stays silent, the closure and a sentinel."""

    async def step(run: R, args: Mapping[str, object]) -> None:
        try:
            await expect_close(run, args)
        except ProbeTimeout:
            pass  # neither answered nor closed: go on to the step that decides
        await _close_then_sentinel(run)

    return step


async def _close_then_sentinel(run: _RunLike) -> None:
    """Our close_notify, then the sentinel: what is answered first decides (always raises)."""
    probe, dialect = run.probe, run.dialect
    run.evidence.note(
        f"neither an answer nor a close within {probe.settings.reply_timeout:g} s: "
        "our close_notify now, then a sentinel command in plaintext"
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
    first = await _next_reply(run, "the sentinel sent after the closure")
    if first is None or dialect.is_goodbye(first):
        raise Observed("closed", "ended the session after the closure; ran nothing held")
    if not dialect.answers(dialect.sentinel(), first):
        raise Observed("unexpected-reply", f"after the closure: {first.text}")
    # Answered: ours, or the command held from before the closure?  A goodbye
    # asked for now comes right after the answer to ours in either case.
    try:
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
                "answered the plaintext command sent before our close_notify, after the"
                f" closure ({first.text}), and then the sentinel",
            )
        run.evidence.note(f"after the closure, not yet the goodbye: {reply.text}")
    raise Observed("unexpected-reply", f"no goodbye within {_MAX_REPLIES} replies")


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
