"""The harness as a scripted (faulty) server for a client under test.

Theory of operation
===================

Each scenario x TLS version is one run: a fake server on ``127.0.0.1:0``
(one connection; any other is refused), the client launched once against it
(:class:`~starttls_harness.run.targets.ClientTarget`, given the CA file of the
target run's throwaway certificate), the steps interpreted on that connection.

The server runs on :func:`starttls_harness.tls.aio.create_server` with a **strict**
engine: whatever the client sends is judged by every rule (a client that
pipelines plaintext after STARTTLS, speaks before our close_notify is
answered, or hangs up instead of answering shows up as an engine event).
Faults are *sent* around the rules: ``write_raw`` for plaintext inside TLS
and injected responses, ``corked`` writes for declared coalescing, and
direct engine operations (``start_tls``, ``unwrap``) where the fault is the
timing of a switch.

Everything the client does becomes an *act* in an inbox, in wire order: a
complete command (line, IMAP literals inline, an SMTP DATA body as one
unit), its close_notify, the handshake completing, or the connection ending
(how and why).  Steps (the verb table :data:`_CLIENT_STEPS`) read acts with
a bound, answer like a conforming server, apply the fault, and end the run
with an *observation* label (:class:`starttls_harness.run.outcomes.Observed`) that the
scenario turns into a verdict.  Decisions come from events -- the client's
next command, its close_notify, its close, its exit status -- never from
silence: a wait that runs out is ``timeout`` and therefore an ``error``.

Sanity probes bracket every target x TLS version: the client must complete
a normal STARTTLS session against the conforming fake server before and
after the scenarios, or every result of that group is an ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import tempfile
import time
from dataclasses import dataclass
from typing import (
    Awaitable,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

from starttls_harness.dialects import dialect_named
from starttls_harness.dialects.roles import Command, ScriptedServer
from starttls_harness.report.verdicts import Evidence, Result, Verdict
from starttls_harness.run.client_ccc import (
    accept_server_first,
    step_ccc_close_notify,
    step_ccc_plaintext,
)
from starttls_harness.run.client_removal import step_server_removal as server_removal
from starttls_harness.run.client_support import (
    DEFAULT_SETTINGS,
    ClientSettings,
    call_client,
    close_notify_bound,
    output_tail,
    stop_client,
)
from starttls_harness.run.interpreter import interpret, unknown_actions
from starttls_harness.run.outcomes import (
    HARNESS_ERROR,
    TIMEOUT,
    Observed,
    RemoteEnded,
    harness_error,
    violation,
)
from starttls_harness.run.scripted import (
    Act,
    Gone,
    Refuser,
    ScriptedConnection,
    ScriptTimeout,
)
from starttls_harness.run.server import Progress, RunSettings, run_bracketed
from starttls_harness.run.targets import (
    ClientOutcome,
    ClientTarget,
)
from starttls_harness.scenarios.client import CLIENT_COMMON, CLIENT_SANITY
from starttls_harness.scenarios.model import Scenario, Step
from starttls_harness.tls.aio import Timeouts, create_server
from starttls_harness.tls.certs import Pki, make_pki
from starttls_harness.tls.engine import (
    Policy,
    Rule,
)

__all__ = [
    "SENSITIVE",
    "ClientSettings",
    "Command",
    "run_client_scenario",
    "run_client_target",
    "sanity_probe",
    "unknown_client_steps",
]

#: Command kinds a client that requires TLS must never send before TLS (R9).
SENSITIVE = frozenset(
    {"auth", "mail", "rcpt", "data", "bdat", "message", "append", "select", "access"}
)


# ------------------------------------------------------------ the run state


@dataclass
class _Run:
    scenario: Scenario
    target: ClientTarget
    dialect: ScriptedServer
    conn: ScriptedConnection
    evidence: Evidence
    settings: RunSettings
    server_ctx: ssl.SSLContext
    client: asyncio.Future[ClientOutcome]
    #: STOPTLS cycles the client was asked for (1 unless the target accepts more).
    cycles_asked: int = 1
    fault_applied: bool = False
    pending: Optional[Command] = None
    offer_starttls: bool = True
    starttls_marked_required: bool = True
    offer_stoptls: bool = False
    #: STOPTLS closures completed on this connection.
    stoptls_done: int = 0
    #: When our close_notify left (R5 timing).
    close_notify_sent: float = 0.0
    #: Appended to the verdict's summary (a measured time, say).
    summary_suffix: str = ""

    @property
    def ever_tls(self) -> bool:
        return self.conn.tls_sessions > 0

    @property
    def tls(self) -> bool:
        return self.conn.t().tls_active

    async def next_act(self) -> Act:
        return await self.conn.next_act(self.settings.reply_timeout)

    async def next_command(self) -> Command:
        """The next command; the connection ending raises :class:`Gone`."""
        act = await self.next_act()
        if act.kind == "command" and act.command is not None:
            return act.command
        if act.kind == "handshake":
            return await self.next_command()
        if act.kind == "close_notify":
            raise Gone(Act("gone", how="close_notify", detail="the client sent close_notify"))
        raise Gone(act)

    async def outcome(self) -> Optional[ClientOutcome]:
        """The client's reported outcome, waited for with a bound (None: none)."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.client), self.settings.reply_timeout)
        except asyncio.TimeoutError:
            return None


