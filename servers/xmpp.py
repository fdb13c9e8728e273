"""Reference XMPP server (client-to-server): features, STARTTLS, SASL PLAIN, IQs, misbehaviours.

Just enough of RFC 6120 for the harness (see
:mod:`starttls_harness.dialects.xmpp`): the client's stream header is
answered by a header with a new stream id and the features -- in plaintext
only ``<starttls><required/></starttls>`` (TLS is mandatory here), under TLS
the SASL mechanism ``PLAIN`` and, after a login, resource binding.
``<starttls/>`` is answered ``<proceed/>`` and the handshake follows; the
client must then restart the stream (a new header).  An IQ ping is answered
under TLS, before a login too; other IQs get ``service-unavailable``; a
``<message/>`` under TLS is stored (the storage action, see
:attr:`RunningServer.messages`); ``</stream:stream>`` ends the session.
Anything unreadable (a DOCTYPE, an entity, text at the top, too deep) is a
``not-well-formed`` stream error.

Security decisions: the hold gate is armed for ``<starttls/>``, so bytes
pipelined after it are the R1 leftover the strict engine refuses -- the
connection ends.  A stanza in plaintext is a ``policy-violation`` stream
error (TLS is required before anything else).  There is no return to
plaintext: after a TLS closure the connection is closed.

Behaviours (``BEHAVIOURS``; each breaks exactly one rule): ``keep-buffer``
(R1: a header and an IQ pipelined after ``<starttls/>`` are read as the
restarted stream), ``plaintext-in-tls`` (R2), ``no-close-notify-reply``
(R5), ``ignore-truncation`` (R6: a message cut by EOF is stored),
``alert-as-close`` (R7), and the shared
:data:`~starttls_harness.servers.base.EXTRA_BEHAVIOURS` (R3, R4, R8).
"""

from __future__ import annotations

import ssl
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict

from starttls_harness.dialects.xmpp import (
    BIND_NS,
    DOMAIN,
    ECHO_NS,
    PING_NS,
    RECEIPTS_NS,
    SASL_NS,
    TLS_NS,
    XmppFramer,
    features,
    iq_error,
    iq_result,
    kind_of,
    local,
    parse_unit,
    plain_credentials,
    receipt,
    stream_error,
    stream_header,
)
from starttls_harness.servers.base import Behaviour, RunningServer, ServerConfig
from starttls_harness.servers.framed import (
    EndSession,
    FramedSession,
    SessionsRunningServer,
    Truncated,
    closing_behaviours,
    start_session_server,
)
from starttls_harness.servers.framed import UnitReader as _FramerReader
from starttls_harness.tls.framing import Framer

__all__ = [
    "BEHAVIOURS",
    "Truncated",
    "UnitReader",
    "XmppMessage",
    "XmppServerProtocol",
    "start_server",
]

BEHAVIOURS: Dict[str, Behaviour] = closing_behaviours(
    pipelined="reads a header and an IQ pipelined after <starttls/> as the restarted stream",
    plaintext="answers plaintext received while TLS is up",
    truncated="stores a message cut by EOF under TLS",
)


class UnitReader(_FramerReader):
    """The framer's units, cut again only once a ``>`` arrived: no unit ends without one."""

    def __init__(self, framer: Framer) -> None:
        super().__init__(framer, unit_end=b">")


@dataclass
class XmppMessage:
    """One stored ``<message/>`` (the storage action)."""

    data: bytes
    tls: bool
    complete: bool = True


def _goodbye(why: str) -> bytes:
    """What the plaintext-goodbye mode writes: a stream error, as a server ending."""
    return stream_error("reset", why)


