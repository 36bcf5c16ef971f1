"""Kernel tests of `tcpidle track`: the daemon, its pinned maps, signals, events, metrics.

The tracker runs as it would in production, a separate process, here
`ip netns exec NS python -m tcpidle track ...` inside a namespace made for
the test, with connections from a farm on that namespace's loopback.

Where the pins live: `ip netns exec` gives the command a mount namespace of
its own with a fresh /sys, so a bpffs at /sys/fs/bpf is never the host's
there, and one the tracker mounts itself dies with it.  Tests that restart
the tracker therefore pin on a BPF filesystem the test mounts (in the host's
mount namespace, before the tracker starts, so the tracker sees it), in a
directory named titrack-*; `test_mounts_bpffs_itself_under_ip_netns_exec`
covers /sys/fs/bpf and the automatic mount.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from lab.netns import in_netns, wait_for  # noqa: E402
from conftest import parse_json_lines  # noqa: E402
from tcpidle.probe import (VALUE, PinError, PinnedMap, Probe, ProbeUnavailable,
                           is_bpffs, libbpf, pin_dir_holder, remove_pins)

pytestmark = pytest.mark.kernel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ECONNABORTED = 103
PORT = 7101
_seq = iter(range(1, 1000))


# -- helpers ------------------------------------------------------------------------




def read_lines(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def assert_probe_source(event):
    """The idle time of a connection the probe has a record of is the probe's."""
    assert event["idle_source"] == "bpf", event


