"""Kernel tests for tcpidle.owners and tcpidle.fallback: real TCP sockets owned by real processes.

Each test gets a fresh network namespace (prefix tiproc-) with only loopback
up, and a child python process inside it (`ip netns exec` execs, so the
Popen pid is the owner) that holds a connected TCP pair: its client end
blocks in recv() in a thread, printing RECV/EOF lines, while the main thread
obeys stdin commands ("send WORD" from the server end, "ping").
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tcpidle.model import Action, Socket, TcpState
from tcpidle.fallback import SocketGone, apply_fallback, kill_owner, shutdown_socket
from tcpidle.owners import Owner, owners_by_inode

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, pidfd_getfd)"),
]

CHILD = r"""
import json, os, signal, socket, struct, sys, threading

srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
cli = socket.create_connection(srv.getsockname())
acc, _ = srv.accept()

def cookie(s):
    return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, 57, 8))[0]

forked = None
if "fork" in sys.argv[1:]:
    forked = os.fork()
    if forked == 0:
        # A second holder of the same sockets: waits to be killed.  It lets
        # go of the stdio pipes so the test sees EOF when the parent ends.
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
        while True:
            signal.pause()

print(json.dumps({
    "pid": os.getpid(), "fd": cli.fileno(), "inode": os.fstat(cli.fileno()).st_ino,
    "cookie": cookie(cli), "netns": os.stat("/proc/self/ns/net").st_ino,
    "forked": forked, "sport": cli.getsockname()[1], "dport": cli.getpeername()[1],
}), flush=True)

def reader():
    while True:
        d = cli.recv(4096)
        if not d:
            print("EOF", flush=True)
            return
        print("RECV " + d.decode(), flush=True)

threading.Thread(target=reader, daemon=True).start()
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "send":
        acc.sendall(cmd[1].encode())
    elif cmd[0] == "ping":
        print("pong", flush=True)
if forked:
    os.kill(forked, signal.SIGTERM)
"""


@pytest.fixture
def netns():
    name = "tiproc-%s" % uuid.uuid4().hex[:10]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class Child:
    """The socket-holding child and a line reader on its stdout."""

    def __init__(self, ns, *args):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-u", "-c", CHILD] + list(args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self.info = json.loads(self.line())
        except BaseException:
            self.close()
            raise
        self.owner_guess = Owner(self.info["pid"], self.info["fd"])

    def _pump(self):
        # Only this thread touches stdout: closing a buffered reader from
        # another thread would block on the lock this read holds.
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def line(self, timeout=10.0):
        try:
            got = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("child printed nothing in %.0fs" % timeout) from None
        assert got is not None, "child closed its stdout (rc=%r)" % self.proc.poll()
        return got

    def no_line(self, wait=0.3):
        try:
            got = self.lines.get(timeout=wait)
        except queue.Empty:
            return True
        raise AssertionError("unexpected child output %r" % got)

    def cmd(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def alive(self):
        self.cmd("ping")
        return self.proc.poll() is None and self.line() == "pong"

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        try:
            self.proc.stdin.close()
        except OSError:
            pass  # broken pipe on flush: the child is dead anyway


@pytest.fixture
def child(netns):
    c = Child(netns)
    yield c
    c.close()


@pytest.fixture
def forking_child(netns):
    c = Child(netns, "fork")
    yield c
    try:
        os.kill(c.info["forked"], signal.SIGKILL)
    except ProcessLookupError:
        pass
    c.close()


def as_socket(info):
    return Socket(
        cookie=info["cookie"],
        family=socket.AF_INET,
        state=TcpState.ESTABLISHED,
        src="127.0.0.1",
        sport=info["sport"],
        dst="127.0.0.1",
        dport=info["dport"],
        inode=info["inode"],
        uid=0,
        raw_id=b"\0" * 48,
    )


def exited_within(pidfd, timeout):
    """A pidfd polls readable once its process has exited."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(int(timeout * 1000)))


# ---------------------------------------------------------------------------


def test_owners_finds_the_child_socket(child, netns):
    info = child.info
    assert info["pid"] == child.proc.pid  # ip netns exec exec'd python
    got = owners_by_inode({info["inode"]})
    assert list(got) == [info["inode"]]
    (o,) = got[info["inode"]]
    assert (o.pid, o.fd) == (info["pid"], info["fd"])
    assert o.comm.startswith("python")
    assert o.cgroup is not None and o.cgroup.startswith("/")
    # The unfiltered walk has it too, along with the accepted and listening
    # sockets of the same child.
    everything = owners_by_inode()
    assert [(x.pid, x.fd) for x in everything[info["inode"]]] == [(o.pid, o.fd)]
    child_fds = {x.fd for owners in everything.values() for x in owners if x.pid == o.pid}
    assert len(child_fds) >= 3


