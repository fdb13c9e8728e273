"""OpenLDAP ``slapd`` for the real-software tier: a private instance with StartTLS.

:class:`Slapd` is an :class:`~realworld.instances.Instance`: its own
``slapd.conf`` (core, cosine and inetorgperson schemas, one MDB database
``dc=example,dc=invalid`` under the state directory, the run's certificate),
started in the foreground with ``slapd -d 0 -h ldap://127.0.0.1:PORT/ -f
FILE`` (no systemd, no ``/etc/ldap``), stopped by its pid.  The test user is
the database's root DN ``cn=tester,dc=example,dc=invalid`` / ``correct
horse``; the base entry is loaded with ``slapadd`` before the start, so an
add under it can succeed and the storage probe (``slapcat``, the number of
entries) sees whether a cut AddRequest was stored (R6).

``python -m realworld.ldap`` starts it, runs the server catalogue against it
in-process and prints one line per scenario and TLS version (with
``--clients`` also the client catalogue against ``ldapsearch -ZZ`` and
Python's ``ldap3``, see :data:`CLIENTS`).  ``python -m realworld.run
--server slapd`` runs it as one of the tier's servers, compared with
``expected.json``.

slapd does not remove the TLS layer (RFC 4511 §4.14.3) and says nothing
about it in its root DSE: the removal scenarios are skipped, saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from starttls_harness.dialects.ldap import LDAP, split_ldap_reply
from starttls_harness.run.server import RunSettings, ServerTarget, run_server_target
from starttls_harness.scenarios.catalogue import everything, select
from starttls_harness.tls.certs import Pki, make_pki

from realworld.instances import (
    TEST_PASSWORD,
    Instance,
    NotReady,
    free_port,
    spawn_until_ready,
    stop_session,
)

__all__ = [
    "CLIENTS",
    "SLAPD",
    "SUFFIX",
    "TEST_DN",
    "Slapd",
    "count_entries",
    "main",
    "slapd_conf",
    "slapd_missing",
]

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SLAPCAT = "/usr/sbin/slapcat"
SCHEMAS = Path("/etc/ldap/schema")
MODULES = Path("/usr/lib/ldap")
SUFFIX = "dc=example,dc=invalid"
TEST_DN = f"cn=tester,{SUFFIX}"

#: Client programs of ``--clients``: name -> argv for ``check-client`` ({host},
#: {port}, {cafile} are filled in by the harness).
CLIENTS: Dict[str, List[str]] = {
    "ldapsearch": [
        "env",
        "LDAPTLS_CACERT={cafile}",
        "LDAPTLS_REQCERT=demand",
        "ldapsearch",
        "-ZZ",
        "-x",
        "-o",
        "nettimeout=5",
        "-H",
        # The IP, not a name: libldap checks the certificate against the reverse
        # lookup of "localhost" (this machine's name), not the name given.
        "ldap://{host}:{port}/",
        "-D",
        TEST_DN,
        "-w",
        TEST_PASSWORD,
        "-b",
        "",
        "-s",
        "base",
    ],
    "ldap3": [
        sys.executable,
        str(Path(__file__).resolve().parent / "drivers" / "ldap3_client.py"),
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--cafile",
        "{cafile}",
    ],
}


def slapd_missing() -> List[str]:
    """slapd's programs that are not installed (``realworld/install-ldap.sh`` installs them)."""
    return [b for b in (SLAPD, SLAPADD, SLAPCAT) if not os.access(b, os.X_OK)]


def slapd_conf(root: Path, pki: Pki) -> str:
    """A complete slapd.conf of the private instance (nothing from /etc/ldap but schemas)."""
    password = TEST_PASSWORD.replace('"', "")
    return f"""\
include {SCHEMAS}/core.schema
include {SCHEMAS}/cosine.schema
include {SCHEMAS}/inetorgperson.schema
pidfile {root}/slapd.pid
argsfile {root}/slapd.args
modulepath {MODULES}
moduleload back_mdb
TLSCACertificateFile {pki.cafile}
TLSCertificateFile {pki.certfile}
TLSCertificateKeyFile {pki.keyfile}
database mdb
maxsize 10485760
suffix "{SUFFIX}"
rootdn "{TEST_DN}"
rootpw "{password}"
directory {root}/data
"""


_BASE_LDIF = f"""\
dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
o: starttls-harness
dc: example
"""


