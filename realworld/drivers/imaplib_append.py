"""APPEND one message with Python's imaplib, STARTTLS required, certificate checked.

CAPABILITY, ``starttls()`` with a default context that trusts only
``--cafile`` (hostname checking on), LOGIN, APPEND to INBOX, LOGOUT.
``imaplib.IMAP4.starttls`` itself refuses a server that does not list
STARTTLS.  Any error is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import imaplib
import ssl
import sys

MESSAGE = (
    b"From: sender@localhost\r\nTo: tester@localhost\r\nSubject: realworld imaplib\r\n"
    b"\r\nOne line appended by realworld/drivers/imaplib_append.py.\r\n"
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
        imap = imaplib.IMAP4(args.host, args.port, timeout=args.timeout)
        try:
            imap.starttls(ssl_context=context)
            imap.login("tester", "secret")
            typ, data = imap.append("INBOX", None, None, MESSAGE)
            if typ != "OK":
                raise imaplib.IMAP4.error(f"APPEND answered {typ} {data!r}")
        except BaseException:
            # imaplib may have closed the socket already (a failed handshake):
            # the error to report is the one that got us here.
            with contextlib.suppress(OSError):
                imap.shutdown()
            raise
        imap.logout()  # closes the connection itself
    except (OSError, imaplib.IMAP4.error) as exc:
        print(f"imaplib: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
