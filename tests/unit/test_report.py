"""The output contract: JSON keys exactly as DESIGN.md, table and log lines."""

import io
import json
import logging

from tcpidle import report
from tcpidle.model import AF_INET6, Health, Outcome, Socket, Verdict, Vitals
from tcpidle.owners import Owner, summarize

CONTRACT_KEYS = ["cookie", "netns", "family", "state", "src", "sport", "dst", "dport", "idle_ms",
                 "idle_source", "last_rx_ms", "inode", "uid", "pids", "comms", "cgroups",
                 # issue 11: the verdict and its evidence
                 "verdict", "verdict_reason", "keepalive", "unacked", "retrans", "backoff",
                 "last_ack_ms", "last_send_ms", "send_q", "recv_q", "middlebox"]


def nginx(pid, fd=3):
    return Owner(pid, fd, "nginx", "/system.slice/nginx.service")


def verdict(netns=None, idle_ms=1234.5678, source="bpf"):
    s = Socket(cookie=42, family=AF_INET6, state=1, src="fd00::1", sport=5000, dst="fd00::2",
               dport=443, inode=999, uid=1000, raw_id=b"\0" * 48, last_data_recv_ms=1234, netns=netns)
    return Verdict(s, idle_ms, source, 3.25, True)


def test_audit_row_has_exactly_the_contract_keys():
    obj = report.row(verdict(), owners={999: summarize([nginx(7), nginx(3)])})
    assert list(obj) == CONTRACT_KEYS
    assert obj["family"] == "ipv6" and obj["state"] == "ESTABLISHED"
    assert obj["idle_ms"] == 1234.568 and obj["last_rx_ms"] == 3.25
    assert obj["pids"] == [3, 7] and obj["comms"] == ["nginx"]
    assert obj["cgroups"] == ["/system.slice/nginx.service"]
    assert obj["netns"] is None


def test_kill_row_adds_action_and_error():
    o = Outcome(verdict(netns="blue"), "failed", "SOCK_DESTROY: boom", (5,), ("redis",), ("/k8s/pod1",))
    obj = report.row(o.verdict, o)
    assert obj["cgroups"] == ["/k8s/pod1"]
    assert list(obj) == CONTRACT_KEYS + ["action", "error"]
    assert (obj["action"], obj["error"], obj["netns"]) == ("failed", "SOCK_DESTROY: boom", "blue")


