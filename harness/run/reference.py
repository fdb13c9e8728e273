"""The built-in reference peers as targets (the main job's default run).

Starts the reference servers in this process, on loopback ports picked by
the OS, and describes them as :class:`~starttls_harness.run.server.ServerTarget` objects
with what only an in-process target can offer: the test user and a storage
probe (how many messages the server holds), so that every scenario can be
decided.
"""

from __future__ import annotations

import contextlib
import importlib
import tempfile
from pathlib import Path
from types import ModuleType
from typing import AsyncIterator, List, Optional, Sequence

from starttls_harness.dialects import dialect_named, names
from starttls_harness.run.server import ServerTarget
from starttls_harness.servers.base import RunningServer, ServerConfig
from starttls_harness.tls.certs import Pki, make_pki

__all__ = [
    "reference_client_module",
    "reference_server_module",
    "reference_servers",
    "server_module",
]


def reference_server_module(dialect: str) -> ModuleType:
    """The reference server module the dialect names (``start_server``, ``BEHAVIOURS``).

    Loaded by name: the dialect layer sits below the reference peers and
    cannot import them; this is the registry's plug-in lookup.
    """
    return importlib.import_module(dialect_named(dialect).server_module)


def reference_client_module(dialect: str) -> ModuleType:
    """The reference client module the dialect names (``BEHAVIOURS``, ``path_driver``,
    ``reference_session``)."""
    return importlib.import_module(dialect_named(dialect).client_module)


#: The name the pytest plugin and older callers use.
server_module = reference_server_module


@contextlib.asynccontextmanager
async def reference_servers(
    dialects: Optional[Sequence[str]] = None,
    *,
    behaviour: str = "strict",
    pki: Optional[Pki] = None,
    state_dir: Optional[Path] = None,
) -> AsyncIterator[List[ServerTarget]]:
    """Start one reference server per dialect (default: every registered one)."""
    with contextlib.ExitStack() as cleanup:
        if state_dir is None:
            state_dir = Path(
                cleanup.enter_context(tempfile.TemporaryDirectory(prefix="starttls-ref-"))
            )
        chosen = names() if dialects is None else dialects
        async with _started(chosen, behaviour, pki, state_dir) as targets:
            yield targets


@contextlib.asynccontextmanager
async def _started(
    dialects: Sequence[str], behaviour: str, pki: Optional[Pki], directory: Path
) -> AsyncIterator[List[ServerTarget]]:
    pki = pki or make_pki(directory=directory)
    if pki.cafile is None:
        pki.write(directory)
    running: List[RunningServer] = []
    targets: List[ServerTarget] = []
    try:
        for dialect in dialects:
            config = ServerConfig(pki=pki, behaviour=behaviour)
            server: RunningServer = await server_module(dialect).start_server(config)
            running.append(server)
            targets.append(
                ServerTarget(
                    dialect=dialect,
                    host=server.host,
                    port=server.port,
                    cafile=pki.cafile,
                    server_hostname="localhost",
                    user=config.user,
                    password=config.password,
                    storage_count=_counter(server),
                )
            )
        yield targets
    finally:
        for server in running:
            await server.close()


def _counter(server: RunningServer):  # type: ignore[no-untyped-def]
    return lambda: len(server.messages)
