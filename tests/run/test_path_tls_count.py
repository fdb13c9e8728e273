"""The path judge counts commands and replies under TLS (issue 16).

A server that runs a command pipelined behind STARTTLS inside TLS answers
once more than the client asked.  A client that survives replies shifted by
one completes its session, so completion alone proves nothing: the proxy
decrypts the TLS data (TLS 1.3 from the key log's traffic secrets, TLS 1.2
from its ``CLIENT_RANDOM`` line) and the judge counts.  Where it cannot read
the data, a completed session is ``skip``, never ``pass``.

The server under test here is a reference server seen from outside (its own
TLS-layer report hidden, as with real software), and the client is a test
client that takes any complete reply as the answer to its command.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, List, Optional, Sequence

import pytest
from starttls_harness.dialects import Reply, dialect_named
from starttls_harness.proxy import C2S, S2C, ProxyEvent
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.path import (
    ClientDriver,
    ClientSpec,
    PathPair,
    PathServer,
    StepHooks,
    run_path_target,
)
from starttls_harness.run.path_judge import (
    alert_after,
    client_ran_ahead,
    count_tls_exchange,
    judge_upgrade,
)
from starttls_harness.run.path_reference import reference_pair
from starttls_harness.run.server import RunSettings
from starttls_harness.scenarios.path import path_by_id
from starttls_harness.tls.aio import SwitchableTransport, open_connection
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import Event

Runner = Callable[..., Any]
P, F, K = Verdict.PASS, Verdict.FAIL, Verdict.SKIP
SETTINGS = RunSettings(reply_timeout=3.0, scenario_timeout=10.0, connect_timeout=3.0)
UPGRADE = "path.inject-after-starttls-c2s"


# ------------------------------------------------------------ the count alone


def _app(direction: str, text: Optional[bytes], method: str = "keylog") -> ProxyEvent:
    points = ("application-data", "record")
    return ProxyEvent(0.0, direction, "record", points[0], "", b"", method, points, clear=text)


FAULT = ProxyEvent(0.0, C2S, "injected", data=b"XHARNESS-INJECTED\r\n")


def _count(dialect: str, *events: ProxyEvent) -> Any:
    return count_tls_exchange([FAULT, *events], 0, dialect_named(dialect))


def test_one_reply_per_command_is_no_answer() -> None:
    count = _count(
        "smtp",
        _app(C2S, b"EHLO a\r\n"),
        _app(S2C, b"250-x\r\n250 y\r\n"),
        _app(C2S, b"NOOP\r\nQUIT\r\n"),
        _app(S2C, b"250 ok\r\n"),
        _app(S2C, b"221 bye\r\n"),
    )
    assert not count.unread and not count.answered
    assert (count.commands, count.replies) == (3, 3)


def test_one_reply_too_many_is_the_injected_commands_answer() -> None:
    count = _count(
        "smtp",
        _app(S2C, b"500 unknown command\r\n"),
        _app(C2S, b"EHLO a\r\n"),
        _app(S2C, b"250-x\r\n250 y\r\n"),
        _app(C2S, b"QUIT\r\n"),
        _app(S2C, b"221 bye\r\n"),
    )
    assert count.answered and [r.key for r in count.extra] == ["500"]  # asked by nobody
    assert "2 unit(s), the server 3 reply(ies)" in count.describe()


def test_a_message_body_does_not_hide_an_extra_reply() -> None:
    """After DATA's 354 the client's lines are the body, not commands."""
    session = [
        _app(C2S, b"MAIL FROM:<a@b>\r\n"),
        _app(S2C, b"250 ok\r\n"),
        _app(C2S, b"DATA\r\n"),
        _app(S2C, b"354 go on\r\n"),
        _app(C2S, b"Subject: x\r\n\r\nline\r\n.\r\n"),
        _app(S2C, b"250 queued\r\n"),
        _app(C2S, b"QUIT\r\n"),
        _app(S2C, b"250 shifted: the answer to something else\r\n"),
        _app(S2C, b"221 bye\r\n"),
    ]
    count = _count("smtp", *session)
    assert count.answered and [r.key for r in count.extra] == ["221"]
    assert not _count("smtp", *session[:-1]).answered


def test_lmtp_answers_a_body_once_per_recipient() -> None:
    session = [
        _app(C2S, b"RCPT TO:<a@b>\r\nRCPT TO:<c@d>\r\n"),
        _app(S2C, b"250 ok\r\n250 ok\r\n"),
        _app(C2S, b"DATA\r\n"),
        _app(S2C, b"354 go on\r\n"),
        _app(C2S, b"body\r\n.\r\n"),
        _app(S2C, b"250 a@b delivered\r\n250 c@d delivered\r\n"),
        _app(C2S, b"QUIT\r\n"),
        _app(S2C, b"221 bye\r\n"),
    ]
    assert not _count("lmtp", *session).answered
    assert _count("lmtp", *session, _app(S2C, b"250 one more\r\n")).answered


def test_a_reply_is_placed_where_its_record_passed() -> None:
    """A record classified late (its secret came after it) counts at its own
    place in the log, not at its note's."""
    pending = ProxyEvent(0.0, C2S, "record", detail="classification pending", index=7)
    note = ProxyEvent(
        0.0,
        C2S,
        "note",
        detail="record #7 classified late: application data",
        points=("application-data",),
        method="keylog",
        clear=b"NOOP\r\n",
    )
    count = _count("smtp", pending, _app(S2C, b"250 ok\r\n"), note)
    assert not count.unread and not count.answered


