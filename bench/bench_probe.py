#!/usr/bin/env python3
"""Benchmark the BPF probe: its cost on traffic, its start-up, its map reads.

Run as root:  .venv/bin/python bench/bench_probe.py [--rounds 5] [--seconds 3]

1. Request/response rate on loopback, in a fresh namespace (tiprobe-bench-PID,
   removed at the end): one Python process holds both ends of a TCP
   connection and exchanges 1-byte requests and responses for --seconds;
   transactions per second and CPU per transaction are measured.  Rounds
   alternate without and with the probe attached (auto hook, default map
   size), --rounds each; the median of the paired ratios is printed (with /
   without; target >= 97%).  Each transaction is two data segments, each one a
   run of the probe; this is the worst case (the least work per segment).
   A third arm runs an empty program on the same tracepoint: the floor that
   the hook itself costs.
2. Compile + attach time (Probe.startup_ms), each in a fresh process: cold
   (empty header cache: the merged header tree is built) and warm.
3. Reading the map: --entries synthetic entries are written into a probe's
   map from user space, then activity() and stats() are timed.

The numbers are printed; nothing is written.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tcpidle.probe import kheaders  # noqa: E402
from tcpidle.probe import VALUE, Probe, libbpf  # noqa: E402

# One process inside the namespace holds both ends of one loopback TCP
# connection and runs request/response rounds on command: "go SECONDS" ->
# "transactions/s CPU-us-per-transaction".  One process and one thread avoid
# cross-process wake-ups, whose scheduling noise on a busy 2-CPU machine
# dwarfs the cost being measured; every segment still goes through the full
# TCP receive path (tcp_rcv_established), where the probe runs.
RR = r"""
import socket, sys, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
for x in (c, s):
    x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
print("ready", flush=True)
for line in sys.stdin:
    seconds = float(line.split()[1])
    n, w0, c0 = 0, time.perf_counter(), time.process_time()
    end = w0 + seconds
    while True:
        for _ in range(500):
            c.send(b"q"); s.recv(1); s.send(b"r"); c.recv(1)
        n += 500
        w = time.perf_counter()
        if w >= end:
            break
    print(n / (w - w0), (time.process_time() - c0) * 1e6 / n, flush=True)
