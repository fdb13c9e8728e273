"""Verdicts, results and the evidence that backs every non-pass result."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["Evidence", "Exchange", "Result", "Verdict", "count_verdicts", "worst"]


class Verdict(str, enum.Enum):
    """How one scenario run ended (``docs/rules.md``, "Verdicts")."""

    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"
    SKIP = "skip"
    ERROR = "error"


#: Severity order for summaries and exit codes.
_SEVERITY = {Verdict.PASS: 0, Verdict.SKIP: 1, Verdict.WARN: 2, Verdict.FAIL: 3, Verdict.ERROR: 4}


def worst(verdicts: List[Verdict]) -> Verdict:
    return max(verdicts, key=_SEVERITY.__getitem__, default=Verdict.PASS)


@dataclass(frozen=True)
class Exchange:
    """One entry of the evidence ladder.

    ``direction`` is ``c2s`` or ``s2c`` (``--`` for a note); ``kind`` is
    ``plaintext``, ``tls`` (application data, shown decrypted), ``tls-wire``
    (raw records), ``injected`` (bytes the harness put on the wire around
    the rules), ``close_notify``, ``eof``, ``alert`` or ``note``.
    """

    t: float
    direction: str
    kind: str
    data: bytes = b""
    note: str = ""

    def as_dict(self) -> Dict[str, Any]:
        return {
            "t": round(self.t, 6),
            "direction": self.direction,
            "kind": self.kind,
            "data": self.data.decode("latin-1"),
            "note": self.note,
        }


@dataclass
class Evidence:
    """The conversation of one scenario run, in order."""

    start: float = field(default_factory=time.monotonic)
    exchanges: List[Exchange] = field(default_factory=list)
    keylog: Optional[str] = None
    #: The real bytes of each connection (``tls.aio.WireLog``: ``local``,
    #: ``peer``, ``segments``), for pcapng captures; empty when not recorded.
    wires: List[Any] = field(default_factory=list)

    def add(self, direction: str, kind: str, data: bytes = b"", note: str = "") -> None:
        self.exchanges.append(Exchange(time.monotonic() - self.start, direction, kind, data, note))

    def note(self, text: str) -> None:
        self.add("--", "note", b"", text)

    def injected(self) -> List[Exchange]:
        return [e for e in self.exchanges if e.kind == "injected"]


@dataclass
class Result:
    """One scenario x TLS version against one target."""

    id: str
    dialect: str
    tls_version: str
    verdict: Verdict
    rule: Optional[str]
    summary: str
    evidence: Evidence = field(default_factory=Evidence)
    duration: float = 0.0
    title: str = ""
    reference: str = ""
    expected: Optional[Verdict] = None
    #: Which target of a multi-target run (its URL or label); "" for one.
    target: str = ""

    def as_dict(self) -> Dict[str, Any]:
        where = {"target": self.target} if self.target else {}
        return {
            **where,
            "id": self.id,
            "title": self.title,
            "dialect": self.dialect,
            "tls_version": self.tls_version,
            "verdict": self.verdict.value,
            "rule": self.rule,
            "summary": self.summary,
            "reference": self.reference,
            "duration": round(self.duration, 6),
            "evidence": [e.as_dict() for e in self.evidence.exchanges],
        }


def count_verdicts(results: List[Result]) -> Dict[str, int]:
    counts = {v.value: 0 for v in Verdict}
    for r in results:
        counts[r.verdict.value] += 1
    return counts
