"""The ``starttls-harness`` command: one runner, subcommands per job.

Exit status (stable, for CI): 0 success, 1 a scenario failed, 2 an error or
wrong usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from typing import (
    Callable,
    List,
    Optional,
)

from starttls_harness import __version__
from starttls_harness.cli.checks import _add_check, _add_check_client
from starttls_harness.cli.common import EXIT_ERROR, EXIT_INTERRUPTED, UsageError
from starttls_harness.cli.output import _pipe_safe_streams
from starttls_harness.cli.path import _add_check_path
from starttls_harness.cli.tools import (
    _add_behaviours,
    _add_client,
    _add_proxy,
    _add_scenarios,
    _add_serve,
    _add_states,
)
from starttls_harness.run.sanity import TargetUnusable
from starttls_harness.run.targets import MissingPortPlaceholder

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
    _add_check_path(sub)
    _add_serve(sub)
    _add_client(sub)
    _add_proxy(sub)
    _add_scenarios(sub)
    _add_behaviours(sub)
    _add_states(sub)
    return parser


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
        except (UsageError, MissingPortPlaceholder) as exc:
            print(f"starttls-harness: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except TargetUnusable as exc:
            # One cause, one line: the target cannot be tested at all.
            print(f"starttls-harness: {exc.line}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
