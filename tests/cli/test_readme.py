"""Every example command a user can copy -- README.md and every ``--help`` --
is run here, against the built-in peers or a reference server started for it.

The examples are read from the texts themselves, so a new example without an
entry in EXAMPLES fails ``test_every_example_is_known``. An example that names
an address, a CA file or credentials of the user's own server runs with
those replaced by the reference server's (``subs``); what cannot run at all
says why (``reason``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Dict, List, Optional, Tuple

import pytest
from starttls_harness.cli import build_parser
from test_cli import CLI, SMTPLIB_CLIENT, Served, _serve

ROOT = Path(__file__).resolve().parents[2]
PROG = "starttls-harness"


def _commands(text: str) -> List[str]:
    """``starttls-harness ...`` commands in ``text``: continuations joined,
    ``&&`` chains split, trailing comments dropped, spaces normalised."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            part = re.sub(r"\s+#.*$", "", part.strip())
            if part.startswith(PROG + " "):
                found.append(" ".join(part.split()))
    return found


def readme_examples() -> List[str]:
    """Commands in the README's shell code blocks."""
    blocks: List[str] = []
    current: Optional[List[str]] = None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current = [] if line.strip() in ("```sh", "```bash", "```") else None
                if current is None:
                    current = ["<not shell>"]
            else:
                if current[:1] != ["<not shell>"]:
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return [c for block in blocks for c in _commands(block)]


def help_examples() -> List[str]:
    """Commands in the description and epilog of the command and each subcommand."""
    parser = build_parser()
    texts = [parser.description or "", parser.epilog or ""]
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for sub in (action.choices or {}).values():
            texts += [sub.description or "", sub.epilog or ""]
    return [c for text in texts for c in _commands(text)]


@dataclass
class Example:
    """How to run one example; ``subs`` replace whole words or address parts."""

    code: int = 0
    serve: Tuple[str, ...] = ()  # a reference server to start first (serve's arguments)
    subs: Dict[str, str] = field(default_factory=dict)
    stays: bool = False  # serve/proxy: runs until Ctrl-C
    files: Tuple[str, ...] = ()  # written by the example, relative to its folder
    reason: str = ""  # why it cannot run as written (then it runs as far as it can)
    xfail: str = ""


SEND_PY = {"send.py": SMTPLIB_CLIENT}

EXAMPLES: Dict[str, Example] = {
    "starttls-harness check": Example(),
    "starttls-harness check smtp://127.0.0.1:2525 --cafile ca.pem --json report.json": Example(
        serve=("smtp",),
        subs={"127.0.0.1:2525": "127.0.0.1:{port}", "ca.pem": "{cafile}"},
        files=("report.json",),
    ),
    "starttls-harness check smtp://127.0.0.1:2525 --cafile ca.pem --server-name mail.test "
    "--json report.json --junit-xml junit.xml --evidence evidence/": Example(
        serve=("smtp",),
        subs={
            "127.0.0.1:2525": "127.0.0.1:{port}",
            "ca.pem": "{cafile}",
            "mail.test": "localhost",  # the name on the reference certificate
        },
        files=("report.json", "junit.xml", "evidence"),
    ),
    "starttls-harness check imap://127.0.0.1:143 --only 'server.command-injection*'": Example(
        serve=("imap",), subs={"127.0.0.1:143": "127.0.0.1:{port}"}
    ),
    "starttls-harness check smtp://127.0.0.1:25 --tls-version 1.3 --evidence ev/": Example(
        serve=("smtp",), subs={"127.0.0.1:25": "127.0.0.1:{port}"}, files=("ev",)
    ),
    "starttls-harness check imap://127.0.0.1:143 --user u --password p --junit-xml j.xml": Example(
        serve=("imap",),
        subs={"127.0.0.1:143": "127.0.0.1:{port}", "u": "tester", "p": "correct horse"},
        files=("j.xml",),
    ),
    "starttls-harness check imap://127.0.0.1:1143 --user tester --password secret "
    "--only 'server.*close*'": Example(
        serve=("imap",), subs={"127.0.0.1:1143": "127.0.0.1:{port}", "secret": "correct horse"}
    ),
    "starttls-harness check pop3://127.0.0.1:1110 --user tester --password secret": Example(
        serve=("pop3",), subs={"127.0.0.1:1110": "127.0.0.1:{port}", "secret": "correct horse"}
    ),
    "starttls-harness check sieve://127.0.0.1:4190 --user tester --password secret": Example(
        serve=("sieve",), subs={"127.0.0.1:4190": "127.0.0.1:{port}", "secret": "correct horse"}
    ),
    "starttls-harness check lmtp://127.0.0.1:2424": Example(
        serve=("lmtp",), subs={"127.0.0.1:2424": "127.0.0.1:{port}"}
    ),
    "starttls-harness check nntp://127.0.0.1:1119": Example(
        serve=("nntp",), subs={"127.0.0.1:1119": "127.0.0.1:{port}"}
    ),
    "starttls-harness check ftp://127.0.0.1:2121 --user tester --password secret": Example(
        serve=("ftp",), subs={"127.0.0.1:2121": "127.0.0.1:{port}", "secret": "correct horse"}
    ),
    "starttls-harness check ldap://127.0.0.1:3389": Example(
        serve=("ldap",), subs={"127.0.0.1:3389": "127.0.0.1:{port}"}
    ),
    "starttls-harness check postgres://127.0.0.1:5432": Example(
        serve=("postgres",), subs={"127.0.0.1:5432": "127.0.0.1:{port}"}
    ),
    "starttls-harness check xmpp://127.0.0.1:5222": Example(
        serve=("xmpp",), subs={"127.0.0.1:5222": "127.0.0.1:{port}"}
    ),
    "starttls-harness check postgres://127.0.0.1:5432 --user tester --password secret": Example(
        serve=("postgres",), subs={"127.0.0.1:5432": "127.0.0.1:{port}", "secret": "correct horse"}
    ),
    # smtplib takes a FIN without close_notify for a clean end (README: it fails
    # client.truncation), so the run's status is 1.
    "starttls-harness check-client --protocol smtp -- python3 send.py {host} {port} {cafile}": (
        Example(code=1, subs={"python3": sys.executable})
    ),
    "starttls-harness check-client --protocol imap -- starttls-harness client imap "
    "--port {port} --cafile {cafile}": Example(),
    "starttls-harness serve smtp": Example(stays=True),
    "starttls-harness serve smtp --port 0": Example(stays=True),
    "starttls-harness serve imap --port 1143 --tls-version 1.3": Example(
        stays=True,
        subs={"1143": "0"},  # a fixed port could be taken on a shared machine
    ),
    "starttls-harness serve smtp --behaviour keep-buffer": Example(stays=True),
    "starttls-harness behaviours": Example(),
    "starttls-harness scenarios": Example(),
    "starttls-harness scenarios --role client --long": Example(),
    "starttls-harness states --dot | dot -Tsvg > states.svg": Example(
        reason="the part after | needs Graphviz; the harness's part runs"
    ),
    "starttls-harness client smtp --port PORT --cafile CAFILE": Example(
        serve=("smtp",), subs={"PORT": "{port}", "CAFILE": "{cafile}"}
    ),
    "starttls-harness proxy --listen 127.0.0.1:2526 --upstream 127.0.0.1:2525 "
    "--fault inject-after-starttls:c2s": Example(
        stays=True,
        serve=("smtp",),
        subs={"127.0.0.1:2526": "127.0.0.1:0", "127.0.0.1:2525": "127.0.0.1:{port}"},
    ),
    "starttls-harness proxy --listen 127.0.0.1:1144 --upstream 127.0.0.1:1143 --dialect imap "
    "--keylog keys.log --fault drop-close-notify-s2c": Example(
        stays=True,
        serve=("imap",),
        subs={
            "127.0.0.1:1144": "127.0.0.1:0",
            "127.0.0.1:1143": "127.0.0.1:{port}",
            "keys.log": "{keylog}",
        },
    ),
    "starttls-harness proxy --list-faults": Example(),
}

