"""Outputs that fail under a real run: a full log file system, a stdout whose reader left.

Issue 15 items 7 and 2 (output part).  The full disk is a 16 KiB tmpfs the
test mounts and fills; the connections are a farm's in a namespace of the
test's own.  What must hold: every kill is done and reported through the
outputs that still work, a failed output is said once (once per poll for
the tracker) and counted, the exit status is 1, and never a traceback.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import REPO_ROOT, parse_json_lines, tcpidle_argv
from lab.netns import in_netns, wait_for

pytestmark = pytest.mark.kernel

PORT = 7301
ECONNABORTED = 103


@pytest.fixture
def full_fs(tmp_path):
    """A directory on a 16 KiB tmpfs, filled to the last byte (new files can still be made)."""
    d = str(tmp_path / "full")
    os.mkdir(d)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tifull", d], check=True)
    try:
        with open(os.path.join(d, "filler"), "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"x" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        yield d
    finally:
        subprocess.run(["umount", d], check=False)


def no_traceback(text):
    return "Traceback" not in text and "Exception ignored" not in text and "--- Logging" not in text


def farm_with_idle(make_farm, netns, n):
    farm = make_farm(netns, max_seconds=300)
    farm.serve([PORT], addrs=("127.0.0.1",))
    clients = []
    for lo in range(0, n, 50):  # one request per 50: each must answer within its timeout
        clients += farm.connect("127.0.0.1", PORT, n=min(50, n - lo), label="idle", timeout=30)
    return farm, clients


def all_aborted(farm, clients, timeout=10):
    ids = [c["id"] for c in clients]
    st = farm.wait_until(lambda s: all(not s[i]["alive"] for i in ids), timeout=timeout)
    return all(st[i]["error"] == ECONNABORTED for i in ids)


def test_one_shot_kill_with_a_full_log_fs(netns, make_farm, run_tcpidle, full_fs):
    farm, clients = farm_with_idle(make_farm, netns, 40)
    log_path = os.path.join(full_fs, "kills.log")
    res = run_tcpidle(netns, "kill", "-d", PORT, "--json", "-f", log_path, "--disable-syslog")
    assert no_traceback(res.stderr), res.stderr
    assert res.returncode == 1, res.stderr
    rows = parse_json_lines(res.stdout)
    assert len(rows) == 40 and {r["action"] for r in rows} == {"destroyed"}  # done and reported
    assert all_aborted(farm, clients)
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, res.stderr  # one clear error; 40 kills and the start-up line lost
    assert errors[0] == ("tcpidle: error: log file %s: No space left on device: 41 lines not "
                         "written" % log_path), res.stderr
    assert os.path.getsize(log_path) == 0


def test_one_shot_kill_with_dev_full_as_log(netns, make_farm, run_tcpidle):
    farm, clients = farm_with_idle(make_farm, netns, 5)
    res = run_tcpidle(netns, "kill", "-d", PORT, "-f", "/dev/full", "--disable-syslog", "-v")
    assert no_traceback(res.stderr), res.stderr
    assert res.returncode == 1
    assert res.stderr.count("destroyed cookie=") == 5  # -v: the kills on stderr still
    assert res.stderr.splitlines()[-1].startswith("tcpidle: error: log file /dev/full: No space")
    assert all_aborted(farm, clients)


def _free_port(ns):
    def pick():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return in_netns(ns.name, pick)


def _scrape(ns, port):
    url = "http://127.0.0.1:%d/metrics" % port
    return in_netns(ns.name, lambda: urllib.request.urlopen(url, timeout=5).read().decode())


def _value(text, series):
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def metrics_once_destroyed(ns, port, n, tracker):
    """The metrics text once they count `n` destroyed (the tracker's stderr if they never do)."""

    def counted():
        text = _scrape(ns, port)
        return text if _value(text, 'tcpidle_kills_total{outcome="destroyed"}') == n else None

    text = wait_for(counted, timeout=10)
    assert text, tracker.stderr()
    return text


class Tracker:
    def __init__(self, ns, tmp_path, *args, stdout=None):
        self.err_path = str(tmp_path / "track.err")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(
            tcpidle_argv(ns, "track", "--disable-syslog", *args),
            stdout=stdout if stdout is not None else subprocess.DEVNULL, stderr=self._err,
            cwd=REPO_ROOT)

    def stderr(self):
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=20)
        self._err.close()
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def tracker(tmp_path):
    made = []

    def start(ns, *args, stdout=None):
        t = Tracker(ns, tmp_path, *args, stdout=stdout)
        made.append(t)
        return t

    yield start
    for t in made:
        t.kill()


