#!/usr/bin/env python3
"""The tcpidle command against ss, measured side by side: enumerate, and find-and-kill.

Run as root (bench/run is the one command; it calls this):

    .venv/bin/python bench/bench_cli.py [--quick] [--summary FILE] [--json FILE]

Everything happens in one fresh namespace (tibench-PID-cli, removed at the
end, also on Ctrl-C) whose connections are held by several worker processes
(bench/common.py).  Every command is started from a timer process that
already lives in the namespace, so `ip netns exec`'s own cost is in neither
number; wall time, CPU and peak RSS come from GNU time.  stdout goes to
/dev/null in timed runs; an extra untimed run of each command writes to a
file and is checked.

1. Enumeration, at each of --sizes sockets (half IPv4, half IPv6; both ends of
   every connection are in the namespace, so N sockets = N/2 connections):
   `tcpidle audit --json` against `ss -tni`, and
   `tcpidle audit --json` (owners from one /proc pass) against `ss -tnip`.
   One warm-up each, then --runs rounds; the order inside a round alternates
   (tcpidle first, then ss first).  Medians, their ratio, the peak RSS, and
   the marginal cost per socket (slope between the smallest and largest size).
2. Find and kill: --kill-idle idle connections among --kill-total.  The
   active ones sit on ports 2000+ and their server ends send a byte every
   --idle-ms/3 (a bit less) for the whole phase; each run opens fresh idle
   connections on a port of their own, waits until they are idle for
   --idle-ms, and then runs either `tcpidle kill -d PORT -t MS --json
   --disable-syslog` or `ss -K -tn state established dport = :PORT` (ss has no
   idle filter; the port selects exactly the idle set).  Tools alternate
   (ABBA).  After each run the namespace is dumped: every idle client socket
   must be gone and every bystander socket still there.  Sockets ss -K left
   alive are recorded (it destroys while the kernel is still walking the
   hash table); for tcpidle any survivor is a failure.
3. The race (own namespace, whose TCP established hash has only
   --race-ehash buckets, so chains are long): --race-idle connections to one
   port destroyed by each tool, --race-runs times each; sockets left alive
   are counted.  ss -K destroys while the kernel dump is still walking the
   hash and skips some; tcpidle must leave none.
4. The tracker (after step 1, with its connections): `tcpidle track --netns
   NS --all --dry-run` with --track-map-size entries, pins in a bpffs
   directory of our own; a byte each way on every connection so each socket
   has a probe entry; then its RSS (before/after/peak), its maps' memlock
   (/proc/PID/fdinfo), the map's entries and evictions, and its poll time.
5. --profile (default on when py-spy is installed): one more run of each
   tcpidle command at the largest size under py-spy; the share of samples per
   function is printed.

Results are printed as Markdown (and written to --summary, raw numbers to
--json).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402
from tcpidle import diag  # noqa: E402

FAMILIES = (socket.AF_INET, socket.AF_INET6)
ALL_STATES = 0xFFFFFFFF
ESTABLISHED = 1 << 1
ENUM_PORT = 2000  # + k for the k-th block of enumeration connections
IDLE_PORT = 3000  # + i for the i-th kill run
PROFILE_PORT = 3900


# --- helpers ---------------------------------------------------------------------------


def ms(x: float) -> str:
    return "%.0f" % (x * 1e3) if x >= 0.1 else "%.1f" % (x * 1e3)


def mb(kb: float) -> str:
    return "%.1f" % (kb / 1024.0)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def cookies_now(ns: common.BenchNamespace, states: int = ALL_STATES):
    """Every socket in the namespace: {cookie: (state, sport, dport)}."""
    with diag.DiagSocket(netns_fd=ns.fd) as ds:
        return {s.cookie: (s.state, s.sport, s.dport)
                for s in ds.dump_sockets(FAMILIES, states, want_info=False)}


def log(text: str) -> None:
    sys.stderr.write("bench: %s\n" % text)
    sys.stderr.flush()


# --- 1. enumeration --------------------------------------------------------------------------


def enum_commands(tcpidle: List[str]):
    """(label, tcpidle argv, ss argv, checker) per comparison."""
    return [
        ("no owners", tcpidle + ["audit", "--json"], ["ss", "-tni"]),
        ("owners", tcpidle + ["audit", "--json", "-p"], ["ss", "-tnip"]),
    ]


def check_output(kind: str, path: str, sockets: int) -> Dict:
    """Untimed run's output: how many sockets each tool listed (and with owners)."""
    listed = with_owner = 0
    with open(path, "rb") as f:
        if kind == "tcpidle":
            for line in f:
                obj = json.loads(line)
                listed += obj["state"] == "ESTABLISHED"
                with_owner += bool(obj["pids"])
        else:
            for line in f:
                if line.startswith(b"ESTAB"):
                    listed += 1
                    with_owner += b"users:((" in line
    return {"listed": listed, "with_owner": with_owner, "expected": sockets}


