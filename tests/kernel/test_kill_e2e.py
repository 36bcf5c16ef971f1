"""End to end: `tcpidle kill` destroys exactly the idle connections it selects.

A farm in a fresh namespace serves several ports on 127.0.0.1 and ::1, with
idle and active clients on each.  After the idle ones have been idle longer
than the threshold (while the active ones keep talking every ~50 ms), the CLI
runs in the namespace; the test compares the cookies it reports with the
farm's, checks that the owners of the destroyed sockets saw ECONNABORTED and
their peers a reset, and that every other connection still carries data.
"""

import time

import pytest

pytestmark = pytest.mark.kernel

ECONNABORTED = 103
ECONNRESET = 104
PORTS = (7001, 7002, 7003)
V4, V6 = "127.0.0.1", "::1"


@pytest.fixture
def farm(netns, make_farm):
    farm = make_farm(netns)
    farm.serve(PORTS, addrs=(V4, V6))
    return farm


def clients(status, label=None, port=None, families=("ipv4", "ipv6")):
    return [c for c in status.values()
            if c["role"] == "client"
            and (label is None or c["label"] == label)
            and (port is None or c["remote"][1] in _ports(port))
            and c["family"] in families]


def _ports(port):
    return port if isinstance(port, (set, frozenset, tuple, list)) else (port,)


def assert_rows_match(rows, expected, action, min_idle_ms=300):
    """Every JSON row describes one expected socket, exactly once each."""
    by_cookie = {r["cookie"]: r for r in rows}
    assert len(by_cookie) == len(rows), "duplicate cookies: %r" % rows
    assert set(by_cookie) == {c["cookie"] for c in expected}, _explain(rows, expected)
    for rec in expected:
        row = by_cookie[rec["cookie"]]
        assert row["action"] == action, row
        assert row["error"] is None, row
        assert row["state"] == "ESTABLISHED", row
        assert row["family"] == rec["family"], row
        assert (row["src"], row["sport"]) == tuple(rec["local"]), (row, rec)
        assert (row["dst"], row["dport"]) == tuple(rec["remote"]), (row, rec)
        assert row["inode"] == rec["inode"], (row, rec)
        assert row["idle_source"] in ("bpf", "tcp_info"), row
        assert row["idle_ms"] is not None and row["idle_ms"] >= min_idle_ms, row
        assert row["netns"] is None, row


def _explain(rows, expected):
    """Failure text: what the tool reported against what the test expected."""
    lines = ["tool reported:"]
    lines += ["  %(cookie)s %(src)s:%(sport)s -> %(dst)s:%(dport)s idle_ms=%(idle_ms)s "
              "(%(idle_source)s) %(action)s" % r for r in rows]
    lines.append("expected:")
    lines += ["  %s %s -> %s %s rx_idle_ms=%s" % (c["cookie"], c["local"], c["remote"],
                                                  c["label"], c["rx_idle_ms"]) for c in expected]
    return "\n".join(lines)


def assert_destroyed(farm, victims, owner_errno=ECONNABORTED, peer_errno=ECONNRESET):
    """Victims' owners see owner_errno, their peers peer_errno; returns status."""
    ids = [v["id"] for v in victims]

    def ended(st):
        return all(not st[i]["alive"] and st[i]["peer"] is not None
                   and not st[st[i]["peer"]]["alive"] for i in ids)

    st = farm.wait_until(ended, timeout=5)
    for i in ids:
        assert st[i]["error"] == owner_errno, st[i]
        peer = st[st[i]["peer"]]
        assert peer["error"] == peer_errno, peer
    return st


def assert_untouched(farm, st, ended_ids):
    """Every connection not in ended_ids (nor their peers) is alive and pings."""
    gone = set(ended_ids) | {st[i]["peer"] for i in ended_ids}
    rest = [i for i in st if i not in gone]
    assert rest, "nothing left to check"
    for i in rest:
        assert st[i]["alive"] and st[i]["error"] is None and not st[i]["eof"], st[i]
    res = farm.ping(rest)
    assert all(res.values()), {i: st[i] for i, ok in res.items() if not ok}
    return rest


def assert_listeners_work(farm, port, addrs=(V4, V6)):
    for addr in addrs:
        new = farm.connect(addr, port, label="idle", tag="late")
        assert all(farm.ping([c["id"] for c in new]).values())


