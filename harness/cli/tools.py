"""The peer and inspection subcommands: serve, client, proxy, behaviours, scenarios, states."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import (
    Any,
    Dict,
)

import starttls_harness.proxy as proxy
from starttls_harness.cli.common import (
    EXIT_ERROR,
    EXIT_FAIL,
    EXIT_OK,
    ROLES,
    RULES_DOC,
    UsageError,
    _doc_reference,
    check_cafile,
    check_port,
    check_seconds,
    check_writable_dir,
)
from starttls_harness.cli.output import _set_done
from starttls_harness.cli.proxy_capture import on_closed_capture
from starttls_harness.dialects import DIALECTS, names
from starttls_harness.run.targets import ClientOutcome, ReferenceClientTarget, client_behaviours
from starttls_harness.scenarios.catalogue import everything
from starttls_harness.servers.base import ServerConfig, behaviour_named
from starttls_harness.tls.certs import make_pki
from starttls_harness.tls.states import TRANSITIONS, to_dot


def _add_serve(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="run a reference server in the foreground",
        description=(
            "Start a reference server of any dialect on loopback. It prints its address and "
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


def cmd_scenarios(args: argparse.Namespace) -> int:

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


def _add_client(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "client",
        help="run one session of a reference client (for check-client or by hand)",
        description=(
            "Connect a reference client, require STARTTLS, log in, do the protocol's one piece "
            "of work (send a message, APPEND one, a query ...) and quit; with --cycles N and a "
            "server that offers STOPTLS, return to plaintext and upgrade again N times. The TLS "
            "secrets go to the file SSLKEYLOGFILE names, when it is set (check-path sets it). "
            "Exit 0 on success, 1 on any error."
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
    p.add_argument(
        "--tls-version",
        choices=("1.2", "1.3", "auto"),
        default="auto",
        help="TLS version to offer (default auto: the highest both sides speak, so the "
        "client follows whatever the server under test chose)",
    )
    p.add_argument("--behaviour", default="strict", help="strict or a misbehaving mode")
    p.add_argument("--cycles", type=int, default=1, help="STOPTLS/STARTTLS cycles (default 1)")
    p.add_argument("--timeout", type=float, default=5.0, help="bound of each reply (seconds)")
    p.set_defaults(func=cmd_client)


def cmd_client(args: argparse.Namespace) -> int:

    if args.behaviour != "strict" and args.behaviour not in client_behaviours(args.protocol):
        choices = ", ".join(["strict", *client_behaviours(args.protocol)])
        raise UsageError(f"unknown behaviour {args.behaviour!r}; choose one of: {choices}")
    check_port("--port", args.port, zero=False)
    check_cafile("--cafile", args.cafile)
    check_seconds("--timeout", args.timeout)
    if args.cycles < 1:
        raise UsageError(f"--cycles {args.cycles}: give a whole number >= 1")
    keylog = os.environ.get("SSLKEYLOGFILE") or None  # as OpenSSL, NSS and curl clients do
    target = ReferenceClientTarget(
        args.protocol,
        args.behaviour,
        cycles=args.cycles,
        timeout=args.timeout,
        keylog=Path(keylog) if keylog else None,
    )

    async def session() -> ClientOutcome:
        version = "" if args.tls_version == "auto" else args.tls_version
        return await target.run(args.host, args.port, args.cafile, version)

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
    p.add_argument(
        "--capture",
        type=Path,
        metavar="DIR",
        help="write a pcapng per connection (both legs, real bytes, --keylog inside)",
    )
    p.set_defaults(func=cmd_proxy)


def cmd_states(args: argparse.Namespace) -> int:

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

    for kind, modules in (("server", _server_modules()), ("client", _client_modules())):
        for dialect, name in modules.items():
            module = importlib.import_module(name)
            print(f"{dialect} {kind}:")
            for behaviour in module.BEHAVIOURS.values():
                rule = behaviour.rule.value if behaviour.rule else "--"
                print(f"  {behaviour.name:<26} {rule:<3} {behaviour.description}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:

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


def cmd_proxy(args: argparse.Namespace) -> int:

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
    if args.capture is not None:
        check_writable_dir("--capture", args.capture)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)

        def started(p: proxy.Proxy) -> None:
            # run_proxy has printed the banner (address, key log, faults).
            if args.capture is not None:
                on_closed_capture(p, args.capture, args.keylog, args.dialect)
                print(f"captures: one pcapng per connection in {args.capture}", flush=True)
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
