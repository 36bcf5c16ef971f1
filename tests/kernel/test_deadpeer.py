"""End to end: a connection whose peer vanished is found idle and destroyed.

Namespaces A and B are joined by a veth pair; a client in A talks to a server
in B.  Then B's end of the link goes down mid-connection: the client keeps
sending, its data sits unacknowledged and is retransmitted, nothing arrives.
`tcpidle kill` run in A finds the connection idle (no data received) once
the threshold has passed and destroys it; the client sees ECONNABORTED.
"""

import re
import time

import pytest

pytestmark = pytest.mark.kernel

ECONNABORTED = 103
PORT = 7001


def unacked(ns, port):
    """tcpi_unacked of the socket connected to `port`, as ss shows it."""
    out = ns.run("ss", "-tniH", "dport", "=", ":%d" % port).stdout
    m = re.search(r"\bunacked:(\d+)", out)
    return int(m.group(1)) if m else 0


@pytest.mark.parametrize("server_addr", ["10.231.0.2", "fd00:231::2"], ids=["ipv4", "ipv6"])
def test_dead_peer_is_destroyed(veth_pair, make_farm, run_tcpidle, json_lines, server_addr):
    a, b = veth_pair
    server = make_farm(b)
    client = make_farm(a)
    server.serve([PORT], addrs=[server_addr])
    conn = client.connect(server_addr, PORT, label="active")[0]
    time.sleep(1.2)

    # While data flows the connection is not idle: nothing is selected.
    res = run_tcpidle(a, "kill", "-d", PORT, "-t", 1000, "--json")
    assert res.returncode == 0, res.stderr
    assert json_lines(res.stdout) == []
    assert all(client.ping().values())

    # Cut the link from B's side; A's client keeps sending into the void.
    b.ip("link", "set", "dev", "veth1", "down")
    time.sleep(1.5)
    st = client.status()[conn["id"]]
    assert st["alive"] and st["error"] is None, st
    assert st["rx_idle_ms"] >= 1000, st
    assert unacked(a, PORT) > 0, "the client's data should be waiting for an ACK"

    res = run_tcpidle(a, "kill", "-d", PORT, "-t", 1000, "--json")
    assert res.returncode == 0, res.stderr
    rows = json_lines(res.stdout)
    assert [r["cookie"] for r in rows] == [conn["cookie"]], rows
    row = rows[0]
    assert row["action"] == "destroyed" and row["error"] is None, row
    assert row["dst"] == server_addr and row["dport"] == PORT, row
    assert row["idle_ms"] >= 1000, row

    st = client.wait_until(lambda s: not s[conn["id"]]["alive"], timeout=5)
    assert st[conn["id"]]["error"] == ECONNABORTED, st[conn["id"]]
    # and the kernel no longer has it
    assert a.run("ss", "-tnH", "dport", "=", ":%d" % PORT).stdout.strip() == ""