def enumeration_at(farm: common.Farm, sockets: int, runs: int, tcpidle: List[str]) -> List[Dict]:
    rows = []
    timer = farm.timer
    cmds = enum_commands(tcpidle)
    out = tempfile.NamedTemporaryFile(prefix="tibench-out-", delete=False)
    out.close()
    try:
        for label, ours, theirs in cmds:
            row = {"sockets": sockets, "variant": label, "tcpidle_argv": ours[len(tcpidle):],
                   "ss_argv": theirs, "tcpidle": [], "ss": [], "check": {}}
            for kind, argv in (("tcpidle", ours), ("ss", theirs)):
                r = timer.run(argv, stdout_path=out.name)  # warm-up + correctness
                if r["rc"] != 0:
                    raise RuntimeError("%s failed (%d): %s" % (" ".join(argv), r["rc"], r["stderr"]))
                row["check"][kind] = check_output(kind, out.name, sockets)
            rows.append(row)
        for rnd in range(runs):
            for (label, ours, theirs), row in zip(cmds, rows):
                pair = [("tcpidle", ours), ("ss", theirs)]
                if rnd % 2:
                    pair.reverse()
                for kind, argv in pair:
                    r = timer.run(argv)
                    if r["rc"] != 0:
                        raise RuntimeError("%s failed (%d): %s" % (" ".join(argv), r["rc"], r["stderr"]))
                    row[kind].append({k: r[k] for k in ("wall", "user", "sys", "maxrss_kb")})
    finally:
        os.unlink(out.name)
    for row in rows:
        t = median([r["wall"] for r in row["tcpidle"]])
        s = median([r["wall"] for r in row["ss"]])
        log("%6d sockets, %-9s: tcpidle %s ms, ss %s ms, ratio %.2f"
            % (sockets, row["variant"], ms(t), ms(s), t / s))
    return rows


# --- 2. find and kill ------------------------------------------------------------------------


def prepare_active(farm: common.Farm, active: int, period: float) -> List[str]:
    """Leave exactly `active` connections (closing the newest enumeration
    blocks first, or opening more) and set them talking."""
    excess = farm.connections - active
    for name in sorted(farm.groups, reverse=True):
        if excess <= 0:
            break
        take = min(excess, len(farm.groups[name]))
        farm.close(name, take if take < len(farm.groups[name]) else None)
        excess -= take
    if farm.connections < active:
        farm.open("enum-extra", ENUM_PORT + 99, active - farm.connections)
    names = sorted(farm.groups)
    for name in names:
        farm.activate(name, period)
    return names


def kill_commands(tcpidle: List[str], port: int, idle_ms: int, before: Optional[str] = None):
    cmds = {
        "tcpidle": tcpidle + ["kill", "-d", str(port), "-t", str(idle_ms), "--json", "--disable-syslog"],
        "tcpidle-bpf": tcpidle + ["kill", "-d", str(port), "-t", str(idle_ms), "--destroy-with", "bpf",
                                  "--json", "--disable-syslog"],
        "ss": ["ss", "-K", "-tn", "state", "established", "dport", "=", ":%s" % port],
        # the in-kernel destroy's pass alone, timed in-process (bench/iter_pass.py)
        "tcpidle-pass": [common.python(), os.path.join(HERE, "iter_pass.py"), str(port), str(idle_ms)],
    }
    if before:  # the same commands from another tree (--before DIR), first on the path
        # Started as the console script starts tcpidle (the same imports); -P: not
        # the working directory first on the path (it may be a tcpidle tree).
        old = ["env", "PYTHONPATH=%s" % before, common.python(), "-P", "-c",
               "import sys; from tcpidle.cli import main; sys.exit(main())"]
        cmds["tcpidle-before"] = old + cmds["tcpidle"][len(tcpidle):]
        cmds["tcpidle-bpf-before"] = old + cmds["tcpidle-bpf"][len(tcpidle):]
    return cmds


def one_kill_run(farm, ns, run: int, tool: str, argv_for, idle: int, idle_ms: int,
                 bystanders: set, wrap: Optional[List[str]] = None, port: Optional[int] = None) -> Dict:
    port = port if port is not None else IDLE_PORT + run
    name = "idle%d" % port
    group = farm.open(name, port, idle)
    opened = time.monotonic()
    try:
        victims = set(group.client)
        # Every idle connection was established before `opened`; the kernel's
        # tcpi_last_data_recv counts from then, in jiffies: add a margin.
        time.sleep(max(0.0, opened + idle_ms / 1000.0 + 0.3 - time.monotonic()))
        before = cookies_now(ns, ESTABLISHED)
        missing = victims - before.keys()
        if missing:
            raise RuntimeError("run %d: %d idle connections not established before the kill"
                               % (run, len(missing)))
        argv = argv_for(port)[tool]
        load = os.getloadavg()[0]
        passed = None
        if tool == "tcpidle-pass":  # its one JSON object says what the pass alone took
            out = tempfile.NamedTemporaryFile(prefix="tibench-pass-", delete=False)
            out.close()
            try:
                r = farm.timer.run((wrap or []) + argv, stdout_path=out.name)
                with open(out.name) as f:
                    text = f.read()
                passed = json.loads(text) if r["rc"] == 0 and text.strip() else None
            finally:
                os.unlink(out.name)
        else:
            r = farm.timer.run((wrap or []) + argv)
        after = cookies_now(ns)
        left = victims & after.keys()
        lost = bystanders - after.keys()
        on_port = sum(1 for st, sp, dp in after.values() if port in (sp, dp))
        res = {"run": run, "tool": tool, "port": port, "wall": r["wall"], "user": r["user"],
               "sys": r["sys"], "maxrss_kb": r["maxrss_kb"], "rc": r["rc"],
               "victims": len(victims), "left": len(left), "bystanders_lost": len(lost),
               "left_on_port": on_port, "stderr": r["stderr"].strip().splitlines()[-1:],
               "load1": load, "pass": passed}
        log("kill run %2d %-12s %s ms, CPU %.2f+%.2f s, %d of %d idle left, %d bystanders lost%s%s"
            % (run, tool, ms(r["wall"]), r["user"], r["sys"], len(left), len(victims), len(lost),
               "" if passed is None else " (pass alone: read %.0f ms, decode %.0f ms)"
               % (passed["read_ms"], passed["decode_ms"]),
               "" if r["rc"] == 0 else ", exit %d: %s" % (r["rc"], r["stderr"].strip()[-300:])))
        return res
    finally:
        farm.close(name)


