"""pytest plugin: run the conformance catalogue inside a downstream test suite.

Registered through the ``pytest11`` entry point (``starttls_harness``), so it
is active wherever starttls-harness is installed.  A downstream project
writes one test function that asks for ``starttls_result`` and overrides
``starttls_server`` to start *its* server; the plugin turns that function
into one pytest test per scenario x TLS version::

    import contextlib
    import pytest
    from starttls_harness.run.server import ServerTarget

    @pytest.fixture
    def starttls_server():
        @contextlib.asynccontextmanager
        async def start(pki, tls_version):   # runs on the scenario's loop
            server = await my_smtp_server.start("127.0.0.1", 0, pki.certfile, pki.keyfile)
            try:
                yield ServerTarget("smtp", "127.0.0.1", server.port, cafile=pki.cafile)
            finally:
                await server.stop()
        return start

    @pytest.mark.starttls(dialect="smtp", expect={"server.stoptls-cycle": "skip"})
    def test_starttls(starttls_result):
        starttls_result.check()

Fixtures (all overridable): ``starttls_pki`` (a throwaway CA and server
certificate, written 0600, per session), ``starttls_host`` (the address to
bind, 127.0.0.1), ``starttls_settings`` (time bounds),
``starttls_server`` (an async context manager factory that starts the
server under test and yields a :class:`~starttls_harness.run.server.ServerTarget`;
default: the strict reference server of the marker's dialect).

The server factory runs on the same event loop as the scenario; any
exception that escapes one of its tasks is re-raised in the test, so a
crash of the server under test is never mistaken for a refusal.
It works under pytest-xdist: each test is self-contained and every worker
makes its own certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import (
    Any,
    AsyncContextManager,
    AsyncIterator,
    Callable,
    Dict,
    List,
    Optional,
    Tuple,
)

import pytest
from starttls_harness.dialects import names
from starttls_harness.report.formats import ladder
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.client import run_client_scenario
from starttls_harness.run.client import sanity_probe as client_sanity_probe
from starttls_harness.run.path import path_sanity, run_path_scenario
from starttls_harness.run.path_command import command_pair
from starttls_harness.run.reference import reference_server_module
from starttls_harness.run.server import RunSettings, ServerTarget, run_server_scenario, sanity_probe
from starttls_harness.run.targets import ClientTarget, ReferenceClientTarget
from starttls_harness.scenarios.catalogue import everything, select
from starttls_harness.scenarios.model import Scenario
from starttls_harness.servers.base import ServerConfig
from starttls_harness.tls.certs import Pki, make_pki

__all__ = ["ScenarioOutcome", "ServerFactory", "StarttlsWarning"]

#: --starttls-targets FILE: one test per target x scenario x TLS version.
pytest_plugins = ["starttls_harness.pytest_fleet"]

ServerFactory = Callable[[Pki, str], AsyncContextManager[ServerTarget]]

MARKER = "starttls"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "starttls(dialect='smtp', role='server', only=None, tls_versions=('1.2', '1.3'), "
        "expect=None): run the starttls-harness catalogue for this test function; "
        "'only' is a list of scenario-id globs, 'expect' maps scenario ids to the verdict "
        "they are allowed to have instead of 'pass'.",
    )


@dataclass(frozen=True)
class _Options:
    dialect: str
    role: str
    only: Optional[List[str]]
    tls_versions: Tuple[str, ...]
    expect: Dict[str, str]


def _options(node: Any) -> _Options:
    marker = node.get_closest_marker(MARKER) if node is not None else None
    kwargs: Dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    return _Options(
        dialect=kwargs.get("dialect", "smtp"),
        role=kwargs.get("role", "server"),
        only=kwargs.get("only"),
        tls_versions=tuple(kwargs.get("tls_versions", ("1.2", "1.3"))),
        expect=dict(kwargs.get("expect") or {}),
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per scenario x TLS version for functions using the plugin."""
    if "starttls_scenario" not in metafunc.fixturenames:
        return
    opts = _options(metafunc.definition)
    if opts.role not in ("server", "client", "path"):
        raise pytest.UsageError(
            f"starttls marker: role must be 'server', 'client' or 'path', not {opts.role!r}"
        )
    if opts.dialect not in names():
        raise pytest.UsageError(
            f"starttls marker: unknown dialect {opts.dialect!r}; known: {', '.join(names())}"
        )
    _check_expect(opts)
    scenarios = select(opts.only, role=opts.role, dialect=opts.dialect, catalogue=everything())
    params = [
        pytest.param((s.id, v), id=f"{s.id}-tls{v}")
        for s in scenarios
        for v in opts.tls_versions
        if v in s.tls_versions
    ]
    if not params:
        raise pytest.UsageError(f"starttls marker selects no scenario: {opts}")
    metafunc.parametrize("starttls_scenario", params)


