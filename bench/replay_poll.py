#!/usr/bin/env python3
"""The Python side of one tracker poll, alone: a recorded dump replayed through Engine.scan.

    PYTHONPATH=TREE python bench/replay_poll.py DUMP.pickle [--runs 7]

DUMP.pickle is what `bench_tracker.py --replay` records from a running
tracker's namespace (the raw netlink chunks of one dump with the probe's
storage inline, and the storage map's id).  The chunks are handed to TREE's
DiagSocket as a netlink socket would (their sequence numbers rewritten to
the request's), and TREE's Engine scans them as `track --all --dry-run -t
1d` does: dump, decode, match, decide, count.  Nothing reaches the kernel,
so the CPU time (process_time) is the poll's Python cost per socket, free
of the kernel's share and of the machine's load swinging the wall time.
Prints one JSON line: sockets, matched, CPU ms per scan (min, median).
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import statistics
import struct
import time

_HDR = struct.Struct("=IHHII")


class ReplaySocket:
    """A netlink socket whose every dump answer is the recorded one."""

    def __init__(self, chunks):
        self.chunks = chunks
        self.queue = []

    def setsockopt(self, *args):
        pass

    def getsockopt(self, *args):
        return 1 << 20

    def bind(self, addr):
        pass

    def close(self):
        pass

    def send(self, data) -> int:
        seq = _HDR.unpack_from(data, 0)[3]
        self.queue = []
        for chunk in self.chunks:
            b = bytearray(chunk)
            off = 0
            while off + 16 <= len(b):
                n = _HDR.unpack_from(b, off)[0]
                struct.pack_into("=I", b, off + 8, seq)
                off += max(16, (n + 3) & ~3)
            self.queue.append(b)
        return len(data)

    def recv_into(self, buf, nbytes=0, flags=0) -> int:
        chunk = self.queue.pop(0)
        buf[:len(chunk)] = chunk
        return len(chunk)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    from tcpidle import diag
    from tcpidle.engine import Engine
    from tcpidle.evidence import Evidence, InlineReader
    from tcpidle.model import Policy, Selector, TcpState
    from tcpidle.scope import Scope

    with open(args.dump, "rb") as f:
        rec = pickle.load(f)

    def open_diag(fd, label):
        return diag.DiagSocket(open_socket=lambda fd, rcvbuf, sndbuf: ReplaySocket(rec["chunks"]))

    scope = Scope(Selector(states=frozenset(TcpState)), open_diag=open_diag)  # --all
    evidence = Evidence(InlineReader(99, rec["map_id"]))  # any fd: the request is not read
    evidence.bind_scope(scope)
    engine = Engine(scope, Policy(idle_time_ms=86_400_000.0, dry_run=True), evidence)

    def scan():
        try:
            return engine.scan(every=False)  # the kill pass's scan
        except TypeError:  # a tree before the streamed scan: its one scan
            return engine.scan()

    gc.disable()  # as the CLI does (cli.main); collected between scans, as the tracker does
    first = scan()
    times = []
    for _ in range(args.runs):
        gc.collect()
        t = time.process_time()
        scan()
        times.append(time.process_time() - t)
    matched = first.matched if hasattr(first, "matched") else len(first.verdicts)
    print(json.dumps({"sockets": first.seen, "matched": matched,
                      "cpu_ms_min": min(times) * 1000.0,
                      "cpu_ms_median": statistics.median(times) * 1000.0}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
