"""server.command-injection-split: a declared segmentation, each outcome named (issue 14).

The injected segment leaves once the target's STARTTLS answer has arrived,
before our ClientHello (``harness/run/server_upgrade.py``), so a target's
read timing no longer decides whether it is read with STARTTLS or after its
switch.  Each outcome is shown with a peer that produces it: the strict and
keep-buffer reference servers of every dialect, and three mini servers
(from ``test_hostile``) that answer the injection in plaintext (a late
switch), answer it with an alert, or discard it and go on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, AsyncContextManager, List, Type

import pytest
from starttls_harness.dialects import names
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.reference import reference_servers
from starttls_harness.run.server import RunSettings, ServerTarget, run_server_scenario
from starttls_harness.run.server_upgrade import SEGMENTS
from starttls_harness.scenarios.server import by_id
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import Event, Policy, Rule, TLSData
from test_hostile import Hostility, MiniServer, serve_mini

Runner = Any
SETTINGS = RunSettings(reply_timeout=1.0, scenario_timeout=8.0, connect_timeout=1.0)
SPLIT = by_id("server.command-injection-split")
P, F = Verdict.PASS, Verdict.FAIL
#: A fatal alert record (TLS 1.2 record version, unexpected_message).
ALERT = b"\x15\x03\x03\x00\x02\x02\x0a"


class _AnswersThenWaits(MiniServer):
    """Answers STARTTLS without switching; ``after_answer`` acts on the next bytes."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.answered = False

    def command(self, line: bytes) -> None:
        assert self.t is not None
        words = line.split()
        if not self.answered and words and words[-1].upper() == b"STARTTLS":
            tag = words[0] if self.dialect == "imap" and len(words) > 1 else b""
            self.write(self.say.starttls_ok, tag)
            self.answered = True
            self.t.hold_after(None)  # nothing is held yet: the injection comes later
            return
        if self.answered and self.after_answer(line):
            return
        super().command(line)

    def after_answer(self, line: bytes) -> bool:
        """True when the line was dealt with here."""
        return False


class LateSwitch(_AnswersThenWaits):
    """Still reads plaintext after its STARTTLS answer: the injection is answered (R1)."""


class AlertOnInjection(_AnswersThenWaits):
    """Answers the first bytes after its STARTTLS answer with a fatal alert, then closes."""

    def after_answer(self, line: bytes) -> bool:
        assert self.t is not None
        if not self.hostile:
            self.hostile = True
            self.t.write_raw(ALERT)
            self.t.truncate()
        return True


class DiscardsInjection(MiniServer):
    """Switches at once; plaintext before the ClientHello is kept by its engine, then dropped."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.dropping = False

    def engine_event(self, event: Event) -> None:
        self.dropping = isinstance(event, TLSData) and not event.protected
        super().engine_event(event)

    def data_received(self, data: bytes) -> None:
        if not self.dropping:
            super().data_received(data)


def mini_target(
    kind: Type[MiniServer], dialect: str, pki: Pki, tls_version: str
) -> AsyncContextManager[ServerTarget]:
    # The discarding peer's engine keeps the plaintext (R1 relaxed) so that
    # its protocol can drop it; the others never switch before it arrives.
    return serve_mini(
        lambda ctx, tasks: kind(dialect, ctx, Hostility("silence", "never"), tasks),
        dialect,
        pki,
        tls_version,
        Policy.relaxing(Rule.R1),
    )


def _mini(kind: Type[MiniServer], dialect: str, pki: Pki, tls_version: str, run: Runner) -> Result:
    async def body() -> Result:
        async with mini_target(kind, dialect, pki, tls_version) as target:
            return await run_server_scenario(SPLIT, target, tls_version, SETTINGS)

    result: Result = run(body, 30.0)
    return result


def _injected_after_the_answer(result: Result) -> None:
    """On the ladder: the target's STARTTLS answer, then our injection, then TLS."""
    kinds = [(e.direction, e.kind) for e in result.evidence.exchanges if e.kind != "note"]
    injected = kinds.index(("c2s", "injected"))
    assert ("s2c", "plaintext") in kinds[:injected], kinds  # the answer came first


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_a_plaintext_answer_to_the_injection_fails(
    dialect: str, pki: Pki, tls_version: str, run: Runner
) -> None:
    r = _mini(LateSwitch, dialect, pki, tls_version, run)
    assert r.verdict is F, r.summary
    assert "answered in plaintext" in r.summary and r.rule == "R1"
    _injected_after_the_answer(r)


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_an_alert_on_the_injection_is_a_named_pass(
    dialect: str, pki: Pki, tls_version: str, run: Runner
) -> None:
    r = _mini(AlertOnInjection, dialect, pki, tls_version, run)
    assert r.verdict is P, r.summary
    assert "TLS alert" in r.summary
    _injected_after_the_answer(r)


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_discarding_the_injection_is_a_named_pass(
    dialect: str, pki: Pki, tls_version: str, run: Runner
) -> None:
    r = _mini(DiscardsInjection, dialect, pki, tls_version, run)
    assert r.verdict is P, r.summary
    assert "discarded" in r.summary
    _injected_after_the_answer(r)


@pytest.mark.parametrize("dialect", names())
def test_every_reference_pair_decides_the_split_the_same_way(
    dialect: str, tls_version: str, run: Runner
) -> None:
    """Strict closes on the injection (pass); keep-buffer runs it inside TLS (fail).

    The keep-buffer engine's relaxed R1 keeps plaintext that arrives at a
    record boundary before the handshake, in a read of its own or glued to
    the ClientHello, and runs it once TLS is up.
    """

    async def body() -> List[Result]:
        results = []
        for behaviour in ("strict", "keep-buffer"):
            async with reference_servers((dialect,), behaviour=behaviour) as (target,):
                for _ in range(3):  # the same verdict every run
                    results.append(await run_server_scenario(SPLIT, target, tls_version, SETTINGS))
        return results

    results = run(body, 60.0)
    strict, keep = results[:3], results[3:]
    assert {(r.verdict, r.summary) for r in strict} == {(P, SPLIT.expect["closed"].summary)}
    assert {(r.verdict, r.summary) for r in keep} == {
        (F, SPLIT.expect["injection-answered"].summary)
    }
    for r in results:
        _injected_after_the_answer(r)


def test_an_unknown_segmentation_is_a_harness_error(tls_version: str, run: Runner) -> None:
    """A catalogue typo must not silently fall back to one of the known shapes."""
    steps = tuple(
        dataclasses.replace(s, args={**s.args, "segment": "separate"}) if s.fault else s
        for s in SPLIT.steps
    )
    bogus = dataclasses.replace(SPLIT, steps=steps)

    async def body() -> Result:
        async with reference_servers(("smtp",)) as (target,):
            return await run_server_scenario(bogus, target, tls_version, SETTINGS)

    r = run(body, 30.0)
    assert r.verdict is Verdict.ERROR and "unknown segment 'separate'" in str(r.evidence.exchanges)
    assert SEGMENTS == ("same", "after-answer")
    segments = {
        str(step.args["segment"])
        for s in (by_id("server.command-injection"), SPLIT, by_id("server.command-injection-multi"))
        for step in s.steps
        if "segment" in step.args
    }
    assert segments <= set(SEGMENTS)
