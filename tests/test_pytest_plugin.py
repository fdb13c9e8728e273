"""The pytest plugin, exercised with pytester as a downstream project would."""

from __future__ import annotations

import time
from typing import Dict

import pytest

pytest_plugins = ["pytester"]

CONFORMANCE = """
import pytest

@pytest.mark.starttls(dialect="{dialect}", only={only!r}, tls_versions=("1.2", "1.3"))
def test_conformance(starttls_result):
    starttls_result.check()
"""

MISBEHAVING = """
import contextlib
import pytest
from starttls_harness.run.server import ServerTarget
from starttls_harness.servers.base import ServerConfig
from starttls_harness.servers.smtp import start_server

@pytest.fixture
def starttls_server():
    @contextlib.asynccontextmanager
    async def start(pki, tls_version):
        running = await start_server(ServerConfig(pki=pki, behaviour="keep-buffer"))
        try:
            yield ServerTarget("smtp", running.host, running.port, cafile=pki.cafile)
        finally:
            await running.close()
    return start

@pytest.mark.starttls(dialect="smtp", only=["server.command-injection", "server.stoptls-cycle"],
                      tls_versions=("1.3",))
def test_conformance(starttls_result):
    starttls_result.check()
"""


def test_markers_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.starttls(*"])


@pytest.mark.parametrize("dialect", ["smtp", "imap"])
def test_one_test_per_scenario_and_version(pytester: pytest.Pytester, dialect: str) -> None:
    pytester.makepyfile(CONFORMANCE.format(dialect=dialect, only=["server.command-injection*"]))
    result = pytester.runpytest("-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(
        ["*test_conformance?server.command-injection-split-tls1.3? PASSED*"]
    )


def test_failing_server_fails_with_the_ladder(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(MISBEHAVING)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*server.command-injection (TLS 1.3): expected pass, got fail*",
            "*INJECTED*XHARNESS-INJECTED*",
        ]
    )


