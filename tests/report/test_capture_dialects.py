"""Captures (issue 15.1) for what came after them: binary dialects, FTP, and path runs.

Checked with ``tshark`` and the Decryption Secrets Block alone: the protocol
inside TLS is dissected (``tls:ldap``, ``tls:pgsql``, ``tls:ftp`` ...), and
the same file without its DSB shows no application protocol inside TLS.
A path run's capture holds the real bytes of both legs (client <-> proxy,
proxy <-> server), the proxy's injection marked; ``check-path`` with a
client that honours ``SSLKEYLOGFILE`` (the reference ``client`` does)
decrypts as well.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from starttls_harness.dialects import dialect_named
from starttls_harness.report.capture import capture_result
from starttls_harness.report.verdicts import Result
from starttls_harness.run.reference import reference_servers
from starttls_harness.run.server import RunSettings, run_server_scenario
from starttls_harness.scenarios.server import CATALOGUE
from test_capture import TSHARK, needs_tshark, without_dsb
from test_cli import CLI, _serve, run_cli

FIELDS = ("frame.protocols", "tcp.stream", "frame.comment")
#: The dissector name tshark gives each dialect's protocol inside TLS.
INSIDE = {"smtp": "tls:smtp", "ldap": "tls:ldap", "postgres": "tls:pgsql", "ftp": "tls:ftp"}


def frames(path: Path) -> List[Dict[str, str]]:
    assert TSHARK is not None
    fields = [arg for name in FIELDS for arg in ("-e", name)]
    proc = subprocess.run(
        [TSHARK, "-r", str(path), "-o", "tls.keylog_file:", "-T", "fields", *fields],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [dict(zip(FIELDS, line.split("\t"))) for line in proc.stdout.splitlines()]


def decrypted(path: Path, dialect: str) -> int:
    return sum(INSIDE[dialect] in f["frame.protocols"] for f in frames(path))


def bare_copy(path: Path) -> Path:
    bare = path.with_name("bare-" + path.name)
    bare.write_bytes(without_dsb(path.read_bytes()))
    return bare


@needs_tshark
@pytest.mark.parametrize("dialect", ["ldap", "postgres", "ftp"])
def test_a_server_run_of_a_newer_dialect_decrypts(dialect: str, tmp_path: Path) -> None:
    scenario = next(s for s in CATALOGUE if s.id == "server.state-reset")

    async def body() -> Result:
        async with reference_servers((dialect,)) as (target,):
            return await run_server_scenario(
                scenario, target, "1.3", RunSettings(keylog_dir=tmp_path / "keys")
            )

    result = asyncio.run(asyncio.wait_for(body(), 60))
    port = dialect_named(dialect).default_port  # Wireshark picks the dissector by port
    path = capture_result(result, tmp_path / "cap", service_port=port)
    assert decrypted(path, dialect) >= 2
    assert decrypted(bare_copy(path), dialect) == 0


@needs_tshark
def test_a_path_capture_holds_both_legs_decrypted(tmp_path: Path) -> None:
    """`check --capture-all` over the reference pairs: path results are real bytes now."""
    folder = tmp_path / "cap"
    code, out, err = run_cli(
        "check",
        "--only",
        "path.truncate-s2c",
        "--only",
        "path.inject-in-tls-c2s",
        "--tls-version",
        "1.3",
        "--capture",
        str(folder),
        "--capture-all",
        "-q",
        timeout=300,
    )
    assert code == 0, out + err
    for dialect in ("smtp", "ldap", "postgres"):
        path = folder / f"path.truncate-s2c-{dialect}-tls1.3.pcapng"
        rows = frames(path)
        assert {r["tcp.stream"] for r in rows} == {"0", "1"}, dialect  # the two legs
        assert all("FALLBACK" not in r["frame.comment"] for r in rows)
        assert decrypted(path, dialect) >= 4, dialect  # each leg, each way
        assert decrypted(bare_copy(path), dialect) == 0
    injected = frames(folder / "path.inject-in-tls-c2s-smtp-tls1.3.pcapng")
    marked = [r for r in injected if "injected by the harness" in r["frame.comment"]]
    assert len(marked) == 1  # on the leg the proxy wrote it to, once


@needs_tshark
def test_check_path_with_a_key_logging_client_decrypts(tmp_path: Path) -> None:
    folder = tmp_path / "cap"

    async def body() -> int:
        async with _serve("smtp", "--port", "0") as served:
            proc = await asyncio.create_subprocess_exec(
                *CLI,
                "check-path",
                f"smtp://127.0.0.1:{served.port}",
                "--cafile",
                served.cafile,
                "--only",
                "path.truncate-s2c",
                "--capture",
                str(folder),
                "--capture-all",
                "-q",
                "--",
                sys.executable,
                "-m",
                "starttls_harness",
                "client",
                "smtp",
                "--port",
                "{port}",
                "--cafile",
                "{cafile}",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 200)
            assert proc.returncode == 0, (out + err).decode()
            return proc.returncode

    asyncio.run(body())
    path = folder / "path.truncate-s2c-smtp-tls1.3.pcapng"
    assert decrypted(path, "smtp") >= 2
    assert decrypted(bare_copy(path), "smtp") == 0
