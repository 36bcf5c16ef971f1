#!/usr/bin/env python3
"""`tcpidle kill` while a tracker runs: the re-check's per-batch storage dump.

Run as root:

    .venv/bin/python bench/bench_kill_tracked.py [--victims N] [--bystanders N]
                                                 [--runs R] [--before DIR]

With a tracker's per-socket storage (tp_btf + sk_storage), `kill` reads each
socket's probe record inline in its dump, and the re-check before each
destroy batch must dump again for fresh records (exact INET_DIAG lookups
carry no storage).  Such a dump walks the whole TCP table however few sockets
it returns.  This measures what that costs: --victims idle connections among
--bystanders others (another port), all with a probe record (a byte each way
after the tracker started), killed by `tcpidle kill -d PORT -t MS` with the
tracker's pins ("tracked") and without them ("untracked", tcp_info alone);
with --before DIR also the tracked kill of another tree.  Tools rotate
(ABC, BCA, ...); medians of wall, user and sys time (GNU time, started from
inside the namespace).  Every victim must be destroyed and every bystander
left: a kill that spares or misses one fails the bench.

The pins live on a bpffs of our own under /run: `ip netns exec` mounts a
fresh /sys, so a tracker's pins under /sys/fs/bpf would be invisible to the
commands started inside the namespace.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common

VICTIM_PORT = 5100  # + run: a fresh group each run
BYSTANDER_PORT = 5001


def mount_bpffs() -> str:
    path = "/run/%s%d-bpffs" % (common.NS_PREFIX, os.getpid())
    os.makedirs(path, mode=0o700, exist_ok=True)
    common.sh("mount", "-t", "bpf", "bpf", path)
    os.chmod(path, 0o700)
    return path


def unmount_bpffs(path: str) -> None:
    common.sh("umount", path, check=False)
    try:
        os.rmdir(path)
    except OSError:
        pass


def start_tracker(tcpidle, ns: str, pins: str, log_path: str) -> subprocess.Popen:
    """A dry-run tracker that only records (its pins are what the kills read)."""
    proc = subprocess.Popen(tcpidle + ["track", "--netns", ns, "-d", "5000-5999", "--dry-run",
                                       "--pin-dir", pins, "-i", "3600", "-t", "100000000",
                                       "--disable-syslog"],
                            stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with open(log_path) as f:
            if "polling every" in f.read():
                return proc
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    common.stop_tracker(proc, 10)
    with open(log_path) as f:
        raise RuntimeError("tracker did not start: %s" % f.read()[-500:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--victims", type=int, default=10000)
    ap.add_argument("--bystanders", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=5, help="runs per tool")
    ap.add_argument("--idle-ms", type=int, default=500)
    ap.add_argument("--before", metavar="DIR", help="also the tracked kill of this tree")
    args = ap.parse_args()
    common.bench_signals()
    common.reap_stale()
    tcpidle = common.tcpidle_argv()
    tools = {"tracked": tcpidle, "untracked": tcpidle}
    if args.before:
        tools["before-tracked"] = ["env", "PYTHONPATH=%s" % args.before, common.python(), "-P", "-c",
                                   "import sys; from tcpidle.cli import main; sys.exit(main())"]
    names = list(tools)
    results = {name: [] for name in names}
    bpffs = mount_bpffs()
    pins = os.path.join(bpffs, "tracker")
    tracker = None
    log_path = tempfile.mktemp(prefix="tibench-tracker-", suffix=".log")
    try:
        workers = common.Farm.workers_for(int((args.victims + args.bystanders) * 1.1))
        with common.BenchNamespace("tracked", workers=workers + 1) as ns, \
                common.Farm(ns, workers) as farm:
            tracker = start_tracker(tcpidle, ns.name, pins, log_path)
            farm.open("bystanders", BYSTANDER_PORT, args.bystanders)
            print("# %s; %d victims among %d bystanders, -t %d ms, %d runs per tool"
                  % (common.machine(), args.victims, args.bystanders, args.idle_ms, args.runs))
            for i in range(len(names) * args.runs):
                rnd, k = divmod(i, len(names))
                name = names[(rnd + k) % len(names)]
                port = VICTIM_PORT + i
                victims = len(farm.open("victims%d" % i, port, args.victims))
                farm.ping()  # a byte each way on every connection: each has a probe record
                time.sleep(args.idle_ms / 1000 + 0.3)
                argv = tools[name] + ["kill", "-d", str(port), "-t", str(args.idle_ms), "--json",
                                      "--disable-syslog", "--pin-dir",
                                      pins if name.endswith("-tracked") or name == "tracked"
                                      else os.path.join(bpffs, "none")]
                out = tempfile.mktemp(prefix="tibench-kill-")
                try:
                    r = farm.timer.run(argv, stdout_path=out)
                    with open(out) as f:
                        rows = sum(1 for _ in f)
                finally:
                    if os.path.exists(out):
                        os.unlink(out)
                farm.close("victims%d" % i)
                if r["rc"] != 0 or rows != victims:
                    raise RuntimeError("%s: exit %s, %d rows for %d victims: %s"
                                       % (name, r["rc"], rows, victims, r.get("stderr", "")[-400:]))
                results[name].append(r)
                print("run %2d %-15s wall %4.0f ms  user %.2f s  sys %.2f s"
                      % (i, name, r["wall"] * 1000, r["user"], r["sys"]), flush=True)
            common.stop_tracker(tracker, 30)
            tracker = None
    finally:
        if tracker is not None:
            common.stop_tracker(tracker, 30)
        subprocess.run(tcpidle + ["track", "--cleanup", "--pin-dir", pins],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        unmount_bpffs(bpffs)
        if os.path.exists(log_path):
            os.unlink(log_path)
    print("\n| kill of %d among %d | wall (median) | user | sys |" % (args.victims, args.victims + args.bystanders))
    print("|---|---:|---:|---:|")
    for name in names:
        rs = results[name]
        print("| %s | %.0f ms | %.2f s | %.2f s |" % (
            name, 1000 * statistics.median(r["wall"] for r in rs),
            statistics.median(r["user"] for r in rs), statistics.median(r["sys"] for r in rs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
