"""The client catalogue is sound, and its validation matrix holds on real sockets.

The harness plays a scripted (faulty) server against a client under test
(:mod:`starttls_harness.run.client`).  Every scenario passes against the strict
reference clients; every misbehaving reference client gets exactly the
verdicts of :data:`starttls_harness.scenarios.client.CLIENT_EXPECTED` -- no more, no
fewer; and two real clients, ``smtplib`` and ``imaplib``, run as external
commands show the command path end to end.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
from cryptography import x509
from starttls_harness.dialects import RETURN_TO_PLAINTEXT, dialect_named, names
from starttls_harness.dialects.imap import next_tag
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.client import (
    CLIENT_STEP_NAMES,
    run_client_scenario,
    run_client_target,
    unknown_client_steps,
)
from starttls_harness.run.client_checks import check_client, validate_client
from starttls_harness.run.client_support import ClientSettings
from starttls_harness.run.server import RunSettings
from starttls_harness.run.targets import (
    HOSTNAME,
    ClientOutcome,
    ClientTarget,
    CommandClientTarget,
    MissingPortPlaceholder,
    ReferenceClientTarget,
    client_behaviours,
    error_line,
)
from starttls_harness.run.validation import CLIENT_VALIDATION_SETTINGS, mismatches
from starttls_harness.scenarios.ccc import CLIENT_CCC_SCENARIOS
from starttls_harness.scenarios.client import (
    CLIENT_COMMON,
    CLIENT_EXPECTED,
    CLIENT_SCENARIOS,
    REMOVAL_SCENARIOS,
    SPEC_CLIENT_IDS,
    client_by_id,
    client_expected_by_dialect,
    expected_client_verdicts,
)
from starttls_harness.scenarios.server import COMMON, Scenario
from starttls_harness.tls.aio import SwitchableTransport, open_connection
from starttls_harness.tls.certs import client_context, make_pki
from starttls_harness.tls.engine import Policy, Rule

P, F, W, K, E = Verdict.PASS, Verdict.FAIL, Verdict.WARN, Verdict.SKIP, Verdict.ERROR

Run = Callable[..., Any]

#: Tight bounds for runs where the client is expected to stall.
SHORT = RunSettings(reply_timeout=0.2, connect_timeout=1.0, scenario_timeout=3.0, concurrency=16)


def _ids(results: List[Result]) -> Dict[str, Verdict]:
    return {r.id: r.verdict for r in results}


# ------------------------------------------------------------ structure


def test_ids_are_unique_and_cover_the_spec() -> None:
    ids = [s.id for s in CLIENT_SCENARIOS]
    assert len(ids) == len(set(ids))
    assert set(ids) >= SPEC_CLIENT_IDS
    assert all(i.startswith("client.") for i in ids)


@pytest.mark.parametrize("scenario", CLIENT_SCENARIOS, ids=lambda s: s.id)
def test_scenario_is_complete_data(scenario: Scenario) -> None:
    assert scenario.role == "client"
    assert scenario.title and scenario.reason and scenario.reference
    # PREAUTH exists in IMAP only (the dialect's has_preauth flag); the forged
    # capability list and the tagged shapes where the dialect has them.
    flags = {
        "client.starttls-preauth": "has_preauth",
        "client.response-injection-capabilities": "has_capability_list_reply",
        "client.response-injection-tagged": "has_tagged_replies",
        "client.starttls-untagged": "has_tagged_replies",
        "client.starttls-required-stripped": "marks_starttls_required",
    }
    if scenario.id in flags:
        flag = flags[scenario.id]
        assert set(scenario.dialects) == {d for d in names() if getattr(dialect_named(d), flag)}
    elif scenario.id in REMOVAL_SCENARIOS:  # the server removes TLS: LDAP
        wanted = {d for d in names() if dialect_named(d).return_by_closure}
        assert set(scenario.dialects) == wanted
    elif scenario.id == "client.one-sided-close":  # staged on a STOPTLS command
        wanted = {d for d in RETURN_TO_PLAINTEXT if not dialect_named(d).return_by_closure}
        assert set(scenario.dialects) == wanted
    elif scenario.id in ("client.stoptls-wait", "client.stoptls-cycle"):
        assert set(scenario.dialects) == set(RETURN_TO_PLAINTEXT)  # not postgres
    elif scenario.id == "client.state-reset":  # a hello must follow each transition
        wanted = {d for d in names() if dialect_named(d).rereads_capabilities}
        assert set(scenario.dialects) == wanted
    else:
        assert set(scenario.dialects) == set(names())
    assert set(scenario.tls_versions) == {"1.2", "1.3"}
    verdicts = {e.verdict for e in scenario.expect.values()}
    # A check that cannot pass, or cannot fail or warn, is a defect.
    assert P in verdicts
    assert verdicts & {F, W}
    assert sum(step.fault for step in scenario.steps) >= 1 or scenario.id.endswith("cycle")
    assert scenario.outcome("something-new").verdict is E
    assert scenario.outcome("timeout").verdict is E
    assert scenario.outcome("violation:R4").verdict is F


def test_every_step_is_in_the_verb_table() -> None:
    assert unknown_client_steps(CLIENT_SCENARIOS) == []
    used = {step.action for s in (*CLIENT_SCENARIOS, *CLIENT_CCC_SCENARIOS) for step in s.steps}
    assert used <= CLIENT_STEP_NAMES
    # Every verb is used by some scenario (no dead entries in the table).
    assert CLIENT_STEP_NAMES <= used


def test_common_outcomes_never_pass() -> None:
    assert all(e.verdict is not P for e in CLIENT_COMMON.values())
    assert all(e.verdict is not P for e in COMMON.values())


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_every_client_behaviour_has_an_expectation(dialect: str) -> None:
    assert set(client_behaviours(dialect)) <= set(CLIENT_EXPECTED)
    ids = {s.id for s in CLIENT_SCENARIOS}
    for behaviour in client_behaviours(dialect):
        expected = expected_client_verdicts(dialect, behaviour)
        assert set(expected) <= ids
        assert P not in expected.values()
        assert (behaviour == "strict") == (not expected)


def test_dialect_specific_expectations_name_real_behaviours() -> None:
    for dialect, behaviour in client_expected_by_dialect():
        assert behaviour in client_behaviours(dialect)
    # Every behaviour in the table exists in at least one client.
    assert set(CLIENT_EXPECTED) == set(client_behaviours("smtp")) | set(client_behaviours("imap"))


def test_next_tag_follows_the_client_numbering() -> None:
    assert next_tag(b"a2") == b"a3"
    assert next_tag(b"KMLE9") == b"KMLE10"
    assert next_tag(b"A009") == b"A010"
    assert next_tag(b"tag") is None


# ------------------------------------------------ the validation matrix


_MATRIX = [(d, b) for d in ("smtp", "imap") for b in client_behaviours(d)]


@pytest.mark.parametrize(("dialect", "behaviour"), _MATRIX, ids=[f"{d}-{b}" for d, b in _MATRIX])
def test_validation_matrix(dialect: str, behaviour: str, tls_version: str, run: Run) -> None:
    started = time.monotonic()
    results, problems = run(lambda: validate_client(dialect, behaviour, (tls_version,)), 60)
    elapsed = time.monotonic() - started
    assert len(results) == len([s for s in CLIENT_SCENARIOS if dialect in s.dialects])
    assert problems == []
    if behaviour == "strict":
        assert all(r.verdict is P for r in results)
    else:
        # The scenario guarding the broken rule does not pass.
        guarded = next(iter(expected_client_verdicts(dialect, behaviour)))
        assert _ids(results)[guarded] is not P
    # Every non-pass result carries its evidence.
    for r in results:
        if r.verdict is not P:
            assert r.evidence.exchanges and r.summary
    # The whole catalogue against one reference client takes well under a second
    # (generously bounded here for slow CI machines).
    assert elapsed < 20


def test_injected_bytes_are_marked_in_the_evidence(tls_version: str, run: Run) -> None:
    target = ReferenceClientTarget("imap", "accept-injected-response")
    result = run(
        lambda: run_client_scenario(
            client_by_id("client.response-injection"),
            target,
            tls_version,
            CLIENT_VALIDATION_SETTINGS,
        )
    )
    assert result.verdict is F
    injected = result.evidence.injected()
    assert injected and b"LOGINDISABLED" in injected[0].data
    assert injected[0].direction == "s2c"
    # The client's next command was answered from the injected completion.
    assert any(e.direction == "c2s" and e.kind == "close_notify" for e in result.evidence.exchanges)


def test_stoptls_cycle_asks_the_reference_client_for_three_cycles(
    tls_version: str, run: Run
) -> None:
    result = run(
        lambda: run_client_scenario(
            client_by_id("client.stoptls-cycle"),
            ReferenceClientTarget("smtp"),
            tls_version,
            CLIENT_VALIDATION_SETTINGS,
        )
    )
    assert result.verdict is P
    notes = " ".join(e.note for e in result.evidence.exchanges)
    assert "3 STOPTLS cycle(s)" in notes
    greetings = [
        e
        for e in result.evidence.exchanges
        if e.direction == "s2c" and e.data.startswith(b"220 fake.invalid")
    ]
    assert len(greetings) == 1 + 3  # the first greeting, then one after each closure


# ------------------------------------- fail paths no reference client shows


class _Lines(asyncio.Protocol):
    """Collects SMTP replies for the hand-made client below."""

    def __init__(self) -> None:
        self.buf = b""
        self.lost = False
        self.changed = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.changed.set()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.lost = True
        self.changed.set()

    async def reply(self) -> bytes:
        async def wait() -> bytes:
            while True:
                lines = self.buf.split(b"\r\n")
                for i, line in enumerate(lines[:-1]):
                    if line[3:4] != b"-":
                        reply = b"\r\n".join(lines[: i + 1]) + b"\r\n"
                        self.buf = self.buf[len(reply) :]
                        return reply
                if self.lost:
                    raise ConnectionResetError("the server closed the connection")
                self.changed.clear()
                await self.changed.wait()

        return await asyncio.wait_for(wait(), 3.0)


async def _resuming_client(host: str, port: int, cafile: Path, tls_version: str) -> ClientOutcome:
    """A client that resumes plaintext on a one-sided closure (R4 relaxed).

    It is ready for the server's closure when it sends STOPTLS, answers the
    close_notify even though the greeting came glued to it, and reads that
    greeting as plaintext -- the bug ``client.one-sided-close`` looks for.
    """
    transport, protocol = await open_connection(_Lines, host, port, policy=Policy.relaxing(Rule.R4))
    assert isinstance(transport, SwitchableTransport) and isinstance(protocol, _Lines)
    try:
        await protocol.reply()
        transport.write(b"EHLO resuming.invalid\r\n")
        await protocol.reply()
        transport.hold_after(lambda line: line[3:4] != b"-", once=True)
        transport.write(b"STARTTLS\r\n")
        await protocol.reply()
        await transport.start_tls(
            client_context(tls_version, cafile=cafile),
            server_side=False,
            server_hostname="localhost",
        )
        transport.write(b"EHLO resuming.invalid\r\n")
        assert b"STOPTLS" in await protocol.reply()
        transport.events.extend(transport.engine.accept_unwrap())
        transport.write(b"STOPTLS\r\n")
        await protocol.reply()  # 220 Ready to end TLS
        await protocol.reply()  # the greeting glued to the close_notify
        transport.write(b"EHLO resuming.invalid\r\n")  # in plaintext
        await protocol.reply()
    except (ConnectionError, asyncio.TimeoutError) as exc:
        return ClientOutcome(False, repr(exc))
    finally:
        transport.abort()
    return ClientOutcome(True, "resumed plaintext")


def test_one_sided_close_fails_a_client_that_resumes(tls_version: str, run: Run) -> None:
    target = ClientTarget("smtp", _resuming_client, "resuming test client")
    result = run(
        lambda: run_client_scenario(
            client_by_id("client.one-sided-close"), target, tls_version, CLIENT_VALIDATION_SETTINGS
        )
    )
    assert result.verdict is F, result.evidence.exchanges
    assert "resumed plaintext" in result.summary
    plaintext_after = [
        e
        for e in result.evidence.exchanges
        if e.direction == "c2s" and e.kind == "plaintext" and e.data.startswith(b"EHLO")
    ]
    assert len(plaintext_after) == 2  # before STARTTLS, and after the one-sided closure


# --------------------------------------- decisions from events, not silence


async def _silent_client(host: str, port: int, cafile: Path, tls_version: str) -> ClientOutcome:
    """Connects and never says a word (until it is cancelled)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.read()  # until the harness closes
        await asyncio.sleep(3600)  # then hang: the harness must cancel us
    finally:
        writer.close()
    return ClientOutcome(True, "unreachable")


