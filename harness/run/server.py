"""Runs catalogue scenarios against a target and decides their verdicts.

Theory of operation
===================

For a server under test, each scenario x TLS version is one fresh TCP
connection driven by a :class:`~starttls_harness.run.probe.Probe`.  The steps of the
scenario are looked up in :data:`_SERVER_STEPS` (a verb table) and run in
order; a step that sees the target deviate raises :class:`Observed` with a
label, and the scenario's ``expect`` table turns the label into a verdict.
Decisions come from events -- a reply, a close, an alert, a sentinel
command answered -- never from silence: a wait that runs out is the label
``timeout`` and therefore an ``error``, not a ``pass``.

Sanity probes bracket every target x TLS version: the conforming path
(STARTTLS, handshake, sentinel) must work before the scenarios run and
still work after them, or every result of that group becomes an ``error``.

Concurrency is bounded by a semaphore; each scenario has a hard time bound
on top of the per-reply bounds; probes are always closed in ``finally``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Awaitable,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from starttls_harness.dialects import Dialect, Reply, dialect_named
from starttls_harness.report.verdicts import Evidence, Result, Verdict
from starttls_harness.run.interpreter import interpret
from starttls_harness.run.outcomes import (
    HARNESS_ERROR,
    TIMEOUT,
    Observed,
    RemoteEnded,
    harness_error,
    violation,
)
from starttls_harness.run.probe import PeerClosed, Probe, ProbeSettings, ProbeTimeout
from starttls_harness.scenarios.model import Expect, Scenario, Step
from starttls_harness.tls.certs import client_context
from starttls_harness.tls.engine import Policy, Rule

__all__ = [
    "Observed",
    "Progress",
    "RunSettings",
    "ServerTarget",
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


# ------------------------------------------------------------- the steps


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
    #: Logged in during the current TLS session (a dialect may need it for STOPTLS).
    logged_in: bool = False


async def _expect_reply(run: _Run, data: bytes) -> Reply:
    return await run.probe.command(data)


async def step_connect(run: _Run, args: Mapping[str, object]) -> None:
    greeting = await run.probe.connect()
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


async def step_starttls(run: _Run, args: Mapping[str, object]) -> None:
    probe, dialect = run.probe, run.dialect
    command = dialect.starttls()
    transport = probe.transport
    assert transport is not None
    transport.hold_after(dialect.final_line_of(command), once=True, framer=dialect.framer())
    inject = bool(args.get("inject"))
    injected = dialect.injected() * int(args.get("count", 1)) if inject else b""  # type: ignore[call-overload]
    if inject and args.get("segment", "same") == "same":
        with transport.corked():  # STARTTLS and the injection in one segment
            probe.write(command)
            probe.inject(injected)
    else:
        probe.write(command)
        if inject:
            probe.inject(injected)  # a separate write: its own segment
    reply = await probe.reply(tag=dialect.tag_of(command))
    if not reply.ok:
        raise Observed("starttls-refused", reply.text)
    held = transport.engine.held
    if held:
        # The target said something in plaintext after its STARTTLS answer.
        run.evidence.add("s2c", "plaintext", held, "plaintext after the STARTTLS answer")
        answer, _ = dialect.split_reply(held)
        if inject and answer is not None and not dialect.is_injected_reply(answer):
            # e.g. FTP servers: the injected bytes broke the handshake and the
            # server said so in plaintext -- it did not run them (R1 kept).
            raise Observed("closed", f"took the injected bytes for a handshake: {answer.text}")
        if inject:
            raise Observed("injection-answered", "answered the injected command in plaintext")
        raise Observed("violation:R1", "sent plaintext after its STARTTLS answer")


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
    run.probe.write(run.dialect.sentinel())


async def step_expect_close(run: _Run, args: Mapping[str, object]) -> None:
    """Any answer now is a plaintext answer; a close is the refusal."""
    try:
        reply = await run.probe.reply(greeting=True)
    except PeerClosed as closed:
        if closed.how in ("violation", "overflow"):
            raise  # the probe hung up on an overflow: the target closed nothing
        raise Observed("closed", closed.detail) from None
    raise Observed("plaintext-answered", reply.text)


async def step_expect_silent_close(run: _Run, args: Mapping[str, object]) -> None:
    try:
        closed = await run.probe.wait_closed()
    except ProbeTimeout:
        raise
    spoke = [
        e.data
        for e in run.evidence.exchanges[run.mark :]
        if e.direction == "s2c" and e.kind == "plaintext"
    ]
    if spoke or run.probe.pending:
        raise Observed("spoke-after-close", "plaintext after the closure")
    if closed.how == "overflow":
        raise closed  # the probe hung up: not a close by the target
    if closed.how == "violation" and closed.rule is not None:
        raise Observed(f"violation:{closed.rule.value}", closed.detail)
    raise Observed("closed", closed.detail)


async def step_close_then_sentinel(run: _Run, args: Mapping[str, object]) -> None:
    """close_notify and a plaintext command in one segment (one-sided)."""
    run.probe.ensure_open()
    transport = run.probe.transport
    assert transport is not None
    if not transport.engine.tls_active:
        raise Observed("server-closed-first", "the server's close_notify came with its answer")
    with transport.corked():
        transport.engine.unwrap()
        run.evidence.add("c2s", "close_notify")
        run.probe.inject(run.dialect.sentinel())


async def step_alert_then_sentinel(run: _Run, args: Mapping[str, object]) -> None:
    """A real fatal alert and a plaintext command in one segment."""
    run.probe.ensure_open()
    transport = run.probe.transport
    assert transport is not None
    with transport.corked():
        transport.send_fatal_alert()
        run.evidence.add("c2s", "alert", note="bad_record_mac (provoked)")
        run.probe.inject(run.dialect.sentinel())


async def step_close_notify_only(run: _Run, args: Mapping[str, object]) -> None:
    """Our close_notify, then wait for the target's answer (bounded)."""
    run.probe.ensure_open()
    transport = run.probe.transport
    assert transport is not None
    with transport.corked():
        transport.engine.unwrap()
        run.evidence.add("c2s", "close_notify")


