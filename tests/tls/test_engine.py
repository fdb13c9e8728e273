"""The sans-I/O engine on deterministic in-memory pairs.

Each rule R1-R7 is shown twice: a conforming peer passes without a
violation, and a peer that breaks the rule is reported with its id.
Segmentation is declared: ``lump`` puts everything one side wrote into one
``receive_data`` call; ``bytewise`` feeds it one byte at a time.
"""

from __future__ import annotations

import ssl
from typing import List, Optional

import pytest
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import (
    OP_IGNORE_UNEXPECTED_EOF,
    AlertReceived,
    ClosureComplete,
    Connection,
    Event,
    HandshakeComplete,
    HandshakeFailed,
    LocalProtocolError,
    Pair,
    PeerEOF,
    PlaintextData,
    Policy,
    Rule,
    TLSData,
    Violation,
    violations,
)
from starttls_harness.tls.states import (
    TRANSITIONS,
    Input,
    State,
    TransitionError,
    to_dot,
    transition,
)

SEGMENTATION = {"lump": None, "bytewise": 1}


def is_starttls(line: bytes) -> bool:
    return line.strip().upper() == b"STARTTLS"


def is_final_reply(line: bytes) -> bool:
    return line[3:4] == b" "


def new_pair(
    client_policy: Optional[Policy] = None, server_policy: Optional[Policy] = None
) -> Pair:
    pair = Pair(Connection(client_policy), Connection(server_policy))
    pair.server.hold_after(is_starttls)
    return pair


def upgrade(pair: Pair, pki: Pki, version: str, chunk: Optional[int] = None) -> None:
    """STARTTLS exchange + handshake, the conforming way."""
    pair.client.hold_after(is_final_reply, once=True)
    pair.client.send_data(b"STARTTLS\r\n")
    pair.pump(chunk)
    assert data_of(pair.server_events, PlaintextData).endswith(b"STARTTLS\r\n")
    pair.server.send_data(b"220 Ready to start TLS\r\n")
    pair.server_events += pair.server.start_tls(pki.server_context(version), server_side=True)
    pair.pump(chunk)
    pair.client_events += pair.client.start_tls(
        pki.client_context(version), server_side=False, server_hostname="localhost"
    )
    pair.pump(chunk)
    assert pair.client.state is State.TLS, pair.client_events
    assert pair.server.state is State.TLS, pair.server_events


def data_of(events: List[Event], kind: type) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, kind))  # type: ignore[attr-defined]


def expected_version(version: str) -> str:
    return {"1.2": "TLSv1.2", "1.3": "TLSv1.3"}[version]


# ------------------------------------------------------------- positive


@pytest.mark.parametrize("seg", SEGMENTATION)
def test_three_cycles_return_to_plaintext(pki: Pki, tls_version: str, seg: str) -> None:
    chunk = SEGMENTATION[seg]
    pair = new_pair()
    for cycle in range(3):
        pair.client_events.clear()
        pair.server_events.clear()
        upgrade(pair, pki, tls_version, chunk)
        assert pair.client.tls_version == expected_version(tls_version)
        pair.client.send_data(b"secret %d\r\n" % cycle)
        pair.server.send_data(b"250 protected\r\n")
        pair.pump(chunk)
        assert data_of(pair.server_events, TLSData) == b"secret %d\r\n" % cycle
        assert data_of(pair.client_events, TLSData) == b"250 protected\r\n"
        pair.server.accept_unwrap()
        pair.client.unwrap()
        pair.pump(chunk)
        assert ClosureComplete(resumed=True) in pair.client_events
        assert ClosureComplete(resumed=True) in pair.server_events
        # The server speaks first in plaintext, as STOPTLS requires.
        pair.server.send_data(b"220 plaintext again\r\n")
        pair.pump(chunk)
        assert data_of(pair.client_events, PlaintextData).endswith(b"220 plaintext again\r\n")
        assert pair.client.state is State.PLAINTEXT and pair.server.state is State.PLAINTEXT
        assert not violations(pair.client_events + pair.server_events)
    assert pair.client.cycles == pair.server.cycles == 3


