"""Properties: segmentation never changes a decision; parsers never crash.

Re-segmentation
===============

The engine must decide from the bytes, not from how TCP cut them.  Each
conversation below (the positive STARTTLS/STOPTLS cycles and every
violation case of ``tests/test_engine.py``) is run once with every
transfer in one lump and then with hypothesis-drawn cuts; the violations
(rule id and whether it was enforced), the delivered application bytes
(by kind: plaintext, protected TLS data, unprotected "TLS" data) and the
final states must be identical.  The offending bytes quoted by a violation
are *not* compared: a strict engine stops reading at the first bad byte,
so it quotes what had arrived by then.

Two delivery models:

``batch``
    A side's output is collected after the whole transfer it is answering
    (``Pair.pump``).  Every conversation is invariant; for the one-sided
    closure (R4) the refusal is, but whether the responder had already
    queued its close_notify answer when it saw the glued bytes -- and so
    whether the initiator ends up closed -- follows the cut.
``eager``
    A side's output is written after every chunk it reads, as the asyncio
    adapter does.  Everything is invariant **except R4**, which is defined
    by arrival order: bytes after the peer's close_notify that arrive
    before our answer has left mean the peer did not wait.  When TCP cuts
    a one-sided ``close_notify + EHLO`` after the close_notify and the
    answer leaves in between, the responder cannot know the peer did not
    wait -- for it the peer *did* wait (and, resuming, it takes the EHLO as
    plaintext after a complete closure).  That is why the catalogue's
    ``one-sided-close`` scenarios declare their segmentation (one write,
    ``corked``), and :func:`test_r4_is_defined_by_arrival_before_the_answer`
    states the exact rule.

Found by this property and fixed in ``harness/engine.py``: the R7
report of bytes after a fatal alert (and, relaxed, of the plaintext that
resumed) depended on those bytes arriving in the same read as the alert.

Robustness
==========

The record splitter, the dialects' reply splitters, the proxy's follower
and the engine's ``receive_data`` in every state take arbitrary bytes in
arbitrary chunks and answer only with their documented results or
exceptions, losing no byte.

Hypothesis runs derandomized (fixed examples, no database) so that CI is
deterministic; set ``STARTTLS_HARNESS_RANDOM=1`` to explore new examples.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starttls_harness.dialects import IMAP, SMTP
from starttls_harness.proxy import C2S, S2C, Follower
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import (
    Connection,
    Event,
    PlaintextData,
    Policy,
    Rule,
    TLSData,
    Violation,
)
from starttls_harness.tls.records import NotTLSError, RecordSplitter
from starttls_harness.tls.states import State

RANDOM = bool(os.environ.get("STARTTLS_HARNESS_RANDOM"))


def bounded(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,  # only read-only params (version, PKI)
        ],
    )


#: A segmentation: chunk sizes, used cyclically over every transfer.
#: Size 0 means "the rest of this transfer in one piece".
CUTS = st.lists(
    st.one_of(st.integers(1, 8), st.integers(9, 700), st.just(0)), min_size=1, max_size=24
)

# ------------------------------------------------------------------- wiring


class Cutter:
    """Cuts each transfer according to a cyclic list of chunk sizes."""

    def __init__(self, sizes: Optional[Sequence[int]]) -> None:
        self.sizes = list(sizes) if sizes else [0]
        self.i = 0

    def cut(self, data: bytes) -> List[bytes]:
        out = []
        pos = 0
        while pos < len(data):
            size = self.sizes[self.i % len(self.sizes)]
            self.i += 1
            step = len(data) - pos if size == 0 else size
            out.append(data[pos : pos + step])
            pos += step
        return out


@dataclass
class Wire:
    """Two engines over an in-memory "TCP" with a declared segmentation."""

    client: Connection
    server: Connection
    cutter: Cutter
    eager: bool = False
    client_events: List[Event] = field(default_factory=list)
    server_events: List[Event] = field(default_factory=list)

    def _sink(self, conn: Connection) -> List[Event]:
        return self.client_events if conn is self.client else self.server_events

    def _other(self, conn: Connection) -> Connection:
        return self.server if conn is self.client else self.client

    def deliver(self, src: Connection) -> bool:
        """Move ``src``'s pending output to its peer, chunk by chunk."""
        data = src.data_to_send()
        if not data:
            return False
        dst = self._other(src)
        for chunk in self.cutter.cut(data):
            self._sink(dst).extend(dst.receive_data(chunk))
            if self.eager:
                self.deliver(dst)  # the receiver writes its answer at once
        return True

    def pump(self) -> None:
        for _ in range(1000):
            moved = self.deliver(self.client)
            moved = self.deliver(self.server) or moved
            if not moved:
                return
        raise AssertionError("the conversation did not settle")  # pragma: no cover

    def eof(self, to: Connection) -> None:
        """The other side's TCP FIN reaches ``to``."""
        self._sink(to).extend(to.receive_data(b""))