class XmppServerProtocol(FramedSession):
    """One XMPP client connection (see the module docstring)."""

    reader: UnitReader

    def __init__(self, running: RunningServer, behaviour: Behaviour, ctx: ssl.SSLContext) -> None:
        super().__init__(running, behaviour, ctx, _goodbye, UnitReader(XmppFramer()))
        #: A stream header was answered and no restart is due.
        self.stream_open = False
        self.bound = False
        self.streams = 0
        #: TLS was up once: plaintext after it is the resumed connection of a
        #: misbehaving mode (the strict server has closed by then).
        self.ever_tls = False

    def _holds(self, unit: bytes) -> bool:
        return kind_of(parse_unit(unit)) == "starttls"

    def _gate_framer(self) -> Framer:
        return XmppFramer()

    def _unasked_return(self) -> None:
        self.stream_open = False  # resume-without-stoptls: a new stream in plaintext

    async def _serve(self) -> None:
        t = self.transport
        assert t is not None
        while not t.is_closing():
            try:
                unit = await self.reader.read_unit(self.config.limits.idle_timeout)
            except Truncated as cut:
                partial = cut.partial.lstrip()
                if self.behaviour.name == "ignore-truncation" and self.ever_tls:
                    if partial.startswith(b"<message"):
                        self._store(partial, complete=False)
                raise ConnectionResetError("truncated") from None
            self.log.append(unit[:200])
            await self._unit(unit)

    async def _unit(self, unit: bytes) -> None:
        elem = parse_unit(unit)
        kind = kind_of(elem)
        if kind == "unreadable" or elem is None:
            raise EndSession(stream_error("not-well-formed"))
        if kind == "header":
            self._open_stream()
            return
        if not self.stream_open:
            raise EndSession(stream_error("not-well-formed", "the stream was not (re)started"))
        if kind == "close":
            raise EndSession(b"</stream:stream>")
        if kind == "starttls":
            await self._starttls()
        elif kind == "stoptls":
            t = self.transport
            assert t is not None
            if not t.tls_active and self.extra.stoptls_in_plaintext:
                self._write(f"<proceed xmlns='{TLS_NS}'/>".encode())  # R3 broken
                return
            raise EndSession(stream_error("unsupported-stanza-type"))
        elif kind == "sasl-auth":
            self._auth(elem)
        elif kind in ("iq", "message", "presence"):
            self._stanza(elem, unit)
        else:
            raise EndSession(stream_error("unsupported-stanza-type"))

    def _secure(self) -> bool:
        t = self.transport
        return t is not None and (t.tls_active or self.ever_tls)

    def _open_stream(self) -> None:
        t = self.transport
        assert t is not None
        self.streams += 1
        self.stream_open = True
        head = stream_header(sender=DOMAIN, stream_id=f"s{self.streams}-{id(self):x}")
        if not self._secure():
            self._write(head + features(starttls=True, required=True))
        elif self.user is None:
            self._write(head + features(mechanisms=("PLAIN",)))
        else:
            self._write(head + features(bind=True))

    async def _starttls(self) -> None:
        t = self.transport
        assert t is not None
        proceed = f"<proceed xmlns='{TLS_NS}'/>".encode()
        if t.tls_active:
            if self.extra.starttls_in_tls:
                self._write(proceed)  # R8 broken: the session stays in TLS
                return
            raise EndSession(stream_error("policy-violation", "TLS is already up"))
        self.stream_open = False
        self.user = None
        self.bound = False
        leftover = self.reader.take_pending()
        await t.start_tls(self.ctx, server_side=True, preface=proceed, leftover=leftover)
        self.ever_tls = True
        self.extra.handshake_done(t)

    def _auth(self, elem: ET.Element) -> None:
        assert self.transport is not None
        if not self.transport.tls_active:
            failure = f"<failure xmlns='{SASL_NS}'><encryption-required/></failure>"
            raise EndSession(failure.encode() + b"</stream:stream>")
        creds = plain_credentials(elem)
        if creds is None or self.user is not None:
            self._write(f"<failure xmlns='{SASL_NS}'><invalid-mechanism/></failure>".encode())
            return
        user, password = creds
        if (user, password) != (self.config.user, self.config.password):
            self._write(f"<failure xmlns='{SASL_NS}'><not-authorized/></failure>".encode())
            return
        self.user = user
        self.stream_open = False  # the client restarts the stream (RFC 6120 §6.4.6)
        self._write(f"<success xmlns='{SASL_NS}'/>".encode())

    def _stanza(self, elem: ET.Element, unit: bytes) -> None:
        if not self._secure():
            raise EndSession(stream_error("policy-violation", "TLS is required"))
        name = local(elem.tag)
        if name == "message":
            self._store(unit, complete=True)
            if elem.find(f"{{{RECEIPTS_NS}}}request") is not None:
                self._write(receipt(elem.get("id") or ""))
            return
        if name != "iq" or elem.get("type") not in ("get", "set"):
            return
        iq_id = elem.get("id") or ""
        echo = elem.find(f"{{{ECHO_NS}}}echo")
        if elem.find(f"{{{PING_NS}}}ping") is not None:
            self._write(iq_result(iq_id))
        elif echo is not None:
            self._write(iq_result(iq_id, ET.tostring(echo, encoding="unicode")))
        elif elem.find(f"{{{BIND_NS}}}bind") is not None and self.user:
            self.bound = True
            jid = f"<jid>{self.user}@{DOMAIN}/harness</jid>"
            self._write(iq_result(iq_id, f"<bind xmlns='{BIND_NS}'>{jid}</bind>"))
        else:
            self._write(iq_error(iq_id, "service-unavailable"))

    def _store(self, data: bytes, *, complete: bool) -> None:
        assert self.transport is not None
        self.running.messages.append(XmppMessage(data, self.transport.tls_active, complete))


async def start_server(config: ServerConfig) -> RunningServer:
    """Start the reference XMPP server (``config.behaviour`` picks a mode)."""
    return await start_session_server(config, BEHAVIOURS, XmppServerProtocol, SessionsRunningServer)
