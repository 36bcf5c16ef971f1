#!/usr/bin/env python3
"""The BPF probe's cost on standard loopback benchmarks: sockperf and iperf3.

bench_probe.py measures the worst case (one Python process holding both
ends).  This measures what users run: two processes on loopback in a
namespace.  A ~3% effect is smaller than the round-to-round noise of a shared
machine (separate 3-second runs vary by ~9%), so the probe is compared with
itself *alternately in one run*:

* The probe is compiled and attached ONCE (Probe.attach; --hook, default
  auto).  Between measurement windows only its receive hook is detached and
  re-attached (Probe.suspend/resume): no clang, no new connection, no warm-up.
* Request/response: ONE long `sockperf ping-pong --tcp` connection (Debian
  package sockperf) per placement, measured in windows of --window seconds
  (default 0.4), probe off/on in ABBA order (off,on | on,off | off,on ...),
  --windows pairs (default 40).  The rate of a window is the namespace's TCP
  InSegs counter (/proc/<server>/net/snmp) over the window's monotonic time;
  each transaction is one data segment each way, which is checked against
  sockperf's own message count at the end.  Each "on" window is paired with
  the adjacent "off" window of its ABBA group: a slow drift of the machine
  raises the ratio of one order as much as it lowers the other, and the
  median of the per-pair ratios is the result (with their interquartile
  range, so one can see how well it is resolved).
* Two placements, each with its own server and client: "same CPU" (server
  and client `taskset -c` on one CPU: the fastest transactions, so the
  probe's fixed cost per segment is the largest share -- the worst case) and
  "unpinned" (the scheduler's choice).  This controller pins itself to a CPU
  sockperf does not use (same CPU), or to the last CPU (unpinned).
* Floor: the same off/on alternation with an empty BPF program (two
  instructions, loaded directly: no C) on the probe's hook instead of the
  probe, same-CPU placement: the cost of the kernel's hook dispatch alone
  (for the classic tracepoint this includes building its record), i.e.
  what no change to the program can remove.  Only for the tracepoint and
  raw tracepoint hooks.
* Kernel BPF statistics (kernel.bpf_stats_enabled): run count and run time
  of the probe's receive program, in a short extra window per placement
  after the alternation -- the statistics cost time on every run themselves,
  so they are off during the measured windows; the sysctl is restored.
* Bulk: `iperf3` one stream (Debian package iperf3), --rounds pairs of
  --seconds, probe off/on in ABBA order, median ratio.

Target: request/response with the probe >= 97% of the rate without it.
Markdown on stdout, progress on stderr; exit status 0 unless something broke
(the target is reported in the text).  Run as root; the namespace and all
processes are removed at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from common import bench_signals, reap_stale  # noqa: E402
from tcpidle.probe import Probe, ProbeUnavailable  # noqa: E402

NS = "tibench-%d-tools" % os.getpid()
SP_PORT, IPERF_PORT = 11111, 5201
SETTLE = 0.02  # after attaching/detaching, before a window starts
STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
PLACEMENTS = {"same": "same CPU", "unpinned": "unpinned"}
ALL_CPUS = sorted(os.sched_getaffinity(0))

# Every process started here, killed in main()'s finally.
PROCS: List[subprocess.Popen] = []


def sh(*argv, **kw):
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, **kw)


def in_ns(*argv):
    return ["ip", "netns", "exec", NS] + list(argv)


def spawn(argv, **kw) -> subprocess.Popen:
    """Popen with all CPUs allowed (not this controller's pinning), remembered for clean-up."""
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, ALL_CPUS)
    try:
        p = subprocess.Popen(argv, **kw)
    finally:
        os.sched_setaffinity(0, mine)
    PROCS.append(p)
    return p


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()


def insegs(pid: int) -> int:
    """TCP InSegs of the namespace process `pid` lives in."""
    with open("/proc/%d/net/snmp" % pid) as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("InSegs")])


