"""The dialect registry: every protocol the harness speaks, by name.

A dialect is one module in this package holding everything the harness knows
about that protocol (see :mod:`starttls_harness.dialects.base` for what that
is).  Everything else looks dialects up here and never branches on a
dialect's name: the CLI's choices and URL schemes, the catalogue's
applicability (:data:`EVERY_DIALECT`), the pytest plugin and the report
schema's dialect enum all come from this registry.  An unknown name is an
error that says which names exist; an incomplete dialect is refused when it
is registered, with an error naming it and what it lacks.

Adding a dialect: write ``dialects/<name>.py`` with a :class:`Dialect`
subclass (every method in :data:`~starttls_harness.dialects.base.REQUIRED`,
its framer, its scripted server, its capability flags), a reference server
``servers/<name>.py`` (``start_server``, ``BEHAVIOURS``) and a reference
client ``clients/<name>.py`` (``BEHAVIOURS``, ``path_driver``,
``reference_session``), and :func:`register` it below.  Nothing else
changes; ``tests/dialects/test_toy_dialect.py`` shows a whole one.
"""

from __future__ import annotations

from typing import Dict, Iterator, Sequence, Tuple, Union, overload

from starttls_harness.dialects.base import Dialect, LinePredicate, Reply, UnitStep, missing
from starttls_harness.dialects.ftp import FTP
from starttls_harness.dialects.imap import IMAP
from starttls_harness.dialects.ldap import LDAP
from starttls_harness.dialects.lmtp import LMTP
from starttls_harness.dialects.nntp import NNTP
from starttls_harness.dialects.pop3 import POP3
from starttls_harness.dialects.postgres import POSTGRES
from starttls_harness.dialects.sieve import SIEVE
from starttls_harness.dialects.smtp import SMTP
from starttls_harness.dialects.xmpp import XMPP

__all__ = [
    "DIALECTS",
    "EVERY_DIALECT",
    "IMAP",
    "LDAP",
    "POP3",
    "POSTGRES",
    "RETURN_TO_PLAINTEXT",
    "SIEVE",
    "SMTP",
    "XMPP",
    "Dialect",
    "IncompleteDialect",
    "LinePredicate",
    "Reply",
    "UnitStep",
    "dialect_named",
    "dialect_of_scheme",
    "dialects_with",
    "names",
    "register",
    "schemes",
    "unregister",
]


class IncompleteDialect(TypeError):
    """A dialect lacks something every dialect must provide."""


DIALECTS: Dict[str, Dialect] = {}


def register(dialect: Dialect) -> Dialect:
    """Add ``dialect`` to the registry; refuse it if it is incomplete or taken."""
    gaps = missing(dialect)
    label = getattr(dialect, "name", "") or type(dialect).__name__
    if gaps:
        raise IncompleteDialect(f"dialect {label!r} is incomplete: it lacks {', '.join(gaps)}")
    if dialect.name in DIALECTS and DIALECTS[dialect.name] is not dialect:
        raise ValueError(f"dialect {label!r} is already registered")
    schemes = {d.url_scheme: d.name for d in DIALECTS.values() if d.name != dialect.name}
    if dialect.url_scheme in schemes:
        raise ValueError(
            f"dialect {label!r}: URL scheme {dialect.url_scheme!r} belongs to "
            f"{schemes[dialect.url_scheme]!r}"
        )
    DIALECTS[dialect.name] = dialect
    return dialect


def unregister(name: str) -> None:
    """Remove a dialect (a test's toy dialect); unknown names are an error."""
    dialect_named(name)
    del DIALECTS[name]


def names() -> Tuple[str, ...]:
    """The registered dialect names, in registration order."""
    return tuple(DIALECTS)


def dialect_named(name: str) -> Dialect:
    """The registered dialect ``name``; anything else is an error naming the known ones."""
    try:
        return DIALECTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dialect {name!r}; known: {', '.join(DIALECTS)}") from None


def dialect_of_scheme(scheme: str) -> Dialect:
    """The dialect whose targets are written ``scheme://HOST:PORT``."""
    for dialect in DIALECTS.values():
        if dialect.url_scheme == scheme:
            return dialect
    raise ValueError(f"unknown URL scheme {scheme!r}; known: {', '.join(schemes())}")


def schemes() -> Tuple[str, ...]:
    """The URL schemes of the registered dialects."""
    return tuple(d.url_scheme for d in DIALECTS.values())


class _EveryDialect(Sequence[str]):
    """The names of every registered dialect, read when asked (not when built).

    A scenario that applies to every dialect holds this view, so a dialect
    registered later (a plugin's, a test's toy) is covered without edits.
    With ``flag``, only the dialects whose capability flag is true (see
    :func:`dialects_with`).
    """

    def __init__(self, *flags: str) -> None:
        for flag in flags:  # ``!flag``: the flag must be false
            if not isinstance(getattr(Dialect, flag.lstrip("!"), None), bool):
                raise ValueError(f"{flag!r} is not a capability flag of a dialect")
        self.flags = flags

    def _names(self) -> Tuple[str, ...]:
        return tuple(n for n, d in DIALECTS.items() if all(_holds(d, f) for f in self.flags))

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[str, Sequence[str]]:
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        if not self.flags:
            return "EVERY_DIALECT"
        return f"dialects_with({', '.join(repr(f) for f in self.flags)})"


def _holds(dialect: Dialect, flag: str) -> bool:
    """Whether capability ``flag`` is true of ``dialect`` (``!flag``: false)."""
    return bool(getattr(dialect, flag.lstrip("!"))) != flag.startswith("!")


#: Every registered dialect (see :class:`_EveryDialect`).
EVERY_DIALECT: Sequence[str] = _EveryDialect()


def dialects_with(*flags: str) -> Sequence[str]:
    """The registered dialects whose capability ``flags`` all hold (``!flag``: is false),
    read when asked."""
    return _EveryDialect(*flags)


#: The dialects that can return from TLS to plaintext (STOPTLS and the like).
RETURN_TO_PLAINTEXT: Sequence[str] = dialects_with("has_return_to_plaintext")

register(SMTP)
register(IMAP)
register(POP3)
register(SIEVE)
register(LMTP)
register(NNTP)
register(LDAP)
register(POSTGRES)
register(FTP)
register(XMPP)
