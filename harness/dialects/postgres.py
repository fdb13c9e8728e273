"""PostgreSQL (frontend/backend protocol 3.0) as the harness speaks it, in every role.

The protocol is length-prefixed, not line-based.  The first messages of a
connection (``SSLRequest``, ``GSSENCRequest``, ``CancelRequest``, the
``StartupMessage``) have no type byte: an int32 length (counting itself)
and an int32 code.  Every later message is one type byte and an int32
length.  The server answers ``SSLRequest`` with one bare byte, ``S`` (go
ahead with the TLS handshake) or ``N`` (no TLS); that byte is the whole
"STARTTLS answer".

How the harness maps PostgreSQL onto its STARTTLS vocabulary:

* no greeting and no hello before TLS (:attr:`Postgres.server_greets` is False,
  :meth:`Postgres.hello_for` gives ``b""``): the client speaks first, and
  ``SSLRequest`` is always worth asking, so the capability ``STARTTLS`` is
  implied;
* STARTTLS = ``SSLRequest``; every TLS session opens with the
  ``StartupMessage`` (:meth:`Postgres.session_login`: the test user, else
  ``postgres``, database ``postgres``, answered by ``AuthenticationOk`` ...
  ``ReadyForQuery``; where the server asks for a password the harness gives
  the test user's, in cleartext, MD5 or SCRAM-SHA-256 as asked:
  :mod:`~starttls_harness.dialects.pg_auth`); the sentinel is a simple query (``Q``) whose row the
  answer must carry;
* injection (server role, CVE-2021-23214): a ``StartupMessage`` and a query
  pipelined after ``SSLRequest``; a server that runs them answers the
  injected query's row under TLS.  PostgreSQL >= 14.1 refuses with "received
  unencrypted data after SSL request".  Client role (CVE-2021-23222, libpq):
  an ``ErrorResponse`` glued to the ``S``;
* no return to plaintext (``has_return_to_plaintext`` is False): the
  STOPTLS scenarios do not apply, and the closure scenarios check that the
  connection ends.  ``stoptls()`` is a startup-phase request with a code no
  server knows (:data:`STOPTLS_CODE`), which a server must refuse.

The framer (:class:`PostgresFramer`) cuts both directions: a unit starting
with a zero byte is a startup-phase message (its length's high byte), any
other byte starts a typed message, and at the start of a stream a bare
``S``/``N``/``G`` is the one-byte answer to a request.
"""

from __future__ import annotations

import struct
from typing import Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Tuple

from starttls_harness.dialects.base import Dialect, LinePredicate, Reply, SessionLogin, UnitStep
from starttls_harness.dialects.pg_auth import ClientLogin
from starttls_harness.dialects.roles import Command, ScriptedServer
from starttls_harness.report.verdicts import Verdict
from starttls_harness.tls.framing import DEFAULT_MAX_UNIT, Framer

__all__ = [
    "CANCEL_CODE",
    "GSSENC_CODE",
    "INJECTED_TEXT",
    "POSTGRES",
    "PROTOCOL_3",
    "SENTINEL_TEXT",
    "SSL_CODE",
    "STOPTLS_CODE",
    "PostgresFramer",
    "auth",
    "command_complete",
    "data_row",
    "error_fields",
    "error_response",
    "message",
    "messages",
    "query",
    "query_text",
    "ready",
    "row_description",
    "select_result",
    "selected_value",
    "session_start",
    "ssl_request",
    "startup",
    "startup_params",
    "terminate",
    "untyped",
    "untyped_code",
]

#: Startup-phase request codes (PostgreSQL's ``pqcomm.h``).
PROTOCOL_3 = 3 << 16
SSL_CODE = (1234 << 16) | 5679
GSSENC_CODE = (1234 << 16) | 5680
CANCEL_CODE = (1234 << 16) | 5678
#: Not PostgreSQL: the harness's "STOPTLS" request, a code no server knows.
STOPTLS_CODE = (1234 << 16) | 5699

