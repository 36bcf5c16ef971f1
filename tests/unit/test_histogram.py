"""audit --hist's pure parts: log2 slots and lines exactly as bcc prints them, and grouping."""

import contextlib
import io
import random

import pytest

from tcpidle import groups, histogram
from tcpidle.model import OwnerSummary, Socket, Verdict


def test_slots_follow_bpf_log2l():
    # bcc helpers.h: bpf_log2l(v) = floor(log2(v)) + 1, and bpf_log2(0) = 0 so 0 -> 1
    assert [histogram.slot(v) for v in (0, 1, 2, 3, 4, 7, 8, 1023, 1024)] == \
        [1, 1, 2, 2, 3, 3, 4, 10, 11]
    assert histogram.slot(1 << 40) == 41


def test_counts():
    assert histogram.log2_counts([]) == []
    assert histogram.log2_counts([0, 1, 2.9, 5, 6]) == [0, 2, 1, 2]


@pytest.mark.parametrize("seed", range(6))
def test_lines_are_bccs(seed):
    """Same text as bcc's own table._print_log2_hist for the same slot counts."""
    table = pytest.importorskip("bcc.table")
    rnd = random.Random(seed)
    values = [rnd.expovariate(1 / rnd.choice([50, 5000, 3e6])) for _ in range(rnd.randint(1, 400))]
    if seed == 5:
        values.append(1 << 40)  # the wide layout, past slot 32
    counts = histogram.log2_counts(values)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        table._print_log2_hist(counts, "msecs", False)
    assert histogram.format_log2(counts, "msecs") == buf.getvalue().splitlines()


def test_buckets_for_json():
    b = histogram.buckets(histogram.log2_counts([0, 3, 3]))
    assert b == [{"low": 0, "high": 1, "count": 1}, {"low": 2, "high": 3, "count": 2}]


def _v(dport, sport=40000, netns=None, inode=0, idle=1.0):
    s = Socket(cookie=dport * 7 + sport, family=2, state=1, src="127.0.0.1", sport=sport,
               dst="127.0.0.1", dport=dport, inode=inode, uid=0, raw_id=b"", netns=netns)
    return Verdict(s, idle, "tcp_info", None, False)


def test_group_by_port_netns_owner():
    vs = [_v(443), _v(80), _v(443), _v(22, netns="blue"), _v(22, netns=4026532000)]
    assert [(k, len(g)) for k, g in groups.group(vs, "dport")] == [("22", 2), ("80", 1), ("443", 2)]
    assert [k for k, _ in groups.group(vs, "netns")] == ["(own)", "4026532000", "blue"]
    assert groups.group(vs, None)[0][0] == "all"
    owners = {11: OwnerSummary(pids=(8, 9), comms=("nginx",))}
    ws = [_v(1, inode=11), _v(2, inode=12), _v(3, inode=11)]
    assert [(k, len(g)) for k, g in groups.group(ws, "owner", owners)] == \
        [("nginx[8,9]", 2), ("-", 1)]
    with pytest.raises(ValueError):
        groups.group(vs, "uid")
