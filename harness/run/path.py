"""Runs the on-path scenarios: a client and a server under test, the proxy between.

Theory of operation
===================

One scenario x TLS version is one run:

1. the pair's server is started (the reference pair starts a fresh server
   per run, so that what it stores and reports belongs to this run only);
2. a :class:`~starttls_harness.proxy.Proxy` listens in front of it, following the
   conversation with the key log the client's TLS context writes (TLS 1.3
   close_notify alerts are then identified by decryption, not guessed);
3. the pair's client is driven through the proxy by a
   :class:`ClientDriver`, one verb per step of the scenario (the verb
   table :data:`_VERBS`).  The fault step arms the scenario's
   :class:`~starttls_harness.proxy.Fault` on the proxied connection -- before its
   verb, or from inside it (``hooks.arm``) when only the driver knows
   where a unit's records begin;
4. the verdict is decided from the proxy's event log, in order: the first
   thing the *receiver* of the fault did after the harness acted -- wrote
   plaintext, wrote TLS application data, or closed.  What the in-process
   peers report (engine events, stored messages, a verb that completed on
   a cut reply) is supporting evidence: it can turn a close into a fail
   (the bytes were taken in), never a silence into a pass.

A rule the proxy sees either peer break on the wire (plaintext after its
own close_notify before the peer's, plaintext inside TLS) is a fail of its
own, reported with the side that broke it.  Every wait is bounded by a
:class:`~starttls_harness.run.server.RunSettings` field; a wait that runs out is a
``timeout`` -- an ``error``, never a ``pass``.  Sanity runs of the plain
session (no fault) bracket every TLS version's group, as in
:func:`starttls_harness.run.server.run_server_target`.  The proxy, the client and the
server are closed in ``finally``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ssl
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

from starttls_harness.dialects import Dialect, dialect_named
from starttls_harness.dialects.roles import (
    ClientSpec,
    PathDriver,
    StopTLSUnsupported,
)
from starttls_harness.proxy import (
    C2S,
    S2C,
    EventNotSeen,
    Fault,
    Proxy,
    ProxyConnection,
    ProxyEvent,
)
from starttls_harness.report.verdicts import Evidence, Exchange, Result, Verdict
from starttls_harness.run.interpreter import interpret
from starttls_harness.run.outcomes import (
    COMPLETED,
    HARNESS_ERROR,
    Observed,
    RemoteEnded,
    harness_error,
)
from starttls_harness.run.path_evidence import exchanges, proxy_legs
from starttls_harness.run.path_judge import (
    SIDES,
    alert_after,
    fault_index,
    is_app_record,
    is_end,
    is_plaintext,
    judge_upgrade,
    other,
    wire_findings,
)
from starttls_harness.run.server import Progress, RunSettings, run_bracketed
from starttls_harness.scenarios.expectations import (
    PATH_EXPECTED,
    STOPTLS_SCENARIOS,
)
from starttls_harness.scenarios.path import fault_data, fault_step
from starttls_harness.scenarios.server import Expect, Scenario, Step
from starttls_harness.tls.engine import Event, PeerEOF, Rule, Violation
from starttls_harness.tls.keylog import SecretsMapping, SecretsProvider, read_keylog

__all__ = [
    "PATH_EXPECTED",
    "STOPTLS_SCENARIOS",
    "ClientDriver",
    "ClientSpec",
    "PathPair",
    "PathResult",
    "PathServer",
    "StepHooks",
    "StopTLSUnsupported",
    "merged_keylog",
    "path_sanity",
    "run_path_scenario",
    "run_path_target",
    "scenario_fault",
    "unknown_path_steps",
]

F, W, K = Verdict.FAIL, Verdict.WARN, Verdict.SKIP

_DEFAULTS = RunSettings()


# ------------------------------------------------------------------ the pair


class StepHooks:
    """Given to every verb: ``arm()`` arms the scenario's fault, at most once."""

    def __init__(self, run: _PathRun, step: Step) -> None:
        self._run = run
        self._step = step

    def arm(self, nth: int = 1) -> None:
        """Arm the fault now; it hits the ``nth`` matching unit from here.

        A verb that sends or expects a unit of several records calls this
        right before the unit, with ``nth`` the record the fault replaces.
        Harmless on steps without a fault.
        """
        if self._step.fault:
            self._run.arm(nth)