def prog_stats() -> dict:
    """{fd: (run_cnt, run_time_ns)} of this process's BPF programs (kernel.bpf_stats_enabled)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            with open("/proc/self/fdinfo/%s" % fd) as f:
                info = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        except OSError:
            continue
        if "prog_type" in info and "run_cnt" in info:
            out[fd] = (int(info["run_cnt"]), int(info["run_time_ns"]))
    return out


def prog_name(fd) -> str:
    """The kernel's name of BPF program `fd` (bpf_prog_info.name, 15 characters at most)."""
    from bcc.libbcc import lib

    buf = ctypes.create_string_buffer(128)  # the head of struct bpf_prog_info
    size = ctypes.c_uint32(len(buf))
    if lib.bpf_obj_get_info_by_fd(int(fd), buf, ctypes.byref(size)) != 0:
        return "?"
    return buf.raw[64:80].split(b"\0", 1)[0].decode(errors="replace") or "?"


def read_sysctl() -> Optional[str]:
    try:
        with open(STATS_SYSCTL) as f:
            return f.read().strip()
    except OSError:
        return None


def write_sysctl(value: str) -> None:
    with open(STATS_SYSCTL, "w") as f:
        f.write(value)


class Floor:
    """An empty BPF program (r0 = 0; exit) on the probe's hook: the dispatch cost alone.

    Loaded from two raw instructions (bpf_prog_load from libbpf, through
    bcc's library), attached with bcc's C helpers; detached by closing the
    attachment.  Only for the hooks that are tracepoints.
    """

    TYPES = {"tracepoint": 5, "raw_tracepoint": 17}  # BPF_PROG_TYPE_*
    INSNS = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])

    @classmethod
    def unavailable(cls, hook: str) -> Optional[str]:
        return None if hook in cls.TYPES else "not measured for the %s hook" % hook

    def __init__(self, hook: str):
        from bcc.libbcc import lib

        self.lib, self.hook, self.link = lib, hook, -1
        load = lib.bpf_prog_load
        load.restype = ctypes.c_int
        load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p,
                         ctypes.c_size_t, ctypes.c_void_p]
        insns = ctypes.create_string_buffer(self.INSNS, len(self.INSNS))
        self.fd = load(self.TYPES[hook], b"tibench_empty", b"GPL", insns, 2, None)
        if self.fd < 0:
            raise RuntimeError("loading the empty BPF program failed: %s" % os.strerror(-self.fd))

    def on(self) -> None:
        if self.link < 0:
            if self.hook == "tracepoint":
                self.link = self.lib.bpf_attach_tracepoint(self.fd, b"tcp", b"tcp_probe")
            else:
                self.link = self.lib.bpf_attach_raw_tracepoint(self.fd, b"tcp_probe")
            if self.link < 0:
                raise RuntimeError("attaching the empty BPF program to %s failed" % self.hook)

    def off(self) -> None:
        if self.link >= 0:
            os.close(self.link)
            self.link = -1

    def close(self) -> None:
        self.off()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- request/response ----------------------------------------------------------------


def wait_for_traffic(pid: int, client: subprocess.Popen, timeout: float = 20.0) -> None:
    """Until InSegs rises by > 1000 in 100 ms (sockperf has a warm-up stage)."""
    deadline = time.monotonic() + timeout
    last = insegs(pid)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = insegs(pid)
        if now - last > 1000:
            return
        if client.poll() is not None:
            raise RuntimeError("sockperf client exited early: %s" % client_output(client)[-500:])
        last = now
    raise RuntimeError("no sockperf traffic after %.0f s" % timeout)


def client_output(client: subprocess.Popen) -> str:
    try:
        out, _ = client.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        return ""
    return out or ""


