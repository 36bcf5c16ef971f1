"""The health verdicts and the middlebox rule, as pure functions: every rule, its
boundaries, and the order in which the rules are tried."""

import pytest

from tcpidle import health, middlebox
from tcpidle.errors import UsageError
from tcpidle.health import (ACTIVE, CLOSE_WAIT, DEAD, ORPHAN, QUIET, UNKNOWN, ZERO_WINDOW, assess,
                            peer_heard_ms)
from tcpidle.idle import decide
from tcpidle.model import AF_INET, Activity, Policy, Socket, TcpState, Vitals

W = 10_000.0  # the window of these tests
MS = 1_000_000
NOW = 10_000_000 * MS


def vit(timer=0, tretrans=0, expires=0, recv_q=0, send_q=0, unacked=0, retransmits=0, backoff=0,
        probes=0, snd_wnd=65536, info=True):
    if not info:
        return Vitals(timer, tretrans, expires, recv_q, send_q)
    return Vitals(timer, tretrans, expires, recv_q, send_q, unacked, retransmits, 7, backoff, probes,
                  snd_wnd)


def sk(state=TcpState.ESTABLISHED, inode=99, data_recv=60_000, ack_recv=60_000, data_sent=60_000,
       vitals=None, **kw):
    return Socket(cookie=7, family=AF_INET, state=state, src="10.0.0.1", sport=1, dst="10.0.0.2",
                  dport=2, inode=inode, uid=0, raw_id=b"\0" * 48, last_data_recv_ms=data_recv,
                  last_ack_recv_ms=ack_recv, last_data_sent_ms=data_sent,
                  vitals=vitals if vitals is not None else vit(**kw))


def verdict(s, idle=None, last_rx=None, window=W):
    if idle is None and s.last_data_recv_ms is not None:
        idle = float(s.last_data_recv_ms)
    return assess(s, idle, last_rx, window)


# -- states are facts --------------------------------------------------------------


def test_close_wait_names_what_is_left_unread():
    h = verdict(sk(TcpState.CLOSE_WAIT, recv_q=120))
    assert h.verdict == CLOSE_WAIT and "120 bytes unread" in h.reason
    assert verdict(sk(TcpState.CLOSE_WAIT, inode=0)).reason.endswith("(never accepted)")


def test_close_wait_wins_over_the_evidence_of_death():
    s = sk(TcpState.CLOSE_WAIT, unacked=3, retransmits=9, timer=1, ack_recv=50_000, data_sent=10)
    assert verdict(s).verdict == CLOSE_WAIT


@pytest.mark.parametrize("state", [TcpState.FIN_WAIT1, TcpState.FIN_WAIT2, TcpState.CLOSING,
                                   TcpState.LAST_ACK])
def test_orphans_have_no_owner(state):
    h = verdict(sk(state, inode=0, send_q=4096))
    assert h.verdict == ORPHAN and state.name in h.reason and "4096 bytes" in h.reason
    # The same state with an owner (shutdown(SHUT_WR)) is judged by the evidence.
    assert verdict(sk(state, inode=5)).verdict != ORPHAN


def test_an_unaccepted_established_child_is_no_orphan():
    assert verdict(sk(TcpState.ESTABLISHED, inode=0, data_recv=5)).verdict == ACTIVE


@pytest.mark.parametrize("state, words", [
    (TcpState.TIME_WAIT, "TIME_WAIT"), (TcpState.LISTEN, "listener"),
    (TcpState.SYN_SENT, "handshake"), (TcpState.SYN_RECV, "handshake"),
    (TcpState.NEW_SYN_RECV, "handshake")])
def test_not_a_connection_yet_or_any_more(state, words):
    h = verdict(sk(state, unacked=2, retransmits=5, ack_recv=99_000, data_sent=0))
    assert h.verdict == UNKNOWN and words in h.reason


def test_without_tcp_info_the_verdict_is_unknown_and_says_so():
    assert verdict(sk(vitals=vit(info=False))).reason == "no tcp_info for this socket"
    bare = Socket(cookie=1, family=AF_INET, state=1, src="a", sport=1, dst="b", dport=2, inode=1,
                  uid=0, raw_id=b"\0" * 48)
    assert assess(bare, None, None, W) == (UNKNOWN, "no tcp_info for this socket", "no-tcp-info")