def test_an_unprompted_greeting_is_allowed_where_the_dialect_speaks_first() -> None:
    capabilities = b'"IMPLEMENTATION" "x"\r\nOK\r\n'
    count = _count("sieve", _app(S2C, capabilities), _app(C2S, b"NOOP\r\n"), _app(S2C, b"OK\r\n"))
    assert not count.answered
    assert _count("smtp", _app(S2C, b"220 hello\r\n")).answered


def test_a_goodbye_is_not_an_extra_reply() -> None:
    count = _count(
        "smtp", _app(C2S, b"NOOP\r\n"), _app(S2C, b"250 ok\r\n421 closing, idle too long\r\n")
    )
    assert not count.answered


def test_a_reply_to_the_injected_commands_tag() -> None:
    """IMAP: ``i1 OK`` where the client never sent a command tagged i1."""
    count = _count(
        "imap",
        _app(C2S, b"a2 CAPABILITY\r\n"),
        _app(S2C, b"i1 OK NOOP completed\r\n"),
        _app(S2C, b"* CAPABILITY IMAP4rev1\r\na2 OK done\r\n"),
    )
    assert count.answered and count.injected is not None and count.injected.key == "i1"


def test_unread_tls_data_is_said_so() -> None:
    position = _count("smtp", _app(C2S, None, "position"), _app(S2C, b"250 ok\r\n"))
    tls12 = _count("smtp", _app(C2S, b"NOOP\r\n"), _app(S2C, None, "record-type"))
    for count in (position, tls12):
        assert count.unread and not count.answered
        assert count.describe().startswith("the proxy cannot read the TLS data")
    assert "no key log" in position.unread


def test_a_record_still_waiting_for_its_secret_is_unread() -> None:
    pending = ProxyEvent(0.0, S2C, "record", detail="protected record, classification pending")
    assert _count("smtp", _app(C2S, b"NOOP\r\n"), pending).unread


def _judge(dialect: str, *events: ProxyEvent, completed: bool) -> str:
    stopped = None if completed else ("quit", ConnectionResetError("closed"))
    label, _ = judge_upgrade(
        [FAULT, *events], 0, S2C, [], completed, stopped, dialect_named(dialect)
    )
    return label


