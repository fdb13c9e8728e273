"""Real FTP servers for the real-software tier: ProFTPD (mod_tls), Pure-FTPd, vsftpd.

Each is started privately as root on a free 127.0.0.1 port with its own
configuration, password file, certificate and home directory under the run's
state directory, in the foreground (no systemd), and stopped by its pid.
The test user ``tester`` maps to the unprivileged uid 65534.

``python -m realworld.ftpservers`` starts them one after the other and runs
the server catalogue and the CCC scenarios against each, in-process, and
prints one line per scenario and TLS version; ``python -m realworld.run``
checks all three (:data:`DEFAULT_RUN`) with ``starttls-harness check
ftp://...`` against ``realworld/expected.json``.  vsftpd and Pure-FTPd have
no CCC: the return-to-plaintext scenarios are skipped for them, saying so
(CCC is not in their FEAT).  What was observed is written down in realworld/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from starttls_harness.dialects import DIALECTS, register
from starttls_harness.dialects.ftp import FTP
from starttls_harness.report.verdicts import Result
from starttls_harness.run.server import RunSettings, ServerTarget, run_server_target
from starttls_harness.scenarios.catalogue import everything, select
from starttls_harness.tls.certs import Pki, make_pki

from realworld.instances import (
    TEST_PASSWORD,
    TEST_USER,
    Instance,
    NotReady,
    free_port,
    wait_for_greeting,
)

__all__ = ["FTP_SERVERS", "ProFTPD", "PureFTPd", "Vsftpd", "ftp_installed", "main"]

#: Where realworld/install-ftp.sh unpacks Pure-FTPd and vsftpd: Debian's
#: packages of them conflict with proftpd-core (all provide ftp-server).
UNPACKED = Path("/opt/starttls-ftpservers")


def _binary(path: str) -> str:
    """``path`` if installed, else its copy under :data:`UNPACKED`."""
    unpacked = UNPACKED / path.lstrip("/")
    return path if os.path.exists(path) or not unpacked.exists() else str(unpacked)


PROFTPD = _binary("/usr/sbin/proftpd")
PURE_FTPD = _binary("/usr/sbin/pure-ftpd")
PURE_PW = _binary("/usr/bin/pure-pw")
VSFTPD = _binary("/usr/sbin/vsftpd")
FTP_UID = 65534


def _crypt(password: str) -> str:
    out = subprocess.run(
        ["openssl", "passwd", "-6", password], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def _version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


@dataclass
class _Foreground(Instance):
    """A server run in the foreground by us; stopped by its process."""

    process: Optional[subprocess.Popen[bytes]] = None
    #: The test user can log in (vsftpd: only system users through PAM, so no).
    has_test_user = True

    def __post_init__(self) -> None:
        self.home = self.root / "home"
        self.log = self.root / "server.log"

    def argv(self) -> List[str]:
        raise NotImplementedError

    def _home(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        os.chown(self.home, FTP_UID, FTP_UID)

    def start(self, timeout: float) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        self.started = True
        proc = self.process
        wait_for_greeting(self.host, self.port, b"220", timeout, alive=lambda: proc.poll() is None)

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def storage_probe_command(self) -> str:
        """:meth:`stored` as a command line (for ``check --storage-probe``)."""
        code = "import os,sys; print(len(os.listdir(sys.argv[1])))"
        return shlex.join([sys.executable, "-c", code, str(self.home)])

    def stored(self) -> int:
        """Entries made in the test user's home (a directory made counts)."""
        try:
            return len(os.listdir(self.home))
        except OSError:
            return 0


