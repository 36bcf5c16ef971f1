"""Network namespaces for the test lab: create, run inside, join with veth, delete.

Every namespace a test uses is made here, named ``PREFIX + PID + "-" + N`` so
that parallel test runs (other prefixes, other pids) never collide, and is
deleted on teardown together with every process still living in it.  All the
traffic the kernel tests make stays inside these namespaces: `lo`, and veth
pairs created directly inside them (never in the caller's namespace), with
addresses chosen here.
"""

import itertools
import os
import socket
import struct
import threading
import re
import signal
import subprocess
import time

_counter = itertools.count(1)

# Addresses for the two ends of a veth pair (only ever set inside our namespaces).
VETH_V4 = ("10.231.0.1", "10.231.0.2", 24)
VETH_V6 = ("fd00:231::1", "fd00:231::2", 64)


def _ip(*args, check=True, timeout=30):
    return subprocess.run(["ip"] + list(args), check=check, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def unique_name(prefix):
    return "%s%d-%d" % (prefix, os.getpid(), next(_counter))


class Netns:
    """One named network namespace (``/run/netns/NAME``)."""

    def __init__(self, name):
        self.name = name
        self.deleted = False

    @classmethod
    def create(cls, name):
        _ip("netns", "add", name)
        ns = cls(name)
        try:
            ns.ip("link", "set", "dev", "lo", "up")
        except BaseException:
            ns.delete()
            raise
        return ns

    def __repr__(self):
        return "Netns(%r)" % self.name

    def exec_argv(self, argv):
        """The argv that runs `argv` inside this namespace."""
        return ["ip", "netns", "exec", self.name] + [str(a) for a in argv]

    def run(self, *argv, check=True, timeout=60, **kw):
        """Run a command inside; CompletedProcess with text stdout/stderr."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.run(self.exec_argv(argv), check=check, timeout=timeout,
                              text=True, **kw)

    def popen(self, argv, **kw):
        """Start a command inside.  `ip netns exec` execs in place, so the
        Popen's pid is the command's own pid (signals reach it directly)."""
        return subprocess.Popen(self.exec_argv(argv), **kw)

    def ip(self, *args, check=True):
        return _ip("-n", self.name, *args, check=check)

    def pids(self):
        res = _ip("netns", "pids", self.name, check=False)
        return [int(p) for p in res.stdout.split() if p.isdigit()]

    def delete(self):
        """Kill what still runs inside (our own farms and tools), then delete."""
        if self.deleted:
            return
        for _ in range(10):
            pids = [p for p in self.pids() if p != os.getpid()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        _ip("netns", "del", self.name, check=False)
        self.deleted = True


def join_veth(a, b, a_if="veth0", b_if="veth1", v4=VETH_V4, v6=VETH_V6):
    """Join namespaces a and b with a veth pair created inside them.

    a gets the first address of each pair, b the second.  IPv6 addresses are
    added with `nodad` so they are usable at once (no duplicate address
    detection delay).  Returns (a_if, b_if).
    """
    a.ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    for ns, ifname, idx in ((a, a_if, 0), (b, b_if, 1)):
        if v4:
            ns.ip("addr", "add", "%s/%d" % (v4[idx], v4[2]), "dev", ifname)
        if v6:
            ns.ip("-6", "addr", "add", "%s/%d" % (v6[idx], v6[2]), "dev", ifname, "nodad")
        ns.ip("link", "set", "dev", ifname, "up")
    return a_if, b_if


class NetnsFactory:
    """Creates uniquely named namespaces and deletes them all on cleanup()."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.created = []

    def __call__(self):
        ns = Netns.create(unique_name(self.prefix))
        self.created.append(ns)
        return ns

    def cleanup(self):
        for ns in reversed(self.created):
            ns.delete()
        self.created = []


def remove_stale(prefix):
    """Delete namespaces PREFIX<pid>-N left by test runs whose pid is dead."""
    res = _ip("netns", "list", check=False)
    pat = re.compile(r"^%s(\d+)-\d+$" % re.escape(prefix))
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = pat.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or os.path.exists("/proc/%d" % pid):
            continue
        Netns(name).delete()


def cookie_of(sock):
    """The socket cookie (SO_COOKIE): the INET_DIAG idiag_cookie and the probe's key."""
    from tcpidle.model import SO_COOKIE
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def close_all(socks) -> None:
    """Close every socket of `socks`, whatever state each is in."""
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def in_netns(name, fn, timeout=30):
    """fn() run by a thread that entered namespace `name`; its sockets live there.

    A fresh thread, so the test's own thread never leaves its namespace.
    """
    from tcpidle.netns import entered_fd

    box = {}

    def run():
        try:
            fd = os.open("/run/netns/%s" % name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                with entered_fd(fd):
                    box["value"] = fn()
            finally:
                os.close(fd)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError("in_netns(%s) did not finish in %s s" % (name, timeout))
    if "error" in box:
        raise box["error"]
    return box["value"]


def wait_for(pred, timeout=10.0, step=0.05):
    """Poll pred() until it returns something true or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)
