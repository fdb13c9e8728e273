"""FTP (AUTH TLS, CCC): the dialect's knowledge, the reference server's matrix, ftplib interop.

The dialect is registered by these tests (see ``harness/dialects/__init__.py``
for why it is not yet by default).  The strict reference FTP server passes
the whole server catalogue and the CCC scenarios; each misbehaving one gets
exactly the verdicts of :data:`starttls_harness.dialects.ftp.SERVER_EXPECTED`.
Python's ``ftplib.FTP_TLS`` (``auth()``, ``prot_p()``, ``ccc()``) logs in,
lists, stores one file, clears the control channel and goes on in plaintext.
"""

from __future__ import annotations

import asyncio
import ftplib
import io
import ssl
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
from starttls_harness.dialects import DIALECTS, Dialect, register, unregister
from starttls_harness.dialects.base import Reply
from starttls_harness.dialects.ftp import FTP, SERVER_EXPECTED, split_ftp_reply
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.reference import reference_servers
from starttls_harness.run.server import RunSettings, run_server_target
from starttls_harness.run.validation import mismatches
from starttls_harness.scenarios.catalogue import ALL_SCENARIOS
from starttls_harness.scenarios.ccc import SERVER_CCC_SCENARIOS
from starttls_harness.scenarios.expectations import expected_server_verdicts
from starttls_harness.scenarios.server import CATALOGUE
from starttls_harness.servers.base import ServerConfig
from starttls_harness.servers.ftp import BEHAVIOURS, start_server
from starttls_harness.tls.certs import make_pki
from starttls_harness.tls.engine import ClosureComplete

SETTINGS = RunSettings(reply_timeout=3.0, scenario_timeout=15.0, concurrency=16)


@pytest.fixture
def ftp() -> Iterator[Dialect]:
    registered_here = "ftp" not in DIALECTS
    if registered_here:
        register(FTP)
    try:
        yield FTP
    finally:
        if registered_here:
            unregister("ftp")


# ---------------------------------------------------------- the dialect


def test_multi_line_replies_end_at_their_own_code() -> None:
    buf = b"211-Features:\r\n AUTH TLS\r\n200 looks final but is not\r\n CCC\r\n211 End\r\nrest"
    reply, rest = split_ftp_reply(buf)
    assert reply is not None and reply.key == "211" and reply.ok and len(reply.lines) == 5
    assert rest == b"rest"
    assert split_ftp_reply(b"211-Features:\r\n AUTH TLS\r\n") == (
        None,
        b"211-Features:\r\n AUTH TLS\r\n",
    )
    refused, _ = split_ftp_reply(b"534 CCC denied by policy\r\n")
    assert refused is not None and not refused.ok and refused.key == "534"


def test_feat_names_the_upgrade_and_the_return() -> None:
    reply, _ = split_ftp_reply(
        b"211-Features:\r\n AUTH TLS;SSL\r\n PBSZ\r\n PROT\r\n CCC\r\n211 End\r\n"
    )
    assert reply is not None
    caps = FTP.capabilities(reply)
    assert {"AUTH TLS", "STARTTLS", "CCC", "STOPTLS", "PBSZ", "PROT"} <= caps
    # CCC predates FEAT: unlisted, it is still tried (Pure-FTPd answers it).
    plain, _ = split_ftp_reply(b"211-Features:\r\n AUTH TLS\r\n211 End\r\n")
    assert plain is not None and "STOPTLS" in FTP.capabilities(plain)


def test_only_a_refusal_of_ccc_means_no_return() -> None:
    for raw in (b"500 Unknown command.\r\n", b"502 Not implemented\r\n", b"534 Policy\r\n"):
        reply, _ = split_ftp_reply(raw)
        assert reply is not None
        why = FTP.stoptls_unoffered(reply)
        assert why is not None and raw[:3].decode() in why
    for raw in (b"200 Control connection unencrypted\r\n", b"421 Timeout\r\n"):
        reply, _ = split_ftp_reply(raw)
        assert reply is not None and FTP.stoptls_unoffered(reply) is None