class TrackerProc:
    """One `tcpidle track` process; its stdout and stderr go to files."""

    def __init__(self, argv, directory, name):
        self.out_path = os.path.join(directory, name + ".out")
        self.err_path = os.path.join(directory, name + ".err")
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=self._err, cwd=REPO_ROOT)

    def stderr(self):
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def stdout(self):
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def running(self):
        return self.proc.poll() is None

    def wait_ready(self, timeout=60):
        """Until the loop runs (its start-up note), failing with stderr if it died."""
        ok = wait_for(lambda: "polling every" in self.stderr() or not self.running(), timeout)
        assert ok and self.running(), "tracker not running: rc=%s\n%s" % (
            self.proc.poll(), self.stderr())

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Signal it; (exit status, seconds it took to exit)."""
        sent = time.monotonic()
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        return rc, time.monotonic() - sent

    def kill(self):
        if self.running():
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()
        self._err.close()


@pytest.fixture
def trackers(tcpidle_argv, tmp_path):
    """start(ns, *args) -> TrackerProc running `tcpidle track --disable-syslog *args`."""
    made = []

    def start(ns, *args):
        argv = tcpidle_argv(ns, "track", "--disable-syslog", *args)
        t = TrackerProc(argv, str(tmp_path), "track%d" % len(made))
        made.append(t)
        return t

    yield start
    for t in made:
        t.kill()


@pytest.fixture
def pin_dir(bpffs):
    return os.path.join(bpffs, "titrack-%d-%d" % (os.getpid(), next(_seq)))


# -- the daemon -----------------------------------------------------------------------


def test_kills_what_turns_idle_spares_active_and_protected(netns, make_farm, trackers, pin_dir,
                                                           tmp_path):
    farm = make_farm(netns)
    farm.serve([PORT, PORT + 1])
    idle = farm.connect("127.0.0.1", PORT, label="idle", tag="idle")[0]
    quitter = farm.connect("::1", PORT, label="active", tag="quitter")[0]
    steady = farm.connect("127.0.0.1", PORT, label="active", tag="steady")[0]
    # selected by -d, idle, but on a protected port: the protected list wins
    protected = farm.connect("127.0.0.1", PORT + 1, label="idle", tag="protected")[0]
    events = str(tmp_path / "events.jsonl")
    logfile = str(tmp_path / "track.log")

    t = trackers(netns, "-d", "%d,%d" % (PORT, PORT + 1), "--exclude-port", PORT + 1,
                 "-t", 500, "--interval", 0.3, "--pin-dir", pin_dir, "--event-log", events,
                 "-f", logfile, "--json", "-p")
    t.wait_ready()
    assert "BPF probe on " in t.stderr()
    assert "maps pinned in %s (new maps)" % pin_dir in t.stderr()

    st = farm.wait_until(lambda s: not s[idle["id"]]["alive"], timeout=30)
    assert st[idle["id"]]["error"] == ECONNABORTED, (st[idle["id"]], t.stderr())
    time.sleep(1.0)  # a few polls
    st = farm.status()
    for rec in (quitter, steady, protected):
        assert st[rec["id"]]["alive"] and st[rec["id"]]["error"] is None, (st[rec["id"]], t.stderr())

    # logrotate: move both files away, SIGHUP; the next kill goes to new files
    os.rename(events, events + ".1")
    os.rename(logfile, logfile + ".1")
    t.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: os.path.exists(logfile), timeout=5), t.stderr()

    farm.set_label([quitter["id"]], "idle")
    st = farm.wait_until(lambda s: not s[quitter["id"]]["alive"], timeout=10)
    assert st[quitter["id"]]["error"] == ECONNABORTED, (st[quitter["id"]], t.stderr())
    assert wait_for(lambda: read_lines(events), timeout=5)
    st = farm.status()
    assert st[steady["id"]]["alive"] and st[protected["id"]]["alive"]
    assert all(farm.ping([steady["id"], protected["id"]]).values())

    rc, took = t.stop()
    assert rc == 0, t.stderr()
    assert took < 1.0, took
    # pins kept (storage: where tp_btf + sk_storage records; link and probe:
    # where that probe is pinned and records on, probe/detached.py)
    assert sorted(os.listdir(pin_dir)) in (["activity", "counters"],
                                           ["counters", "storage"],
                                           ["counters", "link", "probe", "storage"])

    before, after = read_lines(events + ".1"), read_lines(events)
    assert [e["cookie"] for e in before] == [idle["cookie"]]
    assert [e["cookie"] for e in after] == [quitter["cookie"]]
    for e in before + after:
        assert e["action"] == "destroyed" and e["dry_run"] is False and e["error"] is None
        assert e["ts"].endswith("+00:00") and e["idle_ms"] >= 500
        assert e["pids"] == [farm.pid]
    # the quitter received data while active: the probe has its record
    assert after[0]["family"] == "ipv6" and after[0]["last_rx_ms"] is not None
    assert_probe_source(after[0])
    with open(logfile + ".1") as f:
        assert "destroyed cookie=%d " % idle["cookie"] in f.read()
    with open(logfile) as f:
        assert "destroyed cookie=%d " % quitter["cookie"] in f.read()
    rows = [json.loads(line) for line in t.stdout().splitlines() if line.strip()]
    assert sorted(r["cookie"] for r in rows) == sorted([idle["cookie"], quitter["cookie"]])


def test_audit_and_kill_read_the_trackers_pinned_map(netns, make_farm, trackers, pin_dir,
                                                      run_tcpidle):
    """One-shot commands in other processes use the tracker's history (issue: precise idleness)."""
    farm = make_farm(netns)
    farm.serve([PORT])
    talker = farm.connect("127.0.0.1", PORT, label="active", tag="talker")[0]
    quiet = farm.connect("127.0.0.1", PORT, label="idle", tag="quiet")[0]
    t = trackers(netns, "-d", PORT, "-t", 600000, "--interval", 0.3, "--pin-dir", pin_dir)
    t.wait_ready()
    time.sleep(1.0)  # the talker's segments reach the map

    audit = run_tcpidle(netns, "audit", "-d", PORT, "--pin-dir", pin_dir, "--json", "-v")
    assert audit.returncode == 0, audit.stderr
    # the per-socket storage where tp_btf + sk_storage runs (5.11 on), else the map
    assert ("the tracker's per-socket storage pinned in %s" % pin_dir in audit.stderr
            or "the tracker's map pinned in %s" % pin_dir in audit.stderr), audit.stderr
    rows = {r["cookie"]: r for r in parse_json_lines(audit.stdout)}
    assert rows[talker["cookie"]]["idle_source"] == "bpf"
    assert rows[talker["cookie"]]["idle_ms"] < 250  # sends every 50 ms
    assert rows[talker["cookie"]]["last_rx_ms"] is not None
    # The quiet client never received data: nothing in the map, tcp_info speaks.
    assert rows[quiet["cookie"]]["idle_source"] == "tcp_info"
    assert rows[quiet["cookie"]]["last_rx_ms"] is None

    kill = run_tcpidle(netns, "kill", "-d", PORT, "-t", 500, "--pin-dir", pin_dir, "--require-bpf",
                       "--dry-run", "--json", "--disable-syslog")
    assert kill.returncode == 0, kill.stderr
    assert [(r["cookie"], r["action"]) for r in parse_json_lines(kill.stdout)] == [
        (quiet["cookie"], "would-destroy")]
    t.stop()

    # --require-bpf with no pins anywhere: exit 1, one line, nothing done.
    missing = run_tcpidle(netns, "kill", "-d", PORT, "--pin-dir", pin_dir + "-none", "--require-bpf",
                          "--disable-syslog")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "--require-bpf" in missing.stderr
    assert all(farm.ping([talker["id"], quiet["id"]]).values())


