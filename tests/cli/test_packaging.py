"""Issue 11.11: the licence is an SPDX string (the table form is deprecated by setuptools)."""

from __future__ import annotations

import re
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_licence_is_an_spdx_expression() -> None:
    text = PYPROJECT.read_text(encoding="utf-8")
    found = re.search(r"^license\s*=\s*(.+)$", text, re.MULTILINE)
    assert found, "no license in [project]"
    assert re.fullmatch(r'"[A-Za-z0-9.+-]+( (AND|OR|WITH) [A-Za-z0-9.+-]+)*"', found.group(1))
