"""Server verdicts decided from the wire, each shown failing and passing.

A target that stays open and silent after our close_notify is asked a
plaintext command after the reply bound (issue 10, item 2): the peer here
(:class:`SilentThenPlain`, the hostile mini server of ``test_hostile`` with
its engine relaxed for R5, R4 and R2) never answers close_notify and answers
the plaintext probe in plaintext, which a real server was seen doing.  The
conforming peer is the strict reference server.  A fail or warn names the
rule its summary is about in the rule column too (item 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any, AsyncContextManager, AsyncIterator, Dict, List, Set, Tuple

import pytest
from starttls_harness.report.formats import ladder
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.reference import reference_servers, server_module
from starttls_harness.run.server import (
    RunSettings,
    ServerTarget,
    TargetUnusable,
    run_server_target,
)
from starttls_harness.scenarios.expectations import SERVER_EXPECTED
from starttls_harness.scenarios.server import CATALOGUE, by_id
from starttls_harness.servers.base import ServerConfig
from starttls_harness.tls.aio import create_server
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import Event, PlaintextData, Policy, Rule, TLSData
from test_hostile import Hostility, MiniServer, serve_mini

Runner = Any
SETTINGS = RunSettings(reply_timeout=0.5, scenario_timeout=5.0, connect_timeout=1.0)
P, F, W, K, E = Verdict.PASS, Verdict.FAIL, Verdict.WARN, Verdict.SKIP, Verdict.ERROR

#: The scenarios that go on to a plaintext probe when the target stays silent.
PROBING = ("server.plaintext-after-close", "server.data-after-close-notify")


class SilentThenPlain(MiniServer):
    """Ignores our close_notify (no answer, no close), then answers plaintext in plaintext."""

    def engine_event(self, event: Event) -> None:
        if self.hostile and (
            isinstance(event, PlaintextData) or (isinstance(event, TLSData) and not event.protected)
        ):
            assert self.t is not None
            words = event.data.split()
            tag = words[0] if self.dialect == "imap" and words else b""
            self.t.write_raw(self.say.ok.replace(b"{tag}", tag))
            return
        super().engine_event(event)


@contextlib.asynccontextmanager
async def silent_then_plain(
    dialect: str, pki: Pki, tls_version: str
) -> AsyncIterator[ServerTarget]:
    tasks: Set[Any] = set()
    protocols: List[MiniServer] = []
    ctx = pki.server_context()

    def factory() -> asyncio.Protocol:
        protocol = SilentThenPlain(dialect, ctx, Hostility("silence", "close-notify"), tasks)
        protocols.append(protocol)
        return protocol

    server = await create_server(
        factory, "127.0.0.1", 0, policy=Policy.relaxing(Rule.R5, Rule.R4, Rule.R2)
    )
    port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
    try:
        yield ServerTarget(
            dialect, "127.0.0.1", port, tls_versions=(tls_version,), cafile=pki.cafile
        )
    finally:
        server.close()
        for protocol in protocols:
            if protocol.t is not None:
                protocol.t.abort()
        await asyncio.wait_for(server.wait_closed(), 5.0)


def _by_id(results: List[Result]) -> dict:  # type: ignore[type-arg]
    return {r.id: r for r in results}


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_silent_peer_that_answers_plaintext_fails_r3(
    dialect: str, pki: Pki, tls_version: str, run: Runner
) -> None:
    """Open and silent after close_notify, then a plaintext answer: fail, R3."""
    chosen = [by_id(i) for i in (*PROBING, "server.close-notify-reply")]

    async def body() -> List[Result]:
        async with silent_then_plain(dialect, pki, tls_version) as target:
            return await run_server_target(chosen, target, SETTINGS)

    results = _by_id(run(body, 30.0))
    for sid in (*PROBING, "server.close-notify-reply"):
        r = results[sid]
        assert r.verdict is F, (sid, r.summary)
        assert r.rule == "R3" and "R3" in r.summary, (sid, r.rule, r.summary)
        kinds = [e.kind for e in r.evidence.exchanges]
        assert "injected" in kinds  # the plaintext probe is on the ladder, marked


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_conforming_server_passes_the_probing_scenarios(
    dialect: str, tls_version: str, run: Runner
) -> None:
    chosen = [by_id(i) for i in (*PROBING, "server.close-notify-reply")]

    async def body() -> List[Result]:
        async with reference_servers((dialect,)) as (target,):
            return await run_server_target(chosen, target, SETTINGS, tls_versions=(tls_version,))

    for r in run(body, 30.0):
        assert r.verdict is P, (r.id, r.summary)


@pytest.mark.parametrize(
    ("behaviour", "scenario", "verdict", "rule"),
    [
        ("resume-without-stoptls", "server.plaintext-after-close", F, "R3"),
        ("resume-without-stoptls", "server.data-after-close-notify", F, "R3"),
        ("one-sided-bare-resume", "server.one-sided-close", F, "R4"),
        ("accept-stoptls-in-plaintext", "server.stoptls-outside-tls", W, "R3"),
        ("accept-starttls-in-tls", "server.starttls-in-tls", W, "R8"),
    ],
)
def test_new_reference_misbehaviours_fail_their_scenario(
    behaviour: str, scenario: str, verdict: Verdict, rule: str, run: Runner
) -> None:
    """The four server scenarios that had no failing reference peer now have one."""

    async def body() -> List[Result]:
        async with reference_servers(("smtp", "imap"), behaviour=behaviour) as targets:
            out: List[Result] = []
            for target in targets:
                out += await run_server_target([by_id(scenario)], target, SETTINGS)
            return out

    results = run(body, 60.0)
    assert len(results) == 4
    for r in results:
        assert (r.verdict, r.rule) == (verdict, rule), (r.dialect, r.tls_version, r.summary)


def test_every_server_scenario_fails_against_some_reference_peer() -> None:
    failing = {sid for row in SERVER_EXPECTED.values() for sid in row}
    server_ids = {s.id for s in CATALOGUE if s.role == "server"}
    assert server_ids - failing == set()


@pytest.mark.parametrize(
    ("behaviour", "with_user", "verdict"),
    [
        ("no-state-reset", False, K),  # was a pass: "no test user: login skipped"
        ("no-state-reset", True, F),
        ("strict", False, K),
        ("strict", True, P),
    ],
)
def test_imap_state_reset_without_a_test_user_is_a_skip(
    behaviour: str, with_user: bool, verdict: Verdict, tls_version: str, run: Runner
) -> None:
    """What cannot be decided is a skip with its reason, never a pass (issue 11)."""

    async def body() -> List[Result]:
        async with reference_servers(("imap",), behaviour=behaviour) as (target,):
            if not with_user:
                target = dataclasses.replace(target, user=None, password=None)
            return await run_server_target(
                [by_id("server.state-reset")], target, SETTINGS, tls_versions=(tls_version,)
            )

    (r,) = run(body, 30.0)
    assert r.verdict is verdict, r.summary
    if verdict is K:
        assert "--user/--password" in r.summary


def test_smtp_state_reset_needs_no_test_user(tls_version: str, run: Runner) -> None:
    """SMTP's state probes (MAIL without a new EHLO) do not depend on a login."""

    async def body() -> List[Result]:
        out = []
        for behaviour in ("strict", "no-state-reset"):
            async with reference_servers(("smtp",), behaviour=behaviour) as (target,):
                target = dataclasses.replace(target, user=None, password=None)
                out += await run_server_target(
                    [by_id("server.state-reset")], target, SETTINGS, tls_versions=(tls_version,)
                )
        return out

    strict, broken = run(body, 30.0)
    assert (strict.verdict, broken.verdict) == (P, F), (strict.summary, broken.summary)


