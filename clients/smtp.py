"""Reference SMTP client: aiosmtplib's command layer on the harness transport.

Why this shape
==============

:class:`SMTPClient` composes two public aiosmtplib pieces and replaces only
the TLS switch:

* the connection's asyncio protocol is a subclass of
  :class:`aiosmtplib.protocol.SMTPProtocol` (reply parsing, command
  execution, DATA dot-stuffing), running on a
  :class:`~starttls_harness.tls.aio.SwitchableTransport` opened with
  :func:`starttls_harness.tls.aio.open_connection`;
* the commands (EHLO, AUTH PLAIN, MAIL/RCPT/DATA, QUIT) are
  :class:`aiosmtplib.SMTP` methods; an ``aiosmtplib.SMTP`` object is
  given our protocol and transport through its public ``protocol`` and
  ``transport`` attributes.  R8 ("discard what you learned") is done by
  replacing that object with a fresh one after every transition.

aiosmtplib's own ``starttls()`` cannot be used: it calls ``loop.start_tls``,
which cannot return to plaintext, and defends against response injection
by clearing its private buffer.  Here STARTTLS is sent with the public
``execute_command`` after arming the engine's hold gate on the final line
of the reply (R1: the engine, not a buffer clear, refuses a leftover), and
the upgrade is ``transport.start_tls``.  ``stoptls()`` sends ``STOPTLS``,
expects ``220``, then ``await transport.unwrap()`` (our close_notify, then
the server's: R3-R5) and reads the server's new plaintext greeting.

One seam is not aiosmtplib's: the reply that follows the closure (the
server speaks first) is read by a small reader of this module.
aiosmtplib 5 drops bytes that arrive while no command is pending, and only
parses its buffer when data arrives, so a greeting that comes with the
server's close_notify could be lost or stuck; during the closure the
protocol routes incoming bytes to :class:`_ReplyReader` instead.  No private
aiosmtplib attribute is touched.

Strict rules on the client side: R1 as above; R2-R7 by the engine; R8 by
the fresh command object and a new EHLO after STARTTLS and STOPTLS; R9 with
``require_tls=True``: :meth:`connect` upgrades at once and raises
:class:`TLSRequiredError` when STARTTLS is not offered or fails, and AUTH or
mail are never sent in plaintext.

Behaviours (``behaviour=``; each breaks exactly one rule)
========================================================

``strict``
    Follows every rule.
``accept-injected-response`` (R1)
    Does not hold the bytes after the ``220`` answer to STARTTLS: a reply
    injected in plaintext stays in aiosmtplib's buffer and is taken as the
    answer to the first command under TLS.
``plaintext-in-tls`` (R2)
    Takes non-TLS bytes received while TLS is up as replies.
``one-sided-close`` (R4)
    After ``STOPTLS`` sends its close_notify and its next plaintext command
    (EHLO) in one segment, without waiting for the server's close_notify.
``no-close-notify-reply`` (R5)
    Never answers a close_notify from the server; closes TCP instead.
``ignore-truncation`` (R6)
    A reply cut by TCP EOF under TLS is taken as complete, and the EOF is
    reported as an ordinary disconnect.
``no-state-reset`` (R8)
    Keeps the plaintext EHLO capabilities after STARTTLS (and the TLS ones
    after STOPTLS) and does not send EHLO again.
``downgrade`` (R9)
    With ``require_tls=True``, carries on in plaintext when STARTTLS is not
    offered or refused, and sends AUTH and mail anyway.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from types import TracebackType
from typing import (
    Awaitable,
    Deque,
    Dict,
    Iterable,
    List,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
)

import aiosmtplib
from aiosmtplib import (
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPException,
    SMTPNotSupported,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
)
from aiosmtplib.protocol import SMTPProtocol
from starttls_harness.dialects.roles import (
    PATH_MESSAGE,
    PATH_RECIPIENT,
    PATH_SENDER,
    ClientOutcome,
    ClientSpec,
    Hooks,
    PathDriver,
    SessionPlan,
    StopTLSUnsupported,
    failed,
    transport_events,
)
from starttls_harness.servers.base import STRICT, Behaviour, behaviour_named
from starttls_harness.tls.aio import ConnectionEnded, SwitchableTransport, Timeouts, open_connection
from starttls_harness.tls.certs import system_client_context
from starttls_harness.tls.engine import (
    CloseNotifyReceived,
    ClosureComplete,
    Event,
    HandshakeComplete,
    Rule,
    Segment,
    Violation,
)
from starttls_harness.tls.states import State

__all__ = [
    "BEHAVIOURS",
    "RuleViolation",
    "SMTPClient",
    "StopTLSNotSupported",
    "TLSRequiredError",
    "path_driver",
    "reference_session",
]

T = TypeVar("T")

#: Bound of one reply read by :class:`_ReplyReader` (as aiosmtplib's).
MAX_REPLY = 8192 * 4

BEHAVIOURS: Dict[str, Behaviour] = {
    b.name: b
    for b in (
        STRICT,
        Behaviour(
            "accept-injected-response",
            Rule.R1,
            "takes a reply injected after the STARTTLS answer as a reply under TLS",
        ),
        Behaviour(
            "plaintext-in-tls",
            Rule.R2,
            "takes plaintext received while TLS is up as replies",
            (Rule.R2,),
        ),
        Behaviour(
            "one-sided-close",
            Rule.R4,
            "sends close_notify and the next plaintext command in one segment",
        ),
        Behaviour(
            "no-close-notify-reply",
            Rule.R5,
            "never answers the server's close_notify; closes TCP instead",
            (Rule.R5,),
        ),
        Behaviour(
            "ignore-truncation",
            Rule.R6,
            "takes a reply cut by TCP EOF under TLS as complete",
            (Rule.R6,),
        ),
        Behaviour(
            "no-state-reset",
            Rule.R8,
            "keeps the plaintext EHLO capabilities after STARTTLS, no new EHLO",
        ),
        Behaviour(
            "downgrade",
            Rule.R9,
            "with require_tls, continues in plaintext when STARTTLS is missing or fails",
        ),
    )
}


class StopTLSNotSupported(SMTPException):
    """The server cannot return to plaintext (it does not offer STOPTLS)."""


class TLSRequiredError(SMTPException):
    """TLS is required (``require_tls=True``) and could not be had (R9)."""


class RuleViolation(SMTPServerDisconnected):
    """The server broke a closure rule; the engine closed the connection."""

    def __init__(self, ended: ConnectionEnded) -> None:
        event = ended.event
        assert isinstance(event, Violation)
        self.rule: Rule = event.rule
        self.event: Violation = event
        super().__init__(
            f"the server broke rule {event.rule.value} ({event.rule.summary}):"
            f" {event.message}; the connection was closed"
        )


def _is_final_reply_line(line: bytes) -> bool:
    """Hold-gate predicate: the last line of an SMTP reply."""
    return line[3:4] != b"-"


def _parse_reply(lines: Sequence[bytes]) -> SMTPResponse:
    code = -1
    message: List[str] = []
    for line in lines:
        try:
            code = int(line[:3])
        except ValueError:
            text = line.decode("utf-8", "replace").strip()
            raise SMTPResponseException(-1, f"Malformed SMTP reply line: {text}") from None
        message.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
    return SMTPResponse(code, "\n".join(message))


class _ReplyReader:
    """Replies read outside aiosmtplib (while the TLS closure is under way)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buffer = b""
        self._lines: List[bytes] = []
        self._replies: Deque[SMTPResponse] = collections.deque()
        self._error: Optional[BaseException] = None
        self._waiter: Optional[asyncio.Future[None]] = None

    @property
    def leftover(self) -> bytes:
        return b"".join(self._lines) + self._buffer

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            nl = self._buffer.find(b"\n")
            if nl < 0:
                break
            line, self._buffer = self._buffer[: nl + 1], self._buffer[nl + 1 :]
            self._lines.append(line)
            if _is_final_reply_line(line):
                try:
                    self._replies.append(_parse_reply(self._lines))
                except SMTPResponseException as exc:
                    self.fail(exc)
                self._lines = []
        if len(self._buffer) + sum(map(len, self._lines)) > MAX_REPLY:
            self.fail(SMTPResponseException(-1, "Response too long"))
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, timeout: float) -> SMTPResponse:
        async def wait() -> SMTPResponse:
            while not self._replies:
                if self._error is not None:
                    raise self._error
                self._waiter = self._loop.create_future()
                await self._waiter
            return self._replies.popleft()

        try:
            return await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            raise aiosmtplib.SMTPReadTimeoutError(
                "Timed out waiting for the server's reply after the TLS closure"
            ) from None


