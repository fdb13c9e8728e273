"""Runs catalogue scenarios against a target and decides their verdicts.

Theory of operation
===================

Each scenario x TLS version is one fresh TCP connection driven by a
:class:`~starttls_harness.run.probe.Probe`; its steps come from the verb table
:data:`_SERVER_STEPS`.  A step that sees the target deviate raises
:class:`Observed` with a label, which the scenario's ``expect`` turns into a
verdict.  Decisions come from events (a reply, a close, an alert, a sentinel
answered), never from silence: a wait that runs out is ``timeout``, an error.
Sanity probes bracket every target x TLS version (the conforming path must work
before and after, or the group's results are errors).  Concurrency is bounded by
a semaphore, each scenario by a hard bound; probes are closed in ``finally``.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from starttls_harness.dialects import Dialect, Reply, dialect_named
from starttls_harness.report.verdicts import Evidence, Exchange, Result, Verdict
from starttls_harness.run.interpreter import interpret, unknown_actions
from starttls_harness.run.outcomes import (
    HARNESS_ERROR,
    TIMEOUT,
    Observed,
    RemoteEnded,
    harness_error,
    rule_of,
    violation,
)
from starttls_harness.run.probe import PeerClosed, Probe, ProbeSettings, ProbeTimeout
from starttls_harness.run.sanity import NotOffered, SanityProblem, TargetUnusable, classify
from starttls_harness.run.server_ccc import after_silence
from starttls_harness.run.server_upgrade import ended_after_injection, step_starttls
from starttls_harness.scenarios.model import Expect, Scenario, Step
from starttls_harness.tls.aio import SwitchableTransport
from starttls_harness.tls.certs import client_context, shared_client_context
from starttls_harness.tls.engine import Policy, Rule

__all__ = [
    "Observed",
    "Progress",
    "RunSettings",
    "ServerTarget",
    "TargetUnusable",
    "run_server_scenario",
    "run_server_target",
]

StorageProbe = Callable[[], Union[int, Awaitable[int]]]
Progress = Callable[[Result], None]


@dataclass
class ServerTarget:
    """A server under test."""

    dialect: str
    host: str
    port: int
    tls_versions: Tuple[str, ...] = ("1.2", "1.3")
    #: CA to verify the target with; None means no verification.
    cafile: Optional[Path] = None
    server_hostname: Optional[str] = "localhost"
    user: Optional[str] = None
    password: Optional[str] = None
    #: Recipient for scenarios that send mail (a local user of the target).
    rcpt: str = "postmaster@localhost"
    #: How many messages the target has stored (None: not observable).
    storage_count: Optional[StorageProbe] = None

    def __post_init__(self) -> None:
        dialect_named(self.dialect)  # an unknown dialect is refused here, by name

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.dialect}://{host}:{self.port}"


@dataclass(frozen=True)
class RunSettings:
    """Bounds and knobs of a run (every wait has a bound; these are they)."""

    scenario_timeout: float = 20.0
    reply_timeout: float = 5.0
    connect_timeout: float = 5.0
    concurrency: int = 8
    keylog_dir: Optional[Path] = None
    sanity: bool = True

    def probe_settings(self) -> ProbeSettings:
        return ProbeSettings(
            connect_timeout=self.connect_timeout,
            reply_timeout=self.reply_timeout,
            handshake_timeout=self.reply_timeout,
        )


@dataclass
class _Run:
    """State of one scenario run against a server."""

    scenario: Scenario
    target: ServerTarget
    dialect: Dialect
    probe: Probe
    evidence: Evidence
    fault_applied: bool = False
    stored_before: Optional[int] = None
    #: Evidence index where the fault step began (what came after it counts).
    mark: int = 0
    notes: List[str] = field(default_factory=list)
    #: The optional login was skipped (no test user given).
    login_skipped: bool = False
    #: The target's greeting, once read (the sanity probe's classification).
    greeting: Optional[Reply] = None
    #: Logged in during the current TLS session (a dialect may need it for STOPTLS).
    logged_in: bool = False


async def _expect_reply(run: _Run, data: bytes) -> Reply:
    return await run.probe.command(data)


async def step_connect(run: _Run, args: Mapping[str, object]) -> None:
    greeting = await run.probe.connect()
    run.greeting = greeting
    if not run.dialect.greeting_ok(greeting):
        raise Observed("bad-greeting", greeting.text)


async def step_hello(run: _Run, args: Mapping[str, object]) -> None:
    reply = await run.probe.hello()
    if not reply.ok:
        raise Observed("unexpected-reply", f"hello refused: {reply.text}")


async def step_require(run: _Run, args: Mapping[str, object]) -> None:
    cap = str(args["cap"])
    if cap not in run.probe.capabilities:
        raise Observed(f"no-{cap.lower()}", f"{cap} is not advertised")


async def step_handshake(run: _Run, args: Mapping[str, object]) -> None:
    await run.probe.handshake()
    run.logged_in = False  # a new TLS session starts unauthenticated (R8)


async def step_sentinel(run: _Run, args: Mapping[str, object]) -> None:
    reply = await run.probe.command(run.dialect.sentinel())
    if run.dialect.is_injected_reply(reply):
        raise Observed("injection-answered", f"first reply under TLS: {reply.text}")
    if not run.dialect.is_sentinel_reply(reply):
        raise Observed("unexpected-reply", f"sentinel answered with: {reply.text}")


async def step_quit(run: _Run, args: Mapping[str, object]) -> None:
    try:
        await run.probe.command(run.dialect.quit())
    except (PeerClosed, ProbeTimeout):
        pass  # the scenario is decided; a sloppy goodbye is not its business


async def step_raw_sentinel(run: _Run, args: Mapping[str, object]) -> None:
    run.probe.inject(run.dialect.sentinel())


async def step_plain_sentinel(run: _Run, args: Mapping[str, object]) -> None:
    if run.probe.closed is not None:
        # Gone already: what it wrote before closing (a goodbye?) is read
        # next, whatever the timing; there is nobody to ask.
        run.evidence.note("the target closed before our plaintext command")
        return
    run.probe.write(run.dialect.sentinel())


async def step_expect_close(run: _Run, args: Mapping[str, object]) -> None:
    """Any answer now is a plaintext answer; a close is the refusal.

    A goodbye or an unsolicited line is not yet an answer: reading goes on
    (bounded) to see whether our command is answered after it, and only
    if not is the first such line what is reported.
    """
    other: Optional[Reply] = None
    while True:
        try:
            reply = await run.probe.reply(greeting=True)
        except (PeerClosed, ProbeTimeout) as ended:
            if other is not None:
                _attribute(run, other, answered=False)
            if isinstance(ended, ProbeTimeout):
                raise
            if ended.how in ("violation", "overflow"):
                raise  # the probe hung up on an overflow: the target closed nothing
            raise Observed("closed", ended.detail) from None
        if _protected(run) and not run.dialect.is_goodbye(reply):
            raise Observed("plaintext-answered", reply.text)  # answered under TLS
        if not run.dialect.is_goodbye(reply) and run.dialect.answers(run.dialect.sentinel(), reply):
            raise Observed("plaintext-answered", reply.text)
        other = other or reply


def _protected(run: _Run) -> bool:
    """Whether everything the target sent since the fault came under TLS."""
    data = [
        e for e in run.evidence.exchanges[run.mark :] if e.direction == "s2c" and e.kind in _DATA
    ]
    return bool(data) and all(e.kind == "tls" for e in data)


def _attribute(run: _Run, reply: Reply, *, answered: bool) -> None:
    """Call what the target wrote what it is (always raises).

    A goodbye (SMTP 421, IMAP BYE) or an unsolicited line is not an answer
    to our probe: under TLS a goodbye is a refusal in words; in plaintext
    on a connection that was in TLS it is plaintext the target must not
    write (R3), reported as such.
    """
    if run.dialect.is_goodbye(reply):
        if _protected(run):
            raise Observed("goodbye-in-tls", f"said goodbye under TLS: {reply.text}")
        raise Observed("plaintext-goodbye", f"wrote a plaintext goodbye: {reply.text}")
    if not answered and not _protected(run):
        raise Observed(
            "plaintext-unsolicited", f"wrote an unsolicited plaintext line: {reply.text}"
        )
    raise Observed("plaintext-answered", reply.text)


#: Evidence kinds of application bytes the target sent.
_DATA = ("tls", "plaintext")


#: What the target can put on the wire (evidence kinds, s2c).
_WIRE = ("tls", "plaintext", "close_notify", "alert")


def _said_since(run: _Run, mark: int) -> List[Exchange]:
    """What the target put on the wire since evidence index ``mark``, in order."""
    return [e for e in run.evidence.exchanges[mark:] if e.direction == "s2c" and e.kind in _WIRE]


def _judge_after_close_notify(run: _Run, mark: int, *, after_answer: bool = False) -> bool:
    """Decide from the wire what the target wrote after our close_notify.

    Read in wire order, whatever the timing: plaintext (before or after its
    own close_notify) is R3 broken; TLS data before its close_notify is R5
    broken (nothing exposed: it is still protected).  True once its
    close_notify has arrived with nothing wrong before it; with
    ``after_answer`` what followed its close_notify is read too.
    """
    answered = False
    for e in _said_since(run, mark):
        if e.kind == "plaintext":
            shown = e.data[:60].decode("latin-1")
            raise Observed("spoke-after-close", f"wrote plaintext after the closure: {shown!r}")
        if e.kind == "tls" and not answered:
            raise Observed(
                "violation:R5", "sent TLS data after our close_notify instead of answering it"
            )
        if e.kind == "close_notify":
            if not after_answer:
                return True
            answered = True
    return answered


def _spoke(run: _Run, mark: int) -> bool:
    return any(e.kind in ("plaintext", "tls") for e in _said_since(run, mark))


async def _probe_silence(run: _Run) -> None:
    """The target stays open and silent: does it answer plaintext now?  (Always raises.)

    A peer that neither answers close_notify nor closes TCP is asked a
    plaintext command: answering it resumes plaintext without a
    bidirectional closure (R3); closing or staying silent leaves only the
    unanswered close_notify (R5).
    """
    run.evidence.note(
        f"no answer to close_notify within {run.probe.settings.reply_timeout:g} s and "
        "the connection stays open: probing with plaintext"
    )
    run.probe.inject(run.dialect.sentinel())
    try:
        reply = await run.probe.reply(greeting=True)
    except ProbeTimeout:
        raise Observed("silent-open", "stayed open and silent, close_notify unanswered") from None
    except PeerClosed as closed:
        if closed.how == "overflow":
            raise
        if closed.how == "violation" and closed.rule is not None:
            raise Observed(violation(closed.rule), closed.detail) from None
        raise Observed("silent-then-closed", closed.detail) from None
    raise Observed("silent-then-answered", f"answered the plaintext probe: {reply.text}")


async def step_expect_silent_close(run: _Run, args: Mapping[str, object]) -> None:
    """After our close_notify: nothing but its own, then a close (decided from the wire)."""
    probe = run.probe
    await probe.wait_until(lambda: _spoke(run, run.mark))
    answered = _judge_after_close_notify(run, run.mark, after_answer=True)
    closed = probe.closed
    if closed is None:
        if not answered:
            await _probe_silence(run)
        # Its close_notify came and it keeps the connection open (as a
        # return to plaintext would); any plaintext now is R3 broken.
        await _probe_silence_after_answer(run)
    assert closed is not None
    if closed.how == "overflow":
        raise closed  # the probe hung up: not a close by the target
    if closed.how == "violation" and closed.rule is not None:
        raise Observed(violation(closed.rule), closed.detail)
    raise Observed("closed", closed.detail)


async def _probe_silence_after_answer(run: _Run) -> None:
    """Its close_notify came, TCP stays open: a plaintext command must not be answered."""
    run.evidence.note("close_notify answered, the connection stays open: probing with plaintext")
    run.probe.write(run.dialect.sentinel())
    try:
        reply = await run.probe.reply(greeting=True)
    except ProbeTimeout:
        raise Observed("closed", "answered close_notify and wrote nothing after it") from None
    except PeerClosed as closed:
        if closed.how == "overflow":
            raise
        raise Observed("closed", closed.detail) from None
    raise Observed("plaintext-answered", f"answered plaintext after the closure: {reply.text}")


def _open_transport(run: _Run) -> SwitchableTransport:
    """The probe's transport, which must still be open."""
    run.probe.ensure_open()
    transport = run.probe.transport
    assert transport is not None
    return transport


