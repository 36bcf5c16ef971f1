"""Kernel tests of the probe's per-socket storage, read inline in INET_DIAG dumps.

tp_btf + sk_storage (Linux 5.11 on): every socket is recorded from its first
segment, and the dump tcpidle makes anyway carries each socket's record.
Ground truth: connections opened after the tracker (or the watch) started,
between its polls, each receive one payload at a recorded CLOCK_MONOTONIC
time; the idle times `audit` reports must agree with those times.

The audit's "now" is not known to the test, but it is one instant for all the
sockets of a namespace (taken just before its dump): the differences between
the connections' idle times must equal the differences between their send
times (the error measured), and each idle time must lie between what it was
when the audit started and when it ended.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from conftest import parse_json_lines, tcpidle_argv  # noqa: E402
from lab.netns import in_netns, wait_for  # noqa: E402

pytestmark = pytest.mark.kernel
# fixtures by name: test_track's (trackers, bpffs, pin_dir), the iterator's (storage_probe)
pytest_plugins = ["test_track", "test_iterdestroy_kernel"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SO_COOKIE = 57
PORT = 7301
MAX_ERROR_MS = 0.5


def cookie(s):
    return struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def inline_storage_or_skip():
    from tcpidle.probe import Probe, ProbeUnavailable

    try:
        p = Probe.attach(map_size=16, sk_storage=True)
    except ProbeUnavailable as e:
        pytest.skip(str(e))
    try:
        if p.storage != "sk_storage":
            pytest.skip("no tp_btf + sk_storage here (%s)" % p.describe())
    finally:
        p.close()


class Pairs:
    """Connections inside a namespace, opened by the test's own threads there."""

    def __init__(self, ns):
        self.ns = ns
        self.socks = []
        self.listener = in_netns(ns, self._listen)

    def _listen(self):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", PORT))
        ls.listen(64)
        self.socks.append(ls)
        return ls

    def open_and_send(self, payload=b"x"):
        """A new connection; the client sends one payload at once: (server end,
        (ns before the send, ns once the server end has it))."""
        def make():
            c = socket.create_connection(("127.0.0.1", PORT))
            s, _ = self.listener.accept()
            t = time.monotonic_ns()
            c.sendall(payload)
            return c, s, t

        c, s, t = in_netns(self.ns, make)
        self.socks += [c, s]
        assert s.recv(16) == payload
        return s, (t, time.monotonic_ns())

    def close(self):
        for s in self.socks:
            s.close()


@pytest.fixture
def pairs(netns):
    p = Pairs(netns.name)
    yield p
    p.close()


def check_against_truth(rows, sent, t_start, t_end, label):
    """rows: audit JSON by cookie; sent: [(cookie, (ns before the send, ns once
    received))]; returns the worst error (ms).

    The probe stamps the segment somewhere in that interval (on loopback,
    within the send unless softirqs are deferred; always before the receiver
    has it): the truth is the interval, and the error is how far outside it
    the probe's stamp lies -- relative to the first connection's, since the
    audit's "now" is one unknown instant for all.  Under emulation a vCPU
    stall between the clock read and the send widens the interval instead of
    counting as the probe's error."""
    for ck, _ in sent:
        assert rows[ck]["idle_source"] == "bpf", (label, rows[ck])
    ref_ck, (ref_lo, ref_hi) = sent[0]
    worst = 0.0
    for ck, (lo, hi) in sent:
        idle = rows[ck]["idle_ms"]
        # between its age when the audit started and when it ended
        assert (t_start - hi) / 1e6 - MAX_ERROR_MS <= idle <= (t_end - lo) / 1e6 + MAX_ERROR_MS
        # stamp(ck) - stamp(ref), as the audit says and as the intervals allow
        said = rows[ref_ck]["idle_ms"] - idle
        low, high = (lo - ref_hi) / 1e6, (hi - ref_lo) / 1e6
        err = low - said if said < low else said - high if said > high else 0.0
        worst = max(worst, err)
    print("%s: %d connections, worst error %.4f ms" % (label, len(sent), worst))
    assert worst <= MAX_ERROR_MS, worst
    return worst