class _ReplyTail:
    """The reply in progress (for the ``ignore-truncation`` behaviour)."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> None:
        buf = self.pending + data
        pos = start = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            if _is_final_reply_line(buf[pos : nl + 1]):
                start = nl + 1
            pos = nl + 1
        self.pending = buf[start:][-MAX_REPLY:]

    def completion(self) -> bytes:
        """Bytes that would make the reply in progress look complete."""
        if not self.pending:
            return b""
        end = b"" if self.pending.endswith(b"\n") else b"\r\n"
        last = (self.pending + end).splitlines()[-1]
        if last[3:4] == b"-":
            return end + last[:3] + b" \r\n"
        return end


class _ClientProtocol(SMTPProtocol):
    """aiosmtplib's protocol plus the engine's events and the closure reader."""

    def __init__(self, loop: asyncio.AbstractEventLoop, behaviour: Behaviour) -> None:
        super().__init__(loop=loop)
        self.behaviour = behaviour
        self.switch: Optional[SwitchableTransport] = None
        #: Why the connection ended, when the transport says so.
        self.failure: Optional[BaseException] = None
        #: TLS as the engine's events tell it (HandshakeComplete..ClosureComplete).
        self.tls = False
        self.reader: Optional[_ReplyReader] = None
        self._tail = _ReplyTail()
        self._waiters: Dict[type, asyncio.Future[Event]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SwitchableTransport)
        self.switch = transport
        super().connection_made(transport)

    def engine_event(self, event: Event) -> None:
        if isinstance(event, HandshakeComplete):
            self.tls = True
        elif isinstance(event, ClosureComplete):
            self.tls = False
        elif (
            isinstance(event, CloseNotifyReceived)
            and self.behaviour.name == "no-close-notify-reply"
            and self.switch is not None
            and self.switch.engine.state is State.CLOSE_RECEIVED
        ):
            # R5 broken on purpose: no answering close_notify, just TCP close.
            # (Only a close_notify the server sent first: the one that answers
            # our own, at STOPTLS, has completed the closure already.)
            self.switch.close()
        waiter = self._waiters.pop(type(event), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(event)

    def expect(self, kind: Type[Event]) -> asyncio.Future[Event]:
        fut: asyncio.Future[Event] = self._loop.create_future()
        self._waiters[kind] = fut
        return fut

    def start_reading_replies(self) -> _ReplyReader:
        self.reader = _ReplyReader(self._loop)
        return self.reader

    def stop_reading_replies(self) -> bytes:
        """Give the byte stream back to aiosmtplib; return unread bytes."""
        reader, self.reader = self.reader, None
        return reader.leftover if reader is not None else b""

    def data_received(self, data: bytes) -> None:
        if self.reader is not None:
            self.reader.feed(data)
            return
        self._tail.feed(data)
        super().data_received(data)

    def eof_received(self) -> bool:
        if self.reader is not None:
            self.reader.fail(SMTPServerDisconnected("Unexpected EOF received"))
        if self.behaviour.name == "ignore-truncation" and self.tls:
            # R6 broken on purpose: the cut reply is completed and accepted.
            completion = self._tail.completion()
            if completion:
                super().data_received(completion)
        return bool(super().eof_received())

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.failure = exc
        if self.reader is not None:
            lost = SMTPServerDisconnected("Connection lost")
            lost.__cause__ = exc
            self.reader.fail(lost)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(exc or SMTPServerDisconnected("Connection lost"))
                fut.exception()  # retrieved: the waiter may be gone
        self._waiters.clear()
        super().connection_lost(exc)


class SMTPClient:
    """An SMTP client that can go to TLS and back, by the closure rules.

    ``tls_context`` defaults to a verifying client context with the system
    CAs; ``server_hostname`` (SNI and certificate check) defaults to
    ``host``.  ``timeout`` bounds every reply; ``timeouts`` the handshake
    and the closure.
    """

    #: The hello command and aiosmtplib's command layer (LMTP's subclass
    #: says ``LHLO`` with its own layer).
    hello_verb = b"EHLO"
    command_layer: Type[aiosmtplib.SMTP] = aiosmtplib.SMTP

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls_context: Optional[ssl.SSLContext] = None,
        server_hostname: Optional[str] = None,
        local_hostname: str = "client.invalid",
        require_tls: bool = False,
        behaviour: str = "strict",
        timeout: float = 10.0,
        timeouts: Optional[Timeouts] = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls_context = tls_context or system_client_context()
        self.server_hostname = server_hostname or host
        self.local_hostname = local_hostname
        self.require_tls = require_tls
        self.behaviour = behaviour_named(BEHAVIOURS, behaviour)
        self.timeout = timeout
        self.timeouts = timeouts or Timeouts()
        self.transport: Optional[SwitchableTransport] = None
        self.protocol: Optional[_ClientProtocol] = None
        #: aiosmtplib's command layer for the current phase (replaced after
        #: every transition unless the behaviour is ``no-state-reset``).
        self.smtp = self._command_layer()
        self.greeting: Optional[SMTPResponse] = None

    # ------------------------------------------------------------ info

    @property
    def tls_active(self) -> bool:
        return self.transport is not None and self.transport.tls_active

    @property
    def tls_version(self) -> Optional[str]:
        return self.transport.tls_version if self.transport is not None else None

    @property
    def extensions(self) -> Dict[str, str]:
        """ESMTP keywords (lower case) from the last EHLO the client trusts."""
        return dict(self.smtp.esmtp_extensions)

    @property
    def violations(self) -> List[Violation]:
        return self.transport.violations if self.transport is not None else []

    @property
    def transcript(self) -> List[Segment]:
        return self.transport.engine.transcript if self.transport is not None else []

    @property
    def _resets_state(self) -> bool:
        return self.behaviour.name != "no-state-reset"

    # ------------------------------------------------------------ connection

    async def connect(self) -> SMTPResponse:
        """Connect and read the greeting; with ``require_tls``, upgrade at once."""
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await open_connection(
                lambda: _ClientProtocol(loop, self.behaviour),
                self.host,
                self.port,
                policy=self.behaviour.policy,
                timeouts=self.timeouts,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise SMTPConnectError(
                f"Error connecting to {self.host} on port {self.port}: {exc}"
            ) from exc
        assert isinstance(protocol, _ClientProtocol)
        self.transport, self.protocol = transport, protocol
        self.smtp = self._command_layer()
        greeting = await self._guard(protocol.read_response(timeout=self.timeout))
        if greeting.code != 220:
            self.close()
            raise SMTPConnectResponseError(greeting.code, greeting.message)
        self.greeting = greeting
        if self.require_tls:
            await self.ehlo()
            try:
                await self.starttls()
            except SMTPNotSupported:
                if self.behaviour.name != "downgrade":
                    raise
                # R9 broken on purpose: carry on in plaintext.
        return greeting

    def close(self) -> None:
        """Close the connection (one-way close_notify first under TLS)."""
        if self.transport is not None:
            self.transport.close()

    async def __aenter__(self) -> SMTPClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if exc is None and self.protocol is not None and self.protocol.is_connected:
            try:
                await self.quit()
            except (SMTPException, ConnectionError):
                pass
        self.close()

    # ------------------------------------------------------------ commands

    async def execute_command(self, *args: bytes) -> SMTPResponse:
        """Send one raw command and return its reply (tests, diagnostics)."""
        verb = args[0].split(b" ", 1)[0].upper() if args else b""
        if verb in (b"AUTH", b"MAIL", b"RCPT", b"DATA"):
            self._check_may_send(verb.decode("ascii"))
        return await self._guard(self.smtp.execute_command(*args, timeout=self.timeout))

    async def ehlo(self) -> SMTPResponse:
        return await self._guard(self.smtp.ehlo(hostname=self.local_hostname, timeout=self.timeout))

    async def starttls(self, *, ehlo: bool = True) -> SMTPResponse:
        """Upgrade to TLS; then forget the plaintext capabilities and EHLO again."""
        transport, _ = self._connected()
        if transport.tls_active:
            raise SMTPException("TLS is already active")
        if self.smtp.is_ehlo_or_helo_needed:
            await self.ehlo()
        if not self.smtp.supports_extension("starttls"):
            raise self._no_tls("the server did not offer STARTTLS")
        if self.behaviour.name != "accept-injected-response":
            # R1: nothing after the final line of the answer reaches us.
            transport.hold_after(_is_final_reply_line, once=True)
        response = await self.execute_command(b"STARTTLS")
        if response.code != 220:
            if not transport.is_closing():
                transport.release_held()
            raise self._no_tls(f"the server refused STARTTLS: {response}")
        try:
            await transport.start_tls(
                self.tls_context,
                server_side=False,
                server_hostname=self.server_hostname,
                timeout=self.timeouts.handshake,
            )
        except (ConnectionError, asyncio.TimeoutError, RuntimeError) as exc:
            # RuntimeError: the engine refused the switch (connection gone).
            self.close()
            failure = self._failure(exc)
            if isinstance(failure, RuleViolation) or not self.require_tls:
                raise failure from exc
            raise TLSRequiredError(
                f"STARTTLS failed ({failure}); TLS is required, the connection was closed"
            ) from exc
        if self._resets_state:
            self.smtp = self._command_layer()  # R8
            if ehlo:
                await self.ehlo()
        return response

    async def stoptls(self, *, ehlo: bool = True) -> SMTPResponse:
        """Return to plaintext (STOPTLS); returns the server's new greeting."""
        transport, protocol = self._connected()
        if not transport.tls_active:
            raise SMTPException("TLS is not active")
        if self.smtp.is_ehlo_or_helo_needed:
            await self.ehlo()
        if not self.smtp.supports_extension("stoptls"):
            offered = " ".join(sorted(self.smtp.esmtp_extensions)) or "nothing"
            raise StopTLSNotSupported(
                f"{self.host}:{self.port} does not offer STOPTLS under TLS (its EHLO"
                f" lists: {offered}), so this connection cannot return to plaintext;"
                " STOPTLS is the harness's reference extension"
            )
        response = await self.execute_command(b"STOPTLS")
        if response.code != 220:
            if response.code in (500, 502, 504):
                raise StopTLSNotSupported(f"the server refused STOPTLS: {response}")
            raise SMTPResponseException(response.code, response.message)
        # The server speaks first after the closure (see the module docstring).
        reader = protocol.start_reading_replies()
        early_ehlo = self.behaviour.name == "one-sided-close"
        try:
            if early_ehlo:
                await self._one_sided_close(transport, protocol)
            else:
                await transport.unwrap(timeout=self.timeouts.closure)
            greeting = await self._guard(reader.next(self.timeout))
            ehlo_reply = await self._guard(reader.next(self.timeout)) if early_ehlo else None
        except (ConnectionError, TimeoutError, asyncio.TimeoutError, RuntimeError) as exc:
            # Timeouts (bounded waits) and engine refusals end the session.
            self.close()
            raise self._failure(exc) from exc
        finally:
            protocol.stop_reading_replies()
        if greeting.code != 220:
            self.close()
            raise SMTPConnectResponseError(greeting.code, greeting.message)
        self.greeting = greeting
        if self._resets_state:
            self.smtp = self._command_layer()  # R8
            if ehlo_reply is not None and ehlo_reply.code == 250:
                self.smtp.last_ehlo_response = ehlo_reply
            elif ehlo:
                await self.ehlo()
        return greeting

    async def _one_sided_close(
        self, transport: SwitchableTransport, protocol: _ClientProtocol
    ) -> None:
        """R4 broken on purpose: close_notify and EHLO leave together."""
        closure = protocol.expect(ClosureComplete)
        with transport.corked():
            transport.events.extend(transport.engine.unwrap())
            hello = self.hello_verb + b" " + self.local_hostname.encode("ascii")
            transport.write_raw(hello + b"\r\n")
        await asyncio.wait_for(closure, self.timeouts.closure)

    async def login(self, username: str, password: str) -> SMTPResponse:
        """AUTH PLAIN (never in plaintext when TLS is required)."""
        self._check_may_send("credentials")
        if self.smtp.is_ehlo_or_helo_needed:
            await self.ehlo()
        if "plain" not in self.smtp.server_auth_methods:
            where = "under TLS" if self.tls_active else "in plaintext"
            raise SMTPNotSupported(f"the server does not offer AUTH PLAIN {where}")
        return await self._guard(self.smtp.auth_plain(username, password, timeout=self.timeout))

    async def sendmail(
        self,
        sender: str,
        recipients: Union[str, Sequence[str]],
        message: Union[str, bytes],
        *,
        mail_options: Optional[Iterable[str]] = None,
    ) -> Tuple[Dict[str, SMTPResponse], str]:
        """One mail transaction (MAIL, RCPT..., DATA)."""
        self._check_may_send("mail")
        return await self._guard(
            self.smtp.sendmail(
                sender, recipients, message, mail_options=mail_options, timeout=self.timeout
            )
        )

    async def quit(self) -> SMTPResponse:
        return await self._guard(self.smtp.quit(timeout=self.timeout))

    # ------------------------------------------------------------ internals

    def _command_layer(self) -> aiosmtplib.SMTP:
        smtp = self.command_layer(
            hostname=self.host,
            port=self.port,
            local_hostname=self.local_hostname,
            timeout=self.timeout,
            start_tls=False,
        )
        smtp.protocol = self.protocol
        smtp.transport = self.transport
        return smtp

    def _connected(self) -> Tuple[SwitchableTransport, _ClientProtocol]:
        if self.transport is None or self.protocol is None or self.transport.is_closing():
            raise SMTPServerDisconnected("Server not connected")
        return self.transport, self.protocol

    def _check_may_send(self, what: str) -> None:
        if self.require_tls and not self.tls_active and self.behaviour.name != "downgrade":
            raise TLSRequiredError(
                f"refusing to send {what} in plaintext: TLS is required (require_tls=True)"
            )

    def _no_tls(self, reason: str) -> SMTPException:
        """The exception for "no TLS to be had" (R9 when TLS is required)."""
        if self.require_tls and self.behaviour.name != "downgrade":
            self.close()
            return TLSRequiredError(
                f"{reason}; TLS is required, so the connection was closed"
                " before any credentials or mail were sent"
            )
        return SMTPNotSupported(reason)

    def _failure(self, exc: BaseException) -> SMTPException:
        """Turn what ended the connection into the clearest exception."""
        candidates: List[Optional[BaseException]] = [
            exc,
            exc.__cause__,
            self.protocol.failure if self.protocol is not None else None,
        ]
        for cause in candidates:
            if isinstance(cause, ConnectionEnded) and cause.rule is not None:
                return RuleViolation(cause)
        if isinstance(exc, SMTPException):
            return exc
        for cause in candidates:
            if isinstance(cause, ConnectionEnded):
                return SMTPServerDisconnected(str(cause))
        if isinstance(exc, asyncio.TimeoutError):
            return aiosmtplib.SMTPTimeoutError(str(exc) or "timed out")
        return SMTPServerDisconnected(str(exc) or type(exc).__name__)

    async def _guard(self, aw: Awaitable[T]) -> T:
        """Await ``aw``; a rule violation surfaces as :class:`RuleViolation`."""
        try:
            return await aw
        except (SMTPServerDisconnected, ConnectionError) as exc:
            failure = self._failure(exc)
            if isinstance(exc, SMTPException) and failure is exc:
                raise
            raise failure from exc


