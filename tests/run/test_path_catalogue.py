"""The on-path catalogue is sound, and its verdicts hold on real sockets.

A strict reference client and server, with the proxy between them, pass
every path scenario; every misbehaving reference peer (the other side
strict) gets exactly the verdicts of :data:`starttls_harness.run.path.PATH_EXPECTED`
-- no more, no fewer.  No reference client relaxes R3, so a minimal client
that does (it resumes at the first plaintext after its own close_notify)
is defined here to show that the s2c scenarios catch it.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
from starttls_harness.dialects import RETURN_TO_PLAINTEXT, Reply, dialect_named, names
from starttls_harness.proxy import POINTS, Fault
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.path import (
    PATH_EXPECTED,
    STOPTLS_SCENARIOS,
    ClientDriver,
    ClientSpec,
    PathPair,
    PathServer,
    StepHooks,
    run_path_target,
    scenario_fault,
    unknown_path_steps,
)
from starttls_harness.run.path_reference import reference_pair, validate_path
from starttls_harness.run.server import RunSettings
from starttls_harness.scenarios.expectations import expected_path_verdicts
from starttls_harness.scenarios.path import PATH_COMMON, PATH_SCENARIOS, fault_step, path_by_id
from starttls_harness.scenarios.server import CATALOGUE, COMMON
from starttls_harness.tls.aio import SwitchableTransport, open_connection
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import Event, Policy, Rule

Runner = Callable[..., Any]
P, F, W, K, E = Verdict.PASS, Verdict.FAIL, Verdict.WARN, Verdict.SKIP, Verdict.ERROR

SPEC_PATH_IDS = {
    "path.drop-close-notify-c2s",
    "path.drop-close-notify-s2c",
    "path.inject-after-close",
    "path.truncate-c2s",
    "path.truncate-s2c",
}


# ------------------------------------------------------------------ structure


def test_ids_are_unique_and_cover_the_spec() -> None:
    ids = [s.id for s in PATH_SCENARIOS]
    assert len(ids) == len(set(ids))
    assert SPEC_PATH_IDS <= set(ids)
    assert all(i.startswith("path.") for i in ids)
    assert not set(ids) & {s.id for s in CATALOGUE}


@pytest.mark.parametrize("scenario", PATH_SCENARIOS, ids=lambda s: s.id)
def test_scenario_is_complete_data(scenario: Any) -> None:
    assert scenario.role == "path"
    assert scenario.title and scenario.reason and scenario.reference
    # The STOPTLS ones need a return to plaintext (not postgres's); plaintext
    # behind the client's close_notify needs the client to close first (not FTP).
    wanted = set(RETURN_TO_PLAINTEXT if scenario.id in STOPTLS_SCENARIOS else names())
    if scenario.id == "path.inject-after-close":
        wanted = {n for n in wanted if not dialect_named(n).server_may_close_first}
    assert set(scenario.dialects) == wanted
    assert set(scenario.tls_versions) == {"1.2", "1.3"}
    verdicts = {e.verdict for e in scenario.expect.values()}
    assert P in verdicts and F in verdicts  # a check that cannot fail is a defect
    assert scenario.outcome("something-new").verdict is E
    assert scenario.outcome("timeout").verdict is E
    assert scenario.outcome("no-stoptls").verdict is K
    assert scenario.outcome("violation:R4").verdict is F
    step = fault_step(scenario)
    assert step.args["judge"] in ("injection", "upgrade", "truncation")
    assert step.args.get("arm", "before") in ("before", "verb")
    assert step.args["at"] in POINTS
    for dialect in ("smtp", "imap"):
        fault, judge, _ = scenario_fault(scenario, dialect_named(dialect))
        assert isinstance(fault, Fault) and fault.nth == 1
        if fault.action in ("inject", "drop"):
            assert fault.data, "the attacker's bytes must be there"
        assert judge == step.args["judge"]


def test_every_step_is_in_the_verb_table() -> None:
    assert unknown_path_steps(PATH_SCENARIOS) == []


def test_shared_outcomes_never_pass() -> None:
    assert all(e.verdict is not P for e in PATH_COMMON.values())
    assert all(e.verdict is not P for e in COMMON.values())


def _behaviours(side: str, dialect: str) -> List[str]:
    module = importlib.import_module(f"starttls_harness.{side}s.{dialect}")
    return list(module.BEHAVIOURS)


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
@pytest.mark.parametrize("side", ["server", "client"])
def test_every_behaviour_has_an_expectation(side: str, dialect: str) -> None:
    known = {b for s, b in PATH_EXPECTED if s == side}
    assert set(_behaviours(side, dialect)) <= known


def test_expectations_name_real_scenarios() -> None:
    ids = {s.id for s in PATH_SCENARIOS}
    for expected in PATH_EXPECTED.values():
        assert set(expected) <= ids
        assert P not in expected.values()  # "pass" is what an absent entry means
    assert set(STOPTLS_SCENARIOS) <= ids


# ------------------------------------------------------------ real sockets

FAST = RunSettings(reply_timeout=1.5, scenario_timeout=10.0, connect_timeout=2.0)


def _assert_evidence(result: Result) -> None:
    """Both directions, and what the harness did to the wire, are on record.

    A rule broken on the wire by a peer may come before the fault point (then
    the fault may never apply): the offending plaintext is the proof.
    """
    exchanges = result.evidence.exchanges
    assert {e.direction for e in exchanges} >= {"c2s", "s2c"}
    assert any("fault armed" in e.note for e in exchanges)
    if "on the wire: " in result.summary:
        assert any(e.kind == "plaintext" for e in exchanges)
    else:
        assert result.evidence.injected(), f"{result.id}: the fault is not in the evidence"


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_strict_pair_passes_every_scenario(
    dialect: str, tls_version: str, pki: Pki, run: Runner
) -> None:
    async def body() -> Tuple[List[Result], float, List[str]]:
        before = asyncio.all_tasks()
        start = time.perf_counter()
        results = await run_path_target(
            PATH_SCENARIOS, reference_pair(dialect, pki=pki), FAST, tls_versions=(tls_version,)
        )
        # Everything the runs started is gone: no task is left behind.
        await asyncio.sleep(0)
        left = [repr(t) for t in asyncio.all_tasks() - before]
        return results, time.perf_counter() - start, left

    results, seconds, left = run(body, 60)
    assert len(results) == len(PATH_SCENARIOS)
    bad = [f"{r.id}: {r.verdict.value} ({r.summary})" for r in results if r.verdict is not P]
    assert bad == []
    for r in results:
        _assert_evidence(r)
        assert r.duration < FAST.reply_timeout, f"{r.id} waited on a bound"
    assert left == []
    assert seconds < 5 * FAST.reply_timeout


def _pairings(dialect: str) -> List[Tuple[str, str]]:
    return [
        (side, behaviour)
        for (side, behaviour) in PATH_EXPECTED
        if behaviour in _behaviours(side, dialect)
    ]


@pytest.mark.parametrize(
    ("dialect", "side", "behaviour"),
    [(d, s, b) for d in ("smtp", "imap") for s, b in _pairings(d)],
)
def test_validation_matrix(
    dialect: str, side: str, behaviour: str, tls_version: str, pki: Pki, run: Runner
) -> None:
    results, problems = run(
        lambda: validate_path(dialect, side, behaviour, (tls_version,), pki=pki), 60
    )
    assert len(results) == len(PATH_SCENARIOS)
    assert problems == []
    expected = expected_path_verdicts(dialect, side, behaviour)
    for r in results:
        if r.verdict is not P:
            assert r.summary and r.evidence.exchanges
        if r.verdict in (F, W):
            # Exactly one side misbehaves: every fail or warn blames it.
            assert getattr(r, "side", None) == side, f"{r.id}: blames {r.side!r}"  # type: ignore[attr-defined]
            assert r.as_dict()["side"] == side
    if expected and F in expected.values():
        guarded = next(iter(expected))
        caught = [r for r in results if r.id == guarded]
        assert caught and caught[0].verdict is F
        _assert_evidence(caught[0])


def test_fail_evidence_names_the_broken_rule(pki: Pki, run: Runner) -> None:
    """A server that resumes on a one-sided closure: the injected command and
    the server's plaintext answer are both in the evidence, in order."""

    async def body() -> List[Result]:
        pair = reference_pair("smtp", server_behaviour="one-sided-resume", pki=pki)
        return await run_path_target(
            [path_by_id("path.inject-after-close")], pair, FAST, tls_versions=("1.3",)
        )

    (result,) = run(body, 30)
    assert result.verdict is F and result.rule == "R4"
    kinds = [(e.direction, e.kind) for e in result.evidence.exchanges]
    injected = kinds.index(("c2s", "injected"))
    assert ("s2c", "close_notify") in kinds[injected:]
    answers = [
        e.data
        for e in result.evidence.exchanges[injected:]
        if e.direction == "s2c" and e.kind == "plaintext"
    ]
    assert any(a.startswith(b"5") for a in answers), answers  # XHARNESS-INJECTED answered


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_without_a_key_log_the_verdicts_hold(
    dialect: str, tls_version: str, pki: Pki, run: Runner
) -> None:
    """A client that writes no key log: TLS 1.3 is followed by position, and
    the strict pair still passes while a one-sided resumption is still caught."""

    async def body() -> Dict[str, Dict[str, Verdict]]:
        out: Dict[str, Dict[str, Verdict]] = {}
        for behaviour in ("strict", "one-sided-resume"):
            pair = reference_pair(dialect, server_behaviour=behaviour, pki=pki)
            pair.writes_keylog = False
            results = await run_path_target(PATH_SCENARIOS, pair, FAST, tls_versions=(tls_version,))
            out[behaviour] = {r.id: r.verdict for r in results if r.verdict is not P}
        return out

    got = run(body, 60)
    assert got == {"strict": {}, "one-sided-resume": PATH_EXPECTED[("server", "one-sided-resume")]}


