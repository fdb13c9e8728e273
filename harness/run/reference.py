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
from typing import AsyncIterator, Dict, List, Optional, Sequence

from starttls_harness.run.server import ServerTarget
from starttls_harness.servers.base import RunningServer, ServerConfig
from starttls_harness.tls.certs import Pki, make_pki

__all__ = ["SERVER_MODULES", "reference_servers"]

SERVER_MODULES: Dict[str, str] = {
    "smtp": "starttls_harness.servers.smtp",
    "imap": "starttls_harness.servers.imap",
}


def server_module(dialect: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(SERVER_MODULES[dialect])


@contextlib.asynccontextmanager
async def reference_servers(
    dialects: Sequence[str] = ("smtp", "imap"),
    *,
    behaviour: str = "strict",
    pki: Optional[Pki] = None,
    state_dir: Optional[Path] = None,
) -> AsyncIterator[List[ServerTarget]]:
    """Start one reference server per dialect; yield them as targets."""
    with contextlib.ExitStack() as cleanup:
        if state_dir is None:
            state_dir = Path(
                cleanup.enter_context(tempfile.TemporaryDirectory(prefix="starttls-ref-"))
            )
        async with _started(dialects, behaviour, pki, state_dir) as targets:
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
