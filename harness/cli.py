"""The ``starttls-harness`` command: one runner, subcommands per job.

Exit status (stable, for CI): 0 success, 1 a scenario failed, 2 an error or
wrong usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncContextManager,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Set,
    TextIO,
    Tuple,
)

from starttls_harness import __version__
from starttls_harness.dialects import DIALECTS, dialect_of_scheme, names, schemes

if TYPE_CHECKING:
    from starttls_harness.report.verdicts import Result, Verdict
    from starttls_harness.run.targets import ClientOutcome
    from starttls_harness.scenarios.server import Scenario

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Test STARTTLS implementations: the upgrade from plaintext to TLS, and the
return to plaintext after a bidirectional close_notify (rules R1-R9, explained
in docs/rules.md).

examples:
  starttls-harness check                      # every scenario vs the built-in reference peers
  starttls-harness check smtp://127.0.0.1:2525 --cafile ca.pem --json report.json
  starttls-harness check imap://127.0.0.1:143 --only 'server.command-injection*'
  starttls-harness serve smtp                 # strict reference SMTP server
  starttls-harness serve imap --port 1143 --tls-version 1.3
  starttls-harness serve smtp --behaviour keep-buffer   # a known-bad peer
  starttls-harness behaviours                 # list the misbehaving modes
  starttls-harness states --dot | dot -Tsvg > states.svg
"""


class UsageError(Exception):
    """Wrong usage: reported as one line, exit status 2."""


def _add_serve(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="run a reference server in the foreground",
        description=(
            "Start a reference server (SMTP or IMAP) on loopback. It prints its address and "
            "the CA file to trust, writes a TLS key log for Wireshark, and stops on Ctrl-C. "
            "STARTTLS is offered in plaintext, STOPTLS inside TLS."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "example:\n  starttls-harness serve smtp --port 0\n"
            "  openssl s_client -starttls smtp -connect 127.0.0.1:PORT -CAfile CAFILE"
        ),
    )
    p.add_argument("protocol", choices=names(), help="the dialect to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default: 0)")
    p.add_argument(
        "--tls-version",
        choices=("1.2", "1.3", "all"),
        default="all",
        help="TLS version(s) to accept (default: %(default)s)",
    )
    p.add_argument(
        "--behaviour",
        default="strict",
        help="'strict' (default) or a misbehaving mode; see 'starttls-harness behaviours'",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where to write ca.pem, server.pem, server.key (0600) and keys.log "
        "(default: a new temporary directory)",
    )
    p.set_defaults(func=cmd_serve)


def _add_behaviours(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "behaviours",
        help="list the misbehaving modes of the reference peers",
        description=(
            "List every named behaviour of the reference servers and clients, "
            "with the rule it breaks."
        ),
    )
    p.set_defaults(func=cmd_behaviours)


ROLES = ("server", "client", "path")
RULES_DOC = "docs/rules.md"


def _add_scenarios(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "scenarios",
        help="list the scenario catalogue of every role (ids for --only)",
        description=(
            "List every scenario -- server.* (the harness is the client), client.* (the "
            "harness is the server) and path.* (the harness is on the path between the "
            "two) -- with its rule, dialects and title. --long adds the reference and the "
            f"reason. The rules R1-R9 and the verdicts are explained in {RULES_DOC}."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  starttls-harness scenarios\n"
            "  starttls-harness scenarios --role client --long"
        ),
    )
    p.add_argument("--role", choices=ROLES, help="list only this role's scenarios")
    p.add_argument("--long", action="store_true", help="also print reference and reason")
    p.set_defaults(func=cmd_scenarios)


def _doc_reference(text: str) -> str:
    """Scenario references name the rules file; point at the project's copy."""
    return re.sub(r"(?:shared/spec/)?closure-rules\.md", RULES_DOC, text)


def cmd_scenarios(args: argparse.Namespace) -> int:
    from starttls_harness.scenarios.catalogue import everything

    roles = (args.role,) if args.role else ROLES
    catalogue = [s for role in roles for s in everything() if s.role == role]
    width = max(len(s.id) for s in catalogue)
    if args.long:
        print(f"rules R1-R9, STOPTLS and the verdicts: {RULES_DOC}\n")
    for s in catalogue:
        print(f"{s.id:<{width}}  {s.rule.value:<2}  {'/'.join(s.dialects):<9}  {s.title}")
        if args.long:
            indent = " " * (width + 2)
            print(f"{indent}reference: {_doc_reference(s.reference)}")
            print(f"{indent}why: {s.reason}")
    return EXIT_OK


