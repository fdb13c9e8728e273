"""FTP: what is a goodbye and what is FEAT's answer (Pure-FTPd's ``211 Logout.``).

Pure-FTPd 1.0.50 writes ``211 Logout.`` under TLS at the client's close_notify
and hangs up; taken for the answer to the plaintext ``FEAT`` behind the
close_notify it failed ``server.one-sided-close`` (R4) although nothing was
read.  The reference mode ``logout-at-close-notify`` does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from typing import Any, Iterator

from starttls_harness.dialects import Reply
from starttls_harness.dialects.ftp import FTP, split_ftp_reply
from starttls_harness.report.verdicts import Verdict
from starttls_harness.run.server import RunSettings, ServerTarget, run_server_target
from starttls_harness.scenarios.server import CATALOGUE
from starttls_harness.tls.certs import Pki

SETTINGS = RunSettings(reply_timeout=3.0, scenario_timeout=15.0)


def _reply(data: bytes) -> Reply:
    reply, rest = split_ftp_reply(data)
    assert reply is not None and rest == b""
    return reply


def test_a_one_line_211_is_a_goodbye_not_feats_answer() -> None:
    logout = _reply(b"211 Logout.\r\n")
    assert FTP.is_goodbye(logout) and not FTP.is_sentinel_reply(logout)


def test_feats_multi_line_answer_is_the_sentinel() -> None:
    feat = _reply(b"211-Extensions supported:\r\n AUTH TLS\r\n UTF8\r\n211 End.\r\n")
    assert FTP.is_sentinel_reply(feat) and not FTP.is_goodbye(feat)


def test_the_closing_codes_are_goodbyes() -> None:
    for line in (b"221 Goodbye.\r\n", b"421 Timeout.\r\n"):
        assert FTP.is_goodbye(_reply(line))
    assert not FTP.is_goodbye(_reply(b'257 "/" is your current location\r\n'))


# ------------------------------------- end to end: a server that logs out like Pure-FTPd

_FEAT = b"211-Extensions supported:\r\n AUTH TLS\r\n PBSZ\r\n PROT\r\n UTF8\r\n211 End.\r\n"


def _session(conn: socket.socket, ctx: ssl.SSLContext) -> None:
    """Pure-FTPd's shape: at the client's close_notify, ``211 Logout.`` under TLS, then close."""
    conn.settimeout(10)
    stream: Any = conn
    stream.sendall(b"220 fake Pure-FTPd\r\n")
    buf = b""
    try:
        while True:
            data = stream.recv(4096)
            if not data:  # TCP EOF, or (under TLS) the client's close_notify
                if isinstance(stream, ssl.SSLSocket):
                    stream.sendall(b"211 Logout.\r\n")
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                verb = line.strip().upper()
                if verb == b"FEAT":
                    stream.sendall(_FEAT)
                elif verb == b"AUTH TLS" and not isinstance(stream, ssl.SSLSocket):
                    stream.sendall(b"234 AUTH TLS OK.\r\n")
                    stream = ctx.wrap_socket(conn, server_side=True)
                    buf = b""
                elif verb == b"QUIT":
                    stream.sendall(b"221 Goodbye.\r\n")
                    return
                else:
                    stream.sendall(b"500 Unknown command.\r\n")
    except (OSError, ssl.SSLError):
        return
    finally:
        conn.close()


@contextlib.contextmanager
def _logout_server(pki: Pki) -> Iterator[int]:
    ctx = pki.server_context(None)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=_session, args=(conn, ctx), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_logout_under_tls_at_close_notify_is_not_an_answer(pki: Pki) -> None:
    """server.one-sided-close: the plaintext FEAT behind our close_notify is never read."""
    scenarios = [s for s in CATALOGUE if s.id == "server.one-sided-close"]
    with _logout_server(pki) as port:
        target = ServerTarget("ftp", "127.0.0.1", port, cafile=pki.cafile)
        results = asyncio.run(asyncio.wait_for(run_server_target(scenarios, target, SETTINGS), 60))
    assert len(results) == 2
    for r in results:
        assert r.verdict is Verdict.PASS, (r.tls_version, r.summary)
        assert any(b"211 Logout." in e.data for e in r.evidence.exchanges)
