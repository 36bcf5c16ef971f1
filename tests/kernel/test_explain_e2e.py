"""End to end: `tcpidle explain` on real connections in namespaces the tests create.

Each test opens loopback connections inside a throw-away namespace (the test
process owns them: it knows their cookies, descriptors and what it sent) and
asks tcpidle about one of them: an idle one, an active one, one in
CLOSE_WAIT (over veth, its 4-tuple written from the peer's side), each with a
threshold and --verdict as kill takes them (and kill run after, to agree); the
protected list; a cookie and a 4-tuple that do not exist; --netns from outside;
one 4-tuple in two namespaces; and, with a tracker running, the probe's record
of the connection.
"""

import os
import re
import socket
import subprocess
import time

import pytest

from conftest import REPO_ROOT, TCPIDLE, parse_json_lines
from lab.netns import close_all, cookie_of, in_netns, wait_for
from lab.window import Pairs

pytestmark = pytest.mark.kernel
# test_track's fixtures (trackers, bpffs, pin_dir), by name
pytest_plugins = ["test_track"]

PORT = 7601  # the veth test's listener (the loopback pairs take any free port)


@pytest.fixture
def lo(netns):
    """Loopback pairs in `netns`, both ends ours (lab.window.Pairs); `connect` exchanges a byte."""
    made = Pairs(netns.name)
    yield made
    made.close()


def connect(pairs):
    """(client, server end) of a new connection, one byte exchanged each way."""
    c, a = pairs.pair()
    c.sendall(b"x")
    assert a.recv(1) == b"x"
    a.sendall(b"y")
    assert c.recv(1) == b"y"
    return c, a


def explain(run_tcpidle, ns, *args):
    """explain --json inside `ns`: (exit status, the object or None, stderr)."""
    res = run_tcpidle(ns, "explain", "--json", *args)
    objs = parse_json_lines(res.stdout)
    assert len(objs) <= 1, res.stdout
    return res.returncode, (objs[0] if objs else None), res.stderr


def clause(obj, name):
    found = [c for c in obj["kill"]["clauses"] if c["clause"] == name]
    assert len(found) == 1, obj["kill"]
    return found[0]


def tuple_of(sock, reverse=False):
    (la, lp), (ra, rp) = sock.getsockname(), sock.getpeername()
    ends = ["%s:%d" % (la, lp), "%s:%d" % (ra, rp)]
    return "-".join(reversed(ends) if reverse else ends)


def test_an_idle_connection_would_be_destroyed_past_the_threshold_and_spared_below_it(
        netns, lo, run_tcpidle):
    client, server = connect(lo)
    time.sleep(1.5)
    # Both ends are here: a 4-tuple names the one whose local end is written first.
    for sock in (client, server):
        rc, obj, err = explain(run_tcpidle, netns, tuple_of(sock))
        assert rc == 0 and obj["cookie"] == cookie_of(sock), err
    rc, obj, err = explain(run_tcpidle, netns, cookie_of(client), "-d", lo.server_port, "-t", 1000)
    assert rc == 0, err
    assert obj["cookie"] == cookie_of(client) and obj["state"] == "ESTABLISHED"
    assert (obj["src"], obj["sport"], obj["dst"], obj["dport"]) == (
        "127.0.0.1", client.getsockname()[1], "127.0.0.1", lo.server_port)
    assert obj["netns"] is None  # run inside the namespace: its own
    assert obj["owners"] == [{"pid": os.getpid(), "fd": client.fileno(), "comm": obj["comms"][0],
                              "cgroup": obj["owners"][0]["cgroup"]}]
    assert obj["pids"] == [os.getpid()]
    assert obj["peer_cookie"] == cookie_of(server)
    # every evidence field, as the kernel says it
    info = obj["tcp_info"]
    assert info["last_data_recv_ms"] >= 1400 and info["last_ack_recv_ms"] >= 1400, info
    assert info["unacked"] == 0 and info["retransmits"] == 0 and info["snd_wnd"] > 0, info
    assert obj["inet_diag"]["timer"] == "none" and obj["inet_diag"]["send_q"] == 0, obj
    assert obj["probe"] is None and "no BPF probe" in obj["evidence_source"]
    assert obj["idle_source"] == "tcp_info" and obj["idle_ms"] >= 1400
    # the window is -t: nothing heard for 1.4 s, nothing outstanding, no keep-alive
    assert obj["window_ms"] == 1000 and obj["verdict"] == "unknown", obj
    assert obj["verdict_rule"] == "no-evidence" and "no keep-alive armed" in obj["verdict_reason"]
    assert obj["kill"]["action"] == "would-destroy" and obj["kill"]["by"] is None, obj["kill"]
    assert [c["clause"] for c in obj["kill"]["clauses"]] == ["state", "dport", "idle-time"]
    assert clause(obj, "idle-time")["holds"] and ">= -t 1.0 s" in clause(obj, "idle-time")["text"]

    # The same question with a threshold it has not reached: spared by -t.
    rc, obj, err = explain(run_tcpidle, netns, cookie_of(client), "-d", lo.server_port, "-t", 60000)
    assert rc == 0, err
    assert obj["kill"]["action"] == "spared" and obj["kill"]["by"] == "idle-time", obj["kill"]
    # ... and what the verdict filter says: not dead (no evidence of death).
    rc, obj, err = explain(run_tcpidle, netns, cookie_of(client), "-d", lo.server_port, "-t", 1000,
                           "--verdict", "dead")
    assert obj["kill"]["by"] == "verdict", obj["kill"]
    assert clause(obj, "verdict")["text"] == "verdict unknown is not in --verdict dead"

    # kill itself agrees with both answers.
    res = run_tcpidle(netns, "kill", "-d", lo.server_port, "-t", 1000, "--verdict", "dead", "--json",
                      "--disable-syslog")
    assert res.returncode == 0 and parse_json_lines(res.stdout) == [], res
    res = run_tcpidle(netns, "kill", "-d", lo.server_port, "-t", 1000, "--json", "--disable-syslog")
    assert res.returncode == 0, res.stderr
    assert [(r["cookie"], r["action"]) for r in parse_json_lines(res.stdout)] == [
        (cookie_of(client), "destroyed")]