def test_tracker_sees_connections_opened_between_its_polls(netns, pairs, trackers, pin_dir,
                                                         run_tcpidle, record_property):
    inline_storage_or_skip()
    t = trackers(netns, "-s", PORT, "-t", 600000, "--interval", 1, "--dry-run",
                 "--pin-dir", pin_dir, "-v")
    t.wait_ready()
    assert "per-socket storage, read inline" in t.stderr()
    sent = []
    for i in range(5):
        time.sleep(0.13 + 0.07 * i)  # at offsets unrelated to the 1 s polls
        s, ts = pairs.open_and_send()
        sent.append((cookie(s), ts))  # the cookie asked for only after the payload
    t_start = time.monotonic_ns()
    audit = run_tcpidle(netns, "audit", "-s", PORT, "--pin-dir", pin_dir, "--json", "-v")
    t_end = time.monotonic_ns()
    assert audit.returncode == 0, audit.stderr
    assert "per-socket storage pinned in %s" % pin_dir in audit.stderr
    rows = {r["cookie"]: r for r in parse_json_lines(audit.stdout)}
    worst = check_against_truth(rows, sent, t_start, t_end, "audit")
    record_property("inline_worst_error_ms", "%.4f" % worst)

    # A restarted tracker carries on with the same storage: the history stays.
    t.stop()
    t2 = trackers(netns, "-s", PORT, "-t", 600000, "--interval", 1, "--dry-run",
                  "--pin-dir", pin_dir, "-v")
    t2.wait_ready()
    assert "reused" in t2.stderr() and "storage" in t2.stderr()
    t_start = time.monotonic_ns()
    again = run_tcpidle(netns, "audit", "-s", PORT, "--pin-dir", pin_dir, "--json")
    t_end = time.monotonic_ns()
    assert again.returncode == 0, again.stderr
    rows = {r["cookie"]: r for r in parse_json_lines(again.stdout)}
    check_against_truth(rows, sent, t_start, t_end, "audit after a tracker restart")
    t2.stop()


def test_audit_watch_sees_connections_opened_during_the_watch(netns, pairs, record_property):
    inline_storage_or_skip()
    import threading

    argv = tcpidle_argv(netns, "audit", "--watch", 4, "-s", PORT, "--json", "-v")
    t_start = time.monotonic_ns()
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err_chunks = []
    reader = threading.Thread(target=lambda: err_chunks.extend(iter(
        lambda: proc.stderr.read1(4096), b"")), daemon=True)
    reader.start()
    try:
        # the probe is attached once -v says which it is (compiling takes a
        # second or more on a loaded machine)
        assert wait_for(lambda: b"BPF probe on " in b"".join(err_chunks), timeout=60), \
            b"".join(err_chunks)
        sent = []
        for i in range(5):
            s, ts = pairs.open_and_send()
            sent.append((cookie(s), ts))
            time.sleep(0.05 * (i + 1))
        out = proc.stdout.read().decode()
        proc.wait(timeout=60)
        reader.join(timeout=10)
        err = b"".join(err_chunks).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t_end = time.monotonic_ns()
    assert proc.returncode == 0, err
    if "per-socket storage" not in err:
        pytest.fail("the watch did not use the inline storage: %s" % err)
    rows = {r["cookie"]: r for r in parse_json_lines(out)}
    assert all(ck in rows for ck, _ in sent), (err, sent)
    assert sent[0][1][0] > t_start
    worst = check_against_truth(rows, sent, sent[-1][1][1], t_end, "audit --watch")
    record_property("inline_watch_worst_error_ms", "%.4f" % worst)


# The unprivileged side of the inline dump, run by a child that opens the
# pinned storage as root and then gives up root (and with it every
# capability) before it dumps: the kernel refuses the whole dump with EPERM,
# and the dump goes on plain, said once.
_UNPRIVILEGED = r"""
import json, logging, os, socket, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from tcpidle import diag
from tcpidle.probe.maps import obj_get
fd = obj_get(sys.argv[1])
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
st = diag.Storages([fd])
with diag.DiagSocket() as nl:
    first = nl.dump_sockets([socket.AF_INET], 0xFFF, storage=st)
    second = nl.dump_sockets([socket.AF_INET], 0xFFF, storage=st)
print(json.dumps({"n": [len(first), len(second)], "refused": st.refused,
                  "stores": len(st.stores)}))
"""


def test_unprivileged_dump_falls_back_to_a_plain_dump_and_says_why(netns, pairs, bpffs):
    from tcpidle.probe import Probe

    inline_storage_or_skip()
    pdir = os.path.join(bpffs, "tiinline-%d" % os.getpid())
    p = Probe.attach(map_size=16, pin_dir=pdir, sk_storage=True)
    try:
        s, _ = pairs.open_and_send()
        run = ["ip", "netns", "exec", netns.name, sys.executable, "-c", _UNPRIVILEGED,
               os.path.join(pdir, "storage")]
        res = subprocess.run(run, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
        assert res.returncode == 0, res.stderr
        got = __import__("json").loads(res.stdout)
        # both dumps answered (plain): listener, client and server ends
        assert got["n"][0] == got["n"][1] >= 3, got
        assert got["stores"] == 0
        assert "CAP_BPF or CAP_SYS_ADMIN" in got["refused"]
        # said once, though two dumps were made
        assert res.stderr.count("refused the BPF storage") == 1, res.stderr
    finally:
        p.close()


@pytest.fixture
def open_bpffs():
    """A BPF filesystem under a directory everyone may traverse (pytest's are root's)."""
    import tempfile

    from tcpidle.probe import mount_bpffs

    d = tempfile.mkdtemp(prefix="tiinline-")
    os.chmod(d, 0o755)
    assert mount_bpffs(d) is True
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=False)
        os.rmdir(d)


