"""XMPP client-to-server (RFC 6120) as the harness speaks it, in every role.

XMPP is one XML document per direction: the *stream header*
``<stream:stream ...>`` opens it, top-level elements (stanzas, features,
the TLS and SASL negotiation) follow, ``</stream:stream>`` closes it.
:class:`XmppFramer` cuts such a byte stream into units: the header (with any
XML declaration and whitespace before it), one complete top-level element,
or the stream close.  It is a small tokenizer of its own (no DTD, no
entities, no external anything): element size and depth are bounded and
hostile bytes come out as units of their own that no reader accepts.

How the harness maps XMPP onto its STARTTLS vocabulary:

* the client speaks first (:attr:`Xmpp.server_greets` is False): the *hello*
  is the client's stream header, answered by the server's header and its
  ``<stream:features/>``; ``<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>``
  in them is the capability ``STARTTLS`` (``<required/>`` adds
  ``STARTTLS-REQUIRED``);
* STARTTLS is that element, answered ``<proceed/>`` or ``<failure/>``
  (RFC 6120 §5.4.2);
* the stream restart after TLS is the state reset (RFC 6120 §5.4.3.3): every
  TLS session opens with a new client header (:meth:`Xmpp.after_handshake`),
  answered by a new header (a new stream id) and new features;
* the sentinel is an IQ ping (XEP-0199) with a known id: any ``<iq>`` with
  that id answers it, a result or an error (a server need not serve pings
  before a login; Prosody answers ``service-unavailable``);
* injection (server role): a stream header and an IQ ping with another id
  pipelined after ``<starttls/>``; a server that reads them after the
  handshake answers that id under TLS.  Client role: a forged header and
  empty features after ``<proceed/>`` (a client that takes them has nothing
  to log in with and gives up);
* no return to plaintext (``has_return_to_plaintext`` is False): XMPP has
  no way to end TLS and keep the stream; the closure scenarios check that
  the connection ends.  ``stoptls()`` is an element no server knows, which
  it must refuse.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from typing import FrozenSet, List, Mapping, Optional, Sequence, Tuple

from starttls_harness.dialects.base import Dialect, LinePredicate, Reply, UnitStep
from starttls_harness.dialects.roles import Command, ScriptedServer
from starttls_harness.report.verdicts import Verdict
from starttls_harness.tls.framing import DEFAULT_MAX_UNIT, Framer

__all__ = [
    "BIND_NS",
    "CLIENT_NS",
    "DOMAIN",
    "ECHO_NS",
    "INJECTED_ID",
    "MAX_DEPTH",
    "PING_NS",
    "RECEIPTS_NS",
    "SASL_NS",
    "SENTINEL_ID",
    "STREAMS_NS",
    "STREAM_ERRORS_NS",
    "TLS_NS",
    "XMPP",
    "XmppFramer",
    "chat_message",
    "features",
    "iq_ping",
    "kind_of",
    "local",
    "parse_unit",
    "receipt",
    "receipt_for",
    "stream_error",
    "stream_header",
]

STREAMS_NS = "http://etherx.jabber.org/streams"
CLIENT_NS = "jabber:client"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
STREAM_ERRORS_NS = "urn:ietf:params:xml:ns:xmpp-streams"
STANZA_ERRORS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
PING_NS = "urn:xmpp:ping"
RECEIPTS_NS = "urn:xmpp:receipts"
#: The reference server's echo IQ (not XMPP): its answer carries the payload back.
ECHO_NS = "urn:starttls-harness:echo"

#: The domain the harness's client names in its stream header (the
#: reference server's and the real-software tier's VirtualHost).
DOMAIN = "localhost"
#: Ids of the sentinel and the injected IQ (their answers prove who ran).
SENTINEL_ID = "starttls-harness-sentinel"
INJECTED_ID = "starttls-harness-injected"
#: Deepest element nesting the framer follows (a stanza rarely needs 10).
MAX_DEPTH = 64

#: Not XMPP: the harness's "STOPTLS", an element no server knows.
_STOPTLS = f"<stoptls xmlns='{TLS_NS}'/>".encode()
_CLOSE = b"</stream:stream>"

F, W = Verdict.FAIL, Verdict.WARN


# ------------------------------------------------------------------ framer

_SPACE = b" \t\r\n"


class XmppFramer(Framer):
    """Cuts an XMPP byte stream (either direction) into units.

    A unit is a stream header (an open tag whose local name is ``stream``,
    not waited for to close), the stream close (an end tag at the top), or
    one complete top-level element; whitespace and XML declarations before
    it belong to it.  The framer does not need to have seen the stream
    header: it is cut from wherever a caller starts it (the hold gate is
    armed in the middle of a stream), so it keeps no state between units and
    a unit depends on its bytes alone, never on how they were cut.

    Hostile input: a DOCTYPE, comment or other ``<!`` at the top, text at
    the top, or nesting deeper than :data:`MAX_DEPTH` is cut as a unit of
    its own (up to the next ``>``, ``<`` or the bound) that no reader
    accepts; a unit longer than ``max_unit`` is cut at that size and
    everything after it, up to :meth:`reset`, in ``max_unit`` pieces.
    """

    def __init__(self, max_unit: int = DEFAULT_MAX_UNIT, max_depth: int = MAX_DEPTH) -> None:
        self.max_unit = max(64, max_unit)
        self.max_depth = max_depth
        self._lost = False  # after an over-long unit: the rest is not XML we can follow

    def reset(self) -> None:
        self._lost = False

    def split(self, data: bytes) -> Tuple[List[bytes], int]:
        units: List[bytes] = []
        start = 0
        while start < len(data):
            if self._lost:
                if len(data) - start < self.max_unit:
                    break
                units.append(data[start : start + self.max_unit])
                start += self.max_unit
                continue
            end = self._unit_end(data, start)
            if end is None:
                if len(data) - start >= self.max_unit:
                    units.append(data[start : start + self.max_unit])
                    start += self.max_unit
                    self._lost = True
                    continue
                break
            if end - start > self.max_unit:
                units.append(data[start : start + self.max_unit])
                start += self.max_unit
                self._lost = True
                continue
            units.append(data[start:end])
            start = end
        return units, start

    def _unit_end(self, data: bytes, start: int) -> Optional[int]:
        """Where the unit starting at ``start`` ends (None: not complete yet)."""
        pos = start
        size = len(data)
        limit = min(size, start + self.max_unit + 1)
        # Prefix: whitespace and XML declarations / processing instructions.
        while True:
            while pos < limit and data[pos] in _SPACE:
                pos += 1
            if pos >= limit:
                return None
            if data.startswith(b"<?", pos):
                close = data.find(b"?>", pos + 2, limit)
                if close < 0:
                    return None
                pos = close + 2
                continue
            break
        if data[pos] != 0x3C:  # text at the top: hostile, up to the next '<'
            lt = data.find(b"<", pos, limit)
            return lt if lt >= 0 else (None if limit == size else limit)
        if data.startswith(b"<!", pos):  # DOCTYPE, comment, CDATA at the top: hostile
            gt = data.find(b">", pos, limit)
            return None if gt < 0 else gt + 1
        if data.startswith(b"</", pos):  # the stream close (or a stray end tag)
            gt = data.find(b">", pos, limit)
            return None if gt < 0 else gt + 1
        tag = _tag_end(data, pos, limit)
        if tag is None:
            return None
        end, empty = tag
        if empty:
            return end
        if _local_name(data[pos + 1 : end]) == b"stream":
            return end  # the stream header: its element spans the stream
        return self._element_end(data, end, limit)

    def _element_end(self, data: bytes, pos: int, limit: int) -> Optional[int]:
        """The end of the element whose start tag ended at ``pos``."""
        depth = 1
        while True:
            lt = data.find(b"<", pos, limit)
            if lt < 0:
                return None
            if data.startswith(b"<![CDATA[", lt):
                close = data.find(b"]]>", lt + 9, limit)
                if close < 0:
                    return None
                pos = close + 3
                continue
            if data.startswith(b"<!", lt) or data.startswith(b"<?", lt):
                # Comments, PIs and declarations are not XMPP (RFC 6120 §11.1):
                # the unit ends here, and no reader accepts it.
                gt = data.find(b">", lt, limit)
                return None if gt < 0 else gt + 1
            if data.startswith(b"</", lt):
                gt = data.find(b">", lt, limit)
                if gt < 0:
                    return None
                depth -= 1
                pos = gt + 1
                if depth == 0:
                    return pos
                continue
            tag = _tag_end(data, lt, limit)
            if tag is None:
                return None
            pos, empty = tag
            if not empty:
                depth += 1
                if depth > self.max_depth:
                    return pos  # too deep: cut here; unreadable to everyone


_TAG_STOPS = re.compile(rb"['\"<>]")


def _tag_end(data: bytes, lt: int, limit: int) -> Optional[Tuple[int, bool]]:
    """The end of the start tag at ``lt`` (quotes respected) and whether it is empty."""
    pos = lt + 1
    while True:
        found = _TAG_STOPS.search(data, pos, limit)
        if found is None:
            return None
        ch = data[found.start()]
        if ch in (0x22, 0x27):  # a quoted attribute value: skip to its end
            close = data.find(bytes([ch]), found.start() + 1, limit)
            if close < 0:
                return None
            pos = close + 1
        elif ch == 0x3E:
            end = found.start()
            return end + 1, data[end - 1] == 0x2F
        else:
            return found.start(), False  # a '<' inside a tag: cut; unreadable to everyone


def _local_name(tag: bytes) -> bytes:
    name = tag.split(None, 1)[0] if tag.strip() else b""
    return name.rstrip(b"/>").rsplit(b":", 1)[-1]


def xmpp_framer() -> Framer:
    """The factory of :class:`XmppFramer`."""
    return XmppFramer()


# --------------------------------------------------------- reading units

#: Wraps a unit so that its prefixes resolve as in a client stream.
_WRAP_OPEN = f"<w xmlns='{CLIENT_NS}' xmlns:stream='{STREAMS_NS}'>".encode()
_WRAP_CLOSE = b"</w>"


def _strip_prefix(unit: bytes) -> bytes:
    text = unit.lstrip(_SPACE)
    while text.startswith(b"<?"):
        close = text.find(b"?>")
        if close < 0:
            return b""
        text = text[close + 2 :].lstrip(_SPACE)
    return text


def parse_unit(unit: bytes) -> Optional[ET.Element]:
    """The element a unit is (a header as an empty element), None if unreadable.

    The stream close is an element named ``{streams}close``.  Only the
    standard library's expat reads the bytes, wrapped in an element that
    declares the ``stream`` prefix; a unit with a DTD or an entity it does
    not know is unreadable (expat refuses a DOCTYPE inside an element).
    """
    text = _strip_prefix(unit)
    if not text.startswith(b"<") or b"<!DOCTYPE" in text.upper() or b"<!ENTITY" in text.upper():
        return None
    if text.startswith(b"</"):
        if _local_name(text[2:]) == b"stream":
            return ET.Element(f"{{{STREAMS_NS}}}close")
        return None
    if not text.endswith(b"/>") and _local_name(text[1:].split(b">", 1)[0]) == b"stream":
        text = text[:-1] + b"/>"  # the header: read as an empty element
    try:
        wrapper = ET.fromstring(_WRAP_OPEN + text + _WRAP_CLOSE)
    except ET.ParseError:
        return None
    children = list(wrapper)
    if len(children) != 1 or (wrapper.text or "").strip() or (children[0].tail or "").strip():
        return None
    return children[0]


def local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def namespace(tag: str) -> str:
    return tag[1:].split("}", 1)[0] if tag.startswith("{") else ""


def kind_of(elem: Optional[ET.Element]) -> str:
    """A short name for what a unit is: ``header``, ``close``, ``features``,
    ``proceed``, ``failure`` (TLS), ``sasl-success``/``sasl-failure``,
    ``stream-error``, ``iq``/``message``/``presence``, ``unreadable`` ..."""
    if elem is None:
        return "unreadable"
    ns, name = namespace(elem.tag), local(elem.tag)
    if ns == STREAMS_NS:
        return {"stream": "header", "close": "close", "features": "features"}.get(
            name, "stream-error" if name == "error" else f"stream-{name}"
        )
    if ns == TLS_NS:
        return name  # starttls, proceed, failure (and the harness's stoptls)
    if ns == SASL_NS:
        return f"sasl-{name}"
    if ns == CLIENT_NS and name in ("iq", "message", "presence"):
        return name
    return f"other:{name}"


def _attr_quote(value: str) -> str:
    return value.replace("&", "&amp;").replace("'", "&apos;").replace("<", "&lt;")


def stream_header(
    *, to: str = "", sender: str = "", stream_id: str = "", declaration: bool = True
) -> bytes:
    """A stream header (the client's names ``to``; the server's ``from`` and an id),
    after an XML declaration unless ``declaration`` is False (optional, RFC 6120 §11.5)."""
    attrs = ""
    if to:
        attrs += f" to='{_attr_quote(to)}'"
    if sender:
        attrs += f" from='{_attr_quote(sender)}'"
    if stream_id:
        attrs += f" id='{_attr_quote(stream_id)}'"
    prolog = "<?xml version='1.0'?>" if declaration else ""
    return (
        f"{prolog}<stream:stream{attrs} version='1.0' xml:lang='en'"
        f" xmlns='{CLIENT_NS}' xmlns:stream='{STREAMS_NS}'>"
    ).encode()


def features(
    *, starttls: bool = False, required: bool = False, mechanisms: Sequence[str] = (),
    bind: bool = False,
) -> bytes:  # fmt: skip
    """A ``<stream:features/>`` element."""
    parts = ""
    if starttls:
        inner = "<required/>" if required else ""
        parts += f"<starttls xmlns='{TLS_NS}'>{inner}</starttls>"
    if mechanisms:
        mechs = "".join(f"<mechanism>{m}</mechanism>" for m in mechanisms)
        parts += f"<mechanisms xmlns='{SASL_NS}'>{mechs}</mechanisms>"
    if bind:
        parts += f"<bind xmlns='{BIND_NS}'/>"
    return f"<stream:features>{parts}</stream:features>".encode()


def stream_error(condition: str, text: str = "") -> bytes:
    """A stream error and the stream close (RFC 6120 §4.9)."""
    said = f"<text xmlns='{STREAM_ERRORS_NS}'>{_attr_quote(text)}</text>" if text else ""
    return (
        f"<stream:error><{condition} xmlns='{STREAM_ERRORS_NS}'/>{said}</stream:error>"
    ).encode() + _CLOSE


def iq_ping(iq_id: str) -> bytes:
    return f"<iq type='get' id='{_attr_quote(iq_id)}'><ping xmlns='{PING_NS}'/></iq>".encode()


def iq_error(iq_id: str, condition: str, kind: str = "cancel") -> bytes:
    err = f"<error type='{kind}'><{condition} xmlns='{STANZA_ERRORS_NS}'/></error>"
    return f"<iq type='error' id='{_attr_quote(iq_id)}'>{err}</iq>".encode()


def iq_result(iq_id: str, payload: str = "") -> bytes:
    return f"<iq type='result' id='{_attr_quote(iq_id)}'>{payload}</iq>".encode()


def receipt(message_id: str) -> bytes:
    """A delivery receipt (XEP-0184) for the message ``message_id``: the answer
    the harness's peers wait for after a message (a message has no other)."""
    received = f"<received xmlns='{RECEIPTS_NS}' id='{_attr_quote(message_id)}'/>"
    return (
        f"<message from='{DOMAIN}' id='r-{_attr_quote(message_id)}'>{received}</message>".encode()
    )