def test_shutdown_gives_eof_and_the_owner_lives(child):
    info = child.info
    (o,) = owners_by_inode({info["inode"]})[info["inode"]]
    child.cmd("send before")
    assert child.line() == "RECV before"
    shutdown_socket(o, info["inode"], info["cookie"])
    assert child.line() == "EOF"
    assert child.alive()
    # The owner's fd is still open: only our duplicate was closed.
    assert owners_by_inode({info["inode"]}) == {info["inode"]: [o]}


def test_wrong_cookie_or_inode_refused_and_socket_still_works(child):
    info = child.info
    o = child.owner_guess
    with pytest.raises(SocketGone, match="cookie"):
        shutdown_socket(o, info["inode"], info["cookie"] ^ 1)
    with pytest.raises(SocketGone, match="another file"):
        shutdown_socket(o, info["inode"] + 1, info["cookie"])
    child.no_line()
    child.cmd("send hello")
    assert child.line() == "RECV hello"
    assert child.alive()


def test_shutdown_of_an_exited_process_is_gone(child):
    info = child.info
    child.proc.kill()
    child.proc.wait(timeout=10)
    with pytest.raises(SocketGone):
        shutdown_socket(child.owner_guess, info["inode"], info["cookie"])


def test_kill_owner_sigkills_the_holder(child):
    info = child.info
    (o,) = owners_by_inode({info["inode"]})[info["inode"]]
    kill_owner(o, info["inode"])
    assert child.proc.wait(timeout=10) == -signal.SIGKILL


def test_kill_owner_refuses_when_the_fd_holds_another_socket(child):
    info = child.info
    with pytest.raises(SocketGone, match="now holds socket:"):
        kill_owner(child.owner_guess, info["inode"] + 1)
    with pytest.raises(SocketGone, match="closed or the process exited"):
        kill_owner(Owner(info["pid"], 999), info["inode"])
    assert child.alive()


def test_apply_fallback_shutdown_once_for_forked_holders(forking_child):
    c = forking_child
    info, forked = c.info, c.info["forked"]
    pidfd = os.pidfd_open(forked)
    try:
        ((_, act, err, (pids, comms, _)),) = apply_fallback([as_socket(info)], "shutdown")
        assert (act, err) == (Action.SHUTDOWN, None)
        assert pids == tuple(sorted((info["pid"], forked)))
        # The one summary of owners: two holders of one name are that name once.
        assert len(comms) == 1 and comms[0].startswith("python")
        assert c.line() == "EOF"
        assert c.alive()
        assert not exited_within(pidfd, 0.2)
    finally:
        os.close(pidfd)


def test_apply_fallback_kill_kills_every_holder(forking_child):
    c = forking_child
    info, forked = c.info, c.info["forked"]
    pidfd = os.pidfd_open(forked)
    try:
        ((_, act, err, (pids, _, _)),) = apply_fallback([as_socket(info)], "kill")
        assert (act, err) == (Action.PROCESS_KILLED, None)
        assert pids == tuple(sorted((info["pid"], forked)))
        assert c.proc.wait(timeout=10) == -signal.SIGKILL
        assert exited_within(pidfd, 10)
    finally:
        os.close(pidfd)


def test_apply_fallback_mixed_batch(child):
    info = child.info
    live = as_socket(info)
    orphan = as_socket(dict(info, inode=0))
    res = apply_fallback([live, orphan], "shutdown")
    assert [r[1] for r in res] == [Action.SHUTDOWN, Action.FAILED]
    assert res[1][2] == "no process holds this socket"
    assert child.line() == "EOF"


CHURN = r"""
import os, socket, sys, time
deadline = time.monotonic() + float(sys.argv[1])
n = 0
while time.monotonic() < deadline:
    pid = os.fork()
    if pid == 0:
        socks = [socket.socket() for _ in range(30)]
        os._exit(0)
    os.waitpid(pid, 0)
    n += 1
print(n, flush=True)
"""


def test_walk_survives_processes_exiting_mid_walk(child):
    """Short-lived processes holding sockets come and go while we walk."""
    info = child.info
    # Count-bounded, not time-bounded: one walk costs ~10 us per fd on the
    # whole host, so a busy machine makes each pass slower, not wrong.
    churners = [
        subprocess.Popen([sys.executable, "-c", CHURN, "60"], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        walks = 0
        seen_churn_pids = set()
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and (walks < 10 or not seen_churn_pids):
            got = owners_by_inode()
            walks += 1
            # The stable socket is found on every pass.
            assert [(o.pid, o.fd) for o in got[info["inode"]]] == [(info["pid"], info["fd"])]
            churn_parents = {p.pid for p in churners}
            seen_churn_pids.update(
                o.pid for owners in got.values() for o in owners
                if o.pid not in churn_parents and o.comm.startswith("python")
                and o.pid != info["pid"]
            )
    finally:
        for p in churners:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
    assert walks >= 10
    # The walks really met short-lived socket holders.
    assert seen_churn_pids
