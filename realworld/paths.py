"""The path tier: ``check-path`` between real clients and the private real servers.

Usage (as root, after ``bash realworld/install.sh``)::

    python -m realworld.paths            # exit 0: every verdict as in expected-paths.json
    python -m realworld.paths --update   # accept what was observed (after looking!)

Private Postfix and Dovecot instances are started as :mod:`realworld.run`
starts them; each pair below runs ``starttls-harness check-path URL --
CLIENT ...`` (the fault proxy between the two) and its verdicts, with the
side each non-pass blames, are compared with ``expected-paths.json``.
``realworld.run`` calls :func:`run_and_report` after the client tier.

Exit status: 0 the table matches, 1 a cell differs, 2 something could not run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from starttls_harness.tls.certs import make_pki

from realworld.client_specs import DRIVERS
from realworld.instances import (
    TEST_PASSWORD,
    TEST_USER,
    Dovecot,
    DovecotService,
    Instance,
    NotReady,
    Postfix,
    binaries_missing,
    free_port,
)
from realworld.postgres import PSQL_PATH_ARGV, PostgreSQL

EXIT_MATCH, EXIT_DIFFER, EXIT_ERROR = 0, 1, 2
HARNESS = [sys.executable, "-m", "starttls_harness"]
EXPECTED_PATHS_FILE = Path(__file__).resolve().parent / "expected-paths.json"
COMMENT = (
    "Verdicts of 'starttls-harness check-path' with the fault proxy between a real client and "
    "a private real server (realworld/paths.py): per pair, scenario and TLS version, the "
    "verdict and, when it is not a pass, the side it blames. Rewrite with 'python -m "
    "realworld.paths --update' only after reading the evidence."
)

_IMAPLIB = """
import imaplib, ssl, sys
port, cafile, version, user, password = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=cafile)  # writes SSLKEYLOGFILE
pinned = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[version]
ctx.minimum_version = ctx.maximum_version = pinned
imap = imaplib.IMAP4("localhost", int(port), timeout=10)
imap.starttls(ssl_context=ctx)
imap.login(user, password)
imap.select("INBOX")
imap.logout()
"""

_SMTPLIB = """
import smtplib, ssl, sys
port, cafile, version = sys.argv[1:4]
ctx = ssl.create_default_context(cafile=cafile)  # writes SSLKEYLOGFILE
pinned = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[version]
ctx.minimum_version = ctx.maximum_version = pinned
with smtplib.SMTP("localhost", int(port), timeout=10) as smtp:
    smtp.starttls(context=ctx)
    smtp.ehlo()
    smtp.sendmail("path@localhost", ["postmaster@localhost"], "Subject: path\\r\\n\\r\\nhi\\r\\n")