def test_a_silent_client_is_an_error_not_a_pass(tls_version: str, run: Run) -> None:
    target = ClientTarget("smtp", _silent_client, "silent client")
    started = time.monotonic()
    results = run(
        lambda: run_client_target(CLIENT_SCENARIOS, target, SHORT, tls_versions=(tls_version,))
    )
    assert time.monotonic() - started < 15
    assert {r.verdict for r in results} == {E}
    assert all("sanity probe failed" in r.summary for r in results)


def test_a_silent_client_times_out_in_each_scenario(tls_version: str, run: Run) -> None:
    target = ClientTarget("imap", _silent_client, "silent client")
    settings = RunSettings(
        reply_timeout=0.2, connect_timeout=1.0, scenario_timeout=3.0, concurrency=16, sanity=False
    )
    results = run(
        lambda: run_client_target(CLIENT_SCENARIOS, target, settings, tls_versions=(tls_version,))
    )
    assert {r.verdict for r in results} == {E}
    for r in results:
        assert any("within" in e.note for e in r.evidence.exchanges), r.id


def test_a_client_that_never_connects_is_an_error(tls_version: str, run: Run) -> None:
    async def absent(host: str, port: int, cafile: Path, tls_version: str) -> ClientOutcome:
        return ClientOutcome(False, "could not be bothered")

    settings = RunSettings(reply_timeout=0.2, connect_timeout=1.0, sanity=False)
    scenario = client_by_id("client.starttls-stripped")
    result = run(
        lambda: run_client_scenario(
            scenario, ClientTarget("smtp", absent, "x"), tls_version, settings
        )
    )
    assert result.verdict is E
    assert "did not connect" in result.summary