def chat_message(message_id: str, to: str, body: str) -> bytes:
    """A chat message asking for a delivery receipt (the storage action)."""
    text = body.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        f"<message type='chat' id='{_attr_quote(message_id)}' to='{_attr_quote(to)}'>"
        f"<body>{text}</body><request xmlns='{RECEIPTS_NS}'/></message>"
    ).encode()


def receipt_for(elem: Optional[ET.Element]) -> Optional[str]:
    """The id a receipt message confirms, None if ``elem`` is not one."""
    if elem is None or kind_of(elem) != "message":
        return None
    got = elem.find(f"{{{RECEIPTS_NS}}}received")
    return None if got is None else got.get("id")


def sasl_plain(user: str, password: str) -> bytes:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{token}</auth>".encode()


def plain_credentials(elem: ET.Element) -> Optional[Tuple[str, str]]:
    """(user, password) of a SASL PLAIN ``<auth/>``, None if it is not one."""
    if elem.get("mechanism") != "PLAIN":
        return None
    try:
        raw = base64.b64decode((elem.text or "").strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    parts = raw.split("\0")
    return (parts[1], parts[2]) if len(parts) == 3 else None


def feature_names(elem: ET.Element) -> FrozenSet[str]:
    """The capabilities a ``<stream:features/>`` element offers, in harness words."""
    caps = set()
    for child in elem:
        ns, name = namespace(child.tag), local(child.tag)
        if ns == TLS_NS and name == "starttls":
            caps.add("STARTTLS")
            if any(local(c.tag) == "required" for c in child):
                caps.add("STARTTLS-REQUIRED")
        elif ns == SASL_NS and name == "mechanisms":
            caps.update(f"AUTH={(m.text or '').strip()}" for m in child)
        elif ns == BIND_NS:
            caps.add("BIND")
    return frozenset(caps)


#: Units that end an answer (the client must speak next, or the stream ended).
_FINAL = frozenset(
    {
        "chat_message",
        "features",
        "proceed",
        "failure",
        "stream-error",
        "close",
        "iq",
        "sasl-failure",
        "sasl-success",
        "sasl-challenge",
        "unreadable",
    }
)
_NOT_OK = frozenset({"failure", "stream-error", "close", "sasl-failure", "unreadable"})


def _units(buf: bytes) -> Tuple[List[bytes], int]:
    return XmppFramer().split(buf)


def _is_final(unit: bytes) -> bool:
    kind = kind_of(parse_unit(unit))
    return kind in _FINAL or kind.startswith("other:")


def _reply(units: Sequence[bytes]) -> Reply:
    kinds = [kind_of(parse_unit(u)) for u in units]
    last = kinds[-1] if kinds else ""
    ok = last not in _NOT_OK and not last.startswith("other:")
    return Reply(tuple(units), ok, last)


def describe(reply: Reply) -> str:
    """A reply in words (element names), for evidence and summaries."""
    return " ".join(kind_of(parse_unit(u)) for u in reply.lines)


class _Final(LinePredicate):
    """The final unit of an answer (features, proceed/failure, an IQ, an error...)."""

    kind = "xmpp-final"

    def __call__(self, unit: bytes) -> bool:
        return _is_final(unit)


# ---------------------------------------------------- the scripted server


class _ScriptedXmpp(ScriptedServer):
    """The scripted server's XMPP: features, STARTTLS, SASL PLAIN, IQs and messages."""

    injection_effect = "answer-taken"

    def parse(self, raw: bytes, tls: bool) -> Command:
        elem = parse_unit(raw)
        kind = kind_of(elem)
        kinds = {
            "header": "hello",
            "starttls": "starttls",
            "stoptls": "stoptls",
            "sasl-auth": "auth",
            "sasl-response": "auth",
            "message": "append",  # answered by stored(): a receipt
            "iq": "access",
            "presence": "other",
            "close": "quit",
        }
        verb = kind if elem is None else local(elem.tag)
        rest = (elem.get("id") or "").encode() if elem is not None else b""
        return Command(raw, tls, kinds.get(kind, "other"), verb, b"", rest)

    def greeting(self) -> bytes:
        return b""  # the client speaks first

    def hello(self, cmd: Command, *, tls: bool, starttls: bool, stoptls: bool) -> bytes:
        stream_id = "tls-stream" if tls else "plain-stream"
        head = stream_header(sender=DOMAIN, stream_id=stream_id)
        if tls:
            return head + features(mechanisms=("PLAIN",), bind=True)
        # The plaintext mechanisms are the bait of R9: a client that requires
        # TLS never authenticates before it.
        return head + features(starttls=starttls, required=starttls, mechanisms=("PLAIN",))

    def unmarked(self, hello: bytes) -> bytes:
        return hello.replace(b"<required/>", b"")

    def starttls_ok(self, cmd: Command) -> bytes:
        return f"<proceed xmlns='{TLS_NS}'/>".encode()

    def starttls_refused(self, cmd: Command) -> bytes:
        return f"<failure xmlns='{TLS_NS}'/>".encode() + _CLOSE

    def not_offered(self, cmd: Command) -> bytes:
        if cmd.kind == "starttls" and not cmd.tls:
            return self.starttls_refused(cmd)
        return stream_error("policy-violation" if cmd.tls else "unsupported-stanza-type")

    def starttls_bad(self, cmd: Command) -> bytes:
        return stream_error("bad-format")

    def stoptls_ok(self, cmd: Command) -> bytes:
        return self.starttls_ok(cmd)

    def goodbye(self, cmd: Command) -> bytes:
        return _CLOSE

    def injection(self, starttls: Command) -> bytes:
        # A restarted stream with nothing to log in with: a client that takes
        # it for the answer to its new header gives up.
        # No XML declaration (one mid-stream is refused by any parser).
        return stream_header(sender=DOMAIN, stream_id=INJECTED_ID, declaration=False) + features()

    def multi_injection(self, starttls: Command) -> bytes:
        """Two forged restarted streams, the first with an XML declaration as a
        server's restart begins: a client whose parser reads them before its
        handshake refuses the declaration mid-stream (slixmpp answers with a
        plaintext stream error)."""
        forged = stream_header(sender=DOMAIN, stream_id=INJECTED_ID) + features()
        return forged + self.injection(starttls)

    def partial_injection(self, starttls: Command) -> bytes:
        """An unfinished stream error: a client that keeps it reads the real
        header under TLS inside it, which no XML reader accepts."""
        return f"<stream:error><not-authorized xmlns='{STREAM_ERRORS_NS}'/>".encode()

    def stored(self, cmd: Command) -> bytes:
        elem = parse_unit(cmd.raw)
        return receipt(elem.get("id") or "" if elem is not None else "")

    def simple(self, cmd: Command) -> bytes:
        elem = parse_unit(cmd.raw)
        if elem is None or cmd.kind == "hello":
            return stream_error("not-well-formed") if elem is None else b""
        name = local(elem.tag)
        iq_id = elem.get("id") or ""
        if name == "iq" and elem.get("type") in ("get", "set"):
            bind = elem.find(f"{{{BIND_NS}}}bind")
            if bind is not None:
                jid = f"<jid>tester@{DOMAIN}/harness</jid>"
                return iq_result(iq_id, f"<bind xmlns='{BIND_NS}'>{jid}</bind>")
            if elem.find(f"{{{PING_NS}}}ping") is not None:
                return iq_result(iq_id)
            return iq_error(iq_id, "service-unavailable")
        if name in ("iq", "presence", "message"):
            return b""
        return stream_error("unsupported-stanza-type")

    def auth_prompts(self, cmd: Command) -> List[bytes]:
        return []

    def auth_done(self, cmd: Command, ok: bool) -> bytes:
        if not ok:
            return f"<failure xmlns='{SASL_NS}'><not-authorized/></failure>".encode()
        return f"<success xmlns='{SASL_NS}'/>".encode()


# ------------------------------------------------------------ the dialect


class Xmpp(Dialect):
    """The XMPP client-to-server dialect (see the module docstring)."""

    awaits_first_tls_reply = True
    name = "xmpp"
    default_port = 5222
    url_scheme = "xmpp"
    server_module = "starttls_harness.servers.xmpp"
    client_module = "starttls_harness.clients.xmpp"
    has_return_to_plaintext = False
    server_greets = False
    storage_needs_login = False
    marks_starttls_required = True
    #: As PostgreSQL: without STOPTLS an unanswered close_notify is only a warn.
    reference_server_expected: Mapping[str, Mapping[str, Verdict]] = {
        "no-close-notify-reply": {"server.close-notify-reply": W},
    }
    #: The reference client's R1 mode reads whatever is glued to ``<proceed/>``
    #: as the restarted stream, wherever it arrives: every injection is taken.
    reference_client_expected: Mapping[str, Mapping[str, Verdict]] = {
        "accept-injected-response": {
            "client.response-injection": F,
            "client.response-injection-split": F,
            "client.response-injection-partial": F,
            "client.response-injection-multi": F,
        },
        # R9: also where STARTTLS is offered but not marked required.
        "downgrade": {
            "client.starttls-stripped": F,
            "client.starttls-refused": F,
            "client.starttls-bad": F,
            "client.starttls-required-stripped": F,
        },
    }

    def framer(self) -> Framer:
        return XmppFramer()

    def scripted_server(self) -> ScriptedServer:
        return _SCRIPTED

    def fake_greeting(self) -> bytes:
        return stream_header(sender=DOMAIN, stream_id="attacker") + features(mechanisms=("PLAIN",))

    def hello(self) -> bytes:
        return stream_header(to=DOMAIN)

    def hello_for(self, tls: bool) -> bytes:
        return b"" if tls else self.hello()  # under TLS the restart opens the session

    def after_handshake(self) -> bytes:
        return self.hello()  # the stream restart (RFC 6120 §5.4.3.3)

    def starttls(self) -> bytes:
        return f"<starttls xmlns='{TLS_NS}'/>".encode()

    def stoptls(self) -> bytes:
        return _STOPTLS

    def sentinel(self) -> bytes:
        return iq_ping(SENTINEL_ID)

    def injected(self) -> bytes:
        # No XML declaration: in the middle of a stream a parser refuses one,
        # which would make any server look as if it refused the injection.
        return stream_header(to=DOMAIN, declaration=False) + iq_ping(INJECTED_ID)

    def quit(self) -> bytes:
        return _CLOSE

    def is_injected_reply(self, reply: Reply) -> bool:
        return any(_iq_id(u) == INJECTED_ID for u in reply.lines)

    def is_sentinel_reply(self, reply: Reply) -> bool:
        return any(_iq_id(u) == SENTINEL_ID for u in reply.lines)

    def split_reply(
        self, buf: bytes, expect_tag: Optional[str] = None
    ) -> Tuple[Optional[Reply], bytes]:
        units, _used = _units(buf)
        pos = 0
        for i, unit in enumerate(units):
            pos += len(unit)
            if _is_final(unit):
                return _reply(units[: i + 1]), buf[pos:]
        return None, buf

    def capabilities(self, reply: Reply) -> FrozenSet[str]:
        for unit in reply.lines:
            elem = parse_unit(unit)
            if kind_of(elem) == "features" and elem is not None:
                return feature_names(elem)
        return frozenset()

    def greeting_ok(self, reply: Reply) -> bool:
        return reply.ok

    def final_line_of(self, command: bytes) -> LinePredicate:
        return _Final()

    def is_goodbye(self, reply: Reply) -> bool:
        return reply.key in ("stream-error", "close")

    def answers(self, command: bytes, reply: Reply) -> bool:
        return not self.is_goodbye(reply)

    def login(self, user: str, password: str) -> bytes:
        return sasl_plain(user, password)

    def login_exchanges(self, user: str, password: str) -> Sequence[bytes]:
        # The stream restart the success calls for leaves once the success has
        # arrived (RFC 6120 §6.4.6): Prosody does not read a restart pipelined
        # behind <auth/> (it answers the next stanza <unsupported-stanza-type/>).
        return (self.login(user, password), stream_header(to=DOMAIN))

    def state_probe(self, after: str) -> bytes:
        return b""  # the stream restart discards everything: nothing to ask

    def state_kept(self, after: str, reply: Reply) -> Optional[str]:
        return None

    def truncated_unit(self, recipient: str) -> Sequence[UnitStep]:
        data = chat_message("truncated", recipient, "cut by a truncation " * 40)
        return (UnitStep(data[: len(data) // 2], "none"),)

    # -- as followed by the on-path proxy

    def proxy_command(self, line: bytes, verb: bytes) -> Optional[str]:
        if verb == b"STARTTLS":
            return "" if kind_of(parse_unit(line)) == "starttls" else None
        return None

    def proxy_answer(self, line: bytes, tag: str) -> Optional[bool]:
        kind = kind_of(parse_unit(line))
        if kind == "proceed":
            return True
        if kind in ("failure", "stream-error", "close"):
            return False
        return None


def _iq_id(unit: bytes) -> Optional[str]:
    elem = parse_unit(unit)
    if kind_of(elem) != "iq" or elem is None:
        return None
    return elem.get("id")


_SCRIPTED = _ScriptedXmpp()
XMPP = Xmpp()
