"""Post one article with Python's nntplib (3.12 and older), STARTTLS required, certificate checked.

How a careful script uses the standard library's NNTP client: connect
(``readermode``), ``starttls()`` with a default context that trusts only
``--cafile`` (it re-reads CAPABILITIES afterwards), ``login()`` when the
server offers AUTHINFO, one POST, QUIT.  On Python 3.13 and later, where
nntplib is gone, it says so and exits 2.  Any error is one line on stderr
and exit 1.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import warnings

with warnings.catch_warnings():  # "deprecated, removed in 3.13": known
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import nntplib
    except ImportError:  # Python 3.13+
        nntplib = None  # type: ignore[assignment]

ARTICLE = [
    b"From: sender <sender@localhost>",
    b"Newsgroups: harness.test",
    b"Subject: realworld nntplib",
    b"",
    b"One line posted by realworld/drivers/nntplib_post.py.",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    if nntplib is None:
        print("nntplib: not in this Python (removed in 3.13)", file=sys.stderr)
        return 2
    context = ssl.create_default_context(cafile=args.cafile)
    try:
        with nntplib.NNTP(
            args.host, args.port, readermode=True, usenetrc=False, timeout=args.timeout
        ) as news:
            news.starttls(context=context)  # raises when STARTTLS is not offered
            if "AUTHINFO" in news.getcapabilities():
                news.login("tester", "secret", usenetrc=False)
            news.post(ARTICLE)
    except (OSError, nntplib.NNTPError) as exc:
        print(f"nntplib: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