def _run(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def _root_dse_answered(host: str, port: int, timeout: float) -> bool:
    """Whether the server answers a root DSE search (an LDAP server never greets)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(LDAP.hello())
            data = b""
            while True:
                reply, _rest = split_ldap_reply(data)
                if reply is not None:
                    return reply.ok
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False


@dataclass
class Slapd(Instance):
    """``slapd -d 0 -f STATE/slapd.conf``: a foreground slapd we own."""

    process: Optional[subprocess.Popen[bytes]] = None

    def __post_init__(self) -> None:
        self.conf = self.root / "slapd.conf"
        self.log = self.root / "slapd.log"

    def version(self) -> str:
        out = _run([SLAPD, "-VV"])
        words = (out.stdout + out.stderr).split()
        return next((w for w in words if w[:1].isdigit() and "." in w), "unknown").split("+")[0]

    def configure(self, pki: Pki) -> None:
        assert pki.cafile and pki.certfile and pki.keyfile
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(slapd_conf(self.root, pki))
        ldif = self.root / "base.ldif"
        ldif.write_text(_BASE_LDIF)
        done = _run([SLAPADD, "-f", str(self.conf), "-l", str(ldif)])
        if done.returncode != 0:
            raise NotReady(f"slapadd failed: {done.stderr.strip()[-300:]}")

    def start(self, timeout: float) -> None:
        self.process = spawn_until_ready(
            [SLAPD, "-d", "0", "-h", f"ldap://{self.host}:{self.port}/", "-f", str(self.conf)],
            self.log,
            lambda: _root_dse_answered(self.host, self.port, 1.0),
            "slapd",
            timeout,
            self.log_tail,
        )
        self.started = True

    def stop(self, timeout: float = 10.0) -> None:
        self.started = False
        stop_session(self.process, timeout)

    def stored(self) -> int:
        """The number of entries in the database (``slapcat``)."""
        done = _run([SLAPCAT, "-f", str(self.conf), "-b", SUFFIX])
        return sum(1 for line in done.stdout.splitlines() if line.startswith("dn:"))

    def storage_probe_command(self) -> str:
        call = f"count_entries({str(self.conf)!r})"
        script = f"from realworld.ldap import count_entries; {call}"
        return shlex.join([sys.executable, "-c", script])

    def check_arguments(self) -> List[str]:
        """What ``check`` needs beyond the URL (the test user's DN)."""
        return ["--user", TEST_DN, "--password", TEST_PASSWORD]


def count_entries(conf: str) -> None:
    """Print the number of entries (the storage probe as a command)."""
    done = _run([SLAPCAT, "-f", conf, "-b", SUFFIX])
    print(sum(1 for line in done.stdout.splitlines() if line.startswith("dn:")))


async def _server_catalogue(slapd: Slapd, pki: Pki, versions: Sequence[str]) -> List[str]:
    target = ServerTarget(
        dialect="ldap",
        host=slapd.host,
        port=slapd.port,
        tls_versions=tuple(versions),
        cafile=pki.cafile,
        server_hostname="localhost",
        user=TEST_DN,
        password=TEST_PASSWORD,
        storage_count=slapd.stored,
    )
    scenarios = select(role="server", dialect="ldap", catalogue=everything())
    results = await run_server_target(scenarios, target, RunSettings(reply_timeout=3.0))
    return [f"{r.id:38} {r.tls_version}  {r.verdict.value.upper():5}  {r.summary}" for r in results]


def _client_catalogue(name: str, argv: Sequence[str], versions: Sequence[str]) -> str:
    cmd = [sys.executable, "-m", "starttls_harness", "check-client", "--protocol", "ldap"]
    for version in versions:
        cmd += ["--tls-version", version]
    done = _run([*cmd, "--", *argv], timeout=600)
    return f"--- {name} (exit {done.returncode})\n{done.stdout}{done.stderr}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m realworld.ldap", description=__doc__)
    parser.add_argument("--tls-version", choices=("1.2", "1.3"), action="append")
    parser.add_argument("--clients", action="store_true", help="also ldapsearch and ldap3")
    parser.add_argument("--keep", action="store_true", help="keep the state directory")
    args = parser.parse_args(argv)
    versions = args.tls_version or ["1.2", "1.3"]
    if not os.access(SLAPD, os.X_OK):
        print("realworld.ldap: no slapd; run 'bash realworld/install-ldap.sh'", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="starttls-slapd-"))
    slapd = Slapd("slapd", "ldap", root, free_port())
    try:
        pki = make_pki(directory=root / "pki")
        slapd.configure(pki)
        slapd.start(20.0)
        print(f"slapd {slapd.version()} on {slapd.url}", flush=True)
        for line in asyncio.run(_server_catalogue(slapd, pki, versions)):
            print(line, flush=True)
    except (NotReady, OSError, subprocess.SubprocessError) as exc:
        print(f"realworld.ldap: {exc}", file=sys.stderr)
        return 2
    finally:
        slapd.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.clients:
        for name, client in CLIENTS.items():
            print(_client_catalogue(name, client, versions), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
