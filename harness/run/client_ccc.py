"""The scripted server's side of a return to plaintext the server may close first (FTP CCC).

RFC 4217 §5 leaves open who sends the first close_notify after ``CCC``'s
``200``; a conforming FTP server (ProFTPD) sends its own right behind the
answer.  For dialects with ``server_may_close_first`` the scripted server
does the same: the answer and its close_notify leave in one segment, so a
client that answers it (R5) and one that started the closure itself (the
alerts cross) both work, and what the client does next is decided from its
acts.  The steps here are the client-role verbs of the CCC scenarios
(:mod:`starttls_harness.scenarios.ccc`); :mod:`.client` holds the rest.
"""

from __future__ import annotations

import time
from typing import Mapping, Optional, Protocol

from starttls_harness.dialects.roles import Command, ScriptedServer
from starttls_harness.run.outcomes import Observed
from starttls_harness.run.scripted import Act, Gone, ScriptedConnection, ScriptTimeout
from starttls_harness.tls.engine import Policy, Rule
from starttls_harness.tls.states import State

__all__ = ["CccRun", "accept_server_first", "step_ccc_close_notify", "step_ccc_plaintext"]


class CccRun(Protocol):
    """What these steps need of the client role's run state."""

    conn: ScriptedConnection
    dialect: ScriptedServer
    pending: Optional[Command]
    close_notify_sent: float

    async def next_act(self) -> Act: ...


def _take_ccc(run: CccRun) -> Command:
    cmd = run.pending
    if cmd is None or cmd.kind != "stoptls":
        raise Observed("unexpected-reply", "no CCC to answer")
    run.pending = None
    return cmd


def _answer_and_close(run: CccRun, cmd: Command) -> None:
    """The ``200`` and our close_notify in one segment (the closure resumes plaintext)."""
    conn = run.conn
    t = conn.t()
    with t.corked():
        conn.send(run.dialect.stoptls_ok(cmd))
        conn.handle(t.engine.unwrap())
    run.close_notify_sent = time.monotonic()


async def accept_server_first(run: CccRun, cmd: Command) -> None:
    """The conforming CCC: answer, our close_notify, the client's (R3-R5).

    Returns once the closure completed and the client's next act (its first
    plaintext command) is back in the inbox; the client ending the
    connection or breaking a rule instead raises :class:`Gone`.
    """
    conn = run.conn
    conn.in_closure = True
    _answer_and_close(run, cmd)
    act = await run.next_act()
    if act.kind == "gone":
        raise Gone(act)
    if conn.t().engine.state is not State.PLAINTEXT:
        raise Observed("unexpected-reply", f"the client acted under TLS after CCC: {act.kind}")
    conn.acts.appendleft(act)


async def step_ccc_close_notify(run: CccRun, args: Mapping[str, object]) -> None:
    """The server starts the closure after CCC; ``expect-close-notify`` judges the answer."""
    _answer_and_close(run, _take_ccc(run))


async def step_ccc_plaintext(run: CccRun, args: Mapping[str, object]) -> None:
    """After CCC's answer, plaintext without our close_notify (R3 on the client).

    Our close_notify is held back for good (R5 relaxed on our side) and
    whatever the client sends after its own close_notify is read as
    plaintext (R4 relaxed), so a client that resumes shows it with a
    command; the plaintext is written once the client's close_notify came
    (the order ftplib and curl's active mode use), or -- a client that waits
    for ours -- once the reply bound has run out.
    """
    cmd = _take_ccc(run)
    conn = run.conn
    t = conn.t()
    t.engine.policy = Policy.relaxing(Rule.R4, Rule.R5)
    conn.send(run.dialect.stoptls_ok(cmd))
    try:
        act = await run.next_act()
    except ScriptTimeout:
        conn.evidence.note("no close_notify from the client after the CCC answer")
    else:
        if act.kind != "close_notify":
            conn.acts.appendleft(act)
    conn.inject(run.dialect.greeting(), "plaintext after the CCC answer, without our close_notify")