def test_a_second_connection_is_refused(tls_version: str, run: Run) -> None:
    async def twice(host: str, port: int, cafile: Path, tls_version: str) -> ClientOutcome:
        first = await asyncio.open_connection(host, port)
        second = await asyncio.open_connection(host, port)
        try:
            assert await asyncio.wait_for(second[0].read(), 3.0) == b""  # closed at once
            assert (await asyncio.wait_for(first[0].readline(), 3.0)).startswith(b"220 ")
            first[1].write(b"QUIT\r\n")
            await asyncio.wait_for(first[0].read(), 3.0)
        finally:
            first[1].close()
            second[1].close()
        return ClientOutcome(False, "gave up")

    scenario = client_by_id("client.starttls-stripped")
    result = run(
        lambda: run_client_scenario(
            scenario, ClientTarget("smtp", twice, "x"), tls_version, CLIENT_VALIDATION_SETTINGS
        )
    )
    assert result.verdict is P  # it gave up without sending anything sensitive
    notes = [e.note for e in result.evidence.exchanges]
    assert "a further connection from the client was refused" in notes


# ------------------------------------------------------ external clients

SMTPLIB_CLIENT = """\
import smtplib, ssl, sys
host, port, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.create_default_context(cafile=cafile)
with smtplib.SMTP(host, port, timeout=5) as smtp:
    smtp.ehlo()
    smtp.starttls(context=context)
    smtp.ehlo()
    smtp.login("tester", "correct horse")
    smtp.sendmail("a@example.invalid", ["b@example.invalid"], b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
"""