# ------------------------------------------------------ the harness's roles


class _PathDriver(PathDriver):
    """:class:`SMTPClient` through the path proxy, one verb at a time."""

    def __init__(self, spec: ClientSpec, behaviour: str, client: Type[SMTPClient]) -> None:
        self.client = client(
            spec.host,
            spec.port,
            tls_context=spec.tls_context,
            server_hostname=spec.server_hostname,
            behaviour=behaviour,
            timeout=spec.timeout,
            timeouts=Timeouts(handshake=spec.timeout, closure=spec.timeout, connect=spec.timeout),
        )

    async def connect(self, hooks: Hooks) -> None:
        await self.client.connect()
        await self.client.ehlo()

    async def starttls(self, hooks: Hooks) -> None:
        await self.client.starttls()

    async def command(self, hooks: Hooks) -> None:
        await self.client.execute_command(b"NOOP")

    async def stoptls(self, hooks: Hooks) -> None:
        try:
            await self.client.stoptls()
        except StopTLSNotSupported as exc:
            raise StopTLSUnsupported(str(exc)) from exc

    async def send_unit(self, hooks: Hooks) -> None:
        """MAIL, RCPT, then DATA whose body takes two records: FIN replaces the second."""
        await self.client.ehlo()
        await self.client.execute_command(f"MAIL FROM:<{PATH_SENDER}>".encode())
        await self.client.execute_command(f"RCPT TO:<{PATH_RECIPIENT}>".encode())
        hooks.arm(nth=3)  # 1: DATA, 2-3: the body (16 KiB + the rest with the final dot)
        await self.client.smtp.data(PATH_MESSAGE, timeout=self.client.timeout)

    async def fetch_unit(self, hooks: Hooks) -> None:
        """EHLO under TLS: the reference server writes one record per reply line."""
        hooks.arm(nth=2)
        await self.client.ehlo()

    async def quit(self, hooks: Hooks) -> None:
        await self.client.quit()

    def engine_events(self) -> Optional[Sequence[Event]]:
        return transport_events(self.client.transport)

    async def close(self) -> None:
        self.client.close()


