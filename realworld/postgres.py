"""A private PostgreSQL 15 instance on loopback, for the real-server tier (``postgres://``).

Debian's ``postgresql-15`` binaries, none of its clusters: ``initdb`` as the
``postgres`` user into the state directory, then ``pg_ctl start -w`` (its own
bounded wait for readiness, no fixed sleep), ``pg_ctl stop -m fast`` in
``finally``.  No systemd, nothing under ``/etc/postgresql`` is read or
written.

Configuration: ``listen_addresses = '127.0.0.1'`` on a free port,
``ssl = on`` with the harness's throwaway certificate, the Unix socket in
the state directory.  ``pg_hba.conf`` trusts the user ``postgres`` over
``hostssl`` only (the path tier's psql logs in as that user), asks every other
user for a password with ``scram-sha-256`` over ``hostssl``, refuses every
plaintext TCP session, and trusts the local socket (the storage probe).  The
test user ``tester`` (:data:`~realworld.instances.TEST_USER`) is a login role
with a SCRAM-SHA-256 password: ``python -m realworld.run`` checks with
``--user tester --password ...``, so every session start the harness makes is
a SCRAM login (:mod:`starttls_harness.dialects.pg_auth`).

The storage probe: the harness's truncated unit is an ``INSERT INTO
starttls_harness VALUES (...)`` cut by a FIN; the table exists and
:meth:`PostgreSQL.stored` counts its rows (``psql`` on the Unix socket).
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from starttls_harness.tls.certs import Pki

from realworld.instances import TEST_PASSWORD, TEST_USER, Instance, NotReady

__all__ = [
    "PG_USER",
    "PSQL_PATH_ARGV",
    "PostgreSQL",
    "pg_bindir",
    "postgres_missing",
    "psql_argv",
    "psql_version",
]

#: The system user the server runs as (it refuses root).
PG_USER = "postgres"
TABLE = "starttls_harness"


def pg_bindir() -> Optional[Path]:
    """Debian's PostgreSQL 15 binaries (``/usr/lib/postgresql/15/bin``), if installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/15/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def postgres_missing() -> List[str]:
    """What the PostgreSQL instance needs and this machine lacks."""
    missing = []
    if pg_bindir() is None:
        missing.append("postgresql-15")
    if shutil.which("psql") is None:
        missing.append("psql")
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        missing.append(f"user {PG_USER}")
    return missing