async def step_close_then_sentinel(run: _Run, args: Mapping[str, object]) -> None:
    """close_notify and a plaintext command in one segment (one-sided)."""
    transport = _open_transport(run)
    if not transport.engine.tls_active:
        raise Observed("server-closed-first", "the server's close_notify came with its answer")
    with transport.corked():
        transport.engine.unwrap()
        run.evidence.add("c2s", "close_notify")
        run.probe.inject(run.dialect.sentinel())


async def step_alert_then_sentinel(run: _Run, args: Mapping[str, object]) -> None:
    """A real fatal alert and a plaintext command in one segment."""
    transport = _open_transport(run)
    with transport.corked():
        transport.send_fatal_alert()
        run.probe.read_raw()
        run.evidence.add("c2s", "alert", note="bad_record_mac (provoked)")
        run.probe.inject(run.dialect.sentinel())


async def step_close_notify_only(run: _Run, args: Mapping[str, object]) -> None:
    """Our close_notify, then wait for the target's answer (bounded)."""
    transport = _open_transport(run)
    with transport.corked():
        transport.engine.unwrap()
        run.evidence.add("c2s", "close_notify")


async def step_unwrap(run: _Run, args: Mapping[str, object]) -> None:
    transport = run.probe.transport
    if transport is not None and run.probe.closed is None and not transport.engine.tls_active:
        # The server sent the first close_notify (FTP CCC) and we answered it.
        run.evidence.note("the server started the closure; answered at once (R5)")
        return
    if args.get("silence") == "probe":
        await _unwrap_or_probe(run)
        return
    try:
        await run.probe.unwrap()
    except PeerClosed as closed:
        if closed.rule is not None and closed.rule.value == "R5":
            raise Observed("close-notify-not-answered", closed.detail) from None
        raise


