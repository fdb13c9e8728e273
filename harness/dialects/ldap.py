"""LDAPv3 (RFC 4511) with StartTLS and the removal of the TLS layer, in every role.

LDAP is binary: every PDU is one BER ``LDAPMessage`` (a SEQUENCE of a
messageID and a protocolOp, definite lengths only, RFC 4511 §5.1).
:class:`BerFramer` cuts a byte stream into such messages; the minimal BER
encoder and decoder below know only what the harness sends and reads
(integers, octet strings, enumerations, sequences and the few operations
listed in :data:`OP_NAMES`) and never raise on hostile input.

The run layer's generic names map onto LDAP like this:

* there is no greeting: the client speaks first (:attr:`server_greets`);
* *hello* is a base-object search of the root DSE; its
  ``supportedExtension`` values give the capability ``STARTTLS``
  (OID 1.3.6.1.4.1.1466.20037);
* *STARTTLS* is the ExtendedRequest of that OID, answered by an
  ExtendedResponse (``success``; ``operationsError``, ``protocolError``,
  ``unavailable`` refuse it);
* the *sentinel* is another root DSE search, the *injected* command a
  search of an entry that does not exist (its ``noSuchObject`` answer
  carries the injected request's messageID, which is how it is recognised);
* *STOPTLS* is the **removal of the TLS layer** (RFC 4511 §4.14.3): no
  command at all.  Either peer sends a closure alert and MUST wait for the
  other's; the receiver MUST answer at once; only then LDAP PDUs flow in
  plaintext.  :meth:`Ldap.stoptls` is therefore empty and
  :attr:`return_by_closure` is set: every bidirectional closure is a return
  to plaintext, so the scenarios that call one a violation do not apply.
  No standard attribute says that a server supports the removal; the
  reference server lists :data:`REMOVAL_ATTRIBUTE` in its root DSE under
  TLS, and a server without it (OpenLDAP) gets the removal scenarios
  skipped, saying so;
* the login is a simple bind, the state probe the "Who am I?" extended
  operation (RFC 4532): after the removal the bound identity must be gone
  (R8; RFC 2830 §5.2 required the anonymous state, RFC 4513 leaves it to
  the server, the harness asks for the reset);
* the storage action (R6) is an AddRequest cut in the middle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple

from starttls_harness.dialects.base import Dialect, LinePredicate, Reply, UnitStep
from starttls_harness.dialects.roles import Command, ScriptedServer
from starttls_harness.report.verdicts import Verdict
from starttls_harness.tls.framing import DEFAULT_MAX_UNIT, Framer
from starttls_harness.tls.records import HEADER_LEN, check_header

__all__ = [
    "CLIENT_EXPECTED",
    "LDAP",
    "NOTICE_OF_DISCONNECTION",
    "REMOVAL_ATTRIBUTE",
    "SERVER_EXPECTED",
    "STARTTLS_OID",
    "WHOAMI_OID",
    "BerFramer",
    "LdapMessage",
    "LdapReply",
    "encode_message",
    "extended_request",
    "extended_response",
    "ldap_result",
    "parse_message",
    "search_entry",
    "search_request",
]

F, W, K = Verdict.FAIL, Verdict.WARN, Verdict.SKIP

STARTTLS_OID = b"1.3.6.1.4.1.1466.20037"
WHOAMI_OID = b"1.3.6.1.4.1.4203.1.11.3"
NOTICE_OF_DISCONNECTION = b"1.3.6.1.4.1.1466.20036"
#: Root DSE attribute by which the reference server says it removes the TLS
#: layer (no standard one exists); its presence under TLS is ``STOPTLS``.
REMOVAL_ATTRIBUTE = "x-starttls-harness-tls-removal"

# protocolOp numbers ([APPLICATION n], RFC 4511 §4.2-4.12)
BIND_REQUEST, BIND_RESPONSE, UNBIND_REQUEST = 0, 1, 2
SEARCH_REQUEST, SEARCH_ENTRY, SEARCH_DONE = 3, 4, 5
ADD_REQUEST, ADD_RESPONSE = 8, 9
SEARCH_REFERENCE = 19
EXTENDED_REQUEST, EXTENDED_RESPONSE = 23, 24

OP_NAMES: Mapping[int, str] = {
    BIND_REQUEST: "BindRequest",
    BIND_RESPONSE: "BindResponse",
    UNBIND_REQUEST: "UnbindRequest",
    SEARCH_REQUEST: "SearchRequest",
    SEARCH_ENTRY: "SearchResultEntry",
    SEARCH_DONE: "SearchResultDone",
    6: "ModifyRequest",
    7: "ModifyResponse",
    ADD_REQUEST: "AddRequest",
    ADD_RESPONSE: "AddResponse",
    10: "DelRequest",
    11: "DelResponse",
    SEARCH_REFERENCE: "SearchResultReference",
    EXTENDED_REQUEST: "ExtendedRequest",
    EXTENDED_RESPONSE: "ExtendedResponse",
}

#: Operations whose content starts with an LDAPResult.
_RESULT_OPS = frozenset({1, 5, 7, 9, 11, 13, 15, EXTENDED_RESPONSE})

#: Result codes the harness names (RFC 4511 §4.1.9).
SUCCESS, OPERATIONS_ERROR, PROTOCOL_ERROR = 0, 1, 2
CONFIDENTIALITY_REQUIRED, NO_SUCH_OBJECT, INVALID_CREDENTIALS = 13, 32, 49
UNAVAILABLE, UNWILLING, OTHER = 52, 53, 80

#: The messageIDs of the prober's requests: a reply is matched to its
#: request by them (the injected request's answer is recognisable).
HELLO_ID, STARTTLS_ID, SENTINEL_ID, INJECTED_ID = 1, 2, 3, 4
LOGIN_ID, PROBE_ID, QUIT_ID, ADD_ID = 5, 6, 7, 8

#: The reference LDAP server's validation matrix: behaviour -> the whole
#: non-pass map (every scenario not listed passes).
SERVER_EXPECTED: Dict[str, Dict[str, Verdict]] = {
    "strict": {},
    "keep-buffer": {
        "server.command-injection": F,
        "server.command-injection-split": F,
        "server.command-injection-multi": F,
    },
    "plaintext-in-tls": {"server.plaintext-in-tls": F},
    # R4: plaintext glued to the client's close_notify is taken as the
    # first plaintext PDU (with or without a "STOPTLS": the removal is bare).
    "one-sided-resume": {
        "server.one-sided-close": F,
        "server.one-sided-close-stoptls": F,
    },
    "no-close-notify-reply": {
        "server.close-notify-reply": W,
        "server.stoptls-cycle": F,
        "server.state-reset": W,
    },
    "ignore-truncation": {"server.truncation": F},
    "alert-as-close": {"server.alert-then-plaintext": F},
    "no-state-reset": {"server.state-reset": F},
    "accept-starttls-in-tls": {"server.starttls-in-tls": W},
}


#: Where the reference LDAP client differs from the client role's matrix:
#: the removal scenarios run on LDAP only (the whole map of each behaviour).
CLIENT_EXPECTED: Dict[str, Dict[str, Verdict]] = {
    # Takes injected responses, also those arriving after its ClientHello: its
    # lenient TLS layer finds the first BER unit in front of the ServerHello.
    "accept-injected-response": {
        "client.response-injection": F,
        "client.response-injection-split": F,
        "client.response-injection-partial": F,
        "client.response-injection-multi": F,
    },
    # close_notify and the next request leave together; plaintext glued to
    # the server's close_notify is taken (R4 relaxed both ways).
    "one-sided-close": {
        "client.stoptls-wait": F,
        "client.stoptls-cycle": F,
        "client.removal-one-sided": F,
    },
    # The plaintext root DSE is kept: it never learns of the removal
    # (client.state-reset does not apply to LDAP, see rereads_capabilities).
    "no-state-reset": {"client.stoptls-wait": K, "client.stoptls-cycle": K},
    # R9: a bind in plaintext where TLS is missing, refused, or removed by the server.
    "downgrade": {
        "client.starttls-stripped": F,
        "client.starttls-refused": F,
        "client.starttls-bad": F,
        "client.removal-by-server": F,
    },
    # The server's removal is never answered (TCP closed instead).
    "no-close-notify-reply": {
        "client.close-notify-reply": W,
        "client.removal-by-server": W,
    },
}

# ------------------------------------------------------------------- BER


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, content: bytes) -> bytes:
    """One BER element with a definite length (short or long form)."""
    return bytes([tag]) + _length(len(content)) + content


def integer(value: int, tag: int = 0x02) -> bytes:
    """A BER INTEGER (or ENUMERATED with ``tag=0x0A``), minimal two's complement."""
    size = max(1, (value.bit_length() + 8) // 8)
    return tlv(tag, value.to_bytes(size, "big", signed=True))


def octets(value: bytes, tag: int = 0x04) -> bytes:
    return tlv(tag, value)


def seq(*parts: bytes, tag: int = 0x30) -> bytes:
    return tlv(tag, b"".join(parts))


def header(data: bytes, pos: int) -> Optional[Tuple[int, int, int]]:
    """``(tag, content start, content end)`` of the element at ``pos``.

    None when the header is incomplete; :class:`ValueError` when it cannot
    be an LDAP element (multi-byte tag, indefinite or over-long length).
    The content end may lie beyond ``len(data)`` (the element is incomplete).
    """
    if pos >= len(data):
        return None
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte tags are not used by LDAP")
    if pos + 1 >= len(data):
        return None
    first = data[pos + 1]
    if first < 0x80:
        return tag, pos + 2, pos + 2 + first
    count = first & 0x7F
    if count == 0 or count > 4:
        raise ValueError("indefinite or over-long BER length (RFC 4511 §5.1)")
    if pos + 2 + count > len(data):
        return None
    size = int.from_bytes(data[pos + 2 : pos + 2 + count], "big")
    return tag, pos + 2 + count, pos + 2 + count + size


def elements(data: bytes) -> List[Tuple[int, bytes]]:
    """The complete elements of a constructed content, ``(tag, content)``; strict."""
    out: List[Tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        head = header(data, pos)
        if head is None or head[2] > len(data):
            raise ValueError("truncated BER element")
        tag, start, end = head
        out.append((tag, data[start:end]))
        pos = end
    return out


def _int(content: bytes) -> int:
    if not content or len(content) > 8:
        raise ValueError("bad BER integer")
    return int.from_bytes(content, "big", signed=True)


# ------------------------------------------------------------ the framer


class BerFramer(Framer):
    """Cuts a stream into BER ``LDAPMessage`` units (one SEQUENCE each).

    Deterministic whatever the segmentation: a byte that cannot start an
    LDAPMessage (not ``0x30``) is a unit of its own, a header that cannot be
    one (indefinite or over-long length) is cut as a unit of its tag and
    length bytes, and a message longer than :attr:`max_unit` is cut at that
    size (the bytes after the cut are then cut as above).
    """

    def __init__(self, max_unit: int = DEFAULT_MAX_UNIT) -> None:
        self.max_unit = max_unit

    def split(self, data: bytes) -> Tuple[List[bytes], int]:
        units: List[bytes] = []
        pos = 0
        while pos < len(data):
            if data[pos] != 0x30:
                units.append(data[pos : pos + 1])
                pos += 1
                continue
            try:
                head = header(data, pos)
            except ValueError:
                cut = min(len(data), pos + 2)
                units.append(data[pos:cut])
                pos = cut
                continue
            if head is None:
                break
            end = head[2]
            if end - pos > self.max_unit:
                if len(data) - pos < self.max_unit:
                    break
                end = pos + self.max_unit
            elif end > len(data):
                break
            units.append(data[pos:end])
            pos = end
        return units, pos


def ber_framer() -> Framer:
    return BerFramer()


# ---------------------------------------------------------- LDAPMessage


@dataclass(frozen=True)
class LdapMessage:
    """The parts of one LDAPMessage the harness looks at."""

    msgid: int
    op: int
    #: The LDAPResult's resultCode (responses only).
    result: Optional[int] = None
    #: A DN (bind name, search base, entry) or an extended operation's OID.
    name: bytes = b""
    diagnostic: bytes = b""
    #: requestValue / responseValue / simple-bind password.
    value: bytes = b""
    #: A search entry's attributes (lower-case names).
    attrs: Mapping[str, Tuple[bytes, ...]] = field(default_factory=dict)
    #: A search request's requested attribute names.
    wanted: Tuple[str, ...] = ()

    @property
    def op_name(self) -> str:
        return OP_NAMES.get(self.op, f"op{self.op}")

    def describe(self) -> str:
        text = f"{self.op_name} id={self.msgid}"
        if self.result is not None:
            text += f" result={self.result}"
        if self.name:
            text += f" {self.name[:60].decode('latin-1')!r}"
        if self.diagnostic:
            text += f" ({self.diagnostic[:80].decode('latin-1')})"
        return text


def _parse_op(msgid: int, tag: int, body: bytes) -> LdapMessage:
    op = tag & 0x1F
    if tag & 0xC0 != 0x40:
        raise ValueError("protocolOp is not an APPLICATION tag")
    if op == UNBIND_REQUEST:
        return LdapMessage(msgid, op)
    parts = elements(body)
    if op in _RESULT_OPS:
        if len(parts) < 3 or parts[0][0] != 0x0A:
            raise ValueError("bad LDAPResult")
        name, value = b"", b""
        for t, c in parts[3:]:
            if t == 0x8A:
                name = c
            elif t == 0x8B:
                value = c
        return LdapMessage(msgid, op, _int(parts[0][1]), name, parts[2][1], value)
    if op == EXTENDED_REQUEST:
        name = next((c for t, c in parts if t == 0x80), b"")
        value = next((c for t, c in parts if t == 0x81), b"")
        return LdapMessage(msgid, op, name=name, value=value)
    if op == BIND_REQUEST:
        if len(parts) < 3:
            raise ValueError("bad BindRequest")
        return LdapMessage(msgid, op, name=parts[1][1], value=parts[2][1])
    if op == SEARCH_REQUEST:
        if len(parts) < 8:
            raise ValueError("bad SearchRequest")
        wanted = tuple(c.decode("latin-1").lower() for _t, c in elements(parts[7][1]))
        return LdapMessage(msgid, op, name=parts[0][1], wanted=wanted)
    if op in (SEARCH_ENTRY, ADD_REQUEST):
        attrs: Dict[str, Tuple[bytes, ...]] = {}
        for _t, attr in elements(parts[1][1]) if len(parts) > 1 else ():
            inner = elements(attr)
            values = tuple(c for _t2, c in elements(inner[1][1])) if len(inner) > 1 else ()
            attrs[inner[0][1].decode("latin-1").lower()] = values
        return LdapMessage(msgid, op, name=parts[0][1] if parts else b"", attrs=attrs)
    return LdapMessage(msgid, op)


def parse_message(unit: bytes) -> Optional[LdapMessage]:
    """The LDAPMessage ``unit`` is, or None if it is not one (never raises)."""
    try:
        head = header(unit, 0)
        if head is None or head[0] != 0x30 or head[2] != len(unit):
            return None
        parts = elements(unit[head[1] :])
        if len(parts) < 2 or parts[0][0] != 0x02:
            return None
        return _parse_op(_int(parts[0][1]), parts[1][0], parts[1][1])
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def encode_message(msgid: int, op: bytes) -> bytes:
    """An LDAPMessage around an encoded protocolOp (controls are never sent)."""
    return seq(integer(msgid), op)


def ldap_result(code: int, diagnostic: bytes = b"", matched: bytes = b"") -> bytes:
    """The LDAPResult fields (content of a response op)."""
    return integer(code, 0x0A) + octets(matched) + octets(diagnostic)


def extended_request(msgid: int, oid: bytes, value: Optional[bytes] = None) -> bytes:
    body = octets(oid, 0x80) + (octets(value, 0x81) if value is not None else b"")
    return encode_message(msgid, tlv(0x77, body))


def extended_response(
    msgid: int, code: int, diagnostic: bytes = b"", oid: bytes = b"", value: Optional[bytes] = None
) -> bytes:
    body = ldap_result(code, diagnostic)
    if oid:
        body += octets(oid, 0x8A)
    if value is not None:
        body += octets(value, 0x8B)
    return encode_message(msgid, tlv(0x78, body))


def response(msgid: int, op: int, code: int, diagnostic: bytes = b"") -> bytes:
    """A plain response (BindResponse, SearchResultDone, AddResponse...)."""
    return encode_message(msgid, tlv(0x60 | op, ldap_result(code, diagnostic)))


def search_request(msgid: int, base: bytes, attributes: Sequence[str]) -> bytes:
    """A base-object search of ``base`` with the filter ``(objectClass=*)``."""
    body = (
        octets(base)
        + integer(0, 0x0A)  # scope baseObject
        + integer(0, 0x0A)  # derefAliases never
        + integer(0)
        + integer(0)
        + tlv(0x01, b"\x00")  # typesOnly FALSE
        + octets(b"objectClass", 0x87)  # present filter
        + seq(*(octets(a.encode()) for a in attributes))
    )
    return encode_message(msgid, tlv(0x63, body))


def _attributes(attrs: Mapping[str, Sequence[bytes]]) -> bytes:
    """An AttributeList: SEQUENCE OF {type, SET OF value}."""
    return seq(*(seq(octets(k.encode()), seq(*map(octets, v), tag=0x31)) for k, v in attrs.items()))


def search_entry(msgid: int, dn: bytes, attrs: Mapping[str, Sequence[bytes]]) -> bytes:
    return encode_message(msgid, tlv(0x64, octets(dn) + _attributes(attrs)))


def bind_request(msgid: int, dn: bytes, password: bytes) -> bytes:
    return encode_message(msgid, tlv(0x60, integer(3) + octets(dn) + octets(password, 0x80)))


def add_request(msgid: int, dn: bytes, attrs: Mapping[str, Sequence[bytes]]) -> bytes:
    return encode_message(msgid, tlv(0x68, octets(dn) + _attributes(attrs)))


def unbind_request(msgid: int) -> bytes:
    return encode_message(msgid, tlv(0x42, b""))


def notice_of_disconnection(code: int, diagnostic: bytes) -> bytes:
    """The unsolicited notification a server sends before it closes (RFC 4511 §4.4.1)."""
    return extended_response(0, code, diagnostic, NOTICE_OF_DISCONNECTION)


def msgid_of(unit: bytes) -> Optional[int]:
    message = parse_message(unit)
    return message.msgid if message is not None else None


# ----------------------------------------------------------------- replies


@dataclass(frozen=True)
class LdapReply(Reply):
    """A complete LDAP answer: one response, or a search's entries and its done."""

    @property
    def messages(self) -> List[Optional[LdapMessage]]:
        return [parse_message(unit) for unit in self.lines]

    @property
    def final(self) -> Optional[LdapMessage]:
        return parse_message(self.lines[-1]) if self.lines else None

    @property
    def text(self) -> str:
        parts = [m.describe() if m is not None else "not an LDAPMessage" for m in self.messages]
        return "; ".join(parts) if parts else "(nothing: LDAP servers do not greet)"


#: The key of a "reply" that is no LDAPMessage at all.
_JUNK = "junk"


def _reply(units: Sequence[bytes]) -> LdapReply:
    last = parse_message(units[-1])
    if last is None:
        return LdapReply(tuple(units), False, _JUNK)
    if last.msgid == 0 and last.name == NOTICE_OF_DISCONNECTION:
        return LdapReply(tuple(units), False, "notice")
    code = last.result
    return LdapReply(tuple(units), code == SUCCESS, str(code) if code is not None else last.op_name)


def split_ldap_reply(buf: bytes) -> Tuple[Optional[LdapReply], bytes]:
    """Cut one complete answer off ``buf``: search entries and references are
    gathered up to their SearchResultDone; anything else is one message."""
    if buf and buf[0] != 0x30 and check_header(buf[:HEADER_LEN]) is None:
        # TLS records where an LDAPMessage belongs (a peer's alert after ours,
        # say): no reply, as a line dialect sees none in bytes without a line end.
        return None, buf
    units, _used = BerFramer().split(buf)
    taken: List[bytes] = []
    for unit in units:
        taken.append(unit)
        message = parse_message(unit)
        if message is not None and message.op in (SEARCH_ENTRY, SEARCH_REFERENCE):
            continue
        return _reply(taken), buf[sum(len(u) for u in taken) :]
    return None, buf


class _FinalResponse(LinePredicate):
    """The last unit of the answer to the request with messageID ``arg``."""

    kind = "ldap-final"

    def __call__(self, unit: bytes) -> bool:
        message = parse_message(unit)
        if message is None:
            return False
        if message.op in (SEARCH_ENTRY, SEARCH_REFERENCE):
            return False
        return str(message.msgid) == self.arg or message.msgid == 0


# ---------------------------------------------------- the scripted server

_ROOT_DSE_ATTRS = ("supportedExtension", "supportedLDAPVersion", REMOVAL_ATTRIBUTE)


def root_dse(*, tls: bool, starttls: bool, removal: bool, bait: bool) -> Dict[str, List[bytes]]:
    """The root DSE attributes of the harness's servers (scripted and reference)."""
    extensions = [WHOAMI_OID]
    if starttls and not tls:
        extensions.insert(0, STARTTLS_OID)
    attrs: Dict[str, List[bytes]] = {
        "supportedLDAPVersion": [b"3"],
        "supportedExtension": extensions,
    }
    if tls and removal:
        attrs[REMOVAL_ATTRIBUTE] = [b"TRUE"]
    if bait and not tls:
        attrs["x-starttls-harness-plaintext-only"] = [b"TRUE"]
    return attrs


class _ScriptedLdap(ScriptedServer):
    """The scripted server's LDAP: root DSE, StartTLS, simple bind, add, who-am-I."""

    injection_effect = "answer-taken"
    #: A close_notify right after the first request under TLS ends the session
    #: (the run layer shows a client's bare closure as this verb).
    retreat_verbs = frozenset({"removal of TLS"})

    def parse(self, raw: bytes, tls: bool) -> Command:
        message = parse_message(raw)
        if message is None:
            return Command(raw, tls, "other", "junk")
        kind = {
            BIND_REQUEST: "auth",
            UNBIND_REQUEST: "quit",
            ADD_REQUEST: "append",
            SEARCH_REQUEST: "access",
        }.get(message.op, "other")
        if message.op == SEARCH_REQUEST and message.name == b"":
            kind = "hello"
        if message.op == EXTENDED_REQUEST and message.name == STARTTLS_OID:
            kind = "starttls"
        return Command(raw, tls, kind, message.op_name, str(message.msgid).encode(), message.name)

    def _id(self, cmd: Command) -> int:
        return int(cmd.tag or b"0")

    def greeting(self) -> bytes:
        return b""

    def hello(self, cmd: Command, *, tls: bool, starttls: bool, stoptls: bool) -> bytes:
        attrs = root_dse(tls=tls, starttls=starttls, removal=stoptls, bait=True)
        return search_entry(self._id(cmd), b"", attrs) + response(
            self._id(cmd), SEARCH_DONE, SUCCESS
        )

    def starttls_ok(self, cmd: Command) -> bytes:
        return extended_response(self._id(cmd), SUCCESS, oid=STARTTLS_OID)

    def starttls_refused(self, cmd: Command) -> bytes:
        return extended_response(self._id(cmd), UNAVAILABLE, b"TLS not available now")

    def not_offered(self, cmd: Command) -> bytes:
        return extended_response(self._id(cmd), PROTOCOL_ERROR, b"unsupported extended operation")

    def starttls_bad(self, cmd: Command) -> bytes:
        return extended_response(self._id(cmd), OPERATIONS_ERROR, b"StartTLS not allowed now")

    def stoptls_ok(self, cmd: Command) -> bytes:
        return b""  # the removal of the TLS layer has no command and no answer

    def goodbye(self, cmd: Command) -> bytes:
        return b""  # an unbind is not answered

    def injection(self, starttls: Command) -> bytes:
        # The answer a client takes for its first request under TLS.
        return response(HELLO_ID, SEARCH_DONE, UNWILLING, b"injected by starttls-harness")

    def partial_injection(self, starttls: Command) -> bytes:
        return self.injection(starttls)[:-4]

    def stored(self, cmd: Command) -> bytes:
        return response(self._id(cmd), ADD_RESPONSE, SUCCESS)

    def simple(self, cmd: Command) -> bytes:
        message = parse_message(cmd.raw)
        if message is not None and message.op == EXTENDED_REQUEST:
            if message.name == WHOAMI_OID:
                return extended_response(self._id(cmd), SUCCESS, value=b"")
            return extended_response(self._id(cmd), PROTOCOL_ERROR, b"unsupported")
        if message is not None and message.op == SEARCH_REQUEST:
            return response(self._id(cmd), SEARCH_DONE, NO_SUCH_OBJECT)
        return notice_of_disconnection(PROTOCOL_ERROR, b"not understood")

    def auth_prompts(self, cmd: Command) -> List[bytes]:
        return []

    def auth_done(self, cmd: Command, ok: bool) -> bytes:
        code = SUCCESS if ok else INVALID_CREDENTIALS
        return response(self._id(cmd), BIND_RESPONSE, code)


# ------------------------------------------------------------ the dialect

#: The entry the storage action adds, cut before its end (R6).
_TRUNCATED_ADD = add_request(
    ADD_ID,
    b"cn=harness-truncated,dc=example,dc=invalid",
    {"objectClass": [b"person"], "cn": [b"harness-truncated"], "sn": [b"x" * 200]},
)


class _Ldap(Dialect):
    name = "ldap"
    default_port = 389
    url_scheme = "ldap"
    server_module = "starttls_harness.servers.ldap"
    client_module = "starttls_harness.clients.ldap"
    has_return_to_plaintext = True
    server_greets = False
    return_by_closure = True
    #: RFC 4511 §4.14.3: either peer may remove the TLS layer.
    closure_initiator = "either"
    #: After the removal the client speaks first (LDAP servers never greet).
    greets_after_stoptls = False
    storage_needs_login = True
    rereads_capabilities = False
    state_needs_login: Tuple[str, ...] = ("stoptls",)
    #: Every answer ends a request: any final response is what the prober awaits.
    any_reply_tag: Optional[str] = "any"
    reference_server_expected: Mapping[str, Mapping[str, Verdict]] = SERVER_EXPECTED
    reference_client_expected: Mapping[str, Mapping[str, Verdict]] = CLIENT_EXPECTED

    def framer(self) -> Framer:
        return BerFramer()

    def scripted_server(self) -> ScriptedServer:
        return _SCRIPTED

    def fake_greeting(self) -> bytes:
        return notice_of_disconnection(UNAVAILABLE, b"attacker.invalid injected notice")

    def hello(self) -> bytes:
        return search_request(HELLO_ID, b"", _ROOT_DSE_ATTRS)

    def starttls(self) -> bytes:
        return extended_request(STARTTLS_ID, STARTTLS_OID)

    def stoptls(self) -> bytes:
        return b""  # the removal of the TLS layer is a bare closure (RFC 4511 §4.14.3)

    def sentinel(self) -> bytes:
        return search_request(SENTINEL_ID, b"", ("supportedLDAPVersion",))

    def injected(self) -> bytes:
        return search_request(INJECTED_ID, b"cn=starttls-harness-injected", ("cn",))

    def quit(self) -> bytes:
        return unbind_request(QUIT_ID)

    def is_injected_reply(self, reply: Reply) -> bool:
        final = parse_message(reply.lines[-1]) if reply.lines else None
        return final is not None and final.msgid == INJECTED_ID

    def is_sentinel_reply(self, reply: Reply) -> bool:
        final = parse_message(reply.lines[-1]) if reply.lines else None
        return final is not None and final.msgid == SENTINEL_ID and final.result == SUCCESS

    def split_reply(
        self, buf: bytes, expect_tag: Optional[str] = None
    ) -> Tuple[Optional[Reply], bytes]:
        return split_ldap_reply(buf)

    def capabilities(self, reply: Reply) -> FrozenSet[str]:
        """``STARTTLS`` from the root DSE's supportedExtension; ``STOPTLS`` from
        :data:`REMOVAL_ATTRIBUTE`; every extension OID as itself."""
        words: Set[str] = set()
        for unit in reply.lines:
            message = parse_message(unit)
            if message is None or message.op != SEARCH_ENTRY:
                continue
            extensions = message.attrs.get("supportedextension", ())
            words.update(e.decode("latin-1") for e in extensions)
            if STARTTLS_OID in extensions:
                words.add("STARTTLS")
            if message.attrs.get(REMOVAL_ATTRIBUTE):
                words.add("STOPTLS")
            words.update(a.upper() for a in message.attrs if a.startswith("x-"))
        return frozenset(words)

    def greeting_ok(self, reply: Reply) -> bool:
        return reply.ok

    def is_own_message(self, reply: Reply) -> bool:
        return reply.key != _JUNK

    def final_line_of(self, command: bytes) -> LinePredicate:
        return _FinalResponse(str(msgid_of(command)))

    def is_goodbye(self, reply: Reply) -> bool:
        return reply.key == "notice"

    def answers(self, command: bytes, reply: Reply) -> bool:
        final = parse_message(reply.lines[-1]) if reply.lines else None
        return final is not None and final.msgid == msgid_of(command)

    def login(self, user: str, password: str) -> bytes:
        return bind_request(LOGIN_ID, user.encode(), password.encode())

    def state_probe(self, after: str) -> bytes:
        return extended_request(PROBE_ID, WHOAMI_OID)

    def state_kept(self, after: str, reply: Reply) -> Optional[str]:
        final = parse_message(reply.lines[-1]) if reply.lines else None
        if final is None or final.result != SUCCESS or not final.value:
            return None
        identity = final.value[:60].decode("latin-1")
        return f"still bound as {identity!r} after {after} (Who am I?)"

    def truncated_unit(self, recipient: str) -> Sequence[UnitStep]:
        return (UnitStep(_TRUNCATED_ADD[: len(_TRUNCATED_ADD) // 2], "none"),)

    # -- as followed by the on-path proxy

    def proxy_command(self, line: bytes, verb: bytes) -> Optional[str]:
        if verb != b"STARTTLS":
            return None  # the removal of the TLS layer has no command
        message = parse_message(line)
        if message is None or message.op != EXTENDED_REQUEST or message.name != STARTTLS_OID:
            return None
        return str(message.msgid)

    def proxy_answer(self, line: bytes, tag: str) -> Optional[bool]:
        message = parse_message(line)
        if message is None or message.op != EXTENDED_RESPONSE or str(message.msgid) != tag:
            return None
        return message.result == SUCCESS


_SCRIPTED = _ScriptedLdap()
LDAP = _Ldap()