@dataclass(frozen=True)
class Outcome:
    """What must not depend on segmentation."""

    violations: Tuple[Tuple[str, Tuple[Tuple[str, bool], ...]], ...]
    delivered: Tuple[Tuple[str, Tuple[Tuple[str, bytes], ...]], ...]
    states: Tuple[str, str]
    raised: str = ""


def _delivered(events: List[Event]) -> Tuple[Tuple[str, bytes], ...]:
    """Application bytes by kind, adjacent runs of one kind merged."""
    runs: List[Tuple[str, bytes]] = []
    for e in events:
        if isinstance(e, PlaintextData):
            kind, data = "plaintext", e.data
        elif isinstance(e, TLSData):
            kind, data = ("tls" if e.protected else "unprotected"), e.data
        else:
            continue
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1] + data)
        else:
            runs.append((kind, data))
    return tuple(runs)


def _violations(events: List[Event]) -> Tuple[Tuple[str, bool], ...]:
    return tuple((e.rule.value, e.enforced) for e in events if isinstance(e, Violation))


def outcome(wire: Wire, raised: str = "") -> Outcome:
    return Outcome(
        violations=(
            ("client", _violations(wire.client_events)),
            ("server", _violations(wire.server_events)),
        ),
        delivered=(
            ("client", _delivered(wire.client_events)),
            ("server", _delivered(wire.server_events)),
        ),
        states=(wire.client.state.value, wire.server.state.value),
        raised=raised,
    )


# ------------------------------------------------------------ conversations


def is_starttls(line: bytes) -> bool:
    return line.strip().upper() == b"STARTTLS"


def is_final_reply(line: bytes) -> bool:
    return line[3:4] == b" "


@dataclass
class Ctx:
    """What a conversation needs: contexts for one TLS version."""

    pki: Pki
    version: str

    def server_ctx(self) -> ssl.SSLContext:
        return self.pki.server_context(self.version)

    def client_ctx(self) -> ssl.SSLContext:
        return self.pki.client_context(self.version)


def _wire(
    cutter: Cutter,
    eager: bool,
    client_policy: Optional[Policy] = None,
    server_policy: Optional[Policy] = None,
) -> Wire:
    wire = Wire(Connection(client_policy), Connection(server_policy), cutter, eager)
    wire.server.hold_after(is_starttls)
    return wire


def _upgrade(w: Wire, c: Ctx, leftover: bytes = b"", reply_extra: bytes = b"") -> None:
    w.client.hold_after(is_final_reply, once=True)
    w.client.send_data(b"STARTTLS\r\n")
    if leftover:
        w.client.send_raw(leftover)
    w.pump()
    w.server.send_data(b"220 Ready to start TLS\r\n")
    if reply_extra:
        w.server.send_raw(reply_extra)
    w.server_events += w.server.start_tls(c.server_ctx(), server_side=True)
    w.pump()
    if w.client.state is State.PLAINTEXT:
        w.client_events += w.client.start_tls(
            c.client_ctx(), server_side=False, server_hostname="localhost"
        )
        w.pump()


def conv_cycles(w: Wire, c: Ctx) -> None:
    """Positive: two STARTTLS -> data -> STOPTLS closure -> plaintext cycles."""
    for cycle in range(2):
        _upgrade(w, c)
        w.client.send_data(b"secret %d\r\n" % cycle)
        w.server.send_data(b"250 protected\r\n")
        w.pump()
        w.server.accept_unwrap()
        w.client.unwrap()
        w.pump()
        w.server.send_data(b"220 plaintext again\r\n")
        w.pump()