#: The client under test of the path role (the interface lives with the dialects).
ClientDriver = PathDriver


class PathServer(abc.ABC):
    """A server under test, started for one run."""

    address: Tuple[str, int]

    def engine_events(self) -> Optional[Sequence[Event]]:
        """The server's TLS-layer events for this run, if observable."""
        return None

    def stored(self) -> Optional[int]:
        """How many messages the server holds, if observable."""
        return None

    async def count(self) -> Optional[int]:
        """:meth:`stored`, or a count that takes a wait (a storage probe command)."""
        return self.stored()

    async def settle(self, timeout: float) -> None:
        """Wait (bounded) until the server finished with this run's connections."""
        return None  # nothing to wait for unless the server can tell

    @abc.abstractmethod
    async def close(self) -> None: ...


ServerFactory = Callable[[str, RunSettings], Awaitable[PathServer]]
ClientFactory = Callable[[ClientSpec], ClientDriver]
ContextFactory = Callable[[str, Optional[Path]], ssl.SSLContext]


@dataclass
class PathPair:
    """How to start the server under test and drive the client under test.

    ``client_context(tls_version, keylog)`` makes the client's TLS context;
    with ``writes_keylog`` it writes the NSS key log to ``keylog``, which
    the proxy reads to follow TLS 1.3 exactly.
    """

    dialect: str
    name: str
    start_server: ServerFactory
    client: ClientFactory
    client_context: ContextFactory
    server_hostname: str = "localhost"
    writes_keylog: bool = True
    tls_versions: Tuple[str, ...] = ("1.2", "1.3")
    #: A client the harness cannot drive verb by verb (a program): it runs
    #: this session of its own, the fault is armed on the proxy before it
    #: connects, and STOPTLS scenarios skip unless the proxy saw STOPTLS.
    own_session: Optional[Tuple[Step, ...]] = None
    #: What the proxy reads secrets from, given the run's key log path
    #: (default: that path, which the client writes).
    proxy_keylog: Optional[Callable[[Path], Any]] = None
    #: Where the secrets came from, given the run's key log path (evidence).
    keylog_source: Optional[Callable[[Path], str]] = None
    #: ``start_server`` again, writing the server's own key log to the given
    #: file (the built-in pair): the proxy reads it beside the client's.  Every
    #: sender logs a secret before it sends under it, so with both logs no
    #: record waits for its secret (the client logs the server's handshake
    #: secret only once it has read the ServerHello, after the server's whole
    #: flight has passed).  Used only while ``start_server`` is still
    #: ``logged_for``: a pair whose ``start_server`` was replaced runs as given.
    start_logged_server: Optional[Callable[[str, RunSettings, Path], Awaitable[PathServer]]] = None
    logged_for: Optional[ServerFactory] = None
    #: TLS version -> whether the plain session (a sanity run) of an
    #: ``own_session`` pair returned to plaintext: STOPTLS scenarios of a
    #: pair that did not skip without running.
    returns: Dict[str, bool] = field(default_factory=dict)
    #: Whether the runs of one TLS version may share one key log file per
    #: side (the built-in pair): the proxy finds each connection's secrets by
    #: its client random, so the runs need not be apart, and the pair builds
    #: its TLS contexts once instead of once per run (a context that writes a
    #: key log cannot be shared across files).  Never with ``keylog_dir``: the
    #: evidence then keeps each run's own secrets.
    shares_keylog: bool = False


@dataclass
class PathResult(Result):
    """A path result: which side broke the rule (``client``/``server``), if one did."""

    side: Optional[str] = None

    def as_dict(self) -> Dict[str, Any]:
        out = super().as_dict()
        if self.side is not None:
            out["side"] = self.side
        return out


# ------------------------------------------------------------------ one run

Verb = Callable[[ClientDriver, StepHooks], Awaitable[None]]

#: The verb table: every step action a path scenario may name.
_VERBS: Dict[str, Verb] = {
    "connect": lambda d, h: d.connect(h),
    "starttls": lambda d, h: d.starttls(h),
    "command": lambda d, h: d.command(h),
    "stoptls": lambda d, h: d.stoptls(h),
    "send-unit": lambda d, h: d.send_unit(h),
    "fetch-unit": lambda d, h: d.fetch_unit(h),
    "quit": lambda d, h: d.quit(h),
}