def test_an_active_connection_is_spared_by_the_threshold_and_the_human_output_says_why(
        netns, lo, run_tcpidle):
    client, server = connect(lo)
    # The server end has just received data: active, and spared by -t 10000 whatever else.
    client.sendall(b"z")
    assert server.recv(1) == b"z"
    rc, obj, err = explain(run_tcpidle, netns, cookie_of(server), "-s", lo.server_port, "-t", 10000,
                           "--verdict", "active,dead")
    assert rc == 0, err
    assert obj["verdict"] == "active" and obj["verdict_rule"] == "active", obj
    assert obj["idle_ms"] < 10000 and obj["window_ms"] == 10000
    assert obj["kill"]["by"] == "idle-time", obj["kill"]
    assert clause(obj, "idle-time")["text"].endswith("< -t 10.0 s")
    assert clause(obj, "verdict")["holds"]  # active is in the list: -t alone spares it
    assert obj["peer_cookie"] == cookie_of(client) and obj["owners"][0]["fd"] == server.fileno()

    res = run_tcpidle(netns, "explain", cookie_of(server), "-s", lo.server_port, "-t", 10000)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "ipv4 ESTABLISHED 127.0.0.1:%d -> 127.0.0.1:%d" % (lo.server_port, client.getsockname()[1]) in text
    assert "[%d] fd %d" % (os.getpid(), server.fileno()) in text
    assert "active (rule active: data received within the window)" in text
    assert "spared by -t: idle " in text
    assert re.search(r"^peer +cookie %d is the other end" % cookie_of(client), text, re.M), text


def test_a_close_wait_connection_by_4_tuple_is_spared_by_the_default_state(veth_pair,
                                                                           run_tcpidle):
    a, b = veth_pair
    lst = in_netns(b.name, lambda: socket.create_server(("10.231.0.2", PORT)))
    client = in_netns(a.name, lambda: socket.create_connection(("10.231.0.2", PORT), 5))
    lst.settimeout(5)
    server, _ = lst.accept()
    try:
        # the tuple as the server's side writes it: its own end first
        written = tuple_of(server)
        server.close()  # the client's peer closed; the client never does: CLOSE_WAIT
        assert wait_for(lambda: explain(run_tcpidle, a, cookie_of(client))[1]["state"]
                        == "CLOSE_WAIT", timeout=10, step=0.1)
        # In a, only the client's end is there: the tuple written from the peer's side finds it.
        rc, obj, err = explain(run_tcpidle, a, written, "-d", PORT)
        assert rc == 0, err
        assert obj["cookie"] == cookie_of(client) and obj["state"] == "CLOSE_WAIT"
        assert (obj["src"], obj["dst"], obj["dport"]) == ("10.231.0.1", "10.231.0.2", PORT)
        assert obj["verdict"] == "close-wait" and obj["verdict_rule"] == "close-wait"
        assert obj["peer_cookie"] is None  # the other end is in b
        assert obj["owners"][0]["pid"] == os.getpid() and obj["owners"][0]["fd"] == client.fileno()
        assert obj["kill"]["action"] == "spared" and obj["kill"]["by"] == "state", obj["kill"]
        assert clause(obj, "state")["text"] == (
            "CLOSE_WAIT (close-wait) is not in --state established (the default)")
        # Written from its own side, with the state, a threshold and --verdict: it would go.
        rc, obj, err = explain(run_tcpidle, a, tuple_of(client), "-d", PORT, "--state",
                               "close-wait", "-t", 1, "--verdict", "close-wait")
        assert rc == 0, err
        assert obj["cookie"] == cookie_of(client) and obj["kill"]["action"] == "would-destroy", obj
        res = run_tcpidle(a, "kill", "-d", PORT, "--state", "close-wait", "-t", 1, "--verdict",
                          "close-wait", "--json", "--disable-syslog")
        assert [(r["cookie"], r["action"]) for r in parse_json_lines(res.stdout)] == [
            (cookie_of(client), "destroyed")], res
    finally:
        close_all([lst, client, server])


