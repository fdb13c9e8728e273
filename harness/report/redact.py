"""Hide credentials before a conversation leaves the process.

Reports, JUnit files, evidence ladders and the pytest plugin's failure text
show the bytes that crossed the wire, and a test login crosses it: IMAP
``LOGIN user "password"``, SMTP ``AUTH PLAIN <base64>``, SASL answers after a
``334``/``+`` prompt.  Two nets catch them:

* by shape, with no secret known: the password argument of IMAP LOGIN and
  every SASL token sent after ``AUTH``/``AUTHENTICATE`` (works for a client
  under test whose password the harness never sees);
* by value, for the secrets the caller names (``--password``, the reference
  peers' test password) of at least MIN_BY_VALUE characters: the text
  itself, its IMAP-quoted form, and any base64 token that decodes to
  something holding it -- in the data, the notes and the one-line summary.

What is hidden becomes ``******** (N chars)``, N the length of what it
replaced, so a reader still sees that something was sent and how long it was.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from typing import Iterable, List, Optional

from starttls_harness.report.verdicts import Evidence, Exchange, Result

__all__ = ["Redactor", "mark"]

_B64_TOKEN = re.compile(rb"[A-Za-z0-9+/]{4,}={0,2}")
_IMAP_LOGIN = re.compile(
    rb"^(?P<head>[^ \r\n]+ +LOGIN +(?:\"(?:[^\"\\]|\\.)*\"|[^ \r\n]+) +)"
    rb"(?P<secret>\"(?:[^\"\\]|\\.)*\"|[^ \r\n]+)",
    re.IGNORECASE,
)
_LITERAL = re.compile(rb"^\{(\d+)\+?\}$")
_SMTP_AUTH = re.compile(rb"^(?P<head>AUTH +[A-Za-z0-9_-]+ +)(?P<secret>[^ \r\n]+)", re.IGNORECASE)
_IMAP_AUTH = re.compile(
    rb"^(?P<head>[^ \r\n]+ +AUTHENTICATE +[A-Za-z0-9_-]+ +)(?P<secret>[^ \r\n]+)", re.IGNORECASE
)
_SASL_START = re.compile(rb"^(?:AUTH|[^ \r\n]+ +AUTHENTICATE) ", re.IGNORECASE)
_SASL_ANSWER = re.compile(rb"^(?:[A-Za-z0-9+/]*={0,2}|\*)$")


#: Shorter secrets are hidden by shape only: replacing every "p" of a report
#: (``--password p``) would hide nothing and garble everything.
MIN_BY_VALUE = 4


def mark(length: int) -> str:
    """What replaces a hidden value of ``length`` characters."""
    return f"******** ({length} char{'' if length == 1 else 's'})"


def _mark_bytes(length: int) -> bytes:
    return mark(length).encode("ascii")


@dataclasses.dataclass
class _Shape:
    """Where a client is in a login: inside SASL, or owing a literal."""

    sasl: bool = False
    literal: int = 0


class Redactor:
    """Redacts exchanges, results and free text; stateless between results."""

    def __init__(self, secrets: Iterable[Optional[str]] = ()) -> None:
        self.secrets: List[bytes] = []
        for secret in secrets:
            if not secret or len(secret) < MIN_BY_VALUE:
                continue
            for form in (secret, secret.replace("\\", "\\\\").replace('"', '\\"')):
                encoded = form.encode("utf-8")
                if encoded not in self.secrets:
                    self.secrets.append(encoded)
        # Longest first, so a secret that contains another is hidden whole.
        self.secrets.sort(key=len, reverse=True)

    # -------------------------------------------------------------- by value

    def _by_value(self, data: bytes) -> bytes:
        if not self.secrets:
            return data
        for secret in self.secrets:
            if secret in data:
                data = data.replace(secret, _mark_bytes(len(secret.decode("utf-8", "replace"))))

        def token(match: re.Match[bytes]) -> bytes:
            raw = match.group(0)
            if len(raw) < 8:
                return raw
            try:
                decoded = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
            except (binascii.Error, ValueError):
                return raw
            if any(secret in decoded for secret in self.secrets):
                return _mark_bytes(len(raw))
            return raw

        return _B64_TOKEN.sub(token, data)

    def text(self, text: str) -> str:
        """Free text (a summary, a note): hide the named secrets."""
        if not self.secrets or not text:
            return text
        return self._by_value(text.encode("utf-8")).decode("utf-8")

    # -------------------------------------------------------------- by shape

    def _by_shape(self, line: bytes, state: _Shape) -> bytes:
        """One client line, with a credential in it hidden."""
        body = line.rstrip(b"\r\n")
        end = line[len(body) :]
        if state.literal:
            # The password of ``LOGIN user {n}``: the next n bytes.
            n, state.literal = state.literal, 0
            return _mark_bytes(min(n, len(body))) + body[n:] + end
        for pattern in (_IMAP_LOGIN, _SMTP_AUTH, _IMAP_AUTH):
            found = pattern.match(body)
            if found:
                secret = found.group("secret")
                literal = _LITERAL.match(secret) if pattern is _IMAP_LOGIN else None
                if literal:
                    state.literal = int(literal.group(1))
                    return line
                state.sasl = pattern is not _IMAP_LOGIN
                if len(secret) >= 2 and secret[:1] == secret[-1:] == b'"':
                    hidden = found.group("head") + b'"' + _mark_bytes(len(secret) - 2) + b'"'
                else:
                    hidden = found.group("head") + _mark_bytes(len(secret))
                return hidden + body[found.end() :] + end
        if _SASL_START.match(body):
            state.sasl = True
            return line
        if state.sasl and body and _SASL_ANSWER.match(body):
            return _mark_bytes(len(body)) + end
        state.sasl = False
        return line

    def exchanges(self, exchanges: Iterable[Exchange]) -> List[Exchange]:
        """A conversation with every credential hidden."""
        out: List[Exchange] = []
        state = _Shape()
        for e in exchanges:
            data = e.data
            if e.direction == "c2s" and data and e.kind in ("plaintext", "tls", "injected"):
                lines = data.splitlines(keepends=True)
                data = b"".join(self._by_shape(line, state) for line in lines)
            elif e.direction == "s2c" and data and state.sasl:
                last = data.splitlines()[-1:] or [b""]
                state.sasl = last[0].startswith((b"334", b"+"))
            data = self._by_value(data)
            note = self.text(e.note)
            if data != e.data or note != e.note:
                e = dataclasses.replace(e, data=data, note=note)
            out.append(e)
        return out

    def result(self, result: Result) -> Result:
        """A copy of ``result`` safe to write out; the original is unchanged."""
        evidence = Evidence(
            start=result.evidence.start,
            exchanges=self.exchanges(result.evidence.exchanges),
            keylog=result.evidence.keylog,
        )
        return dataclasses.replace(result, evidence=evidence, summary=self.text(result.summary))
