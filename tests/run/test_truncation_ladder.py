"""The truncation ladder shows only what went on the wire (issue 10, item 5).

In ``client.truncation`` the harness (the fake server) cuts its answer and
sends FIN without close_notify.  A client that then ends TLS properly sends
its close_notify *after* our FIN; our engine, a strict responder, answers it
-- but our side of TCP is already shut, so that answer never reaches the
wire.  The evidence must list the client's close_notify (it was on the wire)
and must not invent ours.  No reference client answers a truncation with a
close_notify, so this test brings its own: a few lines on Python's ``ssl``
that read the cut reply, see EOF, ``unwrap()`` (close_notify) and report the
failure.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, List

from starttls_harness.report.formats import ladder
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.client import run_client_scenario
from starttls_harness.run.server import RunSettings
from starttls_harness.run.targets import CommandClientTarget
from starttls_harness.scenarios.client import client_by_id

Runner = Callable[..., Any]

#: An SMTP client that ends TLS with close_notify when its reply is cut.
CLOSING_CLIENT = r"""
import socket, ssl, sys

host, port, cafile, version = sys.argv[1:5]

def reply(f):
    while True:
        line = f.readline()
        if not line.endswith(b"\n"):
            return line  # cut (or nothing): the caller decides
        if line[3:4] != b"-":
            return line

s = socket.create_connection((host, int(port)), timeout=10)
f = s.makefile("rb")
reply(f)
s.sendall(b"EHLO closing.invalid\r\n"); reply(f)
s.sendall(b"STARTTLS\r\n"); reply(f)
ctx = ssl.create_default_context(cafile=cafile)
ctx.minimum_version = ctx.maximum_version = (
    ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
)
ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)  # EOF reads as b""
t = ctx.wrap_socket(s, server_hostname="localhost")
tf = t.makefile("rb")
t.sendall(b"EHLO closing.invalid\r\n"); reply(tf)
for cmd in (b"MAIL FROM:<a@closing.invalid>", b"RCPT TO:<b@closing.invalid>", b"DATA"):
    t.sendall(cmd + b"\r\n"); reply(tf)
t.sendall(b"Subject: cut\r\n\r\nbody\r\n.\r\n")
answer = reply(tf)
if not answer.endswith(b"\n"):
    try:
        t.unwrap()  # our close_notify, after the server's FIN
    except (OSError, ssl.SSLError):
        pass
    print("reply cut by a truncation:", answer, file=sys.stderr)
    sys.exit(1)
t.sendall(b"QUIT\r\n"); reply(tf)
sys.exit(0)
"""


def test_no_close_notify_from_us_after_our_fin(
    tmp_path: Path, tls_version: str, run: Runner
) -> None:
    script = tmp_path / "closing_client.py"
    script.write_text(CLOSING_CLIENT)
    argv = [sys.executable, str(script), "{host}", "{port}", "{cafile}", "{tls_version}"]
    target = CommandClientTarget("smtp", argv, timeout=20.0)
    settings = RunSettings(reply_timeout=5.0, scenario_timeout=20.0)

    async def body() -> List[Result]:
        return [
            await run_client_scenario(client_by_id(sid), target, tls_version, settings)
            for sid in ("client.truncation",)
        ]

    (result,) = run(body, 60)
    assert result.verdict is Verdict.PASS, result.summary
    rows = [(e.direction, e.kind, e.note) for e in result.evidence.exchanges]
    fin = rows.index(("s2c", "eof", "TCP FIN without close_notify (truncation)"))
    after = rows[fin + 1 :]
    # The client's close_notify was on the wire: it is listed.
    assert any(d == "c2s" and k == "close_notify" for d, k, _ in after), rows
    # Ours never left (our FIN had gone): not listed, and the ladder says why.
    assert not any(d == "s2c" and k == "close_notify" for d, k, _ in after), rows
    assert ("--", "note", "no close_notify from us: our FIN had already gone") in after
    text = ladder(result, 100)
    tail = text[text.index("[FIN/EOF]") :]
    assert tail.count("[close_notify]") == 1, text  # the client's, and only it
    assert "<-- [close_notify]" not in tail, text
