"""The on-path proxy: listens, accepts clients, connects each to the upstream
server and hands the pair to a :class:`~starttls_harness.proxy.connection.ProxyConnection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Callable, List, Optional, Sequence, Set, Union

from starttls_harness.proxy.connection import Address, Limits, ProxyConnection
from starttls_harness.proxy.events import ProxyEvent
from starttls_harness.proxy.faults import Fault
from starttls_harness.proxy.sockets import Side
from starttls_harness.proxy.upgrade import upgrade_reader
from starttls_harness.proxy.vocabulary import C2S, EV_ERROR
from starttls_harness.tls.framing import FramerFactory
from starttls_harness.tls.keylog import SecretsProvider

__all__ = ["Proxy"]


class Proxy:
    """The on-path proxy: accept clients, connect each to ``upstream``, follow
    and fault every connection.  Use :meth:`start`."""

    def __init__(
        self,
        upstream: Address,
        dialect: str,
        faults: Sequence[Fault],
        keylog: Union[str, os.PathLike[str], SecretsProvider, None],
        limits: Limits,
        on_event: Optional[Callable[[ProxyEvent], None]],
        framer: Optional[FramerFactory] = None,
    ) -> None:
        reader = upgrade_reader(dialect)  # refuse an unknown dialect before listening
        self.upstream = upstream
        self.dialect = dialect
        self.faults = tuple(faults)
        self.keylog = keylog
        self.limits = limits
        #: The dialect's framer unless another is given (PostgreSQL is not lines).
        self.framer: FramerFactory = framer or reader.framer
        self.on_event = on_event
        #: Every connection accepted, in order (finished ones included).
        self.connections: List[ProxyConnection] = []
        #: Connections refused because ``max_connections`` were open.
        self.refused = 0
        self.callback_errors: List[Exception] = []
        self._active: Set[ProxyConnection] = set()
        self._server: Optional[asyncio.AbstractServer] = None
        self._new_connection: Optional[asyncio.Event] = None

    @classmethod
    async def start(
        cls,
        listen: Address = ("127.0.0.1", 0),
        upstream: Address = ("127.0.0.1", 25),
        dialect: str = "smtp",
        faults: Sequence[Fault] = (),
        keylog: Union[str, os.PathLike[str], SecretsProvider, None] = None,
        *,
        max_connections: int = 16,
        max_buffer: int = 1 << 20,
        max_line: int = 65536,
        connect_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        partial_timeout: float = 0.5,
        on_event: Optional[Callable[[ProxyEvent], None]] = None,
        framer: Optional[FramerFactory] = None,
    ) -> Proxy:
        """Listen on ``listen`` and relay each connection to ``upstream``.

        ``framer`` makes the framer that cuts each direction's plaintext into
        units (default: the dialect's own).
        """
        limits = Limits(
            max_connections, max_buffer, max_line, connect_timeout, idle_timeout, partial_timeout
        )
        proxy = cls(upstream, dialect, faults, keylog, limits, on_event, framer)
        proxy._new_connection = asyncio.Event()
        loop = asyncio.get_running_loop()
        proxy._server = await loop.create_server(proxy._accept, listen[0], listen[1])
        return proxy

    @property
    def address(self) -> Address:
        """The address the proxy listens on (the real port if 0 was asked)."""
        assert self._server is not None
        sockets: Sequence[socket.socket] = getattr(self._server, "sockets", None) or ()
        if not sockets:
            raise RuntimeError("the proxy is not listening")
        host, port = sockets[0].getsockname()[:2]
        return str(host), int(port)

    def _accept(self) -> asyncio.Protocol:
        if len(self._active) >= self.limits.max_connections:
            self.refused += 1
            return _Refuse(self)
        conn = ProxyConnection(self, len(self.connections) + 1)
        self.connections.append(conn)
        self._active.add(conn)
        if self._new_connection is not None:
            self._new_connection.set()
        return Side(conn, C2S)

    def _connection_done(self, conn: ProxyConnection) -> None:
        self._active.discard(conn)

    async def connection(self, index: int = 0, timeout: float = 5.0) -> ProxyConnection:
        """The ``index``-th accepted connection, waiting for it (bounded)."""

        async def wait() -> ProxyConnection:
            while len(self.connections) <= index:
                assert self._new_connection is not None
                self._new_connection.clear()
                await self._new_connection.wait()
            return self.connections[index]

        return await asyncio.wait_for(wait(), timeout)

    def close(self) -> None:
        """Stop listening and close every open connection."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._active):
            conn.close()

    async def wait_closed(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), timeout)
        for conn in list(self._active):
            with contextlib.suppress(asyncio.TimeoutError, RuntimeError):
                await conn.wait_closed(timeout)

    async def __aenter__(self) -> Proxy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


class _Refuse(asyncio.Protocol):
    """Over the connection limit: close at once, and say so."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.proxy.on_event is not None:
            self.proxy.on_event(
                ProxyEvent(
                    0.0,
                    "",
                    EV_ERROR,
                    detail=f"connection refused: {self.proxy.limits.max_connections} already open",
                )
            )
        transport.close()