def test_the_login_is_two_commands_and_one_answer() -> None:
    command = FTP.login("u", "p")
    assert command == b"USER u\r\nPASS p\r\n"
    tag = FTP.tag_of(command)
    reply, rest = FTP.split_reply(b"331 Password required\r\n230 Logged in\r\n", tag)
    assert reply is not None and reply.key == "230" and reply.ok and rest == b""
    half, _ = FTP.split_reply(b"331 Password required\r\n", tag)
    assert half is None
    bad, _ = FTP.split_reply(b"331 Password required\r\n530 Login incorrect\r\n", tag)
    assert bad is not None and not bad.ok


def test_the_dialect_names_ccc_and_who_may_close_first() -> None:
    assert FTP.stoptls() == b"CCC\r\n" and FTP.starttls() == b"AUTH TLS\r\n"
    assert FTP.server_may_close_first and FTP.closure_initiator == "either"
    assert not FTP.greets_after_stoptls
    assert FTP.sentinel() == b"FEAT\r\n"
    assert FTP.is_sentinel_reply(Reply((b"211-Features:\r\n", b"211 End\r\n"), True, "211"))
    assert FTP.is_injected_reply(Reply((b"500 Unknown command\r\n",), False, "500"))
    # Handshake failures said in plaintext are not answers to an injected command.
    oops = b"500 OOPS: error:0A00010B:SSL routines::wrong version number\r\n"
    assert not FTP.is_injected_reply(Reply((oops,), False, "500"))
    assert not FTP.is_injected_reply(Reply((b"421 TLS handshake failed\r\n",), False, "421"))


def test_a_one_sided_client_closure_is_not_staged_against_a_server_that_closes_first(
    ftp: Dialect,
) -> None:
    one_sided = next(s for s in CATALOGUE if s.id == "server.one-sided-close-stoptls")
    assert "ftp" not in one_sided.dialects and "smtp" in one_sided.dialects


def test_the_ccc_scenarios_apply_by_flag_not_by_name(ftp: Dialect) -> None:
    ccc_ids = {s.id for s in SERVER_CCC_SCENARIOS}
    assert ccc_ids == {
        "server.ccc-cycle",
        "server.ccc-no-close-notify",
        "server.ccc-late-close-notify",
    }
    assert ccc_ids <= {s.id for s in ALL_SCENARIOS}
    for scenario in SERVER_CCC_SCENARIOS:
        assert list(scenario.dialects) == ["ftp"]
        verdicts = {e.verdict for e in scenario.expect.values()}
        assert Verdict.PASS in verdicts and Verdict.FAIL in verdicts


# ------------------------------------------------ the validation matrix


async def _matrix() -> List[Tuple[str, List[Result]]]:
    scenarios = [*CATALOGUE, *SERVER_CCC_SCENARIOS]

    async def one(behaviour: str) -> Tuple[str, List[Result]]:
        async with reference_servers(("ftp",), behaviour=behaviour) as (target,):
            return behaviour, await run_server_target(scenarios, target, SETTINGS)

    return list(await asyncio.gather(*(one(b) for b in BEHAVIOURS)))


@pytest.fixture(scope="module")
def matrix() -> Dict[str, List[Result]]:
    """Every mode's results, run once (concurrently) for the tests below.

    The silent modes spend bounded waits on purpose; one run of the matrix
    pays them once instead of once more per test.
    """
    return dict(asyncio.run(_matrix()))