# -- dead: retransmissions --------------------------------------------------------


def retransmitting(retransmits=3, unacked=2, ack_recv=20_000, data_sent=500, **kw):
    return sk(timer=1, unacked=unacked, retransmits=retransmits, backoff=retransmits,
              ack_recv=ack_recv, data_sent=data_sent, **kw)


def test_dead_after_three_timeouts_with_nothing_from_the_peer():
    h = verdict(retransmitting())
    assert h.verdict == DEAD
    assert "2 segments unacknowledged after 3 retransmission timeouts" in h.reason
    assert "20.0 s" in h.reason


def test_two_timeouts_are_not_yet_dead():
    h = verdict(retransmitting(retransmits=2))
    assert h.verdict == UNKNOWN and "2 retransmission timeouts (dead at 3)" in h.reason


def test_nothing_outstanding_is_never_dead():
    # The peer vanished, but nothing was sent since: no evidence either way.
    h = verdict(retransmitting(unacked=0))
    assert h.verdict == UNKNOWN
    assert "no data outstanding" in h.reason and "no keep-alive armed" not in h.reason  # timer 1


def test_a_peer_heard_after_our_last_send_is_not_dead():
    assert verdict(retransmitting(ack_recv=400, data_sent=500)).verdict != DEAD
    assert verdict(retransmitting(ack_recv=500, data_sent=500)).verdict == DEAD  # same jiffy: silent


def test_the_probe_last_segment_counts_as_hearing_the_peer():
    s = retransmitting(ack_recv=20_000, data_sent=500)
    assert verdict(s, last_rx=100.0).verdict != DEAD  # a segment after our last retransmission
    assert verdict(s, last_rx=30_000.0).verdict == DEAD  # older than tcp_info's ack: the ack counts
    assert peer_heard_ms(s, 30_000.0) == 20_000.0
    assert peer_heard_ms(s, 100.0) == 100.0
    assert peer_heard_ms(s, None) == 20_000.0


# -- dead: probes -----------------------------------------------------------------


@pytest.mark.parametrize("timer, word", [(2, "keep-alive"), (4, "zero-window")])
def test_two_unanswered_probes_are_dead(timer, word):
    h = verdict(sk(timer=timer, probes=2, send_q=10 if timer == 4 else 0, snd_wnd=0))
    assert h.verdict == DEAD and ("2 %s probes unanswered" % word) in h.reason


def test_persist_timer_probes_with_an_open_window_are_local_send_failures():
    # They never reached the peer: no evidence of death, and no zero window either.
    h = verdict(sk(timer=4, probes=3, send_q=10, snd_wnd=65536))
    assert h.verdict == UNKNOWN and "sends are failing locally" in h.reason
    # Linux < 5.4: the persist timer alone stands for a zero window.
    assert verdict(sk(timer=4, probes=2, send_q=10, snd_wnd=None)).verdict == DEAD


def test_one_probe_out_may_be_waiting_for_its_answer():
    assert verdict(sk(timer=2, probes=1)).verdict == UNKNOWN
    assert "1 keep-alive probe out (dead at 2)" in verdict(sk(timer=2, probes=1)).reason
    assert verdict(sk(timer=4, probes=1, send_q=10, snd_wnd=0)).verdict == ZERO_WINDOW


def test_probes_without_a_probe_timer_are_not_evidence():
    assert verdict(sk(timer=0, probes=5)).verdict == UNKNOWN


# -- zero window ------------------------------------------------------------------


def test_zero_window_probing():
    h = verdict(sk(timer=4, send_q=8192, snd_wnd=0))
    assert h.verdict == ZERO_WINDOW and "8192 bytes wait" in h.reason


