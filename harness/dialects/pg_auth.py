"""PostgreSQL password logins: cleartext, MD5 and SCRAM-SHA-256, both sides.

The harness logs in where the server asks for a password at the session
start (``AuthenticationCleartextPassword`` = 3, ``AuthenticationMD5Password``
= 5, ``AuthenticationSASL`` = 10 with ``SCRAM-SHA-256``; RFC 5802, RFC 7677,
no channel binding: the GS2 header is ``n,,``).  :class:`ClientLogin` is the
harness's side, one reply at a time; :class:`ScramServer` is the reference
server's side of SCRAM.  Only the standard library (hashlib, hmac).

The password is never in anything this module returns as text (reasons,
errors): only in the bytes of a cleartext ``PasswordMessage``, which the
reports redact.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from typing import Dict, Optional, Sequence

from starttls_harness.dialects.base import LoginRefused

__all__ = [
    "SCRAM",
    "ClientLogin",
    "LoginRefused",
    "ScramServer",
    "ScramVerifier",
    "auth_code",
    "md5_password",
    "password_message",
    "scram_verifier",
]

SCRAM = "SCRAM-SHA-256"
#: The GS2 header without channel binding, and its base64 (the ``c=`` value).
_GS2 = b"n,,"
_ITERATIONS = 4096  # PostgreSQL's scram_iterations default


def _message(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!i", 4 + len(payload)) + payload


def auth_code(unit: bytes) -> Optional[int]:
    """The code of an ``R`` (authentication) message, or None."""
    if unit[:1] != b"R" or len(unit) < 9:
        return None
    return int(struct.unpack_from("!i", unit, 5)[0])


def password_message(data: bytes) -> bytes:
    """A ``PasswordMessage`` (also SASLResponse): ``p`` with ``data``."""
    return _message(b"p", data)


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """PostgreSQL's md5 answer: ``md5`` + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def _attributes(text: bytes) -> Dict[str, bytes]:
    out: Dict[str, bytes] = {}
    for part in text.split(b","):
        if len(part) >= 2 and part[1:2] == b"=":
            out[part[:1].decode("latin-1")] = part[2:]
    return out


def _nonce() -> bytes:
    return base64.b64encode(os.urandom(18))


class ScramVerifier:
    """What a server stores for SCRAM-SHA-256: salt, iterations, StoredKey, ServerKey."""

    def __init__(self, salt: bytes, iterations: int, stored_key: bytes, server_key: bytes) -> None:
        self.salt = salt
        self.iterations = iterations
        self.stored_key = stored_key
        self.server_key = server_key


def _salted(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)


