"""Run the catalogue against private Postfix and Dovecot and compare with expected.json.

Usage (as root, after ``bash realworld/install.sh``)::

    python -m realworld.run                    # exit 0: every verdict as expected
    python -m realworld.run --evidence ev/     # ladders of non-passing results + server logs
    python -m realworld.run --update           # accept the observed table (after looking!)

Both servers are started in a new state directory with a throwaway CA, on
free loopback ports, and stopped in ``finally`` whatever happens.  The check
itself is the public command, ``starttls-harness check`` (run as ``python
-m harness check`` so that the interpreter running this script is the one
tested), with ``--json``; the comparison is :mod:`realworld.compare`.

After the servers, the client tier (:mod:`realworld.clients`) runs unless
``--no-clients``; the closing line counts the cells of both.

Exit status: 0 the tables match, 1 one differs, 2 the servers, the clients or
a check could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from starttls_harness.dialects.nntp import NEWSGROUP
from starttls_harness.tls.certs import Pki, make_pki

from realworld import clients, compare, paths
from realworld.ftpservers import FTP_SERVERS, ftp_installed
from realworld.inn import Inn
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
from realworld.ldap import Slapd, slapd_missing
from realworld.postgres import PostgreSQL
from realworld.xmpp import Prosody, prosody_missing

#: The servers of the tier; ``dovecot-*`` are listeners of the one ``dovecot`` instance.
SERVERS = (
    "postfix",
    "dovecot",
    "dovecot-pop3",
    "dovecot-sieve",
    "dovecot-lmtp",
    "inn",
    "slapd",  # realworld/ldap.py
    "postgresql",
    "prosody",  # realworld/xmpp.py
)

EXIT_MATCH = 0
EXIT_DIFFER = 1
EXIT_ERROR = 2

COMMENT = (
    "Verdicts of 'starttls-harness check' against private Postfix and Dovecot instances "
    "(realworld/run.py). Each scenario has one cell per TLS version: the verdict, which a "
    "run must reproduce, and the outcome lines seen so far, which only inform; and a note "
    "on what the server does. Change a verdict only after reading the evidence; 'python -m "
    "realworld.run --update' rewrites the cells and keeps the notes; 'python -m "
    "realworld.table' regenerates the README table."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m realworld.run",
        description=(
            "Start private Postfix and Dovecot instances on loopback, run "
            "'starttls-harness check' against each and compare every verdict with "
            "realworld/expected.json."
        ),
    )
    p.add_argument("--expected", type=Path, default=compare.EXPECTED_FILE)
    p.add_argument(
        "--state-dir",
        type=Path,
        help="where the instances live (default: a new temporary directory, removed afterwards)",
    )
    p.add_argument("--keep", action="store_true", help="keep the state directory")
    p.add_argument(
        "--evidence",
        type=Path,
        help="write JSON reports, ladders of non-passing results and the server logs here",
    )
    p.add_argument("--tls-version", choices=("1.2", "1.3", "all"), default="all")
    p.add_argument(
        "--server",
        action="append",
        choices=(*SERVERS, *FTP_SERVERS),
        help="only this server (repeatable; default: all)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=30.0,
        help="bound for each server to greet after start (default: %(default)s s)",
    )
    p.add_argument(
        "--check-timeout",
        type=float,
        default=300.0,
        help="bound for one 'check' run (default: %(default)s s)",
    )
    p.add_argument(
        "--update",
        action="store_true",
        help="write the observed verdicts into expected.json (notes kept) and the README table"
        " (and the client tier's into expected-clients.json)",
    )
    p.add_argument(
        "--no-clients",
        action="store_true",
        help="skip the client tier that runs after the servers (python -m realworld.clients)",
    )
    clients.add_selection_options(p)
    return p


HARNESS = [sys.executable, "-m", "starttls_harness"]


def check_has_storage_probe() -> bool:
    """Whether this ``check`` takes ``--storage-probe COMMAND`` (then truncation is decided)."""
    done = subprocess.run(
        [*HARNESS, "check", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    return "--storage-probe" in done.stdout


def run_check(
    instance: Instance,
    cafile: Path,
    out_dir: Path,
    tls_version: str,
    timeout: float,
    storage_probe: bool = False,
    tmp_dir: Optional[Path] = None,
) -> Tuple[int, Path, str]:
    """``starttls-harness check`` against one instance; (exit status, JSON path, output)."""
    report = out_dir / f"{instance.name}.json"
    argv = [
        *HARNESS,
        "check",
        instance.url,
        "--cafile",
        str(cafile),
        "--server-name",
        "localhost",
        "--tls-version",
        tls_version,
        "--json",
        str(report),
        "--evidence",
        str(out_dir / instance.name),
        "--quiet",
    ]
    extra = getattr(instance, "check_arguments", None)  # realworld/ldap.py: the user's DN
    if extra is not None:
        argv += extra()
    elif instance.dialect in ("imap", "pop3", "sieve") or getattr(instance, "has_test_user", False):
        argv += ["--user", TEST_USER, "--password", TEST_PASSWORD]
    else:
        argv += ["--rcpt", instance.rcpt]
    if storage_probe and instance.storage_probe_command():
        argv += ["--storage-probe", instance.storage_probe_command()]
    # check --evidence keeps key logs in a mkdtemp() directory it does not
    # remove: TMPDIR inside the state directory makes them go with it.
    env = dict(os.environ)
    if tmp_dir is not None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp_dir)
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    return done.returncode, report, done.stdout + done.stderr


def updated_table(
    old: Optional[compare.ServerTable],
    instance: Instance,
    tested_version: str,
    observed: Dict[compare.Key, compare.Outcome],
    versions: Sequence[str],
) -> compare.ServerTable:
    """The table ``--update`` writes for one server: observed cells merged into the old.

    Cells of TLS versions that were not run are kept; notes are kept.
    """
    results: Dict[compare.Key, compare.Cell] = {}
    if old is not None:
        results.update({k: c for k, c in old.results.items() if k[1] not in versions})
    for key, outcome in observed.items():
        results[key] = compare.merge(old.results.get(key) if old else None, outcome)
    return compare.ServerTable(
        name=instance.name,
        dialect=instance.dialect,
        package=old.package if old else instance.name,
        tested_version=tested_version,
        results=results,
        notes=dict(old.notes) if old else {},
    )


def _instances(root: Path, names: Sequence[str]) -> List[Instance]:
    made: List[Instance] = []
    for name in names:
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)  # the servers' unprivileged users traverse it
        if name == "postfix":
            made.append(Postfix("postfix", "smtp", directory, free_port()))
        elif name == "dovecot":
            made.append(Dovecot("dovecot", "imap", directory, free_port()))
        elif name == "inn":
            made.append(Inn("inn", "nntp", directory, free_port(), rcpt=NEWSGROUP))
        elif name == "slapd":
            made.append(Slapd("slapd", "ldap", directory, free_port()))
        elif name == "postgresql":  # realworld/postgres.py
            made.append(PostgreSQL("postgresql", "postgres", directory, free_port()))
        elif name == "prosody":  # realworld/xmpp.py
            made.append(Prosody("prosody", "xmpp", directory, free_port()))
        elif name in FTP_SERVERS:  # realworld/ftpservers.py (install-ftp.sh)
            made.append(FTP_SERVERS[name](name, "ftp", directory, free_port()))
    # POP3 and ManageSieve are listeners of the same Dovecot (started first).
    parent = next((i for i in made if isinstance(i, Dovecot)), None)
    for name, dialect, greeting, probe, rcpt in _DOVECOT_SERVICES:
        if name not in names:
            continue
        if parent is None:
            directory = root / "dovecot"
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)
            parent = Dovecot("dovecot", "imap", directory, free_port())
            made.append(parent)
        port = free_port()
        setattr(parent, f"{dialect}_port", port)  # pop3_port, sieve_port, lmtp_port
        service = DovecotService(
            name,
            dialect,
            parent.root,
            port,
            rcpt=rcpt or Instance.rcpt,
            parent=parent,
            greeting=greeting,
            probe_kind=probe,
        )
        made.append(service)
    return made


#: name, dialect, greeting, storage probe kind, --rcpt of the services of the Dovecot instance.
_DOVECOT_SERVICES = (
    ("dovecot-pop3", "pop3", b"+OK", "", ""),
    ("dovecot-sieve", "sieve", b'"IMPLEMENTATION"', "sieve", ""),
    ("dovecot-lmtp", "lmtp", b"220 ", "dovecot", TEST_USER),
)


#: How often a server whose port was taken meanwhile is given new ports.
START_ATTEMPTS = 3


def start(instance: Instance, instances: Sequence[Instance], pki: Pki, timeout: float) -> None:
    """Configure and start ``instance``; new free ports when one was taken meanwhile.

    A port :func:`free_port` called free may be bound by another process
    (any outgoing connection on a busy machine) before the server binds it.
    A Dovecot master binds its services' listeners too: they get new ports.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        instance.configure(pki)
        try:
            instance.start(timeout)
            return
        except NotReady as exc:
            if "already in use" not in str(exc).lower() or attempt == START_ATTEMPTS:
                raise
            instance.stop()
            print(f"{instance.name}: a port was taken meanwhile; again on new ports", flush=True)
            instance.port = free_port()
            for service in instances:
                if isinstance(service, DovecotService) and service.parent is instance:
                    service.port = free_port()
                    setattr(instance, f"{service.dialect}_port", service.port)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (a CI timeout, tox interrupted) unwinds through ``finally``: servers stop."""
    raise SystemExit(128 + signum)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    missing = binaries_missing() + slapd_missing() + prosody_missing()
    if missing:
        print(
            f"realworld: {', '.join(missing)} not installed; run 'bash realworld/install.sh' "
            "(as root) first",
            file=sys.stderr,
        )
        return EXIT_ERROR
    if os.geteuid() != 0:
        print("realworld: the private instances are started as root", file=sys.stderr)
        return EXIT_ERROR
    try:
        expected = compare.load_expected(args.expected) if args.expected.exists() else {}
    except compare.TableError as exc:
        print(f"realworld: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not expected and not args.update:
        print(f"realworld: {args.expected} does not exist; run with --update", file=sys.stderr)
        return EXIT_ERROR
    names = args.server or [*SERVERS, *ftp_installed()]
    versions = compare.TLS_VERSIONS if args.tls_version == "all" else (args.tls_version,)

    own_root = args.state_dir is None
    root = args.state_dir or Path(tempfile.mkdtemp(prefix="starttls-realworld-"))
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    out_dir = args.evidence or root / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    pki = make_pki(directory=root / "pki")
    assert pki.cafile is not None
    instances = _instances(root, names)
    observed: Dict[str, Dict[compare.Key, compare.Outcome]] = {}
    versions_of: Dict[str, str] = {}
    status = EXIT_MATCH
    t0 = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        for instance in instances:
            t = time.monotonic()
            start(instance, instances, pki, args.start_timeout)
            print(
                f"{instance.name} {instance.version()} on {instance.url} "
                f"(ready in {time.monotonic() - t:.2f} s)",
                flush=True,
            )
        storage_probe = check_has_storage_probe()
        for instance in instances:
            t = time.monotonic()
            code, report, output = run_check(
                instance,
                pki.cafile,
                out_dir,
                args.tls_version,
                args.check_timeout,
                storage_probe,
                tmp_dir=root / "tmp",
            )
            print(
                f"--- starttls-harness check {instance.url} (exit {code}, "
                f"{time.monotonic() - t:.1f} s)"
            )
            print(output.rstrip(), flush=True)
            if not report.exists():
                print(f"realworld: no JSON report from the check of {instance.name}")
                status = EXIT_ERROR
                continue
            # Read now: the state directory (and a default out/) goes in finally.
            observed[instance.name] = compare.observed_from_report(
                json.loads(report.read_text()), instance.dialect
            )
            versions_of[instance.name] = instance.version()
    except (NotReady, OSError, ValueError, subprocess.SubprocessError) as exc:
        print(f"realworld: {exc}", file=sys.stderr)
        status = EXIT_ERROR
    finally:
        for instance in instances:
            try:
                instance.stop()
            except (OSError, subprocess.SubprocessError) as exc:
                print(f"realworld: stopping {instance.name}: {exc}", file=sys.stderr)
            if args.evidence and instance.log.exists():
                shutil.copyfile(instance.log, out_dir / f"{instance.name}.log")
        if own_root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    # The client tier runs after the servers whatever they gave; the exit
    # status is the worse of the two (could not run > differs > match).
    total = failed = 0
    if status != EXIT_ERROR and args.update:
        merged = dict(expected)
        for instance in instances:
            if instance.name in observed:
                merged[instance.name] = updated_table(
                    expected.get(instance.name),
                    instance,
                    versions_of[instance.name],
                    observed[instance.name],
                    versions,
                )
        doc = compare.to_expected_doc(merged, COMMENT)
        # ensure_ascii off: the notes' "§" stays as written, not as \u00a7.
        args.expected.write_text(
            json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        from realworld.table import write_readme

        write_readme(merged)
        print(f"realworld: wrote {args.expected} and the README table")
    elif status != EXIT_ERROR:
        status, total, failed = _compare_servers(args, expected, observed, versions)
    if not args.no_clients:
        print("--- the client tier: python -m realworld.clients", flush=True)
        args.client_evidence = args.evidence / "clients" if args.evidence else None
        tier = clients.run_and_report(args, update=args.update)
        total += tier.total
        failed += tier.failed
        status = clients.combine_status(status, tier.status)
    if not args.no_clients:  # the path tier: real clients, the fault proxy, real servers
        print("--- the path tier: python -m realworld.paths", flush=True)
        evidence = args.evidence / "paths" if args.evidence else None
        ptier = paths.run_and_report(
            tls_version=args.tls_version, update=args.update, evidence=evidence
        )
        total, failed = total + ptier.total, failed + ptier.failed
        status = clients.combine_status(status, ptier.status)
    print(f"realworld: {time.monotonic() - t0:.1f} s in all")
    # The plain closing line CI reads: one cell of a table is one test.
    print(f"realworld: {total - failed} passed, {failed} failed")
    return status


def _compare_servers(
    args: argparse.Namespace,
    expected: Dict[str, compare.ServerTable],
    observed: Dict[str, Dict[compare.Key, compare.Outcome]],
    versions: Sequence[str],
) -> Tuple[int, int, int]:
    """Print the servers' differences; (exit status, cells compared, cells failed)."""
    differences: List[compare.Difference] = []
    total = 0
    for name, cells in observed.items():
        want = expected.get(name)
        if want is None:
            print(f"realworld: {name} has no table in {args.expected}", file=sys.stderr)
            return EXIT_ERROR, 0, 0
        differences += compare.compare(name, want.results, cells, tls_versions=versions)
        total += len({k for k in want.results if k[1] in versions} | set(cells))
    failed = sum(1 for d in differences if d.fails)
    print(compare.format_differences(differences), end="")
    return (EXIT_DIFFER if failed else EXIT_MATCH), total, failed


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
