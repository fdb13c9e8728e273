"""XMPP runs the catalogue of every role, judged by the matrices, and from the CLI.

The dialect was added by the registry alone (``harness/dialects/xmpp.py``):
the seams PostgreSQL brought (no greeting, a session opening after every
handshake -- here the stream restart) carry it.  It has no return to
plaintext, so the STOPTLS scenarios do not apply; every other scenario does,
the strict reference peers pass every one, and each misbehaving reference
peer gets exactly the verdicts of :mod:`starttls_harness.scenarios.expectations`
(with the dialect's own overrides).  From the CLI: ``check xmpp://``,
``check-client --protocol xmpp`` with the reference client, and the path
role through the proxy.
"""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import pytest
from starttls_harness.dialects import RETURN_TO_PLAINTEXT, dialect_named, names
from starttls_harness.dialects.xmpp import XMPP
from starttls_harness.report.verdicts import Verdict
from starttls_harness.run.client_checks import validate_client
from starttls_harness.run.path_reference import validate_path
from starttls_harness.run.targets import client_behaviours
from starttls_harness.run.validation import validate_server
from starttls_harness.scenarios.catalogue import ALL_SCENARIOS
from starttls_harness.scenarios.client import CLIENT_SCENARIOS
from starttls_harness.scenarios.expectations import (
    PATH_EXPECTED,
    expected_client_verdicts,
    expected_server_verdicts,
)
from starttls_harness.scenarios.server import CATALOGUE
from starttls_harness.servers.base import ServerConfig
from starttls_harness.servers.xmpp import BEHAVIOURS as SERVER_BEHAVIOURS
from starttls_harness.servers.xmpp import start_server
from starttls_harness.tls.certs import Pki

Run = Callable[..., Any]
P = Verdict.PASS
NAME = "xmpp"
CLI = [sys.executable, "-m", "starttls_harness"]
CLI_TIMEOUT = 240


def test_registered_without_a_return_to_plaintext() -> None:
    assert NAME in names() and dialect_named(NAME) is XMPP
    assert not XMPP.has_return_to_plaintext and not XMPP.server_greets
    assert NAME not in RETURN_TO_PLAINTEXT
    # Only scenarios restricted to some dialects (a return to plaintext, PREAUTH,
    # tagged replies, LDAP's removal, CCC ...) can leave xmpp out; those that
    # need a return to plaintext always do.
    for scenario in ALL_SCENARIOS:
        restricted = set(scenario.dialects) != set(names())
        assert NAME in scenario.dialects or restricted, scenario.id
        if set(scenario.dialects) == set(RETURN_TO_PLAINTEXT) and RETURN_TO_PLAINTEXT:
            assert NAME not in scenario.dialects, scenario.id
    skipped = {s.id for s in ALL_SCENARIOS if NAME not in s.dialects}
    assert {"server.stoptls-cycle", "client.stoptls-cycle", "path.inject-after-close"} <= skipped
    assert "server.command-injection" not in skipped


def test_every_behaviour_has_an_expectation() -> None:
    for behaviour in SERVER_BEHAVIOURS:
        expected_server_verdicts(NAME, behaviour)  # raises if unknown
    for behaviour in client_behaviours(NAME):
        expected_client_verdicts(NAME, behaviour)


_SERVER = sorted(SERVER_BEHAVIOURS)


@pytest.mark.parametrize("behaviour", _SERVER)
def test_server_matrix(behaviour: str, tls_version: str, run: Run) -> None:
    results, problems = run(lambda: validate_server(NAME, behaviour, (tls_version,)), 120)
    assert len(results) == len([s for s in CATALOGUE if NAME in s.dialects])
    assert problems == []
    if behaviour != "strict":
        guarded = next(iter(expected_server_verdicts(NAME, behaviour)))
        assert any(r.id == guarded and r.verdict is not P for r in results)


@pytest.mark.parametrize("behaviour", client_behaviours(NAME))
def test_client_matrix(behaviour: str, tls_version: str, run: Run) -> None:
    results, problems = run(lambda: validate_client(NAME, behaviour, (tls_version,)), 60)
    assert len(results) == len([s for s in CLIENT_SCENARIOS if NAME in s.dialects])
    assert problems == []
    if behaviour != "strict":
        guarded = next(iter(expected_client_verdicts(NAME, behaviour)))
        assert any(r.id == guarded and r.verdict is not P for r in results)


def _pairings() -> List[Tuple[str, str]]:
    out = []
    for side, behaviour in PATH_EXPECTED:
        dialect = dialect_named(NAME)
        module = dialect.server_module if side == "server" else dialect.client_module
        if behaviour in importlib.import_module(module).BEHAVIOURS:
            out.append((side, behaviour))
    return out


@pytest.mark.parametrize(("side", "behaviour"), _pairings())
def test_path_matrix(side: str, behaviour: str, tls_version: str, pki: Pki, run: Run) -> None:
    results, problems = run(
        lambda: validate_path(NAME, side, behaviour, (tls_version,), pki=pki), 60
    )
    assert results and problems == []


# ------------------------------------------------------------------ the CLI


@pytest.fixture
def served(pki: Pki, tmp_path: Path) -> Iterator[Tuple[int, Path]]:
    """The strict reference server on its own event loop thread: (port, CA file)."""
    pki.write(tmp_path)
    assert pki.cafile is not None
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: List[Any] = []

    async def serve() -> None:
        running = await start_server(ServerConfig(pki=pki))
        holder.append(running)
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    assert started.wait(10)
    try:
        yield holder[0].port, Path(pki.cafile)
    finally:
        asyncio.run_coroutine_threadsafe(holder[0].close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _cli(*args: str) -> Tuple[int, str]:
    done = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
    )
    return done.returncode, done.stdout + done.stderr


def test_check_an_xmpp_url(served: Tuple[int, Path]) -> None:
    port, cafile = served
    code, out = _cli(
        "check", f"xmpp://127.0.0.1:{port}", "--cafile", str(cafile), "--server-name",
        "localhost",
    )  # fmt: skip
    assert code == 0, out
    assert "server.command-injection " in out and "xmpp" in out
    assert "FAIL" not in out and "ERROR" not in out


def test_check_client_with_the_reference_client() -> None:
    client = [*CLI, "client", NAME, "--port", "{port}", "--cafile", "{cafile}"]
    code, out = _cli("check-client", "--protocol", NAME, "--", *client)
    assert code == 0, out
    assert "client.response-injection " in out and "FAIL" not in out
