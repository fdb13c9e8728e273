"""Reference LMTP client: the reference SMTP client, greeting with ``LHLO``.

LMTP (RFC 2033) differs from SMTP, for a client, in two places: the hello
is ``LHLO`` (no ``EHLO``/``HELO``), and after the message body the server
answers once per accepted recipient.  :class:`LMTPClient` is
:class:`~starttls_harness.clients.smtp.SMTPClient` with an aiosmtplib
command layer whose ``ehlo`` sends ``LHLO`` (so every "EHLO again" of the
closure rules -- R8 after STARTTLS and STOPTLS -- is an ``LHLO``), and a
``sendmail`` that reads the extra per-recipient answers.  The TLS switch,
the STOPTLS test extension and the behaviours (each breaking exactly one
rule) are the SMTP client's: see :mod:`starttls_harness.clients.smtp`.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Type, Union

import aiosmtplib
from aiosmtplib import SMTPHeloError, SMTPResponse, SMTPResponseException
from aiosmtplib.typing import Default
from starttls_harness.clients.smtp import BEHAVIOURS, SMTPClient, _PathDriver
from starttls_harness.clients.smtp import reference_session as smtp_session
from starttls_harness.dialects.roles import ClientOutcome, ClientSpec, PathDriver, SessionPlan

__all__ = ["BEHAVIOURS", "LMTPClient", "path_driver", "reference_session"]


def _dot_stuffed(raw: bytes) -> bytes:
    """The DATA body on the wire (RFC 5321 §4.5.2): CRLF lines, leading dots
    doubled, ended by ``.``; written here because aiosmtplib 4 (Python 3.9)
    does not export its own helper."""
    lines = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


class _LhloCommands(aiosmtplib.SMTP):
    """aiosmtplib's command layer with ``LHLO`` as its hello."""

    async def ehlo(
        self,
        *,
        hostname: Optional[str] = None,
        timeout: Union[float, Literal[Default.token], None] = Default.token,
    ) -> SMTPResponse:
        name = hostname or self.local_hostname or "client.invalid"
        response = await self.execute_command(b"LHLO", name.encode("ascii"), timeout=timeout)
        if response.code != 250:
            raise SMTPHeloError(response.code, response.message)
        self.last_ehlo_response = response
        return response


class LMTPClient(SMTPClient):
    """An LMTP client that can go to TLS and back, by the closure rules."""

    hello_verb = b"LHLO"
    command_layer: Type[aiosmtplib.SMTP] = _LhloCommands

    async def sendmail(
        self,
        sender: str,
        recipients: Union[str, Sequence[str]],
        message: Union[str, bytes],
        *,
        mail_options: Optional[Iterable[str]] = None,
    ) -> Tuple[Dict[str, SMTPResponse], str]:
        """One transaction; every accepted recipient gets its own answer (RFC 2033 §4.2).

        With one recipient that is aiosmtplib's ``sendmail``.  With more,
        the answers after the body are read by the closure's reply reader:
        aiosmtplib reads one reply per command and would leave the others
        unparsed in its buffer.
        """
        rcpts = [recipients] if isinstance(recipients, str) else list(recipients)
        if len(rcpts) == 1:
            return await super().sendmail(sender, rcpts, message, mail_options=mail_options)
        self._check_may_send("mail")
        if self.smtp.is_ehlo_or_helo_needed:
            await self.ehlo()
        options = b"".join(b" " + o.encode("ascii") for o in mail_options or ())
        answer = await self.execute_command(b"MAIL FROM:<" + sender.encode() + b">" + options)
        if answer.code != 250:
            raise SMTPResponseException(answer.code, answer.message)
        errors: Dict[str, SMTPResponse] = {}
        accepted: List[str] = []
        for rcpt in rcpts:
            answer = await self.execute_command(b"RCPT TO:<" + rcpt.encode() + b">")
            if answer.code in (250, 251):
                accepted.append(rcpt)
            else:
                errors[rcpt] = answer
        if not accepted:
            raise SMTPResponseException(550, f"every recipient was refused: {errors}")
        answer = await self.execute_command(b"DATA")
        if answer.code != 354:
            raise SMTPResponseException(answer.code, answer.message)
        raw = message.encode("utf-8") if isinstance(message, str) else message
        body = _dot_stuffed(raw)
        transport, protocol = self._connected()
        reader = protocol.start_reading_replies()
        try:
            transport.write(body)
            answers = [await self._guard(reader.next(self.timeout)) for _ in accepted]
        finally:
            protocol.stop_reading_replies()
        errors.update((r, a) for r, a in zip(accepted, answers) if a.code != 250)
        return errors, answers[0].message


def path_driver(spec: ClientSpec, behaviour: str, user: str, password: str) -> PathDriver:
    """The reference client as the path role's client under test."""
    return _PathDriver(spec, behaviour, LMTPClient)


async def reference_session(plan: SessionPlan) -> ClientOutcome:
    """The reference client's normal session against the scripted server."""
    return await smtp_session(plan, LMTPClient)
