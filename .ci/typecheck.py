"""Run ``mypy --strict`` on the source tree under its installed names.

The import package ``starttls_harness`` is assembled at install time from the
top-level folders ``harness/``, ``servers/`` and ``clients/`` (see
``[tool.setuptools.package-dir]``).  mypy reads folders, not install-time
mappings, so this lays the same shape out as symlinks in a scratch folder
and points mypy at it; error paths are printed relative to the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="starttls-mypy-") as tmp:
        pkg = Path(tmp) / "starttls_harness"
        pkg.mkdir()
        for entry in (ROOT / "harness").iterdir():
            if entry.name != "__pycache__":
                (pkg / entry.name).symlink_to(entry)
        (pkg / "servers").symlink_to(ROOT / "servers")
        (pkg / "clients").symlink_to(ROOT / "clients")
        env = dict(os.environ, MYPYPATH=tmp)
        cmd = [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "-p",
            "starttls_harness",
            "-p",
            "realworld",
            "-p",
            "benchmarks",
            *sys.argv[1:],
        ]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        out = done.stdout.replace(tmp + os.sep + "starttls_harness" + os.sep, "harness/")
        sys.stdout.write(out)
        sys.stderr.write(done.stderr)
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