# ---------------------------------------------------- conforming answers


async def _answer(run: _Run, cmd: Command) -> str:
    """Answer ``cmd`` as a conforming server; return "ended" after QUIT/LOGOUT.

    STARTTLS and STOPTLS are carried out (when offered), AUTH continuations
    and DATA bodies are read; the caller has already decided that ``cmd`` is
    not where the scenario's fault goes.
    """
    conn, dialect = run.conn, run.dialect
    kind = cmd.kind
    if kind == "hello":
        tls, starttls, stoptls = run.tls, run.offer_starttls, run.offer_stoptls
        hello = dialect.hello(cmd, tls=tls, starttls=starttls, stoptls=stoptls)
        conn.send(hello if run.starttls_marked_required else dialect.unmarked(hello))
    elif kind == "starttls":
        if run.tls or not run.offer_starttls:
            conn.send(dialect.not_offered(cmd))
        else:
            _switch_to_tls(run, cmd)
            await _await_handshake(run)
    elif kind == "stoptls" and not cmd.raw:
        run.stoptls_done += 1  # a bare closure (LDAP): the engine answered it at once
    elif kind == "stoptls":
        if not run.tls or not run.offer_stoptls:
            conn.send(dialect.not_offered(cmd))
        else:
            await _accept_stoptls(run, cmd)
    elif kind == "auth":
        ok = True
        for prompt in dialect.auth_prompts(cmd):
            conn.send(prompt)
            response = await run.next_command()
            if response.raw.strip() == b"*":
                ok = False
                break
        conn.send(dialect.auth_done(cmd, ok))
    elif dialect.body_prompt(cmd) is not None:
        await _open_body(run, cmd)
        body = await run.next_command()
        conn.send(dialect.stored(body))
    elif kind == "append":
        conn.send(dialect.stored(cmd))
    elif kind == "quit":
        conn.send(dialect.goodbye(cmd))
        conn.close()
        return "ended"
    else:
        conn.send(dialect.simple(cmd))
    return "answered"


async def _open_body(run: _Run, cmd: Command) -> None:
    """Invite the message body ``cmd`` announces; the next act is the whole body."""
    prompt = run.dialect.body_prompt(cmd)
    assert prompt is not None
    run.conn.body_mode = True
    run.conn.send(prompt)


def _switch_to_tls(run: _Run, cmd: Command, inject: bytes = b"", before: bool = False) -> None:
    """Answer STARTTLS and switch in one write (with ``inject`` glued on,
    behind the answer or, with ``before``, ahead of it)."""
    conn = run.conn
    t = conn.t()
    with t.corked():
        if inject and before:
            conn.inject(inject, "plaintext responses ahead of the STARTTLS answer (same segment)")
        conn.send(run.dialect.starttls_ok(cmd))
        if inject and not before:
            conn.inject(inject, "plaintext response after the STARTTLS answer (same segment)")
        events = t.engine.start_tls(run.server_ctx, server_side=True)
    conn.handle(events)


async def _await_handshake(run: _Run) -> None:
    while True:
        act = await run.next_act()
        if act.kind == "handshake":
            return
        if act.kind == "gone":
            raise Gone(act)
        if act.kind == "command" and act.command is not None:
            # Cannot happen on a strict engine; kept for a clear error.
            raise Observed("unexpected-reply", f"command before the handshake: {act.command.text}")


async def _accept_stoptls(run: _Run, cmd: Command) -> None:
    """The conforming STOPTLS closure, then the plaintext greeting (R3-R5)."""
    if not cmd.raw:
        run.stoptls_done += 1  # a bare closure (LDAP): the engine answered it at once
        return
    conn = run.conn
    t = conn.t()
    if dialect_named(run.target.dialect).server_may_close_first:
        await accept_server_first(run, cmd)  # FTP CCC: our close_notify goes first
        run.stoptls_done += 1
        return  # the client speaks first in plaintext
    answer = run.dialect.stoptls_ok(cmd)
    conn.evidence.add("s2c", "tls", answer)
    conn.in_closure = True
    try:
        await t.accept_unwrap(preface=answer, timeout=run.settings.reply_timeout)
    except asyncio.TimeoutError:
        raise ScriptTimeout("the client did not send its close_notify after STOPTLS") from None
    except (ConnectionError, RuntimeError) as exc:
        raise Gone(conn.gone or Act("gone", how="reset", detail=str(exc))) from None
    run.stoptls_done += 1
    conn.send(run.dialect.greeting())


