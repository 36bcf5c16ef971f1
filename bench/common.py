#!/usr/bin/env python3
"""Shared machinery of the benchmarks: a namespace and a farm of loopback connections in it.

Owns everything the benchmark scripts have in common, so that each of them
only says what it measures:

* `BenchNamespace`: a fresh network namespace named ``tibench-PID-TAG``, set
  up for tens of thousands of loopback connections (lo up, ephemeral range
  10000-65535 so the servers' ports 1024-9999 never collide with it, a deep
  accept backlog, one IPv6 address per worker on lo), and removed again.
  `reap_stale()` removes those left behind by a bench that was SIGKILLed.
* `Worker`: one Python process inside the namespace, driven by JSON lines on
  its stdin/stdout (the `worker_main` below is its other end).  It opens,
  holds, feeds and closes connections, and it times commands.
* `Farm`: several workers, because each process may hold at most 20,000
  descriptors (the hard RLIMIT_NOFILE here) and each loopback connection is
  two of them when both ends live in the namespace.  A *group* of
  connections is spread over the workers; worker i listens on the group's
  port at 127.0.0.(i+1) and fd00:7e::(i+1), so a whole group shares one
  server port (what `ss dport = :P` and `tcpidle -d P` select) however many
  processes hold it.
* `run_timed` / `Worker.run`: a command's wall time, CPU and peak RSS, taken
  by GNU time (see there for why not by os.wait4 of our own child).
* `bench_signals()`: SIGTERM and SIGHUP become KeyboardInterrupt, so that
  every `finally` that removes namespaces and workers runs on Ctrl-C, kill
  and hang-up alike.

Every connection is closed with SO_LINGER {1, 0} (an RST): no TIME_WAIT
sockets pile up across runs to slow later dumps down.

Run as ``common.py --worker`` it is a worker; nothing else is meant to run it.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence

from tcpidle.model import SO_COOKIE  # the workers run with the project's venv (python())

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

NS_PREFIX = "tibench-"
# Per worker, under the 20,000 hard limit: leaves room for listeners, stdio
# and the pipes of the commands a worker runs.
FD_BUDGET = 18000
EPHEMERAL = (10000, 65535)  # servers listen below this range
GNU_TIME = "/usr/bin/time"
LINGER_RST = struct.pack("ii", 1, 0)


def python() -> str:
    """The interpreter that sees tcpidle: the project's venv, else this one."""
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def tcpidle_argv() -> List[str]:
    """How to start the tcpidle command as a user would."""
    script = os.path.join(ROOT, ".venv", "bin", "tcpidle")
    if os.path.exists(script):
        return [script]
    return [python(), "-m", "tcpidle"]


def v4_addr(i: int) -> str:
    return "127.0.0.%d" % (i + 1)


def v6_addr(i: int) -> str:
    return "fd00:7e::%x" % (i + 1)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


# --- signals -----------------------------------------------------------------------


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def bench_signals() -> None:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt so clean-up code runs."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)


# --- the namespace ------------------------------------------------------------------


BPFFS = "/sys/fs/bpf"


def _dead_owner(name: str) -> bool:
    """True for tibench-PID-... names whose PID is not running."""
    if not name.startswith(NS_PREFIX):
        return False
    try:
        pid = int(name[len(NS_PREFIX):].split("-")[0])
    except ValueError:
        return False
    return pid != os.getpid() and not os.path.exists("/proc/%d" % pid)


def pin_dir(tag: str) -> str:
    """A bpffs directory of our own for a tracker's pinned maps."""
    return os.path.join(BPFFS, "%s%d-%s" % (NS_PREFIX, os.getpid(), tag))


def remove_pin_dir(path: str) -> None:
    """Unlink the pins in `path` (bpffs allows it) and the directory."""
    try:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
    except FileNotFoundError:
        pass