def test_unprivileged_audit_uses_tcp_info_and_says_why(netns, pairs, trackers, open_bpffs,
                                                      run_tcpidle):
    inline_storage_or_skip()
    pin_dir = os.path.join(open_bpffs, "pins")
    t = trackers(netns, "-s", PORT, "-t", 600000, "--interval", 1, "--dry-run",
                 "--pin-dir", pin_dir)
    t.wait_ready()
    s, _ = pairs.open_and_send()
    res = run_tcpidle(netns, "audit", "-s", PORT, "--pin-dir", pin_dir, "--json", "-v",
                      prefix=["setpriv", "--reuid", "65534", "--regid", "65534",
                              "--clear-groups"])
    assert res.returncode == 0, res.stderr
    rows = {r["cookie"]: r for r in parse_json_lines(res.stdout)}
    assert rows[cookie(s)]["idle_source"] == "tcp_info"
    # why: the tracker's pins are root's (bpffs and pin directory mode 700)
    assert "Permission denied" in res.stderr and "idle from tcp_info" in res.stderr, res.stderr
    t.stop()


def test_storage_is_created_only_for_the_selection(netns, pairs):
    """Started with a selection (family, ports), the probe gives storage to
    the selected sockets alone: the server ends on the selected local port
    have a record, their clients (another local port) and the connections of
    another port none -- memory bounded by the selection."""
    from tcpidle import diag
    from tcpidle.model import AF_INET, AF_INET6, PortSet, Selector
    from tcpidle.probe import Probe

    inline_storage_or_skip()
    other = Pairs.__new__(Pairs)  # a second listener, on PORT + 1
    other.ns, other.socks = netns.name, []

    def listen_other():
        ls = socket.socket()
        ls.bind(("127.0.0.1", PORT + 1))
        ls.listen(8)
        other.socks.append(ls)
        return ls

    other.listener = in_netns(netns.name, listen_other)
    sel = Selector(families=frozenset({AF_INET}), sports=PortSet(((PORT, PORT),)))
    v6 = Selector(families=frozenset({AF_INET6}), sports=PortSet(((PORT, PORT),)))
    try:
        for selector, want_selected in ((sel, True), (v6, False)):
            p = Probe.attach(map_size=16, sk_storage=True, selector=selector)
            try:
                picked, _ = pairs.open_and_send()
                left_out, _ = _send_on(other, PORT + 1)
                fd = os.open("/run/netns/%s" % netns.name, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    st = diag.Storages([p.storage_fd])
                    with diag.DiagSocket(fd, netns.name) as nl:
                        socks = nl.dump_sockets([socket.AF_INET], 1 << 1, storage=st)
                finally:
                    os.close(fd)
                stored = {s.cookie for s in socks if p.storage_id in st.stores.get(s.cookie, {})}
                want = {cookie(picked)} if want_selected else set()
                assert stored == want, (selector, stored, want, len(socks))
            finally:
                p.close()
    finally:
        other.close()


def _send_on(pairs_like, port):
    """A connection to `port` in pairs_like's namespace, one payload sent: (server end, ns)."""
    def make():
        c = socket.create_connection(("127.0.0.1", port))
        s, _ = pairs_like.listener.accept()
        t = time.monotonic_ns()
        c.sendall(b"y")
        return c, s, t

    c, s, t = in_netns(pairs_like.ns, make)
    pairs_like.socks += [c, s]
    assert s.recv(16) == b"y"
    return s, t


def held_map_types():
    """Map types of the BPF maps this process holds open (/proc/self/fdinfo)."""
    types = []
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            with open("/proc/self/fdinfo/" + fd) as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("map_type:"):
                types.append(int(line.split()[1]))
    return types


def test_the_storage_build_creates_no_activity_map(bpffs):
    """With per-socket storage the probe has no LRU activity map: none held,
    none pinned (it would be preallocated kernel memory for nothing)."""
    from tcpidle.probe import Probe
    from tcpidle.probe.maps import BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_SK_STORAGE

    inline_storage_or_skip()
    pdir = os.path.join(bpffs, "tinolru-%d" % os.getpid())
    before = held_map_types()
    p = Probe.attach(map_size=4096, pin_dir=pdir, sk_storage=True)
    try:
        assert p.storage == "sk_storage", p.describe()
        held = held_map_types()
        assert held.count(BPF_MAP_TYPE_SK_STORAGE) > before.count(BPF_MAP_TYPE_SK_STORAGE)
        assert held.count(BPF_MAP_TYPE_LRU_HASH) == before.count(BPF_MAP_TYPE_LRU_HASH), held
        assert sorted(os.listdir(pdir)) == ["counters", "storage"]
        assert p.pin_problems() == []
    finally:
        p.close()


def test_a_refused_storage_program_falls_back_to_tp_btf_with_the_lru_map(bpffs, monkeypatch):
    """Where the kernel refuses the storage build (not this one: the refusal
    is injected, the rest is real), tp_btf records into the LRU map, and the
    storage pin that build made is gone (no program would write it)."""
    from tcpidle.probe import ProbeUnavailable, loader
    from tcpidle.probe.maps import STORAGE_PIN

    inline_storage_or_skip()
    real = loader._build
    pdir = os.path.join(bpffs, "tifallback-%d" % os.getpid())

    def refusing(candidates, notes, destroys, storage, **kw):
        if storage:
            loaded = real(candidates, notes, destroys, storage, **kw)  # compiled, pinned...
            loader._dispose(loaded.module)  # ...then refused
            raise ProbeUnavailable("refused (injected)")
        return real(candidates, notes, destroys, storage, **kw)

    monkeypatch.setattr(loader, "_build", refusing)
    p = loader.Probe.attach(map_size=64, pin_dir=pdir, sk_storage=True)
    try:
        assert (p.hook, p.storage) == ("tp_btf", "lru"), p.describe()
        assert "tp_btf + sk_storage refused (refused (injected)): the LRU map instead" \
            in p.describe()
        assert not os.path.exists(os.path.join(pdir, STORAGE_PIN))
        assert sorted(os.listdir(pdir)) == ["activity", "counters"]
    finally:
        p.close()


def test_each_batch_s_re_check_reads_its_victims_storage_again(netns, storage_probe, monkeypatch):
    """A kill with the tracker's storage and netlink SOCK_DESTROY, in batches:
    each batch's re-check dumps again for its victims' records (exact lookups
    carry none), narrowed to the batch's ports.  Victims whose record says
    they received after the scan (written by the test, the map's user-space
    update, while their jiffies still say idle) are spared, in whichever
    batch they fall; every other victim is destroyed."""
    from test_iterdestroy_kernel import Pairs as TalkedPairs, closed, set_record

    from lab.netns import cookie_of
    from tcpidle import engine as engine_mod, netns as tnetns
    from tcpidle.engine import RECEIVED, Engine
    from tcpidle.evidence import Evidence, InlineReader
    from tcpidle.model import Policy, PortSet, Selector
    from tcpidle.scope import Scope

    monkeypatch.setattr(engine_mod, "DUMPED_BATCH", 3)
    threshold_ms = 300
    p = TalkedPairs(netns, PORT + 20, 10)
    try:
        time.sleep(threshold_ms / 1000 + 0.3)
        seen = Evidence(InlineReader(storage_probe.storage_fd, storage_probe.storage_id))
        scope = Scope(Selector(dports=PortSet(((PORT + 20, PORT + 20),))), [tnetns.resolve(netns.name)])
        seen.bind_scope(scope)
        engine = Engine(scope, Policy(idle_time_ms=threshold_ms), seen)
        try:
            scan = engine.scan()
            assert sorted(v.socket.cookie for v in scan.victims) == sorted(map(cookie_of, p.clients))
            assert {v.idle_source for v in scan.victims} == {"bpf"}
            woken = [p.clients[1], p.clients[6], p.clients[8]]
            for c in woken:
                set_record(storage_probe.storage_fd, c, time.monotonic_ns())
            batches = list(engine.act_batches(scan))
            scan.close()
        finally:
            engine.close()
        assert len(batches) == 4  # 10 victims, 3 a batch
        spared = {s.verdict.socket.cookie: s.reason for b in batches for s in b.spared}
        assert spared == {cookie_of(c): RECEIVED for c in woken}
        destroyed = sorted(o.verdict.socket.cookie for b in batches for o in b.outcomes
                           if o.action == "destroyed")
        assert destroyed == sorted(cookie_of(c) for c in p.clients if c not in woken)
        assert closed(p.clients) == [c not in woken for c in p.clients]
    finally:
        p.close()
