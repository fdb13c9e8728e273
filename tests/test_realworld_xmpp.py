"""realworld/xmpp.py: the private Prosody's configuration keeps it on loopback, alone.

The real run (``python -m realworld.run --server prosody``) is the tier's; here only what
can be checked without starting Prosody: the configuration listens on 127.0.0.1 only, on
the one port given, with s2s, HTTP and direct TLS off (no DNS, nothing else reachable),
encryption required, and a VirtualHost for the harness's domain.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # realworld/ is not part of the installed distribution

from starttls_harness.dialects.xmpp import DOMAIN  # noqa: E402

from realworld.xmpp import Prosody, prosody_conf  # noqa: E402


def test_prosody_listens_on_loopback_only_without_s2s(tmp_path: Path) -> None:
    conf = prosody_conf(tmp_path, 15222, tmp_path / "c.crt", tmp_path / "c.key")
    assert 'interfaces = { "127.0.0.1" }' in conf
    assert "c2s_ports = { 15222 }" in conf
    for off in (
        "s2s_ports = {}",
        "http_ports = {}",
        "https_ports = {}",
        "c2s_direct_tls_ports = {}",
    ):
        assert off in conf
    assert '"s2s"' in conf.split("modules_disabled", 1)[1].splitlines()[0]
    assert "c2s_require_encryption = true" in conf
    assert f'VirtualHost "{DOMAIN}"' in conf
    assert str(tmp_path / "data") in conf and "/etc/prosody" not in conf


def test_a_path_with_quotes_stays_a_lua_string(tmp_path: Path) -> None:
    odd = tmp_path / 'a"b'
    conf = prosody_conf(odd, 1, odd / "c", odd / "k")
    assert 'a\\"b' in conf


def test_no_scenario_is_left_out(tmp_path: Path) -> None:
    """The split injection's segmentation is declared (issue 14): Prosody runs every scenario."""
    server = Prosody("prosody", "xmpp", tmp_path, 1)
    assert not any(a == "--only" for a in server.check_arguments())