def unknown_path_steps(scenarios: Sequence[Scenario]) -> List[Tuple[str, str]]:
    """(scenario id, action) pairs the verb table does not know (a test)."""
    return [
        (s.id, step.action)
        for s in scenarios
        if s.role == "path"
        for step in s.steps
        if step.action not in _VERBS
    ]


def scenario_fault(scenario: Scenario, dialect: Dialect) -> Tuple[Fault, str, str]:
    """The scenario's fault (nth 1), its judge and when it is armed."""
    step = fault_step(scenario)
    args = step.args
    fault = Fault(
        direction=str(args["direction"]),
        at=str(args["at"]),
        action=str(args["op"]),
        data=fault_data(str(args.get("data", "")), dialect),
        same_segment=bool(args.get("same_segment", True)),
        before=bool(args.get("before", False)),
        name=scenario.id,
    )
    return fault, str(args["judge"]), str(args.get("arm", "before"))


#: The plain session a sanity run drives: the pair must connect, upgrade and
#: talk under TLS (what the return to plaintext does is the scenarios' job).
_SANITY_STEPS = (Step("connect"), Step("starttls"), Step("command"), Step("quit"))


@dataclass
class _PathRun:
    """State of one run (a scenario or a sanity run) x TLS version."""

    steps: Tuple[Step, ...]
    scenario: Optional[Scenario]
    pair: PathPair
    tls_version: str
    settings: RunSettings
    keylog: Optional[Path]
    fault: Optional[Fault] = None
    judge: str = ""
    arm_mode: str = "before"
    server: Optional[PathServer] = None
    proxy: Optional[Proxy] = None
    conn: Optional[ProxyConnection] = None
    driver: Optional[ClientDriver] = None
    armed: bool = False
    #: Engine events each in-process peer had when the fault was armed, and
    #: when the session ended (what came after is the harness closing up).
    server_mark: int = 0
    client_mark: int = 0
    server_upto: Optional[int] = None
    client_upto: Optional[int] = None
    stored_before: Optional[int] = None
    #: The count once the session is over (read after the server settled).
    stored_after: Optional[int] = None
    #: (proxy event index, text): harness notes, merged into the evidence.
    notes: List[Tuple[int, str]] = field(default_factory=list)
    #: Why the session stopped early: (step action, exception).
    stopped: Optional[Tuple[str, BaseException]] = None
    no_stoptls: bool = False
    #: Proxy event index of the fault receiver's reaction (None: none seen).
    #: What the other peer does in answer to it is out of the judged window.
    reaction_at: Optional[int] = None
    #: Proxy event index when the fault step's verb returned (None: it did not).
    verb_done_at: Optional[int] = None
    completed: bool = False
    #: For the interpreter: the step being run, and whether the fault step began.
    step: Optional[Step] = None
    fault_applied: bool = False
    client_closed: bool = False
    #: The side a non-pass observation blames ("client" or "server").
    side: Optional[str] = None

    def note(self, text: str) -> None:
        index = len(self.conn.events) if self.conn is not None else 0
        self.notes.append((index, text))

    def connection(self) -> Optional[ProxyConnection]:
        if self.conn is None and self.proxy is not None and self.proxy.connections:
            self.conn = self.proxy.connections[0]
        return self.conn

    def arm(self, nth: int) -> None:
        conn = self.connection()
        if self.fault is None or self.armed or conn is None:
            return
        fault = replace(self.fault, nth=nth)
        # Faults of a proxied connection are read unit by unit: one appended
        # now counts its matches from here on (nth after arming).
        conn.faults = (*conn.faults, fault)
        self.armed = True
        self.server_mark = len(_events(self.server))
        self.client_mark = len(_events(self.driver))
        self.stored_before = self.server.stored() if self.server is not None else None
        self.note(f"fault armed: {fault}")


def _events(peer: Optional[Any]) -> Sequence[Event]:
    if peer is None:
        return []
    return peer.engine_events() or []