def test_close_notify_and_greeting_in_one_lump(pki: Pki, tls_version: str) -> None:
    """The responder's close_notify and its plaintext greeting in one read."""
    pair = new_pair()
    upgrade(pair, pki, tls_version)
    pair.server.accept_unwrap()
    pair.client.unwrap()
    to_server = pair.client.data_to_send()
    pair.server_events += pair.server.receive_data(to_server)
    pair.server.send_data(b"220 greeting\r\n")
    lump = pair.server.data_to_send()  # close_notify + greeting, one lump
    events = pair.client.receive_data(lump)
    closure = [e for e in events if isinstance(e, ClosureComplete)]
    assert closure == [ClosureComplete(resumed=True, trailing=b"220 greeting\r\n")]
    assert data_of(events, PlaintextData) == b"220 greeting\r\n"
    assert not violations(events)


def test_first_command_in_same_read_as_finished(pki: Pki) -> None:
    """TLS 1.3: the client's first command may arrive with its Finished."""
    pair = new_pair()
    pair.client.hold_after(is_final_reply, once=True)
    pair.client.send_data(b"STARTTLS\r\n")
    pair.pump()
    pair.server.send_data(b"220 go\r\n")
    pair.server.start_tls(pki.server_context("1.3"), server_side=True)
    pair.pump()
    pair.client.start_tls(pki.client_context("1.3"), server_side=False, server_hostname="localhost")
    pair.server.receive_data(pair.client.data_to_send())  # ClientHello
    pair.client.receive_data(pair.server.data_to_send())  # ServerHello..Finished
    pair.client.send_data(b"EHLO inside\r\n")
    events = pair.server.receive_data(pair.client.data_to_send())  # Finished + data
    assert any(isinstance(e, HandshakeComplete) for e in events)
    assert data_of(events, TLSData) == b"EHLO inside\r\n"


# -------------------------------------------------------------------- R1


def test_r1_conforming_client_no_leftover(pki: Pki, tls_version: str) -> None:
    pair = new_pair()
    upgrade(pair, pki, tls_version)
    assert not violations(pair.server_events + pair.client_events)


def test_r1_command_injection_same_segment(pki: Pki, tls_version: str) -> None:
    pair = new_pair()
    pair.client.send_data(b"STARTTLS\r\nMAIL FROM:<evil@example>\r\n")
    pair.pump()
    assert data_of(pair.server_events, PlaintextData) == b"STARTTLS\r\n"
    assert pair.server.held == b"MAIL FROM:<evil@example>\r\n"
    events = pair.server.start_tls(pki.server_context(tls_version), server_side=True)
    assert events == [
        Violation(
            Rule.R1, "plaintext received before the TLS upgrade", b"MAIL FROM:<evil@example>\r\n"
        )
    ]
    assert pair.server.state is State.BROKEN


def test_r1_trigger_line_split_across_reads(pki: Pki, tls_version: str) -> None:
    server = Connection()
    server.hold_after(is_starttls)
    delivered = b""
    for piece in (b"STAR", b"TTLS\r", b"\nRSET\r\n"):
        delivered += data_of(server.receive_data(piece), PlaintextData)
    assert delivered == b"STARTTLS\r\n"
    events = server.start_tls(pki.server_context(tls_version), server_side=True)
    assert [(v.rule, v.data) for v in violations(events)] == [(Rule.R1, b"RSET\r\n")]


def test_r1_injection_separate_segment_before_client_hello(pki: Pki, tls_version: str) -> None:
    server = Connection()
    server.hold_after(is_starttls)
    server.receive_data(b"STARTTLS\r\n")
    assert server.start_tls(pki.server_context(tls_version), server_side=True) == []
    events = server.receive_data(b"RSET\r\n")
    (violation,) = violations(events)
    assert violation.rule is Rule.R1 and violation.data == b"RSET\r\n"
    assert not [e for e in events if isinstance(e, (PlaintextData, TLSData))]