IMAPLIB_CLIENT = """\
import imaplib, ssl, sys
host, port, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.create_default_context(cafile=cafile)
imap = imaplib.IMAP4(host, port, timeout=5)
imap.starttls(ssl_context=context)
imap.login("tester", "correct horse")
imap.append("INBOX", None, None, b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
imap.logout()
"""

#: What the stdlib clients really do (observed; every other scenario passes).
#: Neither speaks STOPTLS, so the three STOPTLS scenarios cannot be applied.
_NO_STOPTLS = {
    "client.one-sided-close": K,
    "client.stoptls-wait": K,
    "client.stoptls-cycle": K,
}
STDLIB_EXPECTED: Dict[str, Dict[str, Verdict]] = {
    "smtp": {
        **_NO_STOPTLS,
        # smtplib wraps the socket with SSLContext.wrap_socket's default
        # suppress_ragged_eofs=True: a TCP FIN without close_notify reads as
        # a clean end of stream, so the cut "250 2.0.0 Ok: qu" (no CRLF) is
        # parsed as a complete 250 and sendmail() returns success (R6).
        "client.truncation": F,
        # On the server's close_notify, SSLSocket.recv() returns b"" and
        # smtplib closes the socket without unwrap(): no close_notify back.
        "client.close-notify-reply": W,
    },
    "imap": {
        **_NO_STOPTLS,
        # Same ragged EOF as smtplib, but imaplib refuses a line without
        # CRLF ("unterminated line") and raises: the truncation is reported.
        # Like smtplib it closes without answering close_notify.
        "client.close-notify-reply": W,
    },
}
# Both pass the injection scenarios: starttls() replaces the buffered file
# object (smtplib: self.file = None; imaplib: a new makefile()), so the
# injected response read ahead with the STARTTLS answer is discarded, and one
# that arrives after the ClientHello breaks the handshake (OpenSSL: wrong
# version number).  Both re-read EHLO / CAPABILITY after STARTTLS, and both
# raise when STARTTLS is missing or refused (smtplib: SMTPNotSupportedError /
# SMTPResponseException; imaplib: IMAP4.abort / IMAP4.error).


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_stdlib_client_as_an_external_command(
    dialect: str, tls_version: str, tmp_path: Path, run: Run
) -> None:
    script = tmp_path / f"{dialect}_client.py"
    script.write_text(SMTPLIB_CLIENT if dialect == "smtp" else IMAPLIB_CLIENT)
    argv = [sys.executable, str(script), "{host}", "{port}", "{cafile}"]
    results = run(
        lambda: check_client(
            dialect,
            argv,
            CLIENT_SCENARIOS,
            CLIENT_VALIDATION_SETTINGS,
            tls_versions=(tls_version,),
        ),
        60,
    )
    assert len(results) == len([s for s in CLIENT_SCENARIOS if dialect in s.dialects])
    assert mismatches(results, STDLIB_EXPECTED[dialect]) == []
    # The outcome (exit status, stderr) is part of the evidence.
    truncation = next(r for r in results if r.id == "client.truncation")
    assert any("exit status" in e.note for e in truncation.evidence.exchanges)


