#!/usr/bin/env python3
"""The tracker's own memory and per-poll cost, at 10k and 100k sockets, before/after.

    sudo bench/bench_tracker.py                       # this tree, 10000,100000 sockets
    sudo bench/bench_tracker.py --before DIR          # also a tree without the detached probe
    sudo bench/bench_tracker.py --sizes 10000 --polls 5
    sudo bench/bench_tracker.py --before DIR --rounds 2   # after, before, before, after
    sudo bench/bench_tracker.py --before DIR --replay     # and each tree's Python CPU alone

For each size: a fresh bench namespace holds size/2 connections (both ends
there, spread over worker processes: 20,000 descriptors per process at most
here); `tcpidle track --netns NS --all --dry-run -t 1d -i 3 -vv`, its
storage and link pinned in a bench pin directory, starts from the host; once
it polls, one byte each way on every connection gives every socket a probe
record; then after --polls more polls its VmRSS and VmHWM (/proc/PID/status),
whether bcc or LLVM is mapped in it (/proc/PID/maps), and its poll times
(the -vv lines) are read, and its CPU time over those polls (user and
system, /proc/PID/stat; system is mostly the kernel walking its hash for
the dump).  Per-poll cost per matched socket = median poll time / matched
sockets, and CPU time per poll / matched sockets: on a shared, loaded
machine the wall time swings with the load, the CPU time much less.
`--before DIR` runs the same with DIR's tcpidle (PYTHONPATH=DIR, the same
interpreter): e.g. `git archive COMMIT | tar -x -C DIR`, with DIR/tcpidle/bpf
a link to DIR/bpf (the installed package maps it so).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_cli import polls, proc_status, wait_for  # noqa: E402

PORT = 2400


def mapped(pid: int, words=("libbcc", "LLVM", "clang")) -> List[str]:
    with open("/proc/%d/maps" % pid) as f:
        libs = {line.split()[-1] for line in f if "/" in line}
    return sorted(lib for lib in libs if any(w in lib for w in words))


def cpu_seconds(pid: int) -> Tuple[float, float]:
    """User and system CPU time of a process so far (/proc/PID/stat utime, stime)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def record_dump(ns: common.BenchNamespace, pins: str, path: str) -> None:
    """One dump of the namespace as the tracker makes it (--all, tcp_info, the probe's
    storage inline through its pin), its raw netlink chunks pickled for replay_poll.py."""
    from tcpidle import diag, evidence, selectors
    from tcpidle.model import TcpState

    seen = evidence.choose(pins)
    try:
        chunks: List[bytes] = []
        with diag.DiagSocket(netns_fd=ns.fd) as ds:
            ds._dump(diag.AF_UNSPEC, selectors.states_mask(frozenset(TcpState)), b"", True,
                     chunks, seen.reader.storages)
        with open(path, "wb") as f:
            pickle.dump({"chunks": chunks, "map_id": seen.reader.map_id}, f)
    finally:
        seen.close()