def test_r1_relaxed_executes_leftover_inside_tls(pki: Pki, tls_version: str) -> None:
    """The misbehaving server of CVE-2011-0411: leftover runs as if in TLS."""
    pair = new_pair(server_policy=Policy.relaxing(Rule.R1))
    pair.client.send_data(b"STARTTLS\r\nRSET\r\n")
    pair.pump()
    pair.server.send_data(b"220 go\r\n")
    pair.server_events += pair.server.start_tls(pki.server_context(tls_version), server_side=True)
    pair.pump()
    pair.client.start_tls(
        pki.client_context(tls_version), server_side=False, server_hostname="localhost"
    )
    pair.pump()
    assert TLSData(b"RSET\r\n", protected=False) in pair.server_events
    (violation,) = violations(pair.server_events)
    assert violation.rule is Rule.R1 and not violation.enforced


def test_r1_client_refuses_injected_response(pki: Pki, tls_version: str) -> None:
    client = Connection()
    client.hold_after(is_final_reply, once=True)
    client.send_data(b"STARTTLS\r\n")
    events = client.receive_data(b"220 Ready\r\n250 injected response\r\n")
    assert data_of(events, PlaintextData) == b"220 Ready\r\n"
    events = client.start_tls(
        pki.client_context(tls_version), server_side=False, server_hostname="localhost"
    )
    assert [(v.rule, v.data) for v in violations(events)] == [
        (Rule.R1, b"250 injected response\r\n")
    ]
    assert client.data_to_send() == b"STARTTLS\r\n"  # no ClientHello after the refusal


# -------------------------------------------------------------------- R2


def test_r2_conforming_data_is_protected(pki: Pki, tls_version: str) -> None:
    pair = new_pair()
    upgrade(pair, pki, tls_version)
    pair.client.send_data(b"NOOP\r\n")
    pair.pump()
    assert TLSData(b"NOOP\r\n") in pair.server_events


@pytest.mark.parametrize("seg", SEGMENTATION)
def test_r2_plaintext_inside_tls_is_refused(pki: Pki, tls_version: str, seg: str) -> None:
    pair = new_pair()
    upgrade(pair, pki, tls_version)
    pair.client.send_data(b"NOOP\r\n")
    pair.client.send_raw(b"MAIL FROM:<x@y>\r\n")
    pair.server_events.clear()
    pair.pump(SEGMENTATION[seg])
    assert data_of(pair.server_events, TLSData) == b"NOOP\r\n"
    rules = [v.rule for v in violations(pair.server_events)]
    assert rules == [Rule.R2]
    assert pair.server.state is State.BROKEN
    offending = b"".join(v.data for v in violations(pair.server_events))
    assert offending.startswith(b"M")


def test_r2_corrupt_record_is_refused(pki: Pki, tls_version: str) -> None:
    pair = new_pair()
    upgrade(pair, pki, tls_version)
    pair.client.send_data(b"NOOP\r\n")
    record = bytearray(pair.client.data_to_send())
    record[-1] ^= 0xFF
    events = pair.server.receive_data(bytes(record))
    (violation,) = violations(events)
    assert violation.rule is Rule.R2 and "invalid TLS record" in violation.message


# -------------------------------------------------------------------- R3


def test_r3_conforming_resumption_after_both_alerts(pki: Pki, tls_version: str) -> None:
    pair = new_pair()
    upgrade(pair, pki, tls_version)
    pair.server.accept_unwrap()
    pair.client.unwrap()
    pair.pump()
    pair.client.send_data(b"EHLO again\r\n")
    pair.pump()
    assert PlaintextData(b"EHLO again\r\n") in pair.server_events
    assert not violations(pair.server_events + pair.client_events)


