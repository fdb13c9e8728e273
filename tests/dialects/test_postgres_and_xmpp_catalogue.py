"""PostgreSQL and XMPP run the catalogue of every role, judged by the matrices, and from the CLI.

Both dialects were added by the registry alone (``harness/dialects/postgres.py``,
``harness/dialects/xmpp.py``) plus small generic seams PostgreSQL brought and
XMPP reuses (a dialect without a greeting, a session opening after every
handshake -- XMPP's stream restart --, a client that refuses injected bytes by
closing before its first command).  Neither has a return to plaintext, so the
STOPTLS scenarios do not apply; every other scenario does, the strict
reference peers pass every one, and each misbehaving reference peer gets
exactly the verdicts of :mod:`starttls_harness.scenarios.expectations` (with
the dialect's own overrides; the matrices run in ``test_dialect_matrices``).
From the CLI: ``check postgres://`` /
``check xmpp://``, ``check-client --protocol NAME`` with the reference client
and, where installed, ``psql`` (libpq), and ``check-path`` through the proxy.
"""

from __future__ import annotations

import asyncio
import importlib
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest
from starttls_harness.dialects import RETURN_TO_PLAINTEXT, dialect_named, names
from starttls_harness.dialects.postgres import POSTGRES
from starttls_harness.dialects.xmpp import XMPP
from starttls_harness.run.targets import client_behaviours
from starttls_harness.scenarios.catalogue import ALL_SCENARIOS
from starttls_harness.scenarios.expectations import (
    expected_client_verdicts,
    expected_server_verdicts,
)
from starttls_harness.servers.base import ServerConfig
from starttls_harness.tls.certs import Pki
from test_dialect_matrices import server_behaviours

#: The dialects without a return to plaintext, with their registry entry.
DIALECTS = {"postgres": POSTGRES, "xmpp": XMPP}
CLI = [sys.executable, "-m", "starttls_harness"]
CLI_TIMEOUT = 240


def _server_module(name: str) -> Any:
    return importlib.import_module(dialect_named(name).server_module)


@pytest.mark.parametrize("name", DIALECTS)
def test_registered_without_a_return_to_plaintext(name: str) -> None:
    dialect = DIALECTS[name]
    assert name in names() and dialect_named(name) is dialect
    assert not dialect.has_return_to_plaintext and not dialect.server_greets
    assert name not in RETURN_TO_PLAINTEXT
    # Only scenarios restricted to some dialects (a return to plaintext, PREAUTH,
    # tagged replies, LDAP's removal, CCC ...) can leave the dialect out; those
    # that need a return to plaintext always do.
    for scenario in ALL_SCENARIOS:
        restricted = set(scenario.dialects) != set(names())
        assert name in scenario.dialects or restricted, scenario.id
        if set(scenario.dialects) == set(RETURN_TO_PLAINTEXT) and RETURN_TO_PLAINTEXT:
            assert name not in scenario.dialects, scenario.id
    skipped = {s.id for s in ALL_SCENARIOS if name not in s.dialects}
    assert {"server.stoptls-cycle", "client.stoptls-cycle", "path.inject-after-close"} <= skipped
    assert "server.command-injection" not in skipped


@pytest.mark.parametrize("name", DIALECTS)
def test_every_behaviour_has_an_expectation(name: str) -> None:
    for behaviour in server_behaviours(name):
        expected_server_verdicts(name, behaviour)  # raises if unknown
    for behaviour in client_behaviours(name):
        expected_client_verdicts(name, behaviour)


# ------------------------------------------------------------------ the CLI


@pytest.fixture(params=list(DIALECTS))
def served(request: Any, pki: Pki, tmp_path: Path) -> Iterator[Tuple[str, int, Path]]:
    """A strict reference server on its own event loop thread: (dialect, port, CA file)."""
    name: str = request.param
    pki.write(tmp_path)
    assert pki.cafile is not None
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: List[Any] = []

    async def serve() -> None:
        running = await _server_module(name).start_server(ServerConfig(pki=pki))
        holder.append(running)
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    assert started.wait(10)
    try:
        yield name, holder[0].port, Path(pki.cafile)
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


def test_check_a_url(served: Tuple[str, int, Path]) -> None:
    name, port, cafile = served
    code, out = _cli(
        "check", f"{name}://127.0.0.1:{port}", "--cafile", str(cafile), "--server-name",
        "localhost",
    )  # fmt: skip
    assert code == 0, out
    assert "server.command-injection " in out and name in out
    assert "FAIL" not in out and "ERROR" not in out


@pytest.mark.parametrize("name", DIALECTS)
def test_check_client_with_the_reference_client(name: str) -> None:
    client = [*CLI, "client", name, "--port", "{port}", "--cafile", "{cafile}"]
    code, out = _cli("check-client", "--protocol", name, "--", *client)
    assert code == 0, out
    assert "client.response-injection " in out and "FAIL" not in out


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql (libpq) is not installed")
def test_check_client_with_psql() -> None:
    """libpq >= 14.1 refuses bytes glued to the S (CVE-2021-23222 fixed): all pass."""
    conninfo = (
        "hostaddr={host} host={hostname} port={port} sslmode=verify-full "
        "sslrootcert={cafile} user=tester dbname=postgres"
    )
    psql = ["psql", "-X", "-w", "-v", "ON_ERROR_STOP=1", conninfo, "-c", "INSERT INTO t VALUES (1)"]
    code, out = _cli(
        "check-client", "--protocol", "postgres", "--", "env", "PGPASSWORD=secret", *psql
    )
    assert code == 0, out
    assert "22 pass" in out or "11 pass" in out, out
