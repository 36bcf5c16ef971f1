"""End to end: the health verdicts on real connections in namespaces the tests create.

Each test makes its own sockets inside throw-away namespaces (lab.netns.in_netns;
the test process owns them) and runs the tcpidle command there.  What each
one shows is the issue's list: a peer that vanished while data was
outstanding is `dead`, the same kind of connection with nothing outstanding
is not; a reader that stops reading gives `zero-window`; keep-alive on a live
idle connection gives `quiet` and `kill --verdict dead` leaves it alone; a
process that never closes its half is named by `audit --by owner`; and
`--middlebox 3` lists exactly the connections past 3 s and those at risk.
"""

import socket
import subprocess
import sys
import time

import pytest

from lab.netns import cookie_of, wait_for
from lab.tcp import accept, connect, cut, exchange, fill_window, listen

pytestmark = pytest.mark.kernel

TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT = 4, 5, 6


def rows_by_cookie(run_tcpidle, json_lines, ns, *args):
    res = run_tcpidle(ns, "audit", "--json", *args)
    assert res.returncode == 0, res.stderr
    return {r["cookie"]: r for r in json_lines(res.stdout)}


@pytest.mark.parametrize("how", ["blackhole", "link-down"])
def test_a_vanished_peer_with_data_outstanding_is_dead_and_idle_ones_are_not(
        veth_pair, run_tcpidle, json_lines, sockets, how):
    a, b = veth_pair
    port = 7101
    lst = listen(b, "10.231.0.2", port)
    busy, idle_c = connect(a, "10.231.0.2", port), connect(a, "10.231.0.2", port)
    busy_peer, idle_peer = accept(lst), accept(lst)
    sockets.extend([lst, busy, idle_c, busy_peer, idle_peer])
    exchange(busy, busy_peer)
    exchange(idle_c, idle_peer)
    time.sleep(1.2)  # both idle past the 1 s window used below

    # b vanishes; the busy client keeps sending into the void.
    cut(a, b, how)
    busy.sendall(b"z" * 1000)

    def dead_row():
        rows = rows_by_cookie(run_tcpidle, json_lines, a, "-d", port, "--active-within", 1000)
        row = rows.get(cookie_of(busy))
        return rows if row and row["verdict"] == "dead" else None

    rows = wait_for(dead_row, timeout=30, step=0.5)
    assert rows, "the connection with unacknowledged data never became dead"
    row = rows[cookie_of(busy)]
    assert row["unacked"] > 0 and row["retrans"] >= 3, row
    assert "unacknowledged after" in row["verdict_reason"], row
    assert row["last_ack_ms"] >= row["last_send_ms"], row  # nothing heard since our last send
    if how == "blackhole":  # segments leave, nothing comes back: the timer backs off
        assert row["backoff"] >= 3, row
    # Same path, same dead peer, but nothing outstanding and no keep-alive:
    # there is no evidence of death, and the verdict says what is missing.
    other = rows[cookie_of(idle_c)]
    assert other["verdict"] == "unknown", other
    assert other["unacked"] == 0 and other["keepalive"] is False, other
    assert "no data outstanding" in other["verdict_reason"], other
    assert "no keep-alive armed" in other["verdict_reason"], other

    # kill --verdict dead destroys the dead one only.
    res = run_tcpidle(a, "kill", "-d", port, "--verdict", "dead", "--json", "--disable-syslog")
    assert res.returncode == 0, res.stderr
    killed = json_lines(res.stdout)
    assert [(r["cookie"], r["action"], r["verdict"]) for r in killed] == [
        (cookie_of(busy), "destroyed", "dead")], (killed, res.stderr)
    with pytest.raises(ConnectionAbortedError):
        busy.recv(1)
    left = rows_by_cookie(run_tcpidle, json_lines, a, "-d", port)
    assert set(left) == {cookie_of(idle_c)}


