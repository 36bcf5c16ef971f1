"""Pure tests of the tracker's logic (no root, no BPF, no netlink).

Covers: the reuse plan for pinned maps (what is reused, what is refused and
why, the size taken from a pinned map), pin directory checks, the event log
(keys, reopen after rotation), the metrics registry (every documented
series, counters by outcome), and the loop itself driven by a stand-in
engine: a failing poll is contained and retried, usage and privilege errors
end it, request_stop() and SIGTERM wake the sleep between polls at once,
SIGHUP reopens the event log.  The kernel side of all this is exercised by
tests/kernel/test_track.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import threading
import time

import pytest

from tcpidle import report
from tcpidle.errors import PrivilegeError, UsageError
from tcpidle.metrics import OUTCOMES, SERIES, Metrics
from tcpidle.model import AF_INET, Action, Outcome, Policy, Socket, Verdict
from tcpidle.probe import (
    BPF_MAP_TYPE_LRU_HASH,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    COUNTERS,
    VALUE,
    PinError,
    PinInfo,
    check_pin_dir,
    plan_pinned_maps,
)
from tcpidle.polling import Poller
from tcpidle.report import EventLog

ACTIVITY_OK = PinInfo(BPF_MAP_TYPE_LRU_HASH, 8, VALUE.size, 4096)
COUNTERS_OK = PinInfo(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, len(COUNTERS))


# -- pinned maps: reuse plan ------------------------------------------------------


def test_nothing_pinned_creates_at_requested_size():
    assert plan_pinned_maps({"activity": None, "counters": None}, 4096, "/p") == (4096, [], [])


def test_matching_pins_are_reused():
    size, reused, notes = plan_pinned_maps(
        {"activity": ACTIVITY_OK, "counters": COUNTERS_OK}, 4096, "/p")
    assert (size, reused, notes) == (4096, ["activity", "counters"], [])


def test_pinned_size_wins_with_a_warning():
    size, reused, notes = plan_pinned_maps(
        {"activity": ACTIVITY_OK, "counters": COUNTERS_OK}, 65536, "/p")
    assert size == 4096
    assert reused == ["activity", "counters"]
    assert len(notes) == 1
    assert "/p/activity has 4096 entries, not 65536" in notes[0] and "--cleanup" in notes[0]


@pytest.mark.parametrize("bad", [
    PinInfo(BPF_MAP_TYPE_PERCPU_ARRAY, 8, VALUE.size, 4096),  # wrong type
    PinInfo(BPF_MAP_TYPE_LRU_HASH, 4, VALUE.size, 4096),  # wrong key
    PinInfo(BPF_MAP_TYPE_LRU_HASH, 8, 32, 4096),  # older value layout
])
def test_foreign_activity_map_is_refused_with_the_cleanup_hint(bad):
    with pytest.raises(PinError) as e:
        plan_pinned_maps({"activity": bad, "counters": COUNTERS_OK}, 4096, "/pins")
    msg = str(e.value)
    assert msg.startswith("/pins/activity is not a tcpidle activity map")
    assert "tcpidle track --cleanup --pin-dir /pins" in msg


def test_counters_of_another_version_are_refused():
    other = PinInfo(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, len(COUNTERS) - 1)
    with pytest.raises(PinError, match="/p/counters is not a tcpidle counters map"):
        plan_pinned_maps({"activity": ACTIVITY_OK, "counters": other}, 4096, "/p")


def test_half_pinned_is_reused_with_a_note():
    size, reused, notes = plan_pinned_maps({"activity": ACTIVITY_OK, "counters": None}, 4096, "/p")
    assert reused == ["activity"]
    assert notes == ["only activity was pinned in /p: the eviction count starts over"]


def test_pin_dir_is_made_absolute_and_quotes_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_pin_dir("pins") == str(tmp_path / "pins")
    for bad in ('/sys/fs/bpf/a"b', "/sys/fs/bpf/a\\b", "/sys/fs/bpf/a\nb", ""):
        with pytest.raises(UsageError):
            check_pin_dir(bad)


# -- event log ------------------------------------------------------------------------


def outcome(cookie=7, action=Action.DESTROYED, idle_ms=1234.5, source="bpf"):
    s = Socket(cookie=cookie, family=AF_INET, state=1, src="127.0.0.1", sport=40000,
               dst="127.0.0.1", dport=5432, inode=99, uid=0, raw_id=b"\0" * 48,
               last_data_recv_ms=1234)
    return Outcome(Verdict(s, idle_ms, source, 12.0, True), action, None, (42,), ("psql",))


def test_event_log_lines_have_row_keys_ts_and_dry_run(tmp_path):
    path = tmp_path / "events.jsonl"
    ev = EventLog(str(path))
    ev.write([outcome(1), outcome(2, Action.GONE)], dry_run=False)
    ev.write([], dry_run=False)  # nothing, no line
    ev.write([outcome(3, Action.WOULD_DESTROY)], dry_run=True)
    ev.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["cookie"] for r in rows] == [1, 2, 3]
    assert [r["action"] for r in rows] == ["destroyed", "gone", "would-destroy"]
    assert [r["dry_run"] for r in rows] == [False, False, True]
    o = outcome()
    contract = set(report.row(o.verdict, o))  # the JSON output's keys, whatever they grow to
    assert {"cookie", "idle_ms", "idle_source", "action", "error"} <= contract
    for r in rows:
        assert set(r) == contract | {"ts", "dry_run"}
        assert r["ts"].endswith("+00:00") and "T" in r["ts"]
        assert r["idle_source"] == "bpf" and r["pids"] == [42] and r["comms"] == ["psql"]


def test_event_log_reopens_after_rotation(tmp_path):
    path = tmp_path / "events.jsonl"
    ev = EventLog(str(path))
    ev.write([outcome(1)], dry_run=False)
    os.rename(path, tmp_path / "events.jsonl.1")
    ev.write([outcome(2)], dry_run=False)  # still the old file
    ev.reopen()
    ev.write([outcome(3)], dry_run=False)
    ev.close()
    old = [json.loads(x)["cookie"] for x in (tmp_path / "events.jsonl.1").read_text().splitlines()]
    new = [json.loads(x)["cookie"] for x in path.read_text().splitlines()]
    assert (old, new) == ([1, 2], [3])


# -- metrics ----------------------------------------------------------------------------


README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "README.md")


def documented_series():
    """{series: type} from README.md's metrics table, the contract users alert on."""
    with open(README) as f:
        text = f.read()
    table = text[text.index("| series | type | meaning |"):]
    out = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        names, kind = line.split("|")[1:3]
        for name in re.findall(r"`(tcpidle_[a-z_]+)(?:\{[a-z]+\})?`", names):
            out[name] = kind.strip()
    return out


