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
from test_iterdestroy_kernel import TCP_CLOSE, Pairs, closed, tcp_state

pytestmark = pytest.mark.kernel

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


def test_kill_destroys_exactly_the_idle_ones_and_reports_them(netns, run_tcpidle, json_lines):
    target = Pairs(netns, 7201, 6)
    decoy = Pairs(netns, 7202, 2)
    talker = Talker(target.pairs[:2])
    try:
        time.sleep(THRESHOLD_MS / 1000 + 0.2)
        r = run_tcpidle(netns, "kill", "-d", "7201", "-t", THRESHOLD_MS, "--destroy-with", "bpf",
                        "--json", "-v", "--disable-syslog", timeout=120)
    finally:
        talker.stop()
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
    ["--destroy-with", "bpf", "-i", "1"],
    ["--destroy-with", "netlink", "--use-proc"],
    ["--destroy-with", "bogus"],
    ["--destroy-with", "bpf", "--verdict", "dead"],
])
def test_bad_combinations_are_usage_errors(netns, run_tcpidle, args):
    p = Pairs(netns, 7241, 1)
    try:
        r = run_tcpidle(netns, "kill", "-d", "7241", *args)
        assert r.returncode == 2, r.stderr
        assert "--destroy-with" in r.stderr and "Traceback" not in r.stderr
        assert not any(closed(p.clients + p.servers))
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
