"""Owners' text with terminal escapes never reaches the terminal or the log raw (issue 15 item 9).

A real process names itself with ANSI sequences (writing /proc/self/comm,
as any user may) and owns real sockets in a namespace of the test's own;
it also sits in a cgroup whose name carries escapes (cgroup v2, made here
and removed after).  tcpidle's table, JSON, stderr (-v) and log file are
then checked byte for byte: no ESC, BEL, CR, LF inside a line, C1 control;
the escaped text is there instead.
"""

import json
import os
import subprocess
import sys

import pytest

from lab.netns import wait_for

pytestmark = pytest.mark.kernel

PORT = 7401
EVIL = "\x1b[2J\n\x1b[31mX\x07\r"  # clear screen, newline, red, bell, carriage return: 13 bytes
CGROUP_NAME = "tilab-%d-\x1b[41m\x9b1m" % os.getpid()
CGROUP2 = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"

OWNER = r"""
import socket, sys
with open("/proc/self/comm", "wb") as f:
    f.write(sys.argv[1].encode("utf-8", "surrogateescape"))
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[2])))
l.listen(8)
pairs = []
for _ in range(3):
    c = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
    pairs.append((c, l.accept()[0]))
print("ready", flush=True)
sys.stdin.read()  # until the test closes stdin (bounded by its timeout)
"""

RAW = ("\x1b", "\x07", "\x9b", "\r")  # and no line holds a newline of the owner's


@pytest.fixture
def evil_owner(netns):
    proc = netns.popen([sys.executable, "-c", OWNER, EVIL, PORT], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
    cgroup = None
    try:
        assert proc.stdout.readline().strip() == "ready"
        with open("/proc/%d/comm" % proc.pid, "rb") as f:
            assert f.read().rstrip(b"\n") == EVIL.encode()  # the kernel keeps it raw
        path = os.path.join(CGROUP2, CGROUP_NAME)
        try:
            os.mkdir(path)
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(proc.pid))
            cgroup = path
        except OSError:
            if os.path.isdir(path):
                os.rmdir(path)
        yield proc, cgroup
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if cgroup is not None:
            wait_for(lambda: _try_rmdir(cgroup), timeout=5)


def _try_rmdir(path):
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def assert_clean(text, where):
    for ch in RAW:
        assert ch not in text, (where, repr(ch), text)
    assert "\\x1b[2J\\n\\x1b[31mX\\x07\\r" in text, (where, text)


def test_table_json_log_and_stderr_escape_the_owners_text(netns, run_tcpidle, tmp_path,
                                                         evil_owner):
    proc, cgroup = evil_owner
    res = run_tcpidle(netns, "audit", "-p", "-d", PORT)
    assert res.returncode == 0, res.stderr
    assert_clean(res.stdout, "audit table")
    assert len(res.stdout.splitlines()) == 4  # header and three rows: no forged lines

    res = run_tcpidle(netns, "audit", "-p", "-d", PORT, "--json")
    assert res.returncode == 0
    for ch in RAW:
        assert ch not in res.stdout
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == 3 and all(r["comms"] == [EVIL] for r in rows)  # the exact name, encoded
    if cgroup is not None:
        assert all(r["cgroups"] == ["/" + CGROUP_NAME] for r in rows), rows

    log_path = str(tmp_path / "kill.log")
    res = run_tcpidle(netns, "kill", "-d", PORT, "-p", "-v", "-f", log_path, "--disable-syslog")
    assert res.returncode == 0, res.stderr
    assert_clean(res.stdout, "kill table")
    assert_clean(res.stderr, "kill -v stderr")
    with open(log_path, encoding="utf-8") as f:
        logged = f.read()
    assert_clean(logged, "log file")
    kills = [ln for ln in logged.splitlines() if " destroyed cookie=" in ln]
    assert len(kills) == 3
    assert all("owners=\\x1b[2J\\n\\x1b[31mX\\x07\\r[%d]" % proc.pid in ln for ln in kills), kills


def test_error_texts_with_paths_are_escaped(netns, run_tcpidle):
    """An error quoting a path (here with %s, not repr) goes through the same escaping."""
    res = run_tcpidle(netns, "kill", "-d", PORT, "--netns", "/nonexistent/\x1b[31mred\x07")
    assert res.returncode == 2
    assert len(res.stderr.splitlines()) == 1
    assert "\x1b" not in res.stderr and "\x07" not in res.stderr
    assert "/nonexistent/\\x1b[31mred\\x07" in res.stderr, res.stderr
