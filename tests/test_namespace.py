"""What the distribution installs collides with nothing a user's project has.

Everything lives under the one import package ``starttls_harness``; a
downstream project with its own top-level ``harness``, ``servers`` and
``clients`` packages (common names) still runs the CLI and the pytest plugin
with its default fixtures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

#: Packages a downstream project may well have; each shadows nothing of ours.
OWN_PACKAGES = {
    "harness": "__version__ = 'users-own'\nDEFAULTS = {'who': 'the user'}\n",
    "servers": "def start_server():\n    raise RuntimeError('the user\\'s own servers package')\n",
    "clients": "NAME = 'the user\\'s own clients package'\n",
}


def _own_packages(root: Path) -> None:
    for name, body in OWN_PACKAGES.items():
        pkg = root / name
        pkg.mkdir()
        (pkg / "__init__.py").write_text(body)
        (pkg / "base.py").write_text("RAISE = 1 / 0  # importing this would be our bug\n")


def test_installed_names_are_one_namespace() -> None:
    """Nothing but ``starttls_harness`` is a top-level import name we install."""
    from importlib import metadata

    dist = metadata.distribution("starttls-harness")
    tops = set()
    for file in dist.files or ():
        top = file.parts[0] if file.parts else ""
        if top in ("..", "__pycache__") or top.startswith("__editable__"):
            continue  # console script; an editable install's finder hook
        if top.endswith((".dist-info", ".data", ".pth")):
            continue
        tops.add(top[:-3] if top.endswith(".py") else top)
    assert tops <= {"starttls_harness"}, tops


def test_plugin_with_users_own_packages(pytester: pytest.Pytester) -> None:
    _own_packages(pytester.path)
    pytester.makepyfile(
        """
        import harness, servers, clients
        import pytest

        def test_users_packages_are_theirs():
            assert harness.__version__ == "users-own"
            assert clients.NAME.startswith("the user")

        @pytest.mark.starttls(dialect="smtp", only=["server.command-injection"],
                              tls_versions=("1.3",))
        def test_conformance(starttls_result):
            starttls_result.check()
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=2)


def test_cli_with_users_own_packages(tmp_path: Path) -> None:
    _own_packages(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "starttls_harness", "check", "--only", "server.stoptls-cycle"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pass" in done.stdout.lower()