async def _unwrap_or_probe(run: _Run) -> None:
    """The closure, without giving up on a target that stays open and silent.

    The transport's own bounded unwrap aborts the connection when the bound
    runs out; here the bound only ends the wait, and a silent target is then
    asked a plaintext command (see :func:`_probe_silence`).
    """
    probe = run.probe
    probe.ensure_open()
    transport = probe.transport
    assert transport is not None
    start = len(run.evidence.exchanges)
    with transport.corked():
        transport.engine.unwrap()
        run.evidence.add("c2s", "close_notify")
    await probe.wait_until(lambda: bool(_said_since(run, start)))
    if _judge_after_close_notify(run, start):
        run.evidence.note("TLS closed both ways; plaintext resumes")
        return
    closed = probe.closed
    if closed is None:
        await _probe_silence(run)
    assert closed is not None
    if closed.rule is not None and closed.rule.value == "R5":
        raise Observed("close-notify-not-answered", closed.detail)
    raise closed


async def step_stoptls(run: _Run, args: Mapping[str, object]) -> None:
    if "STOPTLS" not in run.probe.capabilities:
        raise Observed("no-stoptls", "STOPTLS is not advertised inside TLS")
    if run.dialect.stoptls_needs_login and not run.logged_in:
        await step_login(run, {"optional": True})  # FTP servers refuse CCC before a login
    command = run.dialect.stoptls()
    transport = run.probe.transport
    if run.dialect.server_may_close_first and transport is not None:
        # A close_notify glued to the answer is the server starting the
        # closure: answer it at once and resume plaintext (R5 is ours).
        transport.engine.accept_unwrap()
    if not command:
        return  # a bare closure is the return (LDAP): the unwrap step is all of it
    reply = await run.probe.command(command)
    if not reply.ok:
        run.probe.stoptls_refused(reply, optional=bool(args.get("if_cap")))