def test_per_interval_cap_acts_on_the_idlest_first(netns, make_farm, trackers, pin_dir, tmp_path):
    farm = make_farm(netns)
    farm.serve([PORT])
    conns = []
    for _ in range(5):  # 60 ms apart: distinct idle times, oldest first
        conns += farm.connect("127.0.0.1", PORT, label="idle")
        time.sleep(0.06)
    events = str(tmp_path / "events.jsonl")
    t = trackers(netns, "-d", PORT, "-t", 200, "--interval", 2, "--max-kills-per-interval", 2,
                 "--pin-dir", pin_dir, "--event-log", events)
    t.wait_ready()
    assert wait_for(lambda: read_lines(events), timeout=30), t.stderr()
    time.sleep(0.5)  # the first poll is over; the next is 1.5 s away
    first = read_lines(events)
    st = farm.status()
    dead = [c["cookie"] for c in conns if not st[c["id"]]["alive"]]
    assert len(first) == 2, (first, t.stderr())
    assert sorted(dead) == sorted(e["cookie"] for e in first)
    assert {e["cookie"] for e in first} == {conns[0]["cookie"], conns[1]["cookie"]}  # idlest
    assert "5 idle connections, acting on the 2 idlest" in t.stderr()

    assert wait_for(lambda: len(read_lines(events)) >= 5, timeout=10), t.stderr()
    evs = read_lines(events)
    assert len(evs) == 5
    assert [e["cookie"] for e in evs[2:4]] == [conns[2]["cookie"], conns[3]["cookie"]]
    assert evs[4]["cookie"] == conns[4]["cookie"]
    # three polls, about an interval apart
    assert evs[0]["ts"] == evs[1]["ts"] < evs[2]["ts"] == evs[3]["ts"] < evs[4]["ts"]
    st = farm.status()
    assert not any(st[c["id"]]["alive"] for c in conns)
    assert t.stop()[0] == 0


def test_restart_keeps_history_and_cleanup_removes_it(netns, make_farm, trackers, pin_dir,
                                                      tmp_path, run_tcpidle):
    farm = make_farm(netns)
    farm.serve([PORT])
    hist = farm.connect("127.0.0.1", PORT, label="active", tag="hist")[0]
    steady = farm.connect("127.0.0.1", PORT, label="active", tag="steady")[0]
    # The activity map's history, kept by a tracker that loads its probe
    # itself (a hook that is no BPF link: the classic tracepoint records into
    # the map here, and detaches with the tracker); the detached LRU probe's
    # restart is test_detached_probe's, the storage's test_inline_storage's.
    common = ["-d", PORT, "--interval", 0.3, "--pin-dir", pin_dir, "--bpf-hook", "tracepoint"]

    a = trackers(netns, "-t", 600000, *common)
    a.wait_ready()

    def seen():
        try:
            reader = PinnedMap.open(pin_dir)
        except ProbeUnavailable:
            return None
        try:
            acts = reader.activity()
        finally:
            reader.close()
        got = acts.get(hist["cookie"]), acts.get(steady["cookie"])
        return got if all(x and x.last_data_ns for x in got) else None

    assert wait_for(seen, timeout=10), a.stderr()
    farm.set_label([hist["id"]], "idle")
    time.sleep(0.3)  # the last answers are in
    hist_a, steady_a = seen()

    rc, took = a.stop()
    assert rc == 0, a.stderr()
    assert took < 1.0, took
    assert "BPF maps kept in %s" % pin_dir in a.stderr()
    assert sorted(os.listdir(pin_dir)) == ["activity", "counters"]
    # the probe is detached, the history stays: same record, same last data time
    hist_after, _ = seen()
    assert hist_after == hist_a

    time.sleep(1.0)  # hist is idle longer than B's threshold before B starts
    events = str(tmp_path / "events.jsonl")
    b_started_ns = time.monotonic_ns()
    b = trackers(netns, "-t", 700, "--event-log", events, *common)
    b.wait_ready()
    assert "maps pinned in %s (reused activity and counters" % pin_dir in b.stderr()
    assert wait_for(lambda: read_lines(events), timeout=10), b.stderr()
    ev = read_lines(events)
    assert [e["cookie"] for e in ev] == [hist["cookie"]]
    # decided with the record made before the restart: hist received no segment
    # since, so a probe record can only be that one, and last_rx_ms (the
    # probe's alone) dates from before B started
    assert ev[0]["last_rx_ms"] is not None, ev
    assert ev[0]["last_rx_ms"] >= (b_started_ns - hist_a.last_segment_ns) / 1e6, ev
    assert ev[0]["idle_ms"] >= 700
    assert_probe_source(ev[0])
    st = farm.status()
    assert st[hist["id"]]["error"] == ECONNABORTED
    assert st[steady["id"]]["alive"]
    # the same map goes on counting steady's segments where A left off
    assert wait_for(lambda: (seen_steady(pin_dir, steady["cookie"]) or 0) > steady_a.segments)

    # no cleanup under a running tracker
    res = run_tcpidle(netns, "track", "--cleanup", "--pin-dir", pin_dir)
    assert res.returncode == 1, res
    assert "in use by another tcpidle tracker (pid %d)" % b.proc.pid in res.stderr
    assert sorted(os.listdir(pin_dir)) == ["activity", "counters"]

    assert b.stop()[0] == 0
    res = run_tcpidle(netns, "track", "--cleanup", "--pin-dir", pin_dir)
    assert res.returncode == 0, res
    for name in ("activity", "counters"):  # what was pinned (no storage: classic tracepoint)
        assert "removed %s" % os.path.join(pin_dir, name) in res.stderr
    assert not os.path.exists(pin_dir)
    res = run_tcpidle(netns, "track", "--cleanup", "--pin-dir", pin_dir)
    assert res.returncode == 0 and "nothing pinned in %s" % pin_dir in res.stderr, res