def exported_series(text):
    """{series: type} from the exposition's # TYPE lines, counters named with _total.

    prometheus_client adds a `_created` gauge per counter and histogram (older
    releases type it separately): its own bookkeeping, not one of ours.
    """
    found = dict(re.findall(r"^# TYPE (tcpidle_\w+) (\w+)$", text, re.M))
    out = {}
    for name, kind in found.items():
        if name.endswith("_created") and kind == "gauge":
            base = name[:-len("_created")]
            if base in found or base + "_total" in found:
                continue
        if kind == "counter" and not name.endswith("_total"):
            name += "_total"
        out[name] = kind
    return out


def test_every_documented_series_is_exported_with_its_type():
    documented = documented_series()
    assert len(documented) >= 11 and "tcpidle_spared_total" in documented  # the table was read
    text = Metrics(process=False).render().decode()
    assert exported_series(text) == documented
    assert set(SERIES) == set(documented)  # the list other tests and the dashboard rely on
    every = ("destroyed", "would-destroy", "shutdown", "process-killed", "gone", "failed",
             "keepalive-set", "would-set-keepalive", "keepalive-on")
    for o in every:
        assert 'tcpidle_kills_total{outcome="%s"} 0.0' % o in text
    assert set(OUTCOMES) == set(every)


def test_poll_feeds_gauges_histograms_and_counters():
    m = Metrics(process=False)
    verdicts = [outcome(1, idle_ms=2500.0).verdict, outcome(2, idle_ms=None).verdict,
                outcome(3, idle_ms=90_000_000.0).verdict]
    m.observe_poll(verdicts, [outcome(1), outcome(3, Action.FAILED)], 0.02, 1700000000.0, spared=2)
    m.observe_error(0.5)
    m.observe_probe({"entries": 12, "max_entries": 4096, "evicted": 3})
    text = m.render().decode()
    assert "tcpidle_sockets_seen 3.0" in text
    assert "tcpidle_idle_seconds_count 2.0" in text  # unknown idle time not observed
    assert 'tcpidle_idle_seconds_bucket{le="5.0"} 1.0' in text
    assert 'tcpidle_idle_seconds_bucket{le="86400.0"} 1.0' in text  # 25 h is above a day
    assert 'tcpidle_kills_total{outcome="destroyed"} 1.0' in text
    assert 'tcpidle_kills_total{outcome="failed"} 1.0' in text
    assert "tcpidle_poll_errors_total 1.0" in text
    assert 'tcpidle_spared_total{reason="received-data"} 2.0' in text
    assert 'tcpidle_spared_total{reason="left-selection"} 0.0' in text
    assert "tcpidle_poll_duration_seconds_count 2.0" in text
    assert "tcpidle_last_poll_timestamp_seconds 1.7e+09" in text
    assert "tcpidle_probe_attached 1.0" in text
    assert "tcpidle_probe_map_entries 12.0" in text
    assert "tcpidle_probe_map_capacity 4096.0" in text
    assert "tcpidle_probe_evictions 3.0" in text
    m.observe_probe(None)
    assert "tcpidle_probe_attached 0.0" in m.render().decode()
    m.observe_probe_kind("raw_tracepoint", "lru")
    m.observe_probe_kind("tp_btf", "lru")  # one series: the probe attached now
    text = m.render().decode()
    assert 'tcpidle_probe_info{hook="tp_btf",storage="lru"} 1.0' in text
    assert "raw_tracepoint" not in text


