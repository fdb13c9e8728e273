"""Reference LMTP server: the reference SMTP sink, spoken as LMTP (RFC 2033).

:class:`ReferenceLMTP` puts aiosmtpd's :class:`aiosmtpd.lmtp.LMTP` (``LHLO``;
``EHLO`` and ``HELO`` refused with ``500``) under the reference SMTP
server's TLS switch (:class:`~starttls_harness.servers.smtp.ReferenceSMTP`):
``STARTTLS`` -> ``220`` on the harness engine with the hold gate (R1),
the ``STOPTLS`` test extension advertised in the ``LHLO`` answer only
inside TLS, the state reset after every transition (a new ``LHLO`` is
needed, R8), and after ``DATA`` one answer per recipient (RFC 2033 §4.2).

The behaviours are the SMTP server's (:data:`BEHAVIOURS`), each breaking
exactly one rule in the same way; see :mod:`starttls_harness.servers.smtp`.
"""

from __future__ import annotations

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import Envelope, syntax
from starttls_harness.servers.base import RunningServer, ServerConfig
from starttls_harness.servers.smtp import BEHAVIOURS, ReferenceSMTP
from starttls_harness.servers.smtp import start_server as start_smtp_server

__all__ = ["BEHAVIOURS", "IDENT", "ReferenceLMTP", "start_server"]

#: Software name in the greeting.
IDENT = "LMTP starttls-harness reference sink (never delivers)"


class ReferenceLMTP(ReferenceSMTP, LMTP):
    """The reference SMTP sink with aiosmtpd's LMTP commands.

    The method order is ReferenceSMTP, LMTP, SMTP: ``EHLO`` reaches LMTP's
    refusal, ``LHLO`` reaches SMTP's ``EHLO`` handling (and so the
    ``advertise`` hook that places STARTTLS/STOPTLS).
    """

    ident = IDENT

    @syntax("LHLO hostname")
    async def smtp_LHLO(self, arg: str) -> None:
        self.command_size_limits.clear()  # aiosmtpd adds to it on every hello
        await super().smtp_LHLO(arg)

    def data_reply(self, envelope: Envelope) -> str:
        """One answer per recipient: each was delivered to the sink."""
        rcpts = envelope.rcpt_tos or ["?"]
        return "\r\n".join(f"250 2.1.5 <{r}> OK: accepted by the sink" for r in rcpts)


async def start_server(config: ServerConfig) -> RunningServer:
    """Start the reference LMTP server described by ``config``."""
    return await start_smtp_server(config, ReferenceLMTP)
