"""Prometheus metrics of `tcpidle track` (prometheus_client, own registry).

Owns the series below, their names, types and buckets, and the HTTP
endpoint that serves them (`--metrics-port`, on `--metrics-addr`, default
127.0.0.1).  The tracker feeds it once per poll; nothing here looks at
sockets or the kernel itself.

Series:

tcpidle_sockets_seen (gauge)
    connections matched by the selector (after the protected list) in the
    last poll.
tcpidle_idle_seconds (histogram)
    idle time of every matched connection whose idle time is known,
    observed once per poll; buckets 1 s to 1 day.  increase() over one
    interval is the current distribution.
tcpidle_kills_total{outcome} (counter)
    victims acted on, by outcome: destroyed, would-destroy (--dry-run),
    shutdown, process-killed (the /proc fallback), gone (closed before the
    kill), failed; with track --keepalive: keepalive-set, would-set-keepalive,
    keepalive-on.  Every outcome is exported from the start, at 0.
tcpidle_spared_total{reason} (counter)
    victims left alone by the re-check right before their destroy:
    received-data (since the scan), left-selection (its state, typically:
    an owner exited and it went FIN-WAIT-1), not-rechecked (the lookup
    failed: a verdict that cannot be confirmed is not acted on),
    verdict-changed (chosen by --verdict or --middlebox, which the fresh
    evidence no longer gives).
tcpidle_connections{verdict} (gauge)
    connections matched in the last poll, by health verdict: active, quiet,
    dead, zero-window, close-wait, orphan, unknown (README, "Dead or just
    quiet").  Every verdict is exported from the start, at 0.
tcpidle_middlebox_at_risk{comm}, tcpidle_middlebox_past{comm} (gauge)
    with --middlebox: connections at risk of (past) the middlebox's idle
    timeout in the last poll, by the owning process's name ("-" for none);
    only the names seen in the last poll are exported.
tcpidle_poll_duration_seconds (histogram)
    wall time of one poll: dump, merge, decide, act.
tcpidle_poll_errors_total (counter)
    polls that failed and were retried at the next interval (netlink
    errors such as ENOBUFS, a malformed dump...).
tcpidle_output_errors_total{output} (counter)
    lines that could not be written, by output: logfile (-f), event-log
    (--event-log), stdout (rows after the reader went away); each output
    that loses lines in a poll is also said once in the log.
tcpidle_last_poll_timestamp_seconds (gauge)
    Unix time of the last successful poll (alert when it stops moving).
tcpidle_probe_attached (gauge)
    1 while the BPF probe runs, 0 when idle times come from tcp_info alone.
tcpidle_probe_info (gauge, labels hook, storage)
    1 for the probe attached: hook tp_btf, raw_tracepoint, kprobe or tracepoint;
    storage sk_storage (per-socket storage read inline in the dumps: Linux 5.11
    on with tp_btf) or lru (the activity map, keyed by socket cookie).
    With sk_storage, map_entries counts the selected sockets with a record in
    the last poll's dump, and capacity and evictions are 0 (no bound, no
    eviction: the storage dies with its socket).
tcpidle_probe_map_entries (gauge)
    entries in the probe's activity map.
tcpidle_probe_map_capacity (gauge)
    the activity map's max_entries (--map-size, or the pinned map's size).
tcpidle_probe_evictions (gauge)
    entries the kernel's LRU evicted from the activity map since the pinned
    maps were created (it survives tracker restarts); growth means the map
    is too small for the number of connections (the tracker also logs a
    warning each interval it grows).
tcpidle_probe_pin_problems (gauge)
    pinned maps that vanished or were replaced under the running tracker
    (bpffs unmounted, a pin removed): the maps live on in the tracker, but
    audit and kill cannot read them and a restart loses their history.
    0 while all is well (and without pins).

Gauges read 0 until the first poll.
The registry also carries prometheus_client's process_* and python_info
series.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Dict, Iterable, Mapping, Optional, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import PlatformCollector, ProcessCollector, generate_latest

from . import groups
from .health import VERDICTS
from .middlebox import AT_RISK, PAST
from .model import Action, Outcome, OwnerSummary, Verdict
from .sinks import OUTPUTS
from .tally import Tally

IDLE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, math.inf)
POLL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, math.inf)
# engine.Spare.kind values
SPARED_REASONS = ("received-data", "left-selection", "not-rechecked", "verdict-changed")
OUTCOMES = (Action.DESTROYED, Action.WOULD_DESTROY, Action.SHUTDOWN, Action.PROCESS_KILLED,
            Action.GONE, Action.FAILED, Action.KEEPALIVE_SET, Action.WOULD_SET_KEEPALIVE,
            Action.KEEPALIVE_ON)

# The names documented above, for tests and the README.
SERIES = (
    "tcpidle_sockets_seen", "tcpidle_idle_seconds", "tcpidle_kills_total",
    "tcpidle_poll_duration_seconds", "tcpidle_poll_errors_total", "tcpidle_spared_total",
    "tcpidle_output_errors_total",
    "tcpidle_last_poll_timestamp_seconds", "tcpidle_probe_attached",
    "tcpidle_probe_info", "tcpidle_probe_map_entries", "tcpidle_probe_map_capacity",
    "tcpidle_probe_evictions", "tcpidle_probe_pin_problems",
    "tcpidle_connections", "tcpidle_middlebox_at_risk", "tcpidle_middlebox_past",
)


class Metrics:
    """The tracker's series in a registry of their own."""

    def __init__(self, registry: Optional[CollectorRegistry] = None, process: bool = True):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.sockets_seen = Gauge("tcpidle_sockets_seen",
                                  "Connections matched by the selector in the last poll.",
                                  registry=r)
        self.idle_seconds = Histogram("tcpidle_idle_seconds",
                                      "Idle time of matched connections, observed each poll.",
                                      buckets=IDLE_BUCKETS, registry=r)
        self.kills = Counter("tcpidle_kills", "Victims acted on, by outcome.", ["outcome"],
                             registry=r)
        for outcome in OUTCOMES:
            self.kills.labels(outcome)  # every outcome visible from the start, at 0
        self.poll_duration = Histogram("tcpidle_poll_duration_seconds", "Duration of one poll.",
                                       buckets=POLL_BUCKETS, registry=r)
        self.poll_errors = Counter("tcpidle_poll_errors", "Polls that failed (retried).",
                                   registry=r)
        self.output_errors = Counter("tcpidle_output_errors", "Lines that could not be "
                                     "written, by output.", ["output"], registry=r)
        for output in OUTPUTS:
            self.output_errors.labels(output)
        self.spared = Counter("tcpidle_spared", "Victims left alone by the re-check right "
                              "before the destroy, by reason.", ["reason"], registry=r)
        for reason in SPARED_REASONS:
            self.spared.labels(reason)
        self.last_poll = Gauge("tcpidle_last_poll_timestamp_seconds",
                               "Unix time of the last successful poll.", registry=r)
        self.probe_attached = Gauge("tcpidle_probe_attached",
                                    "1 while the BPF probe runs, else 0.", registry=r)
        self.probe_info = Gauge("tcpidle_probe_info", "1 for the BPF probe attached, by "
                                "hook and storage.", ["hook", "storage"], registry=r)
        self.map_entries = Gauge("tcpidle_probe_map_entries",
                                 "Entries in the BPF activity map.", registry=r)
        self.map_capacity = Gauge("tcpidle_probe_map_capacity",
                                  "max_entries of the BPF activity map.", registry=r)
        self.evictions = Gauge("tcpidle_probe_evictions",
                               "LRU evictions from the activity map since it was created.",
                               registry=r)
        self.pin_problems = Gauge("tcpidle_probe_pin_problems",
                                  "Pinned maps vanished or replaced under the running tracker.",
                                  registry=r)
        self.connections = Gauge("tcpidle_connections",
                                 "Connections matched in the last poll, by health verdict.",
                                 ["verdict"], registry=r)
        for name in VERDICTS:
            self.connections.labels(name)
        self.at_risk = Gauge("tcpidle_middlebox_at_risk", "With --middlebox: connections at risk "
                             "of its idle timeout in the last poll, by owner comm.", ["comm"],
                             registry=r)
        self.past = Gauge("tcpidle_middlebox_past", "With --middlebox: connections past its idle "
                          "timeout in the last poll, by owner comm.", ["comm"], registry=r)
        self._server = None

    # -- feeding -----------------------------------------------------------------

    def observe_batch(self, outcomes: Sequence[Outcome], spared_kinds: Sequence[str] = ()) -> None:
        """One destroy batch, counted as soon as it is done: outcomes, and the
        Spare.kind of each victim spared."""
        for o in outcomes:
            self.kills.labels(o.action).inc()
        for kind in spared_kinds:
            self.spared.labels(kind).inc()

    def observe_poll(self, verdicts: Sequence[Verdict], outcomes: Sequence[Outcome],
                     seconds: float, wall_time: float, spared: int = 0,
                     owners: Optional[Mapping[int, OwnerSummary]] = None) -> None:
        """The end of a poll, given every matched verdict: observe_tally of their Tally."""
        self.observe_tally(Tally.of(verdicts), outcomes, seconds, wall_time, spared, owners)

    def observe_tally(self, tally: Tally, outcomes: Sequence[Outcome],
                      seconds: float, wall_time: float, spared: int = 0,
                      owners: Optional[Mapping[int, OwnerSummary]] = None) -> None:
        """The end of a poll, as its Tally counted it (the engine keeps no verdict
        per socket); `outcomes` and `spared` (received data) are counted here only
        if no observe_batch counted them.  `owners` (by inode) name the processes
        of the connections a middlebox policy found exposed."""
        self.sockets_seen.set(tally.matched)
        observe_many(self.idle_seconds, (ms / 1000.0 for ms in tally.idle_ms))
        by_verdict = dict.fromkeys(VERDICTS, 0)
        by_verdict.update(tally.by_verdict)
        for name, n in by_verdict.items():
            self.connections.labels(name).set(n)
        self.at_risk.clear()
        self.past.clear()
        if tally.exposed:
            for g in groups.count(tally.exposed, "comm", owners or {}, label=lambda v: v.exposure,
                                  columns=(PAST, AT_RISK)):
                self.past.labels(g.key).set(g.counts[PAST])
                self.at_risk.labels(g.key).set(g.counts[AT_RISK])
        self.observe_batch(outcomes, ["received-data"] * spared)
        self.poll_duration.observe(seconds)
        self.last_poll.set(wall_time)

    def observe_error(self, seconds: Optional[float] = None) -> None:
        self.poll_errors.inc()
        if seconds is not None:
            self.poll_duration.observe(seconds)

    def observe_output_errors(self, lost: Dict[str, int]) -> None:
        """Lines lost per output since the last call (sinks.say_new_failures)."""
        for output, lines in lost.items():
            self.output_errors.labels(output).inc(lines)

    def observe_probe(self, stats: Optional[Dict[str, int]]) -> None:
        """The probe's stats() (None: no probe attached)."""
        if stats is None:
            self.probe_attached.set(0)
            return
        self.probe_attached.set(1)
        self.map_entries.set(stats["entries"])
        self.map_capacity.set(stats["max_entries"])
        self.evictions.set(stats["evicted"])

    def observe_pins(self, problems: int) -> None:
        """How many pins are missing or replaced (0: all well, or not pinned)."""
        self.pin_problems.set(problems)

    def observe_probe_kind(self, hook: str, storage: str) -> None:
        """Which hook and storage the attached probe uses (once, at start)."""
        self.probe_info.clear()
        self.probe_info.labels(hook, storage).set(1)

    # -- exposing ----------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition, as the endpoint serves it."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve /metrics on addr:port from a daemon thread; OSError if it cannot bind."""
        from prometheus_client import start_http_server

        # prometheus_client >= 0.17 returns (server, thread); older ones None.
        self._server = start_http_server(port, addr=addr, registry=self.registry)

    def close(self) -> None:
        server = self._server
        self._server = None
        if isinstance(server, tuple):
            httpd = server[0]
            httpd.shutdown()
            httpd.server_close()