# -- the loop, with a stand-in engine ----------------------------------------------------


class Scripted:
    """Engine stand-in: each scan() pops the next step (an exception or a count)."""

    def __init__(self, steps, policy=Policy(idle_time_ms=1000.0)):
        self.steps = list(steps)
        self.policy = policy
        self.scans = []

    def scan(self, every=True):
        from tcpidle.tally import Tally

        self.scans.append(time.monotonic())
        step = self.steps.pop(0) if self.steps else 0
        if isinstance(step, BaseException):
            raise step

        class S:
            verdicts = [outcome(i).verdict for i in range(step)]
            victims = verdicts
            tally = Tally.of(verdicts)
            matched = seen = step
            missing = []
            owners = {}

            def close(self):
                pass
        return S()

    interrupted = 0

    def act_batches(self, scan, stop=None):
        from tcpidle.engine import Batch

        yield Batch([Outcome(v, Action.DESTROYED) for v in scan.victims], [])


def run_in_thread(tracker):
    box = {}

    def target():
        try:
            tracker.run()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def test_failed_polls_are_retried_and_counted(tmp_path, capsys):
    ev = EventLog(str(tmp_path / "ev"))
    m = Metrics(process=False)
    eng = Scripted([OSError(errno.ENOBUFS, "No buffer space available"), 2,
                    RuntimeError("malformed dump"), 1])
    tr = Poller(eng, 0.05, events=ev, metrics=m)
    t, box = run_in_thread(tr)
    deadline = time.monotonic() + 5
    while len(eng.scans) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    tr.request_stop()
    t.join(2)
    assert not t.is_alive() and "error" not in box
    assert tr.errors == 2 and tr.acted == 3
    assert len(eng.scans) >= 5
    text = m.render().decode()
    assert "tcpidle_poll_errors_total 2.0" in text
    assert 'tcpidle_kills_total{outcome="destroyed"} 3.0' in text
    assert len((tmp_path / "ev").read_text().splitlines()) == 3
    tr.close()
    ev.close()


@pytest.mark.parametrize("fatal", [UsageError("bad"), PrivilegeError("no CAP_NET_ADMIN"),
                                   PermissionError(errno.EPERM, "Operation not permitted")])
def test_usage_and_privilege_errors_end_the_loop(fatal):
    tr = Poller(Scripted([1, fatal, 1]), 0.01)
    with pytest.raises(type(fatal)):
        tr.run()
    assert tr.polls == 1
    tr.close()


def test_request_stop_wakes_the_sleep_at_once():
    eng = Scripted([])
    tr = Poller(eng, 30.0)
    t, box = run_in_thread(tr)
    deadline = time.monotonic() + 5
    while not eng.scans and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # now asleep until the next poll, 30 s away
    asked = time.monotonic()
    tr.request_stop()
    t.join(2)
    assert not t.is_alive()
    assert time.monotonic() - asked < 0.5
    assert len(eng.scans) == 1
    tr.close()


