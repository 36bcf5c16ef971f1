"""Owners' text made printable (tcpidle.safetext) wherever tcpidle prints or logs it."""

import json
import logging

import pytest

from tcpidle import report, sinks
from tcpidle.model import Outcome, Socket, TcpState, Verdict
from tcpidle.safetext import printable

EVIL = "\x1b[2J\x1b]0;pwned\x07ok\r\n\x7f\x9b31m\u202eabc\u2028\ud83d\\x"


@pytest.mark.parametrize("text, expected", [
    ("nginx", "nginx"),
    ("café ☕ 東京", "café ☕ 東京"),
    ("a b", "a b"),
    ("\x1b[31m", "\\x1b[31m"),
    ("\t\n\r", "\\t\\n\\r"),
    ("\x00\x7f", "\\x00\\x7f"),
    ("\x9b\x85", "\\x9b\\x85"),  # C1 controls (CSI, NEL)
    ("\u202e", "\\u202e"),  # RIGHT-TO-LEFT OVERRIDE
    ("\u2028", "\\u2028"),  # LINE SEPARATOR
    ("\u00a0", "\\xa0"),  # no-break space: not printable, looks like one
    ("\udcff", "\\udcff"),  # a lone surrogate (surrogateescape of an invalid byte)
    ("\U000e0001", "\\U000e0001"),  # a tag character (format)
    ("back\\slash", "back\\\\slash"),  # an escape in the output is always ours
    (123, "123"),
])
def test_printable(text, expected):
    assert printable(text) == expected


def test_printable_leaves_no_control_character():
    out = printable(EVIL)
    assert out.isprintable()
    assert "\x1b" not in out and "\n" not in out and "\x9b" not in out


def _verdict(comm=EVIL, cgroup="/evil" + EVIL, netns="ns" + EVIL):
    sock = Socket(family=2, state=int(TcpState.ESTABLISHED), src="10.0.0.1", sport=1234,
                  dst="10.0.0.2", dport=80, cookie=42, inode=7, uid=0, raw_id=b"\0" * 48,
                  netns=netns)
    v = Verdict(sock, victim=True, idle_ms=5.0, idle_source="tcp_info", last_rx_ms=None)
    return v, Outcome(v, "failed", "SOCK_DESTROY: " + EVIL, (99,), (comm,), (cgroup,))


def test_table_escapes_every_cell(capsys):
    _v, outcome = _verdict()
    report.show([outcome], as_json=False, out=None)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x9b" not in out and "\u202e" not in out
    assert out.count("\n") == 2  # header and one row: the owner's \r\n forged no line
    assert "\\x1b[2J" in out


def test_json_is_escaped_by_the_encoder_del_included():
    verdict, outcome = _verdict()
    line = report.json_line(verdict, outcome)
    assert line.isascii() and line.isprintable()
    obj = json.loads(line)
    assert obj["comms"] == [EVIL] and obj["cgroups"] == ["/evil" + EVIL]
    assert obj["netns"] == "ns" + EVIL and obj["error"].endswith(EVIL)


def test_log_lines_are_escaped(tmp_path, capsys):
    path = str(tmp_path / "log")
    report.setup_logging(verbose=1, logfile=path, syslog=False)
    try:
        _v, outcome = _verdict()
        report.log_outcome(outcome)
        report.log.warning("cgroup %s", "/x" + EVIL)
    finally:
        for h in list(report.log.handlers):
            h.close()
        report.log.handlers.clear()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    err = capsys.readouterr().err
    for where in (text, err):
        assert "\x1b" not in where and "\x9b" not in where and "\r" not in where
        assert len(where.splitlines()) == 2, where  # two records, two lines
        assert "\\x1b[2J" in where


def test_stderr_notes_and_errors_are_escaped(capsys):
    report.note("removed /sys/fs/bpf/" + EVIL)
    report.error("--netns " + EVIL)
    err = capsys.readouterr().err
    assert "\x1b" not in err and len(err.splitlines()) == 2


def test_printable_formatter_keeps_tracebacks_apart():
    fmt = sinks.PrintableFormatter("%(message)s")
    rec = logging.LogRecord("tcpidle", logging.INFO, __file__, 1, "a %s", (EVIL,), None)
    assert fmt.format(rec) == "a " + printable(EVIL)