async def step_stoptls_unanswered(run: _Run, args: Mapping[str, object]) -> None:
    """The return to plaintext, our engine told not to answer the server's close_notify.

    For the CCC scenarios (a dialect whose server may close first): what the
    target does when the client's close_notify never comes, or comes late.
    """
    transport = run.probe.transport
    assert transport is not None
    transport.engine.policy = Policy.relaxing(Rule.R4, Rule.R5)
    await step_stoptls(run, {})


async def step_late_close_notify(run: _Run, args: Mapping[str, object]) -> None:
    """After a declared delay (the scenario's fault), close_notify, then the sentinel."""
    delay = float(args.get("delay", 0.0))  # type: ignore[arg-type]
    transport = run.probe.transport
    assert transport is not None
    run.evidence.note(f"our close_notify held back {delay:g} s (the scenario's declared delay)")
    await asyncio.sleep(delay)  # the fault itself, not a wait for an event
    if run.probe.closed is not None:
        raise Observed("closed", f"the target ended the connection within {delay:g} s")
    transport.engine.policy = Policy.strict()
    await step_unwrap(run, {})
    reply = await run.probe.command(run.dialect.sentinel())
    if not run.dialect.is_sentinel_reply(reply):
        raise Observed("misread", f"after the late close_notify: {reply.text}")


async def step_greeting(run: _Run, args: Mapping[str, object]) -> None:
    if not run.dialect.greets_after_stoptls:
        return  # FTP after CCC: the client speaks first
    reply = await run.probe.reply(greeting=True)
    if not run.dialect.greeting_ok(reply):
        raise Observed("unexpected-reply", f"after STOPTLS: {reply.text}")


