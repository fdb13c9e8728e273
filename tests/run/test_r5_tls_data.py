"""TLS data instead of the close_notify answer: a warn (R5), not a fail -- and where it stops.

Issue 10, item R2-A, decided: after our close_notify, a target whose side of
TLS is still up and that writes TLS application data instead of answering
has broken R5 (the responder answers at once) but exposed nothing: what it
wrote is still protected, and nothing was resumed in plaintext.  That is a
``warn`` in every scenario that sends the first close_notify, decided at its
first record (wire order), whatever comes after.

The boundary, shown by the second target: one that stays silent after our
close_notify, then answers the plaintext probe the harness sends after the
bound, has taken in plaintext while its side of TLS was open (R3): a
``fail``.  If either verdict changes, this test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

import pytest
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.server import RunSettings, ServerTarget, run_server_target
from starttls_harness.scenarios.server import by_id
from starttls_harness.tls.aio import SwitchableTransport, create_server
from starttls_harness.tls.certs import Pki
from starttls_harness.tls.engine import CloseNotifyReceived, Event, Policy, Rule

Runner = Callable[..., Any]
W, F = Verdict.WARN, Verdict.FAIL

#: The scenarios in which the harness sends the first close_notify and waits.
CLOSING = (
    "server.close-notify-reply",
    "server.data-after-close-notify",
    "server.plaintext-after-close",
)
SETTINGS = RunSettings(reply_timeout=1.0, scenario_timeout=10.0)


class _Smtp(asyncio.Protocol):
    """A conforming SMTP server up to our close_notify, which it never answers.

    ``talk``: it then writes one line of TLS application data and goes
    quiet.  ``answer-probe``: it stays quiet, and answers the plaintext probe
    that follows (R4 relaxed: taken in although it never sent its close_notify).
    """

    def __init__(self, ctx: ssl.SSLContext, mode: str, tasks: List[asyncio.Task[Any]]) -> None:
        self.ctx, self.mode, self.tasks = ctx, mode, tasks
        self.t: Optional[SwitchableTransport] = None
        self.buf = b""
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SwitchableTransport)
        self.t = transport
        transport.hold_after(lambda line: line.strip().upper() == b"STARTTLS")
        transport.write(b"220 r5.invalid ESMTP\r\n")

    def engine_event(self, event: Event) -> None:
        assert self.t is not None
        if isinstance(event, CloseNotifyReceived):
            self.closing = True
            if self.mode == "talk":
                self.t.write(b"250 still talking under TLS\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.t is not None
        if self.closing:
            if self.mode == "answer-probe":
                # Its side of TLS never closed (R4 relaxed: the bytes are taken in).
                self.t.write(b"250 2.0.0 plaintext probe answered\r\n")
            return
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            verb = (line.split() or [b""])[0].upper()
            tls = self.t.tls_active
            if verb == b"EHLO":
                caps = b"250-r5.invalid\r\n250 PIPELINING\r\n"
                self.t.write(caps if tls else b"250-r5.invalid\r\n250 STARTTLS\r\n")
            elif verb == b"STARTTLS" and not tls:
                self.buf = b""
                task = asyncio.ensure_future(self._upgrade())
                self.tasks.append(task)
                return
            elif verb == b"QUIT":
                self.t.write(b"221 bye\r\n")
                self.t.close()
            elif verb == b"NOOP":
                self.t.write(b"250 2.0.0 ok\r\n")
            else:
                self.t.write(b"502 5.5.2 not here\r\n")

    async def _upgrade(self) -> None:
        assert self.t is not None
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError, RuntimeError):
            await self.t.start_tls(self.ctx, server_side=True, preface=b"220 2.0.0 go ahead\r\n")


@contextlib.asynccontextmanager
async def _target(pki: Pki, mode: str, tls_version: str) -> AsyncIterator[ServerTarget]:
    tasks: List[asyncio.Task[Any]] = []
    protocols: List[_Smtp] = []
    ctx = pki.server_context()

    def factory() -> asyncio.Protocol:
        protocols.append(_Smtp(ctx, mode, tasks))
        return protocols[-1]

    relaxed = (Rule.R5,) if mode == "talk" else (Rule.R4, Rule.R5)
    server = await create_server(factory, "127.0.0.1", 0, policy=Policy.relaxing(*relaxed))
    port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
    try:
        yield ServerTarget(
            "smtp",
            "127.0.0.1",
            port,
            tls_versions=(tls_version,),
            cafile=pki.cafile,
            server_hostname="localhost",
        )
    finally:
        server.close()
        for p in protocols:
            if p.t is not None:
                p.t.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _verdicts(pki: Pki, mode: str, tls_version: str, run: Runner) -> Dict[str, Result]:
    async def body() -> List[Result]:
        async with _target(pki, mode, tls_version) as target:
            scenarios = [by_id(s) for s in CLOSING]
            return await run_server_target(scenarios, target, SETTINGS, tls_versions=(tls_version,))

    return {r.id: r for r in run(body, 60)}


def test_tls_data_instead_of_the_answer_is_an_r5_warn(
    pki: Pki, tls_version: str, run: Runner
) -> None:
    got = _verdicts(pki, "talk", tls_version, run)
    for sid in CLOSING:
        r = got[sid]
        assert r.verdict is W, (sid, r.verdict, r.summary)
        assert r.rule == "R5" or "R5" in r.summary, (sid, r.rule, r.summary)
        assert "TLS data after our close_notify" in r.summary, r.summary


@pytest.mark.parametrize("sid", ["server.data-after-close-notify", "server.plaintext-after-close"])
def test_a_plaintext_probe_answered_under_tls_is_a_fail(
    sid: str, pki: Pki, tls_version: str, run: Runner
) -> None:
    r = _verdicts(pki, "answer-probe", tls_version, run)[sid]
    assert r.verdict is F, (sid, r.verdict, r.summary)