def kill_phase(farm, ns, args, tcpidle: List[str], results: Dict) -> None:
    idle_ms = args.idle_ms
    period = idle_ms / 1000.0 / 3 * 0.9  # a byte at least every MS/3
    active = args.kill_total - args.kill_idle
    t0 = time.monotonic()
    names = prepare_active(farm, active, period)
    log("kill phase: %d active connections on ports %s, a byte every %.2f s each"
        % (farm.connections, ",".join(str(farm.groups[n].port) for n in names), period))
    # The senders pick up each newly activated group at their next cycle:
    # after two periods every active connection has had a byte recently.
    time.sleep(2 * period + 0.5)
    lo = min(farm.groups[n].port for n in names)
    hi = max(farm.groups[n].port for n in names)
    # Control: the idle filter itself.  None of the active connections may
    # look idle to tcpidle (else the benchmark would measure nothing real).
    ctl_out = tempfile.NamedTemporaryFile(prefix="tibench-ctl-", delete=False)
    ctl_out.close()
    try:
        r = farm.timer.run(tcpidle + ["kill", "-d", "%d-%d" % (lo, hi), "-t", str(idle_ms),
                                      "--dry-run", "--json", "--disable-syslog"], stdout_path=ctl_out.name)
        with open(ctl_out.name) as f:
            would = sum(1 for _ in f)
    finally:
        os.unlink(ctl_out.name)
    bystanders = set(cookies_now(ns))
    established = len(cookies_now(ns, ESTABLISHED))
    results["kill_setup"] = {"active_connections": farm.connections, "established_sockets": established,
                             "period_s": period, "idle_ms": idle_ms, "idle": args.kill_idle,
                             "control_would_destroy": would, "control_rc": r["rc"]}
    log("control: tcpidle kill -d %d-%d -t %d --dry-run would destroy %d active connections (want 0)"
        % (lo, hi, idle_ms, would))
    runs = []
    tools = ["tcpidle", "ss"] + (["tcpidle-bpf"] if args.kill_bpf else []) + \
        (["tcpidle-pass"] if args.kill_pass else []) + \
        (["tcpidle-before"] + (["tcpidle-bpf-before"] if args.kill_bpf else [])
         if args.before else [])
    for i in range(len(tools) * args.kill_runs):
        rnd, k = divmod(i, len(tools))
        if len(tools) == 2:  # ABBA
            tool = tools[k] if rnd % 2 == 0 else tools[1 - k]
        else:  # each round starts with the next tool: ABC, BCA, CAB (ABCD, BCDA, ...)
            tool = tools[(rnd + k) % len(tools)]
        runs.append(one_kill_run(farm, ns, i, tool,
                                 lambda p: kill_commands(tcpidle, p, idle_ms, args.before),
                                 args.kill_idle, idle_ms, bystanders))
    results["kill"] = runs
    results["kill_phase_s"] = time.monotonic() - t0
    if args.profile:
        results["profile"]["kill"] = profile_kill(farm, ns, args, tcpidle, bystanders)


# --- 2b. the dump-while-destroying race --------------------------------------------------------


def race_phase(args, tcpidle: List[str], results: Dict) -> None:
    """ss -K destroys each socket as the kernel's dump reports it; the dump
    resumes each bucket of the established hash at a saved *position*, so
    removing entries before that position makes it skip live sockets.  With
    the host's table (262,144 buckets here) chains are ~1 long and skips are
    rare; in a namespace with a small private table (long chains) they are
    routine.  tcpidle reads the whole dump before destroying anything."""
    idle, base = args.race_idle, args.race_idle // 2
    nworkers = common.Farm.workers_for(int((idle + base) * 1.1))
    runs = []
    with common.BenchNamespace("race", workers=nworkers + 1, ehash=args.race_ehash) as ns, \
            common.Farm(ns, nworkers) as farm:
        farm.open("base", ENUM_PORT, base)
        bystanders = set(cookies_now(ns))
        for i in range(2 * args.race_runs):
            tool = ("tcpidle", "ss")[i % 2]
            port = IDLE_PORT + i
            group = farm.open("race%d" % i, port, idle)
            try:
                victims = set(group.client)
                argv = {"tcpidle": tcpidle + ["kill", "-d", str(port), "--json", "--disable-syslog"],
                        "ss": ["ss", "-K", "-tn", "state", "established", "dport", "=", ":%d" % port]}[tool]
                r = farm.timer.run(argv)
                after = cookies_now(ns)
                runs.append({"tool": tool, "wall": r["wall"], "rc": r["rc"], "victims": len(victims),
                             "left": len(victims & after.keys()),
                             "bystanders_lost": len(bystanders - after.keys())})
                log("race run %d %-7s %s ms, %d of %d left alive" % (
                    i, tool, ms(r["wall"]), runs[-1]["left"], len(victims)))
            finally:
                farm.close("race%d" % i)
    results["race"] = {"ehash": args.race_ehash, "idle": idle, "bystander_connections": base, "runs": runs}


