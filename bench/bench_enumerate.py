#!/usr/bin/env python3
"""Benchmark the tcpidle.diag module (the library, no CLI) against ss: enumerate and destroy.

Run as root:  .venv/bin/python bench/bench_enumerate.py [--connections 20000] [--kill 10000]

This isolates the netlink layer from everything the `tcpidle` command adds
(interpreter start-up, owners, the idle decision, JSON); bench_cli.py
measures the command itself.  The connection farm is bench/common.py's.

1. In a fresh namespace (tibench-PID-diag, removed at the end) worker
   processes open --connections established loopback connections (half IPv4,
   half IPv6; each is two sockets), spread so no worker passes the 20,000
   open-file limit.
2. Enumerate: time DiagSocket.dump_sockets() (AF_INET + AF_INET6, decoded to
   Socket records) in this process against `ss -tni` started inside the
   namespace (output to /dev/null), alternately, --runs times; print the
   medians and the ratio.  ss is timed from spawn to exit.  Then the
   decoder alone: one answer recorded once (DiagSocket.dump_raw, both
   families) decoded by diag.decode_dump() --runs x 3 times, no kernel in
   the figure (the steadiest number on a shared machine).
3. Destroy: each run opens --kill fresh connections to a dedicated port, then
   either dumps them (kernel bytecode dport == port, compiled by
   tcpidle.selectors) and destroys them with DiagSocket.destroy(), or runs
   `ss -K dport = :port`; alternately.  After each run it checks that
   exactly the intended sockets are gone: every client cookie the workers
   reported is absent, every bystander socket (the connections of step 1,
   listeners) is still there.

The numbers are printed; nothing is written.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402
from tcpidle import diag, selectors  # noqa: E402
from tcpidle.model import PortSet, Selector, TcpState  # noqa: E402

FAMILIES = [socket.AF_INET, socket.AF_INET6]
BASE_PORT = 2000
KILL_PORT = 3000
ESTABLISHED = 1 << TcpState.ESTABLISHED
# ss's default state filter ("connected"): all but LISTEN, CLOSE, TIME_WAIT, SYN_RECV.
SS_CONN = 0xFFF & ~((1 << TcpState.LISTEN) | (1 << TcpState.CLOSE) | (1 << TcpState.TIME_WAIT)
                    | (1 << TcpState.SYN_RECV) | 1 | (1 << TcpState.NEW_SYN_RECV))


def fmt(xs):
    return "/".join("%.0f" % (x * 1e3) for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=20000)
    ap.add_argument("--kill", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-kill", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root")
    common.bench_signals()
    common.reap_stale()
    nworkers = common.Farm.workers_for(args.connections + (0 if args.skip_kill else args.kill))
    with common.BenchNamespace("diag", workers=nworkers + 1) as ns, common.Farm(ns, nworkers) as farm:
        t0 = time.perf_counter()
        farm.open("base", BASE_PORT, args.connections)
        m = common.machine()
        print("Linux %s, Python %s, iproute2 %s" % (m["kernel"], m["python"], m["iproute2"]))
        print("opened %d connections (%d sockets) in %d workers in %.1f s"
              % (args.connections, 2 * args.connections, nworkers, time.perf_counter() - t0))
        with diag.DiagSocket(netns_fd=ns.fd) as ds:
            enumerate_bench(ds, farm, args)
            if not args.skip_kill:
                destroy_bench(ds, farm, args)


def enumerate_bench(ds, farm, args) -> None:
    ours, theirs = [], []
    n_ours = None
    ss_argv = ["ss", "-tni"]
    # Warm-up, both sides (page cache, slab, first-use costs).
    ds.dump_sockets(FAMILIES, SS_CONN)
    farm.timer.run(ss_argv)
    for _ in range(args.runs):
        t0 = time.perf_counter()
        socks = ds.dump_sockets(FAMILIES, SS_CONN)
        ours.append(time.perf_counter() - t0)
        n_ours = len(socks)
        del socks
        theirs.append(farm.timer.run(ss_argv)["wall"])
    mo, mt = statistics.median(ours), statistics.median(theirs)
    print("enumerate %d sockets: tcpidle.diag dump+decode %.1f ms, ss -tni %.1f ms, "
          "ratio %.2f (median of %d; ours %s; ss %s)"
          % (n_ours, mo * 1e3, mt * 1e3, mo / mt, args.runs, fmt(ours), fmt(theirs)))
    if n_ours != 2 * args.connections:
        print("  WARNING: expected %d sockets" % (2 * args.connections))
    raw = ds.dump_raw(diag.AF_UNSPEC, SS_CONN)
    diag.decode_dump(raw)  # warm-up
    dec = []
    for _ in range(3 * args.runs):
        t0 = time.perf_counter()
        n_dec = len(diag.decode_dump(raw))
        dec.append(time.perf_counter() - t0)
    md = statistics.median(dec)
    print("decode %d sockets from one recorded answer (%d bytes): %.1f ms, %.2f us a socket "
          "(median of %d; %s)" % (n_dec, len(raw), md * 1e3, md / max(1, n_dec) * 1e6,
                                  len(dec), fmt(dec)))


def destroy_bench(ds, farm, args) -> None:
    bystanders = {s.cookie for s in ds.dump_sockets(FAMILIES, 0xFFFFFFFF)}
    ours, ours_destroy_only, theirs, ss_missed = [], [], [], []
    for run in range(2 * args.runs):
        mine = run % 2 == 0
        port = KILL_PORT + run
        victims = set(farm.open("kill%d" % run, port, args.kill).client)
        assert len(victims) == args.kill
        try:
            if mine:
                bc = selectors.compile_bytecode(Selector(dports=PortSet(((port, port),))))
                t0 = time.perf_counter()
                socks = ds.dump_sockets(FAMILIES, ESTABLISHED, bc)
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
                argv = ["ss", "-K", "-tn", "state", "established", "dport", "=", ":%d" % port]
                theirs.append(farm.timer.run(argv)["wall"])
            after = {s.cookie for s in ds.dump_sockets(FAMILIES, 0xFFFFFFFF)}
            left = victims & after
            if bystanders - after:
                raise SystemExit("run %d: %d bystanders were destroyed" % (run, len(bystanders - after)))
            if mine and left:
                raise SystemExit("run %d: %d victims survived" % (run, len(left)))
            if not mine:
                ss_missed.append(len(left))
        finally:
            farm.close("kill%d" % run)
    mo, md, mt = (statistics.median(x) for x in (ours, ours_destroy_only, theirs))
    print("destroy %d sockets: tcpidle.diag dump+destroy %.1f ms (destroy alone %.1f ms, %.1f us each), "
          "ss -K %.1f ms, ratio %.2f (median of %d; ours %s; ss %s)"
          % (args.kill, mo * 1e3, md * 1e3, md / args.kill * 1e6, mt * 1e3, mo / mt, args.runs,
             fmt(ours), fmt(theirs)))
    print("  every run of ours destroyed exactly its %d victims and no bystander; "
          "ss -K left %s victims alive per run" % (args.kill, ss_missed))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; namespace and workers removed")
