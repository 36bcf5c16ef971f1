#!/usr/bin/env python3
"""The tracker's idle histogram (--metrics-port) fed with one poll's idle times.

    .venv/bin/python bench/bench_metrics.py [--sockets N] [--rounds R]

prometheus_client's Histogram.observe() value by value against
metrics.observe_many() (one bisection per value, each bucket set once), on
N random idle times; best of R rounds each, alternating.  No root needed.
"""

import argparse
import random
import time

from prometheus_client import CollectorRegistry, Histogram

from tcpidle import metrics


def one(values, many: bool) -> float:
    h = Histogram("tcpidle_idle_seconds", "idle", buckets=metrics.IDLE_BUCKETS,
                  registry=CollectorRegistry())
    t = time.perf_counter()
    if many:
        metrics.observe_many(h, iter(values))
    else:
        for v in values:
            h.observe(v)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sockets", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(1)
    values = [rng.uniform(0, 100_000) for _ in range(args.sockets)]
    best = {False: float("inf"), True: float("inf")}
    for _ in range(args.rounds):
        for many in (False, True):
            best[many] = min(best[many], one(values, many))
    print("%d idle times: observe() each %.1f ms (%.2f us each), observe_many %.1f ms (%.2f us each)"
          % (args.sockets, best[False] * 1e3, best[False] * 1e6 / args.sockets,
             best[True] * 1e3, best[True] * 1e6 / args.sockets))


if __name__ == "__main__":
    main()