# --- 4. the tracker's memory -----------------------------------------------------------------


def proc_status(pid: int) -> Dict[str, int]:
    """VmRSS and VmHWM (kB) of a process."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def bpf_maps_of(pid: int) -> List[Dict]:
    """The BPF maps a process holds open, from /proc/PID/fdinfo: type,
    sizes, max_entries and memlock (the kernel's charge for the map)."""
    maps = {}
    base = "/proc/%d/fdinfo" % pid
    for fd in os.listdir(base):
        try:
            with open(os.path.join(base, fd)) as f:
                text = f.read()
        except OSError:
            continue
        if "map_type:" not in text:
            continue
        info = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            value = value.strip()
            if key in ("map_type", "key_size", "value_size", "max_entries", "memlock", "map_id"):
                info[key] = int(value)
        maps[info.get("map_id", fd)] = info
    return list(maps.values())


def wait_for(path: str, predicate, timeout: float, proc) -> str:
    """Poll a log file until predicate(text) is true; the text."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path, errors="replace") as f:
            text = f.read()
        if predicate(text):
            return text
        if proc.poll() is not None:
            raise RuntimeError("tracker exited (%s): %s" % (proc.returncode, text.strip()[-500:]))
        if time.monotonic() > deadline:
            raise RuntimeError("tracker: timed out; log: %s" % text.strip()[-500:])
        time.sleep(0.1)


def polls(text: str) -> List[Dict]:
    """The tracker's -vv lines 'poll N: S sockets dumped, M matched, ...; T ms'."""
    import re

    out = []
    for m in re.finditer(r"poll (\d+): (\d+) sockets dumped, (\d+) matched.*?; ([\d.]+) ms", text):
        out.append({"poll": int(m.group(1)), "dumped": int(m.group(2)), "matched": int(m.group(3)),
                    "ms": float(m.group(4))})
    return out


def map_stats(pinned_map, pins: str) -> Dict[str, int]:
    if not os.path.exists(os.path.join(pins, "activity")):
        # per-socket storage: no activity map; records created = inserts
        from tcpidle.probe.maps import obj_get, read_counters

        fd = obj_get(os.path.join(pins, "counters"))
        try:
            c = read_counters(fd)
        finally:
            os.close(fd)
        return {"entries": c["inserts"], "max_entries": 0, "evicted": 0}
    pm = pinned_map.open(pins)
    try:
        return pm.stats()
    finally:
        pm.close()


def track_phase(farm, ns, args, tcpidle: List[str], results: Dict) -> None:
    """`tcpidle track` with --track-sockets sockets that have all received
    data (so the probe holds an entry for each): its RSS before and after,
    its maps' memlock, the entries, and its poll time."""
    from tcpidle.probe import PinnedMap

    want = args.track_sockets // 2
    if farm.connections < want:
        farm.open("track-extra", ENUM_PORT + 98, want - farm.connections)
    pins = common.pin_dir("track")
    interval = 3.0
    # Run from here with --netns, not under `ip netns exec`: that gives the
    # command a private mount namespace with its own /sys, where the tracker
    # would pin its maps in a bpffs of its own, invisible to everyone else.
    argv = tcpidle + [
        "track", "--netns", ns.name, "--all", "--dry-run", "-t", "86400000", "-i", str(interval),
        "--map-size", str(args.track_map_size), "--pin-dir", pins, "--disable-syslog", "-vv"]
    errf = tempfile.NamedTemporaryFile(prefix="tibench-track-", suffix=".log", delete=False)
    res: Dict = {"map_size": args.track_map_size, "connections": farm.connections,
                 "argv": argv[len(tcpidle):]}
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errf)
    try:
        wait_for(errf.name, lambda t: len(polls(t)) >= 1, 180, proc)
        res["startup_s"] = time.monotonic() - t0
        res["rss_start_kb"] = proc_status(proc.pid)["VmRSS"]
        res["entries_before"] = map_stats(PinnedMap, pins)["entries"]
        n = farm.ping()
        res["pinged_connections"] = n
        seen = len(polls(open(errf.name).read()))
        text = wait_for(errf.name, lambda t: len(polls(t)) >= seen + 3, 60, proc)
        st = proc_status(proc.pid)
        res["rss_kb"], res["hwm_kb"] = st["VmRSS"], st["VmHWM"]
        res["maps"] = bpf_maps_of(proc.pid)
        res["stats"] = map_stats(PinnedMap, pins)
        res["polls"] = polls(text)[seen:]
        res["probe_line"] = next((ln for ln in text.splitlines() if "BPF probe" in ln), "")
        log("tracker: %d map entries, RSS %s MB (peak %s MB; %s MB before the traffic), maps %s MB "
            "memlock, polls %s ms" % (
                res["stats"]["entries"], mb(res["rss_kb"]), mb(res["hwm_kb"]), mb(res["rss_start_kb"]),
                mb(sum(m.get("memlock", 0) for m in res["maps"]) / 1024.0),
                "/".join("%.0f" % p["ms"] for p in res["polls"])))
    except RuntimeError as exc:
        res["error"] = str(exc)
        log(str(exc))
    finally:
        common.stop_tracker(proc, timeout=30)
        res["rc"] = proc.returncode
        errf.close()
        os.unlink(errf.name)
        common.sh(*(tcpidle + ["track", "--cleanup", "--pin-dir", pins]), check=False)
        common.remove_pin_dir(pins)
    results["track"] = res


