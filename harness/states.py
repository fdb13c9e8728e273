"""The one transition table of the STARTTLS/closure engine.

Rule 1 of this module: every state change of :class:`harness.engine.Connection`
goes through :func:`transition`, and every legal ``(state, input)`` pair is
listed in :data:`TRANSITIONS`.  A pair that is not listed raises
:class:`TransitionError`, which names both, so an impossible sequence of
operations is an error at the place it happens rather than a silent mix-up of
phases.  :func:`to_dot` draws the table (``starttls-harness states --dot``).
"""

from __future__ import annotations

import enum
from typing import Dict, Tuple


class State(enum.Enum):
    """Where one connection stands between plaintext and TLS."""

    #: Plaintext may flow both ways (connection start, or after a closure).
    PLAINTEXT = "plaintext"
    #: STARTTLS accepted, TLS handshake in progress.
    HANDSHAKING = "handshaking"
    #: TLS established; application data is protected.
    TLS = "tls"
    #: We sent close_notify first and wait for the peer's (rule R4).
    CLOSE_SENT = "close-sent"
    #: The peer's close_notify arrived; ours is not sent yet (rule R5).
    CLOSE_RECEIVED = "close-received"
    #: TLS was closed for good (one-way close, or closure on a protocol
    #: that does not return to plaintext); only TCP close remains.
    CLOSED = "closed"
    #: A rule was broken or TLS failed; nothing more may be read or sent.
    BROKEN = "broken"
    #: The peer closed TCP (EOF) in plaintext, or we closed the connection.
    DONE = "done"


class Input(enum.Enum):
    """What can happen to a connection: an operation or an observation."""

    START_TLS = "start_tls"
    HANDSHAKE_DONE = "handshake_done"
    SEND_CLOSE_NOTIFY = "send_close_notify"
    RECV_CLOSE_NOTIFY = "recv_close_notify"
    #: Both close_notify alerts crossed; plaintext resumes.
    CLOSURE_RESUME = "closure_resume"
    #: Both close_notify alerts crossed; the connection will not resume.
    CLOSURE_FINAL = "closure_final"
    #: A relaxed policy lets plaintext resume without the full closure.
    FORCED_RESUME = "forced_resume"
    PEER_EOF = "peer_eof"
    LOCAL_CLOSE = "local_close"
    #: A rule violation or a TLS failure that ends the connection.
    FAILURE = "failure"


class TransitionError(RuntimeError):
    """An operation or observation is not allowed in the current state."""

    def __init__(self, state: State, event: Input) -> None:
        super().__init__(f"no transition from state {state.value!r} on {event.value!r}")
        self.state = state
        self.event = event


S, I = State, Input

#: Every legal (state, input) -> next state.  Read it as the specification.
TRANSITIONS: Dict[Tuple[State, Input], State] = {
    (S.PLAINTEXT, I.START_TLS): S.HANDSHAKING,
    (S.PLAINTEXT, I.PEER_EOF): S.DONE,
    (S.PLAINTEXT, I.LOCAL_CLOSE): S.DONE,
    (S.PLAINTEXT, I.FAILURE): S.BROKEN,
    (S.HANDSHAKING, I.HANDSHAKE_DONE): S.TLS,
    (S.HANDSHAKING, I.FAILURE): S.BROKEN,
    (S.HANDSHAKING, I.PEER_EOF): S.BROKEN,
    (S.HANDSHAKING, I.LOCAL_CLOSE): S.DONE,
    (S.TLS, I.SEND_CLOSE_NOTIFY): S.CLOSE_SENT,
    (S.TLS, I.RECV_CLOSE_NOTIFY): S.CLOSE_RECEIVED,
    (S.TLS, I.FAILURE): S.BROKEN,
    (S.TLS, I.PEER_EOF): S.BROKEN,
    (S.TLS, I.FORCED_RESUME): S.PLAINTEXT,
    (S.TLS, I.LOCAL_CLOSE): S.DONE,
    (S.CLOSE_SENT, I.CLOSURE_RESUME): S.PLAINTEXT,
    (S.CLOSE_SENT, I.CLOSURE_FINAL): S.CLOSED,
    (S.CLOSE_SENT, I.FORCED_RESUME): S.PLAINTEXT,
    (S.CLOSE_SENT, I.FAILURE): S.BROKEN,
    (S.CLOSE_SENT, I.PEER_EOF): S.BROKEN,
    (S.CLOSE_SENT, I.LOCAL_CLOSE): S.DONE,
    (S.CLOSE_RECEIVED, I.CLOSURE_RESUME): S.PLAINTEXT,
    (S.CLOSE_RECEIVED, I.CLOSURE_FINAL): S.CLOSED,
    (S.CLOSE_RECEIVED, I.FORCED_RESUME): S.PLAINTEXT,
    (S.CLOSE_RECEIVED, I.FAILURE): S.BROKEN,
    (S.CLOSE_RECEIVED, I.PEER_EOF): S.DONE,
    (S.CLOSE_RECEIVED, I.LOCAL_CLOSE): S.DONE,
    (S.CLOSED, I.PEER_EOF): S.DONE,
    (S.CLOSED, I.LOCAL_CLOSE): S.DONE,
    (S.CLOSED, I.FAILURE): S.BROKEN,
    (S.CLOSED, I.FORCED_RESUME): S.PLAINTEXT,
    (S.BROKEN, I.LOCAL_CLOSE): S.BROKEN,
    (S.BROKEN, I.PEER_EOF): S.BROKEN,
    (S.BROKEN, I.FAILURE): S.BROKEN,
    (S.DONE, I.LOCAL_CLOSE): S.DONE,
    (S.DONE, I.PEER_EOF): S.DONE,
}

del S, I


def transition(state: State, event: Input) -> State:
    """Return the state that ``event`` leads to from ``state``, or raise."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(state, event) from None


def to_dot() -> str:
    """Render the table as a Graphviz digraph (documentation, not logic)."""
    lines = ["digraph starttls {", "  rankdir=LR;"]
    for (src, event), dst in TRANSITIONS.items():
        lines.append(f'  "{src.value}" -> "{dst.value}" [label="{event.value}"];')
    lines.append("}")
    return "\n".join(lines)
