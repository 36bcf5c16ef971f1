"""The tree passes ruff with the rules configured in pyproject.toml ([tool.ruff]).

Run here so that `scripts/setup test` lints: ruff comes with the test extras
(`pip install -e .[test]`, which scripts/setup does) and takes well under a
second on the whole tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ruff() -> list:
    here = os.path.join(os.path.dirname(sys.executable), "ruff")
    found = here if os.access(here, os.X_OK) else shutil.which("ruff")
    assert found, "ruff is not installed: it comes with the test extras, pip install -e '.[test]'"
    return [found]


def test_ruff_finds_nothing():
    done = subprocess.run(ruff() + ["check", "--no-cache", "--output-format", "concise", ROOT],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, "ruff check found problems:\n" + done.stdout + done.stderr