def test_a_reader_that_stops_reading_gives_zero_window(netns, run_tcpidle, json_lines, sockets):
    port = 7102
    lst = listen(netns, "127.0.0.1", port, rcvbuf=4096)
    writer = connect(netns, "127.0.0.1", port)
    reader = accept(lst)
    sockets.extend([lst, writer, reader])
    fill_window(writer)  # until the window and our buffer are full

    def zw():
        rows = rows_by_cookie(run_tcpidle, json_lines, netns, "-d", port)
        row = rows.get(cookie_of(writer))
        return rows if row and row["verdict"] == "zero-window" else None

    rows = wait_for(zw, timeout=15, step=0.3)
    assert rows, "the writer never showed zero-window"
    row = rows[cookie_of(writer)]
    assert row["send_q"] > 0 and "zero window" in row["verdict_reason"], row
    peer = rows_by_cookie(run_tcpidle, json_lines, netns, "-s", port)[cookie_of(reader)]
    assert peer["recv_q"] > 0 and peer["verdict"] != "zero-window", peer
    # Reading again opens the window: the verdict follows.
    reader.setblocking(False)
    try:
        while reader.recv(65536):
            pass
    except BlockingIOError:
        pass
    rows = wait_for(lambda: (lambda r: r if r[cookie_of(writer)]["verdict"] != "zero-window" else None)(
        rows_by_cookie(run_tcpidle, json_lines, netns, "-d", port)), timeout=10, step=0.3)
    assert rows, "the verdict stayed zero-window after the reader read"


def test_keep_alive_on_a_live_idle_connection_is_quiet_and_never_killed_as_dead(
        netns, run_tcpidle, json_lines, sockets):
    port = 7103
    lst = listen(netns, "127.0.0.1", port)
    ka, plain = connect(netns, "127.0.0.1", port), connect(netns, "127.0.0.1", port)
    ka_peer, plain_peer = accept(lst), accept(lst)
    sockets.extend([lst, ka, plain, ka_peer, plain_peer])
    exchange(ka, ka_peer)
    exchange(plain, plain_peer)
    ka.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    ka.setsockopt(socket.IPPROTO_TCP, TCP_KEEPIDLE, 1)
    ka.setsockopt(socket.IPPROTO_TCP, TCP_KEEPINTVL, 1)
    time.sleep(3.5)  # idle past the window, keep-alive probes answered meanwhile

    rows = rows_by_cookie(run_tcpidle, json_lines, netns, "-d", port, "--active-within", 2500)
    row = rows[cookie_of(ka)]
    assert row["verdict"] == "quiet" and row["keepalive"] is True, row
    assert row["idle_ms"] >= 2500 and row["last_ack_ms"] < 2500, row
    assert rows[cookie_of(plain)]["verdict"] == "unknown", rows[cookie_of(plain)]

    res = run_tcpidle(netns, "kill", "-d", port, "--verdict", "dead", "--json", "--disable-syslog")
    assert res.returncode == 0, res.stderr
    assert json_lines(res.stdout) == []
    assert "nothing to do" in res.stderr
    # The verdict filter is what spared it: by idle time alone it would go.
    res = run_tcpidle(netns, "kill", "-d", port, "-t", 1000, "--dry-run", "--json")
    assert cookie_of(ka) in {r["cookie"] for r in json_lines(res.stdout)}, res.stdout
    exchange(ka, ka_peer)  # still alive and working


LEAKER = r"""
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, b"leaky", 0, 0, 0)  # PR_SET_NAME: the name audit must show
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
print("ready", flush=True)
held = []
deadline = time.monotonic() + 60
while time.monotonic() < deadline and len(held) < int(sys.argv[2]):
    c, _ = s.accept(); held.append(c)   # accepted, never read, never closed: the leak
print("held", len(held), flush=True)
time.sleep(max(0, deadline - time.monotonic()))
"""


