"""Hand-made TCP connections in the lab's namespaces, owned by the test process itself.

The test holds both ends as Python sockets (made by threads that entered a
namespace: lab.netns.in_netns), so it can look at them directly
(getsockopt, recv) while tcpidle, run in that namespace, acts on them.
`cut` makes the peer of a veth pair vanish in one of two ways.
"""

import socket
import time

from lab.netns import in_netns


def listen(ns, addr, port, rcvbuf=None):
    def make():
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((addr, port))
        s.listen(64)
        return s
    return in_netns(ns.name, make)


def connect(ns, addr, port):
    def make():
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect((addr, port))
        return s
    return in_netns(ns.name, make)


def accept(lst):
    lst.settimeout(5)
    a, _ = lst.accept()
    a.settimeout(5)
    return a


def exchange(c, a):
    """One byte each way, so both ends have received data."""
    c.sendall(b"x")
    assert a.recv(1) == b"x"
    a.sendall(b"y")
    assert c.recv(1) == b"y"


def mac_of(ns, dev):
    out = ns.run("ip", "-o", "link", "show", "dev", dev).stdout
    return out.split("link/ether", 1)[1].split()[0]


def cut(a, b, how):
    """Make b vanish for a.  "link-down": b's end of the veth goes down (a's
    sends fail locally: the kernel retransmits without backing off);
    "blackhole": everything b sends is dropped (pfifo of limit 0), so a's
    segments leave and nothing comes back, as when a peer crashed or a
    middlebox lost the flow (retransmissions back off)."""
    if how == "link-down":
        b.ip("link", "set", "dev", "veth1", "down")
    else:
        # a must keep b's address resolved: b's ARP replies are dropped too.
        a.ip("neigh", "replace", "10.231.0.2", "lladdr", mac_of(b, "veth1"), "dev", "veth0",
             "nud", "permanent")
        b.run("tc", "qdisc", "add", "dev", "veth1", "root", "pfifo", "limit", "0")


def fill_window(writer, timeout=10):
    """Write until the peer's window and our send buffer are full (the peer never reads):
    data then waits behind a zero window, and INET_DIAG shows the zero-window probe
    timer instead of the keep-alive one."""
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer.setblocking(False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            writer.send(b"w" * 4096)
        except BlockingIOError:
            time.sleep(0.3)
            try:
                writer.send(b"w" * 4096)
            except BlockingIOError:
                return
    raise AssertionError("the window never filled")