def test_zero_window_seen_from_the_window_without_the_timer():
    assert verdict(sk(timer=0, send_q=100, snd_wnd=0, unacked=0)).verdict == ZERO_WINDOW
    # Nothing to send: a zero window blocks nothing.
    assert verdict(sk(timer=0, send_q=0, snd_wnd=0)).verdict != ZERO_WINDOW
    # Data in flight: not (yet) the window's fault.
    assert verdict(sk(timer=1, send_q=100, snd_wnd=0, unacked=1)).verdict != ZERO_WINDOW
    # Linux < 5.4 sends no snd_wnd: only the timer says it.
    assert verdict(sk(timer=0, send_q=100, snd_wnd=None)).verdict != ZERO_WINDOW
    assert verdict(sk(timer=4, send_q=100, snd_wnd=None)).verdict == ZERO_WINDOW
    # The persist timer with an open window is not a zero window.
    assert verdict(sk(timer=4, send_q=100, snd_wnd=65536)).verdict != ZERO_WINDOW


def test_zero_window_wins_over_recent_data():
    assert verdict(sk(timer=4, send_q=1, snd_wnd=0, data_recv=5)).verdict == ZERO_WINDOW


# -- the clocks: active, quiet, unknown --------------------------------------------


def test_active_within_the_window():
    h = verdict(sk(data_recv=9_999, ack_recv=9_999))
    assert h == (ACTIVE, "data received 10.0 s ago", "active")
    assert verdict(sk(data_recv=10_000, ack_recv=10_000)).verdict != ACTIVE  # the boundary


def test_quiet_when_the_peer_answers_without_data():
    h = verdict(sk(data_recv=600_000, ack_recv=2_000))
    assert h.verdict == QUIET and "the peer answered 2.0 s ago" in h.reason and "10 min" in h.reason


def test_quiet_needs_an_answer_within_the_window():
    assert verdict(sk(data_recv=600_000, ack_recv=9_999)).verdict == QUIET
    assert verdict(sk(data_recv=600_000, ack_recv=10_000)).verdict == UNKNOWN  # the boundary


def test_keep_alive_replies_make_a_live_idle_connection_quiet():
    s = sk(data_recv=600_000, ack_recv=900, timer=2, expires=100)
    assert verdict(s).verdict == QUIET


def test_quiet_from_the_probe_alone():
    assert verdict(sk(data_recv=600_000, ack_recv=600_000), last_rx=50.0).verdict == QUIET


def test_idle_with_no_evidence_is_unknown_and_says_what_is_missing():
    h = verdict(sk(data_recv=600_000, ack_recv=600_000))
    assert h.verdict == UNKNOWN
    assert "nothing from the peer for 10 min (window 10.0 s)" in h.reason
    assert "no data outstanding to be acknowledged" in h.reason
    assert "no keep-alive armed" in h.reason
    armed = verdict(sk(data_recv=600_000, ack_recv=600_000, timer=2, expires=30_000))
    assert armed.verdict == UNKNOWN and "keep-alive armed, next probe in 30.0 s" in armed.reason


def test_unknown_idle_time_is_said():
    h = verdict(sk(data_recv=None, ack_recv=None), idle=None)
    assert h.verdict == UNKNOWN
    assert "no receive time known" in h.reason and "no time of the peer's last segment" in h.reason


def test_the_window_decides_between_active_and_quiet():
    s = sk(data_recv=30_000, ack_recv=1_000)
    assert verdict(s, window=60_000).verdict == ACTIVE
    assert verdict(s, window=20_000).verdict == QUIET


# -- the rules' names (tcpidle explain shows them) ------------------------------------

RULE_CASES = [
    ("close-wait", lambda: verdict(sk(TcpState.CLOSE_WAIT))),
    ("orphan", lambda: verdict(sk(TcpState.LAST_ACK, inode=0))),
    ("time-wait", lambda: verdict(sk(TcpState.TIME_WAIT))),
    ("listener", lambda: verdict(sk(TcpState.LISTEN))),
    ("handshake", lambda: verdict(sk(TcpState.SYN_SENT))),
    ("no-tcp-info", lambda: verdict(sk(vitals=vit(info=False)))),
    ("dead-retransmits", lambda: verdict(retransmitting())),
    ("dead-probes", lambda: verdict(sk(timer=2, probes=2))),
    ("zero-window", lambda: verdict(sk(timer=4, send_q=8192, snd_wnd=0))),
    ("active", lambda: verdict(sk(data_recv=5, ack_recv=5))),
    ("quiet", lambda: verdict(sk(data_recv=600_000, ack_recv=2_000))),
    ("no-evidence", lambda: verdict(sk(data_recv=600_000, ack_recv=600_000))),
]


