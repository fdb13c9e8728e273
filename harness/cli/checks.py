"""``check`` and ``check-client``: the conformance runs and their options."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
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
    Iterator,
    List,
    Optional,
    TextIO,
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
from starttls_harness.dialects import dialect_named, names
from starttls_harness.report.capture import capture_result
from starttls_harness.report.formats import (
    summary_table,
    to_json,
    to_junit,
    write_evidence,
    write_json,
    write_junit,
)
from starttls_harness.report.redact import Redactor
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.client import run_client_target
from starttls_harness.run.pacing import Pacing, pacing, refusal
from starttls_harness.run.path import run_path_target
from starttls_harness.run.path_reference import reference_pair
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
        nargs="*",
        metavar="TARGET",
        help="smtp://HOST:PORT, imap://HOST:PORT, ... one or more "
        "(default: the built-in reference peers)",
    )
    p.add_argument(
        "--targets",
        type=Path,
        metavar="FILE",
        help="read targets from FILE: one URL per line, '#' starts a comment",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=4,
        metavar="N",
        help="targets checked side by side (default: %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="never more than N connections open at once to one target",
    )
    p.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="open at most R connections per second to one target (e.g. 0.5)",
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
    p.add_argument(
        "--capture",
        type=Path,
        metavar="DIR",
        help="write a pcapng per non-passing result: the real bytes, with the TLS key log "
        "inside (Wireshark/tshark decrypt it with no key file)",
    )
    p.add_argument(
        "--capture-all", action="store_true", help="with --capture: a pcapng for every result"
    )
    p.add_argument(
        "--jsonl",
        metavar="FILE",
        help="write each result as one JSON line as soon as it is decided ('-' for stdout)",
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
        if args.capture is not None:
            check_writable_dir("--capture", args.capture)
        elif args.capture_all:
            raise UsageError("--capture-all: give --capture DIR too")
        if args.jsonl not in (None, "-"):
            check_writable_file("--jsonl", Path(args.jsonl))
        self.args = args
        self.versions = ("1.2", "1.3") if args.tls_version == "all" else (args.tls_version,)
        # Key logs are secrets: a private temporary folder, removed at the end;
        # --evidence copies those of the non-passing results (0600), --capture
        # puts them in the pcapng's Decryption Secrets Block.
        keep_keys = args.evidence is not None or args.capture is not None
        self.keys_tmp = tempfile.TemporaryDirectory(prefix="starttls-keys-") if keep_keys else None
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
        # With --jsonl - the results own stdout; the table goes to stderr.
        self.out: TextIO = sys.stderr if args.jsonl == "-" else sys.stdout
        #: Set when the run is against the built-in peers (for the closing line).
        self.reference = False
        #: Set when the run has several targets: results name theirs.
        self.multi = False
        #: Set when the harness is the client of servers that may refuse for load.
        self.refusals = False
        self.parallel = max(1, getattr(args, "parallel", 1))
        self.pacing: Optional[Pacing] = None
        limit = getattr(args, "max_connections", None)
        rate = getattr(args, "rate", None)
        if limit is not None and limit < 1:
            raise UsageError(f"--max-connections {limit}: give 1 or more")
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise UsageError(f"--rate {rate}: give connections per second above 0, e.g. 0.5")
        if limit is not None or rate is not None:
            self.pacing = Pacing(limit, rate)

    def settings_for(self, label: str) -> RunSettings:
        """Per-target settings: its own key log folder (file names repeat per target)."""
        if self.settings.keylog_dir is None or not self.multi:
            return self.settings
        folder = self.settings.keylog_dir / _slug(label)
        return dataclasses.replace(self.settings, keylog_dir=folder)

    def count(self, scenarios: List[Scenario], dialects: List[str]) -> int:
        return sum(
            1
            for d in dialects
            for v in self.versions
            for s in scenarios
            if d in s.dialects and v in s.tls_versions
        )

    def run(self, jobs: Callable[[], AsyncContextManager[Tuple[str, List[Job]]]]) -> int:
        """Run the jobs (``--parallel`` at once) with one progress display; report."""

        async def main(stream: Optional[TextIO]) -> Tuple[str, List[Result]]:
            async with jobs() as (label, todo):
                progress = _Progress(sum(n for _, _, n in todo), sys.stderr, self.args.quiet)
                redactor = Redactor(self.secrets)
                # The reference peers' jobs all at once: the declared delay of
                # server.ccc-late-close-notify (FTP) overlaps the rest.
                width = len(todo) if self.reference else self.parallel if self.multi else 1
                gate = asyncio.Semaphore(max(1, width))

                def decided(name: str) -> Callable[[Result], None]:
                    def one(result: Result) -> None:
                        if self.multi:
                            result.target = name
                        if self.refusals:
                            _load_refusal(result)
                        progress(result)
                        if stream is not None:
                            line = json.dumps(redactor.result(result).as_dict())
                            stream.write(line + "\n")
                            stream.flush()

                    return one

                async def one_job(name: str, job: Any) -> List[Result]:
                    async with gate:
                        started = time.monotonic()
                        found: List[Result] = await job(decided(name))
                        if self.multi:
                            progress.job_finished(name, found, started)
                        else:
                            progress.job_finished(name)
                    for r in found:  # results a job returns without reporting them
                        if self.multi and not r.target:
                            r.target = name
                    return found

                try:
                    with pacing(self.pacing):
                        batches = await asyncio.gather(
                            *(one_job(name, job) for name, job, _ in todo)
                        )
                finally:
                    progress.close()
                return label, [r for batch in batches for r in batch]

        try:
            with _jsonl_stream(self.args.jsonl) as stream:
                label, results = asyncio.run(main(stream))
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
            if args.capture:
                chosen = [r for r in results if args.capture_all or r.verdict is not Verdict.PASS]
                redactor = Redactor(secrets)
                for r in chosen:  # the comment redacted; the packets hold what crossed
                    port = dialect_named(r.dialect).default_port or None
                    shown = dataclasses.replace(r, summary=redactor.text(r.summary))
                    capture_result(shown, args.capture, service_port=port)
                out.write(f"captures: {len(chosen)} pcapng files in {args.capture}\n")
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_") or "target"


@contextlib.contextmanager
def _jsonl_stream(where: Optional[str]) -> Iterator[Optional[TextIO]]:
    """Where --jsonl writes: nowhere, stdout, or a private file."""
    if where is None:
        yield None
    elif where == "-":
        yield sys.stdout
    else:
        fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            yield f


def _load_refusal(result: Result) -> None:
    """A target that turned us away for load is the cause, not the scenario."""
    if result.verdict not in (Verdict.ERROR, Verdict.FAIL):
        return
    first = next(
        (e.data for e in result.evidence.exchanges if e.direction == "s2c" and e.data), b""
    )
    words = refusal(first) or refusal(result.summary.encode("utf-8"))  # e.g. sanity probe
    if words is not None:
        result.verdict = Verdict.ERROR
        result.rule = None
        result.summary = (
            f"the target refused the connection for load ({words!r}); not a STARTTLS "
            "verdict: retry with --max-connections 1 and/or --rate"
        )


def _select(patterns: Optional[List[str]], role: str) -> List[Scenario]:

    return select(patterns, role=role, catalogue=everything())


def _target_urls(args: argparse.Namespace) -> List[str]:
    """The positional URLs, then those of --targets FILE (``#`` comments)."""
    urls = list(args.target or [])
    if args.targets is not None:
        try:
            text = args.targets.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--targets {args.targets}: {exc.strerror or exc}") from None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                urls.append(line)
        if not urls:
            raise UsageError(f"--targets {args.targets}: no target in the file")
    return list(dict.fromkeys(urls))  # once each, in order


def cmd_check(args: argparse.Namespace) -> int:

    if args.cafile is not None:
        check_cafile("--cafile", args.cafile)
    if args.parallel < 1:
        raise UsageError(f"--parallel {args.parallel}: give a whole number >= 1")
    urls = _target_urls(args)
    roles = ("server",) if urls else ("server", "client", "path")
    chosen = {role: _select(args.only, role) for role in roles}
    if not any(chosen.values()):
        raise UsageError(f"--only {args.only}: no scenario matches")
    setup = _RunSetup(args)
    versions, out = setup.versions, setup.out
    setup.multi = len(urls) > 1

    def server_job(target: ServerTarget, label: Optional[str] = None) -> Job:
        scenarios = chosen["server"]
        name = label or target.url
        settings = setup.settings_for(name)

        async def job(progress: Callable[[Result], None]) -> List[Result]:
            # One target: an unusable one is one line and exit 2 (TargetUnusable,
            # reported by main); in a fleet it stays one error row of its own.
            return await run_server_target(
                scenarios, target, settings, progress, versions, raise_unusable=not setup.multi
            )

        return (name, job, setup.count(scenarios, [target.dialect]))

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

    if not urls:
        return setup.run(reference_jobs)

    targets = []
    for url in urls:
        dialect, host, port = parse_target(url)
        targets.append(
            ServerTarget(
                dialect=dialect,
                host=host,
                port=port,
                cafile=args.cafile,
                server_hostname=args.server_name or host,
                user=args.user,
                password=args.password,
                rcpt=args.rcpt,
            )
        )
    setup.refusals = True

    @contextlib.asynccontextmanager
    async def target_jobs() -> AsyncIterator[Tuple[str, List[Job]]]:
        count = None
        if args.storage_probe:
            count = _storage_probe(args.storage_probe, args.reply_timeout)
            try:
                await count()
            except RuntimeError as exc:
                raise UsageError(f"--storage-probe: {exc}") from None
        jobs: List[Job] = []
        answers = await asyncio.gather(  # all at once: a fleet may have many dead hosts
            *(_reachable(t.host, t.port, args.reply_timeout) for t in targets),
            return_exceptions=True,
        )
        for target, answer in zip(targets, answers):
            target.storage_count = count
            if isinstance(answer, UsageError) and setup.multi:
                jobs.append(_unreachable_job(target, str(answer)))
                continue
            if isinstance(answer, BaseException):
                raise answer
            out.write(f"checking {target.url}\n")
            jobs.append(server_job(target))
        if args.cafile is None:
            out.write("note: the target's certificate is NOT verified (give --cafile to verify)\n")
        label = targets[0].url if len(targets) == 1 else f"{len(targets)} targets"
        yield label, jobs

    return setup.run(target_jobs)


def _unreachable_job(target: ServerTarget, reason: str) -> Job:
    """One error result for a target of a fleet that does not answer."""

    async def job(progress: Callable[[Result], None]) -> List[Result]:
        result = Result(
            id="target.reachable",
            dialect=target.dialect,
            tls_version="any",
            verdict=Verdict.ERROR,
            rule=None,
            summary=reason,
            title="the target accepts a TCP connection",
        )
        progress(result)
        return [result]

    return (target.url, job, 1)


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
