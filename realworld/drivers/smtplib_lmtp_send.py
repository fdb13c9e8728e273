"""Deliver one message with Python's smtplib.LMTP, STARTTLS required, certificate checked.

How a careful script uses the standard library's LMTP client: LHLO
(``ehlo()`` says LHLO in :class:`smtplib.LMTP`), ``starttls()`` with a
default context that trusts only ``--cafile``, LHLO again, one message to
one local recipient, QUIT.  LMTP has no login.  Any error is one line on
stderr and exit 1.
"""

from __future__ import annotations

import argparse
import smtplib
import ssl
import sys

MESSAGE = (
    "From: sender@localhost\r\nTo: tester@localhost\r\nSubject: realworld smtplib.LMTP\r\n"
    "\r\nOne line delivered by realworld/drivers/smtplib_lmtp_send.py.\r\n"
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
        with smtplib.LMTP(
            args.host, args.port, local_hostname="localhost", timeout=args.timeout
        ) as lmtp:
            lmtp.ehlo()
            lmtp.starttls(context=context)  # raises when STARTTLS is not offered
            lmtp.ehlo()
            lmtp.sendmail("sender@localhost", ["tester@localhost"], MESSAGE)
    except (OSError, smtplib.SMTPException) as exc:
        print(f"smtplib.LMTP: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
