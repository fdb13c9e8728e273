"""(a) The floor: one STARTTLS cycle with nothing but ``ssl`` and ``socket``.

The cycle every engine benchmark repeats, on a fresh loopback TCP
connection with ``TCP_NODELAY`` on both ends::

    S: 220 ready                      (plaintext greeting)
    C: STARTTLS
    S: 220 go
    ... full TLS handshake (ECDSA P-256, certificate verified) ...
    C: NOOP                           (under TLS)
    S: 250 ok
    C: close_notify  ->  S: close_notify   (bidirectional closure)
    S: 220 again                      (plaintext again)
    C closes TCP

Both ends live in one process, like the harness and the reference peers
do.  The honest floor is :func:`lockstep_cycle`: one thread, both ends as
``ssl.SSLObject`` + ``MemoryBIO`` over real sockets, driven in lock step --
the conversation is strictly alternating, so the reader always knows how
many bytes the writer has just put on the wire and never waits on a timer
or a thread switch.  That is OpenSSL's work plus the system calls and the
least Python that can drive them.  :func:`threaded_cycle` (``SSLSocket``
with the server in a thread, the textbook way) is shown for information:
it pays for GIL hand-offs, which the single-threaded asyncio harness does
not.  :func:`memory_cycle` drops the sockets (OpenSSL alone).
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Callable, List, Optional, Tuple

__all__ = ["Floor", "lockstep_cycle", "memory_cycle", "threaded_cycle"]

GREETING = b"220 ready\r\n"
STARTTLS = b"STARTTLS\r\n"
GO = b"220 go\r\n"
NOOP = b"NOOP\r\n"
OK = b"250 ok\r\n"
AGAIN = b"220 again\r\n"


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("peer closed during the floor benchmark")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class _End:
    """One side of the lock-step conversation: a socket and, under TLS, an SSLObject."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls: Optional[ssl.SSLObject] = None

    def send_plain(self, data: bytes, peer: _End) -> None:
        self.sock.sendall(data)
        assert _recv_exactly(peer.sock, len(data)) == data

    def flush_to(self, peer: _End) -> bool:
        """Move our TLS output over the socket into the peer's BIO."""
        data = self.outgoing.read()
        if not data:
            return False
        self.sock.sendall(data)
        peer.incoming.write(_recv_exactly(peer.sock, len(data)))
        return True


def _handshake(client: _End, server: _End) -> None:
    done = {id(client): False, id(server): False}
    while not all(done.values()):
        for me, peer in ((client, server), (server, client)):
            assert me.tls is not None
            if not done[id(me)]:
                try:
                    me.tls.do_handshake()
                    done[id(me)] = True
                except ssl.SSLWantReadError:
                    pass
            me.flush_to(peer)


def lockstep_cycle(
    listener: socket.socket, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext
) -> None:
    """One cycle, single thread, SSLObject + MemoryBIO over real sockets."""
    csock = _nodelay(socket.create_connection(listener.getsockname()))
    ssock, _ = listener.accept()
    _nodelay(ssock)
    try:
        client, server = _End(csock), _End(ssock)
        server.send_plain(GREETING, client)
        client.send_plain(STARTTLS, server)
        server.send_plain(GO, client)
        client.tls = client_ctx.wrap_bio(
            client.incoming, client.outgoing, server_hostname="localhost"
        )
        server.tls = server_ctx.wrap_bio(server.incoming, server.outgoing, server_side=True)
        _handshake(client, server)
        client.tls.write(NOOP)
        client.flush_to(server)
        assert server.tls.read() == NOOP
        server.tls.write(OK)
        server.flush_to(client)  # TLS 1.3: the session tickets ride along
        assert client.tls.read() == OK
        try:
            client.tls.unwrap()  # our close_notify; theirs is not here yet
        except ssl.SSLWantReadError:
            pass
        client.flush_to(server)
        try:
            assert server.tls.read() == b""  # the peer's close_notify
        except ssl.SSLZeroReturnError:
            pass
        server.tls.unwrap()  # the answer (R5)
        server.flush_to(client)
        client.tls.unwrap()  # both alerts crossed
        assert not client.incoming.pending and not server.incoming.pending
        server.send_plain(AGAIN, client)
    finally:
        csock.close()
        ssock.close()