# ------------------------------------------------------------------ steps


async def step_greet(run: _Run, args: Mapping[str, object]) -> None:
    """Wait for the client to connect (or exit), then greet it."""
    conn = run.conn
    await asyncio.wait(
        [conn.connected, run.client],
        timeout=run.settings.connect_timeout,
        return_when=asyncio.FIRST_COMPLETED,
    )
    if not conn.connected.done():
        if run.client.done():
            outcome = run.client.result()
            raise Observed("client-did-not-connect", f"client ended first: {outcome.detail}")
        raise Observed(
            "client-did-not-connect",
            f"no connection within {run.settings.connect_timeout:g} s",
        )
    if args.get("preauth"):
        greeting = run.dialect.preauth_greeting()
        if greeting is None:
            raise RuntimeError("the scripted server has no pre-authenticated greeting")
        conn.send(greeting)
        return
    conn.send(run.dialect.greeting())


def _matches(until: str, cmd: Command) -> bool:
    if until == "starttls":
        return cmd.kind == "starttls" and not cmd.tls
    if until == "stoptls":
        return cmd.kind == "stoptls" and cmd.tls
    if until == "tls-first":
        return cmd.tls
    if until == "tls-after-hello":
        return cmd.tls and cmd.kind != "hello"
    if until == "message":
        return cmd.kind in ("message", "append")
    return False


async def step_serve(run: _Run, args: Mapping[str, object]) -> None:
    """Answer as a conforming server until the command named by ``until``.

    That command is left unanswered in ``run.pending`` for the next step.
    ``until="end"`` serves the whole session and decides from its end (the
    client's outcome, and with ``cycles`` the STOPTLS cycles it made).
    If the session ends first, ``otherwise`` is the observation.
    """
    until = str(args.get("until", "end"))
    run.offer_starttls = bool(args.get("starttls", True))
    run.starttls_marked_required = bool(args.get("required", True))
    run.offer_stoptls = bool(args.get("stoptls", False))
    run.conn.offer_removal(run.offer_stoptls)
    for _ in range(200):  # a bound on commands, as on everything else
        try:
            cmd = await run.next_command()
        except Gone:
            await _session_over(run, args)
            raise
        except ScriptTimeout:
            await _stalled(run, until)
            raise
        if not run.ever_tls and not cmd.tls and cmd.kind in SENSITIVE:
            raise Observed("sent-in-plaintext", f"{cmd.text!r} sent before any TLS")
        if _matches(until, cmd):
            run.pending = cmd
            return
        if until == "message" and run.dialect.body_prompt(cmd) is not None:
            await _open_body(run, cmd)
            run.pending = await run.next_command()
            return
        try:
            answered = await _answer(run, cmd)
        except ScriptTimeout:
            await _stalled(run, until)
            raise
        except Gone:  # in the middle of an answer (an AUTH exchange, a DATA body)
            if cmd.kind != "stoptls":  # not a cycle it never tried (FTP: gone at CCC)
                await _session_over(run, args)
            raise
        if answered == "ended":
            await _session_over(run, args)
            raise Gone(Act("gone", how="quit", detail="the client ended the session"))
    raise Observed("unexpected-reply", "the client sent too many commands")


async def _stalled(run: _Run, until: str) -> None:
    """Quiet after a fault while the whole session was served: a client out of
    step (it took an injected reply for ours) may wait for an answer it already
    took while we wait for its DATA body.  Its own failure report decides."""
    if until != "end" or not run.fault_applied:
        return
    outcome = await run.outcome()
    if outcome is not None and not outcome.ok:
        raise Observed("client-failed", f"the client stalled and reported: {outcome.detail}")


async def _session_over(run: _Run, args: Mapping[str, object]) -> None:
    """The session ended during ``serve``: decide, or let the caller raise."""
    until = str(args.get("until", "end"))
    otherwise = args.get("otherwise")
    gone = run.conn.gone
    if gone is not None and gone.how == "violation":
        raise Gone(gone)
    if until != "end":
        if otherwise:
            raise Observed(str(otherwise), f"the session ended before {until}")
        return
    outcome = await run.outcome()
    if outcome is None:
        raise Observed("timeout", "the client did not finish after its session ended")
    required = int(str(args.get("cycles", 0)))
    if required:
        if run.stoptls_done == 0:
            raise Observed("no-stoptls", "the client made no STOPTLS cycle")
        wanted = min(required, run.cycles_asked) if run.target.accepts_cycles else 1
        if run.stoptls_done < wanted:
            raise Observed(
                "too-few-cycles", f"{run.stoptls_done} STOPTLS cycle(s), {wanted} asked for"
            )
    if not outcome.ok:
        raise Observed("client-failed", f"the client reported failure: {outcome.detail}")
    raise Observed("completed", f"session completed ({run.stoptls_done} STOPTLS cycle(s))")