@pytest.mark.parametrize("flags, families", [
    ([], ("ipv4", "ipv6")),
    (["-4"], ("ipv4",)),
    (["-6"], ("ipv6",)),
], ids=["both", "ipv4-only", "ipv6-only"])
def test_kill_destroys_exactly_the_idle_connections_on_the_port(
        farm, run_tcpidle, netns, json_lines, flags, families):
    farm.populate(PORTS, addrs=(V4, V6), idle=2, active=1)
    time.sleep(0.6)  # idle ones > 400 ms idle; active ones talk every 50 ms

    res = run_tcpidle(netns, "kill", *flags, "-d", 7002, "-t", 300, "--json", "-p")
    assert res.returncode == 0, res.stderr

    st = farm.status()
    victims = clients(st, "idle", 7002, families)
    assert len(victims) == 2 * len(families)
    rows = json_lines(res.stdout)
    assert_rows_match(rows, victims, "destroyed")
    # -p: the owner is known from /proc: this farm process.
    for row in rows:
        assert row["pids"] == [farm.pid], row

    st = assert_destroyed(farm, victims)
    rest = assert_untouched(farm, st, [v["id"] for v in victims])
    # What survived: active clients on 7002, everything on 7001/7003, the
    # other family's idle clients on 7002 (with -4/-6), all server sides.
    assert len(rest) == 36 - 2 * len(victims)
    assert_listeners_work(farm, 7002)


def test_kill_spares_connections_idle_less_than_the_threshold(
        farm, run_tcpidle, netns, json_lines):
    old = farm.populate([7001], addrs=(V4, V6), idle=2, active=0)
    time.sleep(4.4)
    fresh = farm.populate([7001], addrs=(V4, V6), idle=2, active=0)
    time.sleep(0.1)
    # At the scan, old: >= 4500 ms idle; fresh: ~100 ms plus the tool's
    # start-up, which can take seconds on a busy machine (its /proc walk
    # visits every process's descriptors).
    res = run_tcpidle(netns, "kill", "-d", 7001, "-t", 3500, "--json")
    assert res.returncode == 0, res.stderr
    assert_rows_match(json_lines(res.stdout), old, "destroyed", min_idle_ms=3500)
    st = assert_destroyed(farm, old)
    assert_untouched(farm, st, [c["id"] for c in old])
    assert all(st[c["id"]]["alive"] for c in fresh)


def test_dry_run_kills_nothing_and_reports_would_destroy(farm, run_tcpidle, netns, json_lines):
    farm.populate(PORTS, addrs=(V4, V6), idle=2, active=1)
    time.sleep(0.6)

    res = run_tcpidle(netns, "kill", "-d", 7002, "-t", 300, "--dry-run", "--json")
    assert res.returncode == 0, res.stderr

    st = farm.status()
    assert_rows_match(json_lines(res.stdout), clients(st, "idle", 7002), "would-destroy")
    time.sleep(0.3)  # a destroyed socket would be reported by now
    st = farm.status()
    assert_untouched(farm, st, [])


def test_sport_selects_the_server_side(farm, run_tcpidle, netns, json_lines):
    farm.populate(PORTS, addrs=(V4, V6), idle=2, active=1)
    time.sleep(0.6)

    res = run_tcpidle(netns, "kill", "-s", 7002, "-t", 300, "--json")
    assert res.returncode == 0, res.stderr

    st = farm.status()
    idle_clients = clients(st, "idle", 7002)
    victims = [st[c["peer"]] for c in idle_clients]
    assert len(victims) == 4 and all(v["role"] == "server" for v in victims)
    assert all(v["local"][1] == 7002 for v in victims)
    assert_rows_match(json_lines(res.stdout), victims, "destroyed")

    # The server sockets were destroyed (their owner sees ECONNABORTED), the
    # idle clients got the reset.
    st = assert_destroyed(farm, victims)
    assert_untouched(farm, st, [v["id"] for v in victims])
    assert_listeners_work(farm, 7002)


@pytest.mark.parametrize("ports", [
    ["-d", "7001,7003-7005"],
    ["-d", "7001", "--dport", "7003-7005"],
], ids=["list", "repeated"])
def test_port_lists_and_ranges(netns, make_farm, run_tcpidle, json_lines, ports):
    farm = make_farm(netns)
    all_ports = range(7001, 7007)
    farm.serve(all_ports, addrs=(V4, V6))
    farm.populate(all_ports, addrs=(V4, V6), idle=1, active=1)
    time.sleep(0.6)

    res = run_tcpidle(netns, "kill", *ports, "-t", 300, "--json")
    assert res.returncode == 0, res.stderr

    st = farm.status()
    victims = clients(st, "idle", {7001, 7003, 7004, 7005})
    assert len(victims) == 8
    assert_rows_match(json_lines(res.stdout), victims, "destroyed")
    st = assert_destroyed(farm, victims)
    rest = assert_untouched(farm, st, [v["id"] for v in victims])
    # idle clients on 7002 and 7006 are among the survivors
    assert len(clients({i: st[i] for i in rest}, "idle", {7002, 7006})) == 4