def test_command_placeholders_are_replaced() -> None:
    target = CommandClientTarget(
        "smtp", ["client", "{host}:{port}", "--ca={cafile}", "-t{tls_version}", "{cycles}", "{x}"]
    )
    assert target.accepts_cycles
    asked = target.asking_for_cycles(3)
    assert isinstance(asked, CommandClientTarget)
    argv = asked.expand("127.0.0.1", 2525, Path("/tmp/ca.pem"), "1.3")
    assert argv == ["client", "127.0.0.1:2525", "--ca=/tmp/ca.pem", "-t1.3", "3", "{x}"]
    plain = CommandClientTarget("imap", ["client", "{port}"])
    assert not plain.accepts_cycles and plain.asking_for_cycles(3) is plain
    named = CommandClientTarget("imap", ["client", "--host={hostname}", "{host}", "{port}"])
    expanded = named.expand("127.0.0.1", 143, Path("/tmp/ca.pem"), "1.2")
    assert expanded == ["client", "--host=localhost", "127.0.0.1", "143"]
    with pytest.raises(ValueError):
        CommandClientTarget("gopher", ["client", "{port}"])
    with pytest.raises(ValueError):
        CommandClientTarget("smtp", [])


def test_a_command_without_port_is_a_usage_error_before_anything_runs() -> None:
    with pytest.raises(MissingPortPlaceholder, match=r"no \{port\}"):
        CommandClientTarget("smtp", ["client", "{host}", "{cafile}"])