def scram_verifier(
    password: str, salt: Optional[bytes] = None, iterations: int = _ITERATIONS
) -> ScramVerifier:
    """The verifier of ``password`` (a fresh random salt unless one is given)."""
    salt = os.urandom(16) if salt is None else salt
    salted = _salted(password, salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return ScramVerifier(
        salt, iterations, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key")
    )


class ClientLogin:
    """The harness's side of a PostgreSQL login, one server reply at a time.

    :meth:`answer` takes the units of one reply (as the dialect cuts them)
    and returns what to send next, or ``b""`` when the reply needs nothing
    (the login is over, or there was none).  It raises :class:`LoginRefused`
    when the server refused the login (a ``FATAL`` of class 28, invalid
    authorization), when it asks for a password and none was given, or when
    the server's SCRAM signature is wrong (it does not know the password).
    """

    def __init__(self, user: str, password: Optional[str]) -> None:
        self.user = user
        self.password = password
        self._first_bare = b""
        self._expected_signature: Optional[bytes] = None
        self.authenticated = False

    def answer(self, units: Sequence[bytes], fatal: Optional[Dict[str, str]] = None) -> bytes:
        """What to send after this reply; ``fatal`` holds a FATAL error's fields."""
        code_28 = fatal is not None and fatal.get("C", "").startswith("28")
        if fatal is not None and code_28:
            raise LoginRefused(f"{fatal.get('M', '')} (SQLSTATE {fatal.get('C')})")
        for unit in units:
            code = auth_code(unit)
            if code == 12:
                self._final(unit[9:])
            elif code == 0:
                self.authenticated = True
        last = units[-1] if units else b""
        code = auth_code(last)
        if code in (None, 0, 12):
            return b""
        if code in (3, 5, 10) and self.password is None:
            wanted = {3: "a cleartext password", 5: "an MD5 password", 10: "a SASL login"}[code]
            raise LoginRefused(f"the server asks for {wanted}; no --password was given")
        assert self.password is not None
        if code == 3:
            return password_message(self.password.encode() + b"\0")
        if code == 5:
            return password_message(md5_password(self.user, self.password, last[9:13]) + b"\0")
        if code == 10:
            mechanisms = [m.decode("latin-1") for m in last[9:].split(b"\0") if m]
            if SCRAM not in mechanisms:
                raise LoginRefused(f"no SASL mechanism the harness knows ({', '.join(mechanisms)})")
            self._first_bare = b"n=,r=" + _nonce()
            first = _GS2 + self._first_bare
            body = SCRAM.encode() + b"\0" + struct.pack("!i", len(first)) + first
            return password_message(body)
        if code == 11:
            return password_message(self._client_final(last[9:]))
        raise LoginRefused(f"the server asks for authentication method {code}")

    def _client_final(self, server_first: bytes) -> bytes:
        assert self.password is not None
        attrs = _attributes(server_first)
        nonce, salt, count = attrs.get("r", b""), attrs.get("s", b""), attrs.get("i", b"")
        mine = _attributes(self._first_bare).get("r", b"")
        if not mine or not nonce.startswith(mine) or not salt or not count.isdigit():
            raise LoginRefused("the server's SCRAM challenge is malformed")
        salted = _salted(self.password, base64.b64decode(salt), int(count))
        client_key = _hmac(salted, b"Client Key")
        without_proof = b"c=" + base64.b64encode(_GS2) + b",r=" + nonce
        message = self._first_bare + b"," + server_first + b"," + without_proof
        signature = _hmac(hashlib.sha256(client_key).digest(), message)
        self._expected_signature = _hmac(_hmac(salted, b"Server Key"), message)
        return without_proof + b",p=" + base64.b64encode(_xor(client_key, signature))

    def _final(self, server_final: bytes) -> None:
        got = _attributes(server_final).get("v", b"")
        expected = self._expected_signature
        if expected is None or not hmac.compare_digest(base64.b64decode(got), expected):
            raise LoginRefused(
                "the server's SCRAM signature is wrong (it does not know the password)"
            )


class ScramServer:
    """The reference server's side of one SCRAM-SHA-256 exchange."""

    def __init__(self, verifier: ScramVerifier) -> None:
        self.verifier = verifier
        self._message = b""
        self._nonce = b""
        self._first_bare = b""

    def first(self, initial: bytes) -> Optional[bytes]:
        """The server-first message for a SASLInitialResponse body, or None if malformed."""
        mechanism, _, rest = initial.partition(b"\0")
        if mechanism != SCRAM.encode() or len(rest) < 4:
            return None
        data = rest[4:]
        if not data.startswith(_GS2):
            return None  # channel binding is not offered
        self._first_bare = data[len(_GS2) :]
        client_nonce = _attributes(self._first_bare).get("r", b"")
        if not client_nonce:
            return None
        self._nonce = client_nonce + _nonce()
        salt = base64.b64encode(self.verifier.salt)
        self._message = b"r=" + self._nonce + b",s=" + salt + b",i=%d" % self.verifier.iterations
        return self._message

    def final(self, response: bytes) -> Optional[bytes]:
        """The server-final message if the client's proof is right, else None."""
        without_proof, _, proof = response.rpartition(b",p=")
        attrs = _attributes(without_proof)
        if attrs.get("r") != self._nonce or attrs.get("c") != base64.b64encode(_GS2):
            return None
        message = self._first_bare + b"," + self._message + b"," + without_proof
        signature = _hmac(self.verifier.stored_key, message)
        try:
            client_key = _xor(base64.b64decode(proof), signature)
        except ValueError:
            return None
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.verifier.stored_key):
            return None
        return b"v=" + base64.b64encode(_hmac(self.verifier.server_key, message))