def seen_steady(pin_dir, cookie):
    reader = PinnedMap.open(pin_dir)
    try:
        act = reader.activity().get(cookie)
    finally:
        reader.close()
    return act.segments if act else None


def test_second_tracker_on_the_same_pins_is_refused(netns, trackers, pin_dir):
    a = trackers(netns, "--all", "--dry-run", "--interval", 5, "--pin-dir", pin_dir)
    a.wait_ready()
    b = trackers(netns, "--all", "--dry-run", "--interval", 5, "--pin-dir", pin_dir)
    assert b.proc.wait(60) == 1
    assert "in use by another tcpidle tracker (pid %d)" % a.proc.pid in b.stderr()
    assert a.running()
    assert a.stop()[0] == 0


def metrics_port(netns) -> int:
    """A loopback port free inside `netns`, for a tracker's --metrics-port."""
    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return in_netns(netns.name, free_port)


def scrape_metrics(netns, port: int) -> str:
    """The tracker's /metrics page, fetched from inside `netns`."""
    url = "http://127.0.0.1:%d/metrics" % port
    return in_netns(netns.name, lambda: urllib.request.urlopen(url, timeout=5).read().decode())


def value(text, series):
    """The value of an unlabelled series in a /metrics page, or None."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def test_metrics_endpoint(netns, make_farm, trackers, pin_dir):
    from tcpidle.metrics import SERIES

    port = metrics_port(netns)

    def scrape():
        return scrape_metrics(netns, port)

    farm = make_farm(netns)
    farm.serve([PORT])
    victim = farm.connect("127.0.0.1", PORT, label="active")[0]
    t = trackers(netns, "-d", PORT, "-t", 400, "--interval", 0.3, "--pin-dir", pin_dir,
                 "--map-size", 4096, "--metrics-port", port)
    t.wait_ready()
    assert "metrics on http://127.0.0.1:%d/metrics" % port in t.stderr()

    def polled():
        text = scrape()
        # both ends of the victim are in the map, at least; with the
        # per-socket storage: the selected end, as the dump saw it
        if value(text, "tcpidle_sockets_seen") == 1.0 and \
                (value(text, "tcpidle_probe_map_entries") or 0) >= 1:
            return text
        return None

    text = wait_for(polled, timeout=10)
    assert text, scrape()
    for name in SERIES:
        assert "# TYPE %s " % name in text or "# TYPE %s " % name[:-len("_total")] in text, name
    destroyed = 'tcpidle_kills_total{outcome="destroyed"}'
    assert value(text, destroyed) == 0.0
    assert value(text, "tcpidle_probe_attached") == 1.0
    # the hook auto chose here (BTF, no fentry on this kernel): best first
    assert value(text, 'tcpidle_probe_info{hook="tp_btf",storage="sk_storage"}') == 1.0
    assert value(text, "tcpidle_probe_map_entries") == 1.0
    assert value(text, "tcpidle_probe_map_capacity") == 0.0  # storage: no capacity
    assert value(text, "tcpidle_poll_duration_seconds_count") >= 1
    assert value(text, "tcpidle_idle_seconds_count") >= 1

    farm.set_label([victim["id"]], "idle")
    assert farm.wait_until(lambda s: not s[victim["id"]]["alive"], timeout=10)[victim["id"]][
        "error"] == ECONNABORTED
    assert wait_for(lambda: value(scrape(), destroyed) == 1.0, timeout=5), scrape()
    text = scrape()
    assert value(text, "tcpidle_poll_errors_total") == 0.0
    assert value(text, "tcpidle_last_poll_timestamp_seconds") > time.time() - 60
    assert t.stop()[0] == 0


def test_mounts_bpffs_itself_under_ip_netns_exec(netns, make_farm, trackers):
    """/sys/fs/bpf inside `ip netns exec` is a fresh sysfs directory: the
    tracker mounts a BPF filesystem there itself, warns that its pins die
    with it, and tracks; the host's /sys/fs/bpf is left as it was."""
    host_was_bpffs = is_bpffs("/sys/fs/bpf")
    pin_dir = "/sys/fs/bpf/titrack-%d-%d" % (os.getpid(), next(_seq))
    farm = make_farm(netns)
    farm.serve([PORT])
    victim = farm.connect("127.0.0.1", PORT, label="idle")[0]
    t = trackers(netns, "-v", "-d", PORT, "-t", 100, "--interval", 0.3, "--pin-dir", pin_dir)
    t.wait_ready()
    err = t.stderr()
    assert "mounted a BPF filesystem at /sys/fs/bpf" in err
    assert "pins there vanish when tcpidle exits" in err
    assert "maps pinned in %s (new maps)" % pin_dir in err
    assert farm.wait_until(lambda s: not s[victim["id"]]["alive"], timeout=10)[victim["id"]][
        "error"] == ECONNABORTED
    assert t.stop()[0] == 0
    assert is_bpffs("/sys/fs/bpf") == host_was_bpffs
    assert not os.path.exists(pin_dir)


