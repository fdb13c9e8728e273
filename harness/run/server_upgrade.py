"""The server role's STARTTLS step, with the injection its scenario declares.

Segmentation is a declared parameter of a scenario (design principle 5),
never an accident of timing.  The ``starttls`` step takes ``segment``:

* ``"same"`` (the default) -- STARTTLS and the injected bytes leave in one
  TCP write: the target reads them together, whatever its timing.
* ``"after-answer"`` -- the injected bytes leave in a write of their own
  once the target's upgrade answer has arrived, and the handshake step's
  ClientHello follows them.  The answer is the only moment between
  STARTTLS and the ClientHello the harness can observe.  Two writes sent
  back to back, without that wait, left it to the target's read timing
  whether the injection was read with STARTTLS (before its switch to TLS,
  interpreted in plaintext) or after it (by its TLS layer, a broken
  handshake): Prosody's verdict changed between runs (issue 14).

After an ``after-answer`` injection, what the target does next is named by
:func:`ended_after_injection`: a plaintext answer to the injected command
during the handshake, an alert, a failed handshake or a close.

Kept out of :mod:`.server` (the verb table's module, which registers
:func:`step_starttls`): the step takes any run state with a probe, a
dialect, evidence and a scenario (:class:`_RunLike`), so there is no
import cycle.
"""

from __future__ import annotations

from typing import Mapping, Optional, Protocol, Sequence

from starttls_harness.dialects import Dialect
from starttls_harness.report.verdicts import Evidence
from starttls_harness.run.outcomes import Observed, RemoteEnded
from starttls_harness.run.probe import Probe
from starttls_harness.scenarios.model import Scenario, Step
from starttls_harness.tls.engine import AlertReceived, Event, HandshakeFailed, Rule

__all__ = [
    "AFTER_ANSWER",
    "ANSWERED_IN_PLAINTEXT",
    "HANDSHAKE_ALERT",
    "SEGMENTS",
    "ended_after_injection",
    "step_starttls",
]

#: The ``segment`` values the step knows (anything else is a catalogue bug).
SAME, AFTER_ANSWER = "same", "after-answer"
SEGMENTS = (SAME, AFTER_ANSWER)

#: The target answered the command injected after its upgrade answer, in
#: plaintext, where its ServerHello belonged (R1).
ANSWERED_IN_PLAINTEXT = "injection-answered-in-plaintext"
#: The target answered the bytes injected after its upgrade answer with a TLS alert.
HANDSHAKE_ALERT = "handshake-alert"


class _RunLike(Protocol):
    """What this step needs of the server role's run state."""

    scenario: Scenario
    probe: Probe
    dialect: Dialect
    evidence: Evidence


async def step_starttls(run: _RunLike, args: Mapping[str, object]) -> None:
    """STARTTLS and its answer, with the injection (if any) where ``segment`` puts it."""
    probe, dialect = run.probe, run.dialect
    command = dialect.starttls()
    transport = probe.transport
    assert transport is not None
    transport.hold_after(dialect.final_line_of(command), once=True, framer=dialect.framer())
    inject = bool(args.get("inject"))
    count = int(args.get("count", 1))  # type: ignore[call-overload]
    injected = dialect.injected() * count if inject else b""
    segment = str(args.get("segment", SAME))
    if segment not in SEGMENTS:
        raise ValueError(f"starttls step: unknown segment {segment!r} (known: {SEGMENTS})")
    if inject and segment == SAME:
        with transport.corked():  # STARTTLS and the injection in one segment
            probe.write(command)
            probe.inject(injected)
    else:
        probe.write(command)
    reply = await probe.reply(tag=dialect.tag_of(command))
    pipelined = inject and segment == SAME
    if pipelined and dialect.is_injected_reply(reply) and not dialect.answers(command, reply):
        # An asynchronous protocol (LDAP) ran it before its upgrade answer: in plaintext.
        raise Observed("injection-answered-plaintext", f"before the upgrade answer: {reply.text}")
    if not reply.ok:
        if pipelined:
            # The sanity probe saw STARTTLS work without the injection: this
            # refusal is the target refusing the pipelined plaintext.
            raise Observed("refused-injection", f"STARTTLS answered {reply.text}")
        raise Observed("starttls-refused", reply.text)
    held = transport.engine.held
    if held:
        # The target said something in plaintext after its STARTTLS answer.
        run.evidence.add("s2c", "plaintext", held, "plaintext after the STARTTLS answer")
        answer, _ = dialect.split_reply(held)
        if pipelined and answer is not None and not dialect.is_injected_reply(answer):
            # e.g. FTP servers: the injected bytes broke the handshake and the
            # server said so in plaintext -- it did not run them (R1 kept).
            raise Observed("closed", f"took the injected bytes for a handshake: {answer.text}")
        if pipelined:
            raise Observed("injection-answered", "answered the injected command in plaintext")
        raise Observed("violation:R1", "sent plaintext after its STARTTLS answer")
    if inject and segment == AFTER_ANSWER:
        # The upgrade answer has arrived: the target has switched (or says
        # it has).  The injection leaves now, in its own write; the
        # handshake step's ClientHello follows it.
        run.evidence.note("the upgrade answer arrived: injecting before our ClientHello")
        probe.inject(injected)


def ended_after_injection(run: _RunLike, step: Step, closed: RemoteEnded) -> Optional[str]:
    """The label of the handshake ending after an ``after-answer`` injection, or None.

    Only for a scenario that expects these labels; every other ending is
    left to the server role's general rules (a close, a failed handshake).
    """
    transport = run.probe.transport
    if step.action != "handshake" or ANSWERED_IN_PLAINTEXT not in run.scenario.expect:
        return None
    if transport is None:
        return None
    if closed.how in ("alert", "handshake") and _peer_alert(transport.events):
        return HANDSHAKE_ALERT
    if closed.how != "violation" or closed.rule is not Rule.R1 or not transport.violations:
        return None
    reply, _ = run.dialect.split_reply(transport.violations[-1].data)
    if reply is not None and run.dialect.is_injected_reply(reply):
        run.evidence.note(f"answer to the injected command in plaintext: {reply.text}")
        return ANSWERED_IN_PLAINTEXT
    return None


def _peer_alert(events: Sequence[Event]) -> bool:
    """Whether the target sent an alert (during the handshake or after it)."""
    return any(
        isinstance(e, AlertReceived) or (isinstance(e, HandshakeFailed) and e.remote)
        for e in events
    )