def conv_closure_and_greeting_in_one_lump(w: Wire, c: Ctx) -> None:
    """The responder's close_notify answer and its plaintext greeting together."""
    _upgrade(w, c)
    w.server.accept_unwrap()
    w.client.unwrap()
    data = w.client.data_to_send()
    w.server_events += w.server.receive_data(data)  # the close_notify, whole
    w.server.send_data(b"220 greeting\r\n")  # queued behind the answer
    w.pump()


def conv_r6_eof_after_close_notify(w: Wire, c: Ctx) -> None:
    _upgrade(w, c)
    w.server.send_close_notify()
    w.pump()
    w.eof(w.client)


def conv_handshake_failure(w: Wire, c: Ctx) -> None:
    w.client.hold_after(is_final_reply, once=True)
    w.client.send_data(b"STARTTLS\r\n")
    w.pump()
    w.server.send_data(b"220 go\r\n")
    w.server_events += w.server.start_tls(c.server_ctx(), server_side=True)
    w.pump()
    untrusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts no CA
    w.client_events += w.client.start_tls(
        untrusting, server_side=False, server_hostname="localhost"
    )
    w.pump()


def conv_r1_same_segment(w: Wire, c: Ctx) -> None:
    _upgrade(w, c, leftover=b"MAIL FROM:<evil@example>\r\n")


def conv_r1_split_before_hello(w: Wire, c: Ctx) -> None:
    w.client.hold_after(is_final_reply, once=True)
    w.client.send_data(b"STARTTLS\r\n")
    w.pump()
    w.server.send_data(b"220 go\r\n")
    w.server_events += w.server.start_tls(c.server_ctx(), server_side=True)
    w.pump()
    w.client.send_raw(b"RSET\r\n")
    w.pump()


def conv_r1_client_refuses_injected_response(w: Wire, c: Ctx) -> None:
    _upgrade(w, c, reply_extra=b"250 injected response\r\n")


def conv_r1_relaxed_server(w: Wire, c: Ctx) -> None:
    _upgrade(w, c, leftover=b"RSET\r\n")


def conv_r2_plaintext_in_tls(w: Wire, c: Ctx) -> None:
    _upgrade(w, c)
    w.client.send_data(b"NOOP\r\n")
    w.client.send_raw(b"MAIL FROM:<x@y>\r\n")
    w.pump()


def conv_r2_corrupt_record(w: Wire, c: Ctx) -> None:
    _upgrade(w, c)
    w.client.send_data(b"NOOP\r\n")
    record = bytearray(w.client.data_to_send())
    record[-1] ^= 0xFF
    w.client.send_raw(bytes(record))
    w.pump()


def conv_r3_plaintext_instead_of_close_notify(w: Wire, c: Ctx) -> None:
    _upgrade(w, c)
    w.client.unwrap()
    w.client.data_to_send()  # the close_notify is lost on the way
    w.server.send_raw(b"220 plaintext too early\r\n")
    w.pump()


def conv_r3_plaintext_after_final_closure(w: Wire, c: Ctx) -> None:
    _upgrade(w, c)
    w.client.send_close_notify()
    w.pump()
    w.client.send_raw(b"MAIL FROM:<late@plaintext>\r\n")
    w.pump()


def conv_r4_one_sided_close(w: Wire, c: Ctx) -> None:
    _upgrade(w, c)
    w.server.accept_unwrap()
    w.client.unwrap()
    w.client.send_data(b"EHLO too-early\r\n")  # did not wait: one-sided
    w.pump()


def conv_r4_relaxed_responder(w: Wire, c: Ctx) -> None:
    conv_r4_one_sided_close(w, c)


def conv_r5_no_answer(w: Wire, c: Ctx) -> None:
    _upgrade(w, c)
    w.server.accept_unwrap()
    w.client.unwrap()
    w.pump()
    w.eof(w.client)  # the server hangs up instead of answering