def test_track_needs_a_selector_or_all(netns, run_tcpidle):
    res = run_tcpidle(netns, "track", "-t", 0, "--disable-syslog")
    assert res.returncode == 2
    assert "track needs a port, address or owner selector" in res.stderr
    res = run_tcpidle(netns, "track", "--all", "--interval", 0, "--disable-syslog")
    assert res.returncode == 2 and "--interval '0': must be positive" in res.stderr


# -- the probe's pinned maps, in this process --------------------------------------------


def test_pinned_maps_are_reused_across_attaches(pin_dir, caplog):
    lib = libbpf()
    update = lib.bpf_map_update_elem
    update.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
    update.restype = ctypes.c_int
    key = ctypes.c_uint64((1 << 62) + 7)
    val = ctypes.create_string_buffer(VALUE.pack(11, 12, 13, 14, 15))

    # big enough that the host's own traffic (the probe sees every socket)
    # does not push the hand-made entry out of the LRU
    p = Probe.attach(map_size=8192, hook="tracepoint", pin_dir=pin_dir)
    try:
        assert p.pins_reused == ()
        assert pin_dir_holder(pin_dir) == os.getpid()
        with pytest.raises(PinError, match="in use by another tcpidle tracker"):
            Probe.attach(map_size=8192, hook="tracepoint", pin_dir=pin_dir)
        assert update(p.reader.activity_fd, ctypes.byref(key), val, 0) == 0
    finally:
        p.close(keep_pins=True)
    assert sorted(os.listdir(pin_dir)) == ["activity", "counters"]
    assert pin_dir_holder(pin_dir) is None

    # another size asked for: the pinned map is reused at its own size, with a warning
    p = Probe.attach(map_size=16384, hook="tracepoint", pin_dir=pin_dir)
    try:
        assert p.pins_reused == ("activity", "counters")
        assert p.max_entries == 8192
        assert any("has 8192 entries, not 16384" in r.getMessage() for r in caplog.records)
        a = p.activity()[key.value]
        assert (a.last_segment_ns, a.last_data_ns, a.segments, a.data_segments, a.bytes) == \
            (11, 12, 13, 14, 15)
    finally:
        p.close()  # not kept
    assert os.listdir(pin_dir) == []
    assert remove_pins(pin_dir) == [pin_dir]
    assert not os.path.exists(pin_dir)