def _check_expect(opts: _Options) -> None:
    """``expect`` names scenarios of this role and dialect, and verdicts that exist."""
    known = {s.id for s in everything() if s.role == opts.role and opts.dialect in s.dialects}
    verdicts = [v.value for v in Verdict]
    for scenario_id, verdict in opts.expect.items():
        if scenario_id not in known:
            raise pytest.UsageError(
                f"starttls marker: expect names {scenario_id!r}, which is no {opts.role} "
                f"scenario for {opts.dialect} (`starttls-harness scenarios` lists them)"
            )
        if verdict not in verdicts:
            raise pytest.UsageError(
                f"starttls marker: expect[{scenario_id!r}] = {verdict!r} is no verdict; "
                f"use one of {', '.join(verdicts)}"
            )


@pytest.fixture(scope="session")
def starttls_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and server certificate (per session, per xdist worker)."""
    return make_pki(directory=tmp_path_factory.mktemp("starttls-pki"))


@pytest.fixture
def starttls_host() -> str:
    """Where the server under test listens (loopback)."""
    return "127.0.0.1"


@pytest.fixture
def starttls_settings() -> RunSettings:
    """Time bounds of one scenario; override to tune for a slow server."""
    return RunSettings(reply_timeout=5.0, scenario_timeout=20.0, sanity=False)


@pytest.fixture
def starttls_server(request: pytest.FixtureRequest, starttls_host: str) -> ServerFactory:
    """Start the server under test.  Default: the strict reference server."""
    dialect = _options(request.node).dialect

    @contextlib.asynccontextmanager
    async def reference(pki: Pki, tls_version: str) -> AsyncIterator[ServerTarget]:
        config = ServerConfig(pki=pki, host=starttls_host)
        running = await reference_server_module(dialect).start_server(config)
        try:
            yield ServerTarget(
                dialect,
                running.host,
                running.port,
                cafile=pki.cafile,
                user=config.user,
                password=config.password,
                storage_count=lambda: len(running.messages),
            )
        finally:
            await running.close()

    return reference


@pytest.fixture
def starttls_client(request: pytest.FixtureRequest) -> ClientTarget:
    """The client under test (role='client').  Default: the strict reference client.

    Override with a :class:`starttls_harness.run.targets.ClientTarget`, e.g.
    ``CommandClientTarget("smtp", ["my-client", "--port", "{port}", "--ca", "{cafile}"])``.
    """
    return ReferenceClientTarget(_options(request.node).dialect)


@pytest.fixture
def starttls_path_client(request: pytest.FixtureRequest) -> List[str]:
    """The client program of the path role (role='path'): an argv run once per
    scenario against the fault proxy, as ``check-path`` runs it (``{host}``,
    ``{port}``, ``{cafile}``, ``{tls_version}``, ``{user}``, ``{password}``).
    Default: the strict reference client run as a program."""
    dialect = _options(request.node).dialect
    return [
        *(sys.executable, "-m", "starttls_harness", "client", dialect, "--port", "{port}"),
        *("--cafile", "{cafile}", "--tls-version", "{tls_version}"),
    ]


class StarttlsWarning(UserWarning):
    """A scenario ended in ``warn`` and the test did not ask for ``strict``."""


@dataclass
class ScenarioOutcome:
    """What ``starttls_result`` gives the test: the result and its check."""

    scenario: Scenario
    result: Result
    allowed: Verdict

    def check(self, strict: bool = False) -> None:
        """Pass, skip, or fail the pytest test with the evidence ladder.

        A ``warn`` (a weakness that exposes no data) where ``pass`` is
        expected passes with a :class:`StarttlsWarning`, unless ``strict``.
        """
        verdict = self.result.verdict
        if verdict is self.allowed:
            if verdict is Verdict.SKIP:
                pytest.skip(self.result.summary)
            return
        if verdict is Verdict.WARN and self.allowed is Verdict.PASS and not strict:
            warnings.warn(
                StarttlsWarning(
                    f"{self.scenario.id} (TLS {self.result.tls_version}): warn: "
                    f"{self.result.summary} (check(strict=True) fails on it)"
                ),
                stacklevel=2,
            )
            return
        if verdict is Verdict.SKIP:
            pytest.skip(self.result.summary)
        pytest.fail(
            f"{self.scenario.id} (TLS {self.result.tls_version}): expected "
            f"{self.allowed.value}, got {verdict.value}\n\n{ladder(self.result)}",
            pytrace=False,
        )


@pytest.fixture
def starttls_result(
    request: pytest.FixtureRequest,
    starttls_scenario: Tuple[str, str],
    starttls_pki: Pki,
    starttls_settings: RunSettings,
) -> ScenarioOutcome:
    """Run this test's scenario against the server (or client) under test."""
    scenario_id, tls_version = starttls_scenario
    scenario = next(s for s in everything() if s.id == scenario_id)
    opts = _options(request.node)
    allowed = Verdict(opts.expect.get(scenario_id, "pass"))
    if scenario.role == "client":
        client = request.getfixturevalue("starttls_client")
        result = asyncio.run(_run_client(scenario, client, tls_version, starttls_settings))
        return ScenarioOutcome(scenario, result, allowed)
    if starttls_pki.cafile is None:
        starttls_pki.write(Path(tempfile.mkdtemp(prefix="starttls-pki-")))
    factory: ServerFactory = request.getfixturevalue("starttls_server")
    if scenario.role == "path":
        argv: List[str] = request.getfixturevalue("starttls_path_client")
        path_run = _run_path(scenario, tls_version, starttls_pki, factory, starttls_settings, argv)
        return ScenarioOutcome(scenario, asyncio.run(path_run), allowed)
    result = asyncio.run(_run(scenario, tls_version, starttls_pki, factory, starttls_settings))
    return ScenarioOutcome(scenario, result, allowed)


