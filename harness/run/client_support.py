"""The client role's settings and the client process around a run (apart from the verbs).

:class:`ClientSettings` adds the client role's bound to
:class:`~starttls_harness.run.server.RunSettings`; :func:`call_client` and
:func:`stop_client` run the client under test beside the scripted server and
end it with a bound; :func:`output_tail` cuts the client's own last words for
the evidence ladder and the JSON report.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from starttls_harness.run.server import RunSettings
from starttls_harness.run.targets import ClientOutcome, ClientTarget

__all__ = [
    "DEFAULT_SETTINGS",
    "TAIL_BYTES",
    "TAIL_LINES",
    "ClientSettings",
    "call_client",
    "close_notify_bound",
    "output_tail",
    "stop_client",
]


@dataclass(frozen=True)
class ClientSettings(RunSettings):
    """:class:`RunSettings` with the client role's own bound.

    ``close_notify_bound``: a close_notify answered later than this after
    ours is a ``warn`` saying how long it took (R5: "at once").
    """

    close_notify_bound: float = 1.0


#: The bounds used when a caller gives none.
DEFAULT_SETTINGS = ClientSettings()


def close_notify_bound(settings: RunSettings) -> float:
    """The R5 bound of ``settings`` (the default for plain :class:`RunSettings`)."""
    if isinstance(settings, ClientSettings):
        return settings.close_notify_bound
    return ClientSettings.close_notify_bound


#: How much of the end of a client's stdout/stderr goes into the evidence.
TAIL_LINES, TAIL_BYTES = 15, 2000


def output_tail(output: bytes) -> bytes:
    """The client's own last words: its last lines, bounded in bytes."""
    lines = output.rstrip().splitlines()[-TAIL_LINES:]
    return b"\n".join(lines)[-TAIL_BYTES:]


async def call_client(
    target: ClientTarget, host: str, port: int, cafile: Path, tls_version: str
) -> ClientOutcome:
    try:
        return await target.run(host, port, cafile, tls_version)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a target must report, never raise
        return ClientOutcome(False, f"{type(exc).__name__}: {exc}")


async def stop_client(
    client: asyncio.Future[ClientOutcome], grace: float
) -> Optional[ClientOutcome]:
    """Give the client a bounded moment to report, then cancel (kill) it."""
    if not client.done():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(client), grace)
    if not client.done():
        client.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(client, grace)
        return None
    if client.cancelled():
        return None
    return client.result()
