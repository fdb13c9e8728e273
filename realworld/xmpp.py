"""Prosody (XMPP, client-to-server) for the real-software tier: a private instance with STARTTLS.

:class:`Prosody` is an :class:`~realworld.instances.Instance`: a complete
configuration of its own (``prosody.cfg.lua`` in the state directory: data,
pid and log there; c2s on one loopback port, no direct-TLS port, no s2s, no
HTTP, no admin socket; ``c2s_require_encryption``; one ``VirtualHost
"localhost"`` with the run's certificate), started in the foreground
(``prosody --config FILE -F``) as the package's ``prosody`` user, never as
root and never through systemd, and stopped by its pid.  With s2s disabled
and only a local VirtualHost it has no reason to resolve a name (no SRV
lookups happen; the log says so when they do).  The test user
``tester``/``correct horse`` is made with ``prosodyctl register``.

``python -m realworld.xmpp`` starts it, runs the server catalogue against it
in-process and prints one line per scenario and TLS version.
``python -m realworld.run --server prosody`` runs it as one of the tier's
servers, compared with ``expected.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from starttls_harness.dialects.xmpp import XMPP
from starttls_harness.run.server import RunSettings, ServerTarget, run_server_target
from starttls_harness.scenarios.catalogue import everything, select
from starttls_harness.tls.certs import Pki, make_pki

from realworld.instances import (
    TEST_PASSWORD,
    TEST_USER,
    Instance,
    NotReady,
    free_port,
    spawn_until_ready,
    stop_session,
)

__all__ = [
    "PROSODY",
    "PROSODYCTL",
    "Prosody",
    "main",
    "prosody_conf",
    "prosody_missing",
]

PROSODY = "/usr/bin/prosody"
PROSODYCTL = "/usr/bin/prosodyctl"
#: The package's unprivileged user; the instance runs as it.
RUN_AS = "prosody"


def prosody_missing() -> List[str]:
    """Prosody's programs that are not installed (``realworld/install-xmpp.sh`` installs them)."""
    return [b for b in (PROSODY, PROSODYCTL) if not os.access(b, os.X_OK)]