def _add_states(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "states",
        help="print the engine's transition table",
        description="Print the STARTTLS/closure engine's (state, input) -> state table.",
    )
    p.add_argument("--dot", action="store_true", help="Graphviz format")
    p.set_defaults(func=cmd_states)


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
    from starttls_harness.run.client import run_client_target
    from starttls_harness.run.targets import CommandClientTarget

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


def _add_client(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "client",
        help="run one session of a reference client (for check-client or by hand)",
        description=(
            "Connect a reference client, require STARTTLS, log in, send a message (SMTP) or "
            "APPEND one (IMAP) and quit; with --cycles N and a server that offers STOPTLS, "
            "return to plaintext and upgrade again N times. Exit 0 on success, 1 on any error."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "example (the reference client checked by the client catalogue):\n"
            "  starttls-harness check-client --protocol imap -- \\\n"
            "      starttls-harness client imap --port {port} --cafile {cafile}"
        ),
    )
    p.add_argument("protocol", choices=names())
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--cafile", type=Path, required=True, help="CA that signed the server's certificate"
    )
    p.add_argument("--tls-version", choices=("1.2", "1.3"), default="1.3")
    p.add_argument("--behaviour", default="strict", help="strict or a misbehaving mode")
    p.add_argument("--cycles", type=int, default=1, help="STOPTLS/STARTTLS cycles (default 1)")
    p.add_argument("--timeout", type=float, default=5.0, help="bound of each reply (seconds)")
    p.set_defaults(func=cmd_client)


def cmd_client(args: argparse.Namespace) -> int:
    from starttls_harness.run.targets import ReferenceClientTarget, client_behaviours

    if args.behaviour != "strict" and args.behaviour not in client_behaviours(args.protocol):
        choices = ", ".join(["strict", *client_behaviours(args.protocol)])
        raise UsageError(f"unknown behaviour {args.behaviour!r}; choose one of: {choices}")
    check_port("--port", args.port, zero=False)
    check_cafile("--cafile", args.cafile)
    check_seconds("--timeout", args.timeout)
    if args.cycles < 1:
        raise UsageError(f"--cycles {args.cycles}: give a whole number >= 1")
    target = ReferenceClientTarget(
        args.protocol, args.behaviour, cycles=args.cycles, timeout=args.timeout
    )

    async def session() -> ClientOutcome:
        return await target.run(args.host, args.port, args.cafile, args.tls_version)

    outcome = asyncio.run(session())
    print(f"{'ok' if outcome.ok else 'failed'}: {outcome.detail}")
    return EXIT_OK if outcome.ok else EXIT_FAIL


