"""Send one message with Python's smtplib, STARTTLS required, certificate checked.

The way a careful script uses the standard library: EHLO, ``starttls()``
with a default context that trusts only ``--cafile`` (hostname checking on:
the fake server's certificate has the loopback IP among its SANs), EHLO
again, AUTH, one message, QUIT.  Any error is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import smtplib
import ssl
import sys

MESSAGE = (
    "From: sender@localhost\r\nTo: rcpt@localhost\r\nSubject: realworld smtplib\r\n"
    "\r\nOne line sent by realworld/drivers/smtplib_send.py.\r\n"
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    context = ssl.create_default_context(cafile=args.cafile)
    try:
        with smtplib.SMTP(
            args.host, args.port, local_hostname="localhost", timeout=args.timeout
        ) as smtp:
            smtp.ehlo()
            smtp.starttls(context=context)  # raises when STARTTLS is not offered
            smtp.ehlo()
            smtp.login("tester", "secret")
            smtp.sendmail("sender@localhost", ["rcpt@localhost"], MESSAGE)
    except (OSError, smtplib.SMTPException) as exc:
        print(f"smtplib: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