def test_a_broken_session_after_unread_tls_data_is_undecidable() -> None:
    """PostgreSQL refuses with a FATAL under TLS: unread, that is no answer
    out of step, and which side closes first is a race -- skip, not fail."""
    server_eof = ProxyEvent(0.0, S2C, "eof")
    client_eof = ProxyEvent(0.0, C2S, "eof")
    for ends in ((server_eof, client_eof), (client_eof, server_eof)):
        label = _judge("postgres", _app(S2C, None, "position"), *ends, completed=False)
        assert label == "tls-unread"
    # Nothing written under TLS, then closed: a refusal seen on the wire.
    assert _judge("postgres", server_eof, client_eof, completed=False) == "refused"


def test_a_goodbye_read_under_tls_is_a_refusal() -> None:
    fatal = b"E\x00\x00\x00\x17SFATAL\x00Mno thanks\x00\x00"
    events = (_app(C2S, b""), _app(S2C, fatal), ProxyEvent(0.0, C2S, "eof"))
    assert _judge("postgres", *events, completed=False) == "refused"


def test_completed_sessions() -> None:
    counted = (_app(C2S, b"NOOP\r\n"), _app(S2C, b"250 ok\r\n"))
    assert _judge("smtp", *counted, completed=True) == "discarded"
    assert _judge("smtp", _app(C2S, None, "record-type"), completed=True) == "tls-unread"
    extra = (*counted, _app(S2C, b"500 what\r\n"))
    assert _judge("smtp", *extra, completed=True) == "answered-in-tls"


# ------------------------------------ the client side: did it wait for its reply?

S2C_FAULT = ProxyEvent(0.0, S2C, "injected", data=b"250 injected\r\n")


def _judge_client(dialect: str, *events: ProxyEvent, completed: bool = True) -> str:
    stopped = None if completed else ("quit", ConnectionResetError("closed"))
    label, _ = judge_upgrade(
        [S2C_FAULT, *events], 0, C2S, [], completed, stopped, dialect_named(dialect)
    )
    return label


def test_a_client_that_runs_ahead_of_its_first_reply_consumed_the_injection() -> None:
    """SMTP: nothing may follow EHLO before its reply (RFC 2920)."""
    ahead = (
        _app(C2S, b"EHLO a\r\n"),
        _app(C2S, b"MAIL FROM:<a@b>\r\n"),
        _app(S2C, b"250-x\r\n250 y\r\n"),
        _app(S2C, b"250 ok\r\n"),
    )
    assert client_ran_ahead([S2C_FAULT, *ahead], 0, dialect_named("smtp")) == (
        "",
        "MAIL FROM:<a@b>\r\n",
    )
    assert _judge_client("smtp", *ahead) == "injection-consumed"
    assert _judge_client("smtp", *ahead, completed=False) == "injection-consumed"


def test_a_client_in_step_discarded_the_injection() -> None:
    in_step = (
        _app(C2S, b"EHLO a\r\n"),
        _app(S2C, b"250-x\r\n"),
        _app(S2C, b"250 y\r\n"),
        _app(C2S, b"QUIT\r\n"),
        _app(S2C, b"221 bye\r\n"),
    )
    assert _judge_client("smtp", *in_step) == "discarded"
    # Half a reply is no reply: a command sent after it still runs ahead.
    half = (_app(C2S, b"EHLO a\r\n"), _app(S2C, b"250-x\r\n"), _app(C2S, b"QUIT\r\n"))
    assert _judge_client("smtp", *half) == "injection-consumed"


def test_where_the_server_speaks_first_the_client_waits_for_it() -> None:
    ahead = (_app(C2S, b'AUTHENTICATE "PLAIN"\r\n'), _app(S2C, b'"SIEVE" "x"\r\nOK\r\n'))
    assert _judge_client("sieve", *ahead) == "injection-consumed"
    in_step = (_app(S2C, b'"SIEVE" "x"\r\nOK\r\n'), _app(C2S, b"LOGOUT\r\n"))
    assert _judge_client("sieve", *in_step) == "discarded"


