"""``check`` and ``check-client``: the conformance runs and their options."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import (
    Any,
    AsyncContextManager,
    AsyncIterator,
    Awaitable,
    Callable,
    List,
    Optional,
    Tuple,
)

from starttls_harness.cli.common import (
    EXIT_ERROR,
    EXIT_FAIL,
    EXIT_OK,
    UsageError,
    check_cafile,
    check_seconds,
    check_writable_dir,
    check_writable_file,
    parse_target,
)
from starttls_harness.cli.output import _after_reference_run, _Progress
from starttls_harness.cli.tools import _quiet_aiosmtpd
from starttls_harness.dialects import names
from starttls_harness.report.formats import (
    summary_table,
    to_json,
    to_junit,
    write_evidence,
    write_json,
    write_junit,
)
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.client import run_client_target
from starttls_harness.run.path import reference_pair, run_path_target
from starttls_harness.run.reference import reference_servers
from starttls_harness.run.server import RunSettings, ServerTarget, run_server_target
from starttls_harness.run.targets import CommandClientTarget, ReferenceClientTarget
from starttls_harness.scenarios.catalogue import everything, select
from starttls_harness.scenarios.server import Scenario
from starttls_harness.servers.base import ServerConfig


def _add_check(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "check",
        help="run the conformance catalogue against a server (default: the reference peers)",
        description=(
            "Run the scenario catalogue against a server under test and print a verdict per "
            "scenario and TLS version: pass, fail (a rule that protects data was broken), warn "
            "(a deviation that exposes nothing), skip (not applicable) or error (could not "
            "decide). Without TARGET, the built-in strict reference peers are started and "
            "the whole catalogue runs: server scenarios against the SMTP and IMAP servers, "
            "client scenarios against the clients, path scenarios through the fault proxy "
            "between the two. Every scenario should pass."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "exit status: 0 nothing failed or errored, 1 a scenario failed, "
            "2 a scenario errored or wrong usage\n\n"
            "examples:\n"
            "  starttls-harness check\n"
            "  starttls-harness check smtp://127.0.0.1:25 --tls-version 1.3 --evidence ev/\n"
            "  starttls-harness check imap://127.0.0.1:143 --user u --password p --junit-xml j.xml"
        ),
    )
    p.add_argument(
        "target",
        nargs="?",
        metavar="TARGET",
        help="smtp://HOST:PORT or imap://HOST:PORT (default: the built-in reference peers)",
    )
    _add_run_options(p)
    p.add_argument(
        "--cafile",
        type=Path,
        help="verify the target's certificate with this CA (default: no verification)",
    )
    p.add_argument(
        "--server-name",
        default=None,
        help="TLS server name to send and verify (default: the target host)",
    )
    p.add_argument("--user", help="test user, for scenarios that log in")
    p.add_argument(
        "--password", help="password of the test user (hidden in every report and ladder)"
    )
    p.add_argument(
        "--rcpt",
        default="postmaster@localhost",
        help="SMTP recipient for scenarios that send mail (default: %(default)s)",
    )
    p.add_argument(
        "--storage-probe",
        metavar="COMMAND",
        help="a command (no shell) that prints how many messages the target holds; "
        "lets server.truncation see whether a cut message was stored",
    )
    p.set_defaults(func=cmd_check)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by check and check-client."""
    p.add_argument(
        "--tls-version",
        choices=("1.2", "1.3", "all"),
        default="all",
        help="TLS version(s) to test (default: all)",
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="run only scenario ids matching this glob (repeatable), e.g. 'server.*close*'",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write the JSON report here")
    p.add_argument("--junit-xml", type=Path, metavar="PATH", help="write JUnit XML here")
    p.add_argument(
        "--evidence",
        type=Path,
        metavar="DIR",
        help="write a ladder diagram and the TLS key log for every non-passing result",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="hard bound for one scenario (default: %(default)s)",
    )
    p.add_argument(
        "--reply-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="bound for one reply, close or handshake (default: %(default)s)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="scenarios run at once against one target (default: %(default)s)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")


def _add_check_client(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "check-client",
        help="run the client catalogue against a client program",
        description=(
            "Play a scripted (and for most scenarios, faulty) server on 127.0.0.1 and run "
            "COMMAND once per scenario and TLS version. In COMMAND's arguments {host}, {port}, "
            "{cafile} (the CA of the throwaway server certificate), {tls_version} and {cycles} "
            "are replaced. The client should connect, require STARTTLS, log in (any "
            "credentials are accepted), send one message (SMTP) or APPEND one (IMAP), quit, and "
            "exit 0 on success and non-zero on any error."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "exit status: as for check\n\n"
            "example:\n"
            "  starttls-harness check-client --protocol smtp -- \\\n"
            "      python3 send.py {host} {port} {cafile}"
        ),
    )
    p.add_argument("--protocol", choices=names(), required=True)
    _add_run_options(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ARG...")
    p.set_defaults(func=cmd_check_client)


def cmd_check_client(args: argparse.Namespace) -> int:

    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        raise UsageError("give the client command after --, e.g. -- python3 send.py {port}")
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        raise UsageError(f"{argv[0]!r}: command not found")
    scenarios = [s for s in _select(args.only, "client") if args.protocol in s.dialects]
    if not scenarios:
        raise UsageError(f"--only {args.only}: no client scenario matches")
    setup = _RunSetup(args)
    target = CommandClientTarget(args.protocol, argv, timeout=args.timeout)

    @contextlib.asynccontextmanager
    async def jobs() -> AsyncIterator[Tuple[str, List[Job]]]:
        async def job(progress: Callable[[Result], None]) -> List[Result]:
            return await run_client_target(
                scenarios, target, setup.settings, progress, setup.versions
            )

        label = " ".join(argv)
        setup.out.write(f"checking the {args.protocol} client: {label}\n")
        yield label, [(label, job, setup.count(scenarios, [args.protocol]))]

    return setup.run(jobs)


Job = Tuple[str, Callable[[Callable[["Result"], None]], Awaitable[List["Result"]]], int]


class _RunSetup:
    """What ``check`` and ``check-client`` share: bounds, key logs, output."""

    def __init__(self, args: argparse.Namespace) -> None:

        check_seconds("--timeout", args.timeout)
        check_seconds("--reply-timeout", args.reply_timeout)
        if args.concurrency < 1:
            raise UsageError(f"--concurrency {args.concurrency}: give a whole number >= 1")
        for option, path in (("--json", args.json), ("--junit-xml", args.junit_xml)):
            if path is not None:
                check_writable_file(option, path)
        if args.evidence is not None:
            check_writable_dir("--evidence", args.evidence)
        self.args = args
        self.versions = ("1.2", "1.3") if args.tls_version == "all" else (args.tls_version,)
        # Key logs are secrets: a private temporary folder, removed at the end;
        # --evidence copies those of the non-passing results (0600).
        self.keys_tmp = (
            tempfile.TemporaryDirectory(prefix="starttls-keys-") if args.evidence else None
        )
        self.settings = RunSettings(
            scenario_timeout=args.timeout,
            reply_timeout=args.reply_timeout,
            connect_timeout=args.reply_timeout,
            concurrency=args.concurrency,
            keylog_dir=Path(self.keys_tmp.name) if self.keys_tmp is not None else None,
        )
        _quiet_aiosmtpd()
        # What the reports hide (the protocol shapes of a login are hidden
        # whatever the password; these are hidden wherever they appear).
        self.secrets: List[Optional[str]] = [getattr(args, "password", None)]
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.t0 = time.monotonic()
        self.out = sys.stdout
        #: Set when the run is against the built-in peers (for the closing line).
        self.reference = False

    def count(self, scenarios: List[Scenario], dialects: List[str]) -> int:
        return sum(
            1
            for d in dialects
            for v in self.versions
            for s in scenarios
            if d in s.dialects and v in s.tls_versions
        )

    def run(self, jobs: Callable[[], AsyncContextManager[Tuple[str, List[Job]]]]) -> int:
        """Run the jobs with one progress display; report; the exit status."""

        async def main() -> Tuple[str, List[Result]]:
            async with jobs() as (label, todo):
                progress = _Progress(sum(n for _, _, n in todo), sys.stderr, self.args.quiet)
                results: List[Result] = []
                try:
                    for name, job, _ in todo:
                        results += await job(progress)
                        progress.job_finished(name)
                finally:
                    progress.close()
                return label, results

        try:
            label, results = asyncio.run(main())
            return self.report(label, results)
        finally:
            if self.keys_tmp is not None:
                self.keys_tmp.cleanup()

    def report(self, label: str, results: List[Result]) -> int:

        args, out, secrets = self.args, self.out, self.secrets
        duration = time.monotonic() - self.t0
        summary_table(results, out, color=out.isatty(), secrets=secrets)
        out.write(f"{len(results)} scenario runs in {duration:.2f} s\n")
        try:
            if args.json:
                doc = to_json(
                    results,
                    target=label,
                    started=self.started,
                    duration=duration,
                    secrets=secrets,
                )
                write_json(args.json, doc)
            if args.junit_xml:
                tree = to_junit(results, target=label, duration=duration, secrets=secrets)
                write_junit(args.junit_xml, tree)
            if args.evidence:
                written = write_evidence(results, args.evidence, secrets=secrets)
                out.write(f"evidence: {len(written)} files in {args.evidence}\n")
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            raise UsageError(f"cannot write the report{where}: {exc.strerror or exc}") from None
        verdicts = {r.verdict for r in results}
        if self.reference:
            out.write(_after_reference_run(len(results), verdicts) + "\n")
        if Verdict.ERROR in verdicts:
            return EXIT_ERROR
        if Verdict.FAIL in verdicts:
            return EXIT_FAIL
        return EXIT_OK


def _select(patterns: Optional[List[str]], role: str) -> List[Scenario]:

    return select(patterns, role=role, catalogue=everything())


def cmd_check(args: argparse.Namespace) -> int:

    if args.cafile is not None:
        check_cafile("--cafile", args.cafile)
    roles = ("server",) if args.target else ("server", "client", "path")
    chosen = {role: _select(args.only, role) for role in roles}
    if not any(chosen.values()):
        raise UsageError(f"--only {args.only}: no scenario matches")
    setup = _RunSetup(args)
    settings, versions, out = setup.settings, setup.versions, setup.out

    def server_job(target: ServerTarget, label: Optional[str] = None) -> Job:
        scenarios = chosen["server"]

        async def job(progress: Callable[[Result], None]) -> List[Result]:
            return await run_server_target(scenarios, target, settings, progress, versions)

        return (label or target.url, job, setup.count(scenarios, [target.dialect]))

    @contextlib.asynccontextmanager
    async def reference_jobs() -> AsyncIterator[Tuple[str, List[Job]]]:

        setup.secrets.append(ServerConfig.password)
        setup.reference = True
        out.write("checking the built-in reference peers: servers, clients, and both on a path\n")
        async with reference_servers() as targets:
            jobs = [server_job(t, f"reference {t.dialect} server") for t in targets]
            jobs = jobs if chosen["server"] else []
            jobs += _client_jobs(chosen["client"], setup)
            jobs += _path_jobs(chosen["path"], setup)
            yield "reference peers", jobs

    if args.target is None:
        return setup.run(reference_jobs)

    dialect, host, port = parse_target(args.target)
    target = ServerTarget(
        dialect=dialect,
        host=host,
        port=port,
        cafile=args.cafile,
        server_hostname=args.server_name or host,
        user=args.user,
        password=args.password,
        rcpt=args.rcpt,
    )

    @contextlib.asynccontextmanager
    async def target_jobs() -> AsyncIterator[Tuple[str, List[Job]]]:
        if args.storage_probe:
            target.storage_count = _storage_probe(args.storage_probe, args.reply_timeout)
            try:
                await target.storage_count()
            except RuntimeError as exc:
                raise UsageError(f"--storage-probe: {exc}") from None
        await _reachable(host, port, args.reply_timeout)
        if args.cafile is None:
            out.write("note: the target's certificate is NOT verified (give --cafile to verify)\n")
        out.write(f"checking {target.url}\n")
        yield target.url, [server_job(target)]

    return setup.run(target_jobs)


def _client_jobs(scenarios: List[Scenario], setup: _RunSetup) -> List[Job]:
    """The client catalogue against the reference clients, per dialect."""

    jobs: List[Job] = []
    for dialect in names() if scenarios else ():
        target = ReferenceClientTarget(dialect)

        async def job(progress: Callable[[Result], None], t: Any = target) -> List[Result]:
            return await run_client_target(scenarios, t, setup.settings, progress, setup.versions)

        jobs.append((f"reference {dialect} client", job, setup.count(scenarios, [dialect])))
    return jobs


def _path_jobs(scenarios: List[Scenario], setup: _RunSetup) -> List[Job]:
    """The path catalogue: reference client -> fault proxy -> reference server."""

    jobs: List[Job] = []
    for dialect in names() if scenarios else ():
        mine = [s for s in scenarios if dialect in s.dialects]

        async def job(
            progress: Callable[[Result], None], d: str = dialect, chosen: Any = mine
        ) -> List[Result]:
            return await run_path_target(
                chosen, reference_pair(d), setup.settings, progress, setup.versions
            )

        jobs.append((f"{dialect} pair on a path", job, setup.count(mine, [dialect])))
    return jobs


def _storage_probe(command: str, timeout: float) -> Callable[[], Awaitable[int]]:
    """Run ``command`` (no shell) and read one integer from its stdout."""
    argv = shlex.split(command)

    async def count() -> int:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            raise RuntimeError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"{command!r} did not finish within {timeout:g} s") from None
        text = out.decode(errors="replace").strip()
        if proc.returncode != 0 or not text.isdigit():
            raise RuntimeError(
                f"{command!r} exited {proc.returncode} and printed {text[:40]!r}, not a count"
            )
        return int(text)

    return count


async def _reachable(host: str, port: int, timeout: float) -> None:
    """Fail fast, in one line, when nothing listens at the target."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or "timed out"
        raise UsageError(f"cannot connect to {host}:{port}: {reason}") from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