def test_the_ftp_validation_matrix_holds(ftp: Dialect, matrix: Dict[str, List[Result]]) -> None:
    assert set(BEHAVIOURS) == set(SERVER_EXPECTED)
    problems: List[str] = []
    for behaviour, results in matrix.items():
        applicable = [s for s in (*CATALOGUE, *SERVER_CCC_SCENARIOS) if "ftp" in s.dialects]
        assert len(results) == 2 * len(applicable), behaviour
        expected = expected_server_verdicts("ftp", behaviour)
        problems += [f"{behaviour}: {p}" for p in mismatches(results, expected)]
        if BEHAVIOURS[behaviour].rule is not None:  # strict, unlisted-ccc, no-ccc break none
            guarded = next(iter(expected))
            assert any(r.id == guarded and r.verdict is not Verdict.PASS for r in results)
        if behaviour == "no-ccc":  # CCC tried unlisted: the skip quotes the refusal
            for r in results:
                notes = " ".join(e.note for e in r.evidence.exchanges)
                if r.id in ("server.ccc-cycle", "server.close-notify-reply"):
                    assert "the server refused CCC: 500 Unknown command." in notes, r.id
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(
    ("behaviour", "verdict", "said"),
    [
        ("silent-discard", Verdict.PASS, "the earlier plaintext was discarded"),
        ("silent-hold", Verdict.FAIL, "answered the plaintext commands sent before our"),
        ("header-drops-tls", Verdict.FAIL, "silent to the first plaintext command, answered"),
        ("swallow-record", Verdict.PASS, "took the plaintext for a TLS record and never ran"),
        ("strict", Verdict.PASS, "refused plaintext that came without"),
        ("early-plaintext", Verdict.FAIL, "answered plaintext after CCC without"),
    ],
)
def test_a_silent_server_is_decided_one_segment_at_a_time(
    ftp: Dialect, matrix: Dict[str, List[Result]], behaviour: str, verdict: Verdict, said: str
) -> None:
    """Silence after the early plaintext is not the end: a second command, close_notify, decide."""
    results = [r for r in matrix[behaviour] if r.id == "server.ccc-no-close-notify"]
    assert sorted(r.tls_version for r in results) == ["1.2", "1.3"]
    for r in results:
        notes = " ".join(e.note for e in r.evidence.exchanges)
        assert r.verdict is verdict, (r.tls_version, r.summary, notes)
        assert said in f"{r.summary} {notes}", (r.tls_version, r.summary, notes)
        silent = behaviour.startswith(("silent-", "swallow-"))
        second = "a second plaintext command, still without our close_notify" in notes
        closure = "our close_notify now, then a sentinel command" in notes
        fin = "our TCP FIN (after the closure)" in notes
        assert second is (silent or behaviour == "header-drops-tls"), notes
        assert closure is silent, notes
        assert fin is (behaviour == "swallow-record"), notes


# ------------------------------------------------------ ftplib interop


def test_ftplib_logs_in_stores_lists_and_clears_the_control_channel(tmp_path: Path) -> None:
    pki = make_pki(directory=tmp_path)
    pki.write(tmp_path)
    assert pki.cafile is not None
    config = ServerConfig(pki=pki)
    loop = asyncio.new_event_loop()
    holder: List[object] = []
    ready = threading.Event()
    stops: List[asyncio.Event] = []

    async def main() -> None:
        server = await start_server(config)
        holder.append(server)
        stops.append(asyncio.Event())  # made inside its own loop (Python 3.9)
        ready.set()
        await stops[0].wait()
        await server.close()
        # Whatever the session left (a STOR cut by the test's failure) ends
        # here, in its own loop, not when another test collects it.
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        server = holder[0]
        host, port = server.address  # type: ignore[attr-defined]
        ctx = ssl.create_default_context(cafile=str(pki.cafile))
        ctx.check_hostname = False  # ftplib names the data connection by IP address
        client = ftplib.FTP_TLS(context=ctx, timeout=10)
        client.connect(host, port)
        assert client.auth().startswith("234")
        client.login(config.user, config.password)
        client.prot_p()
        client.storbinary("STOR hello.txt", io.BytesIO(b"hello"))
        listing: List[str] = []
        client.retrlines("LIST", listing.append)
        assert listing and "hello.txt" in listing[0]
        assert client.ccc().startswith("200")
        assert client.voidcmd("NOOP").startswith("200")
        assert client.pwd() == "/"  # still logged in after CCC (RFC 4217 §5)
        client.quit()
        assert b"hello" in server.messages  # type: ignore[attr-defined]
        session = server.connections[0]  # type: ignore[attr-defined]
        closures = [e for e in session.transport.events if isinstance(e, ClosureComplete)]
        assert closures and closures[0].resumed
        assert session.transport.violations == []
    finally:
        if stops:
            loop.call_soon_threadsafe(stops[0].set)
        thread.join(10)
        if not thread.is_alive():
            loop.close()
