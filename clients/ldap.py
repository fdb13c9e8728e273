"""Reference LDAP client: StartTLS, removal of the TLS layer (RFC 4511 §4.14), misbehaviours.

Why not ``ldap3`` or ``python-ldap``: neither can remove the TLS layer and
go on in plaintext, and neither lets the harness see what its reader had
buffered at the upgrade (R1).  This client is small and written for the
harness: an ``asyncio.Protocol`` on
:class:`starttls_harness.tls.aio.SwitchableTransport`, BER by the dialect's
codec; the real-software tier uses ``ldap3`` and ``ldapsearch`` instead.

Rules it keeps: R1 (the hold gate is armed for the StartTLS response, so
bytes after it are refused by the engine), R3-R5 (:meth:`LdapClient.remove_tls`
sends close_notify and waits for the server's before any plaintext PDU; a
removal the *server* starts is answered at once, the engine armed for it
after every handshake, and the client goes on in plaintext), R8 (the root
DSE and the bind are forgotten at every transition and the root DSE is
read again), R9 (with ``require_tls`` it never binds with a password in
plaintext).

Behaviours (``BEHAVIOURS``; each breaks one rule): ``accept-injected-response``
(R1), ``plaintext-in-tls`` (R2), ``one-sided-close`` (R4: close_notify and the
next request in one segment), ``no-close-notify-reply`` (R5), ``no-state-reset``
(R8: the plaintext root DSE is trusted after StartTLS, the bind follows the
handshake at once) and ``downgrade`` (R9).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from typing import Any, Dict, FrozenSet, Optional, Tuple

from starttls_harness.clients.peer import (
    PeerClient,
    PeerPathDriver,
    PeerProtocol,
    client_modes,
    run_reference_session,
)
from starttls_harness.dialects.ldap import (
    ADD_ID,
    BIND_RESPONSE,
    EXTENDED_RESPONSE,
    HELLO_ID,
    LDAP,
    LOGIN_ID,
    PROBE_ID,
    SENTINEL_ID,
    STARTTLS_ID,
    SUCCESS,
    WHOAMI_OID,
    BerFramer,
    LdapMessage,
    LdapReply,
    add_request,
    extended_request,
    search_request,
    split_ldap_reply,
)
from starttls_harness.dialects.roles import PATH_MESSAGE, ClientOutcome, Hooks, SessionPlan
from starttls_harness.servers.base import Behaviour
from starttls_harness.tls.engine import (
    ClosureComplete,
    Event,
    HandshakeComplete,
    Rule,
    TransitionError,
)

__all__ = [
    "BEHAVIOURS",
    "LdapClient",
    "LdapError",
    "RemovalNotSupported",
    "ResultError",
    "TLSRequired",
    "path_driver",
    "reference_session",
]

BEHAVIOURS: Dict[str, Behaviour] = client_modes(
    {
        Rule.R1: "takes plaintext sent after the StartTLS response as a TLS response",
        Rule.R2: "takes plaintext received while TLS is up as a response",
        Rule.R4: "sends the next request right after its close_notify without waiting",
        Rule.R8: "trusts the plaintext root DSE after StartTLS",
        Rule.R9: "binds in plaintext when StartTLS is not offered or refused despite require_tls",
    }
)


class LdapError(Exception):
    """Base class of the client's errors."""


class ResultError(LdapError):
    """The server answered with a resultCode other than success."""


class TLSRequired(LdapError):
    """TLS is required and could not be had (not offered, refused, failed)."""


class RemovalNotSupported(LdapError):
    """The server does not say that it removes the TLS layer."""


class _ReplyReader:
    """The server's bytes, read as whole answers (BER LDAP messages, cut by the codec)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        #: Set at every arrival, end and engine event (the client waits on it).
        self.changed = asyncio.Event()
        self.ended: Optional[BaseException] = None

    def feed(self, data: bytes) -> None:
        self.buf += data
        self.changed.set()

    def feed_eof(self) -> None:
        self.set_exception(ConnectionResetError("the server closed the connection"))

    def set_exception(self, exc: BaseException) -> None:
        if self.ended is None:
            self.ended = exc
        self.changed.set()

    def take_pending(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        return data

    async def reply(self, timeout: float) -> LdapReply:
        """The next complete answer (a search's entries and its done, or one response)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            reply, rest = split_ldap_reply(bytes(self.buf))
            if reply is not None:
                self.buf[:] = rest
                if any(m is None for m in reply.messages):
                    raise LdapError(f"not an LDAPMessage: {reply.lines[-1][:40]!r}")
                return reply
            if self.ended is not None:
                raise self.ended
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError(f"no complete answer within {timeout:g} s")
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)


