"""Kernel tests of the tracker's detached probe (tcpidle/probe/detached.py).

The tracker has the probe loaded by a helper process and pinned with its
BPF links: the tracker holds no bcc, the probe records while no tracker
runs, a restarted tracker reuses it (or replaces it when it asks for another
selection), and `track --cleanup` unpins the links, which detaches them.
Both paths: tp_btf + sk_storage (Linux 5.11 on; one link), and the LRU map
with its destroy hook (Linux 5.10, or the raw_tracepoint hook asked for;
two links).  Real trackers, real namespaces; the links' and the programs'
lives are checked by their ids (BPF_*_GET_FD_BY_ID: ENOENT once the kernel
freed them; no bpftool needed).
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
    from tcpidle.probe.bpfsys import bpf

    try:
        fd = bpf(cmd, obj_id.to_bytes(4, "little") + bytes(8))
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
                  "--bpf-hook", "tracepoint", "-v")
    t2.wait_ready()
    libs = mapped_libraries(t2.proc.pid)
    assert t2.stop()[0] == 0
    assert "loaded in this process (hook tracepoint is not a BPF link)" in t2.stderr()
    assert [lib for lib in libs if "libbcc" in lib], libs


def lru_hook_args():
    """The tracker arguments that give the LRU path here: auto where tracing
    programs have no per-socket storage (before 5.11: the lab's 5.10, where
    tp_btf records into the LRU map), else the raw tracepoint asked for."""
    from tcpidle.probe.features import release_at_least

    return ["--bpf-hook", "raw_tracepoint"] if release_at_least(os.uname().release, (5, 11)) \
        else []


def link_ids(pin_dir, name):
    """(link id, program id) of the link pinned as pin_dir/name."""
    from tcpidle.probe.detached import _obj_info
    from tcpidle.probe.maps import obj_get

    fd = obj_get(os.path.join(pin_dir, name), read_only=False)
    try:
        raw = _obj_info(fd, 64)
    finally:
        os.close(fd)
    return int.from_bytes(raw[4:8], "little"), int.from_bytes(raw[8:12], "little")


def pinned_activity(pin_dir):
    from tcpidle.probe import PinnedMap

    reader = PinnedMap.open(pin_dir)
    try:
        return reader.activity()
    finally:
        reader.close()


def resident_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_lru_probe_is_pinned_with_its_destroy_hook_and_records_while_no_tracker_runs(
        netns, pairs, trackers, pin_dir, run_tcpidle, record_property):
    """The LRU path detached: receive and destroy hooks pinned as BPF links."""
    common = ["-s", PORT, "-t", 600000, "--interval", 0.3, "--dry-run", "--pin-dir", pin_dir,
              "-v"] + lru_hook_args()
    t = trackers(netns, *common)
    t.wait_ready(timeout=300)  # the loader's compile: minutes under TCG on a loaded host
    assert "the probe pinned beside them (new" in t.stderr(), t.stderr()
    assert "per-socket storage" not in t.stderr()
    libs = mapped_libraries(t.proc.pid)
    assert not [lib for lib in libs if "libbcc" in lib or "LLVM" in lib], libs
    # a fact for the lab's report (a few sockets: the bench measures 10k and 100k)
    record_property("lab_detached_lru_tracker_rss", "%.1f MB" % (resident_kb(t.proc.pid) / 1024))
    assert sorted(os.listdir(pin_dir)) == ["activity", "counters", "destroy_link", "link",
                                           "probe"]
    # connections the tracker's polls number (the hook reads the cookie from
    # the socket: tp_btf before 5.12, the raw tracepoint)
    conns = []
    for _ in range(3):
        s, _ = pairs.open_and_send()
        conns.append((pairs.socks[-2], s))
    time.sleep(1.5)  # several polls
    rc, _ = t.stop()
    assert rc == 0, t.stderr()
    assert "the BPF probe records on, pinned in %s" % pin_dir in t.stderr()

    # no tracker runs: the pinned probe records each payload ...
    sent = []
    for i, (c, s) in enumerate(conns):
        time.sleep(0.05 * (i + 1))
        ts = time.monotonic_ns()
        c.sendall(b"y")
        assert s.recv(16) == b"y"
        sent.append((cookie(s), (ts, time.monotonic_ns())))
    t_start = time.monotonic_ns()
    audit = run_tcpidle(netns, "audit", "-s", PORT, "--pin-dir", pin_dir, "--json", "-v")
    t_end = time.monotonic_ns()
    assert audit.returncode == 0, audit.stderr
    assert "the tracker's map pinned in %s" % pin_dir in audit.stderr, audit.stderr
    rows = {r["cookie"]: r for r in parse_json_lines(audit.stdout)}
    check_against_truth(rows, sent, t_start, t_end, "LRU probe with no tracker running")
    # ... and its destroy hook deletes the entries of sockets that die
    c, s = conns[0]
    gone = [cookie(c), cookie(s)]
    assert gone[1] in pinned_activity(pin_dir)
    c.close()
    assert s.recv(16) == b""
    s.close()
    assert wait_for(lambda: not set(gone) & set(pinned_activity(pin_dir)), timeout=10)

    # a restarted tracker reuses the pinned probe, compiling nothing
    recv_ids, destroy_ids = link_ids(pin_dir, "link"), link_ids(pin_dir, "destroy_link")
    b = trackers(netns, *common)
    b.wait_ready(timeout=120)
    assert "reusing the one pinned in %s" % pin_dir in b.stderr(), b.stderr()
    assert (link_ids(pin_dir, "link"), link_ids(pin_dir, "destroy_link")) == (recv_ids,
                                                                              destroy_ids)
    assert b.stop()[0] == 0

    # cleanup unpins both links: the kernel detaches and frees both programs
    res = run_tcpidle(netns, "track", "--cleanup", "--pin-dir", pin_dir)
    assert res.returncode == 0, res
    for name in ("link", "destroy_link"):
        assert "removed %s" % os.path.join(pin_dir, name) in res.stderr
    assert not os.path.exists(pin_dir)
    for link_id, prog_id in (recv_ids, destroy_ids):
        assert wait_for(lambda: not exists(BPF_LINK_GET_FD_BY_ID, link_id), timeout=10)
        assert wait_for(lambda: not exists(BPF_PROG_GET_FD_BY_ID, prog_id), timeout=10)


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


def test_a_forced_in_process_hook_retires_the_pinned_probe(netns, pairs, trackers, pin_dir,
                                                          run_tcpidle):
    """A tracker forced onto a hook that is no BPF link (the classic tracepoint)
    loads its probe in-process, into the LRU map.  A detached probe pinned in
    the same directory by an earlier tracker is retired once it is attached:
    its link is freed (it would record on beside), its storage unpinned, and
    `audit` reads the live map: a payload sent now is seen there, "bpf"."""
    inline_storage_or_skip()
    common = ["--interval", 5, "--dry-run", "--pin-dir", pin_dir, "-v"]
    a = trackers(netns, "-s", PORT, *common)
    a.wait_ready(timeout=300)  # each tracker compiles: minutes under TCG on a loaded host
    assert a.stop()[0] == 0
    link_id, prog_id = pinned_ids(pin_dir)
    b = trackers(netns, "-s", PORT, "--bpf-hook", "tracepoint", *common)
    b.wait_ready(timeout=300)
    try:
        assert "is detached (its storage unpinned too)" in b.stderr(), b.stderr()
        assert {"link", "probe", "storage"}.isdisjoint(os.listdir(pin_dir)), os.listdir(pin_dir)
        # the kernel frees the link, then (deferred, after an RCU grace period) the program
        assert wait_for(lambda: not exists(BPF_LINK_GET_FD_BY_ID, link_id), timeout=10)
        assert wait_for(lambda: not exists(BPF_PROG_GET_FD_BY_ID, prog_id), timeout=10)
        server, _ = pairs.open_and_send()
        res = run_tcpidle(netns, "audit", "-s", PORT, "--json", "--pin-dir", pin_dir, "-v")
        assert res.returncode == 0, res.stderr
        assert "the tracker's map pinned in %s" % pin_dir in res.stderr, res.stderr
        row = {r["cookie"]: r for r in parse_json_lines(res.stdout)}[cookie(server)]
        assert row["idle_source"] == "bpf", row
    finally:
        assert b.stop()[0] == 0