"""


@dataclass(frozen=True)
class PathPair:
    """A real client against one of the private servers."""

    name: str
    server: str  # an instance name: postfix or dovecot
    argv: Tuple[str, ...]
    needs: str  # the program that must exist

    def command(self, scripts: Path) -> List[str]:
        return [a.replace("{scripts}", str(scripts)) for a in self.argv]


PAIRS: Tuple[PathPair, ...] = (
    PathPair(
        "dovecot+curl",
        "dovecot",
        (
            *("curl", "-sS", "--ssl-reqd", "--cacert", "{cafile}", "--max-time", "10"),
            *("--tlsv{tls_version}", "--tls-max", "{tls_version}"),
            *("--user", "{user}:{password}", "imap://localhost:{port}/INBOX"),
        ),
        "curl",
    ),
    PathPair(
        "dovecot+imaplib",
        "dovecot",
        (
            *(sys.executable, "{scripts}/imaplib_client.py", "{port}", "{cafile}"),
            *("{tls_version}", "{user}", "{password}"),
        ),
        sys.executable,
    ),
    PathPair(
        "postfix+smtplib",
        "postfix",
        (sys.executable, "{scripts}/smtplib_client.py", "{port}", "{cafile}", "{tls_version}"),
        sys.executable,
    ),
    # Neither libpq nor PostgreSQL writes a key log: the proxy cannot read the
    # TLS data, so the upgrade injection toward the server is skip (undecidable:
    # PostgreSQL refuses with a FATAL under TLS, which the proxy cannot tell from
    # an answer) -- it flapped between pass and fail while that was judged by
    # which side closed first.  32 runs without a change (issue 16).
    PathPair("postgresql+psql", "postgresql", PSQL_PATH_ARGV, "psql"),  # realworld/postgres.py
    # ManageSieve: sieve-connect resyncs with NOOP "STARTTLS-RESYNC-CAPA" before
    # it reads the capabilities Dovecot re-sends under TLS (Dialect.is_resync).
    # IO::Socket::SSL writes no key log, so what the TLS data shows is unread.
    PathPair(
        "dovecot-sieve+sieve-connect",
        "dovecot-sieve",
        (
            *("sh", str(DRIVERS / "sieve_connect_upload.sh"), "127.0.0.1", "{port}"),
            *("{cafile}", "{tls_version}", "{user}", "{password}"),
        ),
        "sieve-connect",
    ),
)
#: Pairs left out of the tier (their verdicts changed between runs); they run
#: only when named with ``--pair``.  None at present.
UNSTABLE_PAIRS: Tuple[PathPair, ...] = ()

#: pair -> scenario -> TLS version -> "verdict" or "verdict/side".
Table = Dict[str, Dict[str, Dict[str, str]]]


def cell(result: Dict[str, object]) -> str:
    """A result as the table holds it: the verdict, and the side it blames."""
    side = result.get("side")
    return f"{result['verdict']}/{side}" if side else str(result["verdict"])


def run_pair(
    pair: PathPair,
    instance: Instance,
    cafile: Path,
    scripts: Path,
    out_dir: Path,
    tls_version: str,
    timeout: float,
) -> Tuple[int, Dict[str, Dict[str, str]], str]:
    """``check-path`` for one pair: (exit status, its cells, its output)."""
    report = out_dir / f"{pair.name}.json"
    argv = [
        *HARNESS,
        "check-path",
        instance.url,
        "--cafile",
        str(cafile),
        "--tls-version",
        tls_version,
        "--json",
        str(report),
        "--evidence",
        str(out_dir / pair.name),
        "--quiet",
    ]
    if instance.dialect in ("imap", "sieve"):
        argv += ["--user", TEST_USER, "--password", TEST_PASSWORD]
    argv += ["--", *pair.command(scripts)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    cells: Dict[str, Dict[str, str]] = {}
    if report.exists():
        for r in json.loads(report.read_text())["results"]:
            cells.setdefault(r["id"], {})[r["tls_version"]] = cell(r)
    return done.returncode, cells, done.stdout + done.stderr


def differences(expected: Table, observed: Table) -> List[str]:
    """Every cell that differs, is missing or is new."""
    problems = []
    for pair in sorted(set(expected) | set(observed)):
        want, got = expected.get(pair, {}), observed.get(pair, {})
        for sid in sorted(set(want) | set(got)):
            for version in sorted(set(want.get(sid, {})) | set(got.get(sid, {}))):
                a = want.get(sid, {}).get(version, "(none)")
                b = got.get(sid, {}).get(version, "(none)")
                if a != b:
                    problems.append(f"{pair} {sid} TLS {version}: expected {a}, got {b}")
    return problems


@dataclass
class Outcome:
    status: int
    total: int = 0
    failed: int = 0


def run_and_report(
    *,
    tls_version: str = "all",
    update: bool = False,
    evidence: Optional[Path] = None,
    expected_path: Path = EXPECTED_PATHS_FILE,
    start_timeout: float = 30.0,
    check_timeout: float = 900.0,
    pairs: Sequence[PathPair] = PAIRS,
) -> Outcome:
    """Start the servers the pairs need, run every pair, compare (or --update)."""
    expected: Table = {}
    if expected_path.exists():
        expected = json.loads(expected_path.read_text())["pairs"]
    elif not update:
        print(f"realworld-paths: {expected_path} does not exist; run with --update")
        return Outcome(EXIT_ERROR)
    root = Path(tempfile.mkdtemp(prefix="starttls-paths-"))
    root.chmod(0o755)
    out_dir = evidence or root / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    scripts = root / "scripts"
    scripts.mkdir()
    (scripts / "imaplib_client.py").write_text(_IMAPLIB)
    (scripts / "smtplib_client.py").write_text(_SMTPLIB)
    pki = make_pki(directory=root / "pki")
    assert pki.cafile is not None
    chosen = [p for p in pairs if shutil.which(p.needs)]
    for p in pairs:
        if p not in chosen:
            print(f"realworld-paths: {p.name}: {p.needs} not installed, skipped")
    instances: Dict[str, Instance] = {}
    for name in sorted({p.server for p in chosen}):
        directory = root / name
        directory.mkdir()
        directory.chmod(0o755)
        if name == "postgresql":
            instances[name] = PostgreSQL(name, "postgres", directory, free_port())
            continue
        if name == "dovecot-sieve":  # a listener of the Dovecot master (started first)
            parent = instances.get("dovecot")
            if not isinstance(parent, Dovecot):
                parent = instances["dovecot"] = Dovecot("dovecot", "imap", directory, free_port())
            parent.sieve_port = free_port()
            instances[name] = DovecotService(
                name,
                "sieve",
                parent.root,
                parent.sieve_port,
                parent=parent,
                greeting=b'"IMPLEMENTATION"',
            )
            continue
        kind = Postfix if name == "postfix" else Dovecot
        instances[name] = kind(
            name, "smtp" if name == "postfix" else "imap", directory, free_port()
        )
    observed: Table = {}
    status = EXIT_MATCH
    try:
        for instance in instances.values():
            instance.configure(pki)
            instance.start(start_timeout)
            print(f"{instance.name} {instance.version()} on {instance.url}", flush=True)
        for pair in chosen:
            t = time.monotonic()
            code, cells, output = run_pair(
                pair,
                instances[pair.server],
                Path(pki.cafile),
                scripts,
                out_dir,
                tls_version,
                check_timeout,
            )
            print(f"--- check-path {pair.name} (exit {code}, {time.monotonic() - t:.1f} s)")
            print(output.rstrip(), flush=True)
            if not cells:
                status = EXIT_ERROR
            observed[pair.name] = cells
    except (NotReady, OSError, ValueError, subprocess.SubprocessError) as exc:
        print(f"realworld-paths: {exc}", file=sys.stderr)
        status = EXIT_ERROR
    finally:
        for instance in instances.values():
            try:
                instance.stop()
            except (OSError, subprocess.SubprocessError) as exc:
                print(f"realworld-paths: stopping {instance.name}: {exc}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)  # the evidence, if kept, is elsewhere
    total = sum(len(v) for cells in observed.values() for v in cells.values())
    if status == EXIT_ERROR:
        return Outcome(status, total, total)
    if update:  # cell by cell: a run of one TLS version keeps the other's cells
        merged = json.loads(json.dumps(expected))
        for pair_name, cells in observed.items():
            for sid, by_version in cells.items():
                merged.setdefault(pair_name, {}).setdefault(sid, {}).update(by_version)
        doc = {"comment": COMMENT, "pairs": merged}
        expected_path.write_text(
            json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        )
        print(f"realworld-paths: wrote {expected_path}")
        return Outcome(EXIT_MATCH, total)
    ran = ("1.2", "1.3") if tls_version == "all" else (tls_version,)
    wanted = {
        p.name: {
            sid: {v: c for v, c in by_version.items() if v in ran}
            for sid, by_version in expected.get(p.name, {}).items()
        }
        for p in chosen
    }
    problems = differences(wanted, observed)
    for line in problems:
        print(f"realworld-paths: {line}")
    return Outcome(EXIT_DIFFER if problems else EXIT_MATCH, total, len(problems))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m realworld.paths", description=__doc__)
    p.add_argument("--tls-version", choices=("1.2", "1.3", "all"), default="all")
    p.add_argument("--update", action="store_true", help="write expected-paths.json")
    p.add_argument("--evidence", type=Path, help="keep reports and ladders here")
    known = {pair.name: pair for pair in (*PAIRS, *UNSTABLE_PAIRS)}
    p.add_argument(
        "--pair",
        action="append",
        choices=sorted(known),
        help="run only this pair (repeatable; the only way to run a pair left out of the tier)",
    )
    args = p.parse_args(argv)
    missing = binaries_missing()
    if missing:
        print(f"realworld-paths: {', '.join(missing)} not installed", file=sys.stderr)
        return EXIT_ERROR
    pairs = tuple(known[name] for name in args.pair) if args.pair else PAIRS
    outcome = run_and_report(
        tls_version=args.tls_version, update=args.update, evidence=args.evidence, pairs=pairs
    )
    print(f"realworld-paths: {outcome.total - outcome.failed} passed, {outcome.failed} failed")
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
