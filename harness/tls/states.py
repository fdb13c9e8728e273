"""The one transition table of the STARTTLS/closure engine.

Rule 1 of this module: every state change of :class:`starttls_harness.tls.engine.Connection`
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


S, In = State, Input

#: Every legal (state, input) -> next state.  Read it as the specification.
TRANSITIONS: Dict[Tuple[State, Input], State] = {
    (S.PLAINTEXT, In.START_TLS): S.HANDSHAKING,
    (S.PLAINTEXT, In.PEER_EOF): S.DONE,
    (S.PLAINTEXT, In.LOCAL_CLOSE): S.DONE,
    (S.PLAINTEXT, In.FAILURE): S.BROKEN,
    (S.HANDSHAKING, In.HANDSHAKE_DONE): S.TLS,
    (S.HANDSHAKING, In.FAILURE): S.BROKEN,
    (S.HANDSHAKING, In.PEER_EOF): S.BROKEN,
    (S.HANDSHAKING, In.LOCAL_CLOSE): S.DONE,
    (S.TLS, In.SEND_CLOSE_NOTIFY): S.CLOSE_SENT,
    (S.TLS, In.RECV_CLOSE_NOTIFY): S.CLOSE_RECEIVED,
    (S.TLS, In.FAILURE): S.BROKEN,
    (S.TLS, In.PEER_EOF): S.BROKEN,
    (S.TLS, In.FORCED_RESUME): S.PLAINTEXT,
    (S.TLS, In.LOCAL_CLOSE): S.DONE,
    (S.CLOSE_SENT, In.CLOSURE_RESUME): S.PLAINTEXT,
    (S.CLOSE_SENT, In.CLOSURE_FINAL): S.CLOSED,
    (S.CLOSE_SENT, In.FORCED_RESUME): S.PLAINTEXT,
    (S.CLOSE_SENT, In.FAILURE): S.BROKEN,
    (S.CLOSE_SENT, In.PEER_EOF): S.BROKEN,
    (S.CLOSE_SENT, In.LOCAL_CLOSE): S.DONE,
    (S.CLOSE_RECEIVED, In.CLOSURE_RESUME): S.PLAINTEXT,
    (S.CLOSE_RECEIVED, In.CLOSURE_FINAL): S.CLOSED,
    (S.CLOSE_RECEIVED, In.FORCED_RESUME): S.PLAINTEXT,
    (S.CLOSE_RECEIVED, In.FAILURE): S.BROKEN,
    (S.CLOSE_RECEIVED, In.PEER_EOF): S.DONE,
    (S.CLOSE_RECEIVED, In.LOCAL_CLOSE): S.DONE,
    (S.CLOSED, In.PEER_EOF): S.DONE,
    (S.CLOSED, In.LOCAL_CLOSE): S.DONE,
    (S.CLOSED, In.FAILURE): S.BROKEN,
    (S.CLOSED, In.FORCED_RESUME): S.PLAINTEXT,
    (S.BROKEN, In.LOCAL_CLOSE): S.BROKEN,
    (S.BROKEN, In.PEER_EOF): S.BROKEN,
    (S.BROKEN, In.FAILURE): S.BROKEN,
    (S.DONE, In.LOCAL_CLOSE): S.DONE,
    (S.DONE, In.PEER_EOF): S.DONE,
}

del S, In


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
