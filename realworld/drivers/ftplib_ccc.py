"""Log in with ftplib.FTP_TLS, clear the control channel (CCC), make a directory.

``auth()`` (AUTH TLS) with a default context that trusts only ``--cafile``
(hostname checking on), login, ``prot_p()`` (PBSZ 0, PROT P), FEAT, ``ccc()``
when FEAT lists it
(CCC, then ``SSLSocket.unwrap()``: ftplib sends its close_notify at once and
waits for the server's), ``MKD`` in plaintext, QUIT.  No data connection is
opened.  Any error is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import ftplib
import ssl
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    context = ssl.create_default_context(cafile=args.cafile)
    try:
        ftp = ftplib.FTP_TLS(context=context, timeout=args.timeout)
        try:
            ftp.connect(args.host, args.port)
            ftp.auth()
            ftp.login("tester", "secret")
            ftp.prot_p()
            if " CCC" in ftp.sendcmd("FEAT"):  # FEAT under TLS (RFC 2389)
                ftp.ccc()
            ftp.mkd("made-by-ftplib")
        except BaseException:
            with contextlib.suppress(OSError):
                ftp.close()
            raise
        ftp.quit()
    except (OSError, EOFError, ftplib.Error) as exc:
        print(f"ftplib: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
