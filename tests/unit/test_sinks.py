"""Outputs that fail (tcpidle.sinks): counted, said once, never a traceback, never a stop.

/dev/full answers every write with ENOSPC, for any user: a full disk without
root.  A broken stdout is a pipe whose reader is gone, in a child process.
"""

import logging
import os
import subprocess
import sys

import pytest

from tcpidle import report, sinks
from tcpidle.metrics import Metrics


@pytest.fixture(autouse=True)
def fresh_failures():
    sinks.FAILURES.clear()
    yield
    sinks.FAILURES.clear()
    for h in list(report.log.handlers):
        h.close()
    report.log.handlers.clear()


def test_append_file_records_enospc_and_goes_on():
    f = sinks.AppendFile("/dev/full", sinks.LOGFILE)
    try:
        assert f.write("one\n") is False
        assert f.write("two\nthree\n", lines=2) is False
    finally:
        f.close()
    assert sinks.FAILURES.lost[sinks.LOGFILE] == 3
    assert sinks.FAILURES.summary() == [
        "log file /dev/full: No space left on device: 3 lines not written"]


def test_append_file_writes_whole_lines(tmp_path):
    path = str(tmp_path / "x")
    f = sinks.AppendFile(path, sinks.EVENT_LOG)
    assert f.write("a\n") and f.write("b\n")
    f.close()
    assert open(path).read() == "a\nb\n"
    assert not sinks.FAILURES.summary()


def test_reopen_keeps_the_old_file_when_the_new_cannot_be_opened(tmp_path, caplog):
    d = tmp_path / "d"
    d.mkdir()
    path = str(d / "x")
    f = sinks.AppendFile(path, sinks.LOGFILE)
    os.rename(path, str(tmp_path / "rotated"))
    d.rmdir()
    with caplog.at_level(logging.ERROR, logger="tcpidle"):
        f.reopen()
    assert "cannot reopen" in caplog.text
    assert f.write("still\n")
    f.close()
    assert open(str(tmp_path / "rotated")).read() == "still\n"


def test_log_file_on_a_full_disk_is_no_traceback(capsys):
    report.setup_logging(verbose=0, logfile="/dev/full", syslog=False)
    for i in range(40):
        report.log.info("destroyed cookie=%d", i)
    assert capsys.readouterr().err == ""  # nothing at all while it happens
    assert sinks.FAILURES.lost[sinks.LOGFILE] == 40
    assert logging.raiseExceptions is False


def test_notice_once_per_call_and_not_to_the_failed_file(capsys):
    report.setup_logging(verbose=0, logfile="/dev/full", syslog=False)
    report.log.info("a")
    report.log.info("b")
    assert sinks.say_new_failures() == {sinks.LOGFILE: 2}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 lines not written since the last poll" in err
    assert sinks.FAILURES.lost[sinks.LOGFILE] == 2  # the notice itself was not sent there
    assert sinks.say_new_failures() == {}  # nothing new: nothing said
    assert capsys.readouterr().err == ""


def test_exit_status_says_each_failed_output_once(capsys):
    assert sinks.exit_status(0) == 0
    sinks.FAILURES.record(sinks.EVENT_LOG, "event log /x", OSError(5, "Input/output error"), 4)
    assert sinks.exit_status(0) == 1
    assert sinks.exit_status(2) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "tcpidle: error: event log /x: Input/output error: 4 lines not written"


def test_output_errors_metric():
    m = Metrics(process=False)
    m.observe_output_errors({sinks.LOGFILE: 3})
    text = m.render().decode()
    assert 'tcpidle_output_errors_total{output="logfile"} 3.0' in text
    assert 'tcpidle_output_errors_total{output="stdout"} 0.0' in text


CHILD = r"""
import sys, time
from tcpidle import report, sinks
report.setup_logging(verbose=0, logfile=sys.argv[1], syslog=False)
time.sleep(0.3)  # the reader is gone by now
for i in range(200):
    sinks.stdout().write("row %d\n" % i)
    sinks.stdout().flush()
    report.log.info("destroyed %d", i)
print("late")  # a direct write after the break (any code, not only report's) fails no more
sys.stdout.flush()
sys.exit(sinks.exit_status(0))
"""


def test_broken_stdout_drops_rows_not_the_log(tmp_path):
    log_path = str(tmp_path / "log")
    r, w = os.pipe()
    os.close(r)  # no reader: the first write is EPIPE
    proc = subprocess.run([sys.executable, "-c", CHILD, log_path], stdout=w,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(w)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == ("tcpidle: stdout: Broken pipe: rows are no longer printed; the log, "
                        "event log and metrics go on")
    assert lines[-1] == "tcpidle: error: stdout: Broken pipe: 200 lines not written"
    assert len(lines) == 2
    logged = open(log_path).read().splitlines()
    assert sum("destroyed" in line for line in logged) == 200
    assert sum("stdout: Broken pipe" in line for line in logged) == 1