def conv_r6_truncation(w: Wire, c: Ctx) -> None:
    _upgrade(w, c)
    w.server.send_data(b"354 go ahead\r\n")
    w.pump()
    w.server.send_data(b"a partial line without its end")
    wire = w.server.data_to_send()
    w.server.send_raw(wire[:-3])  # the record is cut, then EOF
    w.pump()
    w.eof(w.client)


def conv_r7_alert_then_plaintext(w: Wire, c: Ctx) -> None:
    _upgrade(w, c)
    w.client.send_data(b"NOOP\r\n")
    record = bytearray(w.client.data_to_send())
    record[-1] ^= 0x01
    w.server.receive_data(bytes(record))  # (setup: the server's own R2 is not the point)
    alert = w.server.data_to_send()  # a real fatal alert from OpenSSL
    w.server.send_raw(alert + b"220 resumed\r\n")
    w.pump()


def conv_tls13_command_with_finished(w: Wire, c: Ctx) -> None:
    w.client.hold_after(is_final_reply, once=True)
    w.client.send_data(b"STARTTLS\r\n")
    w.pump()
    w.server.send_data(b"220 go\r\n")
    w.server.start_tls(c.server_ctx(), server_side=True)
    w.pump()
    w.client.start_tls(c.client_ctx(), server_side=False, server_hostname="localhost")
    w.deliver(w.client)  # ClientHello
    w.deliver(w.server)  # ServerHello .. Finished
    w.client.send_data(b"EHLO inside\r\n")  # travels with the client's Finished
    w.pump()


Conversation = Callable[[Wire, Ctx], None]

#: name -> (conversation, client policy, server policy)
CONVERSATIONS: Dict[str, Tuple[Conversation, Optional[Policy], Optional[Policy]]] = {
    "cycles": (conv_cycles, None, None),
    "closure-and-greeting-in-one-lump": (conv_closure_and_greeting_in_one_lump, None, None),
    "r6-eof-after-close-notify": (conv_r6_eof_after_close_notify, None, None),
    "handshake-failure": (conv_handshake_failure, None, None),
    "r1-same-segment": (conv_r1_same_segment, None, None),
    "r1-split-before-hello": (conv_r1_split_before_hello, None, None),
    "r1-client-refuses-response": (conv_r1_client_refuses_injected_response, None, None),
    "r1-relaxed-server": (conv_r1_relaxed_server, None, Policy.relaxing(Rule.R1)),
    "r2-plaintext-in-tls": (conv_r2_plaintext_in_tls, None, None),
    "r2-corrupt-record": (conv_r2_corrupt_record, None, None),
    "r3-plaintext-before-close-notify": (conv_r3_plaintext_instead_of_close_notify, None, None),
    "r3-relaxed-plaintext-before-close-notify": (
        conv_r3_plaintext_instead_of_close_notify,
        Policy.relaxing(Rule.R3),
        None,
    ),
    "r3-plaintext-after-final-closure": (conv_r3_plaintext_after_final_closure, None, None),
    "r4-one-sided-close": (conv_r4_one_sided_close, Policy.relaxing(Rule.R4), None),
    "r4-relaxed-responder": (
        conv_r4_relaxed_responder,
        Policy.relaxing(Rule.R4),
        Policy.relaxing(Rule.R4),
    ),
    "r5-no-answer": (conv_r5_no_answer, None, Policy.relaxing(Rule.R5)),
    "r6-truncation": (conv_r6_truncation, None, None),
    "r6-relaxed-truncation": (conv_r6_truncation, Policy.relaxing(Rule.R6), None),
    "r7-alert-then-plaintext": (conv_r7_alert_then_plaintext, None, None),
    "r7-relaxed-alert-then-plaintext": (
        conv_r7_alert_then_plaintext,
        Policy.relaxing(Rule.R7),
        None,
    ),
    "tls13-command-with-finished": (conv_tls13_command_with_finished, None, None),
}

#: Conversations whose outcome is *defined* by arrival order (see the
#: module docstring): invariant in the batch model only.
ARRIVAL_DEFINED = frozenset({"r4-one-sided-close", "r4-relaxed-responder"})


def play(name: str, ctx: Ctx, sizes: Optional[Sequence[int]], eager: bool) -> Outcome:
    conv, client_policy, server_policy = CONVERSATIONS[name]
    wire = _wire(Cutter(sizes), eager, client_policy, server_policy)
    try:
        conv(wire, ctx)
    except Exception as exc:  # part of the outcome: must not depend on cuts either
        return outcome(wire, f"{type(exc).__name__}: {exc}")
    return outcome(wire)


