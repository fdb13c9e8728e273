"""The whole catalogue: the server, client and path roles' scenarios together."""

from __future__ import annotations

from typing import Tuple

from starttls_harness.scenarios.ccc import CCC_SCENARIOS
from starttls_harness.scenarios.client import CLIENT_SCENARIOS
from starttls_harness.scenarios.model import Scenario
from starttls_harness.scenarios.path import PATH_SCENARIOS
from starttls_harness.scenarios.server import CATALOGUE, select

__all__ = ["ALL_SCENARIOS", "everything", "select"]

#: Every scenario of every role.
ALL_SCENARIOS: Tuple[Scenario, ...] = (
    CATALOGUE + tuple(CLIENT_SCENARIOS) + tuple(PATH_SCENARIOS) + CCC_SCENARIOS
)


def everything() -> Tuple[Scenario, ...]:
    """Server, client and path scenarios: the whole catalogue."""
    return ALL_SCENARIOS