async def step_unwrap(run: _Run, args: Mapping[str, object]) -> None:
    transport = run.probe.transport
    if transport is not None and run.probe.closed is None and not transport.engine.tls_active:
        # The server sent the first close_notify (FTP CCC) and we answered it.
        run.evidence.note("the server started the closure; answered at once (R5)")
        return
    try:
        await run.probe.unwrap()
    except PeerClosed as closed:
        if closed.rule is not None and closed.rule.value == "R5":
            raise Observed("close-notify-not-answered", closed.detail) from None
        raise


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
    reply = await run.probe.command(command)
    if not reply.ok:
        raise Observed("stoptls-refused", reply.text)


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
            run.evidence.note("no test user: login skipped")
            return
        raise Observed("no-credentials")
    reply = await run.probe.command(run.dialect.login(target.user, target.password))
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
    if run.target.storage_count is None:
        raise Observed("no-storage-probe")
    probe = run.probe
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
            if not run.dialect.is_continuation(reply):
                raise Observed("unexpected-reply", f"{what}: {reply.text}")
            continue
        reply = await probe.command(unit.data)
        if not reply.ok:
            raise Observed("unexpected-reply", f"{what}: {reply.text}")
    assert probe.transport is not None
    run.evidence.add("c2s", "eof", note="TCP FIN without close_notify (truncation)")
    probe.transport.truncate()
    try:
        await probe.wait_closed()
    except ProbeTimeout:
        raise Observed("timeout", "the target kept the truncated connection open") from None


async def step_check_storage(run: _Run, args: Mapping[str, object]) -> None:
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
    return [
        (s.id, step.action)
        for s in scenarios
        if s.role == "server"
        for step in s.steps
        if step.action not in _SERVER_STEPS
    ]


# ------------------------------------------------------------- one scenario


