"""audit --hist on real connections in a namespace: counts per group, bcc's layout, owners."""

import json
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.kernel

TCPIDLE = [sys.executable, "-m", "tcpidle"]
A, B = 7401, 7402


def audit(ns, *args):
    r = subprocess.run(TCPIDLE + ["audit", "--netns", ns.name, "-d", "%d,%d" % (A, B), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def farm_ns(make_netns, make_farm):
    ns = make_netns()
    farm = make_farm(ns)
    farm.serve([A, B])
    farm.populate([A], addrs=("127.0.0.1",), idle=3, active=0)
    farm.populate([B], addrs=("127.0.0.1", "::1"), idle=1, active=0)
    time.sleep(0.6)  # every client idle >= 512 ms: slot 512 -> 1023 or above
    return ns, farm


def test_hist_by_dport_json(farm_ns):
    ns, _ = farm_ns
    rows = [json.loads(line) for line in audit(ns, "--hist", "--by", "dport", "--json").stdout.splitlines()]
    assert [(r["group"], r["count"], r["unknown"]) for r in rows] == [(str(A), 3, 0), (str(B), 2, 0)]
    for r in rows:
        assert r["by"] == "dport" and r["unit"] == "ms"
        assert sum(b["count"] for b in r["buckets"]) == r["count"]
        assert all(b["count"] == 0 for b in r["buckets"] if b["high"] < 512)


def test_hist_text_is_bccs_layout(farm_ns):
    ns, _ = farm_ns
    out = audit(ns, "--hist", "--by", "dport").stdout.splitlines()
    assert out[0] == "dport = %d" % A
    assert out[1].split() == ["msecs", ":", "count", "distribution"]
    rows = [line for line in out if "->" in line]
    counts = [int(line.split(":")[1].split()[0]) for line in rows]
    assert sum(counts) == 5
    full = [line for line in rows if line.split(":")[1].split()[0] == "3"]
    assert full and full[0].endswith("|" + "*" * 40 + "|")
    assert "dport = %d" % B in out


def test_hist_whole_selection_and_by_owner(farm_ns):
    ns, farm = farm_ns
    out = audit(ns, "--hist").stdout.splitlines()
    assert "msecs" in out[0]
    assert sum(int(line.split(":")[1].split()[0]) for line in out if "->" in line) == 5
    rows = [json.loads(line) for line in audit(ns, "--hist", "--by", "owner", "--json").stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["count"] == 5
    assert rows[0]["group"].endswith("[%d]" % farm.pid)


def test_by_without_hist_counts_verdicts_per_group(netns):
    """--by alone (issue 11): one line per group with counts per verdict; here none."""
    r = subprocess.run(TCPIDLE + ["audit", "--netns", netns.name, "--by", "dport", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "", r.stderr