def replay(tree: Optional[str], path: str) -> Dict:
    """replay_poll.py of a recorded dump with TREE's tcpidle: the poll's Python CPU."""
    env = dict(os.environ, PYTHONPATH=tree or common.ROOT)
    out = subprocess.run([common.python(), os.path.join(common.HERE, "replay_poll.py"), path],
                         env=env, cwd=tree or common.ROOT, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_tracker(ns: common.BenchNamespace, farm: common.Farm, tree: Optional[str], npolls: int,
                label: str, record: Optional[str] = None) -> Dict:
    pins = common.pin_dir("track-" + label)
    interval = 3.0
    env = dict(os.environ)
    argv = [common.python(), "-m", "tcpidle"]
    if tree:
        env["PYTHONPATH"] = tree
    else:
        env["PYTHONPATH"] = common.ROOT
    argv += ["track", "--netns", ns.name, "--all", "--dry-run", "-t", "86400000",
             "-i", str(interval), "--pin-dir", pins, "--disable-syslog", "-vv"]
    errf = tempfile.NamedTemporaryFile(prefix="tibench-track-", suffix=".log", delete=False)
    res: Dict = {"label": label, "tree": tree or common.ROOT}
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errf, env=env,
                            cwd=tree or common.ROOT)
    try:
        wait_for(errf.name, lambda t: len(polls(t)) >= 1, 300, proc)
        res["startup_s"] = time.monotonic() - t0
        res["rss_start_kb"] = proc_status(proc.pid)["VmRSS"]
        farm.ping()
        seen = len(polls(open(errf.name).read()))
        # One poll after the traffic first (the one under way may predate it), then
        # the CPU time of the next npolls: read when a poll's line appears, both times.
        wait_for(errf.name, lambda t: len(polls(t)) >= seen + 1, 600, proc)
        seen += 1
        cpu0 = cpu_seconds(proc.pid)
        text = wait_for(errf.name, lambda t: len(polls(t)) >= seen + npolls, 600, proc)
        cpu1 = cpu_seconds(proc.pid)
        res["user_ms_per_poll"] = (cpu1[0] - cpu0[0]) * 1000.0 / npolls
        res["sys_ms_per_poll"] = (cpu1[1] - cpu0[1]) * 1000.0 / npolls  # the kernel's: the dump
        res["cpu_ms_per_poll"] = res["user_ms_per_poll"] + res["sys_ms_per_poll"]
        st = proc_status(proc.pid)
        res["rss_kb"], res["hwm_kb"] = st["VmRSS"], st["VmHWM"]
        res["bcc_mapped"] = mapped(proc.pid)
        ps = polls(text)[seen:]
        res["polls"] = ps
        res["matched"] = ps[-1]["matched"]
        res["poll_ms_median"] = statistics.median(p["ms"] for p in ps)
        res["us_per_socket"] = res["poll_ms_median"] * 1000.0 / max(1, res["matched"])
        res["cpu_us_per_socket"] = res["cpu_ms_per_poll"] * 1000.0 / max(1, res["matched"])
        res["probe_line"] = next((ln for ln in text.splitlines() if "BPF probe on" in ln), "")
        if record:
            record_dump(ns, pins, record)
    finally:
        common.stop_tracker(proc, timeout=60)
        errf.close()
        os.unlink(errf.name)
        subprocess.run(argv[:3] + ["track", "--cleanup", "--pin-dir", pins], env=env,
                       cwd=tree or common.ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        common.remove_pin_dir(pins)
    return res


def summary(machine: Dict, rows: List[Dict]) -> str:
    out = ["Machine: %s, Linux %s, %s, Python %s; %s; load %s" % (
        machine["cpus"], machine["kernel"], machine["memory"], machine["python"],
        machine["date"], machine["load"]), "",
        "| sockets | tree | RSS after start-up | RSS after polls | peak (VmHWM) | bcc/LLVM mapped "
        "| poll wall (median) | per matched socket | poll CPU (mean: user + sys) "
        "| CPU per matched socket |",
        "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append("| %d | %s | %.1f MB | %.1f MB | %.1f MB | %s | %.0f ms | %.2f µs "
                   "| %.0f ms (%.0f + %.0f) | %.2f µs |" % (
                       r["sockets"], r["label"], r["rss_start_kb"] / 1024.0, r["rss_kb"] / 1024.0,
                       r["hwm_kb"] / 1024.0, "yes" if r["bcc_mapped"] else "no",
                       r["poll_ms_median"], r["us_per_socket"], r["cpu_ms_per_poll"],
                       r["user_ms_per_poll"], r["sys_ms_per_poll"], r["cpu_us_per_socket"]))
    return "\n".join(out)


def replay_summary(replays: List[Dict]) -> str:
    """The replayed polls: each tree's best CPU time per scan, per matched socket."""
    out = ["Replayed poll (replay_poll.py: one recorded dump, the Python side alone; CPU, "
           "best of 7 scans, each run):", "",
           "| sockets | tree | CPU per scan (runs) | per matched socket (best) |",
           "|---:|---|---|---:|"]
    keys = []
    for r in replays:
        if (r["sockets"], r["label"]) not in keys:
            keys.append((r["sockets"], r["label"]))
    for size, label in keys:
        mine = [r for r in replays if (r["sockets"], r["label"]) == (size, label)]
        best = min(r["cpu_ms_min"] for r in mine)
        out.append("| %d | %s | %s ms | %.2f µs |" % (
            size, label, " / ".join("%.0f" % r["cpu_ms_min"] for r in mine),
            best * 1000.0 / max(1, mine[0]["matched"])))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="sockets, comma list (even)")
    ap.add_argument("--before", help="a tcpidle tree to compare with (PYTHONPATH)")
    ap.add_argument("--polls", type=int, default=4, help="polls measured after the traffic")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of each tree per size, in alternating order (ABBA...)")
    ap.add_argument("--replay", action="store_true",
                    help="also record one dump per size and replay it through each tree's "
                         "engine (replay_poll.py): the poll's Python CPU alone")
    ap.add_argument("--json", dest="json_out", help="raw results here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench: needs root")
    common.bench_signals()
    for name in common.reap_stale():
        print("removed stale namespace %s" % name, file=sys.stderr)
    sizes = sorted(int(x) for x in args.sizes.split(","))
    rows = []
    replays: List[Dict] = []
    machine = common.machine()
    for size in sizes:
        nworkers = common.Farm.workers_for(int(size // 2 * 1.05))
        with common.BenchNamespace("trk", workers=nworkers + 1) as ns, \
                common.Farm(ns, nworkers) as farm:
            farm.open("trk", PORT, size // 2)
            trees = [("after", None)] + ([("before", args.before)] if args.before else [])
            # ABBA...: with --rounds 2, after, before, before, after
            order = [t for i in range(args.rounds) for t in (trees if i % 2 == 0 else trees[::-1])]
            dump = None
            if args.replay:
                dump = os.path.join(tempfile.mkdtemp(prefix="tibench-replay-"), "dump.pickle")
            for i, (label, tree) in enumerate(order):
                r = run_tracker(ns, farm, tree, args.polls, label, record=dump if i == 0 else None)
                r["sockets"] = size
                rows.append(r)
                print("%d sockets, %s: RSS %.1f MB (start %.1f, peak %.1f), bcc mapped: %s, "
                      "poll %.0f ms, %.2f us/socket, CPU %.0f ms a poll, %.2f us/socket "
                      "(%d matched)" % (
                          size, label, r["rss_kb"] / 1024, r["rss_start_kb"] / 1024,
                          r["hwm_kb"] / 1024, r["bcc_mapped"] or "no", r["poll_ms_median"],
                          r["us_per_socket"], r["cpu_ms_per_poll"], r["cpu_us_per_socket"],
                          r["matched"]), file=sys.stderr)
            if dump:
                try:
                    for label, tree in order * 2:  # ABBA..., twice over
                        got = replay(tree, dump)
                        got.update(label=label, sockets=size)
                        replays.append(got)
                        print("%d sockets, %s: replayed poll %.1f ms CPU (min), %.2f us/socket"
                              % (size, label, got["cpu_ms_min"],
                                 got["cpu_ms_min"] * 1000.0 / max(1, got["matched"])),
                              file=sys.stderr)
                finally:
                    os.unlink(dump)
                    os.rmdir(os.path.dirname(dump))
    text = summary(machine, rows)
    if replays:
        text += "\n\n" + replay_summary(replays)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine, "rows": rows, "replays": replays}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
