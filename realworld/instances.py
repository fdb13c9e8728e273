"""Private Postfix and Dovecot instances on loopback, without systemd (INN: :mod:`realworld.inn`).

Each instance lives in its own directory under one state directory:
configuration, queue or runtime directories, logs, mail.  Nothing in
``/etc`` is read or written apart from the package's own files (Postfix's
``meta_directory``).  Both listen on 127.0.0.1 only, on ports the caller
picks, and present a certificate from a throwaway CA.

Postfix is a sink that never relays: no ``permit_mynetworks``, every
transport but ``virtual`` is ``error:``, and the only domain it accepts
(``localhost``) is delivered into one Maildir.  Dovecot has one
passwd-file user and refuses plaintext logins outside TLS.

Readiness is decided by a greeting on the port (bounded by a deadline),
never by a fixed sleep; :meth:`Instance.stop` is safe to call at any time,
also after a failed start.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Set, Tuple

from starttls_harness.tls.certs import Pki

from realworld.count_stored import count_stored

__all__ = [
    "MAIL_UID",
    "TEST_PASSWORD",
    "TEST_USER",
    "Dovecot",
    "DovecotService",
    "Instance",
    "NotReady",
    "Postfix",
    "dovecot_conf",
    "dovecot_pop3_sieve_conf",
    "free_port",
    "postfix_main_cf",
    "postfix_master_cf",
    "wait_for_greeting",
]

TEST_USER = "tester"
TEST_PASSWORD = "correct horse"
#: Unprivileged owner of the mailboxes (``nobody``): both servers refuse uid 0.
MAIL_UID = 65534

POSTFIX = "/usr/sbin/postfix"
DOVECOT = "/usr/sbin/dovecot"


class NotReady(Exception):
    """An instance did not greet within its bound; the message says why."""


#: Ports :func:`free_port` has handed out in this process.
_GIVEN: Set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS calls free right now (the server binds it moments later).

    Never the same one twice in a process: the instances are all made before
    any binds, and the OS once gave ProFTPD's port to vsftpd too, whose greeting
    wait was then answered by ProFTPD.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def wait_for_greeting(
    host: str,
    port: int,
    prefix: bytes,
    timeout: float,
    alive: Optional[Callable[[], bool]] = None,
) -> bytes:
    """Connect until the server greets with ``prefix``; bounded by ``timeout``.

    A refused connection is retried with a short, growing back-off (the
    listener may not be bound yet); ``alive()`` returning False (the server
    process died) ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    backoff = 0.02
    last = "no attempt"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise NotReady(f"{host}:{port} did not greet within {timeout:g} s ({last})")
        if alive is not None and not alive():
            raise NotReady(f"{host}:{port}: the server process exited ({last})")
        try:
            with socket.create_connection((host, port), timeout=left) as s:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                data = b""
                while b"\n" not in data:
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    data += chunk
            if data.startswith(prefix):
                return data
            last = f"greeting {data[:80]!r}"
        except OSError as exc:
            last = exc.strerror or str(exc)
        # Polling a port that is not bound yet: back off, bounded by the deadline.
        time.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
        backoff = min(backoff * 2, 0.25)


def spawn_until_ready(
    argv: Sequence[str],
    output: Path,
    ready: Callable[[], bool],
    what: str,
    timeout: float,
    log_tail: Callable[[], str],
) -> subprocess.Popen[bytes]:
    """Start a foreground server in a session of its own; return once ``ready()`` holds.

    ``ready`` asks the server's port for its first answer; until the port is
    bound there is no event to wait on, so it is polled (the delay doubling up
    to 0.25 s).  A server that exits, or is not ready within ``timeout``, is
    :class:`NotReady` (and, when still running, killed with its session).
    """
    with output.open("wb") as out:
        process = subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not ready():
        if process.poll() is not None:
            raise NotReady(f"{what} exited ({process.returncode}):\n{log_tail()}")
        if time.monotonic() >= deadline:
            stop_session(process, 1.0)
            raise NotReady(f"{what} did not answer within {timeout:g} s\n{log_tail()}")
        time.sleep(delay)  # polling a port that is not bound yet: no event to wait on
        delay = min(delay * 2, 0.25)
    return process


