"""Shared fixtures: TLS version (from the tox factor), certificates, loops."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, List, TypeVar

import pytest
from starttls_harness.tls.certs import TLS_ENV, Pki, make_pki

T = TypeVar("T")

# The test folders mirror the product's packages; test modules share helpers
# by importing each other by name (test_cli's server fixture, test_imap_server's
# raw peers, test_hostile's mini server), so every folder is importable.
_HERE = Path(__file__).resolve().parent
for _folder in sorted(p for p in _HERE.iterdir() if p.is_dir() and p.name.isidentifier()):
    if _folder.name != "cve" and str(_folder) not in sys.path:
        sys.path.append(str(_folder))


def _tls_versions() -> List[str]:
    """The TLS versions this run covers: the tox factor's, or both."""
    chosen = os.environ.get(TLS_ENV, "").strip()
    if not chosen:
        return ["1.2", "1.3"]
    if chosen not in ("1.2", "1.3"):
        raise pytest.UsageError(f"{TLS_ENV} must be 1.2 or 1.3, not {chosen!r}")
    return [chosen]


#: Environment variable that narrows the event loops (comma-separated:
#: ``asyncio``, ``uvloop``); unset: every installed one.  tox runs uvloop on
#: the oldest and the newest interpreter only (see tox.ini).
LOOPS_ENV = "STARTTLS_HARNESS_LOOPS"


def _loops() -> List[str]:
    names = ["asyncio"]
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - uvloop is a test dependency
        pass
    else:
        names.append("uvloop")
    chosen = [n.strip() for n in os.environ.get(LOOPS_ENV, "").split(",") if n.strip()]
    if not chosen:
        return names
    unknown = [n for n in chosen if n not in ("asyncio", "uvloop")]
    if unknown:
        raise pytest.UsageError(f"{LOOPS_ENV}: unknown loop(s) {unknown}; use asyncio, uvloop")
    return [n for n in names if n in chosen]


@pytest.fixture(params=_tls_versions(), ids=lambda v: f"tls{v}")
def tls_version(request: pytest.FixtureRequest) -> str:
    """The TLS version under test ("1.2" or "1.3")."""
    return str(request.param)


@pytest.fixture(scope="session")
def tls_versions() -> List[str]:
    """Every TLS version this run covers, for a test that mixes them in one body."""
    return _tls_versions()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One throwaway CA and server certificate for the whole test session."""
    return make_pki(directory=tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=_loops())
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


Runner = Callable[[Callable[[], Awaitable[Any]]], Any]


@pytest.fixture
def run(loop_name: str) -> Iterator[Runner]:
    """Run an async test body on the chosen event loop (asyncio or uvloop).

    Every body gets an overall bound so that a bug shows up as a failure
    instead of a hung test run.
    """

    def runner(body: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(body(), timeout)

        if loop_name == "uvloop":
            import uvloop

            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(bounded())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    yield runner


@pytest.fixture
def keylog_path(tmp_path: Path) -> Path:
    return tmp_path / "keys.log"
