"""What every subcommand shares: exit codes, usage errors, option checks."""

from __future__ import annotations

import math
import re
import ssl
import tempfile
import urllib.parse
from pathlib import Path
from typing import (
    Tuple,
)

from starttls_harness.dialects import dialect_of_scheme, schemes

EXIT_OK = 0


EXIT_FAIL = 1


EXIT_ERROR = 2


EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Wrong usage: reported as one line, exit status 2."""


ROLES = ("server", "client", "path")


RULES_DOC = "docs/rules.md"


def _doc_reference(text: str) -> str:
    """Scenario references name the rules file; point at the project's copy."""
    return re.sub(r"(?:shared/spec/)?closure-rules\.md", RULES_DOC, text)


def parse_target(text: str) -> Tuple[str, str, int]:
    """``smtp://HOST:PORT`` -> (dialect, host, port), or UsageError.

    The schemes are those of the registered dialects.
    """
    parsed = urllib.parse.urlsplit(text)
    try:
        dialect = dialect_of_scheme(parsed.scheme).name
    except ValueError:
        forms = " or ".join(f"{scheme}://HOST:PORT" for scheme in schemes())
        raise UsageError(f"target {text!r}: use {forms}") from None
    try:
        port = parsed.port
    except ValueError:
        raise UsageError(f"target {text!r}: the port is not a number") from None
    if not parsed.hostname or port is None:
        raise UsageError(f"target {text!r}: HOST and PORT are both required")
    return dialect, parsed.hostname, port


def check_seconds(option: str, value: float) -> None:
    """A bound in seconds must be a finite number above zero."""
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{option} {value}: give a number of seconds above 0, e.g. 5")


def check_port(option: str, value: int, *, zero: bool) -> None:
    """A TCP port: 1-65535 (0 too where it means "pick a free one")."""
    if not (0 if zero else 1) <= value <= 65535:
        raise UsageError(f"{option} {value}: a port is {'0' if zero else '1'}-65535")


def check_cafile(option: str, path: Path) -> None:
    """The file must hold at least one PEM certificate."""

    if not path.is_file():
        raise UsageError(f"{option} {path}: no such file")
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except ssl.SSLError:
        raise UsageError(f"{option} {path}: not a PEM certificate file") from None
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror or exc}") from None


def _private_dir(path: Path) -> None:
    """Create ``path`` (and its parents); the folder itself 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def check_writable_file(option: str, path: Path) -> None:
    """Prove now that the report can be written at the end of the run."""
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    existed = path.exists()
    try:
        _private_dir(path.parent)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write there: {exc.strerror or exc}") from None
    if not existed:
        path.unlink()


def check_writable_dir(option: str, path: Path) -> None:
    """Prove now that evidence files can be written into ``path``."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: is a file; give a folder")
    try:
        _private_dir(path)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write there: {exc.strerror or exc}") from None
