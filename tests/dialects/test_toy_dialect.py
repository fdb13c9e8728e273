"""A toy dialect, registered by this test alone, runs the server catalogue.

The point is the seam: a line-based protocol the harness has never heard of
is described by one :class:`Dialect` subclass and given a tiny reference
server on the project's engine, both written here; registering the dialect
is the only thing needed for the catalogue, the reference-server loader and
the run layer to drive it.  The strict toy server passes every applicable
scenario, and the toy server with the engine's R1 rule relaxed (it keeps
plaintext received before the upgrade, CVE-2011-0411's class) fails the
command-injection scenarios.

The toy protocol: replies are ``* info`` lines closed by one ``OK ...``,
``ERR ...`` or ``+ ...`` (a continuation) line; commands are ``CAPA``,
``STARTTLS``, ``STOPTLS``, ``PING``, ``LOGIN u p``, ``WHOAMI``, ``PUT n``
(then ``n`` bytes, stored) and ``BYE``.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, Optional, Sequence, Set, Tuple

import pytest
from starttls_harness.cli import build_parser
from starttls_harness.cli.common import parse_target
from starttls_harness.cli.tools import _server_modules
from starttls_harness.dialects import (
    DIALECTS,
    RETURN_TO_PLAINTEXT,
    Dialect,
    IncompleteDialect,
    LinePredicate,
    Reply,
    UnitStep,
    dialect_named,
    names,
    register,
    unregister,
)
from starttls_harness.dialects.roles import Command, ScriptedServer
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.path import run_path_target
from starttls_harness.run.path_command import command_pair
from starttls_harness.run.reference import reference_server_module, reference_servers
from starttls_harness.run.server import RunSettings, run_server_target
from starttls_harness.scenarios.catalogue import ALL_SCENARIOS
from starttls_harness.scenarios.ccc import CCC_SCENARIOS
from starttls_harness.scenarios.client import REMOVAL_SCENARIOS
from starttls_harness.scenarios.expectations import STOPTLS_SCENARIOS
from starttls_harness.scenarios.path import PATH_SCENARIOS
from starttls_harness.scenarios.server import CATALOGUE, select
from starttls_harness.servers.base import STRICT, Behaviour, RunningServer, ServerConfig
from starttls_harness.tls.aio import SwitchableTransport, create_server
from starttls_harness.tls.certs import make_pki
from starttls_harness.tls.engine import ClosureComplete, Event, Rule
from starttls_harness.tls.framing import Framer, line_framer

NAME = "toy"

# ------------------------------------------------------------ the dialect


class _FinalLine(LinePredicate):
    """The last line of a toy reply: anything but an ``* info`` line."""

    kind = "toy-final"

    def __call__(self, line: bytes) -> bool:
        return not line.startswith(b"* ")


class _ScriptedToy(ScriptedServer):
    """Enough of a scripted toy server for the registry (the client role is not run)."""

    injection_effect = "answer-taken"

    def parse(self, raw: bytes, tls: bool) -> Command:
        verb = raw.strip().split(b" ", 1)[0].decode("latin-1").upper()
        kinds = {"CAPA": "hello", "STARTTLS": "starttls", "STOPTLS": "stoptls", "BYE": "quit"}
        return Command(raw, tls, kinds.get(verb, "other"), verb)

    def greeting(self) -> bytes:
        return b"OK toy ready\r\n"

    def hello(self, cmd: Command, *, tls: bool, starttls: bool, stoptls: bool) -> bytes:
        caps = b"* STARTTLS\r\n" if starttls and not tls else b""
        return caps + b"OK capabilities\r\n"

    def starttls_ok(self, cmd: Command) -> bytes:
        return b"OK go ahead\r\n"

    def starttls_refused(self, cmd: Command) -> bytes:
        return b"ERR no TLS today\r\n"

    def not_offered(self, cmd: Command) -> bytes:
        return b"ERR not offered\r\n"

    def stoptls_ok(self, cmd: Command) -> bytes:
        return b"OK stopping TLS\r\n"

    def goodbye(self, cmd: Command) -> bytes:
        return b"OK bye\r\n"

    def injection(self, starttls: Command) -> bytes:
        return b"ERR injected\r\n"

    def stored(self, cmd: Command) -> bytes:
        return b"OK stored\r\n"

    def simple(self, cmd: Command) -> bytes:
        return b"OK\r\n"

    def auth_prompts(self, cmd: Command) -> List[bytes]:
        return []

    def auth_done(self, cmd: Command, ok: bool) -> bytes:
        return b"OK\r\n" if ok else b"ERR\r\n"


_TRUNCATED = b"this unit is announced at twice its size\r\n"


class ToyDialect(Dialect):
    name = NAME
    #: Its client waits for each reply (the order under TLS shows an injected one).
    awaits_first_tls_reply = True
    default_port = 7777
    url_scheme = "toy"
    server_module = __name__
    client_module = __name__
    has_return_to_plaintext = True
    storage_needs_login = True

    def framer(self) -> Framer:
        return line_framer()

    def scripted_server(self) -> ScriptedServer:
        return _ScriptedToy()

    def fake_greeting(self) -> bytes:
        return b"OK attacker greeting\r\n"

    def hello(self) -> bytes:
        return b"CAPA\r\n"

    def starttls(self) -> bytes:
        return b"STARTTLS\r\n"

    def stoptls(self) -> bytes:
        return b"STOPTLS\r\n"

    def sentinel(self) -> bytes:
        return b"PING\r\n"

    def injected(self) -> bytes:
        return b"BOGUS injected\r\n"

    def quit(self) -> bytes:
        return b"BYE\r\n"

    def is_injected_reply(self, reply: Reply) -> bool:
        return reply.key == "ERR"

    def is_sentinel_reply(self, reply: Reply) -> bool:
        return reply.ok and b"pong" in reply.raw

    def split_reply(
        self, buf: bytes, expect_tag: Optional[str] = None
    ) -> Tuple[Optional[Reply], bytes]:
        units, _ = self.framer().split(buf)
        for i, line in enumerate(units):
            if not line.startswith(b"* "):
                key = line.split(b" ", 1)[0].strip().decode("latin-1")
                consumed = sum(len(u) for u in units[: i + 1])
                return Reply(tuple(units[: i + 1]), key in ("OK", "+"), key), buf[consumed:]
        return None, buf

    def capabilities(self, reply: Reply) -> FrozenSet[str]:
        return frozenset(
            line[2:].strip().decode("latin-1").upper()
            for line in reply.lines
            if line.startswith(b"* ")
        )

    def greeting_ok(self, reply: Reply) -> bool:
        return reply.key == "OK"

    def final_line_of(self, command: bytes) -> LinePredicate:
        return _FinalLine()

    def is_continuation(self, reply: Reply) -> bool:
        return reply.key == "+"

    def login(self, user: str, password: str) -> bytes:
        return f"LOGIN {user} {password}\r\n".encode()

    def state_probe(self, after: str) -> bytes:
        return b"CAPA\r\n" if after == "starttls" else b"WHOAMI\r\n"

    def state_kept(self, after: str, reply: Reply) -> Optional[str]:
        if after == "starttls":
            kept = "STARTTLS" in self.capabilities(reply)
            return "still offers STARTTLS inside TLS" if kept else None
        return "still logged in after STOPTLS" if reply.ok else None

    def truncated_unit(self, recipient: str) -> Sequence[UnitStep]:
        return (
            UnitStep(b"PUT %d\r\n" % (2 * len(_TRUNCATED)), "continue"),
            UnitStep(_TRUNCATED, "none"),
        )

    # as followed by the proxy: untagged commands, a final line that is not "* "
    def proxy_command(self, line: bytes, verb: bytes) -> Optional[str]:
        return "" if line.strip().upper() == verb else None

    def proxy_answer(self, line: bytes, tag: str) -> Optional[bool]:
        return None if line.startswith(b"* ") else line.startswith(b"OK")


TOY = ToyDialect()

# ------------------------------------------------ the toy reference server

#: The reference-server interface the run layer loads by module name.
BEHAVIOURS: Dict[str, Behaviour] = {
    b.name: b
    for b in (
        STRICT,
        Behaviour("keep-buffer", Rule.R1, "keeps plaintext sent before the upgrade", (Rule.R1,)),
        Behaviour("no-state-reset", Rule.R8, "stays logged in across STOPTLS"),
    )
}

_PUT = re.compile(rb"PUT (\d{1,6})\r?\n\Z", re.IGNORECASE)


class _ToyConnection(asyncio.Protocol):
    """One toy session, run by a task that reads lines and literals."""

    def __init__(self, config: ServerConfig, messages: List[bytes]) -> None:
        self.config = config
        self.messages = messages
        self.transport: Optional[SwitchableTransport] = None
        self.buf = bytearray()
        self.changed = asyncio.Event()
        self.ended = False
        self.framer = TOY.framer()
        self.task: Optional[asyncio.Task[None]] = None

    # ---------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SwitchableTransport)
        self.transport = transport
        transport.hold_after(self._is_starttls, framer=TOY.framer())
        transport.write(b"OK toy ready\r\n")
        self.task = asyncio.ensure_future(self._serve())

    def _is_starttls(self, line: bytes) -> bool:
        return line.strip().upper() == b"STARTTLS"

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.changed.set()

    def eof_received(self) -> bool:
        return False

    def engine_event(self, event: Event) -> None:
        if isinstance(event, ClosureComplete) and not event.resumed and self.transport:
            self.transport.close()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.ended = True
        self.changed.set()

    # ---------------------------------------------------------- reading

    async def _wait(self) -> bool:
        if self.ended:
            return False
        self.changed.clear()
        try:
            await asyncio.wait_for(self.changed.wait(), self.config.limits.idle_timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _line(self) -> Optional[bytes]:
        while True:
            units, _ = self.framer.split(bytes(self.buf))
            if units:
                del self.buf[: len(units[0])]
                return units[0]
            if not await self._wait():
                return None

    async def _bytes(self, count: int) -> Optional[bytes]:
        while len(self.buf) < count:
            if not await self._wait():
                return None
        data = bytes(self.buf[:count])
        del self.buf[:count]
        return data

    # ---------------------------------------------------------- serving

    async def _serve(self) -> None:
        t = self.transport
        assert t is not None
        user: Optional[str] = None
        try:
            while True:
                line = await self._line()
                if line is None:
                    return
                words = line.strip().split()
                verb = words[0].upper() if words else b""
                if verb == b"CAPA":
                    caps = b"* STOPTLS\r\n" if t.tls_active else b"* STARTTLS\r\n"
                    t.write(b"* TOY1\r\n" + caps + b"OK capabilities\r\n")
                elif verb == b"STARTTLS" and not t.tls_active:
                    await t.start_tls(
                        self.config.ssl_context(), server_side=True, preface=b"OK go ahead\r\n"
                    )
                    user = None
                elif verb == b"STOPTLS" and t.tls_active:
                    if self.buf:  # nothing may be pipelined after STOPTLS
                        t.close()
                        return
                    await t.accept_unwrap(preface=b"OK stopping TLS\r\n")
                    if self.config.behaviour != "no-state-reset":
                        user = None
                    t.write(b"OK toy ready\r\n")
                elif verb == b"PING":
                    t.write(b"OK pong\r\n")
                elif verb == b"LOGIN":
                    given = line.strip().split(None, 2)[1:]
                    wanted = [self.config.user.encode(), self.config.password.encode()]
                    ok = given == wanted
                    user = self.config.user if ok else None
                    t.write(b"OK logged in\r\n" if ok else b"ERR bad login\r\n")
                elif verb == b"WHOAMI":
                    t.write(f"OK {user}\r\n".encode() if user else b"ERR not logged in\r\n")
                elif verb == b"PUT" and user and _PUT.match(line.strip() + b"\n"):
                    t.write(b"+ send it\r\n")
                    data = await self._bytes(int(words[1]))
                    if data is None:
                        return  # cut short: never stored
                    self.messages.append(data)
                    t.write(b"OK stored\r\n")
                elif verb == b"BYE":
                    t.write(b"OK bye\r\n")
                    t.close()
                    return
                else:
                    t.write(b"ERR unknown command\r\n")
        except (ConnectionError, asyncio.TimeoutError, RuntimeError):
            t.abort()


async def start_server(config: ServerConfig) -> RunningServer:
    """The toy reference server (the interface ``reference_servers`` loads)."""
    behaviour = BEHAVIOURS[config.behaviour]
    messages: List[bytes] = []
    connections: List[_ToyConnection] = []

    def factory() -> asyncio.Protocol:
        conn = _ToyConnection(config, messages)
        connections.append(conn)
        return conn

    server = await create_server(
        factory, config.host, config.port, policy=behaviour.policy, timeouts=config.timeouts
    )
    return RunningServer(server, config, messages=messages, connections=connections)


# ------------------------------------------------------------------ tests


@pytest.fixture
def toy() -> Iterator[Dialect]:
    register(TOY)
    try:
        yield TOY
    finally:
        unregister(NAME)


async def _catalogue(behaviour: str) -> List[Result]:
    settings = RunSettings(reply_timeout=3.0, scenario_timeout=10.0)
    async with reference_servers((NAME,), behaviour=behaviour) as (target,):
        scenarios = select(role="server", dialect=NAME)
        return await run_server_target(scenarios, target, settings)


def _verdicts(results: Sequence[Result]) -> Set[Tuple[str, str, str]]:
    return {(r.id, r.tls_version, r.verdict.value) for r in results}


def test_the_toy_joins_the_registry_and_the_catalogue(toy: Dialect) -> None:
    assert NAME in names() and dialect_named(NAME) is TOY
    assert reference_server_module(NAME).start_server is start_server
    server_ids = {s.id for s in CATALOGUE if s.role == "server"}
    assert {s.id for s in select(role="server", dialect=NAME)} == server_ids


def test_the_strict_toy_server_passes_the_server_catalogue(toy: Dialect) -> None:
    results = asyncio.run(_catalogue("strict"))
    assert results, "no scenario ran against the toy"
    assert len(results) == 2 * len(select(role="server", dialect=NAME))
    bad = [f"{r.id} TLS {r.tls_version}: {r.verdict.value} {r.summary}" for r in results]
    bad = [b for b, r in zip(bad, results) if r.verdict is not Verdict.PASS]
    assert not bad, "\n".join(bad)


def test_a_toy_server_that_keeps_the_buffer_fails_command_injection(toy: Dialect) -> None:
    results = asyncio.run(_catalogue("keep-buffer"))
    failed = {r.id for r in results if r.verdict is Verdict.FAIL}
    assert {
        "server.command-injection",
        "server.command-injection-split",
        "server.command-injection-multi",
    } <= failed
    others = [r for r in results if r.id not in failed]
    assert all(r.verdict is Verdict.PASS for r in others), _verdicts(others)


def test_a_toy_server_that_keeps_its_login_fails_state_reset(toy: Dialect) -> None:
    results = asyncio.run(_catalogue("no-state-reset"))
    assert {r.id for r in results if r.verdict is not Verdict.PASS} == {"server.state-reset"}
    assert all(r.verdict is Verdict.FAIL for r in results if r.id == "server.state-reset")


def test_the_cli_takes_the_toy_from_the_registry(toy: Dialect) -> None:
    assert parse_target("toy://127.0.0.1:7777") == (NAME, "127.0.0.1", 7777)
    args = build_parser().parse_args(["check-client", "--protocol", NAME, "--", "true"])
    assert args.protocol == NAME
    assert _server_modules()[NAME] == __name__


class OneWayToy(ToyDialect):
    """The toy without a return to plaintext (its server still offers STOPTLS)."""

    name = "toy1"
    url_scheme = "toy1"
    has_return_to_plaintext = False


#: A toy client program (the toy has no in-process reference client with a
#: ``path_driver``, so the path role runs it as ``check-path`` runs any
#: program): STARTTLS, PING under TLS, BYE; it never returns to plaintext.
TOY_CLIENT = """
import socket, ssl, sys
host, port, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sock = socket.create_connection((host, port), timeout=5)
reader = sock.makefile("rb")
def final():
    while True:
        line = reader.readline()
        if not line:
            sys.exit("connection closed")
        if not line.startswith(b"* "):
            return line