class RefusesPipelining(MiniServer):
    """Answers STARTTLS with pipelined bytes behind it with a 5xx/NO and hangs up (as Postfix)."""

    def data_received(self, data: bytes) -> None:
        assert self.t is not None
        line, _, rest = data.partition(b"\n")
        held = rest or self.t.engine.held
        if self.is_starttls(line.strip()) and held and not self.t.tls_active:
            words = line.split()
            tag = words[0] + b" " if self.dialect == "imap" else b""
            # What the hold gate kept back is never read: the connection ends.
            answer = b"NO pipelining after STARTTLS" if tag else b"554 5.5.0 pipelining"
            self.t.write(tag + answer + b"\r\n")
            self.t.close()
            return
        super().data_received(data)


def refusing(dialect: str, pki: Pki, tls_version: str) -> AsyncContextManager[ServerTarget]:
    return serve_mini(
        lambda ctx, tasks: RefusesPipelining(dialect, ctx, Hostility("silence", "quit"), tasks),
        dialect,
        pki,
        tls_version,
    )


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_refusing_stattls_with_pipelined_plaintext_is_a_named_pass(
    dialect: str, pki: Pki, tls_version: str, run: Runner
) -> None:
    """A refusal is the safe outcome (issue 10, item 1): pass, naming how it refused."""
    chosen = [by_id("server.command-injection"), by_id("server.command-injection-multi")]

    async def body() -> List[Result]:
        async with refusing(dialect, pki, tls_version) as target:
            return await run_server_target(chosen, target, SETTINGS)

    results = run(body, 30.0)
    assert len(results) == 2
    for r in results:
        assert r.verdict is P, (r.id, r.summary)
        assert "refused STARTTLS" in r.summary