@pytest.fixture(scope="module")
def lumps(pki: Pki) -> Dict[Tuple[str, str, bool], Outcome]:
    """Reference outcomes: every transfer in one piece (cached per version)."""
    return {}


def reference(
    lumps: Dict[Tuple[str, str, bool], Outcome], name: str, ctx: Ctx, eager: bool
) -> Outcome:
    key = (name, ctx.version, eager)
    if key not in lumps:
        lumps[key] = play(name, ctx, None, eager)
    return lumps[key]


def test_reference_outcomes_are_the_engine_tests(pki: Pki, tls_version: str) -> None:
    """The lump runs say what tests/test_engine.py says (so the property is
    checked against the right decisions, not merely a stable one)."""
    ctx = Ctx(pki, tls_version)
    rules = {
        name: {rule for _, found in play(name, ctx, None, False).violations for rule, _ in found}
        for name in CONVERSATIONS
    }
    assert rules == {
        "cycles": set(),
        "closure-and-greeting-in-one-lump": set(),
        "r6-eof-after-close-notify": set(),
        "handshake-failure": set(),
        "r1-same-segment": {"R1"},
        "r1-split-before-hello": {"R1"},
        "r1-client-refuses-response": {"R1"},
        "r1-relaxed-server": {"R1"},
        "r2-plaintext-in-tls": {"R2"},
        "r2-corrupt-record": {"R2"},
        "r3-plaintext-before-close-notify": {"R3"},
        "r3-relaxed-plaintext-before-close-notify": {"R3"},
        "r3-plaintext-after-final-closure": {"R3"},
        "r4-one-sided-close": {"R4"},
        "r4-relaxed-responder": {"R4"},
        "r5-no-answer": {"R5"},
        "r6-truncation": {"R6"},
        "r6-relaxed-truncation": set(),
        "r7-alert-then-plaintext": {"R7"},
        "r7-relaxed-alert-then-plaintext": {"R7"},
        "tls13-command-with-finished": set(),
    }
    cycles = play("cycles", ctx, None, False)
    assert dict(cycles.delivered)["server"] == (
        ("plaintext", b"STARTTLS\r\n"),
        ("tls", b"secret 0\r\n"),
        ("plaintext", b"STARTTLS\r\n"),
        ("tls", b"secret 1\r\n"),
    )
    lump = play("closure-and-greeting-in-one-lump", ctx, None, False)
    kind, data = dict(lump.delivered)["client"][-1]
    assert kind == "plaintext" and data.endswith(b"220 greeting\r\n")
    assert lump.states == ("plaintext", "plaintext")
    assert play("handshake-failure", ctx, None, False).states == ("broken", "broken")
    assert not cycles.raised


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@bounded(8)
@given(sizes=CUTS)
def test_segmentation_never_changes_the_outcome(
    lumps: Dict[Tuple[str, str, bool], Outcome],
    pki: Pki,
    tls_version: str,
    name: str,
    sizes: List[int],
) -> None:
    ctx = Ctx(pki, tls_version)
    batch, lump = play(name, ctx, sizes, eager=False), reference(lumps, name, ctx, False)
    if name in ARRIVAL_DEFINED:
        # Same refusal; only whether the responder's close_notify answer was
        # already queued when it saw the glued bytes (and so reaches the
        # initiator) follows the cut.
        assert (batch.violations, batch.delivered, batch.raised) == (
            lump.violations,
            lump.delivered,
            lump.raised,
        )
        return
    assert batch == lump
    assert play(name, ctx, sizes, eager=True) == reference(lumps, name, ctx, True)


def _tls_close_notify(pki: Pki, version: str) -> bytes:
    """The bytes of one close_notify record in this TLS version."""
    wire = _wire(Cutter([0]), False)
    _upgrade(wire, Ctx(pki, version))
    wire.client.unwrap()
    return wire.client.data_to_send()


