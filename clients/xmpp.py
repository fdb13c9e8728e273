"""Reference XMPP client (client-to-server): STARTTLS, stream restarts, SASL PLAIN, misbehaviours.

Why not slixmpp in process: the harness must see what happens to bytes that
arrive after ``<proceed/>`` and to the stream restart, byte exact; a client
on the harness's engine reports that.  slixmpp is exercised as an external
client by ``check-client`` and the real-software tier instead.

Rules it keeps: R1 (the hold gate is armed for the answer to
``<starttls/>``; bytes after it are refused by the engine), R2/R6 through
the strict engine, R5 (a close_notify is answered), R8 (every TLS session
and every login restart the stream: features are read afresh, nothing from
before is kept), R9 (with ``require_tls`` it never authenticates, nor sends
a stanza, without TLS).  XMPP has no return to plaintext:
:meth:`XmppClient.stoptls` always raises :class:`StopTLSNotSupported`.

Behaviours (``BEHAVIOURS``; each breaks exactly one rule):
``accept-injected-response`` (R1: bytes glued to ``<proceed/>`` are read as
the restarted stream's answer), ``plaintext-in-tls`` (R2),
``no-close-notify-reply`` (R5), ``ignore-truncation`` (R6: a receipt cut by
EOF counts as complete) and ``downgrade`` (R9: without STARTTLS it authenticates in plaintext).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import ssl
import xml.etree.ElementTree as ET
from typing import Any, Dict, FrozenSet, List, Optional

from starttls_harness.clients.peer import (
    PeerClient,
    PeerPathDriver,
    PeerProtocol,
    client_modes,
    run_reference_session,
)
from starttls_harness.dialects.roles import PATH_MESSAGE, ClientOutcome, Hooks, SessionPlan
from starttls_harness.dialects.xmpp import (
    BIND_NS,
    DOMAIN,
    ECHO_NS,
    PING_NS,
    TLS_NS,
    XmppFramer,
    chat_message,
    feature_names,
    kind_of,
    parse_unit,
    receipt_for,
    sasl_plain,
    stream_header,
)
from starttls_harness.servers.base import Behaviour
from starttls_harness.servers.xmpp import Truncated, UnitReader
from starttls_harness.tls.aio import ConnectionEnded
from starttls_harness.tls.engine import Rule

__all__ = [
    "BEHAVIOURS",
    "ServerError",
    "StopTLSNotSupported",
    "TLSRequired",
    "XmppClient",
    "XmppError",
    "path_driver",
    "reference_session",
]

BEHAVIOURS: Dict[str, Behaviour] = client_modes(
    {
        Rule.R1: "reads bytes glued to <proceed/> as the answer to its restarted stream",
        Rule.R2: "takes plaintext received while TLS is up as the server's",
        Rule.R6: "takes a receipt cut by EOF under TLS as complete",
        Rule.R9: (
            "authenticates in plaintext when STARTTLS is missing, refused or not marked required"
        ),
    }
)

#: Largest unit the client reads (bytes).
_MAX_UNIT = 1 << 20


class XmppError(Exception):
    """Base class of the client's errors."""


class ServerError(XmppError):
    """The server sent a stream error, a failure, or closed the stream."""


class TLSRequired(XmppError):
    """TLS is required and could not be had (not offered, refused, failed)."""


class StopTLSNotSupported(XmppError):
    """XMPP has no return to plaintext."""


class _Cut(XmppError):
    """The connection ended in the middle of a unit (ignore-truncation takes it)."""

    def __init__(self, detail: str, partial: bytes = b"") -> None:
        super().__init__(detail)
        self.partial = partial


def _is_tls_answer(unit: bytes) -> bool:
    return kind_of(parse_unit(unit)) in ("proceed", "failure", "stream-error", "close")


