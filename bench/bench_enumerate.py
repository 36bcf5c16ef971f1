#!/usr/bin/env python3
"""Benchmark tcpidle.diag against ss: enumerate (dump+decode) and destroy.

Run as root:  .venv/bin/python bench/bench_enumerate.py [--connections 20000] [--kill 10000]

1. In a fresh namespace (tidiag-bench-PID, removed at the end) worker
   processes open --connections established loopback connections (half IPv4,
   half IPv6; each is two sockets), spread so no worker passes the 20,000
   open-file limit.
2. Enumerate: time DiagSocket.dump_sockets() (AF_INET + AF_INET6, decoded to
   Socket records) against `ss -tni` run inside the namespace (by a helper
   process already in it, output to /dev/null), alternately, --runs times;
   print the medians and the ratio.  ss is timed from spawn to exit.
3. Destroy: each run opens --kill fresh connections to a dedicated port, then
   either dumps them (kernel bytecode dport == port) and destroys them with
   DiagSocket.destroy(), or runs `ss -K dport = :port`; alternately.  After
   each run it checks that exactly the intended sockets are gone: every
   client cookie the workers reported is absent, every bystander socket
   (the connections of step 1, listeners) is still there.

The numbers are printed; nothing is written.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tcpidle import diag  # noqa: E402
from tcpidle.model import TcpState  # noqa: E402

SO_COOKIE = 57
INET_DIAG_BC_D_GE = 4  # include/uapi/linux/inet_diag.h
INET_DIAG_BC_D_LE = 5
FD_BUDGET = 18000  # per worker, under the 20,000 hard limit
BASE_PORT = 10000
KILL_PORT = 9000
ESTABLISHED = 1 << TcpState.ESTABLISHED
# ss's default state filter ("connected"): all but LISTEN, CLOSE, TIME_WAIT, SYN_RECV.
SS_CONN = 0xFFF & ~((1 << TcpState.LISTEN) | (1 << TcpState.CLOSE) | (1 << TcpState.TIME_WAIT)
                    | (1 << TcpState.SYN_RECV) | 1 | (1 << TcpState.NEW_SYN_RECV))


# --- worker (runs inside the namespace) -----------------------------------------


def worker() -> None:
    """Line protocol on stdin/stdout, one JSON object per line."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socket.setdefaulttimeout(30)  # nothing on loopback may hang the bench
    listeners = {}
    conns = {}  # port -> list of sockets (clients and accepted)
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        reply = {"ok": True}
        if cmd == "open":
            fam = socket.AF_INET6 if req["family"] == 6 else socket.AF_INET
            host = "::1" if fam == socket.AF_INET6 else "127.0.0.1"
            port = req["port"]
            key = (fam, port)
            if key not in listeners:
                ls = socket.socket(fam, socket.SOCK_STREAM)
                ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6:
                    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                ls.bind((host, port))
                ls.listen(4096)
                listeners[key] = ls
            ls = listeners[key]
            mine = conns.setdefault(port, [])
            cookies = []
            left = req["count"]
            while left:
                n = min(left, 1000)  # stay under the accept backlog
                batch = []
                for _ in range(n):
                    c = socket.socket(fam, socket.SOCK_STREAM)
                    c.connect((host, port))
                    batch.append(c)
                for _ in range(n):
                    mine.append(ls.accept()[0])
                for c in batch:
                    cookies.append(struct.unpack("=Q", c.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])
                mine.extend(batch)
                left -= n
            reply["client_cookies"] = cookies
        elif cmd == "close":
            for s in conns.pop(req["port"], []):
                s.close()
        elif cmd == "time_ss":
            t0 = time.perf_counter()
            subprocess.run(req["argv"], stdout=subprocess.DEVNULL, check=True)
            reply["seconds"] = time.perf_counter() - t0
        elif cmd == "exit":
            break
        else:
            reply = {"ok": False, "error": "unknown command %r" % cmd}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