@pytest.mark.parametrize("rule, make", RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_each_verdict_names_the_rule_that_gave_it(rule, make):
    h = make()
    assert h.rule == rule, h
    assert health.RULES[rule][0] == h.verdict, (rule, h)


def test_every_rule_is_named_and_tried_in_the_documented_order():
    assert [c[0] for c in RULE_CASES] == list(health.RULES)


def test_every_verdict_is_listed_once():
    assert len(set(health.VERDICTS)) == len(health.VERDICTS) == 7


def test_durations_read_well():
    assert [health._dur(x) for x in (None, 5, 1500, 300_000, 9_000_000)] == [
        "?", "5 ms", "1.5 s", "5 min", "2.5 h"]


# -- --verdict -------------------------------------------------------------------------


def test_parse_verdicts():
    assert health.parse_verdicts("dead,zero-window") == {DEAD, ZERO_WINDOW}
    assert health.parse_verdicts(" dead , quiet") == {DEAD, QUIET}
    with pytest.raises(UsageError, match="an empty name"):
        health.parse_verdicts("dead,")
    with pytest.raises(UsageError, match="--verdict: unknown verdict 'deadd'"):
        health.parse_verdicts("dead,deadd")
    with pytest.raises(UsageError, match="--verdict: give one or more"):
        health.parse_verdicts(",")


def test_decide_carries_the_health_and_filters_victims_by_verdict():
    dead = retransmitting()
    quiet = sk(data_recv=600_000, ack_recv=2_000)
    any_ = Policy(idle_time_ms=1000, window_ms=W)
    only_dead = Policy(idle_time_ms=1000, window_ms=W, verdicts=frozenset({DEAD}))
    assert decide(dead, None, NOW, any_).health.verdict == DEAD
    assert decide(dead, None, NOW, only_dead).victim is True
    assert decide(quiet, None, NOW, any_).victim is True
    assert decide(quiet, None, NOW, only_dead).victim is False
    # -t keeps its meaning: a dead connection that received data recently is no victim.
    young = retransmitting(data_recv=100)
    assert decide(young, None, NOW, only_dead).health.verdict == DEAD
    assert decide(young, None, NOW, only_dead).victim is False
    # -t 0 with a verdict filter: every dead one.
    assert decide(young, None, NOW, Policy(window_ms=W, verdicts=frozenset({DEAD}))).victim is True


def test_decide_uses_the_probe_for_health():
    s = sk(data_recv=600_000, ack_recv=600_000)
    seg = Activity(cookie=7, last_segment_ns=NOW - 50 * MS, last_data_ns=0)
    assert decide(s, None, NOW, Policy(window_ms=W)).health.verdict == UNKNOWN
    assert decide(s, seg, NOW, Policy(window_ms=W)).health.verdict == QUIET


# -- middleboxes -------------------------------------------------------------------------


def test_presets_and_seconds():
    assert middlebox.parse("aws-nlb").timeout_ms == 350_000
    assert middlebox.parse("AWS-NAT").timeout_ms == 350_000
    assert middlebox.parse("azure-lb").timeout_ms == 240_000
    assert middlebox.parse("gcp-nat").timeout_ms == 1_200_000
    assert middlebox.parse("gce-lb").timeout_ms == 600_000
    box = middlebox.parse("3")
    assert (box.name, box.timeout_ms, box.risk_fraction) == ("3 s", 3000.0, 0.5)
    assert middlebox.parse("2.5", risk_fraction=0.8).risk_fraction == 0.8


@pytest.mark.parametrize("bad", ["aws", "", "0", "-5", "nan", "inf"])
def test_bad_middlebox_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="--middlebox"):
        middlebox.parse(bad)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_bad_fraction_is_a_usage_error(fraction):
    with pytest.raises(UsageError, match="--risk-fraction"):
        middlebox.parse("aws-nlb", risk_fraction=fraction)