def test_a_resync_sent_unread_is_not_running_ahead() -> None:
    """sieve-connect's ``NOOP "STARTTLS-RESYNC-CAPA"`` leaves before it reads anything."""
    caps = _app(S2C, b'"SIEVE" "x"\r\nOK\r\nOK (TAG "STARTTLS-RESYNC-CAPA") "Done"\r\n')
    for resync in (b'NOOP "STARTTLS-RESYNC-CAPA"\r\n', b"capability\r\n"):
        in_step = (_app(C2S, resync), caps, _app(C2S, b"LOGOUT\r\n"))
        assert client_ran_ahead([S2C_FAULT, *in_step], 0, dialect_named("sieve")) == ("", "")
        assert _judge_client("sieve", *in_step) == "discarded"
        # A resync does not hide a command that really ran ahead after it.
        ahead = (_app(C2S, resync + b"LOGOUT\r\n"), caps)
        assert _judge_client("sieve", *ahead) == "injection-consumed"
    # Elsewhere nothing is a resync: SMTP's NOOP before the EHLO reply runs ahead.
    assert not dialect_named("smtp").is_resync(b"NOOP\r\n")


def test_a_completed_client_session_unread_or_pipelined_is_undecidable() -> None:
    assert _judge_client("smtp", _app(C2S, None, "record-type")) == "tls-unread"
    pipelined = (_app(C2S, b"a1 CAPABILITY\r\na2 NOOP\r\n"), _app(S2C, b"a1 OK\r\n"))
    assert dialect_named("imap").awaits_first_tls_reply is False
    assert _judge_client("imap", *pipelined) == "tls-unread"


def test_an_alert_after_the_fault_is_found() -> None:
    alert = ProxyEvent(0.0, S2C, "record", points=("close-notify", "record"))
    assert alert_after([FAULT, alert], 0, S2C) is alert
    assert alert_after([alert, FAULT], 1, S2C) is None
    assert alert_after([FAULT, alert], 0, C2S) is None


# ------------------------------------------- a client that survives shifted replies