def test_r3_plaintext_instead_of_close_notify(pki: Pki, tls_version: str) -> None:
    """We sent close_notify; the peer answers with plaintext, not an alert."""
    pair = new_pair()
    upgrade(pair, pki, tls_version)
    pair.client.unwrap()
    pair.client.data_to_send()  # the close_notify is lost on the way
    events = pair.client.receive_data(b"220 plaintext too early\r\n")
    assert [(v.rule, v.data) for v in violations(events)] == [
        (Rule.R3, b"220 plaintext too early\r\n")
    ]
    assert not [e for e in events if isinstance(e, PlaintextData)]


def test_r3_plaintext_after_final_closure(pki: Pki, tls_version: str) -> None:
    """A protocol without a return to plaintext: after closure, only FIN."""
    pair = new_pair()
    upgrade(pair, pki, tls_version)
    pair.client.send_close_notify()
    pair.pump()
    assert pair.server.state is State.CLOSED
    assert pair.client.state is State.CLOSED
    events = pair.server.receive_data(b"MAIL FROM:<late@plaintext>\r\n")
    assert [v.rule for v in violations(events)] == [Rule.R3]
    with pytest.raises(LocalProtocolError, match="R3"):
        pair.client.send_data(b"QUIT\r\n")


def test_r3_relaxed_accepts_plaintext_before_close_notify(pki: Pki, tls_version: str) -> None:
    pair = new_pair(client_policy=Policy.relaxing(Rule.R3))
    upgrade(pair, pki, tls_version)
    pair.client.unwrap()
    pair.client.data_to_send()
    events = pair.client.receive_data(b"220 hi\r\n")
    assert PlaintextData(b"220 hi\r\n") in events
    assert pair.client.state is State.PLAINTEXT


# -------------------------------------------------------------------- R4


@pytest.mark.parametrize("seg", SEGMENTATION)
def test_r4_one_sided_close_is_refused(pki: Pki, tls_version: str, seg: str) -> None:
    pair = new_pair(client_policy=Policy.relaxing(Rule.R4))
    upgrade(pair, pki, tls_version)
    pair.server.accept_unwrap()
    pair.client.unwrap()
    pair.client.send_data(b"EHLO too-early\r\n")  # did not wait: one-sided
    pair.server_events.clear()
    pair.pump(SEGMENTATION[seg])
    found = violations(pair.server_events)
    assert [v.rule for v in found] == [Rule.R4]
    assert b"".join(v.data for v in found).startswith(b"E")
    assert PlaintextData(b"EHLO too-early\r\n") not in pair.server_events
    assert pair.server.state is State.BROKEN


def test_r4_initiator_may_not_send_before_answer(pki: Pki, tls_version: str) -> None:
    pair = new_pair()
    upgrade(pair, pki, tls_version)
    pair.client.unwrap()
    with pytest.raises(LocalProtocolError, match="R4"):
        pair.client.send_data(b"EHLO\r\n")


def test_r4_relaxed_responder_resumes_on_one_sided_close(pki: Pki, tls_version: str) -> None:
    pair = new_pair(client_policy=Policy.relaxing(Rule.R4), server_policy=Policy.relaxing(Rule.R4))
    upgrade(pair, pki, tls_version)
    pair.server.accept_unwrap()
    pair.client.unwrap()
    pair.client.send_data(b"EHLO too-early\r\n")
    pair.pump()
    assert PlaintextData(b"EHLO too-early\r\n") in pair.server_events


# -------------------------------------------------------------------- R5


def test_r5_responder_answers_at_once(pki: Pki, tls_version: str) -> None:
    pair = new_pair()
    upgrade(pair, pki, tls_version)
    pair.client.send_close_notify()
    pair.server_events += pair.server.receive_data(pair.client.data_to_send())
    # The answer is queued in the same step, before anything else.
    answer = pair.server.data_to_send()
    assert answer[:1] in (b"\x15", b"\x17") and answer
    events = pair.client.receive_data(answer)
    assert ClosureComplete(resumed=False) in events