assert final().startswith(b"OK")
sock.sendall(b"STARTTLS\\r\\n")
if not final().startswith(b"OK"):
    sys.exit("STARTTLS refused")
ctx = ssl.create_default_context(cafile=cafile)
tls = ctx.wrap_socket(sock, server_hostname="localhost")
reader = tls.makefile("rb")
tls.sendall(b"PING\\r\\n")
if b"pong" not in final():
    sys.exit("no pong")
tls.sendall(b"BYE\\r\\n")
final()
"""


def test_the_path_role_runs_the_toy_pair_through_the_proxy(toy: Dialect, tmp_path: Path) -> None:
    """The proxy follows the toy from the registry: the toy client program and
    the strict toy server pass every path scenario that applies without a
    return to plaintext, and the STOPTLS ones skip (the client never uses it)."""
    script = tmp_path / "toy_client.py"
    script.write_text(TOY_CLIENT)

    async def body() -> List[Result]:
        pki = make_pki(directory=tmp_path)
        pki.write(tmp_path)
        running = await start_server(ServerConfig(pki=pki, behaviour="strict"))
        try:
            argv = [sys.executable, str(script), "{host}", "{port}", "{cafile}"]
            assert pki.cafile is not None
            pair = command_pair(NAME, running.address, argv, Path(pki.cafile), timeout=20)
            settings = RunSettings(reply_timeout=3.0, scenario_timeout=20.0)
            return await run_path_target(PATH_SCENARIOS, pair, settings, tls_versions=("1.3",))
        finally:
            await running.close()

    results = asyncio.run(body())
    assert len(results) == len(PATH_SCENARIOS)
    verdicts = {r.id: r.verdict for r in results}
    assert {i for i, v in verdicts.items() if v is Verdict.SKIP} == set(STOPTLS_SCENARIOS)
    bad = [f"{r.id}: {r.verdict.value} {r.summary}" for r in results]
    bad = [b for b, r in zip(bad, results) if r.verdict not in (Verdict.PASS, Verdict.SKIP)]
    assert bad == []


def test_scenarios_that_need_a_return_to_plaintext_skip_a_dialect_without_one() -> None:
    one_way = register(OneWayToy())
    try:
        chosen = {s.id for s in select(role="server", dialect="toy1")}
        server_ids = {s.id for s in CATALOGUE if s.role == "server"}
        assert server_ids - chosen == {"server.one-sided-close-stoptls", "server.stoptls-cycle"}
        everything_else = [s.id for s in ALL_SCENARIOS if "toy1" not in s.dialects]
        assert set(everything_else) == {
            "server.one-sided-close-stoptls",
            "server.stoptls-cycle",
            "client.one-sided-close",
            "client.stoptls-wait",
            "client.stoptls-cycle",
            "client.starttls-preauth",  # no PREAUTH greeting (has_preauth)
            *REMOVAL_SCENARIOS,  # the server removes TLS: LDAP only (return_by_closure)
            # No capability-list hello, no tagged replies: no such injection shapes.
            "client.response-injection-capabilities",
            "client.response-injection-tagged",
            "client.starttls-untagged",
            "client.starttls-required-stripped",  # no <required/> mark (XMPP's)
            *STOPTLS_SCENARIOS,
            # A return the server may start (FTP CCC) is not the toy's STOPTLS.
            *(s.id for s in CCC_SCENARIOS),
        }
        assert "smtp" in RETURN_TO_PLAINTEXT and "toy1" not in RETURN_TO_PLAINTEXT
    finally:
        unregister(one_way.name)


def test_without_the_toy_the_registry_is_back_to_the_mail_dialects() -> None:
    assert NAME not in DIALECTS
    with pytest.raises(ValueError, match="unknown dialect 'toy'"):
        dialect_named(NAME)


def test_an_incomplete_dialect_is_refused_with_what_it_lacks() -> None:
    class Half(Dialect):
        name = "half"
        default_port = 1
        url_scheme = "half"

        def hello(self) -> bytes:
            return b"HI\r\n"

    with pytest.raises(IncompleteDialect) as caught:
        register(Half())
    message = str(caught.value)
    assert "'half' is incomplete" in message
    for gap in ("server_module", "client_module", "framer", "starttls", "truncated_unit"):
        assert gap in message
    assert "hello," not in message.replace("fake_greeting", "")
    assert "half" not in names()


def test_a_dialect_cannot_take_another_ones_name_or_scheme(toy: Dialect) -> None:
    class Copy(ToyDialect):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register(Copy())

    class Scheme(ToyDialect):
        name = "toy2"

    with pytest.raises(ValueError, match="URL scheme 'toy' belongs to 'toy'"):
        register(Scheme())
