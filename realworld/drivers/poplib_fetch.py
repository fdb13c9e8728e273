"""Read a POP3 maildrop with Python's poplib, STLS required, certificate checked.

CAPA, ``stls()`` with a default context that trusts only ``--cafile``
(hostname checking on; ``poplib.POP3.stls`` itself refuses a server whose
CAPA does not list STLS), USER/PASS, STAT, LIST, RETR of every message,
QUIT.  Any error is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import poplib
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
        pop = poplib.POP3(args.host, args.port, timeout=args.timeout)
        try:
            pop.stls(context=context)
            pop.user("tester")
            pop.pass_("secret")
            count, _ = pop.stat()
            pop.list()
            for number in range(1, count + 1):
                pop.retr(number)
        except BaseException:
            # The error to report is the one that got us here.
            with contextlib.suppress(OSError):
                pop.close()
            raise
        pop.quit()
    except (OSError, EOFError, poplib.error_proto) as exc:
        print(f"poplib: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