def reap_stale() -> List[str]:
    """Delete tibench-PID-* namespaces and pin directories whose creating
    process is gone (a bench that was SIGKILLed)."""
    removed = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if _dead_owner(name):
            sh("ip", "netns", "del", name, check=False)
            removed.append(name)
    try:
        names = os.listdir(BPFFS)
    except OSError:
        names = []
    for name in names:
        if _dead_owner(name):
            remove_pin_dir(os.path.join(BPFFS, name))
            removed.append(os.path.join(BPFFS, name))
    return removed


class BenchNamespace:
    """A fresh namespace for `workers` workers; a context manager that removes it."""

    def __init__(self, tag: str, workers: int = 16, ehash: Optional[int] = None):
        self.name = "%s%d-%s" % (NS_PREFIX, os.getpid(), tag)
        self.workers = workers
        self.ehash = ehash
        self.fd: Optional[int] = None
        self._outer: Optional[str] = None

    def __enter__(self) -> "BenchNamespace":
        try:
            if self.ehash:
                self._add_with_private_ehash()
            else:
                sh("ip", "netns", "add", self.name)
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def _add_with_private_ehash(self) -> None:
        """Create the namespace with an established-hash table of its own,
        `ehash` buckets (instead of sharing the host's, sized for its RAM).

        A new namespace gets a private table when the namespace of the
        process creating it has net.ipv4.tcp_child_ehash_entries set (Linux
        6.1+).  So: an outer namespace with that sysctl, a process unshared
        from inside it, and `ip netns attach` to name the new namespace from
        here (`ip netns add` run inside `ip netns exec` would mount the name
        in a private mount namespace, invisible here).
        """
        self._outer = self.name + "-outer"
        sh("ip", "netns", "add", self._outer)
        sh("ip", "netns", "exec", self._outer, "sysctl", "-qw",
           "net.ipv4.tcp_child_ehash_entries=%d" % self.ehash)
        holder = subprocess.Popen(["ip", "netns", "exec", self._outer, "unshare", "--net",
                                   "sh", "-c", "echo ready; exec sleep 60"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            if holder.stdout.readline().strip() != "ready":
                raise RuntimeError("could not unshare a namespace inside %s" % self._outer)
            # holder is `ip netns exec` exec'ed into unshare, then sh, then sleep: one pid.
            sh("ip", "netns", "attach", self.name, str(holder.pid))
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()

    def _setup(self) -> None:
        n = self.name
        sh("ip", "-n", n, "link", "set", "lo", "up")
        # All of 127/8 is local on lo already; IPv6 has only ::1, so each
        # worker gets an address of its own (nodad: usable at once).
        for i in range(self.workers):
            sh("ip", "-n", n, "-6", "addr", "add", v6_addr(i) + "/128", "dev", "lo", "nodad")
        for key, value in (
            ("net.ipv4.ip_local_port_range", "%d %d" % EPHEMERAL),
            ("net.core.somaxconn", "4096"),
            ("net.ipv4.tcp_max_syn_backlog", "8192"),
        ):
            sh("ip", "netns", "exec", n, "sysctl", "-qw", "%s=%s" % (key, value))
        self.fd = os.open("/run/netns/" + n, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        sh("ip", "netns", "del", self.name, check=False)
        if self._outer:
            sh("ip", "netns", "del", self._outer, check=False)
            self._outer = None

    def __exit__(self, *exc) -> None:
        self.close()


# --- timing a command -------------------------------------------------------------------


def run_timed(argv: Sequence[str], stdout_path: Optional[str] = None) -> Dict:
    """Run argv to completion; its wall time, CPU, peak RSS and exit status.

    The command is started by GNU time, which forks it and reads its rusage
    with wait4().  Not by os.wait4() of our own child: at exec() the kernel
    folds the high-water RSS of the *old* mm into the new program's
    ru_maxrss, and a child forked (or vforked) from this Python process
    starts out with our ~10-20 MB, which would swamp ss's 3 MB.  GNU time is
    a small C program, so the floor it leaves is ~1 MB, the same for both
    tools.  The wall clock runs from before the spawn of `time` to its exit:
    its own exec (a fraction of a ms) is in both tools' numbers.
    stdout goes to /dev/null unless `stdout_path` is given.
    """
    with tempfile.TemporaryFile(prefix="tibench-err-") as err, \
            tempfile.NamedTemporaryFile(prefix="tibench-time-", mode="r") as res, \
            open(stdout_path or os.devnull, "wb") as out:
        gnu = os.path.exists(GNU_TIME)
        cmd = ([GNU_TIME, "-q", "-f", "%U %S %M", "-o", res.name] if gnu else []) + list(argv)
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        _pid, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if gnu:
            fields = res.read().split()
            user, system, maxrss = float(fields[-3]), float(fields[-2]), int(fields[-1])
        else:  # fallback: the RSS floor is this Python process's size (see above)
            user, system, maxrss = ru.ru_utime, ru.ru_stime, ru.ru_maxrss
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    return {"wall": wall, "user": user, "sys": system, "maxrss_kb": maxrss,
            "rc": p.returncode, "stderr": stderr[-2000:], "rss_by": "gnu-time" if gnu else "wait4"}


# --- worker (runs inside the namespace) -------------------------------------------------


def _cookie(s: socket.socket) -> int:
    return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


class _WorkerState:
    def __init__(self):
        self.listeners: Dict[tuple, socket.socket] = {}
        self.groups: Dict[str, List[tuple]] = {}  # group -> [(client, server)]
        self.active: Dict[str, float] = {}  # group -> period (s)
        self.lock = threading.Lock()
        self.sender: Optional[threading.Thread] = None
        self.stop = threading.Event()

    def listener(self, fam: int, addr: str, port: int) -> socket.socket:
        key = (fam, addr, port)
        ls = self.listeners.get(key)
        if ls is None:
            ls = socket.socket(fam, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            ls.bind((addr, port))
            ls.listen(4096)
            self.listeners[key] = ls
        return ls

    def open(self, group: str, family: int, addr: str, port: int, count: int) -> Dict:
        fam = socket.AF_INET6 if family == 6 else socket.AF_INET
        ls = self.listener(fam, addr, port)
        pairs = []
        left = count
        try:
            while left:
                n = min(left, 1000)  # stays inside the accept backlog
                batch = []
                for _ in range(n):
                    c = socket.socket(fam, socket.SOCK_STREAM)
                    batch.append(c)
                    c.connect((addr, port))
                for c in batch:
                    pairs.append((c, ls.accept()[0]))
                left -= n
        except BaseException:
            for c, s in pairs:
                _rst_close(c)
                _rst_close(s)
            raise
        with self.lock:
            self.groups.setdefault(group, []).extend(pairs)
        return {"client": [_cookie(c) for c, _ in pairs], "server": [_cookie(s) for _, s in pairs]}

    def close(self, group: str, count: Optional[int]) -> Dict:
        with self.lock:
            pairs = self.groups.get(group, [])
            if count is None or count >= len(pairs):
                gone, keep = pairs, []
            else:
                gone, keep = pairs[len(pairs) - count:], pairs[: len(pairs) - count]
            if keep:
                self.groups[group] = keep
            else:
                self.groups.pop(group, None)
                self.active.pop(group, None)
        cookies = {"client": [], "server": []}
        for c, s in gone:
            for side, sk in (("client", c), ("server", s)):
                try:
                    cookies[side].append(_cookie(sk))
                except OSError:
                    pass
                _rst_close(sk)
        return dict(cookies, closed=len(gone))

    def ping(self) -> Dict:
        """One byte each way on every connection held: every socket then has
        received data while ESTABLISHED (what the BPF probe records)."""
        with self.lock:
            pairs = [p for group in self.groups.values() for p in group]
        for c, s in pairs:
            c.send(b"p")
            s.send(b"p")
        return {"pinged": len(pairs)}

    def activate(self, group: str, period: float) -> Dict:
        with self.lock:
            if period > 0:
                self.active[group] = period
            else:
                self.active.pop(group, None)
        if self.sender is None:
            self.sender = threading.Thread(target=self._send_loop, daemon=True)
            self.sender.start()
        return {}

    def _send_loop(self) -> None:
        """Each active group's server ends send one byte every `period`
        seconds, spread evenly over the period in slices of 200, so the
        client ends' tcpi_last_data_recv keeps being refreshed."""
        slices = 50
        while not self.stop.is_set():
            with self.lock:
                work = [(self.groups.get(g, []), p) for g, p in self.active.items()]
            if not work:
                self.stop.wait(0.2)
                continue
            period = min(p for _, p in work)
            socks = [s for pairs, _ in work for _, s in pairs]
            start = time.monotonic()
            step = max(1, -(-len(socks) // slices))
            for k in range(0, len(socks), step):
                for s in socks[k:k + step]:
                    try:
                        s.send(b"x", socket.MSG_DONTWAIT)
                    except OSError:
                        pass  # destroyed, closed or full: not our business here
                due = start + period * (k + step) / max(1, len(socks))
                delay = due - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    return


def _rst_close(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    except OSError:
        pass  # already destroyed / reset
    s.close()


def worker_main() -> None:
    """One request per stdin line, one JSON reply per stdout line."""
    import resource

    # Ctrl-C reaches the whole process group: the parent decides when we go
    # (it closes our stdin, or says exit).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socket.setdefaulttimeout(30)  # nothing on loopback may hang the bench
    st = _WorkerState()
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req.pop("cmd")
        try:
            if cmd == "open":
                reply = st.open(**req)
            elif cmd == "close":
                reply = st.close(req["group"], req.get("count"))
            elif cmd == "ping":
                reply = st.ping()
            elif cmd == "activate":
                reply = st.activate(req["group"], req["period"])
            elif cmd == "run":
                reply = run_timed(req["argv"], req.get("stdout_path"))
            elif cmd == "exit":
                break
            else:
                raise ValueError("unknown command %r" % cmd)
            reply["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
            reply = {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    st.stop.set()


# --- parent side ----------------------------------------------------------------------


class Worker:
    """A worker process inside `ns` (started with ip netns exec)."""

    def __init__(self, ns: str, index: int):
        self.index = index
        self.fds = 0  # connection fds it holds (2 per connection)
        self.listeners = set()
        self.groups: Dict[str, int] = {}  # group -> connections held
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", ns, python(), os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    @property
    def room(self) -> int:
        """Connections this worker can still take (one listener per family a port)."""
        return max(0, (FD_BUDGET - self.fds - len(self.listeners) - 4) // 2)

    def call(self, **req) -> Dict:
        """One request, one reply (the worker's own socket timeouts bound it)."""
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("worker %d died" % self.index)
        reply = json.loads(line)
        if not reply.pop("ok", False):
            raise RuntimeError("worker %d: %s" % (self.index, reply.get("error")))
        return reply

    def run(self, argv: Sequence[str], stdout_path: Optional[str] = None) -> Dict:
        """Time argv, started from inside the namespace (see run_timed)."""
        return self.call(cmd="run", argv=list(argv), stdout_path=stdout_path)

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.p.stdin.flush()
            except (OSError, ValueError):
                pass
        try:
            self.p.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        if self.p.stdout:
            self.p.stdout.close()


class Group:
    """The cookies of one group of connections (client = the connecting side)."""

    def __init__(self, name: str, port: int):
        self.name = name
        self.port = port
        self.client: set = set()
        self.server: set = set()

    def __len__(self) -> int:
        return len(self.client)


class Farm:
    """`nworkers` connection-holding workers plus one timer, in namespace `ns`.

    The timer holds no connections: it only starts the commands being
    measured, from inside the namespace.  Use as a context manager.
    """

    def __init__(self, ns: BenchNamespace, nworkers: int):
        if nworkers > ns.workers:
            raise ValueError("namespace was set up for %d workers" % ns.workers)
        self.ns = ns
        self.workers: List[Worker] = []
        self.timer: Optional[Worker] = None
        self.groups: Dict[str, Group] = {}
        try:
            for i in range(nworkers):
                self.workers.append(Worker(ns.name, i))
            self.timer = Worker(ns.name, nworkers)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def workers_for(connections: int) -> int:
        """Workers needed to hold `connections` at once (both ends each)."""
        per = (FD_BUDGET - 64) // 2
        return max(2, -(-connections // per))

    def __enter__(self) -> "Farm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for w in self.workers + ([self.timer] if self.timer else []):
            w.stop()
        self.workers = []
        self.timer = None

    @property
    def connections(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def open(self, name: str, port: int, count: int, families: Iterable[int] = (4, 6)) -> Group:
        """Open `count` connections to server port `port`, split evenly over
        the workers (as far as their descriptor budget allows) and over the
        families.  Adds to the group if it exists."""
        fams = list(families)
        group = self.groups.get(name) or Group(name, port)
        if group.port != port:
            raise ValueError("group %s is on port %d" % (name, group.port))
        self.groups[name] = group
        shares = _spread(count, [w.room - len(fams) for w in self.workers])
        for w, share in zip(self.workers, shares):
            for k, fam in enumerate(fams):
                n = share // len(fams) + (1 if k < share % len(fams) else 0)
                if not n:
                    continue
                addr = v6_addr(w.index) if fam == 6 else v4_addr(w.index)
                got = w.call(cmd="open", group=name, family=fam, addr=addr, port=port, count=n)
                group.client.update(got["client"])
                group.server.update(got["server"])
                w.listeners.add((fam, port))
                w.fds += 2 * n
                w.groups[name] = w.groups.get(name, 0) + n
        return group

    def close(self, name: str, count: Optional[int] = None) -> None:
        """Close (with RST) all of a group, or `count` of its connections
        taken evenly from its workers (the newest first)."""
        group = self.groups.get(name)
        if group is None:
            return
        held = [w.groups.get(name, 0) for w in self.workers]
        take = held if count is None else _spread(count, held)
        for w, n in zip(self.workers, take):
            if not n:
                continue
            got = w.call(cmd="close", group=name, count=None if count is None else n)
            group.client.difference_update(got["client"])
            group.server.difference_update(got["server"])
            w.fds -= 2 * got["closed"]
            w.groups[name] -= got["closed"]
            if not w.groups[name]:
                del w.groups[name]
        if count is None:
            del self.groups[name]

    def ping(self) -> int:
        """A byte each way on every connection; returns how many connections."""
        return sum(w.call(cmd="ping")["pinged"] for w in self.workers)

    def activate(self, name: str, period: float) -> None:
        """The group's server ends send a byte every `period` s (0: stop)."""
        for w in self.workers:
            if name in w.groups:
                w.call(cmd="activate", group=name, period=period)


def _spread(total: int, capacity: Sequence[int]) -> List[int]:
    """Split `total` as evenly as the capacities allow."""
    caps = [max(0, c) for c in capacity]
    if total > sum(caps):
        raise RuntimeError("farm is full: %d more connections, room for %d" % (total, sum(caps)))
    out = [0] * len(caps)
    left = total
    open_ = [i for i, c in enumerate(caps) if c > 0]
    while left and open_:
        each = max(1, left // len(open_))
        for i in list(open_):
            n = min(each, caps[i] - out[i], left)
            out[i] += n
            left -= n
            if out[i] >= caps[i]:
                open_.remove(i)
            if not left:
                break
    return out


# --- describing the machine ---------------------------------------------------------------


def machine() -> Dict[str, str]:
    """Kernel, CPU, memory, iproute2, Python, load: for the results' header."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = "%.1f GiB" % (int(f.readline().split()[1]) / (1 << 20))
    except (OSError, ValueError, IndexError):
        pass
    ss = sh("ss", "-V", check=False).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "kernel": platform.release(),
        "cpus": "%d x %s" % (os.cpu_count() or 0, cpu),
        "memory": mem,
        "iproute2": ss.replace("ss utility, iproute2-", ""),
        "python": platform.python_version(),
        "load": "%.2f %.2f %.2f" % os.getloadavg(),
    }


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker_main()
    else:
        sys.exit("common.py is a library of the benchmarks; run bench/run")