def observe_many(hist: Histogram, values: Iterable[float]) -> None:
    """hist.observe(v) for every v, in one pass: each value's bucket found by
    bisection, each bucket and the sum set once.  observe() walks the bounds
    and takes two locks per value: ~0.46 us a socket, 46 ms of every poll at
    100,000 sockets.  The sum adds the values in order, as observe() would,
    so the exposition is the same to the last digit (unit-tested).  Reaches
    into prometheus_client's Histogram (_upper_bounds, _buckets, _sum, as in
    0.14-0.26); where those differ, it observes one value at a time."""
    bounds = getattr(hist, "_upper_bounds", None)
    buckets = getattr(hist, "_buckets", None)
    total = getattr(hist, "_sum", None)
    if (not isinstance(bounds, list) or not isinstance(buckets, list)
            or len(bounds) != len(buckets) or not bounds or bounds[-1] != math.inf
            or not all(hasattr(b, "inc") for b in buckets)
            or not (hasattr(total, "get") and hasattr(total, "set"))):
        for v in values:
            hist.observe(v)
        return
    counts = [0] * len(bounds)
    acc = total.get()
    for v in values:
        counts[bisect_left(bounds, v)] += 1  # the first bound >= v, as observe() picks
        acc += v
    total.set(acc)
    for bucket, n in zip(buckets, counts):
        if n:
            bucket.inc(n)
