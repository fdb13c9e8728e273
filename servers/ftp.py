"""The reference FTP server: the control connection on the project's engine, AUTH TLS and CCC.

What it speaks (enough for a login, a ``LIST`` and a ``STOR`` of one small
file): ``FEAT``, ``AUTH TLS`` (``234``), ``PBSZ 0``, ``PROT P``/``C``,
``CCC`` (``200``), ``USER``/``PASS`` (only under TLS: no credentials in
plaintext), ``PWD``, ``MKD`` (a directory made counts as stored), ``TYPE``,
``SYST``, ``NOOP``, ``PASV`` (one listener on the server's address),
``LIST``, ``STOR``, ``QUIT``.  Data connections are plain asyncio protocols
with the standard library's ``SSLObject`` when ``PROT P`` is in force: the
closure rules are about the control connection.

CCC done right (RFC 4217 §5): the ``200`` and the server's close_notify are
the last things sent under TLS (the server starts the closure, as ProFTPD
does, so clients that wait for it -- curl's passive CCC mode -- work as well
as those that start it themselves -- ftplib, curl's active mode); nothing is
read as plaintext until the client's close_notify has arrived (R3, R4), and
then the session is plaintext again, still logged in.  Nothing may be
pipelined after ``CCC`` (the connection is closed).

Behaviours (``ServerConfig.behaviour``; each breaks exactly one rule):

``keep-buffer`` (R1)
    Executes plaintext pipelined after ``AUTH TLS`` inside TLS (CVE-2011-1575).
``plaintext-in-tls`` (R2)
    Answers plaintext commands received while TLS is up.
``early-plaintext`` (R3)
    After CCC sends its ``200`` and its close_notify and then takes
    plaintext commands without waiting for the client's close_notify (the
    guess ProFTPD makes when the client's alert does not come).
``no-close-notify-reply`` (R5)
    Never answers the client's close_notify; closes TCP instead (it, too,
    waits for the client to start the closure after CCC).
``logout-at-close-notify`` (R5)
    Says ``211 Logout.`` under TLS at the client's close_notify and closes
    TCP without answering it (Pure-FTPd 1.0.50); CCC is done right.
``impatient-ccc`` (R4)
    After CCC sends its close_notify first and, when the client's does not
    come within :data:`GUESS_WINDOW` seconds, hangs up.
``silent-hold`` (R3)
    After CCC's ``200`` and its close_notify, stays silent on plaintext
    that comes before the client's close_notify, holds it, and runs it once
    the client's close_notify has come (after the closure).
``header-drops-tls`` (R3)
    After CCC's ``200`` and its close_notify, takes the first five bytes of
    plaintext that come before the client's close_notify for a broken TLS
    record header, drops TLS and reads on in plaintext (the rest of that
    line is ignored, as Pure-FTPd ignores a line that starts with no
    letter): the next plaintext command is answered.  This is Pure-FTPd
    1.0.50: its ``SSL_shutdown`` after CCC waits for the client's
    close_notify, OpenSSL 3 rejects the header and the session is freed.
``ignore-truncation`` (R6)
    Executes a command line cut by TCP EOF under TLS.
``alert-as-close`` (R7)
    Takes a fatal alert for a closure and goes on in plaintext.

``silent-discard`` breaks no rule: it is ``silent-hold`` that discards the
held plaintext at the client's close_notify (the silence is allowed; only
running what came before the closure is not).  Nor does ``swallow-record``:
it takes early plaintext after CCC for the header of a TLS record and reads
on for the record's declared length (``FEAT\r`` announces 21,517 bytes),
so the client's close_notify and later commands vanish into it, until the
client's FIN: it closes having run nothing.

Two more modes break no rule; they show that CCC is tried whether or not FEAT
lists it (RFC 2228 predates FEAT), and skipped only when refused:

``unlisted-ccc``
    CCC works but FEAT does not list it (Pure-FTPd 1.0.50).
``no-ccc``
    No CCC: unlisted, and refused ``500`` (vsftpd).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Dict, List, Optional, Tuple, cast

from starttls_harness.dialects.ftp import feat_reply
from starttls_harness.servers.base import (
    STRICT,
    Behaviour,
    RunningServer,
    ServerConfig,
    behaviour_named,
)
from starttls_harness.tls.aio import SwitchableTransport, create_server
from starttls_harness.tls.engine import AlertReceived, CloseNotifyReceived, Event, Policy, Rule
from starttls_harness.tls.framing import line_framer
from starttls_harness.tls.states import State

__all__ = ["BEHAVIOURS", "start_server"]

#: How long ``impatient-ccc`` waits for the client's close_notify after CCC
#: (ProFTPD waits a few seconds, then guesses).
GUESS_WINDOW = 1.0

#: Behaviours whose rule only exists when the client sends the first
#: close_notify after CCC (R5, answering it): they wait for the client's
#: close_notify instead of sending theirs first.  (A server that accepts a
#: one-sided client closure, R4, has no FTP form: the strict server closes
#: first, so no scenario can tell it from a conforming one.)
_CLIENT_FIRST = frozenset({"no-close-notify-reply"})

#: Behaviours silent on plaintext before the client's close_notify after CCC.
_SILENT = frozenset({"silent-hold", "silent-discard"})

#: Behaviours whose engine lets plaintext through before the client's
#: close_notify after CCC (relaxed R3): they decide what it is themselves.
_EARLY_READ = _SILENT | {"header-drops-tls", "swallow-record"}

#: Bytes of a TLS record header (what ``header-drops-tls`` consumes).
_HEADER = 5

#: TLS record types the client's close_notify comes in (alert; TLS 1.3's
#: outer application_data), once the engine has left TLS for ``_SILENT``.
_RECORD_TYPES = (21, 23)

#: What ``logout-at-close-notify`` says under TLS at the client's close_notify
#: (as Pure-FTPd 1.0.50 does) before it hangs up without answering it.
LOGOUT = b"211 Logout.\r\n"

BEHAVIOURS: Dict[str, Behaviour] = {
    b.name: b
    for b in (
        STRICT,
        Behaviour(
            "keep-buffer",
            Rule.R1,
            "executes plaintext pipelined after AUTH TLS inside TLS",
            (Rule.R1,),
        ),
        Behaviour(
            "plaintext-in-tls",
            Rule.R2,
            "answers plaintext commands received while TLS is up",
            (Rule.R2,),
        ),
        Behaviour(
            "early-plaintext",
            Rule.R3,
            "after CCC sends close_notify and takes plaintext commands before the client's",
            (Rule.R3,),
        ),
        Behaviour(
            "no-close-notify-reply",
            Rule.R5,
            "never answers the client's close_notify; closes TCP instead",
            (Rule.R5,),
        ),
        Behaviour(
            "logout-at-close-notify",
            Rule.R5,
            "says '211 Logout.' under TLS at the client's close_notify, then closes TCP"
            " without answering it (Pure-FTPd)",
            (Rule.R5,),
        ),
        Behaviour(
            "impatient-ccc",
            Rule.R4,
            "after CCC sends close_notify first and hangs up when the client's is"
            f" {GUESS_WINDOW:g} s late",
        ),
        Behaviour(
            "silent-hold",
            Rule.R3,
            "after CCC holds plaintext sent before the client's close_notify, silently,"
            " and runs it after the closure",
        ),
        Behaviour(
            "silent-discard",
            None,
            "after CCC stays silent on plaintext sent before the client's close_notify"
            " and discards it at the closure",
        ),
        Behaviour(
            "header-drops-tls",
            Rule.R3,
            "after CCC takes early plaintext for a broken TLS record header, drops TLS"
            " without the client's close_notify and reads on in plaintext",
        ),
        Behaviour(
            "swallow-record",
            None,
            "after CCC takes early plaintext for a TLS record header and reads on for the"
            " record, running nothing, until the client's FIN",
        ),
        Behaviour(
            "ignore-truncation",
            Rule.R6,
            "executes a command line cut by TCP EOF under TLS",
            (Rule.R6,),
        ),
        Behaviour(
            "alert-as-close",
            Rule.R7,
            "takes a fatal TLS alert for a closure and goes on in plaintext",
            (Rule.R7,),
        ),
        Behaviour("unlisted-ccc", None, "CCC works but FEAT does not list it (Pure-FTPd)"),
        Behaviour("no-ccc", None, "no CCC: FEAT does not list it and it is refused (vsftpd)"),
    )
}

GREETING = b"220 starttls-harness reference FTP server\r\n"
CCC_OK = b"200 Clearing control channel protection\r\n"
_LIST_LINE = b"-rw-r--r-- 1 ftp ftp 5 Jan 01 00:00 hello.txt\r\n"


def _words(line: bytes) -> Tuple[str, str]:
    text = line.decode("latin-1").strip()
    verb, _, arg = text.partition(" ")
    return verb.upper(), arg.strip()


def _record_end(data: bytes) -> Optional[int]:
    """End of the complete TLS record ``data`` starts with, if it does."""
    if len(data) < 5 or data[0] not in _RECORD_TYPES or data[1] != 3:
        return None
    end = 5 + ((data[3] << 8) | data[4])
    return end if len(data) >= end else None


class _Session(asyncio.Protocol):
    """One control connection, served by a task that reads command lines."""

    def __init__(self, config: ServerConfig, behaviour: Behaviour, messages: List[bytes]) -> None:
        self.config = config
        self.behaviour = behaviour
        self.messages = messages
        self.transport: Optional[SwitchableTransport] = None
        self.buf = bytearray()
        self.changed = asyncio.Event()
        self.ended = False
        self.eof = False
        self.eof_in_tls = False
        self.phase_tls = False
        self.framer = line_framer()
        self.task: Optional[asyncio.Task[None]] = None
        self.user: Optional[str] = None
        self.given_user: Optional[str] = None
        self.pbsz = False
        self.prot_private = False
        self.passive: Optional[asyncio.AbstractServer] = None
        self.data_conn: asyncio.Future[_Data] = asyncio.get_running_loop().create_future()

    # ---------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SwitchableTransport)
        self.transport = transport
        transport.hold_after(_is_auth_tls, framer=line_framer())
        transport.write(GREETING)
        self.task = asyncio.ensure_future(self._serve())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.changed.set()

    def eof_received(self) -> bool:
        self.eof = True
        self.eof_in_tls = self.phase_tls  # the engine has already left TLS here
        self.changed.set()
        return False

    def engine_event(self, event: Event) -> None:
        t = self.transport
        if t is None:
            return
        name = self.behaviour.name
        if isinstance(event, CloseNotifyReceived) and name == "no-close-notify-reply":
            t.close()  # R5 broken: hang up instead of answering
        elif (
            isinstance(event, CloseNotifyReceived)
            and name == "logout-at-close-notify"
            and t.engine.state is State.CLOSE_RECEIVED  # the client started the closure
        ):
            t.write(LOGOUT)  # a goodbye under TLS, never the close_notify's answer
            t.close()
        elif isinstance(event, AlertReceived) and name != "alert-as-close":
            t.abort()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.ended = True
        self.changed.set()
        if self.passive is not None:
            self.passive.close()

    # ---------------------------------------------------------- reading

    async def _line(self) -> Optional[bytes]:
        while True:
            units, _ = self.framer.split(bytes(self.buf))
            if units:
                del self.buf[: len(units[0])]
                return units[0]
            if len(self.buf) > self.config.limits.max_line:
                return None
            if self.ended or self.eof:
                return self._cut_line()
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), self.config.limits.idle_timeout)
            except asyncio.TimeoutError:
                return None

    def _cut_line(self) -> Optional[bytes]:
        """A line cut by EOF: dropped (R6), or run as if complete (ignore-truncation)."""
        if self.behaviour.name == "ignore-truncation" and self.buf and self.eof_in_tls:
            line = bytes(self.buf) + b"\r\n"
            self.buf.clear()
            return line
        return None

    # ---------------------------------------------------------- serving

    async def _serve(self) -> None:
        t = self.transport
        assert t is not None
        try:
            while True:
                line = await self._line()
                if line is None:
                    break
                if not await self._command(t, line):
                    break
        except (ConnectionError, asyncio.TimeoutError, RuntimeError, ssl.SSLError):
            pass
        t.close()

    async def _command(self, t: SwitchableTransport, line: bytes) -> bool:
        """Answer one command; False ends the session."""
        verb, arg = _words(line)
        tls = t.tls_active
        if verb == "FEAT":
            features = ["PBSZ", "PROT", "CCC"] if tls else ["AUTH TLS", "PBSZ", "PROT"]
            if self.behaviour.name in ("unlisted-ccc", "no-ccc"):
                features = [f for f in features if f != "CCC"]
            t.write(feat_reply([*features, "PASV", "UTF8"]))
        elif verb == "AUTH":
            await self._auth(t, arg)
        elif verb == "CCC":
            return await self._ccc(t)
        elif verb == "PBSZ":
            self.pbsz = tls
            t.write(b"200 PBSZ=0\r\n" if tls else b"503 PBSZ needs AUTH TLS first\r\n")
        elif verb == "PROT":
            self._prot(t, arg.upper())
        elif verb == "USER":
            self.user, self.given_user = None, arg
            t.write(b"331 Password required\r\n" if tls else b"530 AUTH TLS required first\r\n")
        elif verb == "PASS":
            ok = tls and self.given_user == self.config.user and arg == self.config.password
            self.user = self.given_user if ok else None
            t.write(b"230 Logged in\r\n" if ok else b"530 Login incorrect\r\n")
        elif verb == "NOOP":
            t.write(b"200 NOOP ok\r\n")
        elif verb == "QUIT":
            t.write(b"221 Goodbye\r\n")
            return False
        elif self.user is None:
            known = verb in ("PWD", "MKD", "SYST", "TYPE", "PASV", "LIST", "STOR")
            t.write(b"530 Please login\r\n" if known else b"500 Unknown command\r\n")
        else:
            await self._logged_in(t, verb, arg)
        return True

    async def _auth(self, t: SwitchableTransport, arg: str) -> None:
        if t.tls_active:
            t.write(b"503 Already under TLS\r\n")
        elif arg.upper() not in ("TLS", "TLS-C", "SSL"):
            t.write(b"504 AUTH mechanism not supported\r\n")
        else:
            await t.start_tls(
                self.config.ssl_context(),
                server_side=True,
                preface=b"234 AUTH TLS successful\r\n",
            )
            # RFC 4217 §4: a new login after AUTH; nothing from plaintext is kept.
            self.user = self.given_user = None
            self.pbsz = self.prot_private = False
            self.phase_tls = True

    async def _ccc(self, t: SwitchableTransport) -> bool:
        if self.behaviour.name == "no-ccc":
            t.write(b"500 Unknown command.\r\n")
            return True
        if not t.tls_active:
            t.write(b"533 CCC needs TLS on the control connection\r\n")
            return True
        if self.buf:  # nothing may be pipelined after CCC: it would straddle the closure
            return False
        if self.behaviour.name == "early-plaintext":
            # R3 broken: our close_notify with the 200, then plaintext is taken at once.
            with t.corked():
                t.write(CCC_OK)
                t.events.extend(t.engine.unwrap())
            self.phase_tls = False
            return True
        bound = self.config.timeouts.closure
        if self.behaviour.name in _CLIENT_FIRST:
            # The STOPTLS order: wait for the client's close_notify, answer it (R5).
            closure = asyncio.ensure_future(t.accept_unwrap(preface=CCC_OK, timeout=bound))
        else:
            # Our close_notify right behind the 200 (as ProFTPD): works with
            # clients that start the closure (ftplib, curl active) and with
            # those that wait for ours (curl passive); then we wait (R4).
            if self.behaviour.name == "impatient-ccc":
                bound = GUESS_WINDOW  # gives up on the client's close_notify too soon
            if self.behaviour.name in _EARLY_READ:
                t.engine.policy = Policy.relaxing(Rule.R3)  # early plaintext reaches us
            t.write(CCC_OK)
            closure = asyncio.ensure_future(t.unwrap(timeout=bound))
        while not closure.done():
            if self.buf:
                # Only a relaxed engine (R2, R3) lets bytes through before the
                # client's close_notify: that server takes them as a command.
                closure.cancel()
                if self.behaviour.name in _SILENT:
                    return await self._silent_closure()
                if self.behaviour.name == "header-drops-tls":
                    return await self._drop_header()
                if self.behaviour.name == "swallow-record":
                    return await self._swallow()
                return True
            self.changed.clear()
            waiter = asyncio.ensure_future(self.changed.wait())
            await asyncio.wait({closure, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        closure.result()  # raises if the closure failed
        self.phase_tls = False
        return True  # plaintext again, still logged in (RFC 4217 §5)

    async def _silent_closure(self) -> bool:
        """``_SILENT``: keep early plaintext unanswered until the client's close_notify.

        The engine has left TLS at the plaintext (relaxed R3), so the
        client's close_notify arrives as one raw TLS record; what follows it
        is plaintext.  ``silent-hold`` then runs what it kept first.
        """
        held = bytearray()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeouts.closure
        while True:
            end = _record_end(bytes(self.buf))
            if end is not None:
                kept = bytes(held) if self.behaviour.name == "silent-hold" else b""
                self.buf[:end] = kept
                self.phase_tls = False
                return True
            cut = self.buf.find(b"\n") + 1
            if self.buf and self.buf[0] not in _RECORD_TYPES and cut:
                held += self.buf[:cut]  # a command before the closure: said nothing
                del self.buf[:cut]
                continue
            remaining = deadline - loop.time()
            if self.ended or self.eof or remaining <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except asyncio.TimeoutError:
                return False

    async def _drop_header(self) -> bool:
        """``header-drops-tls``: five bytes taken for a record header, then plaintext (R3)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeouts.closure
        while len(self.buf) < _HEADER:
            remaining = deadline - loop.time()
            if self.ended or self.eof or remaining <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except asyncio.TimeoutError:
                return False
        del self.buf[:_HEADER]
        if self.buf[:1] == b"\n":
            del self.buf[:1]  # the rest of that line: no verb, ignored
        self.phase_tls = False
        return True

    async def _swallow(self) -> bool:
        """``swallow-record``: every byte is more of a record that never completes.

        Each read is bounded on its own (the closure bound), as a TLS stack
        reading a record would; the client's FIN ends the session.
        """
        while not (self.ended or self.eof):
            self.buf.clear()
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), self.config.timeouts.closure)
            except asyncio.TimeoutError:
                break
        self.buf.clear()
        return False

    def _prot(self, t: SwitchableTransport, level: str) -> None:
        if not self.pbsz:
            t.write(b"503 PBSZ first\r\n")
        elif level in ("P", "C"):
            self.prot_private = level == "P"
            t.write(b"200 PROT " + level.encode() + b"\r\n")
        else:
            t.write(b"504 PROT level not supported\r\n")

    async def _logged_in(self, t: SwitchableTransport, verb: str, arg: str) -> None:
        if verb == "PWD":
            t.write(b'257 "/" is the current directory\r\n')
        elif verb == "MKD":
            self.messages.append(arg.encode("latin-1"))
            t.write(b'257 "' + arg.encode("latin-1") + b'" created\r\n')
        elif verb == "SYST":
            t.write(b"215 UNIX Type: L8\r\n")
        elif verb == "TYPE":
            t.write(b"200 Type set\r\n")
        elif verb == "PASV":
            await self._pasv(t)
        elif verb in ("LIST", "STOR"):
            await self._transfer(t, verb)
        else:
            t.write(b"500 Unknown command\r\n")

    async def _pasv(self, t: SwitchableTransport) -> None:
        if self.passive is not None:
            self.passive.close()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_Data] = loop.create_future()
        self.data_conn = fut

        def factory() -> asyncio.Protocol:
            # The transfer may start only once the connection is made (its
            # transport is set): the protocol announces itself from
            # connection_made, never from the factory, which runs a loop turn
            # earlier (the race where STOR met a data protocol without its
            # transport when the accept and the STOR line arrived together).
            return _Data(fut)

        self.passive = await loop.create_server(factory, self.config.host, 0)
        host, port = self.passive.sockets[0].getsockname()[:2]
        h = host.replace(".", ",")
        t.write(f"227 Entering Passive Mode ({h},{port >> 8},{port & 255})\r\n".encode())

    async def _transfer(self, t: SwitchableTransport, verb: str) -> None:
        if self.passive is None:
            t.write(b"425 Use PASV first\r\n")
            return
        bound = self.config.timeouts.closure
        try:
            data = await asyncio.wait_for(self.data_conn, bound)
            # Whatever the client sent before our 150 (curl's ClientHello) is
            # in the data connection's buffer and goes to the TLS layer first.
            data.begin(self.config.ssl_context() if self.prot_private else None)
            t.write(b"150 Opening data connection\r\n")
            await data.handshake(bound)
            if verb == "LIST":
                data.send(_LIST_LINE)
                await data.finish(bound)
            else:
                self.messages.append(await data.receive(self.config.limits.max_message, bound))
                await data.finish(bound)
        except (ConnectionError, asyncio.TimeoutError, ssl.SSLError):
            t.write(b"426 Transfer aborted\r\n")
            return
        finally:
            self.passive.close()
            self.passive = None
        t.write(b"226 Transfer complete\r\n")


