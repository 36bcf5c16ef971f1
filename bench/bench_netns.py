#!/usr/bin/env python3
"""Enumeration across many network namespaces: tcpidle against ss in each.

Containers put each workload in its own namespace.  This builds NS
namespaces (default 10) of C connections each (default 2,000; both ends in
the namespace, so 2*C established sockets), then times, alternately:

* tcpidle: one `tcpidle audit --json --netns N1 --netns N2 ...` from the
  host, which enters each namespace to open its netlink socket;
* ss: `ss -N NAME -tn` run once per namespace, the times added up -- what
  a user without tcpidle runs; and `ss -N NAME -tni`, which also reads
  tcp_info, the data tcpidle needs for idle times (for context).

Each run is checked: every namespace's sockets are listed, with the right
namespace label.  Median of --runs; the target is tcpidle <= 2x ss.
Run as root; everything it creates is removed, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack

from common import BenchNamespace, Farm, bench_signals, reap_stale, run_timed, tcpidle_argv

PORT = 4100


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--namespaces", type=int, default=10)
    ap.add_argument("--connections", type=int, default=2000, help="per namespace")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_netns.py needs root (network namespaces)")
    bench_signals()
    reap_stale()
    with ExitStack() as stack:
        spaces = [stack.enter_context(BenchNamespace("netns%d" % i, workers=2))
                  for i in range(args.namespaces)]
        for ns in spaces:
            farm = stack.enter_context(Farm(ns, 1))
            farm.open("conns", PORT, args.connections)
        want = 2 * args.connections
        print("%d namespaces x %d connections (%d sockets each) ready" % (
            len(spaces), args.connections, want), file=sys.stderr)

        tool = tcpidle_argv() + ["audit", "--json"]
        for ns in spaces:
            tool += ["--netns", ns.name]
        times = {"tcpidle": [], "ss": [], "ss -i": []}
        rss = {"tcpidle": [], "ss": [], "ss -i": []}
        for run in range(args.runs + 1):  # the first is a warm-up
            order = ("tcpidle", "ss", "ss -i") if run % 2 == 0 else ("ss -i", "ss", "tcpidle")
            for which in order:
                if which == "tcpidle":
                    wall, maxrss = _time_tcpidle(tool, spaces, want)
                else:
                    wall, maxrss = _time_ss(spaces, want, "-tnHi" if which == "ss -i" else "-tnH")
                if run:
                    times[which].append(wall)
                    rss[which].append(maxrss)
        t, s = statistics.median(times["tcpidle"]), statistics.median(times["ss"])
        si = statistics.median(times["ss -i"])
        ratio = t / s
        print("### Enumeration across %d namespaces of %d connections each\n" % (
            len(spaces), args.connections))
        print("| tool | command | ms (median of %d) | peak MB |" % args.runs)
        print("|---|---|---:|---:|")
        print("| tcpidle | `tcpidle audit --json --netns N1 ... --netns N%d` | %.0f | %.1f |" % (
            len(spaces), t * 1000, max(rss["tcpidle"]) / 1024))
        print("| ss | `ss -N NAME -tn`, once per namespace, summed | %.0f | %.1f |" % (
            s * 1000, max(rss["ss"]) / 1024))
        print("| ss | `ss -N NAME -tni` (reads tcp_info too), summed | %.0f | %.1f |" % (
            si * 1000, max(rss["ss -i"]) / 1024))
        print("\nRatio tcpidle / `ss -tn`: **%.2f** (target <= 2: %s); tcpidle / `ss -tni`: %.2f. "
              "Every run listed all %d sockets of every namespace, labelled with its name." % (
                  ratio, "met" if ratio <= 2 else "**missed**", t / si, want))
        return 0 if ratio <= 2 else 1


def _time_tcpidle(argv, spaces, want):
    with tempfile.NamedTemporaryFile(prefix="tibench-out-", mode="r") as out:
        r = run_timed(argv, stdout_path=out.name)
        if r["rc"] != 0:
            raise RuntimeError("tcpidle failed: %s" % r["stderr"])
        counts = {}
        for line in out:
            ns = json.loads(line)["netns"]
            counts[ns] = counts.get(ns, 0) + 1
    for ns in spaces:
        if counts.get(ns.name) != want:
            raise RuntimeError("tcpidle listed %s sockets in %s, want %d" % (counts.get(ns.name), ns.name, want))
    return r["wall"], r["maxrss_kb"]


def _time_ss(spaces, want, flags):
    wall, maxrss = 0.0, 0
    for ns in spaces:
        with tempfile.NamedTemporaryFile(prefix="tibench-out-", mode="r") as out:
            r = run_timed(["ss", "-N", ns.name, flags], stdout_path=out.name)
            if r["rc"] != 0:
                raise RuntimeError("ss failed: %s" % r["stderr"])
            got = sum(1 for line in out if line.startswith("ESTAB"))
        if got != want:
            raise RuntimeError("ss listed %d sockets in %s, want %d" % (got, ns.name, want))
        wall += r["wall"]
        maxrss = max(maxrss, r["maxrss_kb"])
    return wall, maxrss


if __name__ == "__main__":
    sys.exit(main())
