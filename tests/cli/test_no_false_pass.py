"""Issue 11.1 for every dialect: what cannot be decided is a skip, never a pass.

``server.state-reset`` against a server that keeps its state must not pass
for want of a test user: in every dialect with a ``no-state-reset``
reference server, without ``--user``/``--password`` the verdict is a fail
(the probe needs no login: SMTP, LMTP) or a skip that names the options;
with them, a fail.  POP3, ManageSieve and NNTP passed here before their
login-state probe was marked as needing a login.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List

import pytest
from starttls_harness.dialects import names
from starttls_harness.report.verdicts import Result, Verdict
from starttls_harness.run.reference import reference_servers, server_module
from starttls_harness.run.server import RunSettings, run_server_target
from starttls_harness.scenarios.server import by_id

Runner = Any
SETTINGS = RunSettings(reply_timeout=0.5, scenario_timeout=5.0, connect_timeout=1.0)
KEEPS_STATE = [d for d in names() if "no-state-reset" in server_module(d).BEHAVIOURS]


def test_the_dialects_that_keep_state_are_found() -> None:
    assert {"smtp", "imap", "pop3", "sieve", "nntp", "ldap"} <= set(KEEPS_STATE)


@pytest.mark.parametrize("with_user", [False, True], ids=["no-user", "user"])
@pytest.mark.parametrize("dialect", KEEPS_STATE)
def test_state_reset_never_passes_a_server_that_keeps_state(
    dialect: str, with_user: bool, run: Runner
) -> None:
    async def body() -> List[Result]:
        async with reference_servers((dialect,), behaviour="no-state-reset") as (target,):
            if not with_user:
                target = dataclasses.replace(target, user=None, password=None)
            return await run_server_target(
                [by_id("server.state-reset")], target, SETTINGS, tls_versions=("1.3",)
            )

    (r,) = run(body, 30.0)
    if with_user:
        assert r.verdict is Verdict.FAIL, r.summary
    else:
        assert r.verdict in (Verdict.FAIL, Verdict.SKIP), r.summary
        if r.verdict is Verdict.SKIP:
            assert "--user/--password" in r.summary
