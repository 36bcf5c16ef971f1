"""The idle decision and the merge rule, as pure functions."""

import pytest

from tcpidle.idle import JIFFY_SLACK_MS, decide, merge, received_since, tcp_info_received_since
from tcpidle.model import AF_INET, Activity, Policy, Socket

MS = 1_000_000
NOW = 10_000_000 * MS


def sock(last_data_recv=None, last_ack_recv=None, state=1):
    return Socket(cookie=7, family=AF_INET, state=state, src="127.0.0.1", sport=1, dst="127.0.0.1",
                  dport=2, inode=3, uid=0, raw_id=b"\0" * 48, last_data_recv_ms=last_data_recv,
                  last_ack_recv_ms=last_ack_recv)


def act(data_ago_ms=None, seg_ago_ms=None):
    return Activity(cookie=7,
                    last_segment_ns=NOW - int(seg_ago_ms * MS) if seg_ago_ms is not None else 0,
                    last_data_ns=NOW - int(data_ago_ms * MS) if data_ago_ms is not None else 0)


def test_tcp_info_only():
    assert merge(sock(5000), None, NOW, Policy()) == (5000.0, "tcp_info", None)


def test_no_tcp_info_no_probe_is_unknown():
    assert merge(sock(None), None, NOW, Policy()) == (None, None, None)


def test_probe_refines_within_a_jiffy():
    idle, source, last_rx = merge(sock(5000), act(5003.25, 1.5), NOW, Policy())
    assert (idle, source, last_rx) == (5003.25, "bpf", 1.5)


def test_probe_never_idler_than_tcp_info():
    # The probe last saw data 60 s ago but tcp_info says 5 s: the probe missed
    # traffic (it was detached), so tcp_info wins.
    idle, source, _ = merge(sock(5000), act(60000, 60000), NOW, Policy())
    assert (idle, source) == (5000.0, "tcp_info")
    idle, source, _ = merge(sock(5000), act(5000 + JIFFY_SLACK_MS + 1, 1), NOW, Policy())
    assert source == "tcp_info"


def test_probe_may_be_fresher_than_tcp_info():
    idle, source, _ = merge(sock(5000), act(12.5, 12.5), NOW, Policy())
    assert (idle, source) == (12.5, "bpf")


def test_idle_metric_any_counts_acks():
    s = sock(last_data_recv=9000, last_ack_recv=100)
    assert merge(s, None, NOW, Policy(idle_metric="data"))[0] == 9000.0
    assert merge(s, None, NOW, Policy(idle_metric="any"))[0] == 100.0
    a = act(data_ago_ms=9000, seg_ago_ms=50)
    assert merge(s, a, NOW, Policy(idle_metric="data"))[:2] == (9000.0, "bpf")
    assert merge(s, a, NOW, Policy(idle_metric="any"))[:2] == (50.0, "bpf")


def test_probe_without_data_falls_back_to_tcp_info():
    idle, source, last_rx = merge(sock(7000), act(None, 3), NOW, Policy())
    assert (idle, source, last_rx) == (7000.0, "tcp_info", 3.0)


def test_last_recv_limit_makes_bogus_values_unknown():
    p = Policy(idle_time_ms=1000, last_recv_limit_ms=86_400_000)
    v = decide(sock(4_000_000_000), None, NOW, p)
    assert v.idle_ms is None and v.idle_source is None and not v.victim
    assert decide(sock(5000), None, NOW, p).victim


@pytest.mark.parametrize("idle_time, last_recv, victim", [
    (0, None, True),      # -t 0: every matched connection, even with unknown idle time
    (0, 10, True),
    (1000, 999, False),
    (1000, 1000, True),
    (1000, None, False),  # unknown idle time is never "idle enough"
])
def test_decide_threshold(idle_time, last_recv, victim):
    assert decide(sock(last_recv), None, NOW, Policy(idle_time_ms=idle_time)).victim is victim


@pytest.mark.parametrize("state", [10, 2])  # LISTEN, SYN_SENT: tcp_info's stamp is meaningless
def test_no_receive_path_is_unknown(state):
    v = decide(sock(123456, state=state), None, NOW, Policy(idle_time_ms=1))
    assert (v.idle_ms, v.idle_source, v.victim) == (None, None, False)


# -- the re-check before a destroy ---------------------------------------------

ANY = Policy(idle_metric="any")


def test_new_data_since_the_scan_wakes_the_victim():
    assert received_since(act(9000, 9000), act(1, 1), Policy())
    assert received_since(act(9000, 9000), act(1, 1), ANY)


def test_same_stamps_are_no_news():
    assert not received_since(act(9000, 5), act(9000, 5), Policy())
    assert not received_since(act(9000, 5), act(9000, 5), ANY)


def test_a_pure_ack_wakes_only_under_idle_metric_any():
    before, after = act(9000, 9000), act(9000, 1)
    assert not received_since(before, after, Policy())
    assert received_since(before, after, ANY)


def test_an_entry_made_after_the_scan_is_news_and_a_missing_one_is_not():
    assert received_since(None, act(1, 1), Policy())
    assert not received_since(None, act(None, 1), Policy())  # segments, no payload
    assert not received_since(act(9000, 9000), None, Policy())
    assert not received_since(None, None, ANY)



def test_tcp_info_shows_a_receive_by_a_younger_age():
    assert tcp_info_received_since(sock(9000), sock(3), Policy())
    assert not tcp_info_received_since(sock(9000), sock(9300), Policy())  # only older
    assert not tcp_info_received_since(sock(9000), sock(9000), Policy())


def test_tcp_info_ack_counts_only_under_idle_metric_any():
    before, after = sock(9000, last_ack_recv=9000), sock(9300, last_ack_recv=5)
    assert not tcp_info_received_since(before, after, Policy())
    assert tcp_info_received_since(before, after, ANY)


def test_unknown_tcp_info_ages_are_no_evidence():
    assert not tcp_info_received_since(sock(None), sock(3), Policy())
    assert not tcp_info_received_since(sock(9000), sock(None), Policy())
    limited = Policy(last_recv_limit_ms=5000)
    assert not tcp_info_received_since(sock(9000), sock(3), limited)  # 9000 ms is over the limit
