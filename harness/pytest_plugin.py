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
import tempfile
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
from starttls_harness.run.reference import reference_server_module
from starttls_harness.run.server import RunSettings, ServerTarget, run_server_scenario, sanity_probe
from starttls_harness.run.targets import ClientTarget, ReferenceClientTarget
from starttls_harness.scenarios.catalogue import everything, select
from starttls_harness.scenarios.model import Scenario
from starttls_harness.servers.base import ServerConfig
from starttls_harness.tls.certs import Pki, make_pki

__all__ = ["ScenarioOutcome", "ServerFactory"]

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
    if opts.role not in ("server", "client"):
        raise pytest.UsageError(
            f"starttls marker: role must be 'server' or 'client', not {opts.role!r}"
        )
    if opts.dialect not in names():
        raise pytest.UsageError(
            f"starttls marker: unknown dialect {opts.dialect!r}; known: {', '.join(names())}"
        )
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


@dataclass
class ScenarioOutcome:
    """What ``starttls_result`` gives the test: the result and its check."""

    scenario: Scenario
    result: Result
    allowed: Verdict

    def check(self) -> None:
        """Pass, skip, or fail the pytest test with the evidence ladder."""
        verdict = self.result.verdict
        if verdict is self.allowed:
            if verdict is Verdict.SKIP:
                pytest.skip(self.result.summary)
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
    if errors:
        raise errors[0]
    return result