def test_tracker_with_a_full_log_fs_counts_and_says_it_once_per_poll(netns, make_farm, tracker,
                                                                   full_fs):
    farm, clients = farm_with_idle(make_farm, netns, 30)
    port = _free_port(netns)
    log_path = os.path.join(full_fs, "track.log")
    events = os.path.join(full_fs, "events.jsonl")
    t = tracker(netns, "-d", PORT, "-t", 200, "--interval", 0.3, "--max-kills-per-interval", 10,
                "-f", log_path, "--event-log", events, "--metrics-port", port)
    assert all_aborted(farm, clients, timeout=60), t.stderr()
    text = metrics_once_destroyed(netns, port, 30, t)
    time.sleep(0.5)  # the poll that made the count has said what it lost
    said = t.stderr().count("not written since the last poll")
    assert _value(text, 'tcpidle_output_errors_total{output="event-log"}') == 30.0
    assert _value(text, 'tcpidle_output_errors_total{output="logfile"}') >= 30.0
    assert _value(text, 'tcpidle_output_errors_total{output="stdout"}') == 0.0
    assert _value(text, "tcpidle_poll_errors_total") == 0.0
    time.sleep(1.5)  # polls with nothing to do: nothing more to say
    assert t.stderr().count("not written since the last poll") == said
    rc = t.stop()
    err = t.stderr()
    assert no_traceback(err), err
    assert rc == 1, err
    polls = int(err.split("stopped after ")[1].split()[0])
    notices = [ln for ln in err.splitlines() if "not written since the last poll" in ln]
    # 30 kills, 10 a poll: three polls lost lines, each said once per output (at most two
    # polls more for the start-up lines), never once per line, never every poll.
    event_notices = [ln for ln in notices if "event log" in ln]
    assert len(event_notices) == 3, notices
    assert 3 <= len(notices) - len(event_notices) <= 5, notices
    assert polls >= 5
    last = err.splitlines()[-2:]
    assert last[0].startswith("tcpidle: error: event log %s: No space left on device: 30 lines"
                              % events), last
    assert last[1].startswith("tcpidle: error: log file %s: No space left on device:" % log_path)


def test_one_shot_kill_json_into_a_closed_pipe_logs_every_kill(netns, make_farm, tmp_path):
    """`kill --json | head -1`: every destroy is still logged; exit 1; said once."""
    farm, clients = farm_with_idle(make_farm, netns, 300)
    log_path = str(tmp_path / "kill.log")
    w = _closed_pipe()
    try:
        res = subprocess.run(tcpidle_argv(netns, "kill", "-d", PORT, "--json", "-f", log_path,
                                          "--disable-syslog"),
                             stdin=subprocess.DEVNULL, stdout=w, stderr=subprocess.PIPE,
                             text=True, timeout=120, cwd=REPO_ROOT)
    finally:
        os.close(w)
    assert no_traceback(res.stderr), res.stderr
    assert res.returncode == 1, res.stderr
    logged = open(log_path).read().splitlines()
    assert sum(" destroyed cookie=" in ln for ln in logged) == 300
    assert sum("stdout: Broken pipe" in ln for ln in logged) == 1
    err = res.stderr.splitlines()
    assert sum("stdout: Broken pipe: rows are no longer printed" in ln for ln in err) == 1, err
    assert "kill: 300 destroyed" in res.stderr  # the summary is still made
    assert err[-1].startswith("tcpidle: error: stdout: Broken pipe:")
    assert all_aborted(farm, clients)


def _closed_pipe():
    """The write end of a pipe whose read end is closed: the first write is EPIPE."""
    r, w = os.pipe()
    os.close(r)
    return w


def test_tracker_json_into_a_closed_pipe_keeps_events_and_metrics(netns, make_farm, tracker,
                                                                  tmp_path):
    """`track --json | head -1` must not cost the event log or the metrics anything."""
    farm, clients = farm_with_idle(make_farm, netns, 200)
    port = _free_port(netns)
    events = str(tmp_path / "events.jsonl")
    log_path = str(tmp_path / "track.log")
    w = _closed_pipe()
    t = tracker(netns, "-d", PORT, "-t", 200, "--interval", 0.3, "--max-kills-per-interval", 50,
                "--json", "-f", log_path, "--event-log", events, "--metrics-port", port, stdout=w)
    os.close(w)
    assert all_aborted(farm, clients, timeout=60), t.stderr()
    text = metrics_once_destroyed(netns, port, 200, t)
    assert _value(text, 'tcpidle_output_errors_total{output="stdout"}') >= 1.0
    rc = t.stop()
    err = t.stderr()
    assert no_traceback(err), err
    assert rc == 1
    with open(events) as f:
        lines = [json.loads(ln) for ln in f]
    assert len(lines) == 200 and {e["action"] for e in lines} == {"destroyed"}
    logged = open(log_path).read()
    assert logged.count(" destroyed cookie=") == 200
    assert logged.count("stdout: Broken pipe") == 1  # said once, not per poll
    assert err.count("stdout: Broken pipe: rows are no longer printed") == 1