#: What the sentinel and the injected query select (their rows prove who ran).
SENTINEL_TEXT = "starttls-harness sentinel"
INJECTED_TEXT = "starttls-harness injected"
#: The user and database of the harness's StartupMessage (present on every server).
USER = "postgres"
DATABASE = "postgres"

#: Requests answered by one bare byte (``S``/``N``/``G``).
_ONE_BYTE_ANSWERS = (SSL_CODE, GSSENC_CODE, STOPTLS_CODE)
#: Auth request codes that end an answer (the client must speak next).
_AUTH_DONE = (0, 12)  # AuthenticationOk, AuthenticationSASLFinal


# ---------------------------------------------------------------- messages


def untyped(code: int, payload: bytes = b"") -> bytes:
    """A startup-phase message: int32 length (counting itself), int32 code, payload."""
    return struct.pack("!ii", 8 + len(payload), code) + payload


def message(kind: bytes, payload: bytes = b"") -> bytes:
    """A typed message: one type byte, int32 length (counting itself), payload."""
    return kind + struct.pack("!i", 4 + len(payload)) + payload


def ssl_request() -> bytes:
    return untyped(SSL_CODE)


def startup(params: Mapping[str, str]) -> bytes:
    """A protocol 3.0 StartupMessage with ``params`` (``user`` at least)."""
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
    return untyped(PROTOCOL_3, body + b"\0")


def query(sql: str) -> bytes:
    return message(b"Q", sql.encode("utf-8") + b"\0")


def terminate() -> bytes:
    return message(b"X")


def auth(code: int, extra: bytes = b"") -> bytes:
    return message(b"R", struct.pack("!i", code) + extra)


