"""Reference LDAP server: StartTLS (RFC 4511 §4.14), removal of the TLS layer, misbehaviours.

One coroutine per connection reads BER ``LDAPMessage`` units (cut by the
dialect's :class:`~starttls_harness.dialects.ldap.BerFramer`) and answers
them: a base-object search of the root DSE (or of an added entry), simple
bind, unbind, add, the StartTLS and "Who am I?" extended operations.
Anything it cannot parse gets a Notice of Disconnection and the close.

Security decisions: a simple bind with a password is refused with
``confidentialityRequired`` until TLS is up (R9 on the server side) and an
add needs a bind; the hold gate is armed for the StartTLS request, so the
bytes after it are the R1 leftover the strict engine refuses; StartTLS
inside TLS is ``operationsError``.  After every handshake the engine is
told that a closure returns to plaintext (``accept_unwrap``): whenever the
client removes the TLS layer the server answers its close_notify at once
(R5) and reads plaintext PDUs only after both alerts crossed (R3, R4).  It
never removes the layer itself (it cannot know when the client wants it).
The bound identity is dropped at StartTLS and at the removal (R8).

Behaviours (``BEHAVIOURS``; each breaks one rule): ``keep-buffer`` (R1),
``plaintext-in-tls`` (R2), ``one-sided-resume`` (R4: plaintext glued to the
client's close_notify is taken), ``no-close-notify-reply`` (R5: TCP closed
instead), ``ignore-truncation`` (R6: an AddRequest cut by EOF is stored),
``alert-as-close`` (R7), ``no-state-reset`` (R8: the bind survives the
removal) and ``accept-starttls-in-tls`` (R8: a second StartTLS succeeds).
The shared STOPTLS behaviours of the mail servers have no LDAP meaning:
every closure is a removal here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Dict

from starttls_harness.dialects.ldap import (
    ADD_REQUEST,
    ADD_RESPONSE,
    BIND_REQUEST,
    BIND_RESPONSE,
    CONFIDENTIALITY_REQUIRED,
    EXTENDED_REQUEST,
    INVALID_CREDENTIALS,
    NO_SUCH_OBJECT,
    OPERATIONS_ERROR,
    PROTOCOL_ERROR,
    SEARCH_DONE,
    SEARCH_REQUEST,
    STARTTLS_OID,
    SUCCESS,
    UNBIND_REQUEST,
    UNWILLING,
    WHOAMI_OID,
    BerFramer,
    LdapMessage,
    extended_response,
    notice_of_disconnection,
    parse_message,
    response,
    root_dse,
    search_entry,
)
from starttls_harness.servers.base import (
    NO_CLOSE_NOTIFY_REPLY,
    STRICT,
    Behaviour,
    RunningServer,
    ServerConfig,
    relaxing,
)
from starttls_harness.servers.framed import (
    EndSession,
    FramedSession,
    SessionsRunningServer,
    Truncated,
    UnitReader,
    start_session_server,
)
from starttls_harness.tls.aio import SwitchableTransport
from starttls_harness.tls.engine import ClosureComplete, Rule, TransitionError
from starttls_harness.tls.framing import Framer

__all__ = ["BEHAVIOURS", "LdapSession", "start_server"]

#: resultCode insufficientAccessRights (RFC 4511 §4.1.9).
_INSUFFICIENT_ACCESS = 50

BEHAVIOURS: Dict[str, Behaviour] = {
    b.name: b
    for b in (
        STRICT,
        relaxing("keep-buffer", Rule.R1, "executes requests pipelined after StartTLS inside TLS"),
        relaxing("plaintext-in-tls", Rule.R2, "executes plaintext received while TLS is up"),
        relaxing(
            "one-sided-resume",
            Rule.R4,
            "takes plaintext that follows the client's close_notify in the same segment",
        ),
        NO_CLOSE_NOTIFY_REPLY,
        relaxing("ignore-truncation", Rule.R6, "stores an AddRequest cut by EOF under TLS"),
        relaxing(
            "alert-as-close", Rule.R7, "takes a fatal alert for a closure and resumes plaintext"
        ),
        Behaviour("no-state-reset", Rule.R8, "keeps the bound identity across the removal"),
        Behaviour(
            "accept-starttls-in-tls",
            Rule.R8,
            "answers a second StartTLS inside TLS with success (and stays in TLS)",
        ),
    )
}


def _goodbye(why: str) -> bytes:
    """The last words of a session the server ends: a Notice of Disconnection."""
    return notice_of_disconnection(UNWILLING, why.encode())


class LdapSession(FramedSession):
    """One LDAP connection, served by a task of its own."""

    reader: UnitReader

    def __init__(self, running: RunningServer, behaviour: Behaviour, ctx: ssl.SSLContext) -> None:
        framer = BerFramer(max_unit=running.config.limits.max_message)
        super().__init__(running, behaviour, ctx, _goodbye, UnitReader(framer))
        self.bound: bytes = b""

    def _holds(self, unit: bytes) -> bool:
        message = parse_message(unit)
        return (
            message is not None and message.op == EXTENDED_REQUEST and message.name == STARTTLS_OID
        )

    def _gate_framer(self) -> Framer:
        return BerFramer()

    # ------------------------------------------------------------ engine

    def _closure_complete(self, event: ClosureComplete) -> None:
        # The TLS layer is removed: plaintext PDUs from here on (RFC 4511 §4.14.3).
        if event.resumed and self.behaviour.name != "no-state-reset":
            self.bound = b""

    def _alert_received(self) -> None:
        """A fatal alert: the transport ends the connection (or alert-as-close goes on)."""

    def _broken(self) -> None:
        t = self.transport
        if t is not None:
            t.abort()

    # ------------------------------------------------------------ serving

    async def _serve(self) -> None:
        t = self.transport
        assert t is not None
        while True:
            try:
                unit = await self.reader.read_unit(self.config.limits.idle_timeout)
            except Truncated as cut:
                self._at_end(cut.partial)
                return
            except (ConnectionError, asyncio.TimeoutError):
                self._at_end(self.reader.take_pending())
                return
            message = parse_message(unit)
            if message is None:
                raise EndSession(notice_of_disconnection(PROTOCOL_ERROR, b"not an LDAPMessage"))
            if not await self._answer(t, message, unit):
                return

    def _at_end(self, cut: bytes) -> None:
        """The client is gone; ``ignore-truncation`` stores what was cut (R6 broken)."""
        if self.behaviour.name == "ignore-truncation" and cut[:1] == b"\x30":
            if b"\x68" in cut[:12]:  # an AddRequest's tag near the start
                self.running.messages.append(cut)

    async def _answer(self, t: SwitchableTransport, message: LdapMessage, unit: bytes) -> bool:
        """Answer one request; False when the session is over."""
        msgid = message.msgid
        if message.op == UNBIND_REQUEST:
            return False
        if message.op == SEARCH_REQUEST:
            t.write(self._search(message))
        elif message.op == BIND_REQUEST:
            t.write(response(msgid, BIND_RESPONSE, self._bind(message, t.tls_active)))
        elif message.op == ADD_REQUEST:
            if not self.bound:
                code = _INSUFFICIENT_ACCESS
            else:
                self.running.messages.append(unit)
                code = SUCCESS
            t.write(response(msgid, ADD_RESPONSE, code))
        elif message.op == EXTENDED_REQUEST and message.name == STARTTLS_OID:
            await self._starttls(t, message)
        elif message.op == EXTENDED_REQUEST and message.name == WHOAMI_OID:
            identity = b"dn:" + self.bound if self.bound else b""
            t.write(extended_response(msgid, SUCCESS, value=identity))
        elif message.op == EXTENDED_REQUEST:
            t.write(extended_response(msgid, PROTOCOL_ERROR, b"unsupported extended operation"))
        else:
            raise EndSession(notice_of_disconnection(UNWILLING, b"operation not supported here"))
        return True

    def _search(self, message: LdapMessage) -> bytes:
        t = self.transport
        assert t is not None
        msgid = message.msgid
        if message.name == b"":
            attrs = root_dse(tls=t.tls_active, starttls=True, removal=True, bait=False)
            return search_entry(msgid, b"", attrs) + response(msgid, SEARCH_DONE, SUCCESS)
        for unit in reversed(self.running.messages):  # an added entry, as it was added
            added = parse_message(unit)
            if added is not None and added.name == message.name:
                entry = search_entry(msgid, added.name, added.attrs)
                return entry + response(msgid, SEARCH_DONE, SUCCESS)
        return response(msgid, SEARCH_DONE, NO_SUCH_OBJECT, b"no such entry")

    def _bind(self, message: LdapMessage, tls: bool) -> int:
        name, password = message.name, message.value
        if not password:
            self.bound = b""  # anonymous (or unauthenticated) bind
            return SUCCESS
        if not tls:
            return CONFIDENTIALITY_REQUIRED  # no password in plaintext (R9)
        user = self.config.user.encode()
        if name in (user, b"cn=" + user) and password == self.config.password.encode():
            self.bound = b"cn=" + user
            return SUCCESS
        self.bound = b""
        return INVALID_CREDENTIALS

    async def _starttls(self, t: SwitchableTransport, message: LdapMessage) -> None:
        if t.tls_active:
            if self.behaviour.name == "accept-starttls-in-tls":
                t.write(extended_response(message.msgid, SUCCESS, oid=STARTTLS_OID))
            else:
                t.write(extended_response(message.msgid, OPERATIONS_ERROR, b"TLS already up"))
            return
        self.bound = b""
        await t.start_tls(
            self.ctx,
            server_side=True,
            preface=extended_response(message.msgid, SUCCESS, oid=STARTTLS_OID),
        )
        # Either side may now remove the TLS layer: a closure returns to plaintext.
        with contextlib.suppress(TransitionError):
            t.engine.accept_unwrap()


async def start_server(config: ServerConfig) -> RunningServer:
    """Start the reference LDAP server (the interface the run layer loads)."""
    return await start_session_server(config, BEHAVIOURS, LdapSession, SessionsRunningServer)
