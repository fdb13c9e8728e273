"""The real-server tier's LMTP and NNTP pieces: configuration text and storage probes.

(The servers themselves run in ``python -m realworld.run``, as root.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # realworld/ is a directory of the repository

from realworld import count_stored, instances  # noqa: E402
from realworld.inn import Inn, inn_conf, readers_conf  # noqa: E402
from realworld.run import _instances, start  # noqa: E402


def test_dovecot_lmtp_is_one_more_loopback_listener(tmp_path: Path) -> None:
    conf = instances.dovecot_conf(
        port=10143,
        base_dir=tmp_path / "run",
        state_dir=tmp_path / "state",
        log=tmp_path / "log",
        passwd=tmp_path / "passwd",
        mail_root=tmp_path / "mail",
        certfile=tmp_path / "c.pem",
        keyfile=tmp_path / "k.pem",
        lmtp_port=10024,
    )
    lines = [line.strip() for line in conf.splitlines()]
    assert "protocols = imap lmtp" in lines and "ssl = yes" in lines
    block = conf[conf.index("service lmtp {") :]
    assert "address = 127.0.0.1" in block and "port = 10024" in block


def test_the_lmtp_listener_is_a_service_of_the_one_dovecot(tmp_path: Path) -> None:
    made = _instances(tmp_path, ["dovecot", "dovecot-pop3", "dovecot-lmtp", "inn"])
    assert [i.name for i in made] == ["dovecot", "inn", "dovecot-pop3", "dovecot-lmtp"]
    dovecot, inn, pop3, lmtp = made
    assert isinstance(lmtp, instances.DovecotService) and lmtp.parent is dovecot
    assert isinstance(pop3, instances.DovecotService) and pop3.parent is dovecot
    assert dovecot.lmtp_port == lmtp.port and dovecot.pop3_port == pop3.port
    assert lmtp.url.startswith("lmtp://127.0.0.1:") and lmtp.greeting == b"220 "
    assert lmtp.rcpt == instances.TEST_USER and lmtp.storage_probe_command().endswith(
        f"count_stored.py dovecot {dovecot.root}"
    )
    assert pop3.rcpt == "postmaster@localhost" and pop3.storage_probe_command() == ""
    assert isinstance(inn, Inn) and inn.url.startswith("nntp://") and inn.rcpt == "harness.test"
    assert inn.storage_probe_command().endswith(f"count_stored.py inn {inn.root}")
    # Alone, the LMTP listener brings its Dovecot master first (which starts it).
    alone = _instances(tmp_path / "alone", ["dovecot-lmtp"])
    assert [type(i) for i in alone] == [instances.Dovecot, instances.DovecotService]
    assert alone[0].lmtp_port == alone[1].port


def test_inn_conf_points_every_path_into_the_state_directory(tmp_path: Path) -> None:
    template = "pathetc: /etc/news\n#domain:\nport: 119\norganization: x\n"
    conf = inn_conf(template, {"pathetc": str(tmp_path), "domain": "localdomain", "new": "1"})
    assert conf.splitlines() == [
        f"pathetc: {tmp_path}",
        "domain: localdomain",
        "port: 119",
        "organization: x",
        "new: 1",
    ]
    readers = readers_conf("127.0.0.1")
    assert 'hosts: "127.0.0.1"' in readers and "access: RP" in readers


def test_inn_storage_probe_counts_spooled_articles(tmp_path: Path) -> None:
    incoming = tmp_path / "spool" / "incoming"
    (incoming / "tmp").mkdir(parents=True)
    (incoming / "bad").mkdir()
    (incoming / "Wll52F").write_bytes(b"article")
    (incoming / "tmp" / "partial").write_bytes(b"x")
    assert count_stored.count_stored("inn", tmp_path) == 1
    assert count_stored.main(["inn", str(tmp_path / "absent")]) == 0


class _TakenOnce(instances.Dovecot):
    """A Dovecot whose first start finds a port taken (no process is started)."""

    starts: int = 0

    def configure(self, pki: object) -> None:
        self.configured_ports = (self.port, self.lmtp_port)

    def start(self, timeout: float) -> None:
        self.starts += 1
        if self.starts == 1:
            raise instances.NotReady("Error: bind(127.0.0.1, 1) failed: Address already in use")
        self.started = True

    def stop(self, timeout: float = 10.0) -> None:
        self.started = False


def test_a_port_taken_meanwhile_is_started_again_on_new_ports(tmp_path: Path) -> None:
    dovecot = _TakenOnce("dovecot", "imap", tmp_path, 1, lmtp_port=2)
    lmtp = instances.DovecotService("dovecot-lmtp", "lmtp", tmp_path, 2, parent=dovecot)
    start(dovecot, [dovecot, lmtp], object(), 1.0)  # type: ignore[arg-type]
    assert dovecot.starts == 2 and dovecot.started
    assert dovecot.port != 1 and lmtp.port != 2 and dovecot.lmtp_port == lmtp.port
    assert dovecot.configured_ports == (dovecot.port, lmtp.port)  # configured again


def test_other_start_failures_are_not_retried(tmp_path: Path) -> None:
    class Broken(_TakenOnce):
        def start(self, timeout: float) -> None:
            self.starts += 1
            raise instances.NotReady("did not greet")

    broken = Broken("dovecot", "imap", tmp_path, 1)
    with pytest.raises(instances.NotReady):
        start(broken, [broken], object(), 1.0)  # type: ignore[arg-type]
    assert broken.starts == 1
