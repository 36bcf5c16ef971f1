#!/usr/bin/env python3
"""The in-kernel destroy's pass alone, timed inside one process (bench_cli.py's `iter-pass`).

    iter_pass.py PORT IDLE_MS

Does what `tcpidle kill -d PORT -t IDLE_MS --destroy-with bpf` does in the
namespace it runs in, without the command around it: the program is loaded
first (untimed: the compiled-program cache, maps, BPF_PROG_LOAD), then one
iterator pass is timed, split into the read of the iterator (the kernel walks
the sockets, decides each under its lock and destroys the victims: every
`bpf_sock_destroy()` and its `tcp_abort()`, with the RST each sends over
loopback, happens inside these reads) and the decoding of its records.  No
start-up, no outcomes, no rows.  Prints one JSON object on stdout:
{"load_ms", "read_ms", "decode_ms", "pass_ms", "records", "destroyed",
"cpu_user_s", "cpu_sys_s"} (CPU of the pass alone, from os.times()).

This is the floor of `--destroy-with bpf` on the machine: the kernel's own
time for the destroys, which no change to tcpidle's user space can lower.
"""

from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tcpidle import selectors  # noqa: E402
from tcpidle.model import Policy, PortSet, Selector  # noqa: E402
from tcpidle.probe import iterdestroy  # noqa: E402


def main(argv) -> int:
    port, idle_ms = int(argv[1]), float(argv[2])
    selector = Selector(dports=PortSet(((port, port),)))
    policy = Policy(idle_time_ms=idle_ms)
    spent = {"read": 0.0, "decode": 0.0}
    read, decode = os.read, iterdestroy.decode_records

    def timed_read(fd, n):
        t = time.perf_counter()
        try:
            return read(fd, n)
        finally:
            spent["read"] += time.perf_counter() - t

    def timed_decode(data):
        t = time.perf_counter()
        try:
            return decode(data)
        finally:
            spent["decode"] += time.perf_counter() - t

    t0 = time.perf_counter()
    with iterdestroy.IterDestroy(selector, policy, selectors.states_mask(selector.states)) as prog:
        load = time.perf_counter() - t0
        iterdestroy.os.read, iterdestroy.decode_records = timed_read, timed_decode
        try:
            cpu0 = os.times()
            t1 = time.perf_counter()
            result = prog.kill(None)
            elapsed = time.perf_counter() - t1
            cpu1 = os.times()
        finally:
            iterdestroy.os.read, iterdestroy.decode_records = read, decode
    print(json.dumps({
        "load_ms": load * 1e3, "read_ms": spent["read"] * 1e3, "decode_ms": spent["decode"] * 1e3,
        "pass_ms": elapsed * 1e3, "records": len(result.records),
        "destroyed": sum(1 for r in result.records if r.outcome == "destroyed"),
        "cpu_user_s": cpu1.user - cpu0.user, "cpu_sys_s": cpu1.system - cpu0.system}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