def path_driver(spec: ClientSpec, behaviour: str, user: str, password: str) -> PathDriver:
    """The reference client as the path role's client under test."""
    return _PathDriver(spec, behaviour, SMTPClient)


async def reference_session(
    plan: SessionPlan, client_class: Type[SMTPClient] = SMTPClient
) -> ClientOutcome:
    """The reference client's normal session against the scripted server."""
    client = client_class(
        plan.host,
        plan.port,
        tls_context=plan.tls_context,
        server_hostname="localhost",
        require_tls=True,
        behaviour=plan.behaviour,
        timeout=plan.timeout,
        timeouts=plan.timeouts,
    )

    async def login() -> None:
        if "plain" in client.smtp.server_auth_methods:
            await client.login(plan.user, plan.password)

    done = 0
    try:
        await client.connect()  # greeting, EHLO, STARTTLS, EHLO
        await login()
        for _ in range(plan.cycles):
            if "stoptls" not in client.extensions:
                break
            await client.stoptls()  # closure, greeting, EHLO
            await client.starttls()  # handshake, EHLO
            await login()
            done += 1
        await client.sendmail(plan.sender, [plan.recipient], plan.message)
        with contextlib.suppress(SMTPException, ConnectionError):
            await client.quit()  # the mail is sent; a sloppy goodbye is no failure
    except (SMTPException, ConnectionError, OSError, asyncio.TimeoutError, RuntimeError) as exc:
        return failed(exc)
    finally:
        client.close()
    return ClientOutcome(True, f"mail sent after {done} STOPTLS cycle(s)")
