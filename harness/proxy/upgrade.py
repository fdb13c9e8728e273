"""What the proxy knows of each dialect: how to read the upgrade and its undoing.

The follower needs only a sliver of a protocol: to recognise the client's
``STARTTLS`` (and, decrypted, ``STOPTLS``) command and the server's final
answer to it.  That sliver, for every dialect the proxy follows, is the
block below and nothing else in the proxy names a dialect -- so that one
edit here can replace it with a lookup into :mod:`starttls_harness.dialects`.
The rest of the proxy goes through :func:`upgrade_reader`.
"""

from __future__ import annotations

from typing import Dict, List, Optional

__all__ = ["STARTTLS", "STOPTLS", "UpgradeReader", "dialect_names", "upgrade_reader"]

# ------------------------------------------------------------------- dialects


class _Dialect:
    """How the follower reads the few plaintext commands and answers it needs."""

    name = ""

    def command(self, line: bytes, verb: bytes) -> Optional[str]:
        """The tag if ``line`` is the ``verb`` command (``""`` for SMTP), else None."""
        raise NotImplementedError

    def answer(self, line: bytes, tag: str) -> Optional[bool]:
        """None if ``line`` is not the final answer line, else whether it says yes."""
        raise NotImplementedError


class _Smtp(_Dialect):
    name = "smtp"

    def command(self, line: bytes, verb: bytes) -> Optional[str]:
        return "" if line.strip().upper() == verb else None

    def answer(self, line: bytes, tag: str) -> Optional[bool]:
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b" ", b"\r", b"\n", b""):
            return None
        return line[:3] == b"220"


class _Imap(_Dialect):
    name = "imap"

    def command(self, line: bytes, verb: bytes) -> Optional[str]:
        parts = line.split()
        if len(parts) == 2 and parts[1].upper() == verb and parts[0] not in (b"*", b"+"):
            return parts[0].decode("latin-1")
        return None

    def answer(self, line: bytes, tag: str) -> Optional[bool]:
        parts = line.split(None, 2)
        if not parts or parts[0].decode("latin-1") != tag:
            return None
        return len(parts) > 1 and parts[1].upper() == b"OK"


class _Lmtp(_Smtp):
    name = "lmtp"


class _Nntp(_Smtp):
    """NNTP (RFC 4642): ``382`` goes ahead (STARTTLS, and the STOPTLS test extension)."""

    name = "nntp"

    def answer(self, line: bytes, tag: str) -> Optional[bool]:
        said = super().answer(line, tag)
        return None if said is None else line[:3] == b"382"


_DIALECTS: Dict[str, _Dialect] = {
    "smtp": _Smtp(),
    "imap": _Imap(),
    "lmtp": _Lmtp(),
    "nntp": _Nntp(),
}
_STARTTLS = b"STARTTLS"
_STOPTLS = b"STOPTLS"


#: The type of what :func:`upgrade_reader` returns.
UpgradeReader = _Dialect
#: The verbs handed to :meth:`UpgradeReader.command`.
STARTTLS = _STARTTLS
STOPTLS = _STOPTLS


def dialect_names() -> List[str]:
    """The dialects the proxy can follow, sorted."""
    return sorted(_DIALECTS)


def upgrade_reader(dialect: str) -> UpgradeReader:
    """The reader of ``dialect``'s upgrade commands; ValueError if unknown."""
    try:
        return _DIALECTS[dialect]
    except KeyError:
        raise ValueError(
            f"unknown dialect {dialect!r}; choose one of {', '.join(dialect_names())}"
        ) from None
