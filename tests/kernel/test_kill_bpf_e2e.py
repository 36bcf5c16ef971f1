"""`tcpidle kill --destroy-with bpf` end to end: the command, in a namespace, on the real kernel.

The connections are made by this process inside the test's namespace
(in_netns) or by a child process there (owner selectors); ground truth is
each socket's own TCP_INFO state afterwards.  Active connections receive a
byte every 100 ms for the whole run (the program's compile takes seconds
under load), so they are never idle for the threshold.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from lab.netns import cookie_of
from test_iterdestroy_kernel import TCP_CLOSE, Pairs, closed, set_record, tcp_state

pytestmark = pytest.mark.kernel
# fixtures by name: test_track's (trackers, bpffs, pin_dir), the iterator's (storage_probe)
pytest_plugins = ["test_track", "test_iterdestroy_kernel"]

THRESHOLD_MS = 1500


@pytest.fixture(autouse=True)
def _needs_kfunc():
    from tcpidle import kdestroy
    reason = kdestroy.unavailable()
    if reason:
        pytest.skip(reason)


class Talker:
    """Send a byte to each client every 100 ms (from its server end) until stopped."""

    def __init__(self, pairs):
        self.pairs = pairs
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        while not self.done.wait(0.1):
            for c, a in self.pairs:
                try:
                    a.send(b"t")
                    c.recv(16)
                except OSError:
                    pass

    def stop(self):
        self.done.set()
        self.thread.join()


def kill_while_talking(run_tcpidle, netns, talking, port, *extra):
    """`kill -d PORT -t THRESHOLD_MS --destroy-with bpf --json -v` run once every
    connection is past the threshold, while `talking` (pairs) keep receiving."""
    talker = Talker(talking)
    try:
        time.sleep(THRESHOLD_MS / 1000 + 0.2)
        return run_tcpidle(netns, "kill", "-d", port, "-t", THRESHOLD_MS, "--destroy-with", "bpf",
                           *extra, "--json", "-v", "--disable-syslog", timeout=120)
    finally:
        talker.stop()


def test_kill_destroys_exactly_the_idle_ones_and_reports_them(netns, run_tcpidle, json_lines):
    target = Pairs(netns, 7201, 6)
    decoy = Pairs(netns, 7202, 2)
    r = kill_while_talking(run_tcpidle, netns, target.pairs[:2], "7201")
    try:
        assert r.returncode == 0, r.stderr
        rows = json_lines(r.stdout)
        idle = target.clients[2:]
        assert sorted(o["cookie"] for o in rows) == sorted(cookie_of(c) for c in idle)
        assert {o["action"] for o in rows} == {"destroyed"}
        assert all(o["idle_ms"] >= THRESHOLD_MS and o["idle_source"] == "tcp_info" for o in rows)
        assert all(o["dport"] == 7201 and o["netns"] is None for o in rows)
        assert closed(idle) == [True] * 4
        assert not any(closed([c for c, _ in target.pairs[:2]]))
        assert not any(closed(decoy.clients + decoy.servers))
        assert "in the kernel (BPF TCP iterator" in r.stderr
        assert "kill: 4 destroyed; 4 idle of 6 matched" in r.stderr
    finally:
        target.close()
        decoy.close()


def test_dry_run_touches_nothing(netns, run_tcpidle, json_lines):
    p = Pairs(netns, 7211, 3)
    try:
        r = run_tcpidle(netns, "kill", "-d", "7211", "--destroy-with", "bpf", "--dry-run", "--json",
                        "--disable-syslog", timeout=120)
        assert r.returncode == 0, r.stderr
        assert sorted(o["action"] for o in json_lines(r.stdout)) == ["would-destroy"] * 3
        assert not any(closed(p.clients + p.servers))
    finally:
        p.close()


HOLDER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7222)); s.listen(8)
keep = []
for _ in range(3):
    c = socket.create_connection(("127.0.0.1", 7222)); a, _ = s.accept(); keep += [c, a]
print("ready", flush=True)
sys.stdin.read()
print(" ".join(str(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]) for c in keep),
      flush=True)
"""