def test_a_client_that_never_connects_is_one_error_in_seconds(tmp_path: Path, run: Run) -> None:
    """Exits at once without connecting: every row is the same one clear cause,
    with the client's own words, and the second TLS version costs no new wait."""
    script = tmp_path / "noconnect.py"
    script.write_text(
        "import sys\nprint('cannot resolve mail.example: try --host', file=sys.stderr)\n"
        "print('see the manual for more', file=sys.stderr)\nsys.exit(3)\n"
    )
    settings = RunSettings(reply_timeout=0.5, connect_timeout=3.0, scenario_timeout=5.0)
    started = time.monotonic()
    results = run(
        lambda: check_client("smtp", [sys.executable, str(script), "{port}"], None, settings)
    )
    assert time.monotonic() - started < 10
    assert results and all(r.verdict is E for r in results)
    assert {r.summary for r in results} == {
        "sanity probe failed before the run: the client never connected to the fake server "
        "(client outcome: failure: exit status 3: cannot resolve mail.example: try --host)"
    }
    tails = [e for e in results[0].evidence.exchanges if e.note == "client stderr (tail)"]
    assert tails and b"see the manual" in tails[0].data


def test_error_line_prefers_the_error_to_advice() -> None:
    out = b"connecting...\ncurl: (8) Weird server reply\nMore details here: https://x\n"
    assert error_line(out) == "curl: (8) Weird server reply"
    assert error_line(b"first\nlast\n") == "last"
    assert error_line(b"") == ""


def test_the_certificate_names_localhost_in_cn_and_san(tmp_path: Path) -> None:
    pki = make_pki(directory=tmp_path)
    cert = x509.load_pem_x509_certificate(Path(str(pki.certfile)).read_bytes())
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [a.value for a in cn] == [HOSTNAME]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert HOSTNAME in san.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def test_a_missing_command_is_an_error(tls_version: str, run: Run) -> None:
    results = run(
        lambda: check_client(
            "smtp",
            ["/nonexistent/starttls-client", "{port}"],
            [client_by_id("client.starttls-stripped")],
            SHORT,
            tls_versions=(tls_version,),
        )
    )
    assert [r.verdict for r in results] == [E]


def test_a_hanging_command_is_killed(tls_version: str, tmp_path: Path, run: Run) -> None:
    pidfile = tmp_path / "pid"
    script = tmp_path / "hang.py"
    script.write_text(
        "import os, sys, time\n"
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(600)\n"
    )
    settings = RunSettings(reply_timeout=0.2, connect_timeout=0.8, scenario_timeout=3.0)
    started = time.monotonic()
    results = run(
        lambda: check_client(
            "imap",
            [sys.executable, str(script), "{port}"],
            [client_by_id("client.truncation")],
            settings,
            tls_versions=(tls_version,),
        )
    )
    assert time.monotonic() - started < 20
    assert [r.verdict for r in results] == [E]
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone (killed and reaped)


