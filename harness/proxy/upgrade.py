"""What the proxy knows of each dialect: a lookup into the dialect registry.

The follower needs only a sliver of a protocol: to recognise the client's
``STARTTLS`` (and, decrypted, ``STOPTLS``) command and the server's final
answer to it.  Each dialect module provides that sliver
(:meth:`~starttls_harness.dialects.base.Dialect.proxy_command` and
:meth:`~starttls_harness.dialects.base.Dialect.proxy_answer`); the proxy
names no dialect and follows every registered one, a test's toy included.
"""

from __future__ import annotations

from typing import List

from starttls_harness.dialects import dialect_named, names
from starttls_harness.dialects.base import Dialect

__all__ = ["STARTTLS", "STOPTLS", "UpgradeReader", "dialect_names", "upgrade_reader"]

#: The type of what :func:`upgrade_reader` returns (it reads ``proxy_command``
#: and ``proxy_answer``).
UpgradeReader = Dialect
#: The verbs handed to :meth:`UpgradeReader.proxy_command`.
STARTTLS = b"STARTTLS"
STOPTLS = b"STOPTLS"


def dialect_names() -> List[str]:
    """The dialects the proxy can follow, sorted."""
    return sorted(names())


def upgrade_reader(dialect: str) -> UpgradeReader:
    """The registered dialect ``dialect``; ValueError (naming the known ones) if unknown."""
    return dialect_named(dialect)