def _step_verb(verb: Verb) -> Callable[[_PathRun, Mapping[str, object]], Awaitable[None]]:
    """``verb`` as a step of the shared interpreter: the client under test
    may raise anything; that stops its session (``run.stopped``), it is not
    a harness error."""

    async def run_step(run: _PathRun, args: Mapping[str, object]) -> None:
        step = run.step
        assert run.driver is not None and run.proxy is not None and step is not None
        try:
            await verb(run.driver, StepHooks(run, step))
        except StopTLSUnsupported as exc:
            run.note(f"client: {exc}")
            run.no_stoptls = True
            run.stopped = (step.action, exc)
            raise Observed(_STOPPED) from None
        except Exception as exc:  # whatever the client under test raised
            run.stopped = (step.action, exc)
            run.note(f"client: {step.action} stopped: {type(exc).__name__}: {exc}")
            raise Observed(_STOPPED) from None
        if step.fault or (run.pair.own_session is not None and step.action == "quit"):
            run.verb_done_at = len(run.conn.events) if run.conn is not None else 0
            run.note(f"client: {step.action} completed")
        if step.action == "connect":
            # A program takes its time to start: its connect is bounded by the scenario.
            own = run.pair.own_session is not None
            bound = run.settings.scenario_timeout if own else run.settings.connect_timeout
            run.conn = await run.proxy.connection(0, timeout=bound)

    return run_step


#: The path role's steps for :func:`~.interpreter.interpret`.
_STEPS = {action: _step_verb(verb) for action, verb in _VERBS.items()}
_STOPPED = "client-stopped"


def _before(run: _PathRun, step: Step) -> None:
    run.step = step
    if step.fault and run.arm_mode == "before":
        run.arm(1)


def _ended(run: _PathRun, step: Step, gone: RemoteEnded) -> str:
    return _STOPPED  # not reached: a step turns whatever the client raised into Observed


async def _session(run: _PathRun) -> None:
    """Run the client's steps until one stops it; record how it ended."""
    label = await interpret(run, _STEPS, run.steps, run.note, ended=_ended, before=_before)
    run.completed = label == COMPLETED


def _reaction(e: ProxyEvent, receiver: str, judge: str) -> bool:
    """Is ``e`` something the receiver (sending in direction ``receiver``) did?"""
    if judge == "truncation" and e.kind == "rst-sent" and e.direction == other(receiver):
        return True  # the harness reset the receiver's connection: nothing can follow
    if e.direction != receiver:
        return False
    if judge == "upgrade" and "starttls-reply" in e.points:
        return False  # the answer to STARTTLS itself, not to the injected bytes
    if is_plaintext(e) or is_end(e):
        return True
    return judge == "injection" and is_app_record(e)


def _unprompted(run: _PathRun, receiver: str) -> bool:
    """Does the receiver's first TLS record after the fault answer nothing?

    Where the server speaks first after the handshake (ManageSieve re-sends
    its capabilities, RFC 5804 §2.2), both sides write their first record
    when the handshake ends, whatever was injected: the server its
    capabilities, the client its first command, crossing on the wire.  Only
    what a side writes after that can be an answer to the injected bytes.
    """
    del receiver  # both directions
    return dialect_named(run.pair.dialect).speaks_first_after_starttls


def _decisive(run: _PathRun, events: Sequence[ProxyEvent], fi: int, receiver: str, at: int) -> bool:
    """Is ``events[at]`` (after the fault at ``fi``) a reaction that decides?"""
    e = events[at]
    if not _reaction(e, receiver, run.judge):
        return False
    if _unprompted(run, receiver) and is_app_record(e):
        earlier = [x for x in events[fi + 1 : at] if x.direction == receiver and is_app_record(x)]
        return bool(earlier)
    return True


