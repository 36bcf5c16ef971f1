"""The one grouping rule: keys and labels, and the counts per verdict (audit --by,
the middlebox report, the tracker's gauges)."""

import pytest

from tcpidle import groups
from tcpidle.model import AF_INET, Health, OwnerSummary, Socket, Verdict


def v(inode, verdict="close-wait", dport=80, netns=None, exposure=None):
    s = Socket(cookie=inode, family=AF_INET, state=8, src="a", sport=1, dst="b", dport=dport,
               inode=inode, uid=0, raw_id=b"\0" * 48, netns=netns)
    return Verdict(s, None, None, None, False, Health(verdict, "r") if verdict else None, exposure)


OWNERS = {1: OwnerSummary((30,), ("leaky",)), 2: OwnerSummary((30,), ("leaky",)),
          3: OwnerSummary((30,), ("leaky",)), 4: OwnerSummary((8, 9), ("nginx",)),
          5: OwnerSummary((8, 9), ("nginx",)), 6: OwnerSummary((10,), ("nginx",))}


def test_by_owner_names_the_process_and_counts_per_verdict_largest_first():
    got = groups.count([v(4, "active"), v(1), v(2), v(5, "dead"), v(3), v(0, "orphan")], "owner", OWNERS)
    assert [(g.key, g.total) for g in got] == [("leaky[30]", 3), ("nginx[8,9]", 2), ("-", 1)]
    leaky = got[0]
    assert (leaky.pids, leaky.comms) == ((30,), ("leaky",))
    assert leaky.counts["close-wait"] == 3 and leaky.counts["active"] == 0
    assert list(leaky.counts) == ["active", "quiet", "dead", "zero-window", "close-wait", "orphan", "unknown"]
    assert got[1].counts == {**{k: 0 for k in got[1].counts}, "active": 1, "dead": 1}
    assert got[2].counts["orphan"] == 1 and got[2].pids == ()


def test_by_comm_puts_every_process_of_a_name_together():
    got = groups.count([v(4), v(5), v(6), v(1)], "comm", OWNERS)
    assert [(g.key, g.total, g.pids) for g in got] == [("nginx", 3, ()), ("leaky", 1, ())]


def test_by_dport_and_netns():
    got = groups.count([v(1, dport=5432), v(2, dport=5432), v(3, dport=443)], "dport")
    assert [(g.key, g.total) for g in got] == [("5432", 2), ("443", 1)]
    got = groups.count([v(1, netns="blue"), v(2, netns=4026531), v(3)], "netns")
    assert [g.key for g in got] == ["(own)", "4026531", "blue"]  # ties: group() order


def test_ties_keep_the_group_order_and_no_health_counts_as_unknown():
    got = groups.count([v(1, dport=10), v(2, dport=9, verdict=None)], "dport")
    assert [g.key for g in got] == ["9", "10"]  # ports numerically
    assert got[0].counts["unknown"] == 1


def test_a_label_picks_what_is_counted_and_leaves_out_none():
    vs = [v(1, exposure="past"), v(2, exposure="at-risk"), v(3, exposure="safe"), v(4, exposure=None)]
    label = {"past": "past", "at-risk": "at-risk"}.get
    got = groups.count(vs, "owner", OWNERS, label=lambda x: label(x.exposure), columns=("past", "at-risk"))
    assert [(g.key, g.counts) for g in got] == [("leaky[30]", {"past": 1, "at-risk": 1})]


def test_unknown_grouping_is_refused():
    with pytest.raises(ValueError):
        groups.count([v(1)], "uid")