def _take_pending(run: _Run, missing: str, kind: Optional[str] = None) -> Command:
    """The command waiting for an answer (of ``kind``, if given), now taken."""
    cmd = run.pending
    if cmd is None or (kind is not None and cmd.kind != kind):
        raise Observed("unexpected-reply", missing)
    run.pending = None
    return cmd


async def step_accept_starttls(run: _Run, args: Mapping[str, object]) -> None:
    """Accept the pending STARTTLS, optionally injecting a plaintext response.

    ``inject="same"``: the injected response leaves in the same TCP segment
    as the STARTTLS answer.  ``inject="after-hello"``: the server waits for
    the ClientHello and writes the injected response before its ServerHello,
    in a segment of its own -- so the client has certainly read the answer
    alone and started its handshake when the plaintext arrives.
    ``inject="partial"``: a response cut before its line end, left to be
    glued in front of the first reply under TLS.  ``inject="multi"``:
    several injected responses in the same segment.  Any other shape is the
    dialect's (:meth:`ScriptedServer.shaped_injection`), in the same segment,
    ahead of the answer with ``before_answer``; a shape the dialect cannot
    make for this client (no tag to predict) is ``shape-not-applicable``.
    """
    cmd = _take_pending(run, "no STARTTLS to accept", "starttls")
    inject = str(args.get("inject", ""))
    payloads = {
        "": lambda c: b"",
        "same": run.dialect.injection,
        "after-hello": run.dialect.injection,
        "partial": run.dialect.partial_injection,
        "multi": run.dialect.multi_injection,
    }
    if inject in payloads:
        payload = payloads[inject](cmd)
    else:
        shaped = run.dialect.shaped_injection(inject, cmd)
        if shaped is None:
            run.conn.send(run.dialect.starttls_refused(cmd))
            raise Observed("shape-not-applicable", f"no {inject!r} injection after {cmd.text!r}")
        payload = shaped
    if inject == "after-hello":
        await _switch_after_client_hello(run, cmd, payload)
    else:
        _switch_to_tls(run, cmd, payload, before=bool(args.get("before_answer")))


async def _switch_after_client_hello(run: _Run, cmd: Command, payload: bytes) -> None:
    conn = run.conn
    t = conn.t()
    t.release_held()  # nothing is held: the client waits for our answer
    t.hold_after(None)
    conn.raw_mode = True
    conn.send(run.dialect.starttls_ok(cmd))
    try:
        hello = await conn.raw_record(run.settings.reply_timeout)
    finally:
        conn.raw_mode = False
    conn.raw.clear()
    if not hello.startswith(b"\x16"):
        conn.evidence.add("c2s", "plaintext", hello, "plaintext instead of a ClientHello")
        conn.abort()
        raise Gone(
            Act("gone", how="violation", rule=Rule.R1, detail="plaintext after the STARTTLS answer")
        )
    conn.evidence.add("c2s", "tls-wire", hello, "ClientHello (raw record)")
    # The injected bytes and the ServerHello flight leave in one segment: a
    # client reads them together whatever its timing (a declared segmentation).
    with t.corked():
        conn.inject(payload, "plaintext response after the ClientHello, before the ServerHello")
        events = t.engine.start_tls(run.server_ctx, server_side=True)
        events += t.engine.receive_data(hello)
    conn.handle(events)
    t.hold_after(conn._is_starttls_line, framer=conn.gate_framer)


async def step_refuse_starttls(run: _Run, args: Mapping[str, object]) -> None:
    cmd = _take_pending(run, "no STARTTLS to refuse", "starttls")
    bad = str(args.get("how", "")) == "bad"
    run.conn.send(run.dialect.starttls_bad(cmd) if bad else run.dialect.starttls_refused(cmd))
    run.conn.t().release_held()


async def step_handshake(run: _Run, args: Mapping[str, object]) -> None:
    """Wait for the handshake; after a fault, a client that ends it refused."""
    try:
        await _await_handshake(run)
    except Gone as gone:
        if gone.act.how == "violation":
            raise
        if run.fault_applied:
            raise Observed("aborted", f"the client ended the upgrade: {gone.act.detail}") from None
        if gone.act.how in ("handshake-failed", "alert"):
            raise Observed("handshake-failed", gone.act.detail) from None
        raise


