"""Render realworld/expected.json as the table in realworld/README.md.

    python -m realworld.table           # rewrite the table between the markers
    python -m realworld.table --check   # exit 1 if the README is out of date

The README shows the data itself, so the docs cannot drift from the table
the tier enforces (tests/test_realworld.py runs the check).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from realworld import compare


def catalogue_rules() -> Dict[str, str]:
    """Scenario id -> the rule it guards, from the catalogue this checkout runs."""
    from starttls_harness.scenarios.server import CATALOGUE

    return {s.id: s.rule.value for s in CATALOGUE}


def expected_readme(
    tables: Mapping[str, compare.ServerTable], readme: Path = compare.README_FILE
) -> str:
    """The README text as it should be for ``tables``."""
    table = compare.render_table(tables, catalogue_rules())
    return compare.replace_table(readme.read_text(encoding="utf-8"), table)


def write_readme(
    tables: Mapping[str, compare.ServerTable], readme: Path = compare.README_FILE
) -> None:
    readme.write_text(expected_readme(tables, readme), encoding="utf-8")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m realworld.table", description=__doc__)
    p.add_argument("--check", action="store_true", help="only check that the README is current")
    p.add_argument("--expected", type=Path, default=compare.EXPECTED_FILE)
    p.add_argument("--readme", type=Path, default=compare.README_FILE)
    args = p.parse_args(argv)
    tables = compare.load_expected(args.expected)
    wanted = expected_readme(tables, args.readme)
    if args.check:
        if args.readme.read_text(encoding="utf-8") != wanted:
            print(f"{args.readme}: the table is out of date; run 'python -m realworld.table'")
            return 1
        print(f"{args.readme}: the table matches {args.expected.name}")
        return 0
    args.readme.write_text(wanted, encoding="utf-8")
    print(f"{args.readme}: table written from {args.expected.name}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