@dataclass
class ProFTPD(_Foreground):
    """``proftpd -n -c FILE`` with mod_tls; CCC supported (and listed in FEAT)."""

    def version(self) -> str:
        return _version([PROFTPD, "-v"])

    def configure(self, pki: Pki) -> None:
        assert pki.certfile is not None and pki.keyfile is not None
        self._home()
        passwd = self.root / "passwd"
        passwd.write_text(
            f"{TEST_USER}:{_crypt(TEST_PASSWORD)}:{FTP_UID}:{FTP_UID}::{self.home}:/bin/sh\n"
        )
        passwd.chmod(0o600)
        (self.root / "group").write_text(f"nogroup:x:{FTP_UID}:\n")
        r = self.root
        (r / "proftpd.conf").write_text(
            f"""ModulePath /usr/lib/proftpd
LoadModule mod_tls.c
ServerName "starttls-harness proftpd"
ServerType standalone
Port {self.port}
DefaultAddress {self.host}
SocketBindTight on
UseIPv6 off
User nobody
Group nogroup
PidFile {r}/proftpd.pid
ScoreboardFile {r}/scoreboard
DelayTable none
WtmpLog off
TransferLog {r}/xferlog
SystemLog {r}/proftpd.log
UseReverseDNS off
RequireValidShell off
AuthOrder mod_auth_file.c
AuthUserFile {passwd}
AuthGroupFile {r}/group
DefaultRoot ~
MaxInstances 64
<Directory ~>
  AllowOverwrite on
</Directory>
TLSEngine on
TLSLog {r}/tls.log
TLSProtocol TLSv1.2 TLSv1.3
TLSECCertificateFile {pki.certfile}
TLSECCertificateKeyFile {pki.keyfile}
TLSVerifyClient off
TLSRequired off
TLSOptions NoSessionReuseRequired
"""
        )

    def argv(self) -> List[str]:
        return [PROFTPD, "-n", "-c", str(self.root / "proftpd.conf")]


@dataclass
class PureFTPd(_Foreground):
    """``pure-ftpd`` with a PureDB user file and ``--tls=1``; CCC is not in its FEAT."""

    def version(self) -> str:
        return "Pure-FTPd 1.0.50 (Debian 12 package, unpacked)"

    def configure(self, pki: Pki) -> None:
        assert pki.certfile is not None and pki.keyfile is not None
        self._home()
        cert = self.root / "pure-ftpd.pem"  # key and chain in one file
        cert.write_bytes(pki.keyfile.read_bytes() + pki.certfile.read_bytes())
        cert.chmod(0o600)
        # The user line is written here with a SHA-512 crypt hash (as for ProFTPD), then
        # compiled with ``pure-pw mkdb``: ``pure-pw useradd`` hashes with Argon2id tuned
        # to about a second of CPU per login, and a catalogue run logs in dozens of times
        # at once, so on a shared 2-core machine logins outlasted the reply bound.
        passwd = self.root / "pureftpd.passwd"
        home = f"{self.home}/./"  # "/./": chrooted into the home
        fields = [TEST_USER, _crypt(TEST_PASSWORD), str(FTP_UID), str(FTP_UID), "", home]
        passwd.write_text(":".join(fields + [""] * 12) + "\n")
        passwd.chmod(0o600)
        subprocess.run(
            [PURE_PW, "mkdb", str(self.root / "pdb"), "-f", str(passwd)],
            capture_output=True,
            check=True,
        )

    def argv(self) -> List[str]:
        return [
            PURE_FTPD,
            f"--bind={self.host},{self.port}",
            f"--login=puredb:{self.root / 'pdb'}",
            "--tls=1",
            f"--certfile={self.root / 'pure-ftpd.pem'}",
            "--noanonymous",
            "--dontresolve",
            "--maxclientsnumber=64",
            "--maxclientsperip=64",
            f"--pidfile={self.root / 'pure-ftpd.pid'}",
        ]


@dataclass
class Vsftpd(_Foreground):
    """``vsftpd FILE`` (listen mode, in the foreground); it has no CCC at all.

    Its logins are system users through PAM: no test user is made, so the
    scenarios that need a login are skipped (CCC would be in any case).
    """

    has_test_user = False

    def version(self) -> str:
        return "vsftpd 3.0.3 (Debian 12 package, unpacked)"

    def configure(self, pki: Pki) -> None:
        assert pki.certfile is not None and pki.keyfile is not None
        self._home()
        empty = self.root / "empty"
        empty.mkdir(exist_ok=True)
        (self.root / "vsftpd.conf").write_text(
            f"""listen=YES
listen_ipv6=NO
listen_address={self.host}
listen_port={self.port}
background=NO
anonymous_enable=NO
local_enable=YES
write_enable=YES
pam_service_name=vsftpd
secure_chroot_dir={empty}
ssl_enable=YES
force_local_logins_ssl=NO
force_local_data_ssl=NO
ssl_tlsv1=YES
ssl_ciphers=HIGH
ssl_sslv2=NO
ssl_sslv3=NO
require_ssl_reuse=NO
rsa_cert_file={pki.certfile}
rsa_private_key_file={pki.keyfile}
vsftpd_log_file={self.root}/vsftpd.log
max_clients=64
max_per_ip=64
"""
        )

    def argv(self) -> List[str]:
        return [VSFTPD, str(self.root / "vsftpd.conf")]