# --- parent ----------------------------------------------------------------------


class Worker:
    def __init__(self, ns: str):
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def call(self, **req):
        """One request, one reply (the worker's own socket timeouts bound it)."""
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("worker died")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(reply)
        return reply

    def stop(self):
        try:
            self.call(cmd="exit")
        except Exception:
            pass
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def dport_range(lo: int, hi: int) -> bytes:
    """INET_DIAG bytecode for lo <= remote port <= hi, as ss compiles
    `dport >= :lo and dport <= :hi`: each op is {code, yes, no} followed by
    {0, 0, port}; `no` jumping to len + 4 means reject."""
    op = struct.Struct("=BBH")
    return (op.pack(INET_DIAG_BC_D_GE, 8, 20) + op.pack(0, 0, lo)
            + op.pack(INET_DIAG_BC_D_LE, 8, 12) + op.pack(0, 0, hi))


def open_spread(workers, first_port, total, fd_used):
    """Open `total` connections (half v4, half v6) across workers; worker i
    listens on first_port + i.  Returns the client sockets' cookies."""
    cookies = []
    per = -(-total // len(workers))
    left = total
    for i, w in enumerate(workers):
        n = min(per, left)
        if n <= 0:
            break
        if fd_used[i] + 2 * n > FD_BUDGET:
            raise SystemExit("too many connections for %d workers" % len(workers))
        for fam, cnt in ((4, n // 2), (6, n - n // 2)):
            if cnt:
                cookies += w.call(cmd="open", family=fam, port=first_port + i,
                                  count=cnt)["client_cookies"]
        fd_used[i] += 2 * n
        left -= n
    return cookies


def close_spread(workers, first_port, total, fd_used):
    per = -(-total // len(workers))
    left = total
    for i, w in enumerate(workers):
        w.call(cmd="close", port=first_port + i)
        n = min(per, max(left, 0))
        fd_used[i] -= 2 * n
        left -= n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=20000)
    ap.add_argument("--kill", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-kill", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root")
    fds_needed = 2 * (args.connections + (0 if args.skip_kill else args.kill))
    nworkers = max(2, -(-fds_needed // FD_BUDGET) + 1)
    ns = "tidiag-bench-%d" % os.getpid()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    procs = []  # every process started, stopped in the finally
    nsfd = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                        "net.ipv4.ip_local_port_range=20000 65000"], check=True)
        nsfd = os.open("/run/netns/" + ns, os.O_RDONLY)
        workers = []
        for _ in range(nworkers):
            workers.append(Worker(ns))
            procs.append(workers[-1])
        timer = Worker(ns)  # holds no sockets; runs ss from inside the namespace
        procs.append(timer)
        fd_used = [0] * nworkers

        t0 = time.perf_counter()
        for i, w in enumerate(workers):
            share = args.connections // nworkers + (1 if i < args.connections % nworkers else 0)
            for fam, cnt in ((4, share // 2), (6, share - share // 2)):
                if cnt:
                    w.call(cmd="open", family=fam, port=BASE_PORT + i, count=cnt)
            fd_used[i] += 2 * share
        print("Linux %s, Python %s, %s" % (os.uname().release, sys.version.split()[0],
              subprocess.run(["ss", "-V"], capture_output=True, text=True).stdout.strip()))
        print("opened %d connections (%d sockets) in %d workers in %.1f s"
              % (args.connections, 2 * args.connections, nworkers, time.perf_counter() - t0))

        with diag.DiagSocket(netns_fd=nsfd) as ds:
            enumerate_bench(ds, timer, ns, args)
            if not args.skip_kill:
                destroy_bench(ds, workers, timer, fd_used, args)
    finally:
        for w in procs:
            w.stop()
        if nsfd is not None:
            os.close(nsfd)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def enumerate_bench(ds, timer, ns, args) -> None:
    ours, theirs = [], []
    n_ours = None
    ss_argv = ["ss", "-tni"]
    # Warm-up, both sides (page cache, slab, first-use costs).
    ds.dump_sockets([socket.AF_INET, socket.AF_INET6], SS_CONN)
    timer.call(cmd="time_ss", argv=ss_argv)
    for _ in range(args.runs):
        t0 = time.perf_counter()
        socks = ds.dump_sockets([socket.AF_INET, socket.AF_INET6], SS_CONN)
        ours.append(time.perf_counter() - t0)
        n_ours = len(socks)
        del socks
        theirs.append(timer.call(cmd="time_ss", argv=ss_argv)["seconds"])
    ss_lines = subprocess.run(["ip", "netns", "exec", ns, "ss", "-tnH"],
                              capture_output=True, text=True, check=True).stdout.count("\n")
    mo, mt = statistics.median(ours), statistics.median(theirs)
    print("enumerate %d sockets (ss sees %d): tcpidle.diag dump+decode %.1f ms, ss -tni %.1f ms, "
          "ratio %.2f (median of %d; ours %s; ss %s)"
          % (n_ours, ss_lines, mo * 1e3, mt * 1e3, mo / mt, args.runs, fmt(ours), fmt(theirs)))
    if n_ours != 2 * args.connections:
        print("  WARNING: expected %d sockets" % (2 * args.connections))


def fmt(xs):
    return "/".join("%.0f" % (x * 1e3) for x in xs)


def destroy_bench(ds, workers, timer, fd_used, args) -> None:
    fams = [socket.AF_INET, socket.AF_INET6]
    bystanders = {s.cookie for s in ds.dump_sockets(fams, 0xFFFFFFFF)}
    ours, ours_destroy_only, theirs, ss_missed = [], [], [], []
    for run in range(2 * args.runs):
        mine = run % 2 == 0
        port = KILL_PORT + run * len(workers)
        last = port + len(workers) - 1
        victims = set(open_spread(workers, port, args.kill, fd_used))
        assert len(victims) == args.kill
        if mine:
            t0 = time.perf_counter()
            socks = ds.dump_sockets(fams, ESTABLISHED, dport_range(port, last))
            t1 = time.perf_counter()
            res = ds.destroy(socks)
            t2 = time.perf_counter()
            ours.append(t2 - t0)
            ours_destroy_only.append(t2 - t1)
            if {s.cookie for s in socks} != victims:
                raise SystemExit("run %d: the dump did not select exactly the victims" % run)
            bad = [r for r in res if r != 0]
            if bad:
                raise SystemExit("run %d: %d destroys failed: %s" % (run, len(bad), sorted(set(bad))))
        else:
            argv = ["ss", "-K", "-tn", "state", "established",
                    "( dport >= :%d and dport <= :%d )" % (port, last)]
            theirs.append(timer.call(cmd="time_ss", argv=argv)["seconds"])
        after = {s.cookie for s in ds.dump_sockets(fams, 0xFFFFFFFF)}
        left = victims & after
        if bystanders - after:
            raise SystemExit("run %d: %d bystanders were destroyed" % (run, len(bystanders - after)))
        if mine and left:
            raise SystemExit("run %d: %d victims survived" % (run, len(left)))
        if not mine:
            ss_missed.append(len(left))
        close_spread(workers, port, args.kill, fd_used)
    mo, md, mt = (statistics.median(x) for x in (ours, ours_destroy_only, theirs))
    print("destroy %d sockets: tcpidle.diag dump+destroy %.1f ms (destroy alone %.1f ms, %.1f us each), "
          "ss -K %.1f ms, ratio %.2f (median of %d; ours %s; ss %s)"
          % (args.kill, mo * 1e3, md * 1e3, md / args.kill * 1e6, mt * 1e3, mo / mt, args.runs,
             fmt(ours), fmt(theirs)))
    print("  every run of ours destroyed exactly its %d victims and no bystander; "
          "ss -K left %s victims alive per run" % (args.kill, ss_missed))


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker()
    else:
        main()
