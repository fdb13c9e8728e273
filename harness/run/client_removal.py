"""The client role's server-initiated return to plaintext (LDAP's removal of the TLS layer).

RFC 4511 §4.14.3 lets *either* peer remove the TLS layer with a bare
closure alert.  The client role's STOPTLS scenarios have the client start
it; the step here has the scripted server start it, so the removal is
exercised in the other direction too:

``server-removal``
    The pending command is answered under TLS, then the server sends its
    close_notify.  Conforming (the default): it waits for the client's
    close_notify (R4, the server's side); then the client may end the
    session or start TLS again, but sends nothing sensitive in plaintext.
    ``one_sided=True`` is the fault: close_notify and a plaintext response
    leave in one segment, before the client could answer (the "streams
    swapped before the peer's alert" bug): a client that takes the
    plaintext resumed on a one-sided closure (R4, the client's side).

The step is given the run layer's conforming ``answer`` function by the
verb table (:mod:`.client`), so this module needs nothing from it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, FrozenSet, Mapping, Optional, Protocol

from starttls_harness.dialects.roles import Command, ScriptedServer
from starttls_harness.run.outcomes import Observed
from starttls_harness.run.scripted import Act, Gone, ScriptedConnection, ScriptTimeout
from starttls_harness.run.server import RunSettings

__all__ = ["RemovalRun", "step_server_removal"]


class RemovalRun(Protocol):
    """What the step needs of the client role's run state."""

    conn: ScriptedConnection
    dialect: ScriptedServer
    settings: RunSettings
    pending: Optional[Command]
    stoptls_done: int


#: The run layer's conforming answer (typed loosely: it takes the role's own run state).
Answer = Callable[[Any, Command], Awaitable[str]]


async def step_server_removal(
    run: RemovalRun, args: Mapping[str, object], answer: Answer, sensitive: FrozenSet[str]
) -> None:
    """Answer the pending command, then remove the TLS layer from the server's side."""
    cmd = run.pending
    if cmd is None:
        raise Observed("unexpected-reply", "no command to answer")
    run.pending = None
    await answer(run, cmd)
    conn = run.conn
    t = conn.t()
    if not t.tls_active:
        raise Observed("unexpected-reply", "TLS ended before the server could remove it")
    conn.in_closure = True
    if args.get("one_sided"):
        with t.corked():
            conn.handle(t.engine.unwrap())
            conn.inject(
                run.dialect.injection(cmd), "plaintext right behind our close_notify (one-sided)"
            )
        return
    try:
        await t.unwrap(timeout=run.settings.reply_timeout)
    except asyncio.TimeoutError:
        raise ScriptTimeout("the client did not answer our close_notify") from None
    except (ConnectionError, RuntimeError) as exc:
        raise Gone(conn.gone or Act("gone", how="reset", detail=str(exc))) from None
    conn.evidence.note("the server removed the TLS layer; the client answered at once")
    run.stoptls_done += 1
    await _after_removal(run, answer, sensitive)


async def _after_removal(run: RemovalRun, answer: Answer, sensitive: FrozenSet[str]) -> None:
    """Plaintext now: the client may end the session (RFC 4511 §4.14.3) or start TLS
    again; a client that requires TLS never sends credentials or data in plaintext (R9)."""
    for _ in range(20):
        act = await run.conn.next_act(run.settings.reply_timeout)
        if act.kind == "gone":
            if act.how == "violation":
                raise Gone(act)
            raise Observed("ended-after-removal", f"then ended the connection ({act.detail})")
        if act.kind != "command" or act.command is None:
            continue
        cmd = act.command
        if cmd.kind in sensitive:
            raise Observed("sent-in-plaintext", f"{cmd.text!r} sent after the removal")
        if await answer(run, cmd) == "ended":
            raise Observed("ended-after-removal", f"then ended the session ({cmd.verb})")
        if cmd.kind == "starttls":
            return  # TLS again: the session goes on (the next step serves it)
    raise Observed("unexpected-reply", "the client sent too many commands after the removal")
