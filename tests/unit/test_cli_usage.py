"""CLI usage errors: one line, exit 2, before anything touches the kernel (no root needed)."""

import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "tcpidle", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, needle", [
    (["kill", "-d", "0"], "port 0 is out of range"),
    (["kill", "-d", "65536"], "port 65536 is out of range"),
    (["kill", "-d", "80,,81"], "empty item"),
    (["kill", "-d", "90-80"], "backwards"),
    (["kill", "-s", "abc"], "'abc' is not a port number"),
    (["kill", "--dst", "10.0.0.0/33", "-d", "80"], "10.0.0.0/33"),
    (["audit", "--src", "nonsense"], "nonsense"),
    (["kill", "-d", "80", "-t", "-5"], "--idle-time '-5': must not be negative"),
    (["kill", "-d", "80", "-i", "-1"], "--interval '-1': must not be negative"),
    (["kill", "-d", "80", "-i", "0"], "--interval '0': must be positive"),
    (["audit", "--state", "bogus"], "'bogus'"),
    (["kill"], "kill needs a port, address or owner selector"),
    (["kill", "-d", "80", "--proc-action", "explode"], "explode"),
    (["audit", "--netns", "tcpidle-no-such-ns"], "tcpidle-no-such-ns"),
    (["audit", "--netns", "/proc/self/ns/net", "--all-netns"], "exclude each other"),
    (["audit", "--bogus-flag"], "--bogus-flag"),
    (["kill", "-d", "80", "-t", "soon"], "soon"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    result = run(*args)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tcpidle: error:")
    assert needle in lines[0]
    assert result.stdout == ""


def test_tcp_closer_spellings_are_accepted():
    text = run("kill", "--help").stdout
    for alias in ("--idle_time", "--use_proc", "--disable_syslog", "--last_recv_limit"):
        assert alias in text


def test_help_has_examples():
    for cmd in ("audit", "kill", "explain"):
        result = run(cmd, "--help")
        assert result.returncode == 0 and "Examples:" in result.stdout