def _lua(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def prosody_conf(root: Path, port: int, cert: Path, key: Path) -> str:
    """A complete prosody.cfg.lua of the private instance (nothing from /etc/prosody)."""
    return f"""\
pidfile = {_lua(str(root / "prosody.pid"))}
data_path = {_lua(str(root / "data"))}
certificates = {_lua(str(root / "certs"))}
log = {{ debug = {_lua(str(root / "prosody.log"))} }}
interfaces = {{ "127.0.0.1" }}
c2s_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{}}
s2s_ports = {{}}
http_ports = {{}}
https_ports = {{}}
modules_enabled = {{ "tls", "saslauth", "disco", "ping", "roster" }}
modules_disabled = {{ "s2s", "http", "admin_telnet", "admin_shell", "offline", "c2s_direct_tls" }}
c2s_require_encryption = true
authentication = "internal_plain"
storage = "internal"
VirtualHost "localhost"
    ssl = {{ certificate = {_lua(str(cert))}, key = {_lua(str(key))} }}
"""


def _run(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def _as_user(argv: Sequence[str]) -> List[str]:
    """``argv`` run as the prosody user when we are root (runuser), else as ourselves."""
    if os.geteuid() == 0:
        return ["runuser", "-u", RUN_AS, "--", *argv]
    return list(argv)


def _features_answered(host: str, port: int, timeout: float) -> bool:
    """Whether the server answers a stream header with its features (XMPP never greets)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(XMPP.hello())
            data = b""
            while len(data) < 65536:
                reply, _rest = XMPP.split_reply(data)
                if reply is not None:
                    return reply.key == "features"
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False
    return False


@dataclass
class Prosody(Instance):
    """``prosody --config STATE/prosody.cfg.lua -F`` as the prosody user: an instance we own."""

    process: Optional[subprocess.Popen[bytes]] = None

    def __post_init__(self) -> None:
        self.conf = self.root / "prosody.cfg.lua"
        self.log = self.root / "prosody.log"
        self.stdout = self.root / "prosody.stdout"

    def version(self) -> str:
        out = _run(["dpkg-query", "-W", "-f", "${Version}", "prosody"])
        return out.stdout.strip().split("-")[0] or "unknown"

    def configure(self, pki: Pki) -> None:
        assert pki.certfile and pki.keyfile
        for sub in ("data", "certs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        cert, key = self.root / "certs" / "localhost.crt", self.root / "certs" / "localhost.key"
        shutil.copyfile(pki.certfile, cert)
        shutil.copyfile(pki.keyfile, key)
        key.chmod(0o600)
        self.conf.write_text(prosody_conf(self.root, self.port, cert, key))
        if os.geteuid() == 0:  # the files belong to the user that runs the server
            entry = pwd.getpwnam(RUN_AS)
            for path in [self.root, *self.root.rglob("*")]:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        done = _run(
            _as_user(
                [PROSODYCTL, "--config", str(self.conf), "register", TEST_USER, "localhost",
                 TEST_PASSWORD]
            )
        )  # fmt: skip
        if done.returncode != 0:
            raise NotReady(f"prosodyctl register failed: {(done.stdout + done.stderr)[-300:]}")

    def start(self, timeout: float) -> None:
        self.process = spawn_until_ready(
            _as_user([PROSODY, "--config", str(self.conf), "-F"]),
            self.stdout,
            lambda: _features_answered(self.host, self.port, 1.0),
            "prosody",
            timeout,
            self.log_tail,
        )
        self.started = True

    def stop(self, timeout: float = 10.0) -> None:
        self.started = False
        stop_session(self.process, timeout)  # runuser and prosody: one session

    def storage_probe_command(self) -> str:
        return ""  # messages to an offline user are not kept (no mod_offline): nothing to count

    def check_arguments(self) -> List[str]:
        """What ``check`` needs beyond the URL: the recipient and the test user.

        The split injection used to be left out of the table: its separate
        segment was read with ``<starttls/>`` (answered in plaintext) or
        after the switch (a broken handshake) by timing.  It now leaves once
        ``<proceed/>`` has arrived (a declared segmentation, issue 14), so
        its verdict is the same every run.
        """
        return ["--rcpt", self.rcpt, "--user", TEST_USER, "--password", TEST_PASSWORD]

    def dns_queries(self) -> int:
        """Lines of the log that show a DNS lookup (there must be none)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return 0
        return sum(1 for line in text.splitlines() if "adns" in line or "SRV" in line)


async def _server_catalogue(server: Prosody, pki: Pki, versions: Sequence[str]) -> List[str]:
    target = ServerTarget(
        dialect="xmpp",
        host=server.host,
        port=server.port,
        tls_versions=tuple(versions),
        cafile=pki.cafile,
        server_hostname="localhost",
    )
    scenarios = select(role="server", dialect="xmpp", catalogue=everything())
    results = await run_server_target(scenarios, target, RunSettings(reply_timeout=3.0))
    return [f"{r.id:38} {r.tls_version}  {r.verdict.value.upper():5}  {r.summary}" for r in results]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m realworld.xmpp", description=__doc__)
    parser.add_argument("--tls-version", choices=("1.2", "1.3"), action="append")
    parser.add_argument("--keep", action="store_true", help="keep the state directory")
    args = parser.parse_args(argv)
    versions = args.tls_version or ["1.2", "1.3"]
    if prosody_missing():
        print("realworld.xmpp: no prosody; run 'bash realworld/install-xmpp.sh'", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="starttls-prosody-"))
    root.chmod(0o755)
    server = Prosody("prosody", "xmpp", root / "prosody", free_port())
    server.root.mkdir()
    try:
        pki = make_pki(directory=root / "pki")
        server.configure(pki)
        server.start(20.0)
        print(f"prosody {server.version()} on {server.url}", flush=True)
        for line in asyncio.run(_server_catalogue(server, pki, versions)):
            print(line, flush=True)
        print(f"DNS lookups in prosody's log: {server.dns_queries()}", flush=True)
    except (NotReady, OSError, KeyError, subprocess.SubprocessError) as exc:
        print(f"realworld.xmpp: {exc}", file=sys.stderr)
        return 2
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
