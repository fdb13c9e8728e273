"""Print how many complete messages a private Postfix or Dovecot instance holds.

    python realworld/count_stored.py postfix STATE/postfix   # queue + Maildir
    python realworld/count_stored.py dovecot STATE/dovecot   # the test user's Maildir
    python realworld/count_stored.py maildir PATH            # any Maildir
    python realworld/count_stored.py sieve STATE/dovecot     # the test user's Sieve scripts
    python realworld/count_stored.py inn STATE/inn           # articles nnrpd spooled

This is the storage probe of the truncation scenario (R6: a message cut by
a TCP FIN must not be stored), in the form a command line can take: one
integer on stdout.  Standard library only, so it runs from any directory
with any interpreter.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import List, Optional

__all__ = [
    "count_maildir",
    "count_postfix_queue",
    "count_sieve_scripts",
    "count_spooled",
    "count_stored",
]

#: Queue directories that hold finished messages (``maildrop`` is local
#: submission, ``corrupt`` what Postfix could not read).
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")


def count_maildir(path: Path) -> int:
    """Complete messages in a Maildir: ``new`` and ``cur`` (``tmp`` is in flight)."""
    total = 0
    for sub in ("new", "cur"):
        try:
            total += sum(1 for f in (path / sub).iterdir() if f.is_file())
        except FileNotFoundError:
            pass
    return total


def count_postfix_queue(queue: Path) -> int:
    """Complete queue files: Postfix sets the owner-execute bit when one is done.

    A file ``cleanup`` is still writing (or will remove because its client
    went away mid-DATA) has mode 0600 and is not counted.
    """
    total = 0
    for sub in QUEUES:
        for dirpath, _dirs, files in os.walk(queue / sub):
            for name in files:
                try:
                    mode = os.lstat(os.path.join(dirpath, name)).st_mode
                except FileNotFoundError:
                    continue  # delivered or removed while we looked
                if stat.S_ISREG(mode) and mode & stat.S_IXUSR:
                    total += 1
    return total


def count_stored(kind: str, root: Path) -> int:
    """Messages held by the instance of ``kind`` living in ``root``."""
    if kind == "postfix":
        return count_postfix_queue(root / "queue") + count_maildir(root / "mail" / "sink")
    if kind == "dovecot":
        return count_maildir(root / "mail" / "tester")
    if kind == "maildir":
        return count_maildir(root)
    if kind == "sieve":
        return count_sieve_scripts(root / "mail" / "tester" / "sieve")
    if kind == "inn":
        return count_spooled(root / "spool" / "incoming")
    raise ValueError(f"unknown kind {kind!r}: use postfix, dovecot, maildir, sieve or inn")


def count_sieve_scripts(path: Path) -> int:
    """Scripts stored by ManageSieve (``NAME.sieve``; uploads in flight are in ``tmp/``)."""
    try:
        return sum(1 for entry in os.scandir(path) if entry.name.endswith(".sieve"))
    except FileNotFoundError:
        return 0


def count_spooled(incoming: Path) -> int:
    """Articles INN's nnrpd spooled (``spoolfirst``): regular files in ``incoming``."""
    try:
        return sum(1 for entry in os.scandir(incoming) if entry.is_file(follow_symlinks=False))
    except OSError:
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: count_stored.py {postfix|dovecot|maildir|sieve|inn} DIR", file=sys.stderr)
        return 2
    try:
        print(count_stored(args[0], Path(args[1])))
    except ValueError as exc:
        print(f"count_stored: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