def test_signals_stop_and_reopen_in_the_main_thread(tmp_path):
    """SIGHUP reopens the event log without cutting the sleep short; SIGTERM ends run()."""
    path = tmp_path / "ev"
    ev = EventLog(str(path))
    eng = Scripted([1, 1, 1, 1, 1, 1, 1, 1])
    tr = Poller(eng, 0.2, events=ev)
    before = signal.getsignal(signal.SIGTERM)
    restore = tr.install_signals()
    assert signal.getsignal(signal.SIGTERM) is not before
    pid = os.getpid()

    def sender():
        time.sleep(0.3)
        os.rename(path, str(path) + ".1")
        os.kill(pid, signal.SIGHUP)
        time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)

    threading.Thread(target=sender, daemon=True).start()
    started = time.monotonic()
    try:
        tr.run()
    finally:
        restore()
        tr.close()
        ev.close()
    took = time.monotonic() - started
    assert 0.55 < took < 1.5
    assert signal.getsignal(signal.SIGTERM) is before  # restored
    old = (tmp_path / "ev.1").read_text().splitlines()
    new = path.read_text().splitlines()
    assert old and new, (old, new)
    assert len(old) + len(new) == tr.polls
    # polls keep their pace across the SIGHUP: about one per 0.2 s
    gaps = [b - a for a, b in zip(eng.scans, eng.scans[1:])]
    assert all(g > 0.15 for g in gaps), gaps


# -- the verdicts and the middlebox (issue 11) ------------------------------------------


def test_connections_by_verdict_and_middlebox_exposure_by_comm():
    from tcpidle.model import AF_INET, Health, OwnerSummary, Socket, Verdict

    def v(inode, verdict, exposure=None):
        s = Socket(cookie=inode, family=AF_INET, state=1, src="a", sport=1, dst="b", dport=2,
                   inode=inode, uid=0, raw_id=b"\0" * 48)
        return Verdict(s, 1000.0, "tcp_info", None, False, Health(verdict, "r"), exposure)

    owners = {1: OwnerSummary((10,), ("nginx",)), 2: OwnerSummary((11,), ("nginx",)),
              3: OwnerSummary((12,), ("redis",))}
    m = Metrics(process=False)
    text = m.render().decode()
    for name in ("active", "quiet", "dead", "zero-window", "close-wait", "orphan", "unknown"):
        assert 'tcpidle_connections{verdict="%s"} 0.0' % name in text
    m.observe_poll([v(1, "dead", "past"), v(2, "unknown", "at-risk"), v(3, "quiet", "at-risk"),
                    v(4, "dead", "safe"), v(5, "active")], (), 0.01, 1.0, owners=owners)
    text = m.render().decode()
    assert 'tcpidle_connections{verdict="dead"} 2.0' in text
    assert 'tcpidle_connections{verdict="quiet"} 1.0' in text
    assert 'tcpidle_connections{verdict="zero-window"} 0.0' in text
    assert 'tcpidle_middlebox_at_risk{comm="nginx"} 1.0' in text
    assert 'tcpidle_middlebox_past{comm="nginx"} 1.0' in text
    assert 'tcpidle_middlebox_at_risk{comm="redis"} 1.0' in text
    assert 'tcpidle_middlebox_past{comm="redis"} 0.0' in text
    # The next poll replaces the gauges: names no longer exposed disappear.
    m.observe_poll([v(3, "quiet", "at-risk")], (), 0.01, 2.0, owners=owners)
    text = m.render().decode()
    assert 'comm="nginx"' not in text and 'tcpidle_middlebox_at_risk{comm="redis"} 1.0' in text
    assert 'tcpidle_connections{verdict="dead"} 0.0' in text


def test_polls_collect_the_young_generations_and_all_every_few_polls(monkeypatch):
    """A full collection walks every object of the process (~10 ms a poll, whatever
    the poll did): after each poll the young generations, everything every
    FULL_GC_EVERY polls."""
    from tcpidle import polling

    asked = []
    tr = Poller(Scripted([1] * 70), 0.001)
    monkeypatch.setattr(polling.gc, "collect", lambda generation=2: asked.append(generation))
    monkeypatch.setattr(polling, "FULL_GC_EVERY", 4)
    real_poll = tr.poll_safely

    def poll_then_stop():
        out = real_poll()
        if tr.polls >= 9:
            tr.request_stop()
        return out

    tr.poll_safely = poll_then_stop
    tr.run()
    tr.close()
    assert asked == [1, 1, 1, 2, 1, 1, 1, 2, 1]