async def step_command(run: _Run, args: Mapping[str, object]) -> None:
    """Send STARTTLS/STOPTLS where it must be refused."""
    what = str(args["what"])
    command = run.dialect.starttls() if what == "starttls" else run.dialect.stoptls()
    reply = await run.probe.command(command)
    if reply.ok:
        raise Observed("accepted", f"{what} answered {reply.text}")


async def step_login(run: _Run, args: Mapping[str, object]) -> None:
    target = run.target
    if not (target.user and target.password):
        if args.get("optional"):
            run.evidence.note("no test user (--user/--password): login skipped")
            run.login_skipped = True
            return
        raise Observed("no-credentials")
    for command in run.dialect.login_exchanges(target.user, target.password):
        reply = await run.probe.command(command)
        if not reply.ok:
            raise Observed("unexpected-reply", f"login refused: {reply.text}")
    run.logged_in = True


async def step_state_control(run: _Run, args: Mapping[str, object]) -> None:
    """Control for the state probe: a fresh session must refuse the dialect's control.

    A server that accepts (SMTP) MAIL without any EHLO at all cannot show
    whether it resets state at STARTTLS, so the scenario cannot be decided.
    """
    command = run.dialect.state_control()
    if command is None:
        return
    reply = await run.probe.command(command)
    if reply.ok:
        raise Observed("no-hello-required", f"{_verb(command)} is accepted even before TLS")


def _verb(command: bytes) -> str:
    return command.decode("latin-1").strip()[:60]


async def step_state_probe(run: _Run, args: Mapping[str, object]) -> None:
    after = str(args.get("after", "starttls"))
    if run.login_skipped and after in run.dialect.state_needs_login:
        # Refused because nobody logged in, not because the state was reset:
        # what cannot be decided is a skip, never a pass (issue 11).
        raise Observed("no-credentials", f"the state probe after {after} needs a logged-in user")
    reply = await run.probe.command(run.dialect.state_probe(after))
    kept = run.dialect.state_kept(after, reply)
    if kept is not None:
        raise Observed("state-kept", kept)


async def _stored(run: _Run) -> int:
    probe = run.target.storage_count
    assert probe is not None
    value = probe()
    if inspect.isawaitable(value):
        value = await value
    return int(value)


async def step_truncate_unit(run: _Run, args: Mapping[str, object]) -> None:
    """Cut a message unit with a FIN under TLS; what the target writes then is judged first.

    Without a storage probe the scenario still runs: a target that writes
    plaintext onto the truncated TLS connection fails from the wire alone,
    and a wire violation wins over an unchanged message count.
    """
    probe = run.probe
    if run.target.storage_count is not None:
        run.stored_before = await _stored(run)
    if run.dialect.storage_needs_login:
        await step_login(run, {})
    for unit in run.dialect.truncated_unit(run.target.rcpt):
        if unit.answer == "none":
            probe.write(unit.data)
            continue
        what = _verb(unit.data)
        if unit.answer == "continue":
            probe.write(unit.data)
            reply = await probe.reply(greeting=True)
            if run.dialect.is_continuation(reply):
                continue
        else:
            reply = await probe.command(unit.data)
            if reply.ok:
                continue
        if reply.ok:
            raise Observed("unexpected-reply", f"{what}: {reply.text}")
        # The storage command itself is refused (e.g. POP3's optional XTND
        # XMIT): there is no unit to cut, so the scenario cannot decide.
        raise Observed("storage-refused", f"{what} refused: {reply.text}")
    assert probe.transport is not None
    run.evidence.add("c2s", "eof", note="our TCP FIN without close_notify (truncation)")
    fin = len(run.evidence.exchanges)
    probe.transport.truncate()
    try:
        closed = await probe.wait_closed()
    except ProbeTimeout:
        raise Observed("timeout", "the target kept the truncated connection open") from None
    if closed.how == "violation" and closed.rule is not None:
        raise Observed(violation(closed.rule), closed.detail)
    for e in run.evidence.exchanges[fin:]:
        if e.direction == "s2c" and e.kind == "plaintext":
            shown = e.data[:60].decode("latin-1")
            raise Observed("plaintext-goodbye", f"wrote plaintext after the truncation: {shown!r}")