ALL = sorted(set(readme_examples()) | set(help_examples()))


def test_examples_are_found() -> None:
    assert len(readme_examples()) >= 10 and len(help_examples()) >= 10
    assert "starttls-harness check" in readme_examples()


def test_every_example_is_known() -> None:
    unknown = [c for c in ALL if c not in EXAMPLES]
    assert not unknown, f"add these to EXAMPLES in {__file__}: {unknown}"
    stale = [c for c in EXAMPLES if c not in ALL]
    assert not stale, f"no longer in README or --help, remove from EXAMPLES: {stale}"


def _argv(command: str, values: Dict[str, str], example: Example) -> List[str]:
    """The example as argv: placeholders of the user's set-up replaced, the
    ``starttls-harness`` of this interpreter, and nothing after a shell pipe."""
    words = shlex.split(command.split(" | ")[0])
    out: List[str] = []
    for word in words:
        if word in example.subs:
            word = example.subs[word].format(**values)
        else:
            for old, new in example.subs.items():
                if len(old) > 3 and old in word:
                    word = word.replace(old, new.format(**values))
        out += CLI if word == PROG else [word]
    return out


@contextlib.asynccontextmanager
async def _maybe_serve(example: Example) -> AsyncIterator[Optional[Served]]:
    if not example.serve:
        yield None
        return
    async with _serve(*example.serve) as served:
        yield served


async def _run_until_ready(argv: List[str], cwd: Path) -> Tuple[int, str]:
    """A serve/proxy example: it must say how to stop it, then stop on Ctrl-C."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: List[str] = []
    try:
        while not any("Ctrl-C" in line for line in lines):
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            if not line:
                break
            lines.append(line)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 20)
    err = (await proc.stderr.read()).decode()
    assert any("Ctrl-C" in line for line in lines), "".join(lines) + err
    return code, "".join(lines) + err


async def _run(argv: List[str], cwd: Path) -> Tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(
            c,
            id=c.replace(PROG + " ", "", 1),
            marks=[pytest.mark.xfail(reason=EXAMPLES[c].xfail, strict=False)]
            if c in EXAMPLES and EXAMPLES[c].xfail
            else [],
        )
        for c in ALL
    ],
)
def test_example_runs(command: str, tmp_path: Path) -> None:
    example = EXAMPLES.get(command)
    if example is None:
        pytest.fail(f"{command!r} is not in EXAMPLES")
    (tmp_path / "send.py").write_text(SMTPLIB_CLIENT)

    async def go() -> Tuple[int, str]:
        async with _maybe_serve(example) as served:
            values = {"port": "", "cafile": "", "keylog": ""}
            if served is not None:
                values = {
                    "port": str(served.port),
                    "cafile": served.cafile,
                    "keylog": str(Path(served.cafile).parent / "keys.log"),
                }
            argv = _argv(command, values, example)
            if example.stays:
                return await _run_until_ready(argv, tmp_path)
            return await _run(argv, tmp_path)

    code, out = asyncio.run(go())
    assert code == example.code, out
    assert "Traceback" not in out, out
    for name in example.files:
        assert (tmp_path / name).exists(), (name, out)
    if "states --dot" in command:
        assert out.startswith("digraph"), out