def _decide(run: _PathRun, events: Sequence[ProxyEvent]) -> Tuple[str, str]:
    """The observation label and a detail for the evidence."""
    findings = wire_findings(events)
    violations = [f for f in findings if f.label.startswith("violation:")]
    fi = fault_index(events)
    if run.fault is None:  # a sanity run: the session must just work
        if violations and run.pair.own_session is not None:
            # A program that breaks a rule on the wire may fail its own session
            # for it: the scenarios run, and report the rule with the side.
            return "completed", ""
        if run.stopped is not None:
            action, exc = run.stopped
            return "unexpected-reply", f"{action}: {type(exc).__name__}: {exc}"
        return "completed", ""
    if fi is None:
        if violations:
            run.side = violations[0].side
            return violations[0].label, f"{violations[0].side}: {violations[0].detail}"
        if run.no_stoptls:
            return "no-stoptls", "the pair does not return to plaintext"
        unanswered = [f for f in findings if f.label == "close-notify-not-answered"]
        if unanswered:
            run.side = unanswered[0].side
            return unanswered[0].label, f"{unanswered[0].side}: {unanswered[0].detail}"
        if not run.armed:
            return "fault-not-armed", _stopped_text(run)
        return "closed-before-fault", _stopped_text(run)
    judged = _judge(run, events, fi)
    label = judged[0]
    run.side = SIDES[other(run.fault.direction)]
    if run.fault is not None and _expect_verdict(run, label) is Verdict.FAIL:
        return judged
    if violations:
        run.side = violations[0].side
        return violations[0].label, f"{violations[0].side}: {violations[0].detail}"
    return judged


def _expect_verdict(run: _PathRun, label: str) -> Optional[Verdict]:
    if run.scenario is None:
        return None
    outcome: Expect = run.scenario.outcome(label)
    return outcome.verdict


def _stopped_text(run: _PathRun) -> str:
    if run.stopped is None:
        return "the session ended before the fault point"
    action, exc = run.stopped
    return f"the session stopped at {action}: {type(exc).__name__}: {exc}"


def _judge(run: _PathRun, events: Sequence[ProxyEvent], fi: int) -> Tuple[str, str]:
    """What the receiver of the fault did after it (wire first, then its own report)."""
    assert run.fault is not None
    receiver = other(run.fault.direction)
    side = SIDES[receiver]
    closed_by: Optional[ProxyEvent] = None
    for at in range(fi + 1, len(events)):
        if not _decisive(run, events, fi, receiver, at):
            continue
        e = events[at]
        if is_plaintext(e):
            label = "plaintext-answered" if run.judge == "injection" else "plaintext-resumed"
            return label, f"the {side} sent plaintext: {e.data[:60]!r}"
        if is_app_record(e):
            return "answered-in-tls", f"the {side} sent TLS application data after the injection"
        closed_by = e
        break
    if closed_by is None and receiver == C2S and run.pair.own_session and run.stopped:
        # A client program that ended (with an error) ended its connection,
        # whether or not its FIN reached the log before the proxy closed.
        closed_by = ProxyEvent(0.0, C2S, "eof", detail=f"the client exited: {run.stopped[1]}")
    own = _own_events(run, receiver)
    accepted = _accepted(run, receiver)
    if run.judge == "upgrade":
        dialect = dialect_named(run.pair.dialect)
        return judge_upgrade(events, fi, receiver, accepted, run.completed, run.stopped, dialect)
    if run.judge == "injection":
        if accepted:
            v = accepted[0]
            return (
                "accepted",
                f"the {side} reported {v.rule.value} and took the bytes in: {v.message}",
            )
        if closed_by is not None:
            refused = [v for v in own if isinstance(v, Violation) and v.enforced]
            why = f" ({refused[0].rule.value}: {refused[0].message})" if refused else ""
            return "refused", f"the {side} closed the connection{why}"
        if alert_after(events, fi, receiver) is not None:  # answered nothing, ended its TLS
            return "refused", f"the {side} sent an alert and nothing else (its FIN came late)"
        return "timeout", f"the {side} neither answered nor closed within the bound"
    # truncation
    if receiver == S2C and run.stored_before is not None:
        after = run.stored_after
        if after is not None and after > run.stored_before:
            return "stored-truncated", f"stored messages went {run.stored_before} -> {after}"
    if receiver == C2S and run.verb_done_at is not None and run.verb_done_at > fi:
        return "unit-accepted", "the client's verb completed on the cut reply"
    reported = [v for v in own if isinstance(v, Violation) and v.rule is Rule.R6]
    clean = [e for e in own if isinstance(e, PeerEOF)]
    if not reported and clean:
        return "truncation-not-reported", f"the {side}'s TLS layer reported a clean end"
    if closed_by is not None:
        if reported:
            return "truncation-reported", f"the {side} reported R6: {reported[0].message}"
        if closed_by.kind == "rst-sent":
            return "reset", f"the {side}'s connection was reset; the cut unit was not taken"
        return "closed", f"the {side} closed the connection"
    return "timeout", f"the {side} did not close within the bound"


