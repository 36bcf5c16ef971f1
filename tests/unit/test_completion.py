"""Shell completion (click's protocol) completes tcpidle's commands and options.

The bash test sources the script click generates into a real bash, fills
COMP_WORDS/COMP_CWORD as bash's completion would, and reads COMPREPLY; the
script calls the real `tcpidle` (this venv's) back for the words.
"""

import os
import shutil
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)
TCPIDLE = os.path.join(BIN, "tcpidle")


def _env(**extra):
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    env.update(extra)
    return env


def protocol(shell, words, cword):
    r = subprocess.run([TCPIDLE], env=_env(COMP_WORDS=words, COMP_CWORD=str(cword),
                                           _TCPIDLE_COMPLETE="%s_complete" % shell),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def source(shell):
    r = subprocess.run([TCPIDLE], env=_env(_TCPIDLE_COMPLETE="%s_source" % shell),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def bash_complete(words):
    script = source("bash") + (
        "\nCOMP_WORDS=(%s)\nCOMP_CWORD=%d\n_tcpidle_completion tcpidle\n"
        "printf '%%s\\n' \"${COMPREPLY[@]}\"\n" % (" ".join(words), len(words) - 1))
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_bash_completes_a_command():
    assert bash_complete(["tcpidle", "au"]) == ["audit"]
    assert set(bash_complete(["tcpidle", ""])) >= {"audit", "kill", "track", "explain"}
    assert bash_complete(["tcpidle", "ex"]) == ["explain"]
    assert bash_complete(["tcpidle", "explain", "1", "--exclude-p"]) == ["--exclude-port"]
    assert bash_complete(["tcpidle", "ke"]) == ["keepalive"]
    assert bash_complete(["tcpidle", "keepalive", "--cou"]) == ["--count"]
    assert bash_complete(["tcpidle", "track", "--keepa"]) == ["--keepalive"]


def test_bash_completes_an_option_and_a_choice():
    assert bash_complete(["tcpidle", "kill", "--idle-m"]) == ["--idle-metric"]
    assert bash_complete(["tcpidle", "kill", "--proc-action", ""]) == ["shutdown", "kill"]


def test_zsh_protocol_completes_an_option():
    out = protocol("zsh", "tcpidle track --metrics-", 2).split("\n")
    assert "--metrics-port" in out and "--metrics-addr" in out


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh not installed")
def test_zsh_script_parses(tmp_path):
    path = tmp_path / "_tcpidle"
    path.write_text(source("zsh"))
    r = subprocess.run(["zsh", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
