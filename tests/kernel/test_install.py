"""After `scripts/setup` (which runs before the suite): `man tcpidle` and completion work.

Root tier: the set-up runs as root and links into /usr/local.  On a machine
shared by several clones the /usr/local links point at whichever clone was
set up last, so this clone's own copies are checked through PATH (man-db adds
DIR/../share/man for every DIR on PATH), and the /usr/local links for
resolving to a tcpidle page and completion script.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SHARE = VENV_BIN.parent / "share"


def run(cmd, **env):
    e = dict(os.environ, PATH="%s:%s" % (VENV_BIN, os.environ.get("PATH", "")), MANPAGER="cat",
             MANWIDTH="100", **env)
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=60)


def test_man_tcpidle_shows_this_clones_page():
    r = run(["man", "-w", "tcpidle"])
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == (SHARE / "man" / "man8" / "tcpidle.8").resolve()
    assert (SHARE / "man" / "man8" / "tcpidle.8").read_text() == (ROOT / "doc" / "tcpidle.8").read_text()
    r = run(["man", "tcpidle"])
    assert r.returncode == 0, r.stderr
    for heading in ("NAME", "SYNOPSIS", "COMMANDS", "OUTPUT", "EXIT STATUS"):
        assert "\n%s\n" % heading in r.stdout
    assert "--idle-time" in r.stdout


def test_system_wide_links():
    for link in ("/usr/local/bin/tcpidle", "/usr/local/share/man/man8/tcpidle.8",
                 "/usr/local/share/bash-completion/completions/tcpidle",
                 "/usr/local/share/zsh/site-functions/_tcpidle"):
        assert os.path.exists(link), "%s missing or dangling after the set-up" % link
    r = subprocess.run(["man", "-w", "tcpidle"], capture_output=True, text=True,
                       env=dict(os.environ, PATH="/usr/local/bin:/usr/bin:/bin"))
    assert r.returncode == 0 and r.stdout.strip().endswith("tcpidle.8"), r.stderr


def test_bash_completion_loader_finds_tcpidle():
    """bash-completion (installed by the set-up) loads tcpidle's completion on demand."""
    script = ("source /usr/share/bash-completion/bash_completion\n"
              "_completion_loader tcpidle\n"
              "COMP_WORDS=(tcpidle tr); COMP_CWORD=1\n"
              "$(complete -p tcpidle | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p') tcpidle\n"
              "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    r = run(["bash", "--norc", "--noprofile", "-c", script])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["track"]
