"""The built-in path pair (a reference client and a reference server) and
the path role's validation runs.

Apart from :mod:`.path` so that the runner knows nothing of the reference
peers: :func:`reference_pair` is one :class:`~.path.PathPair` among others
(``check-path`` builds its pairs from a real server and a client command).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path
from typing import Any, Awaitable, Callable, List, Optional, Sequence, Tuple

from starttls_harness.dialects.roles import ClientSpec, transport_events
from starttls_harness.report.verdicts import Result
from starttls_harness.run.path import (
    ClientDriver,
    PathPair,
    PathServer,
    run_path_target,
)
from starttls_harness.run.reference import reference_client_module, reference_server_module
from starttls_harness.run.server import RunSettings
from starttls_harness.scenarios.expectations import expected_path_verdicts, mismatches
from starttls_harness.scenarios.path import PATH_SCENARIOS
from starttls_harness.scenarios.server import Scenario
from starttls_harness.servers.base import RunningServer, ServerConfig
from starttls_harness.tls.aio import Timeouts
from starttls_harness.tls.certs import Pki, make_pki
from starttls_harness.tls.engine import Event

__all__ = [
    "PATH_VALIDATION_CLOSURE",
    "PATH_VALIDATION_SETTINGS",
    "reference_pair",
    "validate_path",
]

#: TLS contexts a built-in pair keeps (two sides x two TLS versions).
_PAIR_CONTEXTS = 4


# ------------------------------------------------- the reference pair (built in)


class _ReferenceServer(PathServer):
    """A reference server started for one run."""

    def __init__(self, running: RunningServer) -> None:
        self.running = running
        self.address = running.address

    def engine_events(self) -> Optional[Sequence[Event]]:
        out: List[Event] = []
        for conn in list(self.running.connections):
            out.extend(transport_events(getattr(conn, "transport", None)))
        return out

    def stored(self) -> Optional[int]:
        return len(self.running.messages)

    async def settle(self, timeout: float) -> None:
        waits: List[Awaitable[Any]] = []
        for conn in list(self.running.connections):
            closed = getattr(conn, "closed", None)  # SMTP: set at connection loss
            if isinstance(closed, asyncio.Event):
                waits.append(closed.wait())
            finished = getattr(conn, "finished", None)  # IMAP: set when the session ends
            if isinstance(finished, asyncio.Future):
                waits.append(asyncio.shield(finished))
        if waits:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), timeout)

    async def close(self) -> None:
        await self.running.close()


def reference_pair(
    dialect: str,
    server_behaviour: str = "strict",
    client_behaviour: str = "strict",
    *,
    pki: Optional[Pki] = None,
    closure_timeout: Optional[float] = None,
) -> PathPair:
    """The built-in pair: a reference server and a reference client.

    A fresh server is started for every run (shared PKI).  Its closure
    bound is ``closure_timeout`` (default: half the run's reply bound), so
    that a server which took the attacker's bytes in and waits gives up
    before the harness's own bounds run out.
    """
    module = reference_server_module(dialect)
    client_module = reference_client_module(dialect)
    for name, known in (
        (server_behaviour, module.BEHAVIOURS),
        (client_behaviour, client_module.BEHAVIOURS),
    ):
        if name not in known:
            choices = ", ".join(sorted(known))
            raise ValueError(f"unknown behaviour {name!r}; choose one of: {choices}")
    holder: List[Pki] = [pki] if pki is not None else []
    # The reference servers' test user (the IMAP units need a login).
    defaults = {f.name: f.default for f in fields(ServerConfig)}
    user, password = str(defaults["user"]), str(defaults["password"])

    def the_pki() -> Pki:
        if not holder:
            holder.append(make_pki())
        return holder[0]

    # Contexts by (side, TLS version, key log file): with shared key logs
    # (PathPair.shares_keylog) every run of a TLS version hits; per-run files
    # never do, and the bound keeps their open key-log files few.
    contexts: OrderedDict[Tuple[str, str, Optional[Path]], ssl.SSLContext] = OrderedDict()

    def cached(
        key: Tuple[str, str, Optional[Path]], make: Callable[[], ssl.SSLContext]
    ) -> ssl.SSLContext:
        ctx = contexts.get(key)
        if ctx is None:
            ctx = contexts[key] = make()
            while len(contexts) > _PAIR_CONTEXTS:
                contexts.popitem(last=False)
        return ctx

    async def start_server(tls_version: str, settings: RunSettings) -> PathServer:
        return await start_logged(tls_version, settings, None)

    async def start_logged(
        tls_version: str, settings: RunSettings, keylog: Optional[Path]
    ) -> PathServer:
        closure = closure_timeout if closure_timeout is not None else settings.reply_timeout / 2
        pki = the_pki()
        context = cached(
            ("server", tls_version, keylog),
            lambda: pki.server_context(None, keylog),
        )
        config = ServerConfig(
            pki=pki,
            behaviour=server_behaviour,
            keylog=keylog,
            context=context,
            timeouts=Timeouts(
                handshake=settings.reply_timeout,
                closure=closure,
                connect=settings.connect_timeout,
            ),
        )
        running: RunningServer = await module.start_server(config)
        return _ReferenceServer(running)

    def client(spec: ClientSpec) -> ClientDriver:
        driver: ClientDriver = client_module.path_driver(spec, client_behaviour, user, password)
        return driver

    def context(tls_version: str, keylog: Optional[Path]) -> ssl.SSLContext:
        return cached(
            ("client", tls_version, keylog),
            lambda: the_pki().client_context(tls_version, keylog),
        )

    return PathPair(
        dialect=dialect,
        name=f"reference {dialect} server={server_behaviour} client={client_behaviour}",
        start_server=start_server,
        client=client,
        client_context=context,
        start_logged_server=start_logged,
        logged_for=start_server,
        shares_keylog=True,
    )


# ------------------------------------------------------------- validation

#: Bounds for validation runs: generous (1.5 s ran out on a loaded CI machine);
#: only a peer that takes injected bytes in and stays silent waits on them.
PATH_VALIDATION_SETTINGS = RunSettings(reply_timeout=3.0, scenario_timeout=10.0)
#: The reference server's closure bound in validation runs: a server that
#: took injected bytes in and waits for a close_notify gives up after it.
PATH_VALIDATION_CLOSURE = 1.0


async def validate_path(
    dialect: str,
    side: str,
    behaviour: str,
    tls_versions: Sequence[str] = ("1.2", "1.3"),
    scenarios: Tuple[Scenario, ...] = PATH_SCENARIOS,
    settings: RunSettings = PATH_VALIDATION_SETTINGS,
    *,
    pki: Optional[Pki] = None,
    closure_timeout: float = PATH_VALIDATION_CLOSURE,
) -> Tuple[List[Result], List[str]]:
    """Run the path catalogue with one misbehaving reference peer; return mismatches."""
    if side not in ("server", "client"):
        raise ValueError(f"side must be 'server' or 'client', not {side!r}")
    pair = reference_pair(
        dialect,
        server_behaviour=behaviour if side == "server" else "strict",
        client_behaviour=behaviour if side == "client" else "strict",
        pki=pki,
        closure_timeout=closure_timeout,
    )
    results = await run_path_target(scenarios, pair, settings, tls_versions=tls_versions)
    return results, mismatches(results, expected_path_verdicts(dialect, side, behaviour))
