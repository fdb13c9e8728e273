"""Reports: the console table, JSON, JUnit XML and evidence ladders.

The JSON report is a stable, documented format (see README, "Reports"):
``tool``, ``version``, ``target``, ``started`` (ISO 8601, UTC),
``duration`` (seconds), ``counts`` (per verdict) and ``results``, each with
at least ``id``, ``tls_version``, ``verdict``, ``rule``, ``summary`` and
``evidence`` (the conversation, in order).
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import textwrap
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, TextIO
from xml.etree import ElementTree as ET

from starttls_harness import __version__
from starttls_harness.report.verdicts import Exchange, Result, Verdict, count_verdicts

__all__ = ["ladder", "summary_table", "to_json", "to_junit", "write_evidence"]

JSON_FORMAT_VERSION = 1


def _label(r: Result) -> str:
    return f"{r.id} [{r.dialect}, TLS {r.tls_version}]"


def summary_table(results: List[Result], out: TextIO, *, color: bool = False) -> None:
    """The table printed at the end of a run, worst verdicts last."""
    colours = {
        Verdict.PASS: "\033[32m",
        Verdict.FAIL: "\033[31;1m",
        Verdict.WARN: "\033[33m",
        Verdict.SKIP: "\033[36m",
        Verdict.ERROR: "\033[35;1m",
    }
    width = max((len(r.id) for r in results), default=10)
    out.write(f"{'scenario':<{width}}  dialect  TLS  verdict  reason\n")
    for r in results:
        verdict = r.verdict.value.upper()
        shown = f"{colours[r.verdict]}{verdict:<7}\033[0m" if color else f"{verdict:<7}"
        rule = f" [{r.rule}]" if r.rule and r.verdict is not Verdict.PASS else ""
        out.write(f"{r.id:<{width}}  {r.dialect:<7}  {r.tls_version}  {shown}  {r.summary}{rule}\n")
    counts = count_verdicts(results)
    out.write(", ".join(f"{n} {v}" for v, n in counts.items() if n) + "\n")


def to_json(
    results: List[Result],
    *,
    target: str,
    started: _dt.datetime,
    duration: float,
    extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    doc: Dict[str, Any] = {
        "format": JSON_FORMAT_VERSION,
        "tool": "starttls-harness",
        "version": __version__,
        "target": target,
        "started": started.astimezone(_dt.timezone.utc).isoformat(),
        "duration": round(duration, 6),
        "counts": count_verdicts(results),
        "results": [r.as_dict() for r in results],
    }
    if extra:
        doc.update(extra)
    return doc


def write_json(path: Path, doc: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def to_junit(results: List[Result], *, target: str, duration: float) -> ET.ElementTree:
    """JUnit XML (the common Jenkins/GitLab dialect): warn is a pass with output."""
    counts = count_verdicts(results)
    suites = ET.Element("testsuites", name="starttls-harness", time=f"{duration:.3f}")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"starttls-harness {target}",
        tests=str(len(results)),
        failures=str(counts["fail"]),
        errors=str(counts["error"]),
        skipped=str(counts["skip"]),
        time=f"{duration:.3f}",
    )
    for r in results:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"starttls_harness.{r.dialect}",
            name=f"{r.id}[tls{r.tls_version}]",
            time=f"{r.duration:.3f}",
        )
        text = ladder(r)
        if r.verdict is Verdict.FAIL:
            node = ET.SubElement(case, "failure", message=f"{r.rule}: {r.summary}", type="fail")
            node.text = text
        elif r.verdict is Verdict.ERROR:
            node = ET.SubElement(case, "error", message=r.summary, type="error")
            node.text = text
        elif r.verdict is Verdict.SKIP:
            ET.SubElement(case, "skipped", message=r.summary)
        elif r.verdict is Verdict.WARN:
            out = ET.SubElement(case, "system-out")
            out.text = f"WARN {r.rule}: {r.summary}\n\n{text}"
    return ET.ElementTree(suites)


def write_junit(path: Path, tree: ET.ElementTree) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tree.write(path, encoding="utf-8", xml_declaration=True)


# ------------------------------------------------------------------ ladder


def _show(data: bytes, limit: int = 60) -> List[str]:
    text = data.decode("latin-1")
    text = text.replace("\r\n", "\u23ce").replace("\n", "\u23ce").replace("\r", "\\r")
    printable = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return textwrap.wrap(printable, limit) or [""]


def _arrow(e: Exchange) -> str:
    marks = {
        "injected": "INJECTED",
        "close_notify": "close_notify",
        "alert": "ALERT",
        "eof": "FIN/EOF",
        "tls": "tls",
        "plaintext": "plain",
    }
    return marks.get(e.kind, e.kind)


def ladder(result: Result, width: int = 60) -> str:
    """A two-column ladder diagram of the conversation (client | server)."""
    lines = [
        f"{_label(result)}: {result.verdict.value.upper()} -- {result.summary}"
        + (f" (rule {result.rule})" if result.rule else ""),
    ]
    if result.reference:
        lines.append(f"reference: {result.reference}")
    lines.append(f"{'time':>8}  {'client':<{width}}     {'server':<{width}}")
    for e in result.evidence.exchanges:
        tag = _arrow(e)
        if e.direction == "--":
            lines.append(f"{e.t:8.4f}  .. {e.note}")
            continue
        body = _show(e.data, width - 14) if e.data else [""]
        note = f"  ({e.note})" if e.note else ""
        marker = "!!" if e.kind == "injected" else "  "
        for i, chunk in enumerate(body):
            label = f"[{tag}] " if i == 0 else " " * (len(tag) + 3)
            if e.direction == "c2s":
                left = f"{label}{chunk}"
                arrow = "==>" if e.kind == "injected" else "-->"
                lines.append(
                    f"{e.t:8.4f}{marker}{left:<{width}} {arrow}{'':<{width}}"
                    + (note if i == 0 else "")
                )
            else:
                arrow = "<==" if e.kind == "injected" else "<--"
                lines.append(
                    f"{e.t:8.4f}{marker}{'':<{width}} {arrow} {label}{chunk}"
                    + (note if i == 0 else "")
                )
    return "\n".join(line.rstrip() for line in lines) + "\n"


def write_evidence(results: Iterable[Result], directory: Path) -> List[Path]:
    """One ladder file per non-passing result, plus its TLS key log."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for r in results:
        if r.verdict is Verdict.PASS:
            continue
        stem = f"{r.id}-{r.dialect}-tls{r.tls_version}"
        path = directory / f"{stem}.txt"
        path.write_text(ladder(r), encoding="utf-8")
        written.append(path)
        if r.evidence.keylog and Path(r.evidence.keylog).exists():
            keys = directory / f"{stem}.keys"
            if Path(r.evidence.keylog).resolve() != keys.resolve():
                shutil.copyfile(r.evidence.keylog, keys)
            keys.chmod(0o600)
            written.append(keys)
    return written