"""


def ip(*args):
    subprocess.run(["ip"] + list(args), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


class EmptyTracepoint:
    """A do-nothing program on tcp:tcp_probe, attached while in a with block.

    Measures the floor: what the tracepoint itself costs (building its
    record, running any BPF program), which no probe on this hook can avoid.
    The only bcc use outside tcpidle.probe, and only for this comparison.
    """

    def __init__(self, cache_dir):
        from bcc import BPF

        tree = kheaders.find_headers(cache_dir=cache_dir)
        if tree.env:
            os.environ["BCC_KERNEL_SOURCE"] = tree.env
        self.bpf = BPF(text="int do_nothing(struct tracepoint__tcp__tcp_probe *args) { return 0; }")
        self.bpf.load_func(b"do_nothing", BPF.TRACEPOINT)

    def __enter__(self):
        self.bpf.attach_tracepoint(tp=b"tcp:tcp_probe", fn_name=b"do_nothing")

    def __exit__(self, *exc):
        self.bpf.detach_tracepoint(tp=b"tcp:tcp_probe")

    def close(self):
        self.bpf.cleanup()


def rr_round(worker, seconds):
    """(transactions/s, CPU us per transaction) of one round."""
    worker.stdin.write("go %f\n" % seconds)
    worker.stdin.flush()
    rate, cpu = worker.stdout.readline().split()
    return float(rate), float(cpu)


def bench_rr(rounds, seconds, cache_dir):
    ns = "tiprobe-bench-%d" % os.getpid()
    ip("netns", "add", ns)
    worker = None
    try:
        ip("-n", ns, "link", "set", "lo", "up")
        worker = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", RR],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert worker.stdout.readline().strip() == "ready"
        rr_round(worker, 0.5)  # warm-up
        off, on, floor = [], [], []
        hook = None
        empty = EmptyTracepoint(cache_dir)
        try:
            for r in range(rounds):
                off.append(rr_round(worker, seconds))
                p = Probe.attach(cache_dir=cache_dir)
                hook = p.hook
                try:
                    on.append(rr_round(worker, seconds))
                finally:
                    p.close()
                with empty:
                    floor.append(rr_round(worker, seconds))
                print("  round %d: without %.0f/s (%.2f us CPU/tx), with %.0f/s (%.2f us CPU/tx),"
                      " empty program %.0f/s" % (r + 1, off[-1][0], off[-1][1], on[-1][0],
                                                 on[-1][1], floor[-1][0]))
        finally:
            empty.close()
        # Each "with" round is compared with the "without" round just before
        # it (paired), which cancels slow drifts of the machine's load; the
        # median of the pairs is the result.
        rate = statistics.median(b[0] / a[0] for a, b in zip(off, on))
        extra = statistics.median(b[1] - a[1] for a, b in zip(off, on))
        print("request/response: without probe %.0f/s, with probe (%s) %.0f/s (medians)"
              % (statistics.median(x[0] for x in off), hook,
                 statistics.median(x[0] for x in on)))
        print("  rate with/without, median of paired rounds: %.1f%% (target >= 97%%)"
              % (100.0 * rate))
        print("  CPU per transaction (2 segments): +%.2f us with the probe (median of pairs)"
              % extra)
        print("  an empty program on tcp:tcp_probe (the hook's own cost): %.1f%%"
              % (100.0 * statistics.median(b[0] / a[0] for a, b in zip(off, floor))))
    finally:
        if worker:
            worker.kill()
            worker.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


STARTUP = r"""
import sys
from tcpidle.probe import Probe
p = Probe.attach(cache_dir=sys.argv[1])
print(p.startup_ms, p.hook)
p.close()
"""


def bench_startup(runs):
    cold, warm = [], []
    for _ in range(runs):
        d = tempfile.mkdtemp(prefix="tiprobe-bench-cache-")
        try:
            for bucket in (cold, warm):
                out = subprocess.run([sys.executable, "-c", STARTUP, d], check=True,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
                bucket.append(float(out.stdout.split()[0]))
        finally:
            shutil.rmtree(d, ignore_errors=True)
    print("compile+attach: cold cache median %.0f ms (min %.0f), warm median %.0f ms (min %.0f)"
          % (statistics.median(cold), min(cold), statistics.median(warm), min(warm)))


def bench_read(entries, cache_dir):
    p = Probe.attach(map_size=entries, cache_dir=cache_dir)
    try:
        lib = libbpf()
        lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_uint64]
        lib.bpf_map_update_elem.restype = ctypes.c_int
        key = ctypes.c_uint64()
        val = ctypes.create_string_buffer(VALUE.size)
        base = 1 << 62  # far from real cookies
        t0 = time.monotonic()
        filled = 0
        for i in range(entries):
            key.value = base + i
            val.raw = VALUE.pack(i + 1, i, 2, 1, 100)
            if lib.bpf_map_update_elem(p.reader.activity_fd, ctypes.byref(key), val, 0) == 0:
                filled += 1
        t_fill = time.monotonic() - t0
        t0 = time.monotonic()
        acts = p.activity()
        t_act = time.monotonic() - t0
        t0 = time.monotonic()
        st = p.stats()
        t_stats = time.monotonic() - t0
        # An LRU map evicts a little before it is full (per-CPU free lists),
        # so slightly fewer than `filled` entries remain.
        print("map read: %d updates in %.2f s, %d entries remain: activity() %.0f ms, "
              "stats() %.0f ms" % (filled, t_fill, len(acts), t_act * 1000, t_stats * 1000))
        assert st["entries"] == len(acts)
    finally:
        p.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--startup-runs", type=int, default=3)
    ap.add_argument("--entries", type=int, default=100000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    cache = tempfile.mkdtemp(prefix="tiprobe-bench-cache-")
    try:
        bench_rr(args.rounds, args.seconds, cache)
        bench_startup(args.startup_runs)
        bench_read(args.entries, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