class _ClientProtocol(PeerProtocol[_ReplyReader]):
    """The peer protocol on the reply reader; accepts the server's removal of TLS."""

    def __init__(self, behaviour: Behaviour) -> None:
        super().__init__(behaviour, _ReplyReader())
        #: Removals of the TLS layer completed (either side started them).
        self.removals = 0

    def engine_event(self, event: Event) -> None:
        t = self.transport
        if isinstance(event, HandshakeComplete) and t is not None:
            # RFC 4511 §4.14.3: the server may remove the TLS layer at any time.
            with contextlib.suppress(TransitionError):
                t.engine.accept_unwrap()
        elif isinstance(event, ClosureComplete) and event.resumed:
            self.removals += 1
        super().engine_event(event)
        self.reader.changed.set()


class LdapClient(PeerClient):
    """An LDAP client on the switchable transport; create it with :meth:`connect`."""

    protocol: _ClientProtocol
    behaviours = BEHAVIOURS
    error = LdapError
    tls_required = TLSRequired
    stoptls_unsupported = RemovalNotSupported
    stoptls_missing = "the server does not say that it removes the TLS layer"

    def _setup(self) -> None:
        #: What the root DSE said in the current phase (None: not read).
        self.capabilities: Optional[FrozenSet[str]] = None
        self.bound = False
        self._seen_removals = 0
        self._credentials: Optional[Tuple[str, str]] = None

    @classmethod
    def _new_protocol(cls, behaviour: Behaviour, options: Dict[str, Any]) -> _ClientProtocol:
        return _ClientProtocol(behaviour)  # an LDAP server says nothing until asked

    # ----------------------------------------------------------- requests

    async def root_dse(self) -> FrozenSet[str]:
        """Read the root DSE; its capabilities replace what was known."""
        self.capabilities = None
        self.capabilities = LDAP.capabilities(await self._request(LDAP.hello(), HELLO_ID))
        return self.capabilities

    async def search_root(self) -> LdapReply:
        """A harmless request whose answer proves the pair in step (the sentinel)."""
        return await self._request(LDAP.sentinel(), SENTINEL_ID)

    async def starttls(self, ssl_context: Optional[ssl.SSLContext] = None) -> bool:
        """The StartTLS extended operation; True once TLS is up (False only for ``downgrade``)."""
        context = self._upgrade_context(ssl_context)
        self._note_removal()
        caps = await self._known_capabilities()
        if "STARTTLS" not in caps:
            return self._without_tls("the server does not offer StartTLS")
        request = LDAP.starttls()
        # R1: whatever follows the StartTLS response is held, not read.
        self.transport.hold_after(LDAP.final_line_of(request), once=True, framer=BerFramer())
        self._write(request)
        final = _final(await self.protocol.reader.reply(self.timeout))
        if final.op != EXTENDED_RESPONSE or final.msgid != STARTTLS_ID:
            self.transport.abort()
            raise LdapError(f"unexpected answer to StartTLS: {final.describe()}")
        if final.result != SUCCESS:
            self.transport.release_held()
            return self._without_tls(f"StartTLS refused: {final.describe()}")
        await self._handshake(context)
        if self._transition():
            await self.root_dse()
        return True

    async def remove_tls(self) -> None:
        """Remove the TLS layer (RFC 4511 §4.14.3): close_notify, wait for the server's."""
        if not self.transport.tls_active:
            raise LdapError("there is no TLS layer to remove")
        caps = await self._known_capabilities()
        if "STOPTLS" not in caps:
            raise RemovalNotSupported(self.stoptls_missing)
        if self.protocol.reader.buf:
            self.transport.abort()
            raise LdapError("unanswered data pending before the removal")
        if self.behaviour.name == "one-sided-close":
            # R4 broken: close_notify and the next request in one segment.
            with self.transport.corked():
                self.transport.events.extend(self.transport.engine.unwrap())
                self.transport.write(LDAP.hello())
            await self._until_removed()
            self._transition()
            self.capabilities = LDAP.capabilities(await self.protocol.reader.reply(self.timeout))
            return
        await self.transport.unwrap(timeout=self.timeout)
        self._seen_removals = self.protocol.removals
        if self._transition():
            await self.root_dse()

    async def stoptls(self) -> None:
        """The harness's return to plaintext: :meth:`remove_tls`."""
        await self.remove_tls()

    async def bind(self, user: str, password: str) -> None:
        """Simple bind; refused locally in plaintext (R9)."""
        await self._ensure_tls()
        if (
            not self.transport.tls_active
            and self.require_tls
            and self.behaviour.name != "downgrade"
        ):
            raise TLSRequired("refusing to send a password in plaintext (require_tls)")
        await self._request(LDAP.login(user, password), LOGIN_ID, BIND_RESPONSE)
        self.bound = True
        self._credentials = (user, password)

    async def add(self, dn: bytes, body: bytes) -> None:
        """Add an entry carrying ``body`` (the storage action)."""
        if await self._ensure_tls() and self._credentials is not None:
            await self.bind(*self._credentials)
        request = add_request(ADD_ID, dn, {"objectClass": [b"document"], "description": [body]})
        await self._request(request, ADD_ID)

    async def read(self, dn: bytes) -> LdapReply:
        """A base-object search of ``dn`` (the entry must exist)."""
        return await self._request(search_request(SENTINEL_ID, dn, ("*",)), SENTINEL_ID)

    async def whoami(self) -> bytes:
        answer = await self._request(extended_request(PROBE_ID, WHOAMI_OID), PROBE_ID)
        return _final(answer).value

    async def unbind(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            self._write(LDAP.quit())
        await self.aclose()

    goodbye = unbind

    # ------------------------------------------------------- internals

    async def _until_removed(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while self.transport.tls_active:
            reader = self.protocol.reader
            if reader.ended is not None:
                raise reader.ended
            if loop.time() >= deadline:
                raise asyncio.TimeoutError("the server did not answer close_notify")
            reader.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader.changed.wait(), deadline - loop.time())
        self._seen_removals = self.protocol.removals

    async def _ensure_tls(self) -> bool:
        """After a removal the server started, a client that requires TLS starts it
        again before anything else (R9); True when it did."""
        self._note_removal()
        if self.transport.tls_active or not self.require_tls or self.upgrades == 0:
            return False
        if self.behaviour.name == "downgrade":
            return False
        return await self.starttls()

    def _note_removal(self) -> None:
        """A removal the server started since we last looked resets the state (R8)."""
        if self.protocol.removals != self._seen_removals:
            self._seen_removals = self.protocol.removals
            self._transition()

    def _forget(self) -> None:
        """R8 after StartTLS and the removal: the root DSE and the bind."""
        self.capabilities = None
        self.bound = False

    def _return_offered(self) -> bool:
        # A layer the server removed itself is not removed again: add() starts TLS.
        return "STOPTLS" in (self.capabilities or frozenset()) and self.transport.tls_active

    async def _known_capabilities(self) -> FrozenSet[str]:
        if self.capabilities is None:
            return await self.root_dse()
        return self.capabilities

    async def _request(self, request: bytes, msgid: int, op: Optional[int] = None) -> LdapReply:
        self._write(request)
        answer = await self.protocol.reader.reply(self.timeout)
        final = _final(answer)
        if final.msgid != msgid:
            raise LdapError(f"answer to another request: {final.describe()}")
        if op is not None and final.op != op:
            raise LdapError(f"unexpected answer {final.describe()}")
        if final.result != SUCCESS:
            raise ResultError(final.describe())
        return answer


def _final(reply: LdapReply) -> LdapMessage:
    final = reply.final
    if final is None:
        raise LdapError("not an LDAPMessage")
    return final


# ------------------------------------------------------ the harness's roles


class _PathDriver(PeerPathDriver[LdapClient]):
    """:class:`LdapClient` through the path proxy, one verb at a time."""

    async def command(self, hooks: Hooks) -> None:
        await self._client().search_root()

    async def send_unit(self, hooks: Hooks) -> None:
        """An AddRequest over two TLS records: FIN replaces the second."""
        client = self._client()
        await client.bind(self.user, self.password)
        hooks.arm(nth=2)
        await client.add(b"cn=path-unit,dc=example,dc=invalid", PATH_MESSAGE)

    async def fetch_unit(self, hooks: Hooks) -> None:
        """A search whose answer takes two records: FIN cuts it."""
        client = self._client()
        await client.bind(self.user, self.password)
        await client.add(b"cn=path-unit,dc=example,dc=invalid", PATH_MESSAGE)
        hooks.arm(nth=2)
        await client.read(b"cn=path-unit,dc=example,dc=invalid")


#: The reference client as the path role's client under test (it binds):
#: ``path_driver(spec, behaviour, user, password)``.
path_driver = functools.partial(_PathDriver, LdapClient)


async def reference_session(plan: SessionPlan) -> ClientOutcome:
    """The reference client's normal session against the scripted server.

    Root DSE, StartTLS, root DSE, bind; while the server offers it, ``cycles``
    times: remove the TLS layer, StartTLS again, bind; add the entry; unbind.
    """

    async def login(client: LdapClient) -> None:
        await client.bind(plan.user, plan.password)

    async def store(client: LdapClient) -> None:
        await client.add(b"cn=" + plan.recipient.encode() + b",dc=example,dc=invalid", plan.message)

    return await run_reference_session(
        LdapClient,
        plan,
        login=login,
        store=store,
        done="entry added after {n} removal(s) of the TLS layer",
    )
