"""``check-path``: the fault proxy between a client program and a running server."""

from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path
from typing import AsyncIterator, Callable, List, Tuple

from starttls_harness.cli.checks import (
    Job,
    _add_run_options,
    _reachable,
    _RunSetup,
    _select,
    _storage_probe,
)
from starttls_harness.cli.common import UsageError, check_cafile, parse_target
from starttls_harness.report.verdicts import Result
from starttls_harness.run.path import run_path_target
from starttls_harness.run.path_command import command_pair
from starttls_harness.run.targets import require_port_placeholder

__all__ = ["_add_check_path", "cmd_check_path"]

DESCRIPTION = """\
Put the fault proxy (the attacker on the wire) between a client program and a
running server, and run COMMAND once per path scenario and TLS version against
the proxy. The verdict comes from what the proxy saw each side do after the
fault (plaintext answered, plaintext resumed without a bidirectional
close_notify, a truncation taken as an end) and the client's exit status; a
non-passing result names the side that broke the rule (client or server).

In COMMAND's arguments {host} and {port} (the proxy), {cafile} (--cafile),
{tls_version}, {user} and {password} are replaced. The client should connect,
require STARTTLS, do its work, quit, and exit 0 on success. SSLKEYLOGFILE is set
in its environment: a client that writes it lets the proxy see TLS 1.3
close_notify; else --server-keylog, else the proxy follows TLS 1.3 by record
position (the evidence says which). Scenarios that need STOPTLS skip when the
pair does not use it. A command without {tls_version} negotiates its own
version: give --tls-version to say which one the results are labelled with."""


def _add_check_path(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "check-path",
        help="run the path catalogue between a client program and a server",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "exit status: as for check\n\n"
            "example (Dovecot and curl; more in docs/check-path.md):\n"
            "  check-path imap://127.0.0.1:143 --cafile ca.pem --user u --password p \\\n"
            "      -- curl -sS --ssl-reqd --cacert {cafile} -u {user}:{password} \\\n"
            "      imap://localhost:{port}/INBOX"
        ),
    )
    p.add_argument("target", metavar="SERVER_URL", help="smtp://HOST:PORT, ftp://HOST:PORT, ...")
    _add_options(p)
    # Everything after SERVER_URL: more options, then -- and the command.
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="[OPTION...] -- COMMAND ARG...")
    p.set_defaults(func=cmd_check_path)


def _add_options(p: argparse.ArgumentParser) -> None:
    _add_run_options(p)
    p.add_argument("--cafile", type=Path, help="CA of the server's certificate, passed as {cafile}")
    p.add_argument("--user", default="", help="the client's login, passed as {user}")
    p.add_argument(
        "--password",
        default="",
        help="its password, passed as {password} (hidden in every report and ladder)",
    )
    p.add_argument(
        "--server-keylog",
        type=Path,
        metavar="FILE",
        help="the server's TLS key log, used when the client writes none",
    )
    p.add_argument(
        "--storage-probe",
        metavar="COMMAND",
        help="a command (no shell) that prints how many messages the server holds; "
        "lets path.truncate-c2s see whether a cut message was stored (as in check)",
    )


def _split(args: argparse.Namespace) -> List[str]:
    """The client command; options between SERVER_URL and ``--`` go into ``args``."""
    rest: List[str] = list(args.command)
    if "--" not in rest:
        if rest and rest[0].startswith("-"):
            raise UsageError("put -- between the options and the client command")
        return rest
    cut = rest.index("--")
    head, argv = rest[:cut], rest[cut + 1 :]
    if head:
        options = argparse.ArgumentParser(prog="starttls-harness check-path", add_help=False)
        _add_options(options)
        defaults = vars(options.parse_args([]))
        given = vars(options.parse_args(head))
        for name, value in given.items():
            if value != defaults[name]:
                setattr(args, name, value)
    return argv


def cmd_check_path(args: argparse.Namespace) -> int:
    argv = _split(args)
    if not argv:
        raise UsageError("give the client command after --, e.g. -- python3 send.py {port}")
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        raise UsageError(f"{argv[0]!r}: command not found")
    dialect, host, port = parse_target(args.target)
    if args.cafile is not None:
        check_cafile("--cafile", args.cafile)
    if args.server_keylog is not None and args.server_keylog.is_dir():
        raise UsageError(f"--server-keylog {args.server_keylog}: a directory, not a file")
    scenarios = [s for s in _select(args.only, "path") if dialect in s.dialects]
    if not scenarios:
        raise UsageError(f"--only {args.only}: no path scenario matches")
    if not any("{tls_version}" in a for a in argv) and args.tls_version == "all":
        args.tls_version = "1.3"  # the client negotiates: one run per scenario
    setup = _RunSetup(args)
    if args.password:
        setup.secrets.append(args.password)
    versions: Tuple[str, ...] = setup.versions
    count = _storage_probe(args.storage_probe, args.reply_timeout) if args.storage_probe else None
    pair = command_pair(
        dialect,
        (host, port),
        argv,
        args.cafile if args.cafile is not None else Path("/dev/null"),
        user=args.user,
        password=args.password,
        timeout=args.timeout,
        server_keylog=args.server_keylog,
        tls_versions=versions,
        storage_count=count,
    )

    @contextlib.asynccontextmanager
    async def jobs() -> AsyncIterator[Tuple[str, List[Job]]]:
        async def job(progress: Callable[[Result], None]) -> List[Result]:
            return await run_path_target(scenarios, pair, setup.settings, progress, setup.versions)

        await _reachable(host, port, args.reply_timeout)
        require_port_placeholder(argv)  # the proxy listens on a new port for every run
        if count is not None:
            try:
                await count()  # a probe that cannot count is a usage error, before anything runs
            except RuntimeError as exc:
                raise UsageError(f"--storage-probe: {exc}") from None
        label = f"{args.target} <- proxy <- {' '.join(argv)}"
        setup.out.write(f"checking the path: {label}\n")
        yield label, [(label, job, setup.count(scenarios, [dialect]))]

    return setup.run(jobs)