def check_storage_recording(probe: Probe) -> str:
    """Fail unless the per-socket storage holds both ends of the sockperf connection,
    as an INET_DIAG dump inside the namespace returns them inline."""
    from tcpidle import diag

    probe.resume()
    time.sleep(0.2)
    fd = os.open("/run/netns/%s" % NS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = diag.Storages([probe.storage_fd])
        with diag.DiagSocket(fd, NS) as nl:
            socks = nl.dump_sockets([socket.AF_INET, socket.AF_INET6], 1 << 1, storage=st)
    finally:
        os.close(fd)
    have = [s for s in socks if probe.storage_id in st.stores.get(s.cookie, {})]
    if len(socks) < 2 or len(have) < len(socks):
        raise RuntimeError("the probe (%s + sk_storage) does not record the sockperf "
                           "connection: %d established sockets, %d with storage"
                           % (probe.hook, len(socks), len(have)))
    return "both sockets recorded in their storage (read inline in a dump)"


def check_recording(probe: Probe) -> str:
    """Fail unless the probe records both ends of the sockperf connection.

    Hooks that read the socket's cookie (probe.needs_cookie_priming) see
    only sockets whose cookie the kernel generated already: the `ss -tne`
    dump here (INET_DIAG) generates them, as tcpidle's own dump does.
    Without this the "with probe" windows would measure a probe that records
    nothing and skips out early.
    """
    if probe.storage == "sk_storage":
        return check_storage_recording(probe)
    probe.resume()
    out = subprocess.run(in_ns("ss", "-tne"), capture_output=True, text=True).stdout
    cookies = {int(c, 16) for c in re.findall(r"\bsk:([0-9a-f]+)", out)}
    time.sleep(0.2)
    recorded = probe.activity()
    missing = cookies - set(recorded)
    if len(cookies) < 2 or missing:
        raise RuntimeError("the probe (%s) does not record the sockperf connection: %d socket "
                           "cookies in the namespace, %d of them not in the map (%d entries)"
                           % (probe.hook, len(cookies), len(missing), len(recorded)))
    return ("cookies primed by an INET_DIAG dump; " if probe.needs_cookie_priming else "") + \
        "both sockets recorded"


def alternate(pid: int, client: subprocess.Popen, pairs: int, window: float,
              off: Callable[[], None], on: Callable[[], None], label: str,
              deadline: float) -> List[Tuple[float, float]]:
    """`pairs` (off rate, on rate) pairs in ABBA order: segments/s."""

    def measure(state: Callable[[], None]) -> float:
        state()
        time.sleep(SETTLE)
        if time.monotonic() + window > deadline:
            raise RuntimeError("the sockperf client's time ran out (the warm-up was slow?)")
        t0, s0 = time.monotonic(), insegs(pid)
        time.sleep(window)
        s1, t1 = insegs(pid), time.monotonic()
        if client.poll() is not None or s1 == s0:
            raise RuntimeError("sockperf client stopped: %s" % client_output(client)[-500:])
        return (s1 - s0) / (t1 - t0)

    out = []
    for i in range(pairs):
        if i % 2 == 0:
            a = measure(off)
            b = measure(on)
        else:
            b = measure(on)
            a = measure(off)
        out.append((a, b))
        if (i + 1) % 10 == 0 or i + 1 == pairs:
            recent = out[-10:]
            print("  %s: %d/%d pairs, last %d: median %.0f segments/s off, ratio %.1f%%"
                  % (label, i + 1, pairs, len(recent), statistics.median(x for x, _ in recent),
                     statistics.median(y / x for x, y in recent) * 100), file=sys.stderr)
    return out


def stats_window(probe: Probe, pid: int, seconds: float) -> Optional[Dict]:
    """Run count and time of the receive program over `seconds`, statistics on only here."""
    prev = read_sysctl()
    if prev is None:
        return None
    probe.resume()
    write_sysctl("1")
    try:
        time.sleep(0.05)
        before = prog_stats()
        t0, s0 = time.monotonic(), insegs(pid)
        time.sleep(seconds)
        s1, t1 = insegs(pid), time.monotonic()
        after = prog_stats()
    finally:
        write_sysctl(prev)
    deltas = {fd: (cnt - before.get(fd, (0, 0))[0], ns - before.get(fd, (0, 0))[1])
              for fd, (cnt, ns) in after.items()}
    if not deltas:
        return None
    # The receive program is the one that ran: the destroy hook does not
    # during a steady connection, the floor program is detached.
    fd, (runs, run_ns) = max(deltas.items(), key=lambda kv: kv[1][0])
    if runs <= 0:
        return None
    return {"runs": runs, "run_ns": run_ns, "segments": s1 - s0, "seconds": t1 - t0,
            "name": prog_name(fd)}


def rr_phase(placement: str, probe: Probe, args, floor: Optional[Floor]) -> Dict:
    """One placement: its own sockperf server and client, alternation, floor, statistics."""
    label = PLACEMENTS[placement]
    pin: List[str] = []
    ctl = ALL_CPUS[-1]
    if placement == "same":
        pin = ["taskset", "-c", str(ALL_CPUS[0])]
        ctl = ALL_CPUS[1] if len(ALL_CPUS) > 1 else None
    if ctl is not None:
        os.sched_setaffinity(0, {ctl})
    series_s = args.windows * 2 * (args.window + SETTLE + 0.005)
    floor_s = series_s if floor is not None else 0.0
    stats_s = args.stats_seconds
    client_s = int(math.ceil(2.0 + 0.5 + 0.3 + series_s + floor_s + stats_s + 0.3 + 2.0))

    server = spawn(in_ns(*pin, "sockperf", "server", "-i", "127.0.0.1", "-p", str(SP_PORT), "--tcp"),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = None
    try:
        time.sleep(0.5)
        pid = server.pid  # ip netns exec and taskset exec: the same process
        seg_start = insegs(pid)
        client = spawn(in_ns(*pin, "sockperf", "ping-pong", "-i", "127.0.0.1", "-p", str(SP_PORT),
                             "--tcp", "-t", str(client_s)),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started = time.monotonic()
        deadline = started + client_s - 0.3
        print("%s: sockperf server and client%s for %d s; controller on CPU %s"
              % (label, " on CPU %s" % pin[-1] if pin else " unpinned", client_s,
                 ctl if ctl is not None else "any"), file=sys.stderr)
        wait_for_traffic(pid, client)
        time.sleep(0.5)
        note = check_recording(probe)
        print("  %s: traffic flowing; %s" % (label, note), file=sys.stderr)
        res: Dict = {"label": label, "pin": pin[-1] if pin else None, "check": note}
        res["pairs"] = alternate(pid, client, args.windows, args.window, probe.suspend,
                                 probe.resume, label, deadline)
        if floor is not None:
            probe.suspend()

            res["floor"] = alternate(pid, client, args.windows, args.window, floor.off, floor.on,
                                     label + ", empty program", deadline)
            floor.off()
        res["stats"] = stats_window(probe, pid, stats_s)
        # sockperf prints its count only when its own timer ends the run.
        remaining = started + client_s - time.monotonic()
        print("  %s: waiting %.1f s for sockperf's own count" % (label, max(remaining, 0)),
              file=sys.stderr)
        try:
            out, _ = client.communicate(timeout=max(remaining, 0) + 15)
        except subprocess.TimeoutExpired:
            out = ""
        time.sleep(0.2)  # the connection's FIN segments
        seg_total = insegs(pid) - seg_start
        m = re.search(r"\[Total Run\] RunTime=[\d.]+ sec;.*?SentMessages=(\d+)", out or "")
        res["seg_per_tx"] = seg_total / int(m.group(1)) if m and int(m.group(1)) else None
        return res
    finally:
        if client is not None:
            stop(client)
        stop(server)
        os.sched_setaffinity(0, ALL_CPUS)


# --- bulk ---------------------------------------------------------------------------


def iperf_bps(seconds: float) -> float:
    for attempt in range(3):
        out = subprocess.run(in_ns("iperf3", "-c", "127.0.0.1", "-p", str(IPERF_PORT),
                                   "-t", str(seconds), "-J"),
                             capture_output=True, text=True, timeout=seconds + 30)
        try:
            return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]
        except (ValueError, KeyError):
            time.sleep(0.5)  # the server not listening yet, or busy with the last test
    raise RuntimeError("iperf3 said: %s" % (out.stdout + out.stderr)[-500:])


def bulk_phase(probe: Probe, rounds: int, seconds: float) -> List[Tuple[float, float]]:
    os.sched_setaffinity(0, {ALL_CPUS[-1]})
    server = spawn(in_ns("iperf3", "-s", "-p", str(IPERF_PORT)),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        pairs = []
        for r in range(rounds):
            got = {}
            for which in (("off", "on") if r % 2 == 0 else ("on", "off")):
                (probe.resume if which == "on" else probe.suspend)()
                time.sleep(SETTLE)
                got[which] = iperf_bps(seconds)
            pairs.append((got["off"], got["on"]))
            print("  bulk round %d: %.2f Gbit/s without, %.2f with"
                  % (r + 1, got["off"] / 1e9, got["on"] / 1e9), file=sys.stderr)
        return pairs
    finally:
        stop(server)
        os.sched_setaffinity(0, ALL_CPUS)


# --- report -------------------------------------------------------------------------


def quartiles(xs: List[float]) -> Tuple[float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def pct(x: float) -> str:
    return "%.1f%%" % (x * 100)


def median_se(xs: List[float]) -> float:
    """Standard error of the median, from the IQR (normal approximation)."""
    q1, q3 = quartiles(xs)
    return 1.2533 * (q3 - q1) / 1.349 / math.sqrt(len(xs))


def report(probe: Probe, args, phases: List[Dict], bulk: List[Tuple[float, float]],
           floor_note: Optional[str], stats_prev: Optional[str]) -> None:
    print("### Probe overhead on standard tools (bench/bench_probe_tools.py)\n")
    print("Hook: %s; storage: %s. The probe is attached once; between windows only its receive hook is "
          "detached and re-attached. Request/response: one `sockperf ping-pong --tcp` "
          "connection per placement in a namespace, %d pairs of %g s windows, probe off/on in "
          "ABBA order; rate = the namespace's TCP segments received per second; ratio = median "
          "of the per-pair ratios (each window with the probe against the adjacent one "
          "without), IQR = their interquartile range.\n" % (probe.describe(), probe.storage,
                                                           args.windows,
                                                           args.window))
    unit_tx = all(ph["seg_per_tx"] for ph in phases)
    unit = "tx/s" if unit_tx else "segments/s"
    print("| `sockperf ping-pong --tcp` | without probe | with probe | with / without (± s.e.) | "
          "IQR of pair ratios | target |")
    print("|---|---:|---:|---:|---:|---|")
    for ph in phases:
        off = [a for a, _ in ph["pairs"]]
        on = [b for _, b in ph["pairs"]]
        ratios = [b / a for a, b in ph["pairs"]]
        ratio = statistics.median(ratios)
        q1, q3 = quartiles(ratios)
        div = ph["seg_per_tx"] if unit_tx else 1.0
        ph["tx_rate"] = statistics.median(off) / (ph["seg_per_tx"] or 2.0)
        where = ph["label"] + (" (server and client on CPU %s)" % ph["pin"] if ph["pin"] else "")
        se = median_se(ratios)
        verdict = "met" if ratio >= 0.97 else "**missed**"
        if abs(ratio - 0.97) < 2 * se:
            verdict += " (within 2 s.e.)"
        print("| %s | %.0f %s | %.0f %s | **%s** ±%.1f | %s-%s | >= 97%%: %s |"
              % (where, statistics.median(off) / div, unit, statistics.median(on) / div, unit,
                 pct(ratio), se * 100, pct(q1), pct(q3), verdict))
    for ph in phases:
        if "floor" in ph:
            r = [b / a for a, b in ph["floor"]]
            q1, q3 = quartiles(r)
            probe_ratios = [b / a for a, b in ph["pairs"]]
            probe_loss = 1 - statistics.median(probe_ratios)
            floor_loss = 1 - statistics.median(r)
            # A share only where the probe's loss is resolved at all.
            share = (" = %.0f%% of the probe's loss" % (floor_loss / probe_loss * 100)
                     if probe_loss > 2 * median_se(probe_ratios) else "")
            print("| floor: an empty BPF program on the same hook, %s | | | %s ±%.1f | %s-%s | "
                  "(dispatch alone%s) |" % (ph["label"], pct(statistics.median(r)),
                                            median_se(r) * 100, pct(q1), pct(q3), share))
    if bulk:
        r = [b / a for a, b in bulk]
        print("\n| `iperf3` one stream (bulk) | without probe | with probe | with / without |")
        print("|---|---:|---:|---:|")
        print("| %d pair%s of %g s, ABBA | %.2f Gbit/s | %.2f Gbit/s | **%s** |"
              % (len(bulk), "s" if len(bulk) > 1 else "", args.seconds, statistics.median(a for a, _ in bulk) / 1e9,
                 statistics.median(b for _, b in bulk) / 1e9, pct(statistics.median(r))))
    print()
    notes = []
    for ph in phases:
        off = [a for a, _ in ph["pairs"]]
        q1, q3 = quartiles([x / statistics.median(off) for x in off])
        notes.append("%s %s-%s" % (ph["label"], pct(q1), pct(q3)))
    print("Noise: the windows without the probe spread over %s of their median (IQR), to "
          "compare with the IQR of the pair ratios; s.e. = standard error of the median ratio "
          "(from the IQR)." % ", ".join(notes))
    spt = ["%s %.3f" % (ph["label"], ph["seg_per_tx"]) for ph in phases if ph["seg_per_tx"]]
    if spt:
        print("Segments received per transaction (InSegs over sockperf's own count of "
              "transactions, whole client run): %s, so tx/s = segments/s / that." % ", ".join(spt))
    else:
        print("sockperf's own count was not available: rates are segments/s (one data "
              "segment each way per transaction, so tx/s is about half).")
    if floor_note:
        print("Floor (hook dispatch alone): %s." % floor_note)
    print("Probe checks: %s." % "; ".join("%s: %s" % (ph["label"], ph["check"]) for ph in phases))
    lines = []
    for ph in phases:
        st = ph.get("stats")
        if not st:
            continue
        tx = st["segments"] / (ph["seg_per_tx"] or 2.0)
        ns_run = st["run_ns"] / st["runs"]
        per_tx = st["runs"] / tx
        tx_ns = 1e9 / ph["tx_rate"]
        lines.append("%s: %.0f ns per run, %.2f runs per transaction, so %.2f us of a %.1f us "
                     "transaction: **%.1f%%**" % (ph["label"], ns_run, per_tx,
                                                 ns_run * per_tx / 1000, tx_ns / 1000,
                                                 ns_run * per_tx / tx_ns * 100))
    if lines:
        name = next(ph["stats"]["name"] for ph in phases if ph.get("stats"))
        print("\nKernel BPF statistics (kernel.bpf_stats_enabled, on only in a %g s window after "
              "the alternation; they include the statistics' own clock reads) of the receive "
              "program `%s`:\n" % (args.stats_seconds, name))
        for line in lines:
            print("* " + line)
        print("\nThat is the program's own time as the kernel counts it (an upper bound: it "
              "includes the statistics' clock reads); the hook's dispatch is the floor row, and "
              "the end-to-end ratios above are the whole cost.")
    elif stats_prev is None:
        print("\nKernel BPF statistics: not available (no %s)." % STATS_SYSCTL)
    if stats_prev not in (None, "0"):
        print("\nNote: kernel.bpf_stats_enabled was already %s before this run, so every window "
              "includes the statistics' own cost." % stats_prev)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hook", default="auto", help="BPF hook for Probe.attach (default auto)")
    ap.add_argument("--sk-storage", action="store_true",
                    help="tp_btf records into per-socket storage (as the tracker does on "
                         "Linux 5.11 on) instead of the LRU map"),
    ap.add_argument("--windows", type=int, default=None,
                    help="off/on window pairs per placement (default 40; 12 with --quick)")
    ap.add_argument("--window", type=float, default=0.4, help="seconds per window (default 0.4)")
    ap.add_argument("--placement", default="same,unpinned",
                    help="comma-separated: same (server and client on one CPU), unpinned")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the empty-program (hook dispatch) measurement")
    ap.add_argument("--stats-seconds", type=float, default=None,
                    help="the kernel BPF statistics window (default 2; 1 with --quick)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="iperf3 off/on pairs (default 3); 0 skips the bulk measurement")
    ap.add_argument("--seconds", type=float, default=2, help="seconds per iperf3 run (default 2)")
    ap.add_argument("--quick", action="store_true", help="fewer windows")
    args = ap.parse_args()
    if args.windows is None:
        args.windows = 12 if args.quick else 40
    if args.stats_seconds is None:
        args.stats_seconds = 1.0 if args.quick else 2.0
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    placements = [p.strip() for p in args.placement.split(",") if p.strip()]
    bad = [p for p in placements if p not in PLACEMENTS]
    if bad or not placements:
        ap.error("--placement: want a comma-separated list of %s" % ", ".join(PLACEMENTS))
    if args.windows < 2 or args.window <= 0:
        ap.error("--windows must be >= 2 and --window > 0")
    if os.geteuid() != 0:
        sys.exit("bench_probe_tools.py needs root")
    for tool in ("sockperf", "iperf3"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            sys.exit("%s missing: apt-get install sockperf iperf3" % tool)
    bench_signals()
    reap_stale()

    stats_prev = read_sysctl()
    probe: Optional[Probe] = None
    floor: Optional[Floor] = None
    sh("ip", "netns", "add", NS)
    try:
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        try:
            probe = Probe.attach(map_size=65536, hook=args.hook, sk_storage=args.sk_storage)
        except ProbeUnavailable as e:
            print("### Probe overhead on standard tools (bench/bench_probe_tools.py)\n")
            print("Not measured: the probe could not attach (%s)." % e)
            print("bench_probe_tools.py: %s" % e, file=sys.stderr)
            return 1
        print("probe attached: %s, storage %s" % (probe.describe(), probe.storage),
              file=sys.stderr)
        floor_note = None
        if args.no_floor:
            floor_note = "skipped (--no-floor)"
        else:
            floor_note = Floor.unavailable(probe.hook)
            if floor_note is None and "same" not in placements:
                floor_note = "measured only with the same-CPU placement"
            if floor_note is None:
                floor = Floor(probe.hook)
        phases = [rr_phase(p, probe, args, floor if p == "same" else None) for p in placements]
        bulk = bulk_phase(probe, args.rounds, args.seconds) if args.rounds > 0 else []
        report(probe, args, phases, bulk, floor_note, stats_prev)
        return 0
    finally:
        if stats_prev is not None and read_sysctl() != stats_prev:
            write_sysctl(stats_prev)
        for p in PROCS:
            stop(p)
        if floor is not None:
            floor.close()
        if probe is not None:
            probe.close()
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench_probe_tools.py: interrupted", file=sys.stderr)
        sys.exit(130)
