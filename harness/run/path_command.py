"""The path role between a client program and a running server (``check-path``).

Neither peer is the harness's: the server listens somewhere (a URL), the
client is a command run once per scenario against the fault proxy.  The
harness cannot drive such a client verb by verb, so the pair runs a session
of its own (:data:`OWN_SESSION`: the program does what it does) and the
scenario's fault is armed on the proxy before the client connects; the
verdict comes from the proxy's view of both sides and the client's exit
status (a client that exits 0 after its reply was cut took the truncation
for an end).  STOPTLS scenarios skip unless the proxy saw the client send
STOPTLS.

TLS secrets for the proxy (TLS 1.3 close_notify is only seen decrypted, and
the judge counts commands and replies in decrypted data, TLS 1.2 too): the
client's key log (``SSLKEYLOGFILE`` is set in its environment), else the
server's (``server_keylog``), else the follower works by position; the
evidence of every run says which.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

from starttls_harness.dialects import dialect_named
from starttls_harness.dialects.roles import ClientOutcome, ClientSpec, Hooks, PathDriver
from starttls_harness.run.path import PathPair, PathServer, merged_keylog
from starttls_harness.run.server import RunSettings, StorageProbe
from starttls_harness.run.targets import CommandClientTarget
from starttls_harness.scenarios.model import Step
from starttls_harness.tls.keylog import read_keylog

__all__ = ["OWN_SESSION", "CommandPathDriver", "command_pair", "keylog_source"]

#: The session a client program runs: it connects, then does what it does.
OWN_SESSION: Tuple[Step, ...] = (Step("connect"), Step("quit"))


class ClientFailed(Exception):
    """The client program ended with a non-zero status (or was killed)."""


class CommandPathDriver(PathDriver):
    """A client program: ``connect`` starts it, ``quit`` waits for its end."""

    def __init__(self, spec: ClientSpec, target: CommandClientTarget, cafile: Path) -> None:
        self.spec = spec
        self.target = target
        self.cafile = cafile
        self.task: Optional[asyncio.Task[ClientOutcome]] = None
        self.outcome: Optional[ClientOutcome] = None

    async def connect(self, hooks: Hooks) -> None:
        run = self.target.run(self.spec.host, self.spec.port, self.cafile, self.spec.tls_version)
        self.task = asyncio.ensure_future(run)

    async def _nothing(self, hooks: Hooks) -> None:
        """The program runs its own session; the harness has no verb to give it."""

    starttls = command = stoptls = send_unit = fetch_unit = _nothing

    async def quit(self, hooks: Hooks) -> None:
        assert self.task is not None
        self.outcome = await self.task  # bounded by the target's own timeout
        if not self.outcome.ok:
            raise ClientFailed(self.outcome.detail)

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the target kills the process group
            await asyncio.gather(self.task, return_exceptions=True)


class _Server(PathServer):
    """A server that runs on its own: the harness neither starts nor stops it.

    ``storage`` (``--storage-probe``) counts the messages it holds, so that
    ``path.truncate-c2s`` can see a cut message stored.
    """

    def __init__(self, address: Tuple[str, int], storage: Optional[StorageProbe] = None) -> None:
        self.address = address
        self.storage = storage

    async def count(self) -> Optional[int]:
        if self.storage is None:
            return None
        counted = self.storage()
        return counted if isinstance(counted, int) else await counted

    async def close(self) -> None:
        return None


def keylog_source(client: Path, server: Optional[Path]) -> str:
    """Which key log the proxy could use for a run (for the evidence)."""
    if read_keylog(client):
        return "the client's key log (SSLKEYLOGFILE)"
    if server is not None and read_keylog(server):
        return f"the server's key log ({server})"
    return (
        "none: the proxy cannot read the TLS data (TLS 1.3 followed by record position, "
        "TLS 1.2 by record type)"
    )


def command_pair(
    dialect: str,
    server: Tuple[str, int],
    argv: Sequence[str],
    cafile: Path,
    *,
    user: str = "",
    password: str = "",
    timeout: float = 20.0,
    server_keylog: Optional[Path] = None,
    server_hostname: Optional[str] = None,
    storage_count: Optional[StorageProbe] = None,
    tls_versions: Tuple[str, ...] = ("1.2", "1.3"),
) -> PathPair:
    """A client program and a running server, the fault proxy between them.

    ``argv`` placeholders: ``{host}``, ``{port}`` (the proxy's), ``{cafile}``,
    ``{tls_version}``, ``{user}``, ``{password}``.  ``storage_count`` tells
    how many messages the server holds (the ``--storage-probe`` of ``check``).
    """
    dialect_named(dialect)
    words = [a.replace("{user}", user).replace("{password}", password) for a in argv]

    async def start_server(tls_version: str, settings: RunSettings) -> PathServer:
        return _Server(server, storage_count)

    def client(spec: ClientSpec) -> PathDriver:
        keylog = Path(str(spec.tls_context.keylog_filename or os.devnull))
        target = CommandClientTarget(
            dialect, words, timeout=timeout, env={"SSLKEYLOGFILE": str(keylog)}
        )
        return CommandPathDriver(spec, target, cafile)

    def context(tls_version: str, keylog: Optional[Path]) -> ssl.SSLContext:
        # Never used to connect: it carries the run's key log path to the driver.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if keylog is not None:
            ctx.keylog_filename = str(keylog)
        return ctx

    def proxy_keylog(keylog: Path) -> Any:
        return merged_keylog(keylog, server_keylog)

    def source(keylog: Path) -> str:
        return keylog_source(keylog, server_keylog)

    return PathPair(
        dialect=dialect,
        name=" ".join(argv),
        start_server=start_server,
        client=client,
        client_context=context,
        server_hostname=server_hostname or server[0],
        tls_versions=tls_versions,
        own_session=OWN_SESSION,
        proxy_keylog=proxy_keylog,
        keylog_source=source,
    )