def test_owner_selector_destroys_only_that_process_sockets(netns, run_tcpidle, json_lines):
    mine = Pairs(netns, 7221, 2)
    child = subprocess.Popen(netns.exec_argv([sys.executable, "-c", HOLDER]), text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == "ready"
        r = run_tcpidle(netns, "kill", "--pid", child.pid, "--destroy-with", "bpf", "--json",
                        "--disable-syslog", timeout=120)
        assert r.returncode == 0, r.stderr
        rows = json_lines(r.stdout)
        # both ends are the child's: destroying one resets the other, which may be
        # closed by that reset before the iterator gets to it
        assert 3 <= len(rows) <= 6 and {o["action"] for o in rows} == {"destroyed"}
        assert all(o["pids"] == [child.pid] for o in rows)
        out, _ = child.communicate("", timeout=30)
        assert out.split() == [str(TCP_CLOSE)] * 6
        assert not any(closed(mine.clients + mine.servers))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        mine.close()


def test_time_wait_goes_to_sock_destroy(netns, run_tcpidle, json_lines):
    import socket
    p = Pairs(netns, 7231, 2)
    try:
        for c, a in p.pairs:
            c.shutdown(socket.SHUT_WR)
        time.sleep(0.1)
        for c, a in p.pairs:
            a.close()
        time.sleep(0.1)
        assert [tcp_state(c) for c in p.clients] == [TCP_CLOSE] * 2  # closed ends; TW in kernel
        r = run_tcpidle(netns, "kill", "-d", "7231", "--state", "time-wait", "--destroy-with", "bpf",
                        "--json", "--disable-syslog", timeout=120)
        assert r.returncode == 0, r.stderr
        rows = json_lines(r.stdout)
        assert [(o["state"], o["action"]) for o in rows] == [("TIME_WAIT", "destroyed")] * 2
        again = run_tcpidle(netns, "audit", "-d", "7231", "--state", "time-wait", "--json")
        assert json_lines(again.stdout) == []
    finally:
        p.close()


@pytest.mark.parametrize("args", [
    ["kill", "--destroy-with", "netlink", "--use-proc"],
    ["kill", "--destroy-with", "bogus"],
    ["track", "--destroy-with", "bpf", "--use-proc"],
    ["track", "--destroy-with", "bpf", "--keepalive", "60,10,6"],
])
def test_bad_combinations_are_usage_errors(netns, run_tcpidle, args):
    p = Pairs(netns, 7241, 1)
    try:
        r = run_tcpidle(netns, args[0], "-d", "7241", *args[1:])
        assert r.returncode == 2, r.stderr
        assert "--destroy-with" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not any(closed(p.clients + p.servers))
    finally:
        p.close()


def test_verdicts_and_middleboxes_are_decided_in_user_space_destroyed_in_the_kernel(
        netns, run_tcpidle, json_lines):
    """--verdict and --middlebox are health verdicts the iterator cannot make: the
    engine decides them (and re-checks), the iterator destroys each batch's victims,
    deciding their idle time again under each socket's lock."""
    # (an idle loopback peer is "unknown": nothing from it for the window, -t, no data or
    # keep-alive out that would tell)
    for port, extra in ((7291, ["--verdict", "unknown"]), (7292, ["--middlebox", "1"])):
        p = Pairs(netns, port, 4)
        r = kill_while_talking(run_tcpidle, netns, p.pairs[:1], port, *extra)
        try:
            assert r.returncode == 0, r.stderr
            rows = json_lines(r.stdout)
            assert sorted(o["cookie"] for o in rows) == sorted(cookie_of(c) for c in p.clients[1:])
            assert {o["action"] for o in rows} == {"destroyed"}
            assert "destroy: the BPF TCP iterator + bpf_sock_destroy, given each batch" in r.stderr
            assert closed(p.clients) == [False, True, True, True]
        finally:
            p.close()


def test_interval_polls_destroy_through_the_iterator(netns, tcpidle_argv, json_lines, tmp_path):
    """kill -i with --destroy-with bpf: each poll's victims go to the iterator; what
    turns idle between polls dies at a later poll, the active one never."""
    from lab.netns import wait_for

    p = Pairs(netns, 7301, 3)
    talker = Talker(p.pairs[:1])
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(tcpidle_argv(netns, "kill", "-d", "7301", "-t", THRESHOLD_MS,
                                             "--destroy-with", "bpf", "-i", "0.3", "--json", "-v",
                                             "--disable-syslog"), stdout=o, stderr=e)
    try:
        assert wait_for(lambda: all(closed(p.clients[1:])) or proc.poll() is not None, 60), \
            err.read_text()
        assert proc.poll() is None, err.read_text()
        proc.terminate()
        assert proc.wait(30) == 0, err.read_text()
    finally:
        talker.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        rows = json_lines(out.read_text())
        assert sorted(o["cookie"] for o in rows) == sorted(cookie_of(c) for c in p.clients[1:])
        assert {o["action"] for o in rows} == {"destroyed"}
        assert not closed(p.clients[:1])[0]
        assert "destroy: the BPF TCP iterator" in err.read_text()
    finally:
        p.close()


def test_destroy_with_bpf_sends_every_batch_to_the_iterator_which_reads_the_probe_s_storage(
        netns, monkeypatch, storage_probe):
    """The engine's path with --destroy-with bpf (kill -i, track, verdicts): netlink
    SOCK_DESTROY is never asked; the iterator gets each batch's victims by cookie and,
    given the probe's storage, decides again on its records: one whose record says it
    received right after the re-check (written by the test, the map's user-space
    update, while its jiffies still say idle) is spared, the others destroyed."""
    from tcpidle import diag, netns as tnetns
    from tcpidle.engine import Engine
    from tcpidle.evidence import Evidence, InlineReader
    from tcpidle.model import Policy, PortSet, Selector
    from tcpidle.probe import iterdestroy
    from tcpidle.scope import Scope

    p = Pairs(netns, 7311, 4)
    talker = Talker(p.pairs[:1])
    asked = []
    monkeypatch.setattr(diag.DiagSocket, "destroy",
                        lambda self, socks, batch=256: asked.append(socks) or [0] * len(socks))
    woken = p.clients[1]
    passes = []
    run_pass = iterdestroy.IterDestroy.run

    def wake_then_pass(self, fd):
        # After the program is loaded (a boot's first load compiles it: tens of
        # seconds under TCG), right before the pass: "received" just now.
        set_record(storage_probe.storage_fd, woken, time.monotonic_ns())
        passes.append(fd)
        return run_pass(self, fd)

    monkeypatch.setattr(iterdestroy.IterDestroy, "run", wake_then_pass)
    seen = Evidence(InlineReader(storage_probe.storage_fd, storage_probe.storage_id))
    try:
        time.sleep(THRESHOLD_MS / 1000 + 0.2)
        scope = Scope(Selector(dports=PortSet(((7311, 7311),))), [tnetns.resolve(netns.name)])
        seen.bind_scope(scope)
        engine = Engine(scope, Policy(idle_time_ms=THRESHOLD_MS, destroy_with="bpf"), seen)
        try:
            scan = engine.scan()
            assert sorted(v.socket.cookie for v in scan.victims) == \
                sorted(cookie_of(c) for c in p.clients[1:])
            assert {v.idle_source for v in scan.victims} == {"bpf"}
            batches = list(engine.act_batches(scan))
            scan.close()
        finally:
            engine.close()
    finally:
        talker.stop()
    try:
        outcomes = [o for b in batches for o in b.outcomes]
        spared = {s.verdict.socket.cookie: s.reason for b in batches for s in b.spared}
        assert sorted(o.verdict.socket.cookie for o in outcomes) == \
            sorted(cookie_of(c) for c in p.clients[2:])
        assert {o.action for o in outcomes} == {"destroyed"}
        assert list(spared) == [cookie_of(woken)] and "decided again in the kernel" in \
            spared[cookie_of(woken)]
        assert asked == [] and len(passes) == 1
        assert closed(p.clients) == [False, False, True, True]
    finally:
        p.close()


def test_verbose_says_which_backend_and_whether_bpf_is_available(netns, run_tcpidle):
    r = run_tcpidle(netns, "kill", "-d", "7251", "--dry-run", "-v", "--disable-syslog")
    assert r.returncode == 0, r.stderr
    assert "destroy: netlink SOCK_DESTROY" in r.stderr
    assert "if the kernel answers EOPNOTSUPP, the BPF iterator (available here), then /proc" \
        in r.stderr
    assert os.path.exists("/sys/kernel/btf/vmlinux")


def test_eopnotsupp_from_netlink_switches_to_the_iterator_before_proc(netns, monkeypatch, caplog):
    """auto: a kernel without CONFIG_INET_DIAG_DESTROY answers SOCK_DESTROY with
    EOPNOTSUPP, and the victims go to the BPF iterator, not to /proc.

    This kernel has SOCK_DESTROY, so only that one answer is substituted; the
    dump, the re-check's lookups and the iterator's destroys are real.  While
    the kernel "refuses", one victim receives a byte and another one's owner
    shuts it: the iterator, deciding again under each socket's lock, spares
    both.  A second pass goes straight to the iterator."""
    import errno
    import socket

    from tcpidle import diag, netns as tnetns
    from tcpidle.engine import Engine
    from tcpidle.model import Policy, PortSet, Selector
    from tcpidle.scope import Scope

    p = Pairs(netns, 7261, 6)
    talker = Talker(p.pairs[:1])
    calls = []
    woken, shut = p.pairs[1], p.pairs[2]

    def no_destroy(self, sockets, batch=256):
        calls.append(len(sockets))
        woken[1].sendall(b"w")          # data for one victim after the re-check
        shut[0].shutdown(socket.SHUT_WR)  # another leaves ESTABLISHED (FIN_WAIT)
        time.sleep(0.05)
        return [errno.EOPNOTSUPP] * len(sockets)

    try:
        time.sleep(THRESHOLD_MS / 1000 + 0.2)
        monkeypatch.setattr(diag.DiagSocket, "destroy", no_destroy)
        engine = Engine(Scope(Selector(dports=PortSet(((7261, 7262),))),
                              [tnetns.resolve(netns.name)]),
                        Policy(idle_time_ms=THRESHOLD_MS))
        try:
            with caplog.at_level("INFO", logger="tcpidle"):
                scan = engine.scan()
                assert sorted(v.socket.cookie for v in scan.victims) == \
                    sorted(cookie_of(c) for c in p.clients[1:])
                batches = list(engine.act_batches(scan))
                scan.close()
                outcomes = [o for b in batches for o in b.outcomes]
                spared = {s.verdict.socket.cookie: s.kind for b in batches for s in b.spared}
                assert sorted(o.verdict.socket.cookie for o in outcomes) == \
                    sorted(cookie_of(c) for c in p.clients[3:])
                assert {o.action for o in outcomes} == {"destroyed"}
                assert spared == {cookie_of(woken[0]): "received-data",
                                  cookie_of(shut[0]): "left-selection"}
                assert closed(p.clients) == [False, False, False, True, True, True]
                # sticky: the next pass goes to the iterator without asking netlink again
                more = Pairs(netns, 7262, 2)
                time.sleep(THRESHOLD_MS / 1000 + 0.2)
                again = engine.act(engine.scan())
                # (the woken victim is idle again by now: its byte came before the sleep)
                assert sorted(o.verdict.socket.cookie for o in again) == \
                    sorted(cookie_of(c) for c in more.clients + [woken[0]])
                assert {o.action for o in again} == {"destroyed"} and all(closed(more.clients))
                more.close()
        finally:
            engine.close()
    finally:
        talker.stop()
        p.close()
    assert calls == [5]
    said = [r.getMessage() for r in caplog.records if "CONFIG_INET_DIAG_DESTROY" in r.getMessage()]
    assert len(said) == 1 and "destroying in the kernel from now on" in said[0], said
    assert not any("/proc" in r.getMessage() for r in caplog.records)


def test_track_destroys_through_the_iterator_with_its_own_probe_s_storage(
        netns, trackers, pin_dir, json_lines):
    """track --destroy-with bpf: the tracker's probe records the connections opened
    after it started into per-socket storage; each poll's victims (decided on those
    ns records, idle_source "bpf") are destroyed by the iterator, which reads the
    same storage."""
    from lab.netns import wait_for

    t = trackers(netns, "-d", "7321", "-t", THRESHOLD_MS, "--interval", 0.3, "--pin-dir", pin_dir,
                 "--destroy-with", "bpf", "--json", "-v")
    t.wait_ready(timeout=240)  # its probe's compile: tens of seconds under TCG, with load
    if "per-socket storage" not in t.stderr():
        pytest.skip("no tp_btf + sk_storage probe here: %s" % t.stderr())
    p = Pairs(netns, 7321, 3)
    talker = Talker(p.pairs[:1])
    try:
        # (its first batch loads the iterator: a compile, once per boot)
        assert wait_for(lambda: all(closed(p.clients[1:])) or not t.running(), 180), t.stderr()
        assert t.running(), t.stderr()
    finally:
        talker.stop()
    try:
        assert t.stop()[0] == 0, t.stderr()
        rows = json_lines(t.stdout())
        assert sorted(o["cookie"] for o in rows) == sorted(cookie_of(c) for c in p.clients[1:])
        assert {(o["action"], o["idle_source"]) for o in rows} == {("destroyed", "bpf")}
        assert not closed(p.clients[:1])[0]
        assert "destroy: the BPF TCP iterator" in t.stderr()
    finally:
        p.close()


def test_a_one_shot_kill_reads_the_tracker_s_pinned_storage(netns, trackers, pin_dir,
                                                           run_tcpidle, json_lines):
    """kill --destroy-with bpf with a tracker's storage pinned in --pin-dir: the
    in-kernel pass decides on the probe's ns records (idle_source "bpf", idle_ms not a
    whole number of jiffies), the active connection spared."""
    t = trackers(netns, "-d", "7331", "-t", 600000, "--interval", 1, "--pin-dir", pin_dir,
                 "--dry-run")
    t.wait_ready(timeout=240)  # its probe's compile: tens of seconds under TCG, with load
    if "per-socket storage" not in t.stderr():
        pytest.skip("no tp_btf + sk_storage probe here: %s" % t.stderr())
    p = Pairs(netns, 7331, 3)
    r = kill_while_talking(run_tcpidle, netns, p.pairs[:1], "7331", "--pin-dir", pin_dir)
    try:
        assert r.returncode == 0, r.stderr
        rows = json_lines(r.stdout)
        assert sorted(o["cookie"] for o in rows) == sorted(cookie_of(c) for c in p.clients[1:])
        assert {(o["action"], o["idle_source"]) for o in rows} == {("destroyed", "bpf")}, rows
        assert all(o["idle_ms"] >= THRESHOLD_MS and o["last_rx_ms"] is not None for o in rows)
        assert any(o["idle_ms"] != int(o["idle_ms"]) for o in rows), rows  # ns, not jiffies
        assert "per-socket storage pinned in %s" % pin_dir in r.stderr
        assert closed(p.clients) == [False, True, True]
    finally:
        assert t.stop()[0] == 0
        p.close()
