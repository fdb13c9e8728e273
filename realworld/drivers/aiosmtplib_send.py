"""Send one message with aiosmtplib, STARTTLS required, certificate checked.

``start_tls=True`` makes aiosmtplib insist on STARTTLS (an error if the
server does not offer it); the TLS context trusts only ``--cafile`` and
checks the host name (the loopback IP is among the certificate's SANs).
Any error is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys

import aiosmtplib

MESSAGE = (
    "From: sender@localhost\r\nTo: rcpt@localhost\r\nSubject: realworld aiosmtplib\r\n"
    "\r\nOne line sent by realworld/drivers/aiosmtplib_send.py.\r\n"
)


async def send(host: str, port: int, cafile: str, timeout: float) -> None:
    context = ssl.create_default_context(cafile=cafile)
    smtp = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        start_tls=True,
        tls_context=context,
        local_hostname="localhost",
        timeout=timeout,
    )
    await smtp.connect()
    try:
        await smtp.login("tester", "secret")
        await smtp.sendmail("sender@localhost", ["rcpt@localhost"], MESSAGE)
        await smtp.quit()
    finally:
        smtp.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    try:
        asyncio.run(send(args.host, args.port, args.cafile, args.timeout))
    except (OSError, aiosmtplib.SMTPException) as exc:
        print(f"aiosmtplib: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
