#!/usr/bin/env python3
"""Shared machinery of the benchmarks: a namespace and a farm of loopback connections in it.

Owns everything the benchmark scripts have in common, so that each of them
only says what it measures:

* `BenchNamespace`: a fresh network namespace named ``tibench-PID-TAG``, set
  up for tens of thousands of loopback connections (lo up, ephemeral range
  10000-65535 so the servers' ports 1024-9999 never collide with it, a deep
  accept backlog, one IPv6 address per worker on lo), and removed again.
  `reap_stale()` removes those left behind by a bench that was SIGKILLed.
* `Worker`: one connection farm process inside the namespace -- the farm of
  the tests, tests/lab/farm.py, driven by JSON lines on its stdin/stdout.
  It opens, holds, feeds and closes groups of connections, and it times
  commands.
* `Farm`: several workers, because each process may hold at most 20,000
  descriptors (the hard RLIMIT_NOFILE here) and each loopback connection is
  two of them when both ends live in the namespace.  A *group* of
  connections is spread over the workers; worker i listens on the group's
  port at 127.0.0.(i+1) and fd00:7e::(i+1), so a whole group shares one
  server port (what `ss dport = :P` and `tcpidle -d P` select) however many
  processes hold it.
* `run_timed` (the farm's) / `Worker.run`: a command's wall time, CPU and
  peak RSS, taken by GNU time (see there for why not by os.wait4 of our own
  child).
* `bench_signals()`: SIGTERM and SIGHUP become KeyboardInterrupt, so that
  every `finally` that removes namespaces and workers runs on Ctrl-C, kill
  and hang-up alike.

Every connection is closed with SO_LINGER {1, 0} (an RST): no TIME_WAIT
sockets pile up across runs to slow later dumps down.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
# The one connection farm, shared with the tests.
from lab.farm import Farm as LabFarm, FarmError, run_timed  # noqa: E402,F401 (run_timed: ours too)

NS_PREFIX = "tibench-"
# Per worker, under the 20,000 hard limit: leaves room for listeners, stdio
# and the pipes of the commands a worker runs.
FD_BUDGET = 18000
EPHEMERAL = (10000, 65535)  # servers listen below this range


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


# --- parent side ----------------------------------------------------------------------


class Worker:
    """One farm process inside `ns` (tests/lab/farm.py, the connection farm the
    tests use too), holding groups of connections for the benchmarks."""

    # Bounded, like every farm, but a full bench/run takes minutes.
    MAX_SECONDS = 3600.0

    def __init__(self, ns: str, index: int):
        self.index = index
        self.fds = 0  # connection fds it holds (2 per connection)
        self.listeners = set()
        self.groups: Dict[str, int] = {}  # group -> connections held
        # Ctrl-C reaches the whole process group: the parent decides when the
        # farm goes (it closes its stdin).
        self.farm = LabFarm(ns, max_seconds=self.MAX_SECONDS, python=python(), ignore_sigint=True)

    @property
    def room(self) -> int:
        """Connections this worker can still take (one listener per family a port)."""
        return max(0, (FD_BUDGET - self.fds - len(self.listeners) - 4) // 2)

    def call(self, cmd: str, **req) -> Dict:
        """One request, one reply (the farm's own socket timeouts bound it)."""
        try:
            reply = self.farm.request(cmd, timeout=600.0, **req)
        except FarmError as exc:
            raise RuntimeError("worker %d: %s" % (self.index, exc)) from None
        for key in ("id", "ok"):
            reply.pop(key, None)
        return reply

    def run(self, argv: Sequence[str], stdout_path: Optional[str] = None) -> Dict:
        """Time argv, started from inside the namespace (see farm.run_timed)."""
        return self.call("run", argv=list(argv), stdout_path=stdout_path)

    def stop(self) -> None:
        self.farm.stop(timeout=30.0)


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
                got = w.call("group_open", group=name, family=fam, addr=addr, port=port, count=n)
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
            got = w.call("group_close", group=name, count=None if count is None else n)
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
        return sum(w.call("group_ping")["pinged"] for w in self.workers)

    def activate(self, name: str, period: float) -> None:
        """The group's server ends send a byte every `period` s (0: stop)."""
        for w in self.workers:
            if name in w.groups:
                w.call("group_active", group=name, period=period)


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


def stop_tracker(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM a tracker still running (it exits between polls), SIGKILL it after `timeout` s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