def test_r4_is_defined_by_arrival_before_the_answer(pki: Pki, tls_version: str) -> None:
    """Eager model, one-sided ``close_notify + EHLO`` cut once, at every offset.

    R4 is reported exactly when a byte of the EHLO arrives in the same read
    as the end of the close_notify record (the answer has not left yet).
    Cut right after the record, the answer leaves first: the responder
    resumes and reads the EHLO as plaintext after a complete closure.
    """
    ctx = Ctx(pki, tls_version)
    record = len(_tls_close_notify(pki, tls_version))
    for cut in sorted({1, 2, record - 1, record, record + 1, record + 2, record + 15}):
        wire = _wire(Cutter([0]), True, Policy.relaxing(Rule.R4), None)
        _upgrade(wire, ctx)
        wire.server.accept_unwrap()
        wire.client.unwrap()
        close_notify = wire.client.data_to_send()
        wire.client.send_data(b"EHLO too-early\r\n")
        lump = close_notify + wire.client.data_to_send()
        wire.server_events.clear()
        for piece in (lump[:cut], lump[cut:]):
            wire.server_events += wire.server.receive_data(piece)
            wire.deliver(wire.server)  # the answer leaves after every read
        rules = [v.rule for v in wire.server_events if isinstance(v, Violation)]
        if cut != len(close_notify):
            assert rules == [Rule.R4], cut
            assert wire.server.state is State.BROKEN
        else:
            assert rules == [], cut
            assert PlaintextData(b"EHLO too-early\r\n") in wire.server_events
            assert wire.server.state is State.PLAINTEXT


# ------------------------------------------------------------- robustness

CHUNKS = st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=12)
#: Bytes that look like TLS record headers now and then.
RECORDISH = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.tuples(
            st.sampled_from([20, 21, 22, 23, 24]), st.integers(0, 5), st.binary(max_size=60)
        ).map(lambda t: bytes([t[0], 3, t[1]]) + len(t[2]).to_bytes(2, "big") + t[2]),
        st.sampled_from([b"\r\n", b"220 ok\r\n", b"250-x\r\n", b"* OK\r\n", b"a1 OK\r\n"]),
    ),
    min_size=1,
    max_size=16,
)


@bounded(150)
@given(parts=RECORDISH, cuts=CUTS)
def test_record_splitter_loses_nothing(parts: List[bytes], cuts: List[int]) -> None:
    """Records + pending == input; only NotTLSError; same records for any cut."""
    stream = b"".join(parts)

    def split(chunks: List[bytes]) -> Tuple[List[bytes], bytes, bool]:
        splitter = RecordSplitter()
        raws: List[bytes] = []
        for chunk in chunks:
            try:
                raws += [r.raw for r in splitter.feed(chunk)]
            except NotTLSError as exc:
                raws += [r.raw for r in exc.records]
                assert exc.offset == len(b"".join(raws))
                return raws, splitter.pending, True
        return raws, splitter.pending, False

    whole = split([stream])
    cut = split(Cutter(cuts).cut(stream))
    assert b"".join(whole[0]) + whole[1] == stream
    assert cut[0] == whole[0] and cut[2] == whole[2]


@bounded(200)
@given(buf=st.binary(max_size=400), tag=st.one_of(st.none(), st.sampled_from(["a1", "*", "x"])))
def test_reply_splitters_never_raise(buf: bytes, tag: Optional[str]) -> None:
    for dialect in (SMTP, IMAP):
        reply, rest = dialect.split_reply(buf, tag)
        if reply is None:
            assert rest == buf
        else:
            assert reply.raw + rest == buf and reply.lines


