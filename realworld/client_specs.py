"""The real clients of the client tier and how to start each for ``check-client``.

One :class:`ClientSpec` per client and dialect: its command line (with the
``{host}``, ``{port}``, ``{cafile}``, ``{hostname}`` placeholders of
``check-client``), how to read its version, and the programs it needs.
:mod:`realworld.clients` runs them and compares their verdicts.
"""

from __future__ import annotations

import functools
import json
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from realworld.ldap import CLIENTS as LDAP_CLIENTS
from realworld.postgres import psql_argv, psql_version

__all__ = ["CLIENTS", "DRIVERS", "NPM_PACKAGES", "ClientSpec", "Paths", "npm_installed_version"]

DRIVERS = Path(__file__).resolve().parent / "drivers"

#: npm packages the tier installs, pinned: a new release is a decision, not a drift.
NPM_PACKAGES = {"imapflow": "2.10.2", "nodemailer": "10.6.0"}


def npm_installed_version(npm_dir: Path, package: str) -> Optional[str]:
    manifest = npm_dir / "node_modules" / package / "package.json"
    try:
        version = json.loads(manifest.read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        return None
    return str(version) if version else None


@dataclass(frozen=True)
class Paths:
    """Where one run keeps what the client commands need."""

    message: Path
    npm_dir: Path
    python: str = sys.executable


def _curl_smtp(p: Paths) -> List[str]:
    # The URL path is the EHLO name; --ssl-reqd makes STARTTLS mandatory.
    return [
        "curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", "{cafile}",
        "--max-time", "15", "--user", "tester:secret",
        "--mail-from", "sender@localhost", "--mail-rcpt", "rcpt@localhost",
        "--upload-file", str(p.message), "smtp://{host}:{port}/localhost",
    ]  # fmt: skip


def _curl_imap(p: Paths) -> List[str]:
    # An upload to an IMAP mailbox URL is an APPEND.
    return [
        "curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", "{cafile}",
        "--max-time", "15", "--user", "tester:secret",
        "--upload-file", str(p.message), "imap://{host}:{port}/INBOX",
    ]  # fmt: skip


def _curl_pop3(p: Paths) -> List[str]:
    # A POP3 URL without a message number is a LIST; --ssl-reqd makes STLS mandatory.
    return [
        "curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", "{cafile}",
        "--max-time", "15", "--user", "tester:secret", "pop3://{host}:{port}/",
    ]  # fmt: skip


def _curl_ftp(mode: str) -> Callable[[Paths], List[str]]:
    # AUTH TLS required, CCC after the login in curl's passive (its default) or
    # active mode; MKD by --quote after the login, -I so no data connection opens.
    def argv(p: Paths) -> List[str]:
        return [
            "curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", "{cafile}",
            "--max-time", "15", "--user", "tester:secret", "--ftp-ssl-ccc",
            "--ftp-ssl-ccc-mode", mode, "--quote", "MKD made-by-curl", "-I",
            "ftp://{host}:{port}/",
        ]  # fmt: skip

    return argv


def _msmtp(p: Paths) -> List[str]:
    # msmtp reads the message on stdin, and check-client gives clients /dev/null:
    # sh redirects it from the file and execs msmtp (values passed as $1..$4).
    script = (
        'exec msmtp --file=/dev/null --host="$1" --port="$2" --tls=on --tls-starttls=on '
        '--tls-trust-file="$3" --auth=on --user=tester --passwordeval="echo secret" '
        '--domain=localhost --timeout=10 --from=sender@localhost -- rcpt@localhost <"$4"'
    )
    return ["sh", "-c", script, "msmtp", "{host}", "{port}", "{cafile}", str(p.message)]


def _python_driver(script: str) -> Callable[[Paths], List[str]]:
    def argv(p: Paths) -> List[str]:
        return [
            p.python, str(DRIVERS / script),
            "--host", "{host}", "--port", "{port}", "--cafile", "{cafile}",
        ]  # fmt: skip

    return argv


@functools.cache
def python_with(module: str) -> str:
    """An interpreter whose standard library has ``module`` (nntplib left it in 3.13).

    This one if it has it, else the first of Python 3.12..3.9 on PATH that does
    (Debian 12's ``/usr/bin/python3`` is 3.11); this one when none does.
    """
    candidates = [sys.executable, *(f"python3.{m}" for m in (12, 11, 10, 9)), "/usr/bin/python3"]
    for candidate in candidates:
        path = shutil.which(candidate)
        if path is None:
            continue
        code = f"import warnings; warnings.simplefilter('ignore'); import {module}"
        done = subprocess.run([path, "-c", code], capture_output=True, timeout=30, check=False)
        if done.returncode == 0:
            return path
    return sys.executable


def _nntplib(p: Paths) -> List[str]:
    return [python_with("nntplib"), *_python_driver("nntplib_post.py")(p)[1:]]


def _nntplib_version(p: Paths) -> str:
    return _python_version(Paths(p.message, p.npm_dir, python_with("nntplib")))


def _node_driver(script: str) -> Callable[[Paths], List[str]]:
    def argv(p: Paths) -> List[str]:
        return ["node", str(DRIVERS / script), str(p.npm_dir), "{host}", "{port}", "{cafile}"]

    return argv


def _first_line_word(argv: Sequence[str], index: int) -> Callable[[Paths], str]:
    def version(p: Paths) -> str:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
        words = (done.stdout.splitlines() or [""])[0].split()
        return words[index] if len(words) > abs(index) else "?"

    return version


def _fetchmail_version(p: Paths) -> str:
    done = subprocess.run(
        ["fetchmail", "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    found = re.search(r"release (\d[\w.]*)", done.stdout + done.stderr)
    return found.group(1) if found else "?"


def _fetchmail(protocol: str) -> Callable[[Paths], List[str]]:
    def argv(p: Paths) -> List[str]:
        # {hostname}: fetchmail matches the certificate's CN/DNS names, not IP addresses.
        driver = str(DRIVERS / "fetchmail_fetch.sh")
        return ["sh", driver, "{hostname}", "{port}", "{cafile}", protocol]

    return argv


def _sieve_connect(p: Paths) -> List[str]:
    return ["sh", str(DRIVERS / "sieve_connect_upload.sh"), "{host}", "{port}", "{cafile}"]


def _sieve_connect_version(p: Paths) -> str:
    done = subprocess.run(
        ["sieve-connect", "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    found = re.search(r"(\d+\.\d[\w.]*)", done.stdout + done.stderr)
    return found.group(1) if found else "?"


def _psycopg(p: Paths) -> List[str]:
    # libpq's verify-full needs the certificate's name besides the address dialled.
    return [*_python_driver("psycopg_client.py")(p), "--hostname", "{hostname}"]


def _python_version(p: Paths) -> str:
    done = subprocess.run(
        [p.python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout.strip() or platform.python_version()


def _ldapsearch(p: Paths) -> List[str]:
    return list(LDAP_CLIENTS["ldapsearch"])  # realworld/ldap.py


def _ldapsearch_version(p: Paths) -> str:
    argv = ["ldapsearch", "-VV"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    found = re.search(r"ldapsearch (\d[\w.]*)", done.stdout + done.stderr)
    return found.group(1).split("+")[0] if found else "?"


def _pip_version(package: str) -> Callable[[Paths], str]:
    def version(p: Paths) -> str:
        code = f"import importlib.metadata as m; print(m.version({package!r}))"
        done = subprocess.run(
            [p.python, "-c", code], capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.strip() or "?"

    return version


def _npm_version(package: str) -> Callable[[Paths], str]:
    def version(p: Paths) -> str:
        return npm_installed_version(p.npm_dir, package) or "?"

    return version


@dataclass(frozen=True)
class ClientSpec:
    """One real client speaking one dialect, and how to start it for ``check-client``."""

    client: str
    dialect: str
    package: str
    argv: Callable[[Paths], List[str]]
    version: Callable[[Paths], str]
    needs: Tuple[str, ...] = ()
    npm: Tuple[str, ...] = field(default=())
    #: False only for a client that cannot be run with certificate checking
    #: against the harness's certificate; ``unchecked_why`` says why.
    checks_certificate: bool = True
    unchecked_why: str = ""

    @property
    def name(self) -> str:
        """The table's key: ``client/dialect``."""
        return f"{self.client}/{self.dialect}"


CLIENTS: Tuple[ClientSpec, ...] = (
    ClientSpec(
        "curl",
        "smtp",
        "curl (Debian)",
        _curl_smtp,
        _first_line_word(["curl", "--version"], 1),
        needs=("curl",),
    ),
    ClientSpec(
        "curl",
        "imap",
        "curl (Debian)",
        _curl_imap,
        _first_line_word(["curl", "--version"], 1),
        needs=("curl",),
    ),
    ClientSpec(
        "curl",
        "pop3",
        "curl (Debian)",
        _curl_pop3,
        _first_line_word(["curl", "--version"], 1),
        needs=("curl",),
    ),
    ClientSpec(
        "curl",
        "ftp",
        "curl (Debian), --ftp-ssl-ccc passive mode",
        _curl_ftp("passive"),
        _first_line_word(["curl", "--version"], 1),
        needs=("curl",),
    ),
    ClientSpec(
        "curl-ccc-active",
        "ftp",
        "curl (Debian), --ftp-ssl-ccc-mode active",
        _curl_ftp("active"),
        _first_line_word(["curl", "--version"], 1),
        needs=("curl",),
    ),
    ClientSpec(
        "ftplib",
        "ftp",
        "Python standard library",
        _python_driver("ftplib_ccc.py"),
        _python_version,
    ),
    ClientSpec(
        "poplib",
        "pop3",
        "Python standard library",
        _python_driver("poplib_fetch.py"),
        _python_version,
    ),
    ClientSpec(
        "msmtp",
        "smtp",
        "msmtp (Debian)",
        _msmtp,
        _first_line_word(["msmtp", "--version"], -1),
        needs=("msmtp", "sh"),
    ),
    ClientSpec(
        "smtplib",
        "smtp",
        "Python standard library",
        _python_driver("smtplib_send.py"),
        _python_version,
    ),
    ClientSpec(
        "imaplib",
        "imap",
        "Python standard library",
        _python_driver("imaplib_append.py"),
        _python_version,
    ),
    ClientSpec(
        "aiosmtplib",
        "smtp",
        "aiosmtplib (PyPI)",
        _python_driver("aiosmtplib_send.py"),
        _pip_version("aiosmtplib"),
    ),
    ClientSpec(
        "nodemailer",
        "smtp",
        "nodemailer (npm)",
        _node_driver("nodemailer_send.cjs"),
        _npm_version("nodemailer"),
        needs=("node",),
        npm=("nodemailer",),
    ),
    ClientSpec(
        "imapflow",
        "imap",
        "imapflow (npm)",
        _node_driver("imapflow_append.cjs"),
        _npm_version("imapflow"),
        needs=("node",),
        npm=("imapflow",),
    ),
    ClientSpec(
        "fetchmail",
        "imap",
        "fetchmail (Debian)",
        _fetchmail("IMAP"),
        _fetchmail_version,
        needs=("fetchmail", "sh"),
    ),
    ClientSpec(
        "fetchmail",
        "pop3",
        "fetchmail (Debian)",
        _fetchmail("POP3"),
        _fetchmail_version,
        needs=("fetchmail", "sh"),
    ),
    ClientSpec(
        "smtplib",
        "lmtp",
        "Python standard library (smtplib.LMTP)",
        _python_driver("smtplib_lmtp_send.py"),
        _python_version,
    ),
    ClientSpec(
        "nntplib",
        "nntp",
        "Python standard library (up to 3.12)",
        _nntplib,
        _nntplib_version,
    ),
    ClientSpec(
        "sieve-connect",
        "sieve",
        "sieve-connect (Debian)",
        _sieve_connect,
        _sieve_connect_version,
        needs=("sieve-connect", "sh"),
    ),
    ClientSpec(
        "ldapsearch",
        "ldap",
        "ldap-utils (Debian, OpenLDAP)",
        _ldapsearch,
        _ldapsearch_version,
        needs=("ldapsearch", "env"),
    ),
    ClientSpec(
        "ldap3",
        "ldap",
        "ldap3 (PyPI)",
        _python_driver("ldap3_client.py"),
        _pip_version("ldap3"),
    ),
    # libpq through psql (realworld/postgres.py).
    ClientSpec(
        "psql",
        "postgres",
        "postgresql-client-15 (Debian)",
        psql_argv,
        psql_version,
        needs=("psql", "env"),
    ),
    # psycopg 3 over the libpq of its binary wheel (tox's realworld env installs it).
    ClientSpec(
        "psycopg",
        "postgres",
        "psycopg[binary] (PyPI)",
        _psycopg,
        _pip_version("psycopg"),
    ),
    # slixmpp (realworld/drivers/slixmpp_send.py; tox's realworld env installs it).
    ClientSpec(
        "slixmpp",
        "xmpp",
        "slixmpp (PyPI)",
        _python_driver("slixmpp_send.py"),
        _pip_version("slixmpp"),
    ),
)
