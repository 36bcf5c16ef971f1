"""What a real kill imports at start-up, in a namespace of its own: the in-kernel destroy
path loads no compiler-side module (the probe loader: bcc, ctypes.util, subprocess), no
OpenSSL binding and no /proc owner walk unless asked; the netlink path none of the iterator.
(bench/bench_imports.py measures the time; this says which modules.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.kernel

NEVER = {"tcpidle.probe.loader", "bcc", "_hashlib", "tcpidle.owners", "tcpidle.fallback"}


def imported(ns, *args):
    """The modules `tcpidle kill ARGS` imported (python -X importtime), and its result."""
    r = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-X", "importtime", "-m",
                        "tcpidle", "kill", "-d", "1", "-t", "1000", "--disable-syslog", *args],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    mods = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}
    return mods, r


def test_the_in_kernel_kill_imports_only_what_it_uses(netns):
    from tcpidle import kdestroy
    reason = kdestroy.unavailable()
    if reason is not None:
        pytest.skip(reason)
    mods, r = imported(netns, "--destroy-with", "bpf")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tcpidle.probe.iterprog" in mods and "tcpidle.kdestroy" in mods
    assert not NEVER & mods, NEVER & mods


def test_the_netlink_kill_imports_nothing_of_the_iterator(netns):
    mods, r = imported(netns)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tcpidle.passes" in mods
    assert not (NEVER | {"tcpidle.probe.iterprog", "tcpidle.probe.iterdestroy", "ctypes"}) & mods