@pytest.mark.parametrize("behaviour", ["strict", "keep-buffer"])
def test_injection_conforming_passes_and_keep_buffer_fails(
    behaviour: str, tls_version: str, run: Runner
) -> None:
    async def body() -> List[Result]:
        async with reference_servers(("smtp", "imap"), behaviour=behaviour) as targets:
            out: List[Result] = []
            for target in targets:
                out += await run_server_target(
                    [by_id("server.command-injection")],
                    target,
                    SETTINGS,
                    tls_versions=(tls_version,),
                )
            return out

    for r in run(body, 30.0):
        assert r.verdict is (P if behaviour == "strict" else F), r.summary


# ------------------------------------------------- one cause, one line (issue 11)


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[Tuple[int, List[int]]]:
    """Accepts TCP and never says anything; counts the connections."""
    accepted: List[int] = []
    writers: List[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writers.append(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), accepted
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


def test_a_silent_target_costs_one_bounded_wait(run: Runner) -> None:
    """Not one wait per TLS version: the dead target is asked once."""

    async def body() -> Tuple[List[Result], int]:
        async with silent_server() as (port, accepted):
            target = ServerTarget("smtp", "127.0.0.1", port)
            results = await run_server_target(CATALOGUE, target, SETTINGS)
            return results, len(accepted)

    results, connections = run(body, 30.0)
    assert connections == 1
    assert results and all(r.verdict is E for r in results)
    assert "sent no SMTP greeting" in results[0].summary


@pytest.mark.parametrize(
    ("change", "line"),
    [
        ({"dialect": "smtp"}, "answers like IMAP, not SMTP"),
        ({"password": "wrong"}, "the login was refused"),
        ({"server_hostname": "wrong.example"}, "the certificate check failed"),
        ({"port": 1}, "cannot connect"),
    ],
)
def test_an_unusable_target_is_one_line(change: Dict[str, Any], line: str, run: Runner) -> None:
    """Reachable but unusable: one TargetUnusable line, not a row per scenario."""

    async def body() -> str:
        async with reference_servers(("imap",)) as (target,):
            target = dataclasses.replace(target, **change)
            with pytest.raises(TargetUnusable) as raised:
                await run_server_target(CATALOGUE, target, SETTINGS, raise_unusable=True)
            return raised.value.line

    said = run(body, 30.0)
    assert line in said and "\n" not in said


def test_a_usable_target_raises_nothing(run: Runner) -> None:
    async def body() -> List[Result]:
        async with reference_servers(("imap",)) as (target,):
            return await run_server_target(
                [by_id("server.command-injection")], target, SETTINGS, raise_unusable=True
            )

    assert {r.verdict for r in run(body, 30.0)} == {P}


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_a_tls13_only_target_skips_the_tls12_scenarios(dialect: str, pki: Pki, run: Runner) -> None:
    """Good practice is not an error: TLS 1.2 rows are skip, TLS 1.3 rows run."""

    async def body() -> List[Result]:
        config = ServerConfig(pki=pki, tls_version="1.3")
        server = await server_module(dialect).start_server(config)
        try:
            target = ServerTarget(
                dialect,
                server.host,
                server.port,
                cafile=pki.cafile,
                user=config.user,
                password=config.password,
            )
            chosen = [by_id("server.command-injection"), by_id("server.plaintext-in-tls")]
            return await run_server_target(chosen, target, SETTINGS, raise_unusable=True)
        finally:
            await server.close()

    results = run(body, 30.0)
    by_version = {(r.id, r.tls_version): r for r in results}
    assert len(by_version) == 4
    for (sid, version), r in by_version.items():
        if version == "1.2":
            assert (r.verdict, r.summary) == (K, "target does not offer TLS 1.2"), sid
        else:
            assert r.verdict is P, (sid, r.summary)


# ------------------------------------------------------- evidence is the wire


def test_ladder_shows_bytes_after_our_alert_and_our_own_close(run: Runner) -> None:
    """Bytes after our alert are rows of bytes; our own close is labelled as ours."""

    async def body() -> List[Result]:
        out: List[Result] = []
        async with reference_servers(("smtp",), behaviour="alert-as-close") as (target,):
            out += await run_server_target(
                [by_id("server.alert-then-plaintext")], target, SETTINGS, tls_versions=("1.3",)
            )
        async with reference_servers(("smtp",), behaviour="accept-starttls-in-tls") as (target,):
            out += await run_server_target(
                [by_id("server.starttls-in-tls")], target, SETTINGS, tls_versions=("1.3",)
            )
        return out

    alert, nested = run(body, 30.0)
    text = ladder(alert, 100)
    assert alert.verdict is F
    assert "<-- [plain] 220 " in text and "(after our alert)" in text
    shown = ladder(nested, 100)
    last = [e for e in nested.evidence.exchanges if e.kind == "eof"][-1]
    assert (last.direction, last.note) == ("c2s", "we closed the connection")
    assert "[FIN (ours)]" in shown