def _own_events(run: _PathRun, receiver: str) -> List[Event]:
    """What the receiver's own TLS layer reported since the fault was armed."""
    if receiver == S2C:
        return list(_events(run.server))[run.server_mark : run.server_upto]
    return list(_events(run.driver))[run.client_mark : run.client_upto]


def _accepted(run: _PathRun, receiver: str) -> List[Violation]:
    """Violations the receiver reported but let in (a relaxed rule)."""
    own = _own_events(run, receiver)
    return [v for v in own if isinstance(v, Violation) and not v.enforced]


async def _await_reaction(run: _PathRun, conn: ProxyConnection) -> None:
    """Wait (bounded) until the receiver of the fault did something decisive."""
    if run.fault is None:
        return
    fi = fault_index(conn.events)
    if fi is None:
        if run.stopped is not None:  # the client gave up: its own close is its act
            with contextlib.suppress(asyncio.TimeoutError, EventNotSeen):
                await conn.wait_for(_client_ended, timeout=run.settings.reply_timeout)
        return
    receiver = other(run.fault.direction)
    if _accepted(run, receiver):
        return  # its own report already decides; nothing to wait for
    events = conn.events

    def after_fault(e: ProxyEvent) -> bool:
        for i in range(len(events) - 1, fi, -1):
            if events[i] is e:
                return _decisive(run, events, fi, receiver, i)
        return False

    with contextlib.suppress(asyncio.TimeoutError, EventNotSeen):
        seen = await conn.wait_for(after_fault, timeout=run.settings.reply_timeout)
        run.reaction_at = next(i for i in range(len(events) - 1, fi, -1) if events[i] is seen)


def _client_ended(e: ProxyEvent) -> bool:
    return e.direction == "c2s" and e.kind in ("eof", "reset")


async def _execute(run: _PathRun) -> Tuple[str, str, List[Exchange]]:
    """Start the pieces, drive the session, decide; always clean up."""
    settings, pair = run.settings, run.pair
    try:
        server_keys: Optional[Path] = None
        logged = pair.start_logged_server is not None and pair.start_server is pair.logged_for
        if logged and pair.writes_keylog and run.keylog is not None:
            assert pair.start_logged_server is not None
            server_keys = run.keylog.with_name(run.keylog.name + ".server")
            starting = pair.start_logged_server(run.tls_version, settings, server_keys)
        else:
            starting = pair.start_server(run.tls_version, settings)
        run.server = await asyncio.wait_for(starting, settings.connect_timeout)
        keylog: Any = run.keylog if pair.writes_keylog else None
        if pair.proxy_keylog is not None and run.keylog is not None:
            keylog = pair.proxy_keylog(run.keylog)
        elif server_keys is not None and run.keylog is not None:
            keylog = merged_keylog(run.keylog, server_keys)
        armed_now = (run.fault,) if pair.own_session is not None and run.fault else ()
        if armed_now:  # armed before the program connects: count before it, too
            run.stored_before = await run.server.count()
        run.proxy = await Proxy.start(
            ("127.0.0.1", 0),
            run.server.address,
            pair.dialect,
            armed_now,
            keylog,
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.scenario_timeout,
        )
        host, port = run.proxy.address
        spec = ClientSpec(
            dialect=pair.dialect,
            host=host,
            port=port,
            tls_version=run.tls_version,
            tls_context=pair.client_context(run.tls_version, run.keylog),
            server_hostname=pair.server_hostname,
            timeout=settings.reply_timeout,
        )
        run.driver = pair.client(spec)
        try:
            await asyncio.wait_for(_session(run), settings.scenario_timeout)
        except asyncio.TimeoutError:
            run.note(f"the session exceeded its {settings.scenario_timeout:g} s bound")
        conn = run.connection()
        if conn is None:
            stopped = _stopped_text(run)
            return ("refused" if run.stopped else "timeout"), stopped, []
        await _await_reaction(run, conn)
        marker = len(conn.events)
        if run.reaction_at is not None:
            # Judge up to the reaction: the other peer's answer to it (say a
            # goodbye after the client dropped TLS) would make the verdict a race.
            marker = run.reaction_at + 1
        run.server_upto = len(_events(run.server))
        run.client_upto = len(_events(run.driver))
        await _close_client(run)
        with contextlib.suppress(asyncio.TimeoutError, RuntimeError):
            await conn.wait_closed(settings.reply_timeout)
        await run.server.settle(settings.reply_timeout)
        if run.fault is not None and run.fault.action == "rst":
            # The reset receiver's own report comes when it reads the RST;
            # nothing the harness does afterwards can reach that connection.
            run.server_upto = len(_events(run.server))
        if run.stored_before is not None:
            run.stored_after = await run.server.count()
        events = list(conn.events)
        if armed_now:
            run.armed = True
            if _stoptls_unseen(run, events[:marker]):
                why = "the client did not send STOPTLS: the pair does not return to plaintext"
                return "no-stoptls", why, exchanges(run.notes, events, marker)
        label, detail = _decide(run, events[:marker])
        return label, detail, exchanges(run.notes, events, marker)
    finally:
        await _cleanup(run)