class _Data(asyncio.Protocol):
    """One passive data connection: bytes in until the end, bytes out, TLS on demand.

    TLS runs on an ``SSLObject`` and two memory BIOs, fed from the first
    byte the connection received: ``loop.start_tls`` loses a ClientHello
    that arrives before its protocol is in place (Python 3.9 reads a
    transport paused in ``connection_made``), which is exactly when curl and
    ftplib send theirs.  A data connection under ``PROT P`` ends with
    close_notify both ways; an EOF without it is a truncation (``426``).
    """

    def __init__(self, made: asyncio.Future[_Data]) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.made = made
        self.pending = bytearray()  # received before the transfer started
        self.buf = bytearray()  # application data
        self.started = False
        self.tls: Optional[ssl.SSLObject] = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.handshaken = asyncio.Event()
        self.done = asyncio.Event()
        self.closed_cleanly = False
        self.secured = False
        self.failure: Optional[BaseException] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.made.done():  # a second connection to one PASV port: not ours
            transport.close()
        else:
            self.made.set_result(self)

    def begin(self, context: Optional[ssl.SSLContext]) -> None:
        """The transfer starts: plain bytes, or TLS (server side) from the first byte."""
        self.started = True
        if context is None:
            self.handshaken.set()
            self.buf += self.pending
        else:
            self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
            self._feed(bytes(self.pending))
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if not self.started:
            self.pending += data
        elif self.tls is None:
            self.buf += data
        else:
            self._feed(data)

    def eof_received(self) -> bool:
        if self.tls is None and self.started:
            self.closed_cleanly = True
        self.done.set()
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.done.set()
        self.handshaken.set()

    def _feed(self, data: bytes) -> None:
        tls = self.tls
        assert tls is not None
        if data:
            self.incoming.write(data)
        try:
            if not self.handshaken.is_set():
                tls.do_handshake()
                self.secured = True
                self.handshaken.set()
            while True:
                chunk = tls.read(1 << 16)
                if not chunk:
                    raise ssl.SSLZeroReturnError
                self.buf += chunk
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLZeroReturnError:  # the client's close_notify: answer it (R5)
            self.closed_cleanly = True
            with contextlib.suppress(ssl.SSLError):
                tls.unwrap()
            self.done.set()
        except ssl.SSLError as exc:
            self.failure = exc
            self.done.set()
            self.handshaken.set()
        self._flush()

    def _flush(self) -> None:
        out = self.outgoing.read()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    async def handshake(self, bound: float) -> None:
        await asyncio.wait_for(self.handshaken.wait(), bound)
        self._raise()

    def send(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)
            self._flush()
        elif self.transport is not None:
            self.transport.write(data)

    async def receive(self, limit: int, bound: float) -> bytes:
        await asyncio.wait_for(self.done.wait(), bound)
        self._raise()
        if not self.closed_cleanly:
            raise ConnectionError("the data connection was truncated (no close_notify)")
        if len(self.buf) > limit:
            raise ConnectionError("file over the size limit")
        return bytes(self.buf)

    async def finish(self, bound: float) -> None:
        """Close: under TLS our close_notify, then the client's (bounded), then TCP."""
        if self.tls is not None and not self.closed_cleanly and self.failure is None:
            with contextlib.suppress(ssl.SSLError):
                self.tls.unwrap()
            self._flush()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.done.wait(), bound)
        if self.transport is not None:
            self.transport.close()

    def _raise(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self.tls is not None and not self.secured:
            raise ConnectionResetError("the data connection closed before its TLS handshake")


def _is_auth_tls(line: bytes) -> bool:
    return line.strip().upper() in (b"AUTH TLS", b"AUTH TLS-C", b"AUTH SSL")


async def start_server(config: ServerConfig) -> RunningServer:
    """The reference FTP server (the interface ``reference_servers`` loads)."""
    behaviour = behaviour_named(BEHAVIOURS, config.behaviour)
    messages: List[bytes] = []
    sessions: List[_Session] = []

    def factory() -> asyncio.Protocol:
        session = _Session(config, behaviour, messages)
        sessions.append(session)
        return session

    server = await create_server(
        factory, config.host, config.port, policy=behaviour.policy, timeouts=config.timeouts
    )
    return RunningServer(server, config, messages=messages, connections=sessions)
