"""Self-test of the lab: the farm's sockets, labels and error reporting are what
the kernel says they are (checked with iproute2's ss, independent of tcpidle)."""

import re
import time

import pytest

pytestmark = pytest.mark.kernel

ECONNABORTED = 103
ECONNRESET = 104


def ss_sockets(ns):
    """{(local, remote): {"cookie", "inode", "lastrcv"}} from `ss -tnie`."""
    out = ns.run("ss", "-tnieH").stdout
    blocks, cur = [], ""
    for line in out.splitlines():
        if line[:1].isspace():
            cur += " " + line.strip()
        else:
            if cur:
                blocks.append(cur)
            cur = line.strip()
    if cur:
        blocks.append(cur)
    found = {}
    for block in blocks:
        fields = block.split()
        local, remote = fields[3], fields[4]
        cookie = re.search(r"\bsk:([0-9a-f]+)", block)
        inode = re.search(r"\bino:(\d+)", block)
        lastrcv = re.search(r"\blastrcv:(\d+)", block)
        found[(local, remote)] = {
            "cookie": int(cookie.group(1), 16) if cookie else None,
            "inode": int(inode.group(1)) if inode else None,
            # ss prints lastrcv only when it is not 0 (tcp_show_info: "if
            # (info->tcpi_last_data_recv)"): data this very millisecond.
            "lastrcv": int(lastrcv.group(1)) if lastrcv else 0,
        }
    return found


def ss_addr(pair):
    addr, port = pair
    return ("[%s]:%d" if ":" in addr else "%s:%d") % (addr, port)


def test_farm_reports_kernel_identity_and_labels(netns, make_farm):
    farm = make_farm(netns)
    farm.serve([7001, 7002])
    idle = farm.connect("127.0.0.1", 7001, n=2, label="idle")
    idle += farm.connect("::1", 7001, n=1, label="idle")
    active = farm.connect("127.0.0.1", 7002, n=1, label="active")
    active += farm.connect("::1", 7002, n=1, label="active")
    time.sleep(0.6)

    st = farm.status()
    kernel = ss_sockets(netns)
    # 5 client sockets + 5 accepted server sockets, each seen by ss with the
    # cookie and inode the farm reports.
    assert len(st) == 10
    for rec in st.values():
        k = kernel[(ss_addr(rec["local"]), ss_addr(rec["remote"]))]
        assert k["cookie"] == rec["cookie"], rec
        assert k["inode"] == rec["inode"], rec
        assert rec["alive"] and rec["error"] is None
    for rec in idle:
        k = kernel[(ss_addr(rec["local"]), ss_addr(rec["remote"]))]
        assert k["lastrcv"] >= 400, (rec, k)
        assert st[rec["id"]]["rx_bytes"] == 0
    for rec in active:
        k = kernel[(ss_addr(rec["local"]), ss_addr(rec["remote"]))]
        assert k["lastrcv"] < 250, (rec, k)
        assert st[rec["id"]]["rx_bytes"] > 0
        # the server side of an active connection receives data too
        assert st[rec["peer"]]["rx_bytes"] > 0

    # every connection, from either side, round-trips a ping
    assert all(farm.ping().values())


def test_farm_sees_econnaborted_after_ss_kill(netns, make_farm):
    farm = make_farm(netns)
    farm.serve([7001, 7002])
    victims = farm.connect("127.0.0.1", 7001, n=2, label="idle")
    victims += farm.connect("::1", 7001, n=1, label="idle")
    others = farm.connect("127.0.0.1", 7002, n=1, label="active")
    others += farm.connect("::1", 7002, n=1, label="idle")
    time.sleep(0.2)

    # ss -K destroys with SOCK_DESTROY, as tcpidle does: the client sockets
    # (remote port 7001) only.
    netns.run("ss", "-K", "dport", "=", ":7001")

    vids = {v["id"] for v in victims}
    st = farm.wait_until(
        lambda s: all(not s[i]["alive"] and not s[s[i]["peer"]]["alive"] for i in vids),
        timeout=5)
    for i in vids:
        assert st[i]["error"] == ECONNABORTED, st[i]
        assert st[st[i]["peer"]]["error"] == ECONNRESET, st[st[i]["peer"]]
    survivors = [c["id"] for c in st.values() if c["id"] not in vids and c["peer"] not in vids]
    assert len(survivors) == 4
    assert all(st[i]["alive"] and st[i]["error"] is None for i in survivors)
    res = farm.ping(survivors)
    assert all(res.values()), res
    # dead connections do not answer
    res = farm.ping(sorted(vids))
    assert not any(res.values())


def test_two_farms_over_veth(veth_pair, make_farm):
    a, b = veth_pair
    server = make_farm(b)
    client = make_farm(a)
    server.serve([7001], addrs=["10.231.0.2", "fd00:231::2"])
    conns = client.connect("10.231.0.2", 7001, label="active")
    conns += client.connect("fd00:231::2", 7001, label="idle")
    time.sleep(0.3)
    assert all(client.ping().values())
    assert all(server.ping().values())
    st = client.status()
    assert st[conns[0]["id"]]["rx_bytes"] > 0
    assert st[conns[1]["id"]]["local"][0] == "fd00:231::1"