def stop_session(process: Optional[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM to a server started by :func:`spawn_until_ready` and its session; then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)


def _run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _alive_or_unknown(pid: Optional[int]) -> bool:
    """No pid file yet counts as alive (master writes it once it runs)."""
    return pid is None or _pid_alive(pid)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)  # waiting for another process to exit: no event to wait on
        delay = min(delay * 2, 0.2)
    return True


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _chown(path: Path, uid: int, gid: int) -> None:
    if os.geteuid() == 0:
        os.chown(path, uid, gid)


def _maildir(path: Path, uid: int, gid: int) -> Path:
    """An empty Maildir owned by the mail user."""
    for sub in ("", "new", "cur", "tmp"):
        d = path / sub
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
        _chown(d, uid, gid)
    return path


# ------------------------------------------------------------- configuration


def postfix_main_cf(
    *,
    queue: Path,
    data: Path,
    log: Path,
    mail_base: Path,
    certfile: Path,
    keyfile: Path,
    uid: int = MAIL_UID,
) -> str:
    """main.cf of a sink on loopback: TLS offered, nothing relayed, one Maildir."""
    return f"""\
# Private Postfix instance of the starttls-harness real-server tier.
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
maillog_file = {log}
maillog_file_prefixes = {log.parent}
mail_owner = postfix
setgid_group = postdrop

myhostname = localhost
mydomain = localdomain
myorigin = localhost
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtpd_banner = $myhostname ESMTP Postfix (starttls-harness realworld)
biff = no
append_dot_mydomain = no
smtputf8_enable = no
alias_maps =
alias_database =

# A sink: accept mail for localhost only, deliver it into one Maildir, relay nothing.
mydestination =
mynetworks = 127.0.0.1/32
relay_domains =
relayhost =
default_transport = error:this test instance relays nothing
relay_transport = error:this test instance relays nothing
local_transport = error:this test instance has no local users
virtual_mailbox_domains = localhost
virtual_mailbox_base = {mail_base}
virtual_mailbox_maps = static:sink/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{uid}
smtpd_relay_restrictions = reject_unauth_destination
smtpd_recipient_restrictions = reject_unauth_destination

# Require HELO/EHLO (off by default): then "MAIL without a new EHLO after
# STARTTLS" is refused exactly when the server reset its state, and the
# state-reset scenario observes the reset instead of the default leniency.
smtpd_helo_required = yes

# Loopback clients: no DNS for the peer name, no tarpit after errors.
smtpd_peername_lookup = no
smtpd_error_sleep_time = 0
smtpd_client_connection_count_limit = 0

smtpd_tls_security_level = may
smtpd_tls_cert_file = {certfile}
smtpd_tls_key_file = {keyfile}
smtpd_tls_loglevel = 1
smtpd_tls_session_cache_database =
"""


#: Only the services a sink needs; ``chroot`` is off (column 5) so no jail
#: has to be populated. The listener line is prepended by :func:`postfix_master_cf`.
_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_master_cf(port: int, host: str = "127.0.0.1") -> str:
    """master.cf: one smtpd on ``host:port`` and the internal services."""
    return (
        "# service type  private unpriv  chroot  wakeup  maxproc command\n"
        f"{host}:{port} inet n - n - - smtpd\n" + _MASTER_SERVICES
    )