# ------------------------------------------- a client that relaxes R3 (test only)


class _Buffer(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.more = asyncio.Event()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.more.set()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.more.set()
        if not self.lost.done():
            self.lost.set_result(None)


class NaiveResumeClient(ClientDriver):
    """After STOPTLS it sends close_notify and takes the next plaintext
    greeting as the server's, close_notify or not (R3 relaxed in its engine).
    Enough of SMTP and IMAP for the STOPTLS scenarios."""

    def __init__(self, spec: ClientSpec) -> None:
        self.spec = spec
        self.dialect = dialect_named(spec.dialect)
        self.t: Optional[SwitchableTransport] = None
        self.p: Optional[_Buffer] = None

    async def _reply(self, tag: Optional[str] = None) -> Reply:
        assert self.p is not None

        async def wait() -> Reply:
            assert self.p is not None
            while True:
                reply, rest = self.dialect.split_reply(self.p.data, tag)
                if reply is not None:
                    self.p.data = rest
                    return reply
                if self.p.lost.done():
                    raise ConnectionResetError("closed")
                self.p.more.clear()
                await self.p.more.wait()

        return await asyncio.wait_for(wait(), self.spec.timeout)

    async def _command(self, line: bytes) -> Reply:
        assert self.t is not None
        self.t.write(line)
        reply = await self._reply(self.dialect.tag_of(line))
        if not reply.ok:
            raise ConnectionError(f"refused: {reply.text}")
        return reply

    async def connect(self, hooks: StepHooks) -> None:
        t, p = await open_connection(
            _Buffer, self.spec.host, self.spec.port, policy=Policy.relaxing(Rule.R3)
        )
        assert isinstance(p, _Buffer)
        self.t, self.p = t, p
        await self._reply()
        await self._command(self.dialect.hello())

    async def starttls(self, hooks: StepHooks) -> None:
        assert self.t is not None
        command = self.dialect.starttls()
        self.t.hold_after(self.dialect.final_line_of(command), once=True)
        await self._command(command)
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
        assert self.t is not None
        await self._command(self.dialect.stoptls())
        with self.t.corked():
            self.t.events.extend(self.t.engine.unwrap())
        await self._reply()  # the next plaintext greeting, whoever sent it
        await self._command(self.dialect.hello())

    async def send_unit(self, hooks: StepHooks) -> None:
        raise NotImplementedError("the naive client only does the STOPTLS session")

    async def fetch_unit(self, hooks: StepHooks) -> None:
        raise NotImplementedError("the naive client only does the STOPTLS session")

    async def quit(self, hooks: StepHooks) -> None:
        assert self.t is not None
        self.t.write(self.dialect.quit())
        await self._reply(self.dialect.tag_of(self.dialect.quit()))

    def engine_events(self) -> Optional[Sequence[Event]]:
        return self.t.events if self.t is not None else None

    async def close(self) -> None:
        if self.t is not None and self.p is not None:
            self.t.close()
            await asyncio.wait_for(asyncio.shield(self.p.lost), self.spec.timeout)


NAIVE_EXPECTED: Dict[str, Verdict] = {
    "path.drop-close-notify-s2c": F,
    "path.inject-before-close-s2c": F,
    "path.drop-close-notify-c2s": P,
    "path.inject-after-close": P,
    "path.inject-in-tls-c2s": P,
    "path.inject-in-tls-s2c": P,
}


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_client_resuming_before_the_servers_close_notify_is_caught(
    dialect: str, tls_version: str, pki: Pki, run: Runner
) -> None:
    pair = reference_pair(dialect, pki=pki)
    pair.client = NaiveResumeClient
    scenarios = [path_by_id(i) for i in NAIVE_EXPECTED]
    results = run(lambda: run_path_target(scenarios, pair, FAST, tls_versions=(tls_version,)), 60)
    got = {r.id: r.verdict for r in results}
    assert got == NAIVE_EXPECTED, {r.id: r.summary for r in results}
    for r in results:
        if r.verdict is F:
            assert any(
                e.direction == "c2s" and e.kind == "plaintext" for e in r.evidence.exchanges
            ), "the client's plaintext after the fake greeting is the proof"


# --------------------------------------------------- dead or silent targets


class _FixedServer(PathServer):
    """A server not started by the harness (an address, nothing observable)."""

    def __init__(self, address: Tuple[str, int]) -> None:
        self.address = address

    async def close(self) -> None:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _external_pair(dialect: str, pki: Pki, address: Tuple[str, int]) -> PathPair:
    pair = reference_pair(dialect, pki=pki)

    async def start(tls_version: str, settings: RunSettings) -> PathServer:
        return _FixedServer(address)

    pair.start_server = start
    return pair


def test_dead_server_is_an_error_never_a_pass(pki: Pki, run: Runner) -> None:
    pair = _external_pair("smtp", pki, ("127.0.0.1", _free_port()))
    settings = RunSettings(reply_timeout=0.5, connect_timeout=0.5, scenario_timeout=3.0)
    results = run(
        lambda: run_path_target(PATH_SCENARIOS, pair, settings, tls_versions=("1.2",)), 30
    )
    assert len(results) == len(PATH_SCENARIOS)
    assert {r.verdict for r in results} == {E}
    assert all("sanity" in r.summary for r in results)


def test_silent_server_is_bounded_and_an_error(pki: Pki, run: Runner) -> None:
    """A server that accepts and never speaks: every wait runs out, within bounds."""

    async def body() -> Tuple[List[Result], float]:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.read()  # until the harness closes
            finally:
                writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        settings = RunSettings(reply_timeout=0.3, connect_timeout=0.5, scenario_timeout=2.0)
        start = time.perf_counter()
        try:
            results = await run_path_target(
                PATH_SCENARIOS,
                _external_pair("imap", pki, (str(address[0]), int(address[1]))),
                settings,
                tls_versions=("1.3",),
            )
        finally:
            server.close()
            await server.wait_closed()
        return results, time.perf_counter() - start

    results, seconds = run(body, 30)
    assert {r.verdict for r in results} == {E}
    assert seconds < 5.0


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_the_built_in_pair_never_waits_for_a_secret(dialect: str, pki: Pki, run: Runner) -> None:
    """The proxy reads both reference peers' key logs: every sender logs a
    secret before it sends under it, so under TLS 1.3 no record of either
    side is left pending (the client alone logs the server's handshake
    secret only after the server's whole flight has passed the proxy)."""

    async def body() -> List[Result]:
        pair = reference_pair(dialect, pki=pki)
        return await run_path_target(PATH_SCENARIOS, pair, FAST, tls_versions=("1.3",))

    results = run(body, 60)
    assert results and all(r.verdict in (P, K) for r in results)
    late = [
        f"{r.id}: {e.note}"
        for r in results
        for e in r.evidence.exchanges
        if "classified late" in e.note or "classification pending" in e.note
    ]
    assert late == []
    decrypted = [e for r in results for e in r.evidence.exchanges if "keylog" in e.note]
    assert decrypted  # followed by decryption, not by position


class _Opaque(PathServer):
    """A reference server seen from outside: its own TLS-layer report is hidden."""

    def __init__(self, inner: PathServer) -> None:
        self.inner = inner
        self.address = inner.address

    async def settle(self, timeout: float) -> None:
        await self.inner.settle(timeout)

    async def close(self) -> None:
        await self.inner.close()


def test_a_server_running_injected_commands_fails_on_the_wire_alone(
    tls_version: str, pki: Pki, run: Runner
) -> None:
    """Without the server's own report (a real server), a command pipelined
    behind STARTTLS and run inside TLS still fails when the client's session
    breaks on the answers out of step: IMAP's tags make every extra answer
    fatal.  (An SMTP client can survive replies shifted by one -- a 500 for
    its EHLO, then HELO answered by the EHLO reply -- and then only the
    server's own report, or the decrypted replies, could tell: see the
    limitation in docs/check-path.md.)"""
    pair = reference_pair("imap", server_behaviour="keep-buffer", pki=pki)
    inner = pair.start_server

    async def start(version: str, settings: RunSettings) -> PathServer:
        return _Opaque(await inner(version, settings))

    pair.start_server = start
    scenarios = [path_by_id("path.inject-after-starttls-c2s")]

    (result,) = run(lambda: run_path_target(scenarios, pair, FAST, tls_versions=(tls_version,)), 30)
    assert result.verdict is F, result.summary
    assert getattr(result, "side", None) == "server"
    assert "out of step" in result.summary or "answered" in result.summary, result.summary
