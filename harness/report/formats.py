"""Reports: the console table, JSON, JUnit XML and evidence ladders.

The JSON report is a stable, documented format (see README, "Reports"):
``tool``, ``version``, ``target``, ``started`` (ISO 8601, UTC),
``duration`` (seconds), ``counts`` (per verdict) and ``results``, each with
at least ``id``, ``tls_version``, ``verdict``, ``rule``, ``summary`` and
``evidence`` (the conversation, in order).

Everything written here goes through :class:`~.redact.Redactor` first (no
password leaves in clear), and every file is created 0600, every folder
0700: a conversation can hold mail, and key logs decrypt captures.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, TextIO
from xml.etree import ElementTree as ET

from starttls_harness import __version__
from starttls_harness.report.redact import Redactor
from starttls_harness.report.verdicts import Exchange, Result, Verdict, count_verdicts, worst

__all__ = [
    "ladder",
    "ladder_width",
    "summary_table",
    "to_json",
    "to_junit",
    "write_evidence",
    "write_json",
    "write_junit",
]

#: Width of a ladder in a file, and the most it takes on a terminal.
LADDER_WIDTH = 100
#: Below this a two-column ladder stops being readable.
LADDER_MIN_WIDTH = 60

Secrets = Iterable[Optional[str]]

JSON_FORMAT_VERSION = 1


def _label(r: Result) -> str:
    return f"{r.id} [{r.dialect}, TLS {r.tls_version}]"


def summary_table(
    results: List[Result], out: TextIO, *, color: bool = False, secrets: Secrets = ()
) -> None:
    """The table printed at the end of a run, worst verdicts last."""
    redactor = Redactor(secrets)
    colours = {
        Verdict.PASS: "\033[32m",
        Verdict.FAIL: "\033[31;1m",
        Verdict.WARN: "\033[33m",
        Verdict.SKIP: "\033[36m",
        Verdict.ERROR: "\033[35;1m",
    }
    width = max((len(r.id) for r in results), default=10)
    dwidth = max([7] + [len(r.dialect) for r in results])  # "postgres" is longer
    out.write(f"{'scenario':<{width}}  {'dialect':<{dwidth}}  TLS  verdict  reason\n")
    targets = list(dict.fromkeys(r.target for r in results))
    if len(targets) > 1:  # a fleet: one group per target, in the order given
        results = [r for t in targets for r in results if r.target == t]
    shown_target = None
    for r in results:
        if len(targets) > 1 and r.target != shown_target:
            shown_target = r.target
            mine = [x for x in results if x.target == r.target]
            counts_here = ", ".join(f"{n} {v}" for v, n in count_verdicts(mine).items() if n)
            worst_here = worst([x.verdict for x in mine]).value.upper()
            out.write(f"== {r.target or '(no target)'}: {worst_here} ({counts_here})\n")
        verdict = r.verdict.value.upper()
        shown = f"{colours[r.verdict]}{verdict:<7}\033[0m" if color else f"{verdict:<7}"
        rule = f" [{r.rule}]" if r.rule and r.verdict is not Verdict.PASS else ""
        summary = redactor.text(r.summary)
        dialect = f"{r.dialect:<{dwidth}}"
        out.write(f"{r.id:<{width}}  {dialect}  {r.tls_version}  {shown}  {summary}{rule}\n")
    counts = count_verdicts(results)
    out.write(", ".join(f"{n} {v}" for v, n in counts.items() if n) + "\n")


def to_json(
    results: List[Result],
    *,
    target: str,
    started: _dt.datetime,
    duration: float,
    extra: Optional[Dict[str, Any]] = None,
    secrets: Secrets = (),
) -> Dict[str, Any]:
    redactor = Redactor(secrets)
    doc: Dict[str, Any] = {
        "format": JSON_FORMAT_VERSION,
        "tool": "starttls-harness",
        "version": __version__,
        "target": target,
        "started": started.astimezone(_dt.timezone.utc).isoformat(),
        "duration": round(duration, 6),
        "counts": count_verdicts(results),
        "results": [redactor.result(r).as_dict() for r in results],
    }
    if extra:
        doc.update(extra)
    return doc


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode otherwise
        f.write(data)


def write_json(path: Path, doc: Dict[str, Any]) -> None:
    write_private(path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))


def to_junit(
    results: List[Result], *, target: str, duration: float, secrets: Secrets = ()
) -> ET.ElementTree:
    """JUnit XML (the common Jenkins/GitLab dialect): warn is a pass with output."""
    redactor = Redactor(secrets)
    results = [redactor.result(r) for r in results]
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
        text = ladder(r, LADDER_WIDTH)
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
    buffer = io.BytesIO()
    tree.write(buffer, encoding="utf-8", xml_declaration=True)
    write_private(path, buffer.getvalue())


# ------------------------------------------------------------------ ladder


def _wrap(text: str, column: int, first: str, rest: str) -> List[str]:
    """``text`` in rows of ``column`` characters, cut at spaces only.

    A word that does not fit after ``first`` starts the next row; a word is
    cut only when it alone is wider than a whole row.
    """
    head = text.split(" ", 1)[0]
    rows: List[str] = []
    if len(first) + len(head) > column >= len(rest) + len(head):
        rows.append(first.rstrip())
        first = rest
    wrapped = textwrap.wrap(
        text,
        column,
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,
    )
    for row in wrapped or [first.rstrip()]:
        while len(row) > column:  # one word wider than a row: cut it
            rows.append(row[:column])
            row = rest + row[column:]
        rows.append(row)
    return rows


def _rows(data: bytes, column: int, tag: str) -> List[str]:
    """Bytes as printable rows, ``tag`` first: one or more rows per line
    (\u23ce marks where a line ended)."""
    text = data.decode("latin-1")
    rows: List[str] = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        ending = "\u23ce" if line[len(body) :] else ""
        shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in body) + ending
        rows += _wrap(shown, column, tag if not rows else "  ", "  ")
    return rows or [tag.rstrip()]


def _arrow(e: Exchange) -> str:
    if e.kind == "eof":
        return "FIN (ours)" if e.direction == "c2s" else "FIN/EOF"
    marks = {
        "injected": "INJECTED",
        "close_notify": "close_notify",
        "alert": "ALERT",
        "tls": "tls",
        "tls-wire": "tls records",
        "plaintext": "plain",
    }
    return marks.get(e.kind, e.kind)


def ladder_width(stream: Optional[TextIO] = None) -> int:
    """The terminal's width when ``stream`` is one, at most LADDER_WIDTH."""
    stream = stream if stream is not None else sys.stdout
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty:
        return LADDER_WIDTH
    columns = shutil.get_terminal_size((LADDER_WIDTH, 24)).columns
    return max(LADDER_MIN_WIDTH, min(LADDER_WIDTH, columns))


