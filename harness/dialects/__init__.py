"""The dialect registry: every protocol the harness speaks, by name.

A dialect is one module in this package holding everything the harness knows
about that protocol.  Everything else looks dialects up here and never
branches on a dialect's name; an unknown name is an error that says which
names exist.
"""

from __future__ import annotations

from typing import Dict, Tuple

from starttls_harness.dialects.base import Dialect, LinePredicate, Reply
from starttls_harness.dialects.imap import IMAP
from starttls_harness.dialects.smtp import SMTP

__all__ = [
    "DIALECTS",
    "IMAP",
    "SMTP",
    "Dialect",
    "LinePredicate",
    "Reply",
    "dialect_named",
    "names",
]

DIALECTS: Dict[str, Dialect] = {d.name: d for d in (SMTP, IMAP)}


def names() -> Tuple[str, ...]:
    """The registered dialect names, in registration order."""
    return tuple(DIALECTS)


def dialect_named(name: str) -> Dialect:
    try:
        return DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown dialect {name!r}; known: {', '.join(DIALECTS)}") from None
