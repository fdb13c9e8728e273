"""One PostgreSQL session with psycopg 3: TLS required, certificate checked, one query.

libpq (the one psycopg's wheel bundles, or the system's) does the SSLRequest
and the handshake; ``sslmode=verify-full`` is ``require`` plus the CA given
as ``--cafile`` and the name ``--hostname`` (``hostaddr`` is the address
dialled), so nothing leaves in plaintext and a wrong certificate is refused.
Autocommit and a client-side-binding cursor make psycopg send one simple
query (``Q``, no extended protocol, no BEGIN): an INSERT, the unit the
truncation scenario cuts.  Any error is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import sys

import psycopg  # type: ignore[import-untyped, import-not-found, unused-ignore]

USER = "tester"
PASSWORD = "secret"
TABLE = "starttls_harness"


def conninfo(host: str, hostname: str, port: int, cafile: str, sslmode: str, timeout: int) -> str:
    """The libpq connection string: every value the session depends on, nothing from the env."""
    return (
        f"hostaddr={host} host={hostname} port={port} sslmode={sslmode} "
        f"sslrootcert={cafile} user={USER} password={PASSWORD} dbname=postgres "
        f"connect_timeout={timeout}"
    )


def session(info: str) -> None:
    with psycopg.connect(info, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        conn.execute(f"INSERT INTO {TABLE} VALUES ('sent by psycopg')")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True, help="the address dialled (libpq hostaddr)")
    parser.add_argument("--hostname", default="localhost", help="the certificate's name")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--sslmode", default="verify-full", choices=["require", "verify-full"])
    # libpq's bound on the connection (TCP, SSLRequest, handshake, login).
    parser.add_argument("--timeout", type=int, default=10)
    args = parser.parse_args()
    info = conninfo(args.host, args.hostname, args.port, args.cafile, args.sslmode, args.timeout)
    try:
        session(info)
    except (psycopg.Error, OSError) as exc:
        print(f"psycopg: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