def dovecot_conf(
    *,
    port: int,
    base_dir: Path,
    state_dir: Path,
    log: Path,
    passwd: Path,
    mail_root: Path,
    certfile: Path,
    keyfile: Path,
    host: str = "127.0.0.1",
    pop3_port: Optional[int] = None,
    sieve_port: Optional[int] = None,
    lmtp_port: Optional[int] = None,
) -> str:
    """A complete dovecot.conf: IMAP with STARTTLS on ``host:port``, one user.

    With ``pop3_port`` / ``sieve_port`` / ``lmtp_port`` also POP3 (STLS),
    ManageSieve and LMTP (STARTTLS) listeners of the same instance
    (:func:`dovecot_pop3_sieve_conf`).
    """
    extra = dovecot_pop3_sieve_conf(host, pop3_port, sieve_port, lmtp_port)
    protocols = " ".join(["imap", *extra[0]])
    return f"""\
# Private Dovecot instance of the starttls-harness real-server tier.
protocols = {protocols}
listen = {host}
base_dir = {base_dir}
state_dir = {state_dir}
instance_name = starttls-harness-realworld
log_path = {log}
info_log_path = {log}
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
login_greeting = Dovecot (starttls-harness realworld) ready.

ssl = yes
ssl_cert = <{certfile}
ssl_key = <{keyfile}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}
mail_location = maildir:{mail_root}/%u
first_valid_uid = 100
mail_max_userip_connections = 100

service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{extra[1]}"""


def dovecot_pop3_sieve_conf(
    host: str,
    pop3_port: Optional[int],
    sieve_port: Optional[int],
    lmtp_port: Optional[int] = None,
) -> Tuple[List[str], str]:
    """The protocols and blocks of the POP3, ManageSieve and LMTP listeners (none: empty).

    POP3 keeps ``disable_plaintext_auth`` (USER/AUTH refused before STLS);
    ManageSieve stores the user's scripts in ``~/sieve`` (the storage probe
    counts them, ``count_stored.py sieve``); LMTP (``dovecot-lmtpd``) offers
    STARTTLS from the global ``ssl = yes`` and delivers into the test user's
    Maildir (the storage probe of ``count_stored.py dovecot``).
    """
    protocols: List[str] = []
    blocks = ""
    if pop3_port is not None:
        protocols.append("pop3")
        blocks += f"""
service pop3-login {{
  inet_listener pop3 {{
    address = {host}
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""
    if sieve_port is not None:
        protocols.append("sieve")
        blocks += f"""
service managesieve-login {{
  inet_listener sieve {{
    address = {host}
    port = {sieve_port}
  }}
}}
plugin {{
  sieve = file:~/sieve;active=~/.dovecot.sieve
}}
"""
    if lmtp_port is not None:
        protocols.append("lmtp")
        blocks += f"""