def test_a_close_wait_pile_up_names_the_leaking_process(netns, run_tcpidle, json_lines, sockets):
    port, n = 7104, 7
    leaker = netns.popen([sys.executable, "-c", LEAKER, str(port), str(n)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert leaker.stdout.readline().strip() == "ready"
        clients = [connect(netns, "127.0.0.1", port) for _ in range(n)]
        assert leaker.stdout.readline().split() == ["held", str(n)]
        for c in clients:
            c.close()  # the peer closes; the leaker never does

        def grouped():
            res = run_tcpidle(netns, "audit", "--by", "owner", "--state", "close-wait", "--json")
            assert res.returncode == 0, res.stderr
            return json_lines(res.stdout)

        groups = wait_for(lambda: (lambda g: g if g and g[0]["total"] == n else None)(grouped()),
                          timeout=10, step=0.2)
        assert groups, grouped()
        top = groups[0]
        assert (top["group"], top["pids"], top["comms"]) == (
            "leaky[%d]" % leaker.pid, [leaker.pid], ["leaky"]), top
        assert top["counts"]["close-wait"] == n and top["total"] == n, top
        # The table names it too.
        res = run_tcpidle(netns, "audit", "--by", "owner", "--state", "close-wait")
        header, line = res.stdout.splitlines()[:2]
        assert header.split()[:2] == ["OWNER", "TOTAL"] and "CLOSE-WAIT" in header.split()
        assert line.split()[:2] == ["leaky[%d]" % leaker.pid, str(n)], res.stdout
    finally:
        leaker.kill()
        leaker.wait()


def flow_idle(row):
    """The flow's idle time at the dump, as the middlebox rule counts it (no probe here)."""
    return min(row["last_send_ms"], row["last_ack_ms"], row["idle_ms"])


def test_middlebox_lists_exactly_the_connections_past_it_and_at_risk(
        netns, run_tcpidle, json_lines, sockets):
    """--middlebox 3: past at 3 s of flow idleness, at risk from 1.5 s unless a keep-alive
    fires in time.  Each row is checked against its own evidence at the dump, and every
    connection made here is listed or not as its age says; a connection whose age at the
    dump is not known to be under 1.5 s (the command started slowly on a loaded machine)
    is checked by its row alone."""
    port = 7105
    lst = listen(netns, "127.0.0.1", port)
    sockets.append(lst)

    def pair():
        c = connect(netns, "127.0.0.1", port)
        a = accept(lst)
        sockets.extend([c, a])
        exchange(c, a)
        return c, a, time.monotonic()

    old, old_peer, _ = pair()
    time.sleep(3.4)
    risky, risky_peer, risky_at = pair()
    saved, saved_peer, _ = pair()
    saved.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    saved.setsockopt(socket.IPPROTO_TCP, TCP_KEEPIDLE, 1)  # probes every second: well before 3 s
    saved.setsockopt(socket.IPPROTO_TCP, TCP_KEEPINTVL, 1)
    time.sleep(1.6)
    fresh, fresh_peer, fresh_at = pair()

    res = run_tcpidle(netns, "audit", "--json", "-d", port, "--middlebox", "3")
    audit_end = time.monotonic()
    assert res.returncode == 0, res.stderr
    rows = {r["cookie"]: r for r in json_lines(res.stdout)}
    for r in rows.values():  # the rule, row by row
        assert flow_idle(r) >= 1500, r
        assert r["middlebox"] == ("past" if flow_idle(r) >= 3000 else "at-risk"), r
    assert rows[cookie_of(old)]["middlebox"] == "past"  # idle 5 s and more
    assert cookie_of(risky) in rows  # idle 1.6 s and more
    assert audit_end - risky_at >= 1.6
    assert cookie_of(saved) not in rows  # its keep-alive refreshes the flow every second
    if audit_end - fresh_at < 1.5:
        assert cookie_of(fresh) not in rows
    assert set(rows) <= {cookie_of(old), cookie_of(risky), cookie_of(fresh)}
    assert "middlebox 3 s: python" in res.stderr  # grouped by owner (this test process)

    # kill --middlebox destroys those past it, and only those: the others get
    # traffic right before, so none can be 3 s idle unless the kill took that long.
    for c, a in ((risky, risky_peer), (saved, saved_peer), (fresh, fresh_peer)):
        exchange(c, a)
    started = time.monotonic()
    res = run_tcpidle(netns, "kill", "-d", port, "--middlebox", "3", "--json", "--disable-syslog")
    took = time.monotonic() - started
    assert res.returncode == 0, res.stderr
    killed = json_lines(res.stdout)
    assert (cookie_of(old), "destroyed", "past") in [
        (r["cookie"], r["action"], r["middlebox"]) for r in killed]
    assert all(r["middlebox"] == "past" and flow_idle(r) >= 3000 for r in killed), killed
    if took < 2.9:
        assert [r["cookie"] for r in killed] == [cookie_of(old)]
    with pytest.raises(ConnectionAbortedError):
        old.recv(1)
    exchange(saved, saved_peer)