class _Buffer(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.more = asyncio.Event()
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.more.set()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.lost = True
        self.more.set()


class ShiftTolerantClient(ClientDriver):
    """Takes any complete reply as the answer to its command (never checks it):
    replies shifted by one do not break its session.  Strict TLS otherwise."""

    def __init__(self, spec: ClientSpec) -> None:
        self.spec = spec
        self.dialect = dialect_named(spec.dialect)
        self.t: Optional[SwitchableTransport] = None
        self.p: Optional[_Buffer] = None

    async def _reply(self, tag: Optional[str] = None) -> Reply:
        async def wait() -> Reply:
            assert self.p is not None
            while True:
                reply, rest = self.dialect.split_reply(self.p.data, tag)
                if reply is not None:
                    self.p.data = rest
                    return reply
                if self.p.lost:
                    raise ConnectionResetError("closed")
                self.p.more.clear()
                await self.p.more.wait()

        return await asyncio.wait_for(wait(), self.spec.timeout)

    async def _command(self, line: bytes) -> Reply:
        assert self.t is not None
        self.t.write(line)
        return await self._reply(self.dialect.tag_of(line) or self.dialect.any_reply_tag)

    async def connect(self, hooks: StepHooks) -> None:
        t, p = await open_connection(_Buffer, self.spec.host, self.spec.port)
        assert isinstance(p, _Buffer)
        self.t, self.p = t, p
        await self._reply()
        await self._command(self.dialect.hello())

    async def starttls(self, hooks: StepHooks) -> None:
        assert self.t is not None
        command = self.dialect.starttls()
        self.t.hold_after(self.dialect.final_line_of(command), once=True)
        if not (await self._command(command)).ok:
            raise ConnectionError("STARTTLS refused")
        await self.t.start_tls(
            self.spec.tls_context,
            server_side=False,
            server_hostname=self.spec.server_hostname,
            timeout=self.spec.timeout,
        )
        await self._command(self.dialect.hello())

    async def command(self, hooks: StepHooks) -> None:
        await self._command(self.dialect.sentinel())

    async def stoptls(self, hooks: StepHooks) -> None:
        raise NotImplementedError("only the upgrade scenarios")

    async def send_unit(self, hooks: StepHooks) -> None:
        raise NotImplementedError("only the upgrade scenarios")

    async def fetch_unit(self, hooks: StepHooks) -> None:
        raise NotImplementedError("only the upgrade scenarios")

    async def quit(self, hooks: StepHooks) -> None:
        await self._command(self.dialect.quit())

    def engine_events(self) -> Optional[Sequence[Event]]:
        return self.t.events if self.t is not None else None

    async def close(self) -> None:
        if self.t is not None:
            self.t.close()


class _Opaque(PathServer):
    """A reference server seen from outside: its own TLS-layer report is hidden."""

    def __init__(self, inner: PathServer) -> None:
        self.inner = inner
        self.address = inner.address

    async def settle(self, timeout: float) -> None:
        await self.inner.settle(timeout)

    async def close(self) -> None:
        await self.inner.close()


def _pair(dialect: str, server: str, pki: Pki, keylog: bool) -> PathPair:
    """The reference server (opaque) with the shift-tolerant client; with
    ``keylog`` the client writes its key log (the server's is not read)."""
    pair = reference_pair(dialect, server_behaviour=server, pki=pki)
    inner = pair.start_server

    async def start(version: str, settings: RunSettings) -> PathServer:
        return _Opaque(await inner(version, settings))

    pair.start_server = start
    pair.client = ShiftTolerantClient
    pair.writes_keylog = keylog
    return pair


def _one(run: Runner, pair: PathPair, tls_version: str, scenario: str = UPGRADE) -> Result:
    results: List[Result] = run(
        lambda: run_path_target(
            [path_by_id(scenario)], pair, SETTINGS, tls_versions=(tls_version,)
        ),
        60,
    )
    (result,) = results
    return result


def _notes(result: Result) -> str:
    return "\n".join(e.note for e in result.evidence.exchanges)


#: The dialects whose server speaks first: the test client's session fits them.
LINE_DIALECTS = ["smtp", "imap", "pop3", "sieve", "nntp", "lmtp", "ftp"]


@pytest.mark.parametrize("dialect", LINE_DIALECTS)
def test_injected_command_run_inside_tls_fails_from_the_decrypted_count(
    dialect: str, tls_version: str, pki: Pki, run: Runner
) -> None:
    """The client completes its session; the count still shows the answer."""
    result = _one(run, _pair(dialect, "keep-buffer", pki, keylog=True), tls_version)
    assert result.verdict is F, result.summary
    assert getattr(result, "side", None) == "server"
    assert "the server ran the injected command" in _notes(result)
    assert "stopped" not in _notes(result)  # the client's session did not break


@pytest.mark.parametrize("dialect", LINE_DIALECTS)
def test_without_a_key_log_a_completed_session_is_skip_never_pass(
    dialect: str, tls_version: str, pki: Pki, run: Runner
) -> None:
    result = _one(run, _pair(dialect, "keep-buffer", pki, keylog=False), tls_version)
    assert result.verdict is K, result.summary
    assert "the proxy cannot read the TLS data" in _notes(result)


@pytest.mark.parametrize("keylog", [True, False])
def test_the_strict_server_still_passes(
    keylog: bool, tls_version: str, pki: Pki, run: Runner
) -> None:
    """Refused in plaintext or by closing: decided on the wire, key log or not."""
    for scenario in (UPGRADE, UPGRADE + "-split"):
        result = _one(run, _pair("smtp", "strict", pki, keylog=keylog), tls_version, scenario)
        assert result.verdict is P, (scenario, result.summary)


def test_a_conforming_session_counts_even(tls_version: str, pki: Pki, run: Runner) -> None:
    """The strict reference pair with its key logs: the split injection is
    discarded or refused, and where the session completes the count is even."""
    pair = reference_pair("imap", pki=pki)
    result = _one(run, pair, tls_version, UPGRADE + "-split")
    assert result.verdict is P, result.summary
    notes = _notes(result)
    if "discarded" in result.summary:
        assert "none beyond the client's" in notes


# --------------------------- a reference client that takes injected responses


def _hidden(pair: PathPair) -> PathPair:
    """The client's own TLS-layer report hidden, as with a program."""
    inner = pair.client

    def client(spec: ClientSpec) -> ClientDriver:
        driver = inner(spec)
        setattr(driver, "engine_events", lambda: None)  # noqa: B010
        return driver

    pair.client = client
    return pair


#: Dialects whose client must wait for its first reply under TLS, and whose
#: accept-injected-response client shows it on the wire (POP3's and
#: ManageSieve's read the fake line into a multi-line reply and stay in step).
WAITING = ["smtp", "lmtp", "ftp", "nntp", "postgres"]
S2C_UPGRADE = "path.inject-after-starttls-s2c"


@pytest.mark.parametrize("dialect", WAITING)
def test_a_client_taking_the_injected_response_fails_from_the_decrypted_order(
    dialect: str, tls_version: str, pki: Pki, run: Runner
) -> None:
    pair = reference_pair(dialect, client_behaviour="accept-injected-response", pki=pki)
    result = _one(run, _hidden(pair), tls_version, S2C_UPGRADE)
    assert result.verdict is F, result.summary
    assert getattr(result, "side", None) == "client"
    notes = _notes(result)
    # It either breaks on the shifted replies or goes on out of order.
    assert "before the server's first reply" in notes or "failed" in notes, notes


def test_a_client_going_on_after_the_injected_response_fails_from_the_order(
    tls_version: str, pki: Pki, run: Runner
) -> None:
    """FTP's client survives: only the decrypted order shows it went on early."""
    pair = reference_pair("ftp", client_behaviour="accept-injected-response", pki=pki)
    for scenario in (S2C_UPGRADE, S2C_UPGRADE + "-split"):
        result = _one(run, _hidden(pair), tls_version, scenario)
        assert result.verdict is F, result.summary
        assert "before the server's first reply" in _notes(result)


@pytest.mark.parametrize("dialect", WAITING)
def test_the_strict_client_passes_with_or_without_a_key_log(
    dialect: str, tls_version: str, pki: Pki, run: Runner
) -> None:
    for keylog in (True, False):
        pair = _hidden(reference_pair(dialect, pki=pki))
        pair.writes_keylog = keylog
        for scenario in (S2C_UPGRADE, S2C_UPGRADE + "-split"):
            result = _one(run, pair, tls_version, scenario)
            assert result.verdict is P, (keylog, scenario, result.summary)


@pytest.mark.parametrize("dialect", ["smtp", "pop3", "ftp"])
def test_without_a_key_log_a_surviving_client_is_never_a_pass(
    dialect: str, pki: Pki, run: Runner
) -> None:
    """TLS 1.3 by position: what the client sent under TLS cannot be read."""
    pair = reference_pair(dialect, client_behaviour="accept-injected-response", pki=pki)
    pair = _hidden(pair)
    pair.writes_keylog = False
    result = _one(run, pair, "1.3", S2C_UPGRADE)
    assert result.verdict is K, result.summary
    assert "the proxy cannot read the TLS data" in _notes(result)


def test_a_pipelining_dialect_is_undecidable_from_order(pki: Pki, run: Runner) -> None:
    pair = _hidden(reference_pair("imap", client_behaviour="accept-injected-response", pki=pki))
    result = _one(run, pair, "1.3", S2C_UPGRADE)
    assert result.verdict is K, result.summary
    assert "lets a client pipeline" in _notes(result)