def memory_cycle(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> None:
    """The TLS part of the cycle with no sockets at all (OpenSSL alone)."""
    cin, cout, sin, sout = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client_ctx.wrap_bio(cin, cout, server_hostname="localhost")
    s = server_ctx.wrap_bio(sin, sout, server_side=True)
    pending = [c, s]
    while pending:
        for obj in list(pending):
            try:
                obj.do_handshake()
                pending.remove(obj)
            except ssl.SSLWantReadError:
                pass
            sin.write(cout.read())
            cin.write(sout.read())
    c.write(NOOP)
    sin.write(cout.read())
    assert s.read() == NOOP
    s.write(OK)
    cin.write(sout.read())
    assert c.read() == OK
    try:
        c.unwrap()
    except ssl.SSLWantReadError:
        pass
    sin.write(cout.read())
    try:
        s.read()
    except ssl.SSLZeroReturnError:
        pass
    s.unwrap()
    cin.write(sout.read())
    c.unwrap()


def _threaded_server(
    listener: socket.socket, server_ctx: ssl.SSLContext, n: int, errors: List[BaseException]
) -> None:
    try:
        for _ in range(n):
            raw, _ = listener.accept()
            _nodelay(raw)
            with raw:
                raw.sendall(GREETING)
                assert _recv_exactly(raw, len(STARTTLS)) == STARTTLS
                raw.sendall(GO)
                tls = server_ctx.wrap_socket(raw, server_side=True)
                assert tls.recv(64) == NOOP
                tls.sendall(OK)
                try:
                    assert tls.recv(64) == b""  # the client's close_notify
                except ssl.SSLZeroReturnError:
                    pass
                plain = tls.unwrap()
                plain.sendall(AGAIN)
                plain.close()
    except BaseException as exc:  # pragma: no cover - reported by the caller
        errors.append(exc)


def threaded_cycle(
    listener: socket.socket, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, n: int
) -> None:
    """``n`` cycles with ``ssl.SSLSocket``, the server in a thread (informative)."""
    errors: List[BaseException] = []
    thread = threading.Thread(
        target=_threaded_server, args=(listener, server_ctx, n, errors), daemon=True
    )
    thread.start()
    for _ in range(n):
        raw = _nodelay(socket.create_connection(listener.getsockname()))
        with raw:
            assert _recv_exactly(raw, len(GREETING)) == GREETING
            raw.sendall(STARTTLS)
            assert _recv_exactly(raw, len(GO)) == GO
            tls = client_ctx.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(NOOP)
            assert tls.recv(64) == OK
            plain = tls.unwrap()
            assert _recv_exactly(plain, len(AGAIN)) == AGAIN
            plain.close()
    thread.join(30)
    if errors:
        raise errors[0]


class Floor:
    """The floor runners for one TLS version, sharing one listening socket."""

    def __init__(self, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> None:
        self.client_ctx = client_ctx
        self.server_ctx = server_ctx
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)

    def close(self) -> None:
        self.listener.close()

    def runners(self) -> Tuple[Callable[[int], None], Callable[[int], None], Callable[[int], None]]:
        """(lockstep, threaded, in-memory) runners taking a cycle count."""

        def lockstep(n: int) -> None:
            for _ in range(n):
                lockstep_cycle(self.listener, self.client_ctx, self.server_ctx)

        def threaded(n: int) -> None:
            threaded_cycle(self.listener, self.client_ctx, self.server_ctx, n)

        def memory(n: int) -> None:
            for _ in range(n):
                memory_cycle(self.client_ctx, self.server_ctx)

        return lockstep, threaded, memory