def ladder(result: Result, width: Optional[int] = None, *, secrets: Secrets = ()) -> str:
    """A two-column ladder diagram of the conversation (client | server).

    No line is wider than ``width`` (default: :func:`ladder_width`) unless one
    word alone is; credentials are hidden (see :mod:`.redact`).
    """
    width = max(LADDER_MIN_WIDTH, width if width is not None else ladder_width())
    result = Redactor(secrets).result(result)
    left = (width - 15) // 2  # 8 time + 2 mark + left + " --> " + right
    right = width - 15 - left
    header = f"{_label(result)}: {result.verdict.value.upper()} -- {result.summary}" + (
        f" (rule {result.rule})" if result.rule else ""
    )
    lines = textwrap.wrap(header, width, subsequent_indent="    ", break_on_hyphens=False)
    if result.reference:
        lines += textwrap.wrap(f"reference: {result.reference}", width, subsequent_indent="    ")
    lines.append(f"{'time':>8}  {'client':<{left}}     server")
    for e in result.evidence.exchanges:
        stamp = f"{e.t:8.4f}"
        if e.direction == "--":
            lines += textwrap.wrap(
                e.note, width, initial_indent=f"{stamp}  .. ", subsequent_indent=" " * 13
            ) or [f"{stamp}  .."]
            continue
        tag = f"[{_arrow(e)}] "
        column = left if e.direction == "c2s" else right
        rows = _rows(e.data, column, tag)
        if e.note:
            rows += _wrap(f"({e.note})", column, "  ", "  ")
        marker = "!!" if e.kind == "injected" else "  "
        for i, row in enumerate(rows):
            start = f"{stamp}{marker}" if i == 0 else " " * 10
            if e.direction == "c2s":
                arrow = "==>" if e.kind == "injected" else "-->"
                lines.append(f"{start}{row:<{left}} {arrow}")
            else:
                arrow = "<==" if e.kind == "injected" else "<--"
                lines.append(f"{start}{'':<{left}} {arrow} {row}")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def write_evidence(
    results: Iterable[Result], directory: Path, *, secrets: Secrets = ()
) -> List[Path]:
    """One ladder file per non-passing result (0600), plus its TLS key log."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    written = []
    for r in results:
        if r.verdict is Verdict.PASS:
            continue
        stem = f"{r.id}-{r.dialect}-tls{r.tls_version}"
        if r.target:  # several targets: one file each
            slug = re.sub(r"[^A-Za-z0-9.-]+", "_", r.target).strip("_")
            stem = f"{slug}-{stem}"
        path = directory / f"{stem}.txt"
        write_private(path, ladder(r, LADDER_WIDTH, secrets=secrets).encode("utf-8"))
        written.append(path)
        if r.evidence.keylog and Path(r.evidence.keylog).exists():
            keys = directory / f"{stem}.keys"
            if Path(r.evidence.keylog).resolve() != keys.resolve():
                write_private(keys, Path(r.evidence.keylog).read_bytes())
            keys.chmod(0o600)
            written.append(keys)
    return written
