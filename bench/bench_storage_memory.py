#!/usr/bin/env python3
"""Kernel memory per socket of the probe's per-socket storage (tp_btf + sk_storage).

The storage lives in the kernel: a `bpf_local_storage` on each socket that
has one (its cache of map pointers) and one `bpf_local_storage_elem` per map
holding the value.  It is allocated by the probe on a socket's first
received segment, only for sockets inside the selection set before load
(issue #14 item 3), and freed with the socket.  Neither the map's memlock
(`map_mem_usage` of a local-storage map counts its buckets, not its
elements) nor the memory cgroup (charged to the map creator's cgroup, not
ours to subdivide here) says what it costs per socket, so this measures it
the direct way:

* the probe is attached ONCE, selecting one server port (SELECTED);
* rounds of two groups of N loopback connections in a namespace, one to the
  selected port and one to another port (the control: same sockets, same
  traffic, no storage), each group given one byte each way (a segment in
  ESTABLISHED on both ends: the probe's first look at each socket);
* before and after each group's byte, the active objects of every slab cache
  (/proc/slabinfo);
* the caches where the selected group grew by about one object per storage
  created (the probe's own insert counter) more than the control are where
  the storage went: per socket = sum of (extra objects per storage x object
  size) -- what the allocator hands out, without the slabs' page overhead.
  Other slab traffic of the machine (a VM beside us) lands in other caches
  or in both groups, so it does not count.

Also printed: the struct sizes from the kernel's BTF (what the allocator is
asked for), for comparison with what it takes (kmalloc rounds up).

    .venv/bin/python bench/bench_storage_memory.py [--connections N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import common

from tcpidle.model import PortSet, Selector
from tcpidle.probe import Probe, ProbeUnavailable

SELECTED = 7411
CONTROL = 7412


def slabs() -> dict:
    """cache name -> (active objects, object size), from /proc/slabinfo."""
    out = {}
    with open("/proc/slabinfo") as f:
        for line in f:
            if line.startswith(("slabinfo", "#")):
                continue
            parts = line.split()
            out[parts[0]] = (int(parts[1]), int(parts[3]))
    return out


def growth(before: dict, after: dict) -> dict:
    """cache name -> objects added between two snapshots."""
    return {name: after[name][0] - before.get(name, (0, 0))[0] for name in after}


def btf_sizes() -> dict:
    """Sizes of the local-storage structs in the running kernel's BTF (None if unknown)."""
    try:
        from tcpidle.probe.btf import BTF
        b = BTF.load()
        return {n: b.sizeof(n) for n in ("bpf_local_storage", "bpf_local_storage_elem")}
    except Exception as e:  # noqa: BLE001 - informative only
        return {"error": str(e)}


def settle() -> None:
    # RCU frees (sockets of the last round, their storage) and bpf_mem_alloc's
    # per-CPU refills happen after the call that caused them: wait for quiet.
    time.sleep(1.5)


def grow(farm, group: str, port: int, n: int, probe) -> tuple:
    """Open `n` connections to `port`, then a byte each way on every open connection
    (the farm pings all its groups); (objects added per slab cache, storages
    created) by that byte."""
    farm.open(group, port, n, families=(4,))
    settle()
    before, inserts = slabs(), probe.counters()["inserts"]
    farm.ping()
    settle()
    after = slabs()
    return growth(before, after), probe.counters()["inserts"] - inserts, after


def storage_caches(ctl: dict, sel: dict, storages: int) -> dict:
    """The caches the storage went to: cache -> objects per socket, where the
    selected group grew by at least half an object per storage more than the
    control (the rest of the machine's slab traffic, a VM or a test suite
    beside us, shows in other caches or in both groups alike)."""
    out = {}
    for name, added in sel.items():
        extra = added - ctl.get(name, 0)
        if extra >= storages / 2:
            out[name] = extra / storages
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=5000, help="per group (default 5000)")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    if os.geteuid() != 0:
        print("bench_storage_memory: run me as root", file=sys.stderr)
        return 2
    common.bench_signals()
    common.reap_stale()
    selector = Selector(dports=PortSet(((SELECTED, SELECTED),)))
    try:
        probe = Probe.attach(map_size=1024, sk_storage=True, selector=selector)
    except ProbeUnavailable as e:
        print("bench_storage_memory: no probe: %s" % e, file=sys.stderr)
        return 1
    try:
        if probe.storage != "sk_storage":
            print("bench_storage_memory: no per-socket storage here (%s)" % probe.describe(),
                  file=sys.stderr)
            return 1
        print("machine: %s" % common.machine())
        print("probe: %s" % probe.describe())
        print("BTF struct sizes: %s" % btf_sizes())
        nworkers = common.Farm.workers_for(2 * a.connections)
        per_socket = []
        with common.BenchNamespace("skmem", workers=nworkers + 1) as ns, \
                common.Farm(ns, nworkers) as farm:
            for r in range(a.rounds):
                ctl, ctl_storages, _ = grow(farm, "ctl%d" % r, CONTROL + 2 * r, a.connections, probe)
                sel, storages, sizes = grow(farm, "sel%d" % r, SELECTED, a.connections, probe)
                if ctl_storages:
                    print("round %d: the control group created %d storages (selection broken?)"
                          % (r, ctl_storages))
                if storages <= 0:
                    print("round %d: no storage created" % r)
                    continue
                caches = storage_caches(ctl, sel, storages)
                b = sum(per * sizes[name][1] for name, per in caches.items())
                per_socket.append(b)
                print("round %d: %d storages: %s: %.0f B per socket" % (
                    r, storages, ", ".join("%s (%d B) x %.2f" % (name, sizes[name][1], per)
                                           for name, per in sorted(caches.items())) or "no cache",
                    b))
                farm.close("ctl%d" % r)
                farm.close("sel%d" % r)
                settle()
        if per_socket:
            print("per socket with storage: median %.0f B (rounds: %s)" % (
                statistics.median(per_socket), ", ".join("%.0f" % x for x in per_socket)))
    finally:
        probe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