def test_expect_marker_allows_a_known_verdict(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        MISBEHAVING.replace(
            'tls_versions=("1.3",))',
            'tls_versions=("1.3",), expect={"server.command-injection": "fail"})',
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_server_side_errors_are_raised_in_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio, contextlib
        import pytest
        from starttls_harness.run.server import ServerTarget
        from starttls_harness.servers.base import ServerConfig
        from starttls_harness.servers.smtp import start_server

        @pytest.fixture
        def starttls_server():
            @contextlib.asynccontextmanager
            async def start(pki, tls_version):
                running = await start_server(ServerConfig(pki=pki))
                asyncio.get_running_loop().call_soon(lambda: 1 / 0)  # the server crashes
                try:
                    yield ServerTarget("smtp", running.host, running.port, cafile=pki.cafile)
                finally:
                    await running.close()
            return start

        @pytest.mark.starttls(dialect="smtp", only=["server.stoptls-cycle"], tls_versions=("1.3",))
        def test_conformance(starttls_result):
            starttls_result.check()
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ZeroDivisionError*"])


def test_works_under_xdist(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        CONFORMANCE.format(dialect="smtp", only=["server.command-injection*", "server.*close*"])
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 10
    assert "failed" not in outcomes and "error" not in outcomes


def test_client_role_with_a_command_client(pytester: pytest.Pytester) -> None:
    """A downstream client (here smtplib in a script) checked as role='client'."""
    pytester.makepyfile(
        client_script="""
import smtplib, ssl, sys
host, port, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with smtplib.SMTP(host, port, timeout=5) as s:
    s.starttls(context=ssl.create_default_context(cafile=cafile))
    s.login("u", "p")
    s.sendmail("a@example.org", ["b@example.org"], "Subject: x\\r\\n\\r\\nhi\\r\\n")
""",
        test_client="""
import sys, pytest
from pathlib import Path
from starttls_harness.run.targets import CommandClientTarget

@pytest.fixture
def starttls_client():
    script = str(Path(__file__).parent / "client_script.py")
    return CommandClientTarget("smtp", [sys.executable, script, "{host}", "{port}", "{cafile}"])

@pytest.mark.starttls(role="client", dialect="smtp", tls_versions=("1.3",),
                      only=["client.response-injection", "client.truncation"])
def test_client(starttls_result):
    starttls_result.check()
""",
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    # smtplib takes a reply cut by a truncation for a whole one (R6).
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*client.truncation (TLS 1.3): expected pass, got fail*"])


def test_client_role_sanity_probe_turns_a_broken_client_into_an_error(
    pytester: pytest.Pytester,
) -> None:
    """A client that cannot even complete a normal session refuses nothing: error, not pass."""
    pytester.makepyfile(
        test_broken_client="""
import sys, pytest
from starttls_harness.run.targets import CommandClientTarget

@pytest.fixture
def starttls_client():
    return CommandClientTarget("smtp", [sys.executable, "-c", "pass", "{port}"])

@pytest.mark.starttls(role="client", dialect="smtp", tls_versions=("1.3",),
                      only=["client.starttls-stripped"])
def test_client(starttls_result):
    starttls_result.check()
""",
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*expected pass, got error*", "*sanity probe failed*"])


def test_marker_with_an_unknown_dialect_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_pop3="""
import pytest

@pytest.mark.starttls(dialect="gopher")
def test_server(starttls_result):
    starttls_result.check()
""",
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*unknown dialect 'gopher'; known: smtp, imap*"])


AIOSMTPD_CONTROLLER = """
import contextlib, socket
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Sink
from starttls_harness.run.server import ServerTarget

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

@pytest.fixture
def starttls_server():
    @contextlib.asynccontextmanager
    async def start(pki, tls_version):
        port = free_port()
        controller = Controller(Sink(), hostname="127.0.0.1", port=port,
                                tls_context=pki.server_context(tls_version, shared=False),
                                require_starttls=True)
        controller.start()
        try:
            yield ServerTarget("smtp", "127.0.0.1", port, cafile=pki.cafile)
        finally:
            controller.stop()  # blocking: waits for its connections to end
    return start

@pytest.mark.starttls(dialect="smtp", tls_versions=("1.3",),
                      only=["server.starttls-in-tls", "server.truncation",
                            "server.stoptls-cycle", "server.one-sided-close-stoptls"])
def test_conformance(starttls_result):
    starttls_result.check()
"""


def test_a_blocking_user_fixture_does_not_stall(pytester: pytest.Pytester) -> None:
    """aiosmtpd's Controller.stop() blocks the loop until its connections end: the
    harness's own connections are closed before the teardown (each stalled 30 s)."""
    pytester.makepyfile(AIOSMTPD_CONTROLLER)
    started = time.monotonic()
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "ignore")
    elapsed = time.monotonic() - started
    assert elapsed < 20, f"{elapsed:.1f} s: a teardown waited on the harness's connection"
    outcomes = result.parseoutcomes()
    assert sum(outcomes.values()) == 4


WARNING_CLIENT = """
import pytest
from starttls_harness.run.targets import ReferenceClientTarget

@pytest.fixture
def starttls_client():
    return ReferenceClientTarget("smtp", "no-close-notify-reply")

@pytest.mark.starttls(role="client", dialect="smtp", tls_versions=("1.3",),
                      only=["client.close-notify-reply"])
def test_lenient(starttls_result):
    assert starttls_result.result.verdict.value == "warn"
    starttls_result.check()

@pytest.mark.starttls(role="client", dialect="smtp", tls_versions=("1.3",),
                      only=["client.close-notify-reply"])
def test_strict(starttls_result):
    starttls_result.check(strict=True)
"""


def test_a_warn_fails_check_only_when_strict(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(WARNING_CLIENT)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, warnings=1)
    result.stdout.fnmatch_lines(
        ["*expected pass, got warn*", "*StarttlsWarning*client.close-notify-reply*"]
    )


@pytest.mark.parametrize(
    ("expect", "message"),
    [
        ({"server.no-such-thing": "skip"}, "*expect names 'server.no-such-thing'*"),
        ({"server.stoptls-cycle": "skipped"}, "*'skipped' is no verdict; use one of pass*"),
    ],
)
def test_expect_rejects_unknown_ids_and_verdicts(
    pytester: pytest.Pytester, expect: Dict[str, str], message: str
) -> None:
    pytester.makepyfile(
        f"""
import pytest

@pytest.mark.starttls(dialect="smtp", expect={expect!r})
def test_server(starttls_result):
    starttls_result.check()
"""
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines([message])