def test_flow_idle_is_the_least_of_every_direction():
    s = sk(data_recv=9_000, ack_recv=7_000, data_sent=8_000)
    assert middlebox.flow_idle_ms(s, None) == 7_000
    assert middlebox.flow_idle_ms(s, 100.0) == 100.0
    assert middlebox.flow_idle_ms(sk(data_recv=9_000, ack_recv=9_000, data_sent=30), None) == 30
    assert middlebox.flow_idle_ms(sk(data_recv=None, ack_recv=None, data_sent=None), None) is None


def flow(idle_ms, **kw):
    return sk(data_recv=idle_ms, ack_recv=idle_ms, data_sent=idle_ms, **kw)


def test_exposure_boundaries():
    box = middlebox.parse("3")  # 3 s, at risk from 1.5 s
    assert middlebox.exposure(flow(1_499), None, box) == middlebox.SAFE
    assert middlebox.exposure(flow(1_500), None, box) == middlebox.AT_RISK
    assert middlebox.exposure(flow(2_999), None, box) == middlebox.AT_RISK
    assert middlebox.exposure(flow(3_000), None, box) == middlebox.PAST
    # The probe's last segment refreshes the flow.
    assert middlebox.exposure(flow(5_000), 10.0, box) == middlebox.SAFE


def test_a_keep_alive_that_fires_in_time_saves_the_flow():
    box = middlebox.parse("3")
    assert middlebox.exposure(flow(2_000, timer=2, expires=500), None, box) == middlebox.SAFE
    assert middlebox.exposure(flow(2_000, timer=2, expires=1_000), None, box) == middlebox.AT_RISK
    # Too late: already past, keep-alive or not.
    assert middlebox.exposure(flow(3_500, timer=2, expires=10), None, box) == middlebox.PAST


def test_exposure_of_what_is_no_flow_is_unknown():
    box = middlebox.parse("3")
    for state in (TcpState.LISTEN, TcpState.SYN_SENT, TcpState.NEW_SYN_RECV):
        assert middlebox.exposure(flow(9_000, state=state), None, box) is None
    assert middlebox.exposure(flow(None), None, box) is None


def test_decide_with_a_middlebox_acts_only_past_it():
    box = middlebox.parse("3")
    pol = Policy(window_ms=W, middlebox=box)
    past, risky = decide(flow(4_000), None, NOW, pol), decide(flow(2_000), None, NOW, pol)
    assert (past.exposure, past.victim) == (middlebox.PAST, True)
    assert (risky.exposure, risky.victim) == (middlebox.AT_RISK, False)
    assert decide(flow(4_000), None, NOW, Policy(window_ms=W)).exposure is None


# -- the re-check before each destroy batch ------------------------------------------


class FakeDiag:
    """Answers lookups with the sockets given: the kernel's view right now."""

    def __init__(self, fresh):
        self.fresh = fresh

    def lookup(self, socks):
        return [self.fresh[s.cookie] for s in socks]


def test_a_victim_chosen_for_its_verdict_is_spared_when_the_verdict_changed():
    from tcpidle.engine import VERDICT_CHANGED, Engine, Scan, Spare
    from tcpidle.model import Selector
    from tcpidle.scope import Scope

    policy = Policy(window_ms=W, verdicts=frozenset({DEAD}))
    engine = Engine(Scope(Selector(), namespaces=[]), policy)
    dead = retransmitting()
    revived = dead.__class__(**{**dead.__dict__, "last_ack_recv_ms": 10, "last_data_sent_ms": 500})
    still = retransmitting()
    victims = [decide(dead, None, NOW, policy)]
    assert victims[0].victim
    scan = Scan(victims)
    (fresh, why), = engine._recheck(scan, victims, FakeDiag({7: revived}))
    assert why == VERDICT_CHANGED % "quiet" and fresh is revived  # the peer answered
    assert Spare(victims[0], why).kind == "verdict-changed"
    (fresh, why), = engine._recheck(scan, victims, FakeDiag({7: still}))
    assert why is None  # still dead: act