def test_a_protected_port_spares_it_before_the_threshold(netns, lo, run_tcpidle):
    client, _ = connect(lo)
    rc, obj, err = explain(run_tcpidle, netns, cookie_of(client), "--all", "--exclude-port", lo.server_port,
                           "-t", 0)
    assert rc == 0, err
    assert obj["kill"]["by"] == "protected", obj["kill"]
    assert clause(obj, "selector")["holds"] and clause(obj, "idle-time")["holds"]


def test_a_connection_that_does_not_exist_is_exit_1_with_one_plain_line(netns, lo, run_tcpidle):
    client, _ = connect(lo)
    destroyed = cookie_of(client)
    res = run_tcpidle(netns, "kill", "-d", lo.server_port, "--disable-syslog")
    assert res.returncode == 0, res.stderr
    never = destroyed + 10 ** 12  # cookies count up from boot: far ahead of any socket
    for target, words in [(destroyed, "no connection with cookie %d " % destroyed),
                          (never, "no connection with cookie %d " % never),
                          ("127.0.0.1:1-127.0.0.1:2", "no connection 127.0.0.1:1-127.0.0.1:2 ")]:
        for extra in ((), ("--json",)):
            res = run_tcpidle(netns, "explain", target, *extra)
            assert res.returncode == 1, res
            assert res.stdout == ""
            lines = res.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("tcpidle: " + words), res.stderr


def test_netns_from_outside_names_the_namespace(netns, lo):
    client, _ = connect(lo)
    res = subprocess.run(TCPIDLE + ["explain", str(cookie_of(client)), "--netns", netns.name,
                                    "--json"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    obj = parse_json_lines(res.stdout)[0]
    assert obj["netns"] == netns.name and obj["cookie"] == cookie_of(client)
    # not in ours: exit 1, and the line says where it looked
    res = subprocess.run(TCPIDLE + ["explain", str(cookie_of(client))], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "in this network namespace" in res.stderr, res


def test_with_a_tracker_running_the_probe_record_is_shown(netns, lo, run_tcpidle, trackers,
                                                           pin_dir):
    t = trackers(netns, "-s", lo.server_port, "-t", 600000, "--interval", 1, "--dry-run",
                 "--pin-dir", pin_dir)
    t.wait_ready()
    if "no BPF probe" in t.stderr():
        pytest.skip("no BPF probe here: %s" % t.stderr())
    client, server = connect(lo)

    def recorded():
        client.sendall(b"abcd")
        assert server.recv(4) == b"abcd"
        rc, obj, err = explain(run_tcpidle, netns, cookie_of(server), "--pin-dir", pin_dir)
        assert rc == 0, err
        return obj if obj["probe"] is not None else None

    # Until the probe has a record of it (the raw tracepoint: from the first poll that lists it).
    obj = wait_for(recorded, timeout=20, step=0.5)
    assert obj, "the probe's record never showed"
    before = obj["probe"]
    client.sendall(b"0123456789")
    assert server.recv(10) == b"0123456789"
    rc, obj, err = explain(run_tcpidle, netns, cookie_of(server), "--pin-dir", pin_dir)
    assert rc == 0, err
    p = obj["probe"]
    assert p["bytes"] == before["bytes"] + 10 and p["data_segments"] == before["data_segments"] + 1, (
        before, p)
    assert p["segments"] >= p["data_segments"], p
    assert p["last_segment_ms"] <= p["last_data_ms"] < 5000, p
    assert obj["idle_source"] == "bpf" and obj["last_rx_ms"] is not None, obj
    assert abs(obj["idle_ms"] - p["last_data_ms"]) < 0.01, obj  # the probe's time, not tcp_info's
    assert "tracker" in obj["evidence_source"], obj["evidence_source"]
    t.stop()


def test_one_4_tuple_in_two_namespaces_is_ambiguous_and_its_cookie_is_not(make_netns):
    spaces = [make_netns(), make_netns()]
    socks = []
    try:
        for ns in spaces:
            def make():
                lst = socket.create_server(("127.0.0.1", PORT + 1))
                c = socket.socket()
                c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                c.bind(("127.0.0.1", PORT + 2))
                c.connect(("127.0.0.1", PORT + 1))
                return lst, c
            lst, c = in_netns(ns.name, make)
            a, _ = lst.accept()
            socks += [lst, c, a]
        clients = socks[1::3]
        text = "127.0.0.1:%d-127.0.0.1:%d" % (PORT + 2, PORT + 1)
        res = subprocess.run(TCPIDLE + ["explain", text, "--all-netns"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and res.stdout == "", res
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("tcpidle: %s names 2 connections" % text), lines
        for ns, c in zip(spaces, clients):
            assert "cookie %d (netns %s)" % (cookie_of(c), ns.name) in lines[0]
        # the cookie names one of them: cookies are unique on the host
        res = subprocess.run(TCPIDLE + ["explain", str(cookie_of(clients[1])), "--all-netns",
                                        "--json"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
        assert parse_json_lines(res.stdout)[0]["netns"] == spaces[1].name
    finally:
        close_all(socks)
