"""What a failed sanity probe says about the target: one cause, one line.

The sanity probe (the conforming path: connect, hello, STARTTLS, the
handshake, a login when a test user is given, a sentinel) runs before each
TLS version's group of scenarios.  When it fails, the cause is almost
never the scenarios' business: the target is down, silent, not the named
protocol, offers no STARTTLS, fails the certificate check, refuses the
test user -- or does not offer that TLS version.  :func:`classify` turns
the probe's observation into a :class:`SanityProblem`:

* ``version`` -- the TLS version is not offered: that group is ``skip``;
* ``dead`` -- nothing usable answers at all (refused, silent): asked once
  per run, not once per TLS version and again after it;
* ``target`` -- reachable but unusable: reported once, at target level
  (:class:`TargetUnusable`, when the caller asks for it), instead of one
  identical ``error`` row per scenario.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

from starttls_harness.dialects import DIALECTS, Dialect, Reply, dialect_named
from starttls_harness.report.verdicts import Evidence
from starttls_harness.run.pacing import refusal

__all__ = ["NotOffered", "SanityProblem", "TargetUnusable", "classify"]

#: OpenSSL reasons that mean "not this protocol version" (not a broken handshake).
_VERSION_REASONS = (
    "PROTOCOL_VERSION",
    "UNSUPPORTED_PROTOCOL",
    "NO_PROTOCOLS_AVAILABLE",
    "VERSION_TOO_LOW",
    "VERSION_TOO_HIGH",
)
_CERTIFICATE_REASONS = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed")


class TargetUnusable(Exception):
    """The target cannot be tested at all; ``line`` says why, in one line.

    A command-line front end reports ``line`` once and exits with status 2
    (a usage/target problem, not a failed scenario).
    """

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


class NotOffered(str):
    """A sanity problem that only means: the target does not offer this TLS version."""


@dataclass(frozen=True)
class SanityProblem:
    """Why the conforming path does not work: ``kind`` is version, dead or target."""

    kind: str
    line: str


def _greets(dialect: Dialect, data: bytes) -> bool:
    """Is ``data`` a ready greeting of ``dialect``?

    Where the client speaks first (LDAP, PostgreSQL) there is no greeting:
    ``data`` must then be exactly one message of that dialect, which its
    parser delimits (twice the bytes are two messages), not junk it swallows.
    """
    try:
        reply, rest = dialect.split_reply(data, None)
        if reply is None:
            return False
        if dialect.server_greets:
            return dialect.greeting_ok(reply)
        again, after = dialect.split_reply(data + data, None)
    except Exception:  # bytes of another protocol may break any parser
        return False
    return not rest and again is not None and after == data and dialect.is_own_message(reply)


def _looks_like(dialect: str, data: bytes) -> Optional[str]:
    """The other registered dialect(s) whose greeting ``data`` is, in words.

    Several protocols greet alike (SMTP, LMTP and FTP with ``220``): a protocol
    the greeting names wins; a greeting the named dialect accepts too is only
    another protocol's when it names that one and not its own.
    """
    if not data:
        return None
    text = data.decode("latin-1").upper()
    alike = [n for n, d in sorted(DIALECTS.items()) if n != dialect and _greets(d, data)]
    named = [n for n in alike if n.upper() in text]
    if _greets(dialect_named(dialect), data):
        chosen = named if dialect.upper() not in text else []
    else:
        chosen = named or alike
    if not chosen:
        return None
    words = [n.upper() for n in chosen]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _received(evidence: Optional[Evidence]) -> bytes:
    """The first bytes the target sent, as recorded."""
    if evidence is None:
        return b""
    return next((e.data for e in evidence.exchanges if e.direction == "s2c" and e.data), b"")


def _one_line(text: str) -> str:
    """A multi-line reply or binary bytes on one printable line."""
    parts: List[str] = [p.strip() for p in text.splitlines() if p.strip()]
    joined = " / ".join(parts)
    return re.sub(r"[^\x20-\x7e]", "?", joined)


def classify(
    label: str,
    detail: str,
    *,
    dialect: str,
    url: str,
    tls_version: str,
    greeting: Optional[Reply],
    reply_timeout: float,
    evidence: Optional[Evidence] = None,
) -> SanityProblem:
    """The one-line cause of a sanity probe that ended in ``label`` (with ``detail``).

    ``evidence`` (the probe's) gives the bytes the target sent first: a target
    that greets like another protocol is named as such, whatever step failed.
    """
    problem = _classify(label, detail, dialect, url, tls_version, greeting, reply_timeout, evidence)
    return SanityProblem(problem.kind, _one_line(problem.line))


def _classify(
    label: str,
    detail: str,
    dialect: str,
    url: str,
    tls_version: str,
    greeting: Optional[Reply],
    reply_timeout: float,
    evidence: Optional[Evidence],
) -> SanityProblem:
    name = dialect_named(dialect).name.upper()
    if label == "refused":
        return SanityProblem("dead", detail or f"cannot connect to {url}")
    received = _received(evidence) or (greeting.raw if greeting is not None else b"")
    words = refusal(received) if received else None
    if words is not None:
        return SanityProblem(
            "target",
            f"{url} refused the connection for load ({words!r}); not a STARTTLS verdict: "
            "retry with --max-connections 1 and/or --rate",
        )
    if label == "unexpected-reply" and "login refused" in detail:
        # The login step was reached: the target speaks the named protocol.
        refused = detail.split("login refused:", 1)[-1].strip()
        return SanityProblem("target", f"the login was refused: {refused}")
    other = _looks_like(dialect, received)
    if label not in ("handshake-failed", "handshake-refused") and other is not None:
        shown = received.decode("latin-1").strip()[:80]
        return SanityProblem("target", f"{url} answers like {other}, not {name} ({shown!r})")
    if label == "timeout" and greeting is None:
        return SanityProblem(
            "dead",
            f"{url} accepted the connection but sent no {name} greeting within "
            f"{reply_timeout:g} s (a TLS-on-connect port? another protocol?)",
        )
    if label == "bad-greeting" and greeting is not None:
        return SanityProblem("target", f"{url} does not greet like {name}: {greeting.text[:80]!r}")
    if label == "no-starttls":
        return SanityProblem("target", f"{url} does not offer STARTTLS")
    if label == "starttls-refused":
        return SanityProblem("target", f"{url} refused STARTTLS: {detail}")
    if label in ("handshake-failed", "handshake-refused"):
        if any(reason in detail for reason in _VERSION_REASONS):
            return SanityProblem("version", f"target does not offer TLS {tls_version}")
        if any(reason in detail for reason in _CERTIFICATE_REASONS):
            return SanityProblem(
                "target",
                f"the certificate check failed ({detail}): check the CA file and host name",
            )
        return SanityProblem("target", f"{url}: {detail}")
    return SanityProblem("target", f"{url}: the conforming path does not work: {detail or label}")