class XmppClient(PeerClient):
    """An XMPP client on the switchable transport; create it with :meth:`connect`."""

    protocol: PeerProtocol[UnitReader]
    behaviours = BEHAVIOURS
    error = XmppError
    tls_required = TLSRequired
    stoptls_unsupported = StopTLSNotSupported
    stoptls_missing = "XMPP has no return to plaintext"
    already_tls = "TLS is up already"

    def _setup(self, domain: str = DOMAIN) -> None:
        self.domain = domain
        #: The features of the current stream (read afresh at every restart).
        self.features: FrozenSet[str] = frozenset()
        self.stream_ids: List[str] = []
        self.user: Optional[str] = None
        self.jid: Optional[str] = None
        self._ids = itertools.count(1)

    @classmethod
    def _new_protocol(
        cls, behaviour: Behaviour, options: Dict[str, Any]
    ) -> PeerProtocol[UnitReader]:
        return PeerProtocol(behaviour, UnitReader(XmppFramer(max_unit=_MAX_UNIT)))

    async def _greet(self) -> None:
        await self.open_stream()

    # ----------------------------------------------------------- requests

    async def open_stream(self) -> None:
        """A new stream header; the server's header and features are read afresh (R8)."""
        self.features = frozenset()
        self._write(stream_header(to=self.domain))
        while True:
            elem = await self._element()
            kind = kind_of(elem)
            if kind == "header":
                self.stream_ids.append(elem.get("id") or "")
            elif kind == "features":
                self.features = feature_names(elem)
                return
            else:
                raise XmppError(f"expected the stream features, got {kind}")

    async def starttls(self, ssl_context: Optional[ssl.SSLContext] = None) -> bool:
        """``<starttls/>``, the handshake and the stream restart; False only for ``downgrade``."""
        context = self._upgrade_context(ssl_context)
        if "STARTTLS" not in self.features:
            return self._without_tls("the server offers no STARTTLS")
        if "STARTTLS-REQUIRED" not in self.features and self.behaviour.name == "downgrade":
            return self._without_tls("STARTTLS is offered, not required")  # R9 broken
        # R1: whatever follows the answer is held, not read.
        self.transport.hold_after(_is_tls_answer, once=True, framer=XmppFramer())
        self._write(f"<starttls xmlns='{TLS_NS}'/>".encode())
        try:
            answer = await self._element()
        except ServerError as exc:
            self.transport.release_held()
            return self._without_tls(f"STARTTLS refused: {exc}")
        if kind_of(answer) != "proceed":
            self.transport.release_held()
            return self._without_tls(f"STARTTLS answered {kind_of(answer)}")
        await self._handshake(context)
        await self.open_stream()  # RFC 6120 §5.4.3.3: the stream restarts
        return True

    async def login(self, user: str, password: str) -> None:
        """SASL PLAIN, the stream restart, resource binding."""
        if not self.transport.tls_active and self.require_tls and not self.downgraded:
            raise TLSRequired("refusing to authenticate in plaintext (require_tls)")
        if "AUTH=PLAIN" not in self.features:
            raise XmppError("the server offers no SASL PLAIN on this stream")
        self._write(sasl_plain(user, password))
        answer = await self._element()
        if kind_of(answer) != "sasl-success":
            raise ServerError(f"authentication failed: {kind_of(answer)}")
        self.user = user
        await self.open_stream()
        if "BIND" in self.features:
            result = await self.iq(f"<bind xmlns='{BIND_NS}'><resource>harness</resource></bind>")
            jid = result.find(f"{{{BIND_NS}}}bind/{{{BIND_NS}}}jid")
            self.jid = (jid.text or "") if jid is not None else None

    async def iq(self, payload: str, kind: str = "set") -> ET.Element:
        """An IQ with ``payload``; its result (an error raises)."""
        iq_id = f"c{next(self._ids)}"
        self._write(f"<iq type='{kind}' id='{iq_id}'>{payload}</iq>".encode())
        while True:
            elem = await self._element()
            if kind_of(elem) == "iq" and elem.get("id") == iq_id:
                if elem.get("type") != "result":
                    raise ServerError(f"IQ {iq_id} answered with an error")
                return elem

    async def ping(self) -> None:
        await self.iq(f"<ping xmlns='{PING_NS}'/>", "get")

    async def echo(self, text: str) -> None:
        """The reference server's echo IQ (its answer carries ``text`` back)."""
        escaped = text.replace("&", "&amp;").replace("<", "&lt;")
        await self.iq(f"<echo xmlns='{ECHO_NS}'>{escaped}</echo>", "get")

    async def send_message(self, body: str, to: Optional[str] = None) -> None:
        """A chat message asking for a receipt (XEP-0184); returns with the receipt."""
        if not self.transport.tls_active and self.require_tls and not self.downgraded:
            raise TLSRequired("refusing to send a message in plaintext (require_tls)")
        message_id = f"m{next(self._ids)}"
        self._write(chat_message(message_id, to or f"{self.user or 'tester'}@{self.domain}", body))
        while True:
            try:
                elem = await self._element()
            except _Cut as cut:
                if self.behaviour.name == "ignore-truncation" and cut.partial.lstrip().startswith(
                    b"<message"
                ):
                    return  # R6 broken: the cut receipt counts as complete
                raise
            if receipt_for(elem) == message_id:
                return

    async def quit(self) -> None:
        """Close the stream and wait (bounded) for the server's close."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._write(b"</stream:stream>")
            with contextlib.suppress(XmppError, asyncio.TimeoutError):
                while True:
                    await self._element()
        await self.aclose()

    goodbye = quit

    # ------------------------------------------------------- internals

    def _without_tls(self, reason: str) -> bool:
        if self.behaviour.name != "downgrade":
            self.transport.close()  # refused or not, the stream is over
        return super()._without_tls(reason)

    async def _element(self) -> ET.Element:
        """The next unit as an element; a stream error or close raises."""
        reader = self.protocol.reader
        try:
            unit = await reader.read_unit(self.timeout)
        except Truncated as cut:
            raise _Cut(f"connection ended in the middle of a unit: {cut}", cut.partial) from cut
        except ConnectionEnded as ended:
            if ended.event is not None and getattr(ended.event, "rule", None) is Rule.R6:
                raise _Cut(f"truncated: {ended}") from ended
            raise
        elem = parse_unit(unit)
        kind = kind_of(elem)
        if elem is None:
            self.transport.abort()
            raise XmppError(f"not XML the client reads: {unit[:80]!r}")
        if kind == "stream-error":
            conditions = [c.tag.rsplit("}", 1)[-1] for c in elem if "text" not in c.tag]
            raise ServerError(f"stream error {' '.join(conditions) or '?'}")
        if kind == "close":
            raise ServerError("the server closed the stream")
        if kind == "failure":
            raise ServerError("STARTTLS failure")
        return elem


# ------------------------------------------------------ the harness's roles


class _PathDriver(PeerPathDriver[XmppClient]):
    """:class:`XmppClient` through the path proxy, one verb at a time."""

    async def after_upgrade(self, client: XmppClient) -> None:
        await client.login(self.user, self.password)

    async def command(self, hooks: Hooks) -> None:
        await self._client().ping()

    async def send_unit(self, hooks: Hooks) -> None:
        """A message over two records: FIN replaces the second."""
        hooks.arm(nth=2)
        await self._client().send_message(PATH_MESSAGE.decode("latin-1"))

    async def fetch_unit(self, hooks: Hooks) -> None:
        """An echo IQ whose answer takes two records: FIN cuts it."""
        client = self._client()
        hooks.arm(nth=2)
        await client.echo(PATH_MESSAGE.decode("latin-1"))


#: The reference client as the path role's client under test:
#: ``path_driver(spec, behaviour, user, password)``.
path_driver = functools.partial(_PathDriver, XmppClient)


async def reference_session(plan: SessionPlan) -> ClientOutcome:
    """The reference client's normal session against the scripted server.

    STARTTLS, SASL PLAIN and binding, a message and its receipt, the stream's
    close (no return to plaintext in XMPP); after a failure the stream is
    ended all the same.
    """

    async def login(client: XmppClient) -> None:
        await client.login(plan.user, plan.password)

    async def store(client: XmppClient) -> None:
        await client.send_message(plan.message.decode("latin-1"))

    def end_stream(client: XmppClient) -> None:
        if not client.transport.is_closing():
            client._write(b"</stream:stream>")  # the stream ends, as XMPP says goodbye

    return await run_reference_session(
        XmppClient,
        plan,
        login=login,
        store=store,
        done="message sent and receipted (XMPP: no STOPTLS cycle)",
        on_error=end_stream,
    )