class _NoReturn(Exception):
    """The pair's plain session never returned to plaintext."""


def _returned(events: Sequence[ProxyEvent]) -> bool:
    """Whether a session without faults returned to plaintext (STOPTLS)."""
    if any("stoptls-command" in e.points for e in events):
        return True
    closures = [i for i, e in enumerate(events) if "close-notify" in e.points]
    return bool(closures) and any(is_plaintext(e) for e in events[closures[0] + 1 :])


def _stoptls_unseen(run: _PathRun, events: Sequence[ProxyEvent]) -> bool:
    """A STOPTLS scenario whose client never sent STOPTLS (the pair has none).

    With the application data decrypted, the STOPTLS command is seen or it
    was not sent.  Without, a return to plaintext shows as plaintext after a
    closure, and a fault that fired on a closure is given the benefit.
    """
    if run.scenario is None or run.scenario.id not in STOPTLS_SCENARIOS:
        return False
    if any("stoptls-command" in e.points or "stoptls-reply" in e.points for e in events):
        return False
    decrypted = any(e.method == "keylog" and "application-data" in e.points for e in events)
    if not decrypted:
        if fault_index(events) is not None:
            return False
        closures = [i for i, e in enumerate(events) if "close-notify" in e.points]
        if closures and any(is_plaintext(e) for e in events[closures[0] + 1 :]):
            return False  # plaintext after a closure: a return to plaintext
    run.note("the proxy saw no STOPTLS from the client")
    return True


async def _close_client(run: _PathRun) -> None:
    """Close the client once (it stays around for its engine events)."""
    if run.driver is None or run.client_closed:
        return
    run.client_closed = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(run.driver.close(), run.settings.reply_timeout)


async def _cleanup(run: _PathRun) -> None:
    await _close_client(run)
    if run.proxy is not None:
        run.proxy.close()
        with contextlib.suppress(Exception):
            await run.proxy.wait_closed(run.settings.reply_timeout)
    if run.server is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(run.server.close(), run.settings.reply_timeout)


def merged_keylog(client: Path, server: Optional[Path]) -> SecretsProvider:
    """Secrets from the client's key log first, then the server's (re-read each call)."""

    def provider() -> SecretsMapping:
        out = dict(read_keylog(server)) if server is not None else {}
        out.update(read_keylog(client))
        return out

    return provider


def _keylog_path(
    directory: Path, name: str, pair: PathPair, tls_version: str, settings: RunSettings
) -> Path:
    """The run's key log: its own file, or the TLS version's shared one."""
    if pair.shares_keylog and settings.keylog_dir is None:
        return directory / f"{pair.dialect}-tls{tls_version}.keys"
    stem = name.replace("/", "_").replace(".", "_")
    return directory / f"{stem}-{pair.dialect}-tls{tls_version}-{time.monotonic_ns()}.keys"