async def step_watch_plaintext(run: _Run, args: Mapping[str, object]) -> None:
    """No TLS to be had: sensitive commands fail (R9), giving up passes."""
    run.offer_starttls = bool(args.get("starttls", False))
    run.offer_stoptls = False
    for _ in range(50):
        try:
            cmd = await run.next_command()
        except Gone as gone:
            if gone.act.how == "violation":
                raise
            if gone.act.how == "tls-hello":
                raise Observed("gave-up", f"{gone.act.detail}; nothing sent in plaintext") from None
            raise Observed("gave-up", f"closed the connection: {gone.act.detail}") from None
        if cmd.kind in SENSITIVE:
            raise Observed("sent-in-plaintext", f"{cmd.text!r} sent without TLS")
        if cmd.kind == "quit":
            await _answer(run, cmd)
            raise Observed("gave-up", "ended the session without TLS")
        if cmd.kind == "starttls":
            refusal = run.dialect.starttls_refused(cmd) if run.offer_starttls else None
            run.conn.send(refusal or run.dialect.not_offered(cmd))
            run.conn.t().release_held()
            continue
        await _answer(run, cmd)
    raise Observed("unexpected-reply", "the client sent too many commands")


async def step_judge_injection(run: _Run, args: Mapping[str, object]) -> None:
    """After an injected response: did the client act on it?

    How a client shows it is the dialect's ``injection_effect`` (see
    :class:`~starttls_harness.dialects.roles.ScriptedServer`); an effect the
    run layer does not know is a harness error, never judged as another.
    """
    effect = run.dialect.injection_effect
    judge = _INJECTION_JUDGES.get(effect)
    if judge is None:
        raise RuntimeError(f"unknown injection effect {effect!r} of the scripted server")
    await judge(run)


async def _judge_answer_taken(run: _Run) -> None:
    """The injected reply was taken as the answer to the first command under TLS.

    A client that read it gives up right after that command (goodbye, close,
    one of the dialect's ``retreat_verbs`` or the same command again).
    """
    try:
        first = await run.next_command()
    except Gone as gone:
        if gone.act.how == "violation":
            raise
        if run.dialect.close_before_first_is_refusal:
            detail = f"closed before its first command: {gone.act.detail}"
            raise Observed("aborted", detail) from None
        raise Observed("injection-consumed", "closed right after the handshake") from None
    await _answer(run, first)
    try:
        second = await run.next_command()
    except Gone as gone:
        if gone.act.how == "violation":
            raise
        raise Observed(
            "injection-consumed", f"gave up after {first.verb}: {gone.act.detail}"
        ) from None
    retreat = run.dialect.retreat_verbs
    if second.kind == "quit" or second.verb == first.verb or second.verb in retreat:
        raise Observed("injection-consumed", f"{first.verb} then {second.verb}")
    raise Observed("completed", f"{first.verb} then {second.verb}: carried on under TLS")


async def _judge_capabilities_believed(run: _Run) -> None:
    """The injected capabilities forbid the login; a client that believed them never logs in."""
    for _ in range(20):
        try:
            cmd = await run.next_command()
        except Gone as gone:
            if gone.act.how == "violation":
                raise
            raise Observed("injection-consumed", f"no LOGIN: {gone.act.detail}") from None
        if cmd.kind == "auth":
            raise Observed("completed", f"{cmd.verb} sent under TLS")
        if cmd.kind == "quit":
            raise Observed("injection-consumed", "logged out without LOGIN")
        await _answer(run, cmd)
    raise Observed("unexpected-reply", "the client sent too many commands")


_INJECTION_JUDGES: Dict[str, Callable[[_Run], Awaitable[None]]] = {
    "answer-taken": _judge_answer_taken,
    "capabilities-believed": _judge_capabilities_believed,
}


async def step_raw_reply(run: _Run, args: Mapping[str, object]) -> None:
    """Answer the pending command with its normal reply written raw (R2)."""
    cmd = _take_pending(run, "no command to answer")
    if cmd.kind == "hello":
        reply = run.dialect.hello(cmd, tls=True, starttls=False, stoptls=run.offer_stoptls)
    elif cmd.kind == "auth" and not run.dialect.auth_prompts(cmd):
        reply = run.dialect.auth_done(cmd, True)
    elif cmd.kind in ("append", "message"):
        reply = run.dialect.stored(cmd)
    else:
        reply = run.dialect.simple(cmd)
    run.conn.inject(reply, "plaintext reply written while TLS is up")