service lmtp {{
  inet_listener lmtp {{
    address = {host}
    port = {lmtp_port}
  }}
}}
"""
    return protocols, blocks


# ------------------------------------------------------------------ instances


@dataclass
class Instance:
    """A server process tree we started and must stop."""

    name: str
    dialect: str
    root: Path
    port: int
    host: str = "127.0.0.1"
    log: Path = field(default_factory=Path)
    started: bool = False
    #: What ``check --rcpt`` names (LMTP: a local user; NNTP: the newsgroup).
    rcpt: str = "postmaster@localhost"

    @property
    def url(self) -> str:
        return f"{self.dialect}://{self.host}:{self.port}"

    def version(self) -> str:
        raise NotImplementedError

    def configure(self, pki: Pki) -> None:
        raise NotImplementedError

    def start(self, timeout: float) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def stored(self) -> int:
        """How many complete messages the instance holds (the storage probe)."""
        return count_stored(self.name, self.root)

    def storage_probe_command(self) -> str:
        """The same count as a command line (for ``check --storage-probe``)."""
        script = Path(__file__).resolve().parent / "count_stored.py"
        return shlex.join([sys.executable, str(script), self.name, str(self.root)])

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return f"({self.log}: no log)"
        return "\n".join(text[-lines:])


@dataclass
class Postfix(Instance):
    """``postfix -c DIR start`` with its own main.cf, master.cf, queue and data."""

    def __post_init__(self) -> None:
        self.conf = self.root / "conf"
        self.queue = self.root / "queue"
        self.data = self.root / "data"
        self.mail = self.root / "mail"
        self.log = self.root / "maillog"

    def version(self) -> str:
        out = _run(["/usr/sbin/postconf", "-d", "-h", "mail_version"], 10)
        return out.stdout.strip() or "unknown"

    def configure(self, pki: Pki) -> None:
        assert pki.certfile is not None and pki.keyfile is not None
        for d in (self.conf, self.queue, self.data, self.mail):
            d.mkdir(parents=True, exist_ok=True)
        postfix = pwd.getpwnam("postfix")
        self.queue.chmod(0o755)
        self.data.chmod(0o700)
        _chown(self.data, postfix.pw_uid, postfix.pw_gid)
        self.mail.chmod(0o755)
        _maildir(self.mail / "sink", MAIL_UID, MAIL_UID)
        (self.conf / "main.cf").write_text(
            postfix_main_cf(
                queue=self.queue,
                data=self.data,
                log=self.log,
                mail_base=self.mail,
                certfile=pki.certfile,
                keyfile=pki.keyfile,
            )
        )
        (self.conf / "master.cf").write_text(postfix_master_cf(self.port, self.host))

    def _postfix(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return _run([POSTFIX, "-c", str(self.conf), *args], timeout)

    def start(self, timeout: float) -> None:
        # "postfix start" creates the queue's subdirectories with the right
        # owners (post-install create-missing) and returns once master runs.
        done = self._postfix("start", timeout=timeout)
        self.started = True
        if done.returncode != 0:
            raise NotReady(
                f"postfix start exited {done.returncode}: {done.stderr.strip()}\n{self.log_tail()}"
            )
        pidfile = self.queue / "pid" / "master.pid"
        wait_for_greeting(
            self.host,
            self.port,
            b"220 ",
            timeout,
            alive=lambda: _alive_or_unknown(_read_pid(pidfile)),
        )

    def stop(self, timeout: float = 10.0) -> None:
        if not self.started:
            return
        pid = _read_pid(self.queue / "pid" / "master.pid")
        try:
            self._postfix("stop", timeout=timeout)
        except (OSError, subprocess.SubprocessError):
            pass  # the pid below still ends it
        if pid is not None and not _wait_gone(pid, timeout):
            # "postfix abort" is the documented hard stop; then the signal.
            try:
                self._postfix("abort", timeout=timeout)
            except (OSError, subprocess.SubprocessError):
                pass
            if not _wait_gone(pid, timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.started = False


@dataclass
class Dovecot(Instance):
    """``dovecot -F -c FILE``: a foreground master we own, stopped by its pid."""

    process: Optional[subprocess.Popen[bytes]] = None
    #: Ports of the POP3, ManageSieve and LMTP listeners (None: not configured).
    pop3_port: Optional[int] = None
    sieve_port: Optional[int] = None
    lmtp_port: Optional[int] = None

    def __post_init__(self) -> None:
        self.conf = self.root / "dovecot.conf"
        self.base_dir = self.root / "run"
        self.state_dir = self.root / "state"
        self.mail = self.root / "mail"
        self.passwd = self.root / "passwd"
        self.log = self.root / "dovecot.log"

    def version(self) -> str:
        out = _run([DOVECOT, "--version"], 10)
        return out.stdout.split(" ")[0].strip() or "unknown"

    def configure(self, pki: Pki) -> None:
        assert pki.certfile is not None and pki.keyfile is not None
        for d in (self.state_dir, self.mail):
            d.mkdir(parents=True, exist_ok=True)
        self.mail.chmod(0o755)
        home = self.mail / TEST_USER
        _maildir(home, MAIL_UID, MAIL_UID)
        # passwd-file: user:password:uid:gid:gecos:home:shell:extra
        self.passwd.write_text(
            f"{TEST_USER}:{{PLAIN}}{TEST_PASSWORD}:{MAIL_UID}:{MAIL_UID}::{home}::\n"
        )
        # Read by the auth process, which runs as the internal user.
        self.passwd.chmod(0o640)
        _chown(self.passwd, 0, grp.getgrnam("dovecot").gr_gid)
        self.conf.write_text(
            dovecot_conf(
                port=self.port,
                base_dir=self.base_dir,
                state_dir=self.state_dir,
                log=self.log,
                passwd=self.passwd,
                mail_root=self.mail,
                certfile=pki.certfile,
                keyfile=pki.keyfile,
                host=self.host,
                pop3_port=self.pop3_port,
                sieve_port=self.sieve_port,
                lmtp_port=self.lmtp_port,
            )
        )

    def start(self, timeout: float) -> None:
        check = _run([DOVECOT, "-c", str(self.conf), "-n"], timeout)
        if check.returncode != 0:
            raise NotReady(f"dovecot rejects its configuration: {check.stderr.strip()}")
        self.process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.root / "dovecot.stderr").open("wb"),
        )
        self.started = True
        process = self.process
        try:
            wait_for_greeting(
                self.host, self.port, b"* OK", timeout, alive=lambda: process.poll() is None
            )
        except NotReady as exc:
            err = (self.root / "dovecot.stderr").read_text(errors="replace").strip()
            raise NotReady(f"{exc}\n{err}\n{self.log_tail()}") from None

    def stop(self, timeout: float = 10.0) -> None:
        if not self.started:
            return
        process = self.process
        pid = process.pid if process is not None else _read_pid(self.base_dir / "master.pid")
        if pid is not None and _pid_alive(pid):
            # SIGTERM to the master: it stops its children and exits.
            os.kill(pid, signal.SIGTERM)
            if process is not None:
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout)
            elif not _wait_gone(pid, timeout):
                os.kill(pid, signal.SIGKILL)
        self.started = False


@dataclass
class DovecotService(Instance):
    """Another listener (POP3, ManageSieve, LMTP) of a :class:`Dovecot` instance.

    The master is configured, started and stopped by ``parent`` (which must
    come first in the run's list); this only waits for its greeting.
    ``probe_kind`` names the count of ``count_stored.py`` (empty: no storage
    probe -- POP3 cannot hand the server a message).
    """

    parent: Optional[Dovecot] = None
    greeting: bytes = b""
    probe_kind: str = ""

    def __post_init__(self) -> None:
        assert self.parent is not None
        self.root = self.parent.root
        self.log = self.parent.log

    def version(self) -> str:
        assert self.parent is not None
        return self.parent.version()

    def configure(self, pki: Pki) -> None:
        pass  # written by the parent's configure()

    def start(self, timeout: float) -> None:
        parent = self.parent
        assert parent is not None and parent.process is not None
        process = parent.process
        try:
            wait_for_greeting(
                self.host, self.port, self.greeting, timeout, alive=lambda: process.poll() is None
            )
        except NotReady as exc:
            raise NotReady(f"{exc}\n{self.log_tail()}") from None
        self.started = True

    def stop(self, timeout: float = 10.0) -> None:
        self.started = False  # the parent's stop() ends the master

    def stored(self) -> int:
        return count_stored(self.probe_kind, self.root) if self.probe_kind else 0

    def storage_probe_command(self) -> str:
        if not self.probe_kind:
            return ""
        script = Path(__file__).resolve().parent / "count_stored.py"
        return shlex.join([sys.executable, str(script), self.probe_kind, str(self.root)])


def remove_tree(path: Path) -> None:
    """Remove a state directory (mail, queue, keys) after a run."""
    shutil.rmtree(path, ignore_errors=True)


#: Dovecot's POP3, ManageSieve and LMTP daemons (dovecot-pop3d, -managesieved, -lmtpd).
DOVECOT_DAEMONS = ("/usr/lib/dovecot/pop3", "/usr/lib/dovecot/managesieve", "/usr/lib/dovecot/lmtp")
#: INN's reader daemon (inn2), run privately by :mod:`realworld.inn`.
NNRPD = "/usr/lib/news/bin/nnrpd"


def binaries_missing() -> List[str]:
    wanted = (POSTFIX, DOVECOT, *DOVECOT_DAEMONS, NNRPD)
    return [b for b in wanted if not os.access(b, os.X_OK)]
