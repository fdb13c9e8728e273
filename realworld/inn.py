"""A private INN ``nnrpd`` on loopback: NNTP reader with STARTTLS, without innd or systemd.

``nnrpd -D -f -n -b 127.0.0.1 -p PORT`` runs as a standalone daemon (one
child per connection) as the ``news`` user, with its own ``inn.conf``
(``INNCONF``) whose every path points into the state directory: its own
``readers.conf`` (127.0.0.1 may read and post, no login), ``active`` file
with one group (``harness.test``), tradindexed overview (created empty by
``makehistory -O``), spool and run directories.  No ``innd`` runs: with
``spoolfirst: true`` nnrpd writes every accepted article into
``pathincoming`` (for an ``rnews -U`` that never comes), and those files are
the storage probe.  ``-n`` turns off the reverse lookup of the client's
address; ``domain`` is set, so nothing needs the resolver and no query
leaves the machine.  ``pathfilter`` is an empty directory (no Perl or Python
filter of the system's).  nnrpd logs only to syslog; without a syslog
daemon its messages are lost (the JSON report and evidence remain).
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from starttls_harness.dialects.nntp import NEWSGROUP
from starttls_harness.tls.certs import Pki

from realworld.instances import Instance, NotReady, stop_session, wait_for_greeting

__all__ = ["INN_BIN", "Inn", "inn_conf", "readers_conf"]

INN_BIN = Path("/usr/lib/news/bin")
NNRPD = INN_BIN / "nnrpd"
#: The package's inn.conf: the private one is it with the paths rewritten.
SYSTEM_INN_CONF = Path("/etc/news/inn.conf")


def inn_conf(template: str, settings: Dict[str, str]) -> str:
    """``template`` (an inn.conf) with each ``key:`` line set (or added) from ``settings``."""
    out = []
    done = set()
    for line in template.splitlines():
        found = re.match(r"^#?\s*([a-z0-9]+):", line)
        key = found.group(1) if found else None
        if key in settings:
            if key not in done:
                out.append(f"{key}: {settings[key]}")
                done.add(key)
            continue
        out.append(line)
    out += [f"{k}: {v}" for k, v in settings.items() if k not in done]
    return "\n".join(out) + "\n"


def readers_conf(host: str) -> str:
    """Read and post for ``host`` without a login; nothing for anyone else."""
    return f"""\
# Private nnrpd of the starttls-harness real-server tier.
auth "loopback" {{
    hosts: "{host}"
    default: "<loopback>"
}}
access "loopback" {{
    users: "<loopback>"
    newsgroups: "*"
    access: RP
}}
"""


@dataclass
class Inn(Instance):
    """``nnrpd`` as a standalone daemon we own (its process group is stopped)."""

    process: Optional[subprocess.Popen[bytes]] = None

    def __post_init__(self) -> None:
        self.etc = self.root / "etc"
        self.db = self.root / "db"
        self.spool = self.root / "spool"
        self.incoming = self.spool / "incoming"
        self.log = self.root / "nnrpd.stderr"

    def version(self) -> str:
        out = subprocess.run(
            [str(INN_BIN / "innconfval"), "-v"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            env=self._env(),
        )
        found = re.search(r"INN ([\d.]+)", out.stdout + out.stderr)
        return found.group(1) if found else "unknown"

    def _env(self) -> Dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "INNCONF": str(self.etc / "inn.conf")}

    def configure(self, pki: Pki) -> None:
        assert pki.certfile is not None and pki.keyfile is not None
        dirs = {
            "pathetc": self.etc,
            "pathdb": self.db,
            "pathrun": self.root / "run",
            "pathlog": self.root / "log",
            "pathspool": self.spool,
            "patharticles": self.spool / "articles",
            "pathoverview": self.spool / "overview",
            "pathincoming": self.incoming,
            "pathtmp": self.incoming / "tmp",
            "pathoutgoing": self.spool / "outgoing",
            "patharchive": self.spool / "archive",
            "pathhttp": self.root / "http",
            "pathfilter": self.root / "filter",
        }
        for d in [*dirs.values(), self.incoming / "bad"]:
            d.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) for k, v in dirs.items()}
        settings.update(
            {
                "domain": "localdomain",
                "pathhost": "localhost",
                "server": self.host,
                "port": str(self.port),
                "spoolfirst": "true",
                "readerswhenstopped": "true",
                # No refusal by load average (a busy CI machine would get "400 load at").
                "nnrpdloadlimit": "0",
                "enableoverview": "true",
                "ovmethod": "tradindexed",
                "nnrpdcheckart": "false",
                "doinnwatch": "false",
                "mta": "/bin/false",
                "tlscertfile": str(pki.certfile),
                # nnrpd reads the key as news: a copy it owns (the PKI stays root's).
                "tlskeyfile": str(self.root / "key.pem"),
            }
        )
        (self.root / "key.pem").write_bytes(pki.keyfile.read_bytes())
        (self.root / "key.pem").chmod(0o600)
        (self.etc / "inn.conf").write_text(inn_conf(SYSTEM_INN_CONF.read_text(), settings))
        (self.etc / "readers.conf").write_text(readers_conf(self.host))
        (self.etc / "storage.conf").write_text(
            "method timehash {\n    newsgroups: *\n    class: 0\n}\n"
        )
        (self.db / "active").write_text(f"{NEWSGROUP} 0000000000 0000000001 y\n")
        (self.db / "active.times").write_text("")
        (self.db / "newsgroups").write_text(f"{NEWSGROUP}\tstarttls-harness test group\n")
        news = pwd.getpwnam("news")
        for path in [self.root, *self.root.rglob("*")]:
            os.chown(path, news.pw_uid, news.pw_gid)
        # An empty tradindexed overview (group.index) for nnrpd to open.
        made = subprocess.run(
            [str(INN_BIN / "makehistory"), "-O", "-x"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=self._env(),
            user="news",
            group="news",
        )
        if made.returncode != 0:
            raise NotReady(f"makehistory -O exited {made.returncode}: {made.stderr.strip()}")

    def start(self, timeout: float) -> None:
        argv = [str(NNRPD), "-D", "-f", "-n", "-b", self.host, "-p", str(self.port)]
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
            env=self._env(),
            user="news",
            group="news",
            start_new_session=True,  # its own process group: the children go with it
        )
        self.started = True
        process = self.process
        try:
            wait_for_greeting(
                self.host, self.port, b"200 ", timeout, alive=lambda: process.poll() is None
            )
        except NotReady as exc:
            raise NotReady(f"{exc}\n{self.log_tail()}") from None

    def stop(self, timeout: float = 10.0) -> None:
        if not self.started:
            return
        stop_session(self.process, timeout)
        self.started = False