async def step_check_storage(run: _Run, args: Mapping[str, object]) -> None:
    if run.target.storage_count is None:
        raise Observed("no-storage-probe", "the wire was clean; the message store is not visible")
    after = await _stored(run)
    if run.stored_before is not None and after > run.stored_before:
        raise Observed("stored-truncated", f"stored messages went {run.stored_before} -> {after}")
    raise Observed("not-stored", f"stored messages stayed at {after}")


StepFunc = Callable[[_Run, Mapping[str, object]], Awaitable[None]]

#: The verb table: every step action a scenario may name.
_SERVER_STEPS: Dict[str, StepFunc] = {
    "connect": step_connect,
    "hello": step_hello,
    "require": step_require,
    "starttls": step_starttls,
    "handshake": step_handshake,
    "sentinel": step_sentinel,
    "quit": step_quit,
    "raw-sentinel": step_raw_sentinel,
    "plain-sentinel": step_plain_sentinel,
    "expect-close": step_expect_close,
    "expect-close-or-closure": after_silence(step_expect_close),
    "expect-silent-close": step_expect_silent_close,
    "close-then-sentinel": step_close_then_sentinel,
    "close-notify-only": step_close_notify_only,
    "alert-then-sentinel": step_alert_then_sentinel,
    "unwrap": step_unwrap,
    "stoptls": step_stoptls,
    "stoptls-unanswered": step_stoptls_unanswered,
    "late-close-notify": step_late_close_notify,
    "greeting": step_greeting,
    "command": step_command,
    "login": step_login,
    "state-control": step_state_control,
    "state-probe": step_state_probe,
    "truncate-unit": step_truncate_unit,
    "check-storage": step_check_storage,
}


def unknown_steps(scenarios: Sequence[Scenario]) -> List[Tuple[str, str]]:
    """(scenario id, action) pairs the verb table does not know (a test)."""
    return unknown_actions(scenarios, "server", _SERVER_STEPS)


def _probe_context(
    target: ServerTarget, tls_version: str, keylog: Optional[Path]
) -> ssl.SSLContext:
    if keylog is not None:  # a key log file per scenario: a context of its own
        if target.cafile is not None:
            return client_context(tls_version, keylog, cafile=target.cafile)
        return client_context(tls_version, keylog, verify=False)
    # Shared per CA file and version: building a context and parsing the CA
    # file cost about a tenth of a scenario run (benchmarks/).
    return shared_client_context(tls_version, target.cafile, verify=target.cafile is not None)


def _skip(run: _Run, step: Step) -> Optional[str]:
    """A step conditional on a capability the target does not offer is skipped."""
    if_cap = step.args.get("if_cap")
    if if_cap and str(if_cap) not in run.probe.capabilities:
        return f"step {step.action} skipped: {if_cap} not offered"
    return None


def _mark(run: _Run) -> None:
    """What the target says from the fault step on is what counts."""
    run.mark = len(run.evidence.exchanges)


def _said_failed(run: _Run, step: Step) -> bool:
    """The injected bytes broke the handshake and the target said so in plaintext (vsftpd)."""
    t = run.probe.transport
    if step.action != "handshake" or not run.fault_applied or t is None or not t.violations:
        return False
    reply, _ = run.dialect.split_reply(t.violations[-1].data)
    if reply is None or reply.ok or run.dialect.is_injected_reply(reply):
        return False
    # Words, not garbage: bytes that merely parse as a reply say nothing.
    return all(32 <= b < 127 or b in b"\r\n\t" for b in reply.raw)


def _injected_answer(run: _Run) -> bool:
    """An answer to the injected command among the target's TLS data since the fault."""
    data = b"".join(e.data for e in _said_since(run, run.mark) if e.kind == "tls")
    while data:
        reply, rest = run.dialect.split_reply(data)
        if reply is None or len(rest) >= len(data):
            return False
        if run.dialect.is_injected_reply(reply):
            run.evidence.note(f"answer to the injected command under TLS: {reply.text}")
            return True
        data = rest
    return False


def _closed(run: _Run, step: Step, closed: RemoteEnded) -> str:
    """The target ended the connection during ``step``."""
    if closed.how == "refused":
        return "refused"
    if closed.how == "overflow":
        return "reply-bound"  # an error: the target closed nothing
    after_injection = ended_after_injection(run, step, closed)
    if after_injection is not None:
        return after_injection
    if closed.how == "violation" and closed.rule is not None:
        return "handshake-refused" if _said_failed(run, step) else violation(closed.rule)
    if not run.fault_applied:
        return "closed-before-fault"
    if "injection-answered" in run.scenario.expect and _injected_answer(run):
        return "injection-answered"  # answered under TLS, then closed before our sentinel
    if step.action == "handshake" and closed.how in ("handshake", "alert"):
        if not any(s.fault for s in run.scenario.steps):
            return "handshake-failed"
        return "handshake-refused"  # e.g. the injected bytes read as the ClientHello
    return "closed"