async def step_expect_abort(run: _Run, args: Mapping[str, object]) -> None:
    """After plaintext inside TLS: any further command means it was accepted."""
    act = await run.next_act()
    if act.kind == "command" and act.command is not None:
        raise Observed("plaintext-accepted", f"then sent {act.command.text!r}")
    if act.kind == "gone" and act.how == "violation":
        raise Gone(act)
    raise Observed("refused", f"ended the connection ({act.detail or act.kind})")


async def step_truncate_reply(run: _Run, args: Mapping[str, object]) -> None:
    """Half of the answer to the pending message, then FIN without close_notify."""
    cmd = _take_pending(run, "no message to answer")
    reply = run.dialect.stored(cmd)
    conn = run.conn
    conn.send(reply[: max(4, len(reply) // 2)])
    conn.evidence.add("s2c", "eof", note="TCP FIN without close_notify (truncation)")
    conn.fin_sent = True
    conn.t().truncate()


async def step_client_outcome(run: _Run, args: Mapping[str, object]) -> None:
    """Decide from what the client reported (R6: it must report the cut)."""
    outcome = await run.outcome()
    if outcome is None:
        raise Observed("timeout", "the client did not finish after the truncation")
    if outcome.ok:
        raise Observed("accepted", f"the client reported success: {outcome.detail}")
    raise Observed("reported", f"the client reported failure: {outcome.detail}")


async def step_close_notify(run: _Run, args: Mapping[str, object]) -> None:
    """Instead of answering the pending command, send close_notify (R5)."""
    _take_pending(run, "no command to answer")
    run.conn.t().send_close_notify()
    run.close_notify_sent = time.monotonic()


async def step_expect_close_notify(run: _Run, args: Mapping[str, object]) -> None:
    """R5: the client's close_notify, within :attr:`ClientSettings.close_notify_bound`."""
    act = await run.next_act()
    if act.kind == "close_notify":
        took = time.monotonic() - run.close_notify_sent
        bound = close_notify_bound(run.settings)
        if took > bound:
            run.summary_suffix = f" after {took:.2f} s (bound {bound:g} s)"
            raise Observed("answered-late", f"close_notify answered after {took:.3f} s")
        raise Observed("answered", f"the client answered with its close_notify in {took:.3f} s")
    if act.kind == "command" and act.command is not None:
        raise Observed("spoke-first", f"sent {act.command.text!r} instead of close_notify")
    if act.kind == "gone" and act.how == "violation":
        raise Gone(act)
    raise Observed("unanswered", f"no close_notify: {act.detail or act.how}")


async def step_one_sided_stoptls(run: _Run, args: Mapping[str, object]) -> None:
    """Answer STOPTLS, close_notify and the plaintext greeting in one segment (R4)."""
    cmd = _take_pending(run, "no STOPTLS to answer", "stoptls")
    conn = run.conn
    t = conn.t()
    conn.in_closure = True
    with t.corked():
        conn.send(run.dialect.stoptls_ok(cmd))
        conn.handle(t.engine.unwrap())
        conn.inject(run.dialect.greeting(), "plaintext greeting before the client's close_notify")


async def step_expect_no_resume(run: _Run, args: Mapping[str, object]) -> None:
    """After a one-sided closure: plaintext from the client means it resumed."""
    for _ in range(5):
        act = await run.next_act()
        if act.kind == "command" and act.command is not None:
            if not act.command.tls:
                raise Observed("resumed", f"answered the early greeting: {act.command.text!r}")
            raise Observed("ignored-closure", f"still sent {act.command.text!r} under TLS")
        if act.kind == "gone":
            if act.how == "violation":
                raise Gone(act)
            raise Observed("refused", f"ended the connection ({act.detail or act.how})")
    raise Observed("unexpected-reply", "no decisive act")


async def step_accept_stoptls(run: _Run, args: Mapping[str, object]) -> None:
    cmd = _take_pending(run, "no STOPTLS to accept", "stoptls")
    await _accept_stoptls(run, cmd)


async def step_server_removal(run: _Run, args: Mapping[str, object]) -> None:
    await server_removal(run, args, _answer, SENSITIVE)  # see run/client_removal.py


async def step_expect_hello(run: _Run, args: Mapping[str, object]) -> None:
    """R8: the first command after a transition must be EHLO/CAPABILITY (a NOOP carries
    no state: answered, the next command decides; sieve-connect resyncs with one)."""
    after = str(args.get("after", "starttls"))
    if "stoptls" in args:
        run.offer_stoptls = bool(args["stoptls"])
    for _ in range(5):
        try:
            cmd = await run.next_command()
        except Gone as gone:
            if gone.act.how == "violation":
                raise
            raise Observed("closed-before-check", gone.act.detail) from None
        if cmd.kind != "noop":
            break
        await _answer(run, cmd)
    if cmd.kind == "hello":
        await _answer(run, cmd)
        return
    if cmd.kind == "quit":
        await _answer(run, cmd)
        raise Observed("closed-before-check", f"{cmd.verb} right after {after}")
    raise Observed("state-kept", f"first command after {after} was {cmd.text!r}")


StepFunc = Callable[[_Run, Mapping[str, object]], Awaitable[None]]

#: The verb table: every step action a client-role scenario may name.
_CLIENT_STEPS: Dict[str, StepFunc] = {
    "greet": step_greet,
    "serve": step_serve,
    "accept-starttls": step_accept_starttls,
    "refuse-starttls": step_refuse_starttls,
    "handshake": step_handshake,
    "watch-plaintext": step_watch_plaintext,
    "judge-injection": step_judge_injection,
    "raw-reply": step_raw_reply,
    "expect-abort": step_expect_abort,
    "truncate-reply": step_truncate_reply,
    "client-outcome": step_client_outcome,
    "close-notify": step_close_notify,
    "expect-close-notify": step_expect_close_notify,
    "one-sided-stoptls": step_one_sided_stoptls,
    "expect-no-resume": step_expect_no_resume,
    "accept-stoptls": step_accept_stoptls,
    "expect-hello": step_expect_hello,
    "server-removal": step_server_removal,
    "ccc-close-notify": step_ccc_close_notify,
    "ccc-plaintext": step_ccc_plaintext,
}

CLIENT_STEP_NAMES = frozenset(_CLIENT_STEPS)


def unknown_client_steps(scenarios: Sequence[Scenario]) -> List[Tuple[str, str]]:
    """(scenario id, action) pairs the client verb table does not know (a test)."""
    return unknown_actions(scenarios, "client", _CLIENT_STEPS)


# ------------------------------------------------------------- one scenario


def _gone(run: _Run, step: Step, gone: RemoteEnded) -> str:
    """The client ended the connection."""
    if gone.how == "violation" and gone.rule is not None:
        return violation(gone.rule)
    return "closed" if run.fault_applied else "closed-before-fault"


async def _interpret(run: _Run) -> str:
    return await interpret(run, _CLIENT_STEPS, run.scenario.steps, run.evidence.note, ended=_gone)


def _requested_cycles(scenario: Scenario) -> int:
    counts = [int(str(s.args.get("cycles", 1))) for s in scenario.steps]
    return max(counts, default=1)


async def run_client_scenario(
    scenario: Scenario,
    target: ClientTarget,
    tls_version: str,
    settings: RunSettings = DEFAULT_SETTINGS,
    *,
    pki: Optional[Pki] = None,
) -> Result:
    """One scenario x TLS version against a client; never raises.

    ``pki`` (on disk): the fake server's certificate, else one of its own.
    """
    evidence = Evidence()
    start = time.monotonic()
    label = HARNESS_ERROR
    dialect = dialect_named(target.dialect)
    asked = _requested_cycles(scenario)
    client_target = target.asking_for_cycles(asked) if asked > 1 else target
    server: Optional[asyncio.AbstractServer] = None
    conn: Optional[ScriptedConnection] = None
    client: Optional[asyncio.Future[ClientOutcome]] = None
    outcome: Optional[ClientOutcome] = None
    suffix = ""
    with contextlib.ExitStack() as stack:
        try:
            if pki is None:
                tmp = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="starttls-harness-client-")
                )
                pki = make_pki(directory=tmp)
            assert pki.cafile is not None
            keylog = None
            if settings.keylog_dir is not None:
                settings.keylog_dir.mkdir(parents=True, exist_ok=True)
                keylog = (
                    settings.keylog_dir / f"{scenario.id}-{target.dialect}-tls{tls_version}.keys"
                )
                evidence.keylog = str(keylog)
            server_ctx = pki.server_context(tls_version, keylog=keylog)
            conn = ScriptedConnection(dialect, evidence)
            accepted: List[bool] = []

            def factory() -> asyncio.Protocol:
                if accepted:
                    return Refuser(evidence)
                accepted.append(True)
                assert conn is not None
                return conn

            timeouts = Timeouts(
                handshake=settings.reply_timeout,
                closure=settings.reply_timeout,
                connect=settings.connect_timeout,
            )
            server = await create_server(
                factory, "127.0.0.1", 0, policy=Policy.strict(), timeouts=timeouts
            )
            port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
            evidence.note(
                f"fake {target.dialect} server on 127.0.0.1:{port}; client: {target.label}"
            )
            client = asyncio.ensure_future(
                call_client(client_target, "127.0.0.1", port, pki.cafile, tls_version)
            )
            run = _Run(
                scenario,
                client_target,
                conn.dialect,
                conn,
                evidence,
                settings,
                server_ctx,
                client,
                cycles_asked=asked if client_target.accepts_cycles else 1,
            )
            try:
                label = await asyncio.wait_for(_interpret(run), settings.scenario_timeout)
                suffix = run.summary_suffix
            except asyncio.TimeoutError:
                label = TIMEOUT
                evidence.note(f"scenario exceeded its {settings.scenario_timeout:g} s bound")
        except Exception as exc:  # a harness bug must not take the run down
            label = HARNESS_ERROR
            evidence.note(harness_error(exc))
        finally:
            if conn is not None:
                conn.abort()
            if server is not None:
                server.close()
            if client is not None:
                outcome = await stop_client(client, settings.reply_timeout)
            if server is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), settings.reply_timeout)
    if outcome is not None:
        evidence.note(f"client outcome: {'success' if outcome.ok else 'failure'}: {outcome.detail}")
        for name, output in (("stdout", outcome.stdout), ("stderr", outcome.stderr)):
            if output and output.strip():
                evidence.add("--", "note", output_tail(output), f"client {name} (tail)")
    expect = scenario.outcome(label)
    return Result(
        id=scenario.id,
        dialect=target.dialect,
        tls_version=tls_version,
        verdict=expect.verdict,
        rule=scenario.rule.value,
        summary=expect.summary + suffix,
        evidence=evidence,
        duration=time.monotonic() - start,
        title=scenario.title,
        reference=scenario.reference,
    )