def _probe_context(
    target: ServerTarget, tls_version: str, keylog: Optional[Path]
) -> ssl.SSLContext:
    if keylog is not None:  # a key log file per scenario: a context of its own
        if target.cafile is not None:
            return client_context(tls_version, keylog, cafile=target.cafile)
        return client_context(tls_version, keylog, verify=False)
    if target.cafile is None:
        return _shared_context(None, (0, 0), tls_version)
    stat = os.stat(target.cafile)
    return _shared_context(str(target.cafile), (stat.st_mtime_ns, stat.st_size), tls_version)


@functools.lru_cache(maxsize=32)
def _shared_context(
    cafile: Optional[str], stamp: Tuple[int, int], tls_version: str
) -> ssl.SSLContext:
    """One client context per CA file (as it is now) and TLS version.

    Creating an ``SSLContext`` and parsing the CA file cost about a tenth of
    a scenario run (measured, ``benchmarks/``); a context serves any number
    of connections, and a client context never resumes a session on its
    own, so sharing it changes nothing on the wire.
    """
    if cafile is not None:
        return client_context(tls_version, cafile=cafile)
    return client_context(tls_version, verify=False)


def _skip(run: _Run, step: Step) -> Optional[str]:
    """A step conditional on a capability the target does not offer is skipped."""
    if_cap = step.args.get("if_cap")
    if if_cap and str(if_cap) not in run.probe.capabilities:
        return f"step {step.action} skipped: {if_cap} not offered"
    return None


def _mark(run: _Run) -> None:
    """What the target says from the fault step on is what counts."""
    run.mark = len(run.evidence.exchanges)


def _closed(run: _Run, step: Step, closed: RemoteEnded) -> str:
    """The target ended the connection during ``step``."""
    if closed.how == "refused":
        return "refused"
    if closed.how == "overflow":
        return "reply-bound"  # an error: the target closed nothing
    if closed.how == "violation" and closed.rule is not None:
        return violation(closed.rule)
    if not run.fault_applied:
        return "closed-before-fault"
    if (
        step.action == "handshake"
        and closed.how == "handshake"
        and not any(s.fault for s in run.scenario.steps)
    ):
        return "handshake-failed"
    return "closed"


async def _interpret(run: _Run) -> str:
    """Run the steps; return the observation label."""
    return await interpret(run, _SERVER_STEPS, ended=_closed, skip=_skip, at_fault=_mark)


async def run_server_scenario(
    scenario: Scenario,
    target: ServerTarget,
    tls_version: str,
    settings: RunSettings = RunSettings(),
) -> Result:
    """One scenario x TLS version against a server; never raises."""
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
    return Result(
        id=scenario.id,
        dialect=target.dialect,
        tls_version=tls_version,
        verdict=outcome.verdict,
        rule=scenario.rule.value,
        summary=outcome.summary,
        evidence=evidence,
        duration=time.monotonic() - start,
        title=scenario.title,
        reference=scenario.reference,
    )


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
    """None if the conforming path works; otherwise why it does not."""
    probe_scenario = Scenario(
        id="sanity",
        title="sanity probe",
        role="server",
        rule=Rule.R1,
        reference="",
        reason="",
        steps=_SANITY_STEPS,
        expect={"completed": Expect(Verdict.PASS, "ok")},
    )
    result = await run_server_scenario(probe_scenario, target, tls_version, settings)
    if result.verdict is Verdict.PASS:
        return None
    notes = [e.note for e in result.evidence.exchanges if e.kind == "note" and e.note]
    return notes[-1] if notes else result.summary


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
                for s in applicable:
                    r = Result(
                        s.id,
                        dialect,
                        version,
                        Verdict.ERROR,
                        s.rule.value,
                        f"sanity probe failed before the run: {problem}",
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
) -> List[Result]:
    """Every applicable server scenario x TLS version against ``target``."""
    versions = [v for v in (tls_versions or target.tls_versions) if v in target.tls_versions]

    async def run_one(scenario: Scenario, version: str) -> Result:
        return await run_server_scenario(scenario, target, version, settings)

    async def sanity(version: str) -> Optional[str]:
        return await sanity_probe(target, version, settings)

    return await run_bracketed(
        scenarios,
        role="server",
        dialect=target.dialect,
        versions=versions,
        settings=settings,
        run_one=run_one,
        sanity=sanity,
        progress=progress,
    )
