"""Kernel tests of the tracker's detached probe (tcpidle/probe/detached.py).

Where tp_btf + sk_storage runs (Linux 5.11 on), the tracker has the probe
loaded by a helper process and pinned with its BPF link: the tracker holds
no bcc, the probe records while no tracker runs, a restarted tracker reuses
it (or replaces it when it asks for another selection), and `track
--cleanup` unpins the link, which detaches it.  Real trackers, real
namespaces; the link's and the program's lives are checked by their ids
(BPF_*_GET_FD_BY_ID: ENOENT once the kernel freed them; no bpftool needed).
"""

from __future__ import annotations

import errno
import os
import time

import pytest

from conftest import parse_json_lines  # noqa: E402
from lab.netns import wait_for  # noqa: E402
from test_inline_storage import Pairs, check_against_truth, cookie, inline_storage_or_skip

pytestmark = pytest.mark.kernel
# test_track's fixtures (trackers, bpffs, pin_dir), by name
pytest_plugins = ["test_track"]

PORT = 7301  # Pairs listens there
BPF_PROG_GET_FD_BY_ID = 13
BPF_LINK_GET_FD_BY_ID = 30


@pytest.fixture
def pairs(netns):
    p = Pairs(netns.name)
    yield p
    p.close()


def pinned_ids(pin_dir):
    """(link id, program id) of the probe pinned in pin_dir."""
    from tcpidle.probe.detached import _obj_info
    from tcpidle.probe.maps import obj_get

    fd = obj_get(os.path.join(pin_dir, "link"), read_only=False)
    try:
        raw = _obj_info(fd, 64)
    finally:
        os.close(fd)
    return int.from_bytes(raw[4:8], "little"), int.from_bytes(raw[8:12], "little")


def exists(cmd, obj_id):
    """Does the kernel still have the link/program of this id?"""
    from tcpidle.probe.detached import _sys_bpf

    try:
        fd = _sys_bpf(cmd, obj_id.to_bytes(4, "little") + bytes(8))
    except OSError as e:
        assert e.errno == errno.ENOENT, e
        return False
    os.close(fd)
    return True


def mapped_libraries(pid):
    with open("/proc/%d/maps" % pid) as f:
        return {line.split()[-1] for line in f if "/" in line}


def test_probe_records_while_no_tracker_runs_and_cleanup_stops_it(netns, pairs, trackers,
                                                                  pin_dir, run_tcpidle):
    inline_storage_or_skip()
    t = trackers(netns, "-s", PORT, "-t", 600000, "--interval", 1, "--dry-run",
                 "--pin-dir", pin_dir, "-v")
    t.wait_ready()
    assert "the probe pinned beside them (new" in t.stderr(), t.stderr()
    rc, _ = t.stop()
    assert rc == 0, t.stderr()
    assert "the BPF probe records on, pinned in %s" % pin_dir in t.stderr()

    # Connections opened after the tracker stopped (never dumped before
    # their payload): the probe records them all the same.
    sent = []
    for i in range(3):
        time.sleep(0.05 * (i + 1))
        s, ts = pairs.open_and_send()
        sent.append((cookie(s), ts))
    t_start = time.monotonic_ns()
    audit = run_tcpidle(netns, "audit", "-s", PORT, "--pin-dir", pin_dir, "--json", "-v")
    t_end = time.monotonic_ns()
    assert audit.returncode == 0, audit.stderr
    rows = {r["cookie"]: r for r in parse_json_lines(audit.stdout)}
    check_against_truth(rows, sent, t_start, t_end, "audit with no tracker running")
    link_id, prog_id = pinned_ids(pin_dir)

    # cleanup unpins the link: the kernel detaches and frees the program
    res = run_tcpidle(netns, "track", "--cleanup", "--pin-dir", pin_dir)
    assert res.returncode == 0, res
    assert "removed %s" % os.path.join(pin_dir, "link") in res.stderr
    assert not os.path.exists(pin_dir)
    assert wait_for(lambda: not exists(BPF_LINK_GET_FD_BY_ID, link_id), timeout=10)
    assert wait_for(lambda: not exists(BPF_PROG_GET_FD_BY_ID, prog_id), timeout=10)


def test_tracker_holds_no_bcc_where_the_probe_is_pinned(netns, trackers, pin_dir, bpffs):
    inline_storage_or_skip()
    t = trackers(netns, "-s", PORT, "--interval", 5, "--dry-run", "--pin-dir", pin_dir)
    t.wait_ready()
    libs = mapped_libraries(t.proc.pid)
    assert t.stop()[0] == 0
    assert not [lib for lib in libs if "libbcc" in lib or "LLVM" in lib or "clang" in lib], libs
    assert "libbpf" in " ".join(libs)  # it does read BPF: through libbpf alone

    # the control: a tracker that loads its probe itself (a hook that is no
    # BPF link) maps bcc and the compiler -- what the check above looks for
    other = os.path.join(bpffs, "tidetached-inproc")
    t2 = trackers(netns, "-s", PORT, "--interval", 5, "--dry-run", "--pin-dir", other,
                  "--bpf-hook", "raw_tracepoint", "-v")
    t2.wait_ready()
    libs = mapped_libraries(t2.proc.pid)
    assert t2.stop()[0] == 0
    assert "loaded in this process (hook raw_tracepoint is not a BPF link)" in t2.stderr()
    assert [lib for lib in libs if "libbcc" in lib], libs


def test_restart_reuses_the_pinned_probe_and_another_selection_replaces_it(
        netns, trackers, pin_dir, run_tcpidle):
    inline_storage_or_skip()
    common = ["--interval", 5, "--dry-run", "--pin-dir", pin_dir, "-v"]
    a = trackers(netns, "-s", PORT, *common)
    a.wait_ready()
    assert a.stop()[0] == 0
    first = pinned_ids(pin_dir)

    b = trackers(netns, "-s", PORT, *common)
    b.wait_ready()
    assert "reusing the one pinned in %s" % pin_dir in b.stderr(), b.stderr()
    assert "BPF probe on " in b.stderr()  # said as when it was loaded
    assert pinned_ids(pin_dir) == first
    assert b.stop()[0] == 0

    c = trackers(netns, "-s", PORT + 1, *common)  # another selection: another program
    c.wait_ready()
    assert "loaded for another version, kernel, size or selection" in c.stderr(), c.stderr()
    second = pinned_ids(pin_dir)
    assert second[1] != first[1]
    assert wait_for(lambda: not exists(BPF_PROG_GET_FD_BY_ID, first[1]), timeout=10)
    assert exists(BPF_PROG_GET_FD_BY_ID, second[1])
    assert c.stop()[0] == 0
    res = run_tcpidle(netns, "track", "--cleanup", "--pin-dir", pin_dir)
    assert res.returncode == 0, res
    assert wait_for(lambda: not exists(BPF_PROG_GET_FD_BY_ID, second[1]), timeout=10)