def test_json_lines_round_trip():
    out = io.StringIO()
    report.show([verdict(), verdict(idle_ms=None, source=None)], True, out=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    # Ground truth: the fields of verdict() as the contract spells them.
    assert json.loads(lines[0]) == {
        "cookie": 42, "netns": None, "family": "ipv6", "state": "ESTABLISHED",
        "src": "fd00::1", "sport": 5000, "dst": "fd00::2", "dport": 443,
        "idle_ms": 1234.568, "idle_source": "bpf", "last_rx_ms": 3.25, "inode": 999, "uid": 1000,
        "pids": [], "comms": [], "cgroups": [],
        # verdict() has no evidence of health: every key of it is null
        "verdict": None, "verdict_reason": None, "keepalive": None, "unacked": None,
        "retrans": None, "backoff": None, "last_ack_ms": None, "last_send_ms": None,
        "send_q": None, "recv_q": None, "middlebox": None,
    }
    second = json.loads(lines[1])
    assert (second["idle_ms"], second["idle_source"]) == (None, None)


def test_json_escapes_names_that_need_it():
    o = Outcome(verdict(netns='we"ird\\ns'), "failed", 'line "one"\nline two', (5,), ('ev"il',), ("/a\tb",))
    out = io.StringIO()
    report.show([o], True, out=out)
    obj = json.loads(out.getvalue())
    assert obj["netns"] == 'we"ird\\ns' and obj["error"] == 'line "one"\nline two'
    assert obj["comms"] == ['ev"il'] and obj["cgroups"] == ["/a\tb"]


def test_table_brackets_ipv6_and_aligns():
    out = io.StringIO()
    o = Outcome(verdict(netns=4026532000), "destroyed", None, (5, 9), ("redis",))
    report.show([o], False, out=out)
    header, line = out.getvalue().splitlines()
    assert header.split() == ["NETNS", "STATE", "LOCAL", "PEER", "IDLE_MS", "SOURCE", "VERDICT", "OWNER",
                              "COOKIE", "ACTION"]
    assert "[fd00::1]:5000" in line and "[fd00::2]:443" in line and "redis[5,9]" in line
    assert line.split()[0] == "4026532000" and line.endswith("destroyed")


def test_every_kill_is_logged_with_cookie_tuple_idle_source_outcome(tmp_path):
    logfile = tmp_path / "kills.log"
    report.setup_logging(0, str(logfile), syslog=False)
    try:
        report.log_outcome(Outcome(verdict(), "destroyed", None, (5,), ("redis",)))
    finally:
        for h in list(logging.getLogger("tcpidle").handlers):
            h.close()
    text = logfile.read_text()
    for needle in ("destroyed", "cookie=42", "[fd00::1]:5000", "[fd00::2]:443", "idle_ms=1235",
                   "source=bpf", "owners=redis[5]"):
        assert needle in text, needle


def test_kill_summary_counts_outcomes_and_spared_victims(capsys):
    o = Outcome(verdict(), "destroyed", None)
    report.summary_kill([o, o], 5, 3, 12.0, False, spared=1)
    assert capsys.readouterr().err.strip().endswith(
        "kill: 2 destroyed, 1 spared (data received after the scan); 3 idle of 5 matched; 12 ms")
    report.summary_kill([], 5, 1, 3.0, False, prefix="track", spared=1)
    assert "track: 1 spared (data received after the scan); 1 idle" in capsys.readouterr().err
    report.summary_kill([], 5, 0, 3.0, True)
    assert "kill (dry run): nothing to do; 0 idle of 5 matched" in capsys.readouterr().err


def test_kill_summary_names_each_reason_and_a_cut_short_pass(capsys):
    o = Outcome(verdict(), "destroyed")
    report.summary_kill([o], 9, 6, 5.0, False, spared=["left-selection", "received-data",
                                                       "left-selection"],
                        cut="stopped by a signal", left=2)
    assert capsys.readouterr().err == (
        "tcpidle: kill: 1 destroyed, 3 spared (2 left the selection, 1 data received after the "
        "scan); 6 idle of 9 matched; 5 ms; stopped by a signal, 2 not acted on\n")
    report.summary_kill([], 1, 1, 1.0, False, spared=["not-rechecked"])
    assert "1 spared (not asked about again)" in capsys.readouterr().err


def test_spared_victims_are_logged_with_their_reason(caplog):
    from tcpidle.engine import LEFT_SELECTION, NOT_RECHECKED, RECEIVED, Spare

    v = verdict()
    assert [Spare(v, r).kind for r in (RECEIVED, LEFT_SELECTION % "FIN_WAIT1",
                                       NOT_RECHECKED + ": INET_DIAG lookup failed")] == [
        "received-data", "left-selection", "not-rechecked"]
    with caplog.at_level("INFO", logger="tcpidle"):
        report.log_batch([], [Spare(v, LEFT_SELECTION % "FIN_WAIT1")])
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("spared cookie=%d " % v.socket.cookie)
    assert line.endswith(": left the selection (now FIN_WAIT1)")


def evidenced(reason="2 segments unacknowledged after 3 retransmission timeouts", exposure=None):
    s = Socket(cookie=43, family=AF_INET6, state=1, src="fd00::1", sport=5000, dst="fd00::2",
               dport=443, inode=999, uid=0, raw_id=b"\0" * 48, last_data_recv_ms=70000,
               last_ack_recv_ms=61000, last_data_sent_ms=250,
               vitals=Vitals(2, 0, 4000, 17, 4096, 2, 3, 11, 4, 0, 65535))
    return Verdict(s, 70000.0, "tcp_info", None, True, Health("dead", reason), exposure)


def test_health_keys_carry_the_verdict_and_its_evidence():
    obj = report.row(evidenced(exposure="past"))
    assert list(obj) == CONTRACT_KEYS
    assert obj["verdict"] == "dead"
    assert obj["verdict_reason"] == "2 segments unacknowledged after 3 retransmission timeouts"
    assert (obj["keepalive"], obj["unacked"], obj["retrans"], obj["backoff"]) == (True, 2, 3, 4)
    assert (obj["last_ack_ms"], obj["last_send_ms"]) == (61000, 250)
    assert (obj["send_q"], obj["recv_q"], obj["middlebox"]) == (4096, 17, "past")


def test_health_keys_are_null_without_evidence():
    obj = report.row(verdict())
    assert all(obj[k] is None for k in CONTRACT_KEYS[16:]), obj
    no_info = evidenced()._replace(socket=evidenced().socket.__class__(
        **{**evidenced().socket.__dict__, "vitals": Vitals(0, 0, 0, 0, 0)}))
    obj = report.row(no_info)
    assert obj["keepalive"] is False and obj["send_q"] == 0
    assert obj["unacked"] is None and obj["retrans"] is None and obj["backoff"] is None


def test_a_reason_that_needs_escaping_is_escaped():
    obj = report.row(evidenced(reason='odd "quoted" \\ text\n'))
    assert obj["verdict_reason"] == 'odd "quoted" \\ text\n'


def test_table_shows_the_verdict_and_the_middlebox_column_only_with_one():
    out = io.StringIO()
    report.show([evidenced()], False, out=out)
    header, line = out.getvalue().splitlines()
    assert header.split()[4:7] == ["SOURCE", "VERDICT", "OWNER"] and " dead " in line
    out = io.StringIO()
    report.show([evidenced(exposure="at-risk")], False, out=out)
    header, line = out.getvalue().splitlines()
    assert header.split()[4:8] == ["SOURCE", "VERDICT", "MIDDLEBOX", "OWNER"] and "at-risk" in line