async def run_path_scenario(
    scenario: Scenario,
    pair: PathPair,
    tls_version: str,
    settings: RunSettings = _DEFAULTS,
    *,
    keylog_dir: Optional[Path] = None,
) -> Result:
    """One path scenario x TLS version with ``pair``; never raises."""
    dialect = dialect_named(pair.dialect)
    start = time.monotonic()
    evidence = Evidence()
    with contextlib.ExitStack() as stack:
        directory = keylog_dir or settings.keylog_dir
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="path-")))
        directory.mkdir(parents=True, exist_ok=True)
        keylog = _keylog_path(directory, scenario.id, pair, tls_version, settings)
        if settings.keylog_dir is not None:
            evidence.keylog = str(keylog)
        steps = pair.own_session if pair.own_session is not None else scenario.steps
        run = _PathRun(steps, scenario, pair, tls_version, settings, keylog)
        label, detail = HARNESS_ERROR, ""
        try:
            run.fault, run.judge, run.arm_mode = scenario_fault(scenario, dialect)
            if scenario.id in STOPTLS_SCENARIOS and pair.returns.get(tls_version) is False:
                raise _NoReturn()
            label, detail, log = await _execute(run)
            evidence.exchanges.extend(log)
            if run.conn is not None and run.conn.events:  # the real bytes, for --capture
                evidence.start = time.monotonic() - run.conn.events[-1].time
                evidence.wires = proxy_legs(run.conn, evidence.start)
            if pair.keylog_source is not None:
                evidence.exchanges.append(
                    Exchange(0.0, "--", "note", b"", f"TLS secrets: {pair.keylog_source(keylog)}")
                )
        except _NoReturn:
            label = "no-stoptls"
            detail = "the client's plain session (the sanity run) never returned to plaintext"
        except Exception as exc:  # a harness bug must not take the run down
            label, detail = HARNESS_ERROR, harness_error(exc)
    if detail:
        evidence.exchanges.append(
            Exchange(
                evidence.exchanges[-1].t if evidence.exchanges else 0.0, "--", "note", b"", detail
            )
        )
    outcome = scenario.outcome(label)
    rule = scenario.rule.value
    summary = outcome.summary
    if label.startswith("violation:"):
        rule = label.split(":", 1)[1]
        summary = f"a peer broke {rule} on the wire: {detail}"
        if run.side is not None:
            summary = f"{run.side}: broke {rule} on the wire: {detail.split(': ', 1)[-1]}"
    side = run.side if outcome.verdict in (F, W) else None
    if side is not None and not summary.startswith(f"{side}:"):
        summary = f"{side}: {summary}"
    return PathResult(
        id=scenario.id,
        dialect=pair.dialect,
        tls_version=tls_version,
        verdict=outcome.verdict,
        rule=rule,
        summary=summary,
        evidence=evidence,
        duration=time.monotonic() - start,
        title=scenario.title,
        reference=scenario.reference,
        side=side,
    )


async def path_sanity(
    pair: PathPair, tls_version: str, settings: RunSettings, keylog_dir: Path
) -> Optional[str]:
    """None if the pair connects, upgrades and talks under TLS through the
    proxy (no fault); otherwise why not."""
    keylog = _keylog_path(keylog_dir, "sanity", pair, tls_version, settings)
    run = _PathRun(_SANITY_STEPS, None, pair, tls_version, settings, keylog)
    try:
        label, detail, _ = await _execute(run)
    except Exception as exc:
        return harness_error(exc)
    if pair.own_session is not None and run.conn is not None and tls_version not in pair.returns:
        pair.returns[tls_version] = _returned(list(run.conn.events))
    if label != "completed":
        return f"{label}: {detail}" if detail else label
    return None


async def run_path_target(
    scenarios: Sequence[Scenario],
    pair: PathPair,
    settings: RunSettings = _DEFAULTS,
    progress: Optional[Progress] = None,
    tls_versions: Optional[Sequence[str]] = None,
) -> List[Result]:
    """Every applicable path scenario x TLS version, bracketed by sanity runs."""
    versions = [v for v in (tls_versions or pair.tls_versions) if v in pair.tls_versions]
    with contextlib.ExitStack() as stack:
        directory = settings.keylog_dir
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="path-")))
        directory.mkdir(parents=True, exist_ok=True)
        keys = directory

        async def run_one(scenario: Scenario, version: str) -> Result:
            return await run_path_scenario(scenario, pair, version, settings, keylog_dir=keys)

        async def sanity(version: str) -> Optional[str]:
            return await path_sanity(pair, version, settings, keys)

        return await run_bracketed(
            scenarios,
            role="path",
            dialect=pair.dialect,
            versions=versions,
            settings=settings,
            run_one=run_one,
            sanity=sanity,
            progress=progress,
        )
