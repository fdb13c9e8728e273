"""One LDAP session with Python's ldap3: StartTLS required, certificate checked.

``start_tls()`` before the bind (``AUTO_BIND_TLS_BEFORE_BIND``): ldap3 raises
if the upgrade fails, so no password leaves in plaintext.  The session reads
the root DSE, binds as the test user, adds one entry (the storage action)
and unbinds.  Any error is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import ssl
import sys

import ldap3  # type: ignore[import-untyped, import-not-found, unused-ignore]
from ldap3.core.exceptions import (  # type: ignore[import-untyped, import-not-found, unused-ignore]
    LDAPException,
)

DN = "cn=tester,dc=example,dc=invalid"
PASSWORD = "correct horse"


def session(host: str, port: int, cafile: str, timeout: float) -> None:
    # ldap3 matches names itself where ssl.match_hostname is gone (Python 3.12+),
    # and its fallback knows DNS names only: the certificate's DNS name is given.
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=cafile, valid_names=["localhost"])
    server = ldap3.Server(
        host, port=port, tls=tls, get_info=ldap3.NONE, connect_timeout=int(timeout)
    )
    conn = ldap3.Connection(
        server,
        user=DN,
        password=PASSWORD,
        auto_bind=ldap3.AUTO_BIND_TLS_BEFORE_BIND,
        receive_timeout=int(timeout),  # ldap3 packs it as an integer
        raise_exceptions=True,
    )
    try:
        conn.search("", "(objectClass=*)", ldap3.BASE, attributes=["supportedExtension"])
        conn.add(
            "cn=ldap3-client,dc=example,dc=invalid",
            ["document"],
            {"documentIdentifier": "ldap3", "description": "added by realworld"},
        )
    finally:
        conn.unbind()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", required=True)
    # Below the harness's reply bound: a client stuck on a glued reply gives up first.
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    try:
        session(args.host, args.port, args.cafile, args.timeout)
    except (LDAPException, OSError) as exc:
        print(f"ldap3: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