def test_reference_target_rejects_unknown_behaviours() -> None:
    with pytest.raises(ValueError):
        ReferenceClientTarget("imap", "ignore-truncation")  # an SMTP-only behaviour
    with pytest.raises(ValueError):
        ReferenceClientTarget("gopher")


async def _hello_after_refusal(
    host: str, port: int, cafile: Path, tls_version: str
) -> ClientOutcome:
    """Ignores the refusal of STARTTLS and sends a ClientHello anyway."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.readline()  # greeting
        writer.write(b"EHLO client.invalid\r\n")
        while not (await reader.readline())[3:4] == b" ":
            pass
        writer.write(b"STARTTLS\r\n")
        refusal = await reader.readline()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_context(tls_version, cafile=cafile).wrap_bio(
            incoming, outgoing, server_hostname=HOSTNAME
        )
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        writer.write(outgoing.read())
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    return ClientOutcome(answer == b"", f"refused with {refusal!r}; then answered {answer!r}")


def test_a_client_hello_is_never_answered_as_commands(tls_version: str, run: Run) -> None:
    target = ClientTarget("smtp", _hello_after_refusal, "hello after a refusal")
    scenario = client_by_id("client.starttls-refused")
    result = run(lambda: run_client_scenario(scenario, target, tls_version, SHORT))
    assert result.verdict is P, result.summary
    notes = [e.note for e in result.evidence.exchanges]
    assert "a ClientHello, not a command" in notes
    assert any("then answered b''" in n for n in notes)  # not a byte back
    after = notes.index("a ClientHello, not a command")
    assert not [e for e in result.evidence.exchanges[after:] if e.direction == "s2c"]


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_close_notify_answered_later_than_the_bound_is_a_warn_with_the_time(
    dialect: str, tls_version: str, run: Run
) -> None:
    scenario = client_by_id("client.close-notify-reply")
    target = ReferenceClientTarget(dialect, timeout=2.0)
    at_once = ClientSettings(reply_timeout=2.0, connect_timeout=2.0, scenario_timeout=5.0)
    result = run(lambda: run_client_scenario(scenario, target, tls_version, at_once))
    assert result.verdict is P, result.summary
    # With a bound no real answer can meet, the same conforming client is late.
    strict = replace(at_once, close_notify_bound=0.0)
    result = run(lambda: run_client_scenario(scenario, target, tls_version, strict))
    assert result.verdict is W
    assert re.fullmatch(
        r"answered close_notify, but not at once after \d+\.\d\d s \(bound 0 s\)", result.summary
    )


def test_the_imap_injection_predicts_the_next_tag_only() -> None:
    """The predicted completion is part of the injected bytes (never an answer
    to a command): the STARTTLS tag plus one, and none where there is no number."""
    scripted = dialect_named("imap").scripted_server()
    starttls = scripted.parse(b"a2 STARTTLS\r\n", tls=False)
    assert scripted.injection(starttls).endswith(b"\r\na3 OK CAPABILITY completed\r\n")
    assert scripted.shaped_injection("tagged", starttls) == b"a3 OK CAPABILITY completed\r\n"
    untagged = scripted.shaped_injection("untagged-before-answer", starttls)
    assert untagged is not None and all(line.startswith(b"* ") for line in untagged.splitlines())
    bare = scripted.parse(b"tag STARTTLS\r\n", tls=False)
    assert scripted.shaped_injection("tagged", bare) is None
    assert scripted.injection(bare) == b"* CAPABILITY IMAP4rev1 LOGINDISABLED\r\n"
    smtp = dialect_named("smtp").scripted_server()
    assert smtp.shaped_injection("tagged", starttls) is None
    forged = smtp.shaped_injection("capabilities", smtp.parse(b"STARTTLS\r\n", tls=False))
    assert forged is not None and b"AUTH" not in forged and forged.startswith(b"250-")
