"""LMTP (RFC 2033; STARTTLS as in SMTP, RFC 3207) as the harness speaks it, in every role.

LMTP is SMTP with ``LHLO`` instead of ``EHLO``/``HELO``, no ``HELO``
fallback, and one answer per accepted recipient after the message body.
Everything else -- the reply syntax, ``STARTTLS`` -> ``220``, the STOPTLS
test extension (an ``LHLO`` keyword, advertised only inside TLS), the
storage action (``MAIL``/``RCPT``/``DATA`` to one local recipient) -- is
SMTP's, so this module subclasses :mod:`~starttls_harness.dialects.smtp`
and states only the differences.  The harness always names one recipient,
so one answer follows a body (the scripted server's ``stored``).
"""

from __future__ import annotations

from typing import FrozenSet, Optional

from starttls_harness.dialects.base import Reply
from starttls_harness.dialects.roles import Command, ScriptedServer
from starttls_harness.dialects.smtp import _ScriptedSmtp, _Smtp

__all__ = ["LMTP"]


class _ScriptedLmtp(_ScriptedSmtp):
    """The scripted server's LMTP: SMTP's sink, greeted with ``LHLO``."""

    #: LMTP has no older hello to fall back to.
    retreat_verbs: FrozenSet[str] = frozenset()

    def parse(self, raw: bytes, tls: bool) -> Command:
        cmd = super().parse(raw, tls)
        if cmd.verb == "LHLO":
            return Command(cmd.raw, tls, "hello", cmd.verb, b"", cmd.rest)
        if cmd.verb in ("EHLO", "HELO"):  # not LMTP commands (RFC 2033 §4.1)
            return Command(cmd.raw, tls, "other", cmd.verb, b"", cmd.rest)
        return cmd

    def greeting(self) -> bytes:
        return b"220 fake.invalid LMTP starttls-harness\r\n"

    def simple(self, cmd: Command) -> bytes:
        if cmd.verb in ("EHLO", "HELO"):
            return b"500 5.5.1 Use LHLO\r\n"
        return super().simple(cmd)


class _Lmtp(_Smtp):
    name = "lmtp"
    default_port = 24
    url_scheme = "lmtp"
    server_module = "starttls_harness.servers.lmtp"
    client_module = "starttls_harness.clients.lmtp"

    def scripted_server(self) -> ScriptedServer:
        return _SCRIPTED

    def fake_greeting(self) -> bytes:
        return b"220 attacker.invalid LMTP injected greeting\r\n"

    def hello(self) -> bytes:
        return b"LHLO harness.invalid\r\n"

    def state_kept(self, after: str, reply: Reply) -> Optional[str]:
        kept = super().state_kept(after, reply)
        return kept.replace("EHLO", "LHLO") if kept else None


_SCRIPTED = _ScriptedLmtp()
LMTP = _Lmtp()