# ------------------------------------------------------------ many scenarios


def _probe_problem(result: Result) -> str:
    """Why the sanity probe failed, in one line (the client's own words included)."""
    notes = [e.note for e in result.evidence.exchanges if e.kind == "note" and not e.data]
    said = [n for n in notes if n.startswith("client outcome:")]
    if result.summary == CLIENT_COMMON["client-did-not-connect"].summary:
        why = "the client never connected to the fake server"
        return f"{why} ({said[-1]})" if said else why
    return "; ".join(notes[-2:]) if notes else result.summary


async def sanity_probe(
    target: ClientTarget, tls_version: str, settings: RunSettings
) -> Optional[str]:
    """None if the client completes a normal STARTTLS session; otherwise why not."""
    result = await sanity_result(target, tls_version, settings)
    return None if result.verdict is Verdict.PASS else _probe_problem(result)


async def sanity_result(
    target: ClientTarget, tls_version: str, settings: RunSettings, *, pki: Optional[Pki] = None
) -> Result:
    """The sanity probe as a result, with its evidence."""
    return await run_client_scenario(CLIENT_SANITY, target, tls_version, settings, pki=pki)


async def run_client_target(
    scenarios: Sequence[Scenario],
    target: ClientTarget,
    settings: RunSettings = DEFAULT_SETTINGS,
    progress: Optional[Progress] = None,
    tls_versions: Optional[Sequence[str]] = None,
) -> List[Result]:
    """Every applicable client scenario x TLS version, bracketed by sanity probes.

    A failed probe's evidence (the ladder, the client's own words) is given
    to the results it turned into errors.  A client that never connected is
    not launched again for the next TLS version: one bounded wait, one cause.
    """
    versions = [v for v in (tls_versions or target.tls_versions) if v in target.tls_versions]
    probes: Dict[str, Result] = {}
    never_connected: List[str] = []
    # One throwaway certificate for the whole target run, not one per run.
    stack = contextlib.ExitStack()
    pki = make_pki(directory=stack.enter_context(tempfile.TemporaryDirectory(prefix="sth-")))

    async def run_one(scenario: Scenario, version: str) -> Result:
        return await run_client_scenario(scenario, target, version, settings, pki=pki)

    async def sanity(version: str) -> Optional[str]:
        if never_connected:
            return never_connected[0]
        result = await sanity_result(target, version, settings, pki=pki)
        if result.verdict is Verdict.PASS:
            return None
        probes[version] = result
        problem = _probe_problem(result)
        if result.summary == CLIENT_COMMON["client-did-not-connect"].summary:
            never_connected.append(problem)
            probes["*"] = result
        return problem

    with stack:
        results = await run_bracketed(
            scenarios,
            role="client",
            dialect=target.dialect,
            versions=versions,
            settings=settings,
            run_one=run_one,
            sanity=sanity,
            progress=progress,
        )
    for r in results:
        if r.summary.startswith("sanity probe failed") and not r.evidence.exchanges:
            probe = probes.get(r.tls_version) or probes.get("*")
            if probe is not None:
                r.evidence = probe.evidence
    return results