def test_failed_attach_leaves_no_new_pins(pin_dir, monkeypatch):
    """The program compiles (bcc creates and pins the maps), then the kernel
    refuses to attach it (as a kernel refusing tp_btf would): no pin stays."""
    from tcpidle.probe import tpbtf

    def refused(prog_fd):
        raise tpbtf.TpBtfError("BPF_RAW_TRACEPOINT_OPEN: Operation not permitted")

    monkeypatch.setattr(tpbtf, "attach", refused)
    with pytest.raises(ProbeUnavailable, match="tp_btf: BPF_RAW_TRACEPOINT_OPEN"):
        Probe.attach(map_size=64, hook="tp_btf", pin_dir=pin_dir)
    assert os.listdir(pin_dir) == []
    assert pin_dir_holder(pin_dir) is None


def test_foreign_pinned_map_is_refused(pin_dir, bpffs):
    Probe.attach(map_size=64, hook="tracepoint", pin_dir=pin_dir).close(keep_pins=True)
    # a per-CPU array where the activity map should be
    os.rename(os.path.join(pin_dir, "counters"), os.path.join(pin_dir, "activity"))
    with pytest.raises(PinError, match="is not a tcpidle activity map .*--cleanup"):
        Probe.attach(map_size=64, hook="tracepoint", pin_dir=pin_dir)
    assert os.listdir(pin_dir) == ["activity"]  # left alone
    assert pin_dir_holder(pin_dir) is None


# -- deployment ---------------------------------------------------------------------------


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    tcpidle = os.path.join(os.path.dirname(sys.executable), "tcpidle")
    if not os.access(tcpidle, os.X_OK):
        pytest.skip("no tcpidle console script next to %s" % sys.executable)
    with open(os.path.join(REPO_ROOT, "deploy/systemd/tcpidle.service")) as f:
        unit = f.read()
    assert "ExecStart=/opt/tcpidle/.venv/bin/tcpidle track " in unit
    # verify checks that ExecStart's binary exists: point it at this venv's
    copy = tmp_path / "tcpidle.service"
    copy.write_text(unit.replace("/opt/tcpidle/.venv/bin/tcpidle", tcpidle))
    res = subprocess.run([analyze, "verify", str(copy)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=60)
    assert res.returncode == 0, res.stdout
    assert "tcpidle.service" not in res.stdout, res.stdout  # no complaint about the unit


def test_metrics_count_verdicts_and_middlebox_exposure_by_owner(netns, make_farm, trackers, pin_dir):
    """track --middlebox: the owners of the exposed connections are walked each poll and
    counted by process name; every connection is counted under its verdict."""
    port = metrics_port(netns)

    def scrape():
        return scrape_metrics(netns, port)

    farm = make_farm(netns)
    farm.serve([PORT])
    farm.connect("127.0.0.1", PORT, label="idle")
    with open("/proc/%d/comm" % farm.pid_or_none()) as f:
        comm = f.read().strip()
    t = trackers(netns, "-d", PORT, "--middlebox", 2, "--active-within", 1000, "--dry-run",
                 "--interval", 0.3, "--pin-dir", pin_dir, "--metrics-port", port)
    t.wait_ready()
    past = 'tcpidle_middlebox_past{comm="%s"}' % comm
    text = wait_for(lambda: (lambda x: x if value(x, past) == 1.0 else None)(scrape()), timeout=15)
    assert text, scrape()
    assert value(text, 'tcpidle_middlebox_at_risk{comm="%s"}' % comm) == 0.0
    assert 'comm="-"' not in text  # the owner was found
    assert value(text, 'tcpidle_connections{verdict="unknown"}') == 1.0
    assert value(text, 'tcpidle_connections{verdict="active"}') == 0.0
    assert value(text, 'tcpidle_kills_total{outcome="would-destroy"}') >= 1.0  # past it: a victim
    assert t.stop()[0] == 0