def _as_postgres(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the postgres user (from root: runuser; else as ourselves)."""
    if os.geteuid() == 0:
        argv = ["runuser", "-u", PG_USER, "--", *argv]
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def hba_conf() -> str:
    return (
        "# starttls-harness: TLS-only TCP; the harness's user is trusted over TLS\n"
        "local   all  all                 trust\n"
        f"hostssl all  {PG_USER}  127.0.0.1/32  trust\n"
        f"hostssl all  {TEST_USER}    127.0.0.1/32  scram-sha-256\n"
        "hostssl all  all       127.0.0.1/32  scram-sha-256\n"
        "host    all  all       0.0.0.0/0     reject\n"
    )


def server_conf(port: int, socket_dir: Path, log_dir: Path) -> str:
    return (
        "# starttls-harness: appended to initdb's postgresql.conf\n"
        "listen_addresses = '127.0.0.1'\n"
        f"port = {port}\n"
        f"unix_socket_directories = '{socket_dir}'\n"
        "ssl = on\n"
        "ssl_cert_file = 'server.crt'\n"
        "ssl_key_file = 'server.key'\n"
        "max_connections = 100\n"
        "logging_collector = off\n"
        "log_connections = on\n"
        "password_encryption = 'scram-sha-256'\n"
        "log_min_messages = info\n"
        f"# log: {log_dir}\n"
    )


@dataclass
class PostgreSQL(Instance):
    """``initdb`` + ``pg_ctl`` with a data directory of its own."""

    #: ``realworld.run`` checks it with ``--user``/``--password`` (a SCRAM login).
    has_test_user = True

    def __post_init__(self) -> None:
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.log = self.root / "postgresql.log"
        bindir = pg_bindir()
        self.bindir = bindir if bindir is not None else Path("/usr/lib/postgresql/15/bin")

    def version(self) -> str:
        done = subprocess.run(
            [str(self.bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        words = done.stdout.split()  # "postgres (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"
        return words[2] if len(words) > 2 else "?"

    def configure(self, pki: Pki) -> None:
        assert pki.certfile is not None and pki.keyfile is not None
        missing = postgres_missing()
        if missing:
            why = f"{', '.join(missing)} missing"
            raise NotReady(f"{why}: run 'bash realworld/install-postgres.sh'")
        owner = pwd.getpwnam(PG_USER)
        for d in (self.root, self.sockets):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, owner.pw_uid, owner.pw_gid)
        self.root.chmod(0o755)
        if self.data.exists():
            shutil.rmtree(self.data)
        done = _as_postgres(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", PG_USER],
            120,
        )
        if done.returncode != 0:
            raise NotReady(f"initdb failed: {done.stderr.strip()[-300:]}")
        for source, name in ((pki.certfile, "server.crt"), (pki.keyfile, "server.key")):
            target = self.data / name
            shutil.copyfile(source, target)
            target.chmod(0o600)
            os.chown(target, owner.pw_uid, owner.pw_gid)
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(server_conf(self.port, self.sockets, self.root))
        (self.data / "pg_hba.conf").write_text(hba_conf())
        self.log.touch()
        os.chown(self.log, owner.pw_uid, owner.pw_gid)

    def start(self, timeout: float) -> None:
        wait = str(max(1, int(timeout)))
        argv = [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log)]
        done = _as_postgres([*argv, "-w", "-t", wait, "start"], timeout + 30)
        self.started = True
        if done.returncode != 0:
            raise NotReady(f"pg_ctl start failed: {done.stdout.strip()} {self.log_tail(10)}")
        made = self._psql(f"CREATE TABLE {TABLE} (t text)")
        if made.returncode != 0:
            raise NotReady(f"cannot create the storage table: {made.stderr.strip()}")
        secret = TEST_PASSWORD.replace("'", "''")
        role = self._psql(
            f"CREATE ROLE {TEST_USER} LOGIN PASSWORD '{secret}'; "
            f"GRANT SELECT, INSERT ON {TABLE} TO {TEST_USER}"
        )
        if role.returncode != 0:
            raise NotReady(f"cannot make the test user: {role.stderr.strip()}")

    def stop(self, timeout: float = 10.0) -> None:
        if not self.started:
            return
        argv = [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast"]
        done = _as_postgres([*argv, "-w", "-t", str(int(timeout)), "stop"], timeout + 30)
        if done.returncode != 0:
            _as_postgres([*argv[:3], "-m", "immediate", "stop"], timeout + 30)
        self.started = False

    def _psql(self, sql: str) -> subprocess.CompletedProcess[str]:
        psql = shutil.which("psql") or "psql"
        argv = [psql, "-X", "-w", "-h", str(self.sockets), "-p", str(self.port), "-U", PG_USER]
        return _as_postgres([*argv, "-d", "postgres", "-tAc", sql], 60)

    def stored(self) -> int:
        done = self._psql(f"SELECT count(*) FROM {TABLE}")
        return int(done.stdout.strip() or "0") if done.returncode == 0 else -1

    def storage_probe_command(self) -> str:
        return shlex.join(
            [sys.executable, "-m", "realworld.postgres", "count", str(self.root), str(self.port)]
        )


# ---------------------------------------------------- psql as a real client


def psql_argv(paths: object) -> List[str]:
    """``psql`` (libpq) for ``check-client``: TLS required and the certificate checked
    (``verify-full``: ``require`` plus the CA and the name), a password from the
    environment if asked, one INSERT (the message the truncation cuts), then exit."""
    conninfo = (
        "hostaddr={host} host={hostname} port={port} sslmode=verify-full "
        "sslrootcert={cafile} user=tester dbname=postgres connect_timeout=10"
    )
    return [
        "env", "PGPASSWORD=secret", "psql", "-X", "-w", "-q", "-v", "ON_ERROR_STOP=1",
        conninfo, "-c", f"INSERT INTO {TABLE} VALUES ('sent by psql')",
    ]  # fmt: skip


#: psql for ``check-path`` (realworld/paths.py): the server's own user, TLS pinned to the
#: scenario's version, one INSERT of a long row (over two TLS records, for the truncation).
PSQL_PATH_ARGV = (
    "psql", "-X", "-w", "-q", "-v", "ON_ERROR_STOP=1",
    "hostaddr=127.0.0.1 host=localhost port={port} sslmode=verify-full sslrootcert={cafile} "
    "user=postgres dbname=postgres ssl_min_protocol_version=TLSv{tls_version} "
    "ssl_max_protocol_version=TLSv{tls_version} connect_timeout=10",
    "-c", f"INSERT INTO {TABLE} VALUES (repeat('x', 20000))",
)  # fmt: skip


def psql_version(paths: object) -> str:
    """``psql (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)`` -> ``15.20``."""
    psql = shutil.which("psql") or "psql"
    done = subprocess.run([psql, "--version"], capture_output=True, text=True, timeout=30)
    words = done.stdout.split()
    return words[2] if len(words) > 2 else "?"


def psycopg_argv(paths: object) -> List[str]:
    """psycopg 3 (libpq underneath) for ``check-client``: see :func:`psycopg_session`."""
    return [
        sys.executable, "-m", "realworld.postgres", "psycopg",
        "{host}", "{hostname}", "{port}", "{cafile}",
    ]  # fmt: skip


def psycopg_version(paths: object) -> str:
    code = "import psycopg; print(psycopg.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    return done.stdout.strip() or "?"


def psycopg_session(host: str, hostname: str, port: str, cafile: str) -> int:
    """One psycopg session: TLS required and verified, one INSERT; 0 on success.

    Autocommit and a client-side-binding cursor: psycopg then sends a simple
    query (``Q``), which the harness's scripted server answers (no extended
    protocol, no BEGIN)."""
    import psycopg  # type: ignore[import-not-found,unused-ignore]  # optional: when it runs

    conninfo = (
        f"hostaddr={host} host={hostname} port={port} sslmode=verify-full "
        f"sslrootcert={cafile} user=tester password=secret dbname=postgres connect_timeout=10"
    )
    try:
        with psycopg.connect(
            conninfo, autocommit=True, cursor_factory=psycopg.ClientCursor
        ) as conn:
            conn.execute(f"INSERT INTO {TABLE} VALUES ('sent by psycopg')")
    except psycopg.Error as exc:
        print(f"psycopg: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m realworld.postgres count ROOT PORT``: the rows of the storage table;
    ``... psycopg HOST HOSTNAME PORT CAFILE``: one psycopg client session."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 5 and args[0] == "psycopg":
        return psycopg_session(*args[1:])
    if len(args) != 3 or args[0] != "count":
        print("usage: python -m realworld.postgres count ROOT PORT", file=sys.stderr)
        return 2
    instance = PostgreSQL("postgresql", "postgres", Path(args[1]), int(args[2]))
    count = instance.stored()
    if count < 0:
        print("realworld.postgres: cannot count the stored rows", file=sys.stderr)
        return 1
    print(count)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