async def _interpret(run: _Run) -> str:
    """Run the steps; return the observation label."""
    steps, note, verbs = run.scenario.steps, run.evidence.note, _SERVER_STEPS
    return await interpret(run, verbs, steps, note, ended=_closed, skip=_skip, at_fault=_mark)


def _rule_column(scenario: Scenario, label: str, verdict: Verdict) -> str:
    """A fail or warn names the rule it is about, so summary and column agree."""
    if verdict in (Verdict.FAIL, Verdict.WARN):
        return rule_of(label, scenario.rule).value
    return scenario.rule.value


async def run_server_scenario(
    scenario: Scenario,
    target: ServerTarget,
    tls_version: str,
    settings: RunSettings = RunSettings(),
) -> Result:
    """One scenario x TLS version against a server; never raises."""
    result, _run, _label = await _execute(scenario, target, tls_version, settings)
    return result


async def _execute(
    scenario: Scenario, target: ServerTarget, tls_version: str, settings: RunSettings
) -> Tuple[Result, _Run, str]:
    """One scenario run: its result, its run state and its observation label."""
    dialect = dialect_named(target.dialect)
    evidence = Evidence()
    keylog = None
    if settings.keylog_dir is not None:
        settings.keylog_dir.mkdir(parents=True, exist_ok=True)
        keylog = settings.keylog_dir / f"{scenario.id}-{target.dialect}-tls{tls_version}.keys"
        evidence.keylog = str(keylog)
    probe = Probe(
        dialect,
        target.host,
        target.port,
        client_context=_probe_context(target, tls_version, keylog),
        server_hostname=target.server_hostname,
        evidence=evidence,
        settings=settings.probe_settings(),
        credentials=(target.user, target.password),
    )
    run = _Run(scenario, target, dialect, probe, evidence)
    start = time.monotonic()
    try:
        label = await asyncio.wait_for(_interpret(run), settings.scenario_timeout)
    except asyncio.TimeoutError:
        label = TIMEOUT
        evidence.note(f"scenario exceeded its {settings.scenario_timeout:g} s bound")
    except Exception as exc:  # a harness bug must not take the run down
        label = HARNESS_ERROR
        evidence.note(harness_error(exc))
    finally:
        probe.close()
    outcome = scenario.outcome(label)
    result = Result(
        id=scenario.id,
        dialect=target.dialect,
        tls_version=tls_version,
        verdict=outcome.verdict,
        rule=_rule_column(scenario, label, outcome.verdict),
        summary=outcome.summary,
        evidence=evidence,
        duration=time.monotonic() - start,
        title=scenario.title,
        reference=scenario.reference,
    )
    return result, run, label


# ------------------------------------------------------------ many scenarios

_SANITY_STEPS = (
    Step("connect"),
    Step("hello"),
    Step("require", {"cap": "STARTTLS"}),
    Step("starttls", fault=True),
    Step("handshake"),
    Step("sentinel"),
    Step("quit"),
)


async def sanity_probe(
    target: ServerTarget, tls_version: str, settings: RunSettings
) -> Optional[str]:
    """None if the conforming path works; otherwise why it does not (one line)."""
    problem = await sanity_problem(target, tls_version, settings)
    if problem is None:
        return None
    if problem.kind == "version":
        return NotOffered(problem.line)
    return problem.line


async def sanity_problem(
    target: ServerTarget, tls_version: str, settings: RunSettings
) -> Optional[SanityProblem]:
    """None if the conforming path works; otherwise its classified cause."""
    steps: Tuple[Step, ...] = _SANITY_STEPS
    if target.user and target.password:
        # A test user that is refused makes every scenario that logs in
        # meaningless: one cause, found once.
        steps = (*steps[:5], Step("hello"), Step("login"), *steps[5:])
    probe_scenario = Scenario(
        id="sanity",
        title="sanity probe",
        role="server",
        rule=Rule.R1,
        reference="",
        reason="",
        steps=steps,
        expect={"completed": Expect(Verdict.PASS, "ok")},
    )
    result, run, label = await _execute(probe_scenario, target, tls_version, settings)
    if result.verdict is Verdict.PASS:
        return None
    notes = [e.note for e in result.evidence.exchanges if e.kind == "note" and e.note]
    return classify(
        label,
        notes[-1] if notes else result.summary,
        dialect=target.dialect,
        url=target.url,
        tls_version=tls_version,
        greeting=run.greeting,
        reply_timeout=settings.reply_timeout,
        evidence=result.evidence,
    )


