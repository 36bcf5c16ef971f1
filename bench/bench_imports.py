#!/usr/bin/env python3
"""Start-up: what `tcpidle audit` and `tcpidle kill` import, and what it costs.

Runs each command N times as `python -X importtime -m tcpidle ARGS` (no
connection matches: the run is start-up and almost nothing else) and keeps
the run with the smallest total, the least disturbed by other load.  Reports
per command: the wall time of the whole process, the time spent importing
(the sum of the top-level cumulative times -X importtime prints), tcpidle's
own modules, click, and the modules imported, so that an import a command
does not need shows up.

    bench/bench_imports.py [--runs N] [--tree DIR]

`--tree DIR` measures another checkout of tcpidle (put first on PYTHONPATH),
e.g. an older commit unpacked with `git archive REV | tar -x -C DIR`, to
compare before and after.  Needs no root (kill runs with --dry-run).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

COMMANDS = {
    "audit": ["audit", "-s", "1"],
    "kill": ["kill", "-d", "1", "--dry-run", "--disable-syslog"],
}
LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)$")


def python() -> str:
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def one_run(argv, tree):
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    started = time.monotonic()
    res = subprocess.run([python(), "-X", "importtime", "-m", "tcpidle"] + argv, env=env,
                         capture_output=True, text=True, cwd="/")
    wall = time.monotonic() - started
    top, modules = {}, []
    for line in res.stderr.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        cumulative_us, indent, name = int(m.group(2)), m.group(3), m.group(4)
        modules.append(name)
        if not indent:
            top[name] = cumulative_us
    if res.returncode not in (0, 1):
        raise SystemExit("tcpidle %s: exit %d\n%s" % (" ".join(argv), res.returncode, res.stderr[-2000:]))
    return {
        "wall_ms": wall * 1000,
        "imports_ms": sum(top.values()) / 1000,
        "tcpidle_ms": sum(us for name, us in top.items()
                          if name == "tcpidle" or name.startswith("tcpidle.")) / 1000,
        "site_ms": top.get("site", 0) / 1000,
        "modules": modules,
        "tcpidle_modules": sorted(n for n in set(modules) if n.startswith("tcpidle.")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--tree", default=None, help="a tcpidle checkout to measure instead of this one")
    args = ap.parse_args()
    tree = os.path.abspath(args.tree) if args.tree else None
    print("machine: %s, %s, %d CPUs; python %s; %s" % (
        platform.node(), platform.release(), os.cpu_count() or 0, platform.python_version(),
        time.strftime("%Y-%m-%d")))
    print("tree: %s" % (tree or ROOT))
    for name, argv in COMMANDS.items():
        runs = [one_run(argv, tree) for _ in range(args.runs)]
        best = min(runs, key=lambda r: r["imports_ms"])
        walls = sorted(r["wall_ms"] for r in runs)
        print("\ntcpidle %s  (best of %d by import time)" % (" ".join(argv), args.runs))
        print("  process wall: min %.1f ms, median %.1f ms" % (walls[0], walls[len(walls) // 2]))
        print("  imports: %.1f ms, of which site %.1f ms (the editable install's finder), "
              "tcpidle.* %.1f ms (click and the standard library they pull in included)"
              % (best["imports_ms"], best["site_ms"], best["tcpidle_ms"]))
        print("  modules imported: %d; tcpidle's: %s" % (
            len(set(best["modules"])), " ".join(m[len("tcpidle."):] for m in best["tcpidle_modules"])))
        heavy = [m for m in ("click", "json", "logging", "ipaddress", "datetime", "ctypes",
                             "prometheus_client", "pyroute2", "bcc", "tcpidle.probe")
                 if m in best["modules"]]
        print("  notable: %s" % " ".join(heavy))


if __name__ == "__main__":
    main()