@bounded(80)
@given(
    c2s=RECORDISH,
    s2c=RECORDISH,
    cuts=CUTS,
    dialect=st.sampled_from(["smtp", "imap"]),
    end=st.sampled_from(["eof", "reset"]),
)
def test_follower_takes_any_bytes(
    c2s: List[bytes], s2c: List[bytes], cuts: List[int], dialect: str, end: str
) -> None:
    """Units only; every byte relayed once, in order; same units for any cut."""
    streams = {C2S: b"".join(c2s), S2C: b"".join(s2c)}

    def follow(sizes: Optional[List[int]]) -> Dict[str, List[Tuple[str, bytes]]]:
        follower = Follower(dialect, max_line=128)
        cutter = Cutter(sizes)
        units = []
        chunks = {d: cutter.cut(streams[d]) for d in (C2S, S2C)}
        for i in range(max(len(c) for c in chunks.values())):
            for d in (C2S, S2C):
                if i < len(chunks[d]):
                    units += follower.feed(d, chunks[d][i])
        for d in (C2S, S2C):
            units += follower.feed_eof(d) if end == "eof" else follower.feed_reset(d)
        for d in (C2S, S2C):
            relayed = b"".join(u.data for u in units if u.direction == d and u.relayable)
            assert relayed == streams[d], d
        # Per direction: how the two directions interleave follows the cut.
        return {
            d: [(u.kind, u.data) for u in units if u.direction == d and u.relayable]
            for d in (C2S, S2C)
        }

    lump = follow(None)
    # Only the cut of over-long plaintext lines may depend on the chunking.
    if all(len(line) <= 128 for line in streams[C2S].split(b"\n") + streams[S2C].split(b"\n")):
        assert follow(cuts) == lump
    else:
        follow(cuts)


def _engine_in(state: str, pki: Pki, version: str, policy: Optional[Policy]) -> Connection:
    """An engine with ``policy`` (client side unless noted) brought into ``state``."""
    if state == "plaintext":
        conn = Connection(policy)
        conn.hold_after(is_starttls)
        return conn
    if state == "handshaking-server":
        conn = Connection(policy)
        conn.start_tls(pki.server_context(version), server_side=True)
        return conn
    if state == "handshaking-client":
        conn = Connection(policy)
        conn.start_tls(pki.client_context(version), server_side=False, server_hostname="localhost")
        conn.data_to_send()
        return conn
    server_policy = policy or (Policy.relaxing(Rule.R5) if state == "close-received" else None)
    wire = _wire(Cutter([0]), False, policy, server_policy)
    _upgrade(wire, Ctx(pki, version))
    if state == "tls":
        return wire.client
    if state == "close-sent":
        wire.client.unwrap()
        wire.client.data_to_send()
        return wire.client
    if state == "close-received":
        wire.client.unwrap()
        wire.deliver(wire.client)
        return wire.server
    if state == "closed":
        wire.client.send_close_notify()
        wire.pump()
        return wire.server
    if state == "broken":
        wire.client.send_raw(b"NOT TLS\r\n")
        wire.pump()
        return wire.server
    raise AssertionError(state)


ENGINE_STATES = (
    "plaintext",
    "handshaking-server",
    "handshaking-client",
    "tls",
    "close-sent",
    "close-received",
    "closed",
    "broken",
)


#: Every rule relaxed at once: the misbehaving engines' odd transitions.
RELAXED = Policy.relaxing(*Rule)


@pytest.mark.parametrize(
    ("state", "relaxed"),
    [pytest.param(s, False, id=f"{s}-strict") for s in ENGINE_STATES]
    # (a fully relaxed engine refuses nothing, so it never gets "broken")
    + [pytest.param(s, True, id=f"{s}-relaxed") for s in ENGINE_STATES if s != "broken"],
)
@bounded(10)
@given(chunks=st.one_of(CHUNKS, RECORDISH), eof=st.booleans())
def test_engine_receive_data_only_reports(
    pki: Pki, tls_version: str, state: str, relaxed: bool, chunks: List[bytes], eof: bool
) -> None:
    """Arbitrary bytes in any state, strict or with every rule relaxed:
    events, never an exception; BROKEN stays terminal and a refused
    connection interprets nothing more."""
    conn = _engine_in(state, pki, tls_version, RELAXED if relaxed else None)
    events: List[Event] = []
    for chunk in chunks:
        if chunk:
            events += conn.receive_data(chunk)
        conn.data_to_send()
    if eof:
        events += conn.receive_data(b"")
    assert all(isinstance(e, Event) for e in events)
    if state == "broken":
        assert events == [] and conn.state in (State.BROKEN, State.DONE)
    enforced = [e for e in events if isinstance(e, Violation) and e.enforced]
    if enforced:
        after = events[events.index(enforced[0]) + 1 :]
        assert not [e for e in after if isinstance(e, (PlaintextData, TLSData))]