def test_r5_peer_that_closes_tcp_instead_of_answering(pki: Pki, tls_version: str) -> None:
    pair = new_pair(server_policy=Policy.relaxing(Rule.R5))
    upgrade(pair, pki, tls_version)
    pair.server.accept_unwrap()
    pair.client.unwrap()
    pair.pump()
    assert pair.server.state is State.CLOSE_RECEIVED
    assert pair.client.state is State.CLOSE_SENT
    events = pair.client.receive_data(b"")  # the server hangs up instead
    assert [v.rule for v in violations(events)] == [Rule.R5]


# -------------------------------------------------------------------- R6


def test_r6_eof_after_close_notify_is_clean(pki: Pki, tls_version: str) -> None:
    pair = new_pair()
    upgrade(pair, pki, tls_version)
    pair.server.send_close_notify()
    pair.pump()
    events = pair.client.receive_data(b"")
    assert events == [PeerEOF()]


@pytest.mark.parametrize("ignore_eof_option", [False, True])
def test_r6_truncation_is_reported(pki: Pki, tls_version: str, ignore_eof_option: bool) -> None:
    """EOF while TLS is up is a truncation, even if the context was told to ignore it."""
    pair = new_pair()
    upgrade(pair, pki, tls_version)
    pair.server.send_data(b"354 go ahead\r\n")
    pair.pump()
    partial = pair.server
    partial.send_data(b"a partial line without its end")
    wire = partial.data_to_send()
    events = pair.client.receive_data(wire[:-3])  # the record is cut, then EOF
    events += pair.client.receive_data(b"")
    (violation,) = violations(events)
    assert violation.rule is Rule.R6
    assert violation.data == wire[: len(wire) - 3][-len(violation.data) :]
    if ignore_eof_option:
        ctx = pki.client_context(tls_version)
        ctx.options |= OP_IGNORE_UNEXPECTED_EOF
        conn = Connection()
        conn.start_tls(ctx, server_side=False, server_hostname="localhost")
        assert not ctx.options & OP_IGNORE_UNEXPECTED_EOF  # cleared by the engine
        other = Connection()
        other.start_tls(pki.server_context(tls_version), server_side=True)
        p = Pair(conn, other)
        p.pump()
        assert [v.rule for v in violations(conn.receive_data(b""))] == [Rule.R6]


def test_r6_relaxed_reports_clean_eof(pki: Pki, tls_version: str) -> None:
    pair = new_pair(client_policy=Policy.relaxing(Rule.R6))
    upgrade(pair, pki, tls_version)
    assert pair.client.receive_data(b"") == [PeerEOF()]


# -------------------------------------------------------------------- R7


def _alert_from_server(pair: Pair) -> bytes:
    """Make the server send a real fatal alert (it gets a corrupt record)."""
    pair.client.send_data(b"NOOP\r\n")
    record = bytearray(pair.client.data_to_send())
    record[-1] ^= 0x01
    pair.server.receive_data(bytes(record))
    alert = pair.server.data_to_send()
    assert alert, "OpenSSL sent no alert"
    return alert


def test_r7_alert_ends_connection(pki: Pki, tls_version: str) -> None:
    pair = new_pair()
    upgrade(pair, pki, tls_version)
    events = pair.client.receive_data(_alert_from_server(pair))
    assert any(isinstance(e, AlertReceived) for e in events)
    assert not violations(events)
    assert pair.client.state is State.BROKEN


def test_r7_plaintext_after_alert_is_refused(pki: Pki, tls_version: str) -> None:
    pair = new_pair()
    upgrade(pair, pki, tls_version)
    events = pair.client.receive_data(_alert_from_server(pair) + b"220 resumed\r\n")
    assert [(v.rule, v.data) for v in violations(events)] == [(Rule.R7, b"220 resumed\r\n")]
    assert not [e for e in events if isinstance(e, PlaintextData)]