# --- 3. profiles -------------------------------------------------------------------------------


def py_spy() -> Optional[str]:
    for cand in (os.path.join(os.path.dirname(common.python()), "py-spy"), shutil.which("py-spy")):
        if cand and os.path.exists(cand):
            return cand
    return None


def spy_argv(raw_path: str, rate: int = 1000) -> List[str]:
    return [py_spy(), "record", "-i", "--nolineno", "-r", str(rate), "-f", "raw",
            "-o", raw_path, "--"]


IMPORTS = "(importing modules: start-up)"


def digest_profile(raw_path: str, top: int = 14) -> Dict:
    """Collapsed stacks -> shares: self time per function, and inclusive
    time per tcpidle/json/enum function and for imports."""
    total = 0
    self_n = collections.Counter()
    incl = collections.Counter()
    with open(raw_path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(n)
            total += n
            frames = [_short(fr) for fr in stack.split(";")]
            # Everything under the first import is start-up, whichever module.
            for k, fr in enumerate(frames):
                if fr.startswith("_find_and_load ") and k:
                    frames = frames[:k] + [IMPORTS]
                    break
            self_n[frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
    if not total:
        return {"samples": 0}
    interesting = [(fr, n) for fr, n in incl.most_common()
                   if ("tcpidle/" in fr or "json/" in fr or "enum" in fr or fr == IMPORTS)
                   and not fr.startswith(("main (tcpidle/cli.py", "<module>"))]
    return {
        "samples": total,
        "self": [(fr, n / total) for fr, n in self_n.most_common(top)],
        "inclusive": [(fr, n / total) for fr, n in interesting[:top]],
    }


def _short(frame: str) -> str:
    """'row (/work/main/tcpidle/report.py)' -> 'row (tcpidle/report.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("tcpidle/", "python3.11/", "site-packages/", "lib/python"):
        k = where.find(marker)
        if k >= 0:
            where = where[k:] if marker == "tcpidle/" else where[k + len(marker):]
            break
    return "%s (%s)" % (name, where) if where else name


def profile_enum(farm, tcpidle: List[str], sockets: int) -> Dict:
    out = {}
    for label, ours, _ in enum_commands(tcpidle):
        raw = tempfile.NamedTemporaryFile(prefix="tibench-spy-", suffix=".txt", delete=False)
        raw.close()
        try:
            r = farm.timer.run(spy_argv(raw.name) + ours)
            out[label] = dict(digest_profile(raw.name), wall=r["wall"], sockets=sockets,
                              argv=ours[len(tcpidle):])
        finally:
            os.unlink(raw.name)
    return out


def profile_kill(farm, ns, args, tcpidle, bystanders) -> Dict:
    raw = tempfile.NamedTemporaryFile(prefix="tibench-spy-", suffix=".txt", delete=False)
    raw.close()
    try:
        res = one_kill_run(farm, ns, -1, "tcpidle", lambda p: kill_commands(tcpidle, p, args.idle_ms),
                           args.kill_idle, args.idle_ms, bystanders, wrap=spy_argv(raw.name),
                           port=PROFILE_PORT)
        return dict(digest_profile(raw.name), wall=res["wall"], left=res["left"],
                    argv=kill_commands([], PROFILE_PORT, args.idle_ms)["tcpidle"])
    finally:
        os.unlink(raw.name)


# --- summary -----------------------------------------------------------------------------------


def stats(runs: List[Dict], key: str) -> float:
    return median([r[key] for r in runs])


def summary(results: Dict) -> str:
    out = []
    w = out.append
    m = results["machine"]
    w("Machine: Linux %s, %s, %s RAM, iproute2 %s, Python %s; load average at start %s; %s."
      % (m["kernel"], m["cpus"], m["memory"], m["iproute2"], m["python"], m["load"], m["date"]))
    w("")
    rows = results.get("enumerate") or []
    if rows:
        w("### Enumeration (median wall time of %d alternating runs; max RSS)" % len(rows[0]["tcpidle"]))
        w("")
        w("0 sockets: the fixed cost (start-up; with owners, also the /proc walk of the rest of "
          "the machine).")
        w("")
        w("| sockets | tcpidle | ms | MB | ss | ms | MB | time ratio | target ≤ 1.5 | checked |")
        w("|---:|---|---:|---:|---|---:|---:|---:|:--:|---|")
        for r in rows:
            t, s = stats(r["tcpidle"], "wall"), stats(r["ss"], "wall")
            ck = r["check"]
            ok = (ck["tcpidle"]["listed"] == r["sockets"] == ck["ss"]["listed"])
            if r["variant"] == "owners":
                ok = ok and ck["tcpidle"]["with_owner"] == r["sockets"] == ck["ss"]["with_owner"]
            w("| %d | `%s` | %s | %s | `%s` | %s | %s | **%.2f** | %s | %s |" % (
                r["sockets"], "audit " + " ".join(r["tcpidle_argv"][1:]), ms(t),
                mb(stats(r["tcpidle"], "maxrss_kb")), " ".join(r["ss_argv"]), ms(s),
                mb(stats(r["ss"], "maxrss_kb")), t / s,
                "(fixed cost)" if not r["sockets"] else "yes" if t / s <= 1.5 else "**no**",
                "both listed all %d%s" % (r["sockets"], " with owners" if r["variant"] == "owners" else "")
                if ok else "MISMATCH %s" % json.dumps(ck)))
        w("")
        by_variant = collections.defaultdict(list)
        for r in rows:
            by_variant[r["variant"]].append(r)
        for variant, rs in by_variant.items():
            rs = [r for r in rs if r["sockets"]]
            if len(rs) < 2:
                continue
            a, b = rs[0], rs[-1]
            dn = b["sockets"] - a["sockets"]
            slope = {k: (stats(b[k], "wall") - stats(a[k], "wall")) / dn for k in ("tcpidle", "ss")}
            mslope = {k: (stats(b[k], "maxrss_kb") - stats(a[k], "maxrss_kb")) * 1024 / dn
                      for k in ("tcpidle", "ss")}
            w("Marginal cost per socket (%s, %d→%d sockets): tcpidle %.1f µs and %.0f bytes, "
              "ss %.1f µs and %.0f bytes: **%.2fx** the time."
              % (variant, a["sockets"], b["sockets"], slope["tcpidle"] * 1e6, mslope["tcpidle"],
                 slope["ss"] * 1e6, mslope["ss"], slope["tcpidle"] / slope["ss"]))
        w("")
    kill = results.get("kill")
    if kill:
        ks = results["kill_setup"]
        mine = [r for r in kill if r["tool"] == "tcpidle"]
        theirs = [r for r in kill if r["tool"] == "ss"]
        in_kernel = [r for r in kill if r["tool"] == "tcpidle-bpf"]
        alone = [r for r in kill if r["tool"] == "tcpidle-pass"]
        earlier = [r for r in kill if r["tool"] in ("tcpidle-before", "tcpidle-bpf-before")]
        t, s = stats(mine, "wall"), stats(theirs, "wall")
        cpu = {id(r): r["user"] + r["sys"] for r in kill}
        loads = [r["load1"] for r in kill if r.get("load1") is not None]
        w("### Find and kill: %d idle among %d connections (median of %d runs each, ABBA order)"
          % (ks["idle"], ks["idle"] + ks["active_connections"], len(mine)))
        w("")
        w("%d active connections, each receiving a byte every %.2f s, on ports of their own; with "
          "the idle ones, %d established sockets in the namespace during each kill. Idle threshold "
          "%d ms. Control: `tcpidle kill --dry-run` on the active ports would have destroyed %d of them."
          % (ks["active_connections"], ks["period_s"], ks["established_sockets"] + 2 * ks["idle"],
             ks["idle_ms"], ks["control_would_destroy"]))
        w("")
        if loads:
            w("Load average (1 min) at the start of each run: %.1f-%.1f (median %.1f)."
              % (min(loads), max(loads), median(loads)))
            w("")
        w("| tool | command | wall ms (median) | runs (ms) | CPU ms user+sys (median) | CPU per run "
          "(user+sys ms) | MB | idle left alive per run | bystanders lost |")
        w("|---|---|---:|---|---:|---|---:|---|---:|")
        for tool, rs in (("tcpidle", mine), ("ss", theirs), ("tcpidle-bpf", in_kernel),
                         ("tcpidle-pass", alone),
                         ("tcpidle-before", [r for r in earlier if r["tool"] == "tcpidle-before"]),
                         ("tcpidle-bpf-before", [r for r in earlier
                                                 if r["tool"] == "tcpidle-bpf-before"])):
            if not rs:
                continue
            argv = kill_commands(["tcpidle"], "PORT", ks["idle_ms"])[tool.replace("-before", "")]
            if tool == "tcpidle-pass":
                argv = ["bench/iter_pass.py", "PORT", str(ks["idle_ms"])]
            elif tool.endswith("-before"):
                argv = ["(--before tree)"] + argv
            w("| %s | `%s` | %s | %s | %.0f | %s | %s | %s | %d |" % (
                tool, " ".join(argv), ms(stats(rs, "wall")),
                "/".join(ms(r["wall"]) for r in rs), median([cpu[id(r)] for r in rs]) * 1e3,
                "/".join("%.0f+%.0f" % (r["user"] * 1e3, r["sys"] * 1e3) for r in rs),
                mb(stats(rs, "maxrss_kb")),
                "/".join(str(r["left"]) for r in rs), sum(r["bystanders_lost"] for r in rs)))
        w("")
        sc = median([cpu[id(r)] for r in theirs])
        bad_ours = [r for r in mine + in_kernel + alone + earlier
                    if r["left"] or r["rc"] != 0 or r["bystanders_lost"]]
        ss_left = [r["left"] for r in theirs if r["left"]]
        w("Ratio tcpidle / ss -K: **%.2f** wall, %.2f CPU (target <= 1.0: %s). tcpidle left no "
          "idle socket alive and killed no bystander in any run: %s. ss -K left idle sockets alive "
          "in %d of %d runs%s."
          % (t / s, median([cpu[id(r)] for r in mine]) / sc, "met" if t / s <= 1.0 else "**missed**",
             "yes" if not bad_ours else "**NO** (%s)"
             % json.dumps(bad_ours), len(ss_left), len(theirs),
             (" (%s)" % ", ".join(map(str, ss_left))) if ss_left else ""))
        w("")
        if in_kernel:
            b = stats(in_kernel, "wall")
            w("Ratio tcpidle --destroy-with bpf / ss -K: **%.2f** wall, %.2f CPU (target <= 0.5: %s)."
              % (b / s, median([cpu[id(r)] for r in in_kernel]) / sc,
                 "met" if b / s <= 0.5 else "**missed**"))
            w("")
        passes = [r["pass"] for r in alone if r.get("pass")]
        if passes:
            rd = median([p["read_ms"] for p in passes]) / 1e3
            w("The iterator's pass alone, in-process (`bench/iter_pass.py`: no start-up, no "
              "outcomes, no rows): reading the iterator, i.e. the kernel walking the namespace and "
              "destroying %s sockets under their locks, %s ms (median; runs %s), decoding its "
              "records %s ms; CPU of the pass %s. That read alone is **%.2fx** `ss -K`'s whole "
              "run (wall), against the goal of 0.5x for the whole command."
              % ("/".join(str(p["destroyed"]) for p in passes), ms(rd),
                 "/".join(ms(p["read_ms"] / 1e3) for p in passes),
                 ms(median([p["decode_ms"] for p in passes]) / 1e3),
                 "/".join("%.0f+%.0f ms" % (p["cpu_user_s"] * 1e3, p["cpu_sys_s"] * 1e3)
                          for p in passes), rd / s))
            w("")
    race = results.get("race")
    if race:
        mine = [r for r in race["runs"] if r["tool"] == "tcpidle"]
        theirs = [r for r in race["runs"] if r["tool"] == "ss"]
        w("### Destroying while dumping: a namespace with a %d-bucket established hash" % race["ehash"])
        w("")
        w("%d connections to one port destroyed (no idle filter), beside %d other connections, in a "
          "namespace whose TCP established hash has %d buckets (net.ipv4.tcp_child_ehash_entries), so "
          "chains are long. Sockets left alive per run: tcpidle kill %s; ss -K %s. Bystanders lost: %d."
          % (race["idle"], race["bystander_connections"], race["ehash"],
             "/".join(str(r["left"]) for r in mine), "/".join(str(r["left"]) for r in theirs),
             sum(r["bystanders_lost"] for r in race["runs"])))
        w("")
    tr = results.get("track")
    if tr:
        w("### Memory: tracker RSS and map memory at %d tracked sockets" % (2 * tr.get("pinged_connections", 0)))
        w("")
        if tr.get("error"):
            w("Not measured: %s" % tr["error"])
        else:
            st = tr["stats"]
            memlock = sum(m.get("memlock", 0) for m in tr["maps"])
            act = max(tr["maps"], key=lambda m: m.get("max_entries", 0)) if tr["maps"] else {}
            w("`tcpidle %s`, in a namespace holding %d connections; after start-up (%.1f s), one byte "
              "each way on every connection, then %d polls."
              % (" ".join(tr["argv"]), tr["connections"], tr["startup_s"], len(tr["polls"])))
            w("")
            w("| what | value |")
            w("|---|---:|")
            w("| activity map entries (system-wide; %d before the traffic) | %d of %d (%d evicted) |"
              % (tr["entries_before"], st["entries"], st["max_entries"], st["evicted"]))
            w("| tracker RSS after start-up, map nearly empty | %s MB |" % mb(tr["rss_start_kb"]))
            w("| tracker RSS with the map full, after polls | %s MB |" % mb(tr["rss_kb"]))
            w("| tracker peak RSS (VmHWM) | %s MB |" % mb(tr["hwm_kb"]))
            w("| BPF maps, memlock (all %d maps; preallocated for max_entries) | %s MB |"
              % (len(tr["maps"]), mb(memlock / 1024.0)))
            if act:
                w("| activity map: key + value bytes, memlock per max entry | %d + %d, %.0f bytes |"
                  % (act.get("key_size", 0), act.get("value_size", 0),
                     act.get("memlock", 0) / max(1, act.get("max_entries", 1))))
            w("| poll time with the map full (dump + map read + decide) | %s ms |"
              % "/".join("%.0f" % p["ms"] for p in tr["polls"]))
            w("")
            w("%s" % tr.get("probe_line", "").strip())
        w("")
    prof = results.get("profile") or {}
    if prof:
        w("### Where tcpidle's time goes (py-spy, 1 kHz, share of samples)")
        w("")
        items = [("audit " + label, p) for label, p in (prof.get("enumerate") or {}).items()]
        if prof.get("kill"):
            items.append(("kill", prof["kill"]))
        for label, p in items:
            if not p.get("samples"):
                continue
            w("`tcpidle %s` (%s ms under the profiler, %d samples):" % (
                " ".join(p["argv"]), ms(p["wall"]), p["samples"]))
            w("")
            w("| inclusive | function | | self | function |")
            w("|---:|---|---|---:|---|")
            for (fi, si), (fs, ss_) in zip(p["inclusive"], p["self"]):
                w("| %.0f%% | `%s` | | %.0f%% | `%s` |" % (si * 100, fi, ss_ * 100, fs))
            w("")
    return "\n".join(out) + "\n"


# --- main --------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smaller and fewer: sizes 10000,40000, 3 runs, kill 4000 of 20000, -t 3000")
    ap.add_argument("--sizes", help="sockets per enumeration step, comma list (default 10000,50000,100000)")
    ap.add_argument("--runs", type=int, help="timed runs per command and size (default 5)")
    ap.add_argument("--kill-total", type=int, help="connections in the kill phase (default 50000)")
    ap.add_argument("--kill-idle", type=int, help="of which idle (default 10000)")
    ap.add_argument("--kill-runs", type=int, help="runs per tool (default 5)")
    ap.add_argument("--kill-bpf", action="store_true",
                    help="also time `tcpidle kill --destroy-with bpf` (the in-kernel destroy)")
    ap.add_argument("--kill-pass", action="store_true",
                    help="also time the in-kernel destroy's pass alone, in-process "
                         "(bench/iter_pass.py: the kernel's own time for the destroys)")
    ap.add_argument("--before", metavar="DIR",
                    help="also time the kill commands of another tcpidle tree (on PYTHONPATH, "
                         "this venv): before/after in one run")
    ap.add_argument("--idle-ms", type=int, help="idle threshold (default 6000)")
    ap.add_argument("--race-runs", type=int, help="runs per tool with a small established hash (default 3)")
    ap.add_argument("--race-idle", type=int, default=10000, help="connections destroyed per race run")
    ap.add_argument("--race-ehash", type=int, default=1024, help="buckets of the race namespace's hash")
    ap.add_argument("--skip-enumerate", action="store_true")
    ap.add_argument("--skip-kill", action="store_true")
    ap.add_argument("--skip-race", action="store_true")
    ap.add_argument("--skip-track", action="store_true")
    ap.add_argument("--track-sockets", type=int, help="sockets with probe entries (default 100000)")
    ap.add_argument("--track-map-size", type=int, default=131072, help="tracker --map-size")
    ap.add_argument("--profile", dest="profile", action="store_true", default=None,
                    help="profile tcpidle with py-spy (default: when py-spy is installed)")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--summary", help="write the Markdown summary here too")
    ap.add_argument("--json", dest="json_out", help="write raw results as JSON here")
    args = ap.parse_args(argv)
    quick = args.quick
    defaults = {
        "sizes": "10000,40000" if quick else "10000,50000,100000",
        "runs": 3 if quick else 5,
        "kill_total": 20000 if quick else 50000,
        "kill_idle": 4000 if quick else 10000,
        "kill_runs": 3 if quick else 5,
        "idle_ms": 3000 if quick else 6000,
        "race_runs": 2 if quick else 3,
        "track_sockets": 40000 if quick else 100000,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sizes = sorted({int(x) for x in str(args.sizes).split(",") if x.strip()})
    if any(s % 2 for s in args.sizes):
        ap.error("--sizes must be even (each connection is two sockets)")
    if args.kill_idle >= args.kill_total:
        ap.error("--kill-idle must be below --kill-total")
    if args.profile is None:
        args.profile = py_spy() is not None
    elif args.profile and py_spy() is None:
        ap.error("--profile needs py-spy (.venv/bin/pip install py-spy)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench: needs root (namespaces, SOCK_DESTROY)")
    common.bench_signals()
    for name in common.reap_stale():
        log("removed stale namespace %s" % name)
    tcpidle = common.tcpidle_argv()
    results: Dict = {"machine": common.machine(), "args": vars(args), "profile": {}}
    need = 0 if args.skip_enumerate else args.sizes[-1] // 2
    if not args.skip_track:
        need = max(need, args.track_sockets // 2)
    if not args.skip_kill:
        need = max(need, args.kill_total)
    nworkers = common.Farm.workers_for(int(need * 1.05))
    started = time.monotonic()
    with common.BenchNamespace("cli", workers=nworkers + 1) as ns, common.Farm(ns, nworkers) as farm:
        log("namespace %s, %d workers" % (ns.name, nworkers))
        if not args.skip_enumerate:
            # Size 0 first: the empty namespace gives each command's fixed
            # cost (start-up; for the owner variants, the /proc walk of the
            # rest of the machine).
            results["enumerate"] = []
            for k, size in enumerate([0] + args.sizes):
                add = size // 2 - farm.connections
                t0 = time.monotonic()
                if add > 0:
                    farm.open("enum%d" % k, ENUM_PORT + k, add)
                est = len(cookies_now(ns, ESTABLISHED))
                if est != size:
                    raise RuntimeError("expected %d established sockets, found %d" % (size, est))
                log("%d sockets ready (%.1f s)" % (size, time.monotonic() - t0))
                results["enumerate"].extend(enumeration_at(farm, size, args.runs, tcpidle))
            if args.profile:
                results["profile"]["enumerate"] = profile_enum(farm, tcpidle, args.sizes[-1])
        if not args.skip_track:
            track_phase(farm, ns, args, tcpidle, results)
        if not args.skip_kill:
            kill_phase(farm, ns, args, tcpidle, results)
    if not args.skip_race:
        race_phase(args, tcpidle, results)
    results["elapsed_s"] = time.monotonic() - started
    text = summary(results)
    sys.stdout.write(text)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    log("done in %.0f s" % results["elapsed_s"])
    bad = [r for r in results.get("kill", []) + (results.get("race") or {}).get("runs", [])
           if r["tool"].startswith("tcpidle") and (r["left"] or r["rc"] or r["bystanders_lost"])]
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; namespace and workers removed")
        sys.exit(130)