async def run_bracketed(
    scenarios: Sequence[Scenario],
    *,
    role: str,
    dialect: str,
    versions: Sequence[str],
    settings: RunSettings,
    run_one: Callable[[Scenario, str], Awaitable[Result]],
    sanity: Callable[[str], Awaitable[Optional[str]]],
    progress: Optional[Progress] = None,
) -> List[Result]:
    """Every applicable scenario x TLS version, bracketed by sanity probes.

    Shared by the server, client and path runners: ``run_one`` runs one
    scenario (and never raises), ``sanity`` returns why the conforming path
    does not work, or None.  A failed probe *before* a TLS version's group
    makes all of it ``error``; one *after* turns its passes into errors (the
    target may have been wedged by the scenarios themselves).
    """
    semaphore = asyncio.Semaphore(max(1, settings.concurrency))
    results: List[Result] = []

    async def one(scenario: Scenario, version: str) -> Result:
        async with semaphore:
            result = await run_one(scenario, version)
        if progress is not None:
            progress(result)
        return result

    for version in versions:
        applicable = [
            s
            for s in scenarios
            if s.role == role and dialect in s.dialects and version in s.tls_versions
        ]
        if not applicable:
            continue
        if settings.sanity:
            problem = await sanity(version)
            if problem is not None:
                skip = isinstance(problem, NotOffered)  # e.g. a TLS-1.3-only target
                for s in applicable:
                    r = Result(
                        s.id,
                        dialect,
                        version,
                        Verdict.SKIP if skip else Verdict.ERROR,
                        s.rule.value,
                        problem if skip else f"sanity probe failed before the run: {problem}",
                        title=s.title,
                        reference=s.reference,
                    )
                    results.append(r)
                    if progress is not None:
                        progress(r)
                continue
        group = await asyncio.gather(*(one(s, version) for s in applicable))
        if settings.sanity:
            problem = await sanity(version)
            if problem is not None:
                for r in group:
                    if r.verdict is Verdict.PASS:
                        r.verdict = Verdict.ERROR
                        r.summary = f"sanity probe failed after the run: {problem}"
        results.extend(group)
    return results


async def run_server_target(
    scenarios: Sequence[Scenario],
    target: ServerTarget,
    settings: RunSettings = RunSettings(),
    progress: Optional[Progress] = None,
    tls_versions: Optional[Sequence[str]] = None,
    *,
    raise_unusable: bool = False,
) -> List[Result]:
    """Every applicable server scenario x TLS version against ``target``.

    A TLS version the target does not offer gives ``skip`` rows.  A dead
    target (refused, silent) costs one bounded wait for the whole run.
    With ``raise_unusable`` a target that cannot be tested at all (dead,
    not the named protocol, no STARTTLS, a certificate or login refused,
    no TLS version offered) raises :class:`TargetUnusable` with one line
    instead of giving one ``error`` row per scenario.
    """
    versions = [v for v in (tls_versions or target.tls_versions) if v in target.tls_versions]
    dead: List[SanityProblem] = []
    checked: Set[str] = set()
    not_offered: List[str] = []

    async def run_one(scenario: Scenario, version: str) -> Result:
        return await run_server_scenario(scenario, target, version, settings)

    async def sanity(version: str) -> Optional[str]:
        if dead:
            return dead[0].line  # asked once: no second wait on a dead target
        before = version not in checked
        checked.add(version)
        problem = await sanity_problem(target, version, settings)
        if problem is None:
            return None
        if problem.kind == "version":
            not_offered.append(version)
            return NotOffered(problem.line)
        if raise_unusable and before:
            raise TargetUnusable(problem.line)
        if problem.kind == "dead":
            dead.append(problem)
        return problem.line

    results = await run_bracketed(
        scenarios,
        role="server",
        dialect=target.dialect,
        versions=versions,
        settings=settings,
        run_one=run_one,
        sanity=sanity,
        progress=progress,
    )
    if raise_unusable and versions and len(not_offered) == len(versions):
        offered = ", ".join(versions)
        raise TargetUnusable(f"{target.url} offers none of TLS {offered}")
    return results
