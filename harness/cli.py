"""The ``starttls-harness`` command: one runner, subcommands per job.

Exit status (stable, for CI): 0 success, 1 a scenario failed, 2 an error or
wrong usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

from harness import __version__

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Test STARTTLS implementations: the upgrade from plaintext to TLS, and the
return to plaintext after a bidirectional close_notify (rules R1-R9 of the
closure spec).

examples:
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
    p.add_argument("protocol", choices=("smtp", "imap"), help="the dialect to serve")
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


def _add_states(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "states",
        help="print the engine's transition table",
        description="Print the STARTTLS/closure engine's (state, input) -> state table.",
    )
    p.add_argument("--dot", action="store_true", help="Graphviz format")
    p.set_defaults(func=cmd_states)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starttls-harness",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(sub)
    _add_behaviours(sub)
    _add_states(sub)
    return parser


# ------------------------------------------------------------------ commands


def cmd_states(args: argparse.Namespace) -> int:
    from harness.states import TRANSITIONS, to_dot

    if args.dot:
        print(to_dot())
    else:
        for (state, event), target in TRANSITIONS.items():
            print(f"{state.value:>15}  --{event.value}-->  {target.value}")
    return EXIT_OK


def _server_modules() -> Dict[str, str]:
    return {"smtp": "servers.smtp", "imap": "servers.imap"}


def _client_modules() -> Dict[str, str]:
    return {"smtp": "clients.smtp", "imap": "clients.imap"}


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

    from harness.certs import make_pki
    from servers.base import ServerConfig, behaviour_named

    module = importlib.import_module(_server_modules()[args.protocol])
    try:
        behaviour_named(module.BEHAVIOURS, args.behaviour)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="starttls-harness-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    pki = make_pki(directory=state_dir)
    config = ServerConfig(
        pki=pki,
        host=args.host,
        port=args.port,
        tls_version=None if args.tls_version == "all" else args.tls_version,
        behaviour=args.behaviour,
        keylog=state_dir / "keys.log",
    )

    async def serve() -> None:
        running = await module.start_server(config)
        host, port = running.address
        print(f"{args.protocol.upper()} reference server ({args.behaviour}) on {host}:{port}")
        print(f"  trust this CA:  {pki.cafile}")
        print(f"  TLS key log:    {config.keylog}")
        print("  Ctrl-C stops it.", flush=True)
        stop = asyncio.get_running_loop().create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(sig, _set_done, stop)
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


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def main(argv: Optional[List[str]] = None) -> int:
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