def _add_proxy(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "proxy",
        help="run the on-path fault injector between any client and server",
        description=(
            "Relay TCP between a client and a server, follow the dialect's STARTTLS/STOPTLS and "
            "the TLS records, apply the given faults at named protocol points and log every "
            "unit relayed and every fault applied, one line each. Under TLS 1.3 give --keylog "
            "(SSLKEYLOGFILE of the client or server) so close_notify can be recognised by "
            "decryption; without it the proxy guesses by position and says so."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  starttls-harness proxy --listen 127.0.0.1:2526 --upstream 127.0.0.1:2525 \\\n"
            "      --fault inject-after-starttls:c2s\n"
            "  starttls-harness proxy --listen 127.0.0.1:1144 --upstream 127.0.0.1:1143 \\\n"
            "      --dialect imap --keylog keys.log --fault drop-close-notify-s2c\n"
            "  starttls-harness proxy --list-faults"
        ),
    )
    p.add_argument("--listen", metavar="HOST:PORT", help="where the client connects")
    p.add_argument("--upstream", metavar="HOST:PORT", help="the real server")
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME",
        help="a fault to apply (repeatable); see --list-faults",
    )
    p.add_argument("--dialect", choices=names(), default="smtp")
    p.add_argument("--keylog", type=Path, help="TLS key log (SSLKEYLOGFILE format)")
    p.add_argument("--list-faults", action="store_true", help="list the fault names and exit")
    p.set_defaults(func=cmd_proxy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starttls-harness",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_check(sub)
    _add_check_client(sub)
    _add_serve(sub)
    _add_client(sub)
    _add_proxy(sub)
    _add_scenarios(sub)
    _add_behaviours(sub)
    _add_states(sub)
    return parser


# ------------------------------------------------------------------ commands


def cmd_states(args: argparse.Namespace) -> int:
    from starttls_harness.tls.states import TRANSITIONS, to_dot

    if args.dot:
        print(to_dot())
    else:
        for (state, event), target in TRANSITIONS.items():
            print(f"{state.value:>15}  --{event.value}-->  {target.value}")
    return EXIT_OK


def _server_modules() -> Dict[str, str]:
    """The reference server module of every registered dialect."""
    return {d.name: d.server_module for d in DIALECTS.values()}


def _client_modules() -> Dict[str, str]:
    """The reference client module of every registered dialect."""
    return {d.name: d.client_module for d in DIALECTS.values()}


def cmd_behaviours(args: argparse.Namespace) -> int:
    import importlib

    for kind, modules in (("server", _server_modules()), ("client", _client_modules())):
        for dialect, name in modules.items():
            module = importlib.import_module(name)
            print(f"{dialect} {kind}:")
            for behaviour in module.BEHAVIOURS.values():
                rule = behaviour.rule.value if behaviour.rule else "--"
                print(f"  {behaviour.name:<26} {rule:<3} {behaviour.description}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib

    from starttls_harness.servers.base import ServerConfig, behaviour_named
    from starttls_harness.tls.certs import make_pki

    module = importlib.import_module(_server_modules()[args.protocol])
    try:
        behaviour_named(module.BEHAVIOURS, args.behaviour)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_port("--port", args.port, zero=True)
    _quiet_aiosmtpd()
    # The folder holds the server's private key: a temporary one is removed
    # however serve ends (Ctrl-C, SIGTERM, an error); SIGTERM is turned into
    # an interrupt until the event loop takes it over.
    temporary = args.state_dir is None
    try:
        previous: Any = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: signals stay as they are
        previous = None
    try:
        if temporary:
            state_dir = Path(tempfile.mkdtemp(prefix="starttls-harness-"))
        else:
            state_dir = args.state_dir
            try:
                state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise UsageError(f"--state-dir {state_dir}: {exc.strerror or exc}") from None
        pki = make_pki(directory=state_dir)
        config = ServerConfig(
            pki=pki,
            host=args.host,
            port=args.port,
            tls_version=None if args.tls_version == "all" else args.tls_version,
            behaviour=args.behaviour,
            keylog=state_dir / "keys.log",
        )
        return _serve(args, module, config, temporary)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if temporary:
            shutil.rmtree(state_dir, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _quiet_aiosmtpd() -> None:
    """aiosmtpd logs every odd command of the reference server to stderr;
    the harness says what happened in its own words."""
    logging.getLogger("mail.log").setLevel(logging.CRITICAL)


def _serve(args: argparse.Namespace, module: Any, config: Any, temporary: bool) -> int:
    """Serve until Ctrl-C or SIGTERM; ``config`` is the server's ServerConfig."""
    pki = config.pki
    state_dir = Path(config.keylog).parent

    async def serve() -> None:
        running = await module.start_server(config)
        host, port = running.address
        # Ctrl-C is handled before "Ctrl-C stops it" is said.
        stop = asyncio.get_running_loop().create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(sig, _set_done, stop)
        print(f"{args.protocol.upper()} reference server ({args.behaviour}) on {host}:{port}")
        print(f"  trust this CA:  {pki.cafile}")
        print(f"  TLS key log:    {config.keylog}")
        if temporary:
            print(f"  {state_dir} is removed when it stops (keep it: --state-dir DIR)")
        print("  Ctrl-C stops it.", flush=True)
        try:
            await stop
        finally:
            await running.close()
            print("stopped.", flush=True)

    try:
        asyncio.run(serve())
    except OSError as exc:
        print(
            f"starttls-harness: cannot serve on {args.host}:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return EXIT_OK


def parse_target(text: str) -> Tuple[str, str, int]:
    """``smtp://HOST:PORT`` -> (dialect, host, port), or UsageError.

    The schemes are those of the registered dialects.
    """
    parsed = urllib.parse.urlsplit(text)
    try:
        dialect = dialect_of_scheme(parsed.scheme).name
    except ValueError:
        forms = " or ".join(f"{scheme}://HOST:PORT" for scheme in schemes())
        raise UsageError(f"target {text!r}: use {forms}") from None
    try:
        port = parsed.port
    except ValueError:
        raise UsageError(f"target {text!r}: the port is not a number") from None
    if not parsed.hostname or port is None:
        raise UsageError(f"target {text!r}: HOST and PORT are both required")
    return dialect, parsed.hostname, port


# ------------------------------------------------------------------ checks
# Bad input is found before anything runs: one line on stderr, exit 2, never
# a traceback after a whole run (which CI would read as "a scenario failed").


def check_seconds(option: str, value: float) -> None:
    """A bound in seconds must be a finite number above zero."""
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{option} {value}: give a number of seconds above 0, e.g. 5")


def check_port(option: str, value: int, *, zero: bool) -> None:
    """A TCP port: 1-65535 (0 too where it means "pick a free one")."""
    if not (0 if zero else 1) <= value <= 65535:
        raise UsageError(f"{option} {value}: a port is {'0' if zero else '1'}-65535")


def check_cafile(option: str, path: Path) -> None:
    """The file must hold at least one PEM certificate."""
    import ssl

    if not path.is_file():
        raise UsageError(f"{option} {path}: no such file")
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except ssl.SSLError:
        raise UsageError(f"{option} {path}: not a PEM certificate file") from None
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror or exc}") from None


def _private_dir(path: Path) -> None:
    """Create ``path`` (and its parents); the folder itself 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def check_writable_file(option: str, path: Path) -> None:
    """Prove now that the report can be written at the end of the run."""
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    existed = path.exists()
    try:
        _private_dir(path.parent)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write there: {exc.strerror or exc}") from None
    if not existed:
        path.unlink()


def check_writable_dir(option: str, path: Path) -> None:
    """Prove now that evidence files can be written into ``path``."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: is a file; give a folder")
    try:
        _private_dir(path)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write there: {exc.strerror or exc}") from None


class _Progress:
    """On a terminal, one line redrawn in place; elsewhere (CI logs) one line
    per target when its runs are done, never one per scenario."""

    def __init__(self, total: int, out: TextIO, quiet: bool) -> None:
        self.total = total
        self.done = 0
        self.out = out
        self.quiet = quiet
        self.tty = out.isatty()
        self.job_done = 0
        self.job_t0 = time.monotonic()
        self.counts: Dict[str, int] = {}

    def __call__(self, result: Result) -> None:
        self.done += 1
        self.job_done += 1
        self.counts[result.verdict.value] = self.counts.get(result.verdict.value, 0) + 1
        if self.quiet or not self.tty:
            return
        line = (
            f"[{self.done:>3}/{self.total}] {result.verdict.value:<5} "
            f"{result.id} ({result.dialect}, TLS {result.tls_version})"
        )
        # A line wider than the terminal would wrap, and \r redraws only the last row.
        self.out.write("\r\033[K" + line[: max(1, self._columns() - 1)])
        self.out.flush()

    def _columns(self) -> int:
        """The width of the terminal the progress goes to (not stdout's)."""
        try:
            return os.get_terminal_size(self.out.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            return shutil.get_terminal_size((80, 24)).columns

    def job_finished(self, label: str) -> None:
        """One target's runs are over: a heartbeat line in a log."""
        if not self.quiet and not self.tty:
            verdicts = ", ".join(f"{n} {v}" for v, n in sorted(self.counts.items()))
            took = time.monotonic() - self.job_t0
            self.out.write(f"{label}: {self.job_done} runs in {took:.2f} s ({verdicts})\n")
            self.out.flush()
        self.job_done = 0
        self.counts = {}
        self.job_t0 = time.monotonic()

    def close(self) -> None:
        """Leave the terminal line empty for the table."""
        if not self.quiet and self.tty and self.done:
            self.out.write("\r\033[K")
            self.out.flush()


Job = Tuple[str, Callable[[Callable[["Result"], None]], Awaitable[List["Result"]]], int]


class _RunSetup:
    """What ``check`` and ``check-client`` share: bounds, key logs, output."""

    def __init__(self, args: argparse.Namespace) -> None:
        from starttls_harness.run.server import RunSettings

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
        from starttls_harness.report.formats import (
            summary_table,
            to_json,
            to_junit,
            write_evidence,
            write_json,
            write_junit,
        )
        from starttls_harness.report.verdicts import Verdict

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


def _after_reference_run(runs: int, verdicts: Set[Verdict]) -> str:
    """One line: what a run against the built-in peers proved, and what next."""
    from starttls_harness.report.verdicts import Verdict

    if Verdict.FAIL in verdicts or Verdict.ERROR in verdicts:
        return (
            "the built-in reference peers should pass everything: this is a bug in "
            "starttls-harness or its set-up here; please report it with the --evidence files"
        )
    return (
        f"proved: all {runs} runs pass against the built-in conforming peers, so the harness "
        "works on this machine. Next, yours: `starttls-harness check smtp://your-server:25` "
        "(a server), `starttls-harness check-client --protocol smtp -- your-client ...` "
        "(a client)"
    )


def _select(patterns: Optional[List[str]], role: str) -> List[Scenario]:
    from starttls_harness.scenarios.catalogue import everything, select

    return select(patterns, role=role, catalogue=everything())


def cmd_check(args: argparse.Namespace) -> int:
    from starttls_harness.run.server import ServerTarget, run_server_target

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
        from starttls_harness.run.reference import reference_servers
        from starttls_harness.servers.base import ServerConfig

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
    from starttls_harness.run.client import run_client_target
    from starttls_harness.run.targets import ReferenceClientTarget

    jobs: List[Job] = []
    for dialect in names() if scenarios else ():
        target = ReferenceClientTarget(dialect)

        async def job(progress: Callable[[Result], None], t: Any = target) -> List[Result]:
            return await run_client_target(scenarios, t, setup.settings, progress, setup.versions)

        jobs.append((f"reference {dialect} client", job, setup.count(scenarios, [dialect])))
    return jobs


def _path_jobs(scenarios: List[Scenario], setup: _RunSetup) -> List[Job]:
    """The path catalogue: reference client -> fault proxy -> reference server."""
    from starttls_harness.run.path import reference_pair, run_path_target

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


def cmd_proxy(args: argparse.Namespace) -> int:
    import starttls_harness.proxy as proxy

    if args.list_faults:
        for name, text in proxy.FAULT_NAMES.items():
            print(f"  {name:<28} {text}")
        return EXIT_OK
    if not args.listen or not args.upstream:
        raise UsageError("proxy needs --listen HOST:PORT and --upstream HOST:PORT")
    try:
        faults = [proxy.parse_fault(f) for f in args.fault]
        listen = proxy.parse_address(args.listen)
        upstream = proxy.parse_address(args.upstream)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)

        def started(p: proxy.Proxy) -> None:
            # run_proxy has printed the banner (address, key log, faults).
            print("Ctrl-C stops it.", flush=True)

        await proxy.run_proxy(
            listen,
            upstream,
            args.dialect,
            faults,
            args.keylog,
            sys.stdout,
            stop=stop,
            on_start=started,
        )

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"starttls-harness: proxy: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _PipeSafe:
    """A text stream that survives its reader going away (``| head``).

    The first write to a closed pipe points the file descriptor at
    /dev/null, so the command runs to its end -- reports written, the exit
    status true to the verdicts -- without a BrokenPipeError traceback, now
    or when the interpreter flushes the stream at exit.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._divert()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._divert()

    def _divert(self) -> None:
        self.broken = True
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError, AttributeError):
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)

    def isatty(self) -> bool:
        return not self.broken and self._stream.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _pipe_safe_streams() -> Iterator[None]:
    """sys.stdout and sys.stderr as _PipeSafe streams, for one command."""
    saved = sys.stdout, sys.stderr
    sys.stdout = _PipeSafe(saved[0])
    sys.stderr = _PipeSafe(saved[1])
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        sys.stdout, sys.stderr = saved


def main(argv: Optional[List[str]] = None) -> int:
    with _pipe_safe_streams():
        parser = build_parser()
        args = parser.parse_args(argv)
        func: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "func", None)
        if func is None:
            parser.print_help()
            return EXIT_ERROR
        try:
            return func(args)
        except UsageError as exc:
            print(f"starttls-harness: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