def test_r7_relaxed_takes_alert_for_closure(pki: Pki, tls_version: str) -> None:
    pair = new_pair(client_policy=Policy.relaxing(Rule.R7))
    upgrade(pair, pki, tls_version)
    events = pair.client.receive_data(_alert_from_server(pair) + b"220 resumed\r\n")
    assert PlaintextData(b"220 resumed\r\n") in events


# -------------------------------------------------------- handshake, table


def test_handshake_failure_names_the_side(pki: Pki, tls_version: str) -> None:
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts nothing
    pair = new_pair()
    pair.server.start_tls(pki.server_context(tls_version), server_side=True)
    pair.client_events += pair.client.start_tls(
        client_ctx, server_side=False, server_hostname="localhost"
    )
    pair.pump()
    (local,) = [e for e in pair.client_events if isinstance(e, HandshakeFailed)]
    assert not local.remote and "CERTIFICATE" in local.reason.upper()
    (remote,) = [e for e in pair.server_events if isinstance(e, HandshakeFailed)]
    assert remote.remote


def test_illegal_transition_names_state_and_event() -> None:
    with pytest.raises(TransitionError, match=r"'plaintext'.*'send_close_notify'"):
        transition(State.PLAINTEXT, Input.SEND_CLOSE_NOTIFY)
    conn = Connection()
    with pytest.raises(TransitionError):
        conn.unwrap()


def test_every_state_can_be_left_or_is_terminal() -> None:
    sources = {s for s, _ in TRANSITIONS}
    assert set(State) == sources
    dot = to_dot()
    assert dot.startswith("digraph") and '"tls" -> "close-sent"' in dot


def test_policy_relaxes_exactly_one_rule() -> None:
    policy = Policy.relaxing("R4")
    assert not policy.enforces(Rule.R4)
    assert all(policy.enforces(r) for r in Rule if r is not Rule.R4)
    assert Policy.strict().relaxed == frozenset()


def test_transcript_keeps_every_byte(pki: Pki, tls_version: str) -> None:
    pair = new_pair()
    pair.client.send_data(b"STARTTLS\r\nRSET\r\n")
    pair.pump()
    pair.server.start_tls(pki.server_context(tls_version), server_side=True)
    incoming = b"".join(s.data for s in pair.server.transcript if s.direction == "in")
    assert incoming == b"STARTTLS\r\nRSET\r\n"


def test_r1_relaxed_plaintext_glued_to_client_hello(pki: Pki, tls_version: str) -> None:
    """Injected plaintext and the ClientHello in one read: the relaxed peer
    runs the plaintext after the handshake and still completes it."""
    server = Connection(Policy.relaxing(Rule.R1))
    server.hold_after(is_starttls)
    server.receive_data(b"STARTTLS\r\n")
    server.start_tls(pki.server_context(tls_version), server_side=True)
    client = Connection()
    client.start_tls(
        pki.client_context(tls_version), server_side=False, server_hostname="localhost"
    )
    events = server.receive_data(b"RSET\r\n" + client.data_to_send())
    pair = Pair(client, server, server_events=list(events))
    pair.pump()
    assert any(isinstance(e, HandshakeComplete) for e in pair.server_events)
    assert TLSData(b"RSET\r\n", protected=False) in pair.server_events
    strict = Connection()
    strict.hold_after(is_starttls)
    strict.receive_data(b"STARTTLS\r\n")
    strict.start_tls(pki.server_context(tls_version), server_side=True)
    other = Connection()
    other.start_tls(pki.client_context(tls_version), server_side=False, server_hostname="localhost")
    refused = strict.receive_data(b"RSET\r\n" + other.data_to_send())
    assert [(v.rule, v.data[:6]) for v in violations(refused)] == [(Rule.R1, b"RSET\r\n")]
    assert strict.state is State.BROKEN