def _sanity_failed(scenario: Scenario, dialect: str, tls_version: str, problem: str) -> Result:
    """The result of a scenario whose target failed its sanity probe: an error."""
    return Result(
        scenario.id,
        dialect,
        tls_version,
        Verdict.ERROR,
        scenario.rule.value,
        f"sanity probe failed: {problem}",
        title=scenario.title,
    )


async def _run_client(
    scenario: Scenario, client: ClientTarget, tls_version: str, settings: RunSettings
) -> Result:
    """The client role: a client that cannot complete a normal session refuses nothing."""
    problem = await client_sanity_probe(client, tls_version, settings)
    if problem is not None:
        return _sanity_failed(scenario, client.dialect, tls_version, problem)
    return await run_client_scenario(scenario, client, tls_version, settings)


#: Loop iterations given to the harness's own connection closes before the
#: factory's teardown (an abort closes its socket one iteration later).
_CLOSE_ITERATIONS = 3


async def _let_closes_land() -> None:
    """Let the harness's aborted connections close before the server's teardown.

    ``transport.abort()`` closes the socket in a callback on the next loop
    iteration.  A factory that stops a server *synchronously* (aiosmtpd's
    ``Controller.stop()`` waits for its connections to end) blocks the loop
    at once, so without these iterations it waits on a connection only we
    could close -- 30 s, then the ladder blamed the target.
    """
    for _ in range(_CLOSE_ITERATIONS):
        await asyncio.sleep(0)


async def _run(
    scenario: Scenario,
    tls_version: str,
    pki: Pki,
    factory: ServerFactory,
    settings: RunSettings,
) -> Result:
    loop = asyncio.get_running_loop()
    errors: List[BaseException] = []

    def on_error(_: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
        exc = context.get("exception")
        errors.append(exc if exc is not None else RuntimeError(context.get("message", "")))

    loop.set_exception_handler(on_error)
    async with factory(pki, tls_version) as target:
        # A target whose conforming path is broken must not pass a refusal test.
        problem = await sanity_probe(target, tls_version, settings)
        if problem is not None:
            result = _sanity_failed(scenario, target.dialect, tls_version, problem)
        else:
            result = await run_server_scenario(scenario, target, tls_version, settings)
        await _let_closes_land()
    if errors:
        raise errors[0]
    return result


async def _run_path(
    scenario: Scenario,
    tls_version: str,
    pki: Pki,
    factory: ServerFactory,
    settings: RunSettings,
    argv: List[str],
) -> Result:
    """The path role: the client program -> the fault proxy -> the server under test."""
    async with factory(pki, tls_version) as target:
        cafile = Path(target.cafile or pki.cafile or "/dev/null")
        pair = command_pair(
            target.dialect,
            (target.host, target.port),
            argv,
            cafile,
            user=target.user or "",
            password=target.password or "",
            timeout=settings.scenario_timeout,
            server_hostname=target.server_hostname,
        )
        with tempfile.TemporaryDirectory(prefix="starttls-path-") as keys:
            problem = await path_sanity(pair, tls_version, settings, Path(keys))
            if problem is not None:
                return _sanity_failed(scenario, target.dialect, tls_version, problem)
            return await run_path_scenario(scenario, pair, tls_version, settings)