def ready(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def error_response(severity: str, sqlstate: str, text: str) -> bytes:
    fields = [("S", severity), ("V", severity), ("C", sqlstate), ("M", text)]
    body = b"".join(k.encode() + v.encode() + b"\0" for k, v in fields)
    return message(b"E", body + b"\0")


def row_description(names: Sequence[str]) -> bytes:
    cols = b"".join(n.encode() + b"\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0) for n in names)
    return message(b"T", struct.pack("!h", len(names)) + cols)


def data_row(values: Sequence[bytes]) -> bytes:
    cols = b"".join(struct.pack("!i", len(v)) + v for v in values)
    return message(b"D", struct.pack("!h", len(values)) + cols)


def command_complete(tag: str) -> bytes:
    return message(b"C", tag.encode() + b"\0")


def select_result(value: bytes) -> bytes:
    """The whole answer to ``SELECT 'value'`` (one text column, one row)."""
    return (
        row_description(["?column?"]) + data_row([value]) + command_complete("SELECT 1") + ready()
    )


def session_start(pid: int = 4242, key: int = 0x5EC12E7) -> bytes:
    """AuthenticationOk and what a server says before its first ReadyForQuery."""
    params = {
        "server_version": "15.0 (starttls-harness)",
        "server_encoding": "UTF8",
        "client_encoding": "UTF8",
        "DateStyle": "ISO, MDY",
        "integer_datetimes": "on",
        "standard_conforming_strings": "on",
    }
    status = b"".join(
        message(b"S", k.encode() + b"\0" + v.encode() + b"\0") for k, v in params.items()
    )
    return auth(0) + status + message(b"K", struct.pack("!ii", pid, key)) + ready()


def untyped_code(unit: bytes) -> Optional[int]:
    """The code of a startup-phase message, or None if ``unit`` is not one."""
    if len(unit) < 8 or unit[0] != 0:
        return None
    length, code = struct.unpack_from("!ii", unit)
    return int(code) if length == len(unit) else None


def startup_params(unit: bytes) -> Dict[str, str]:
    """The parameters of a StartupMessage (empty if malformed)."""
    parts = unit[8:].split(b"\0")
    out: Dict[str, str] = {}
    for k, v in zip(parts[0::2], parts[1::2]):
        if not k:
            break
        out[k.decode("latin-1")] = v.decode("latin-1")
    return out


def query_text(unit: bytes) -> Optional[str]:
    """The SQL of a complete ``Q`` message, or None."""
    if len(unit) < 6 or unit[:1] != b"Q":
        return None
    return unit[5:].rstrip(b"\0").decode("utf-8", "replace")


def error_fields(unit: bytes) -> Dict[str, str]:
    """The fields of an ErrorResponse/NoticeResponse (``S``, ``C``, ``M``...)."""
    out: Dict[str, str] = {}
    for field in unit[5:].split(b"\0"):
        if field:
            out[field[:1].decode("latin-1")] = field[1:].decode("utf-8", "replace")
    return out


def messages(data: bytes) -> Iterator[bytes]:
    """The complete typed messages at the start of ``data`` (stops at garbage)."""
    pos = 0
    while len(data) - pos >= 5 and data[pos] != 0:
        (length,) = struct.unpack_from("!i", data, pos + 1)
        if length < 4 or len(data) - pos < 1 + length:
            return
        yield data[pos : pos + 1 + length]
        pos += 1 + length


# ------------------------------------------------------------------ framer


class PostgresFramer(Framer):
    """Cuts a PostgreSQL byte stream (either direction) into messages.

    A zero first byte starts a startup-phase message (int32 length); any
    other byte a typed one (type, int32 length).  While the stream is at its
    start (nothing but one-byte answers cut yet; again after :meth:`reset`),
    ``S``, ``N`` and ``G`` are one-byte answers to ``SSLRequest`` /
    ``GSSENCRequest``: no server sends a typed message starting with them
    before the startup.  A length below the header's own size makes the
    header a unit of its own (hostile bytes, refused by whoever reads it); a
    message longer than ``max_unit`` is handed out in ``max_unit`` pieces.
    The decisions depend on the bytes alone, never on how they were cut.
    """

    def __init__(self, max_unit: int = DEFAULT_MAX_UNIT) -> None:
        self.max_unit = max(8, max_unit)
        self._at_start = True
        self._left = 0  # bytes still to come of an over-long message

    def reset(self) -> None:
        self._at_start = True
        self._left = 0

    def split(self, data: bytes) -> Tuple[List[bytes], int]:
        units: List[bytes] = []
        start = 0
        size = len(data)
        while start < size:
            if self._left:
                take = min(self._left, self.max_unit)
                if size - start < take:
                    break
                units.append(data[start : start + take])
                start += take
                self._left -= take
                continue
            first = data[start]
            if self._at_start and first in b"SNG":
                units.append(data[start : start + 1])
                start += 1
                continue
            header = 4 if first == 0 else 5
            if size - start < header:
                break
            (length,) = struct.unpack_from("!I", data, start + header - 4)
            total = header - 4 + length
            if length < 4:
                total = header  # malformed: the header alone
            self._at_start = False
            if total > self.max_unit:
                self._left = total
                continue
            if size - start < total:
                break
            units.append(data[start : start + total])
            start += total
        return units, start


# --------------------------------------------------------- the prober's side


class _Answer(LinePredicate):
    """The final unit of an answer: the SSL byte, ReadyForQuery, a FATAL error."""

    kind = "postgres-final"

    def __call__(self, unit: bytes) -> bool:
        if self.arg == "ssl" and unit in (b"S", b"N", b"G"):
            return True
        return _ends_answer(unit)


def _ends_answer(unit: bytes) -> bool:
    kind = unit[:1]
    if kind == b"Z":
        return True
    if kind == b"E":
        return error_fields(unit).get("S", "") in ("FATAL", "PANIC")
    if kind == b"R" and len(unit) >= 9:
        (code,) = struct.unpack_from("!i", unit, 5)
        return code not in _AUTH_DONE
    return False


def _reply(units: Sequence[bytes]) -> Reply:
    """Not ok: an error, or a password request (answered, if at all, by the
    session start's login: :class:`_PgSessionLogin`)."""
    last = units[-1][:1].decode("latin-1") if units else ""
    asks = last == "R" and _ends_answer(units[-1])
    ok = not any(u[:1] == b"E" for u in units) and last != "?" and not asks
    return Reply(tuple(units), ok, last)


def describe(reply: Reply) -> str:
    """A reply in words, for evidence and summaries (the bytes are binary)."""
    parts = []
    for unit in reply.lines:
        kind = unit[:1]
        if len(unit) == 1:
            parts.append(f"'{unit.decode('latin-1')}'")
        elif kind in (b"E", b"N"):
            f = error_fields(unit)
            parts.append(f"{kind.decode()}({f.get('S', '?')} {f.get('C', '')}: {f.get('M', '')})")
        elif kind == b"D":
            parts.append(f"D({unit[11:].decode('utf-8', 'replace')!r})")
        elif kind == b"R" and len(unit) >= 9:
            parts.append(f"R({struct.unpack_from('!i', unit, 5)[0]})")
        else:
            parts.append(kind.decode("latin-1") if kind and kind != b"\0" else "?")
    return " ".join(parts)


class _ScriptedPostgres(ScriptedServer):
    """The scripted server's PostgreSQL: SSLRequest, startup, password, simple queries."""

    injection_effect = "answer-taken"
    #: libpq >= 14.1 ends the connection once TLS is up when bytes came
    #: with the ``S`` ("received unencrypted data after SSL response"); one
    #: that took them sends its StartupMessage and gives up on the answer.
    close_before_first_is_refusal = True

    def parse(self, raw: bytes, tls: bool) -> Command:
        code = untyped_code(raw)
        if code is not None:
            kinds = {
                SSL_CODE: ("starttls", "SSLRequest"),
                GSSENC_CODE: ("other", "GSSENCRequest"),
                CANCEL_CODE: ("other", "CancelRequest"),
                PROTOCOL_3: ("hello", "StartupMessage"),
                STOPTLS_CODE: ("stoptls", "STOPTLS"),
            }
            kind, verb = kinds.get(code, ("other", f"request {code}"))
            return Command(raw, tls, kind, verb, b"", raw[8:])
        kind_byte = raw[:1]
        if kind_byte == b"Q":
            sql = (query_text(raw) or "").strip()
            word = sql.split(None, 1)[0].upper() if sql else ""
            kind = "append" if word in ("INSERT", "COPY") else "access"
            return Command(raw, tls, kind, "Query", b"", sql.encode())
        if kind_byte == b"p":
            return Command(raw, tls, "auth", "PasswordMessage", b"", raw[5:])
        if kind_byte == b"X":
            return Command(raw, tls, "quit", "Terminate")
        return Command(raw, tls, "other", kind_byte.decode("latin-1") or "?")

    def greeting(self) -> bytes:
        return b""  # the client speaks first

    def hello(self, cmd: Command, *, tls: bool, starttls: bool, stoptls: bool) -> bytes:
        # A cleartext password request in plaintext is the bait of R9: a
        # client that requires TLS never answers it.
        return auth(3)

    def starttls_ok(self, cmd: Command) -> bytes:
        return b"S"

    def starttls_refused(self, cmd: Command) -> bytes:
        return b"N"

    def not_offered(self, cmd: Command) -> bytes:
        if cmd.kind == "stoptls" or cmd.tls:
            return error_response("FATAL", "08P01", "unsupported frontend protocol")
        return b"N"

    def starttls_bad(self, cmd: Command) -> bytes:
        return error_response("FATAL", "08P01", "unsupported frontend protocol 1234.5679")

    def stoptls_ok(self, cmd: Command) -> bytes:
        return b"S"

    def goodbye(self, cmd: Command) -> bytes:
        return b""  # Terminate is not answered: the server closes

    def injection(self, starttls: Command) -> bytes:
        return error_response("FATAL", "28000", f"{INJECTED_TEXT} before the handshake")

    def partial_injection(self, starttls: Command) -> bytes:
        """Half an ErrorResponse whose length also spans the first reply under
        TLS (the password request): a client that keeps the bytes reads one
        FATAL error made of both."""
        body = self.injection(starttls)[5:]
        half = body[: len(body) // 2]
        return b"E" + struct.pack("!i", 4 + len(half) + len(auth(3))) + half

    def stored(self, cmd: Command) -> bytes:
        return command_complete("INSERT 0 1") + ready()

    def simple(self, cmd: Command) -> bytes:
        if cmd.verb == "GSSENCRequest":
            return b"N"
        if cmd.verb == "Query":
            sql = cmd.rest.decode("utf-8", "replace")
            value = selected_value(sql)
            if value is not None:
                return select_result(value)
            return error_response("ERROR", "42601", "syntax error") + ready()
        if cmd.kind == "other" and cmd.raw[:1] == b"\0":
            return error_response("FATAL", "08P01", f"unsupported {cmd.verb}")
        return ready()

    def auth_prompts(self, cmd: Command) -> List[bytes]:
        return []

    def auth_done(self, cmd: Command, ok: bool) -> bytes:
        if not ok:
            return error_response("FATAL", "28P01", "password authentication failed")
        return session_start()


def selected_value(sql: str) -> Optional[bytes]:
    """The value of ``SELECT 'text'`` / ``SELECT n`` (the only queries answered)."""
    words = sql.strip().rstrip(";").split(None, 1)
    if len(words) != 2 or words[0].upper() != "SELECT":
        return None
    value = words[1].strip()
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1].replace("''", "'").encode()
    return value.encode() if value.isdigit() else None


#: The body the truncated query announces in full and never finishes.
_TRUNCATED_SQL = "INSERT INTO starttls_harness VALUES ('" + "cut by a truncation " * 20 + "')"


class _PgSessionLogin(SessionLogin):
    """The StartupMessage names the test user; a password is given where asked."""

    def __init__(self, user: Optional[str], password: Optional[str]) -> None:
        self.user = user or USER
        self.client = ClientLogin(self.user, password)

    def opening(self) -> bytes:
        return startup(
            {"user": self.user, "database": DATABASE, "application_name": "starttls-harness"}
        )

    def answer(self, reply: Reply) -> bytes:
        last = reply.lines[-1] if reply.lines else b""
        fatal = error_fields(last) if last[:1] == b"E" and _ends_answer(last) else None
        return self.client.answer(reply.lines, fatal)


class Postgres(Dialect):
    """The PostgreSQL dialect (see the module docstring)."""

    awaits_first_tls_reply = True
    name = "postgres"
    default_port = 5432
    url_scheme = "postgres"
    server_module = "starttls_harness.servers.postgres"
    client_module = "starttls_harness.clients.postgres"
    has_return_to_plaintext = False
    server_greets = False
    storage_needs_login = False
    #: Where the reference server's verdicts differ from the common matrix:
    #: without STOPTLS an unanswered close_notify is only a warn, and the state
    #: check has no closure to reach.
    reference_server_expected: Mapping[str, Mapping[str, Verdict]] = {
        "no-close-notify-reply": {"server.close-notify-reply": Verdict.WARN},
    }
    #: The reference client's R1 mode reads whatever is glued to the ``S`` as
    #: TLS data, wherever it arrives (libpq < 14.1): every injection is taken.
    reference_client_expected: Mapping[str, Mapping[str, Verdict]] = {
        "accept-injected-response": {
            "client.response-injection": Verdict.FAIL,
            "client.response-injection-split": Verdict.FAIL,
            "client.response-injection-partial": Verdict.FAIL,
            "client.response-injection-multi": Verdict.FAIL,
        },
    }

    def framer(self) -> Framer:
        return PostgresFramer()

    def scripted_server(self) -> ScriptedServer:
        return _SCRIPTED

    def fake_greeting(self) -> bytes:
        return error_response("FATAL", "57P01", "starttls-harness: attacker's plaintext")

    def hello(self) -> bytes:
        return startup({"user": USER, "database": DATABASE, "application_name": "starttls-harness"})

    def hello_for(self, tls: bool) -> bytes:
        return b""  # no capabilities to ask; the startup follows every handshake

    def after_handshake(self) -> bytes:
        return self.hello()

    def session_login(self, user: Optional[str], password: Optional[str]) -> SessionLogin:
        # The test user (or ``postgres``) logs in at every session start:
        # cleartext, MD5 or SCRAM-SHA-256 where the server asks (pg_auth.py).
        return _PgSessionLogin(user, password)

    def starttls(self) -> bytes:
        return ssl_request()

    def stoptls(self) -> bytes:
        return untyped(STOPTLS_CODE)

    def sentinel(self) -> bytes:
        return query(f"SELECT '{SENTINEL_TEXT}'")

    def injected(self) -> bytes:
        user = {"user": USER, "database": DATABASE, "application_name": "injected"}
        return startup(user) + query(f"SELECT '{INJECTED_TEXT}'")

    def quit(self) -> bytes:
        return terminate()

    def is_injected_reply(self, reply: Reply) -> bool:
        return any(u[:1] == b"D" and INJECTED_TEXT.encode() in u for u in reply.lines)

    def is_sentinel_reply(self, reply: Reply) -> bool:
        rows = [u for u in reply.lines if u[:1] == b"D"]
        return reply.ok and any(SENTINEL_TEXT.encode() in u for u in rows)

    def split_reply(
        self, buf: bytes, expect_tag: Optional[str] = None
    ) -> Tuple[Optional[Reply], bytes]:
        if not buf:
            return None, buf
        if expect_tag == "ssl" and buf[:1] in (b"S", b"N", b"G"):
            return Reply((buf[:1],), buf[:1] == b"S", buf[:1].decode()), buf[1:]
        units: List[bytes] = []
        pos = 0
        for unit in messages(buf):
            units.append(unit)
            pos += len(unit)
            if _ends_answer(unit):
                return _reply(units), buf[pos:]
        if len(buf) - pos >= 5 and (buf[pos] == 0 or _bad_length(buf, pos)):
            # Not a backend message (hostile bytes): one unreadable reply.
            return Reply((*units, buf[pos:]), False, "?"), b""
        return None, buf

    def capabilities(self, reply: Reply) -> FrozenSet[str]:
        # Nothing is exchanged before SSLRequest, which is always worth asking.
        return frozenset({"STARTTLS"}) if not reply.lines else frozenset()

    def greeting_ok(self, reply: Reply) -> bool:
        return reply.ok

    def final_line_of(self, command: bytes) -> LinePredicate:
        return _Answer(self.tag_of(command) or "")

    def tag_of(self, command: bytes) -> Optional[str]:
        """``ssl`` for the requests answered by one bare byte."""
        return "ssl" if untyped_code(command) in _ONE_BYTE_ANSWERS else None

    def is_goodbye(self, reply: Reply) -> bool:
        last = reply.lines[-1] if reply.lines else b""
        return last[:1] == b"E" and error_fields(last).get("S") in ("FATAL", "PANIC")

    def answers(self, command: bytes, reply: Reply) -> bool:
        return not self.is_goodbye(reply)

    def login(self, user: str, password: str) -> bytes:
        return b""  # the StartupMessage names the user; the server trusts it over TLS

    def state_probe(self, after: str) -> bytes:
        return b""  # nothing precedes SSLRequest: no state can cross the upgrade

    def state_kept(self, after: str, reply: Reply) -> Optional[str]:
        return None

    def truncated_unit(self, recipient: str) -> Sequence[UnitStep]:
        whole = query(_TRUNCATED_SQL)
        return (UnitStep(whole[: len(whole) // 2], "none"),)

    # -- as followed by the on-path proxy

    def proxy_command(self, line: bytes, verb: bytes) -> Optional[str]:
        if verb == b"STARTTLS":
            return "" if untyped_code(line) == SSL_CODE else None
        return None

    def proxy_answer(self, line: bytes, tag: str) -> Optional[bool]:
        if line in (b"S", b"N", b"G"):
            return line == b"S"
        if line[:1] == b"E":
            return False  # a pre-7.0-style refusal of the request
        return None


def _bad_length(buf: bytes, pos: int) -> bool:
    length = int(struct.unpack_from("!I", buf, pos + 1)[0])
    return length < 4 or length > (1 << 24)


_SCRIPTED = _ScriptedPostgres()
POSTGRES = Postgres()