#: name -> the instance class, in the order they are run.
FTP_SERVERS: Dict[str, type] = {"proftpd": ProFTPD, "pure-ftpd": PureFTPd, "vsftpd": Vsftpd}
_BINARIES = {"proftpd": PROFTPD, "pure-ftpd": PURE_FTPD, "vsftpd": VSFTPD}


#: The servers ``python -m realworld.run`` checks by default (all three).
#: Pure-FTPd was once left out as not reproducible: ``pure-pw useradd``'s
#: Argon2id hash made every login cost about a second of CPU, and dozens of
#: concurrent logins outlasted the reply bound; :meth:`PureFTPd.configure`
#: now writes a SHA-512 crypt hash instead.
DEFAULT_RUN = ("proftpd", "pure-ftpd", "vsftpd")


def ftp_installed() -> List[str]:
    """The default FTP servers realworld/install-ftp.sh has put in place, in run order."""
    return [n for n in DEFAULT_RUN if os.access(_BINARIES[n], os.X_OK)]


async def check(
    instance: _Foreground, pki: Pki, settings: RunSettings, only: Optional[List[str]] = None
) -> List[Result]:
    """The server catalogue and the CCC scenarios against one running instance."""
    if "ftp" not in DIALECTS:
        register(FTP)
    target = ServerTarget(
        dialect="ftp",
        host=instance.host,
        port=instance.port,
        cafile=pki.cafile,
        server_hostname="localhost",
        user=TEST_USER if instance.has_test_user else None,
        password=TEST_PASSWORD if instance.has_test_user else None,
        storage_count=instance.stored,
    )
    scenarios = select(only, role="server", dialect="ftp", catalogue=everything())
    return await run_server_target(scenarios, target, settings)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", action="append", choices=sorted(FTP_SERVERS))
    parser.add_argument("--start-timeout", type=float, default=20.0)
    parser.add_argument("--only", action="append", help="scenario id glob (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="evidence of non-passes")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("realworld.ftpservers: the private instances are started as root", file=sys.stderr)
        return 2
    names = [n for n in (args.server or FTP_SERVERS) if os.path.exists(_BINARIES[n])]
    root = Path(tempfile.mkdtemp(prefix="starttls-ftp-"))
    root.chmod(0o755)
    pki = make_pki(directory=root / "pki")
    pki.write(root / "pki")
    settings = RunSettings(reply_timeout=5.0, scenario_timeout=20.0)
    status = 0
    try:
        for name in names:
            directory = root / name
            directory.mkdir()
            directory.chmod(0o755)
            instance: _Foreground = FTP_SERVERS[name](name, "ftp", directory, free_port())
            try:
                instance.configure(pki)
                instance.start(args.start_timeout)
                print(f"--- {name} ({instance.version()}) on {instance.url}", flush=True)
                results = asyncio.run(check(instance, pki, settings, args.only))
            except (NotReady, OSError, subprocess.SubprocessError) as exc:
                tail = instance.log_tail()
                print(f"realworld.ftpservers: {name}: {exc}\n{tail}", file=sys.stderr)
                status = 2
                continue
            finally:
                instance.stop()
            for r in sorted(results, key=lambda r: (r.id, r.tls_version)):
                print(f"{name} {r.id} TLS {r.tls_version}: {r.verdict.value} -- {r.summary}")
                if args.verbose and r.verdict.value != "pass":
                    for e in r.evidence.exchanges:
                        print(f"    {e.direction} {e.kind} {e.data[:90]!r} {e.note}")
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(root)
    return status


if __name__ == "__main__":
    sys.exit(main())
