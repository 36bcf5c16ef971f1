"""tcpidle explain's pure parts: which socket CONNECTION names, and would a kill act on it.

The clauses are checked against kill's own predicates over a grid of
sockets, selectors, owners and policies: all clauses hold exactly when
selectors.matches + owned_by + idle.decide make the socket a victim, and a
clause that fails names what kill itself would refuse.
"""

import io
import json
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tcpidle import explain, health, idle, middlebox, report, selectors
from tcpidle.errors import UsageError
from tcpidle.explain import Clause, Explanation, parse_target
from tcpidle.model import (AF_INET, AF_INET6, Activity, OwnerSummary, Policy, Selector, Socket,
                           TcpState, Vitals)
from tcpidle.owners import Owner

MS = 1_000_000
NOW = 10_000_000 * MS
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def sk(cookie=7, src="10.0.0.1", sport=5432, dst="10.0.0.2", dport=41234, state=TcpState.ESTABLISHED,
       family=None, inode=99, uid=0, data_recv=30_000, ack_recv=30_000, data_sent=30_000, netns=None,
       timer=0, unacked=0, retransmits=0, probes=0, info=True):
    family = family or (AF_INET6 if ":" in src else AF_INET)
    vit = (Vitals(timer, 0, 5000, 0, 0, unacked, retransmits, 0, 0, probes, 65536) if info
           else Vitals(timer, 0, 5000, 0, 0))
    return Socket(cookie=cookie, family=family, state=state, src=src, sport=sport, dst=dst,
                  dport=dport, inode=inode, uid=uid, raw_id=b"\0" * 48,
                  last_data_recv_ms=data_recv if info else None,
                  last_ack_recv_ms=ack_recv if info else None,
                  last_data_sent_ms=data_sent if info else None, netns=netns, vitals=vit)


# -- CONNECTION ----------------------------------------------------------------------


@pytest.mark.parametrize("text, cookie, first, second", [
    ("4097", 4097, None, None),
    (" 4097 ", 4097, None, None),
    ("18446744073709551614", (1 << 64) - 2, None, None),
    ("10.0.0.1:5432-10.0.0.2:41234", None, ("10.0.0.1", 5432), ("10.0.0.2", 41234)),
    ("10.0.0.1:5432->10.0.0.2:41234", None, ("10.0.0.1", 5432), ("10.0.0.2", 41234)),
    ("10.0.0.1:5432 -> 10.0.0.2:41234", None, ("10.0.0.1", 5432), ("10.0.0.2", 41234)),
    ("10.0.0.1:5432 10.0.0.2:41234", None, ("10.0.0.1", 5432), ("10.0.0.2", 41234)),
    ("[fd00::1]:22-[fd00::2]:5050", None, ("fd00::1", 22), ("fd00::2", 5050)),
    ("[FD00:0::1]:22-[fd00::2]:5050", None, ("fd00::1", 22), ("fd00::2", 5050)),
    ("[::ffff:10.0.0.1]:22-10.0.0.2:5050", None, ("10.0.0.1", 22), ("10.0.0.2", 5050)),
    ("0.0.0.0:5432-0.0.0.0:0", None, ("0.0.0.0", 5432), ("0.0.0.0", 0)),
])
def test_a_cookie_or_a_4_tuple_is_understood(text, cookie, first, second):
    t = parse_target(text)
    assert t.cookie == cookie
    assert (t.first and (str(t.first[0]), t.first[1])) == first
    assert (t.second and (str(t.second[0]), t.second[1])) == second


@pytest.mark.parametrize("text, words", [
    ("", "neither a socket cookie"), (" ", "neither a socket cookie"),
    ("0", "a socket cookie is 1 to"), (str(1 << 64), "a socket cookie is 1 to"),
    ("18446744073709551615", "a socket cookie is 1 to"),  # ~0: INET_DIAG_NOCOOKIE
    ("-5", "neither"), ("0x10", "neither"), ("١٢", "neither"), ("1_000", "neither"), ("12abc", "neither"),
    ("10.0.0.1:5432", "neither"), ("10.0.0.1-10.0.0.2", "neither"),
    ("10.0.0.1:5432-10.0.0.2", "neither"),
    ("10.0.0.1:65536-10.0.0.2:1", "port 65536 is out of range"),
    ("10.0.0.1:1-10.0.0.2:٢", "neither"),
    ("10.0.0.256:1-10.0.0.2:2", "'10.0.0.256' is not an IPv4 or IPv6 address"),
    ("host:1-10.0.0.2:2", "'host' is not an IPv4 or IPv6 address"),
    ("fd00::1:22-fd00::2:33", "IPv6 in brackets"),
    ("[10.0.0.1]:1-10.0.0.2:2", "brackets are for IPv6"),
    ("[fe80::1%eth0]:1-[fe80::2]:2", "scope id"),
    ("10.0.0.1:1-[fd00::2]:2", "one end is IPv4, the other IPv6"),
    ("10.0.0.1:1--10.0.0.2:2", "neither"),
])
def test_a_bad_connection_is_refused_naming_the_argument(text, words):
    with pytest.raises(UsageError) as exc:
        parse_target(text)
    assert str(exc.value).startswith("CONNECTION %r: " % text) and words in str(exc.value)


def test_the_command_line_refuses_a_bad_connection_with_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "tcpidle", "explain", "10.0.0.1:99999-1.2.3.4:5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "tcpidle: error: CONNECTION '10.0.0.1:99999-1.2.3.4:5': port 99999 is out of range 0-65535"]
    r = subprocess.run([sys.executable, "-m", "tcpidle", "explain"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "CONNECTION" in r.stderr and len(r.stderr.splitlines()) == 1


# -- which sockets it names ---------------------------------------------------------------


def test_a_4_tuple_as_written_wins_over_its_reverse_and_the_other_end_is_found():
    client = sk(1, "127.0.0.1", 41234, "127.0.0.1", 5432)
    server = sk(2, "127.0.0.1", 5432, "127.0.0.1", 41234)
    other = sk(3, "127.0.0.1", 41235, "127.0.0.1", 5432)
    socks = [client, server, other]
    t = parse_target("127.0.0.1:5432-127.0.0.1:41234")
    assert explain.named(t, socks) == [server]
    assert explain.pick(t, socks) == [server, client]
    assert explain.other_end(server, socks) is client
    assert explain.other_end(other, socks) is None


def test_a_4_tuple_written_from_the_peers_side_finds_the_local_socket():
    mine = sk(1, "10.0.0.1", 5432, "10.0.0.2", 41234)
    t = parse_target("10.0.0.2:41234-10.0.0.1:5432")
    assert explain.order(t, mine) == 1
    assert explain.named(t, [mine]) == [mine]
    assert explain.named(parse_target("10.0.0.2:41234-10.0.0.1:5433"), [mine]) == []


def test_a_cookie_names_its_socket_alone():
    a, b = sk(1), sk(2, "10.0.0.2", 41234, "10.0.0.1", 5432)
    assert explain.named(parse_target("2"), [a, b]) == [b]
    assert explain.pick(parse_target("2"), [a, b]) == [b, a]
    assert explain.named(parse_target("3"), [a, b]) == []


def test_v4_mapped_addresses_match_their_ipv4_spelling():
    dual = sk(1, "::ffff:10.0.0.1", 80, "::ffff:10.0.0.2", 9000, family=AF_INET6)
    assert explain.named(parse_target("10.0.0.1:80-10.0.0.2:9000"), [dual]) == [dual]
    assert explain.named(parse_target("[::ffff:10.0.0.1]:80-[::ffff:10.0.0.2]:9000"), [dual]) == [dual]


def test_the_same_4_tuple_in_two_namespaces_is_two_connections_and_ends_stay_in_theirs():
    a = sk(1, netns="blue")
    b = sk(2, netns="green")
    peer_in_green = sk(3, "10.0.0.2", 41234, "10.0.0.1", 5432, netns="green")
    t = parse_target("10.0.0.1:5432-10.0.0.2:41234")
    assert explain.named(t, [a, b, peer_in_green]) == [a, b]
    assert explain.other_end(a, [a, b, peer_in_green]) is None
    assert explain.other_end(b, [a, b, peer_in_green]) is peer_in_green


def test_listeners_and_time_wait_have_no_other_end():
    lst = sk(1, "127.0.0.1", 5432, "0.0.0.0", 0, state=TcpState.LISTEN)
    tw = sk(2, "127.0.0.1", 5432, "127.0.0.1", 41234, state=TcpState.TIME_WAIT)
    peer = sk(3, "127.0.0.1", 41234, "127.0.0.1", 5432)
    assert explain.other_end(tw, [lst, tw, peer]) is None
    assert explain.other_end(peer, [lst, tw, peer]) is None


def test_the_search_dumps_every_state_and_filters_a_4_tuple_by_its_ports():
    everything = frozenset(TcpState)
    assert explain.search_selector(parse_target("5")) == Selector(states=everything)
    s = explain.search_selector(parse_target("10.0.0.1:5432-10.0.0.2:41234"))
    assert s.states == everything and s.sports == s.dports
    assert 5432 in s.sports and 41234 in s.sports and 5433 not in s.sports
    # a listener's peer port is 0: no port can be filtered on
    assert explain.search_selector(parse_target("0.0.0.0:5432-0.0.0.0:0")).sports is None


# -- would a kill act on it? ----------------------------------------------------------------


def clauses(sock=None, selector=Selector(), policy=Policy(), owners=OwnerSummary(), all_=True,
            activity=None):
    return explain.kill_clauses(sock or sk(), activity, NOW, policy, selector, owners, all_)


def by_name(cl):
    return {c.name: c for c in cl}


def test_kill_with_no_selector_refuses_to_run_and_all_lets_it():
    cl = clauses(all_=False)
    assert cl[0] == Clause("selector", False, "no port, address or owner selector and no --all: "
                                              "kill refuses to run")
    assert explain.decision(cl) == ("spared", cl[0])
    assert clauses(all_=True)[0].holds
    assert "selector" not in by_name(clauses(selector=Selector(dports=selectors.parse_ports(["1"])),
                                             all_=False))


def test_the_default_state_spares_a_close_wait_connection_and_says_so():
    cl = by_name(clauses(sk(state=TcpState.CLOSE_WAIT)))
    assert cl["state"] == Clause("state", False, "CLOSE_WAIT (close-wait) is not in --state "
                                                 "established (the default)")
    st = selectors.parse_states(["close-wait,established"])
    assert by_name(clauses(sk(state=TcpState.CLOSE_WAIT), Selector(states=st)))["state"] == Clause(
        "state", True, "CLOSE_WAIT (close-wait) is in --state established, close-wait")


def test_each_selector_given_is_a_clause_with_its_values():
    sel = Selector(families=frozenset({AF_INET6}), sports=selectors.parse_ports(["22,8000-8100"]),
                   dports=selectors.parse_ports(["41234"]),
                   src=selectors.parse_networks(["10.0.0.0/8"], "--src"),
                   dst=selectors.parse_networks(["192.168.0.0/16"], "--dst"), uids=frozenset({1000}))
    cl = by_name(clauses(selector=sel))
    assert cl["family"] == Clause("family", False, "IPv4 (-4) is not IPv6 (-6)")
    assert cl["sport"] == Clause("sport", False, "local port 5432 is not in --sport 22,8000-8100")
    assert cl["dport"] == Clause("dport", True, "remote port 41234 is in --dport 41234")
    assert cl["src"] == Clause("src", True, "local address 10.0.0.1 is in --src 10.0.0.0/8")
    assert cl["dst"].holds is False and "192.168.0.0/16" in cl["dst"].text
    assert cl["uid"] == Clause("uid", False, "uid 0 is not in --uid 1000")
    assert [c.name for c in clauses(selector=sel)] == [
        "selector", "family", "state", "sport", "dport", "src", "dst", "uid", "idle-time"]
    assert explain.decision(clauses(selector=sel))[1].name == "family"  # kill's order


def test_owner_clauses_name_the_holders():
    held = OwnerSummary((812,), ("postgres",), ("/system.slice/postgresql.service",))
    sel = Selector(pids=frozenset({812}), comms=frozenset({"nginx"}),
                   cgroups=("/system.slice/",))
    cl = by_name(clauses(selector=sel, owners=held))
    assert cl["pid"] == Clause("pid", True, "held by postgres[812]: matches --pid 812")
    assert cl["comm"] == Clause("comm", False, "held by postgres[812]: does not match --comm nginx")
    assert cl["cgroup"].holds and "/system.slice/postgresql.service" in cl["cgroup"].text
    nobody = by_name(clauses(selector=Selector(pids=frozenset({812}))))
    assert nobody["pid"] == Clause("pid", False, "no process holds it: does not match --pid 812")


def test_the_protected_list_wins_and_says_which_end():
    sel = Selector(dports=selectors.parse_ports(["41234"]),
                   exclude_ports=selectors.parse_ports(["5432"]))
    cl = clauses(selector=sel, all_=False)
    prot = by_name(cl)["protected"]
    assert not prot.holds and prot.text.startswith("protected by --exclude-port 5432")
    assert explain.decision(cl) == ("spared", prot)
    sel = replace(sel, exclude_ports=None,
                  exclude_nets=selectors.parse_networks(["172.16.0.0/12"], "--exclude-cidr"))
    prot = by_name(clauses(selector=sel))["protected"]
    assert prot.holds and prot.text.startswith("not protected by --exclude-cidr 172.16.0.0/12")


def test_the_threshold_clause():
    assert by_name(clauses())["idle-time"] == Clause("idle-time", True,
                                                     "-t 0: every matching connection, idle or not")
    t = by_name(clauses(policy=Policy(idle_time_ms=10_000.0)))["idle-time"]
    assert t == Clause("idle-time", True, "idle 30.0 s (tcp_info) >= -t 10.0 s")
    t = by_name(clauses(policy=Policy(idle_time_ms=60_000.0)))["idle-time"]
    assert t == Clause("idle-time", False, "idle 30.0 s (tcp_info) < -t 60.0 s")
    t = by_name(clauses(sk(state=TcpState.TIME_WAIT, info=False), policy=Policy(idle_time_ms=1.0)))
    assert t["idle-time"] == Clause("idle-time", False, "idle time unknown: only -t 0 destroys it")
    # the probe refines the idle time, as kill's decision does
    fresh = Activity(7, NOW - 100 * MS, NOW - 100 * MS)
    t = by_name(clauses(policy=Policy(idle_time_ms=10_000.0), activity=fresh))["idle-time"]
    assert t == Clause("idle-time", False, "idle 100 ms (bpf) < -t 10.0 s")


def test_the_verdict_clause_uses_the_health_window():
    pol = Policy(verdicts=frozenset({"dead", "zero-window"}), window_ms=60_000.0)
    v = by_name(clauses(policy=pol))["verdict"]
    assert v == Clause("verdict", False, "verdict active is not in --verdict dead,zero-window")
    dead = sk(timer=1, unacked=2, retransmits=3, ack_recv=20_000, data_sent=500)
    assert by_name(clauses(dead, policy=pol))["verdict"].holds


def test_the_middlebox_clause():
    box = middlebox.parse("20")
    pol = Policy(middlebox=box)
    assert by_name(clauses(policy=pol))["middlebox"] == Clause(
        "middlebox", True, "flow idle 30.0 s: past 20 s (timeout 20.0 s)")
    c = by_name(clauses(sk(data_sent=12_000), policy=pol))["middlebox"]
    assert not c.holds and "at-risk against 20 s" in c.text and "only those past it" in c.text
    c = by_name(clauses(sk(state=TcpState.TIME_WAIT, info=False), policy=pol))["middlebox"]
    assert not c.holds and c.text.startswith("flow idle time unknown")


def test_every_clause_holding_is_a_victim_and_none_is_destroyed_otherwise():
    rnd = random.Random(11)
    sockets = [sk(1), sk(2, state=TcpState.CLOSE_WAIT), sk(3, "fd00::1", 22, "fd00::2", 5050),
               sk(4, data_recv=5), sk(5, state=TcpState.TIME_WAIT, info=False, inode=0),
               sk(6, "10.0.0.1", 8080, "192.168.1.9", 22, uid=1000),
               sk(7, timer=1, unacked=2, retransmits=4, ack_recv=20_000, data_sent=500),
               sk(8, "::ffff:10.0.0.1", 5432, "::ffff:10.0.0.2", 41234, family=AF_INET6)]
    owner_sets = [OwnerSummary(), OwnerSummary((812,), ("postgres",), ("/a/b",)),
                  OwnerSummary((9, 10), ("nginx",), ("/c",))]
    pick = lambda xs: rnd.choice(xs)  # noqa: E731
    for _ in range(3000):
        sel = Selector(
            families=pick([frozenset({AF_INET, AF_INET6}), frozenset({AF_INET}), frozenset({AF_INET6})]),
            states=pick([frozenset({TcpState.ESTABLISHED}), selectors.parse_states(["all"]),
                         selectors.parse_states(["close-wait"])]),
            sports=pick([None, selectors.parse_ports(["5432"]), selectors.parse_ports(["1-1000"])]),
            dports=pick([None, selectors.parse_ports(["41234,22"])]),
            src=pick([(), selectors.parse_networks(["10.0.0.0/8"], "--src")]),
            dst=pick([(), selectors.parse_networks(["fd00::/16,192.168.0.0/16"], "--dst")]),
            uids=pick([frozenset(), frozenset({1000})]),
            pids=pick([frozenset(), frozenset({812})]), comms=pick([frozenset(), frozenset({"nginx"})]),
            cgroups=pick([(), ("/a",)]),
            exclude_ports=pick([None, selectors.parse_ports(["22"])]),
            exclude_nets=pick([(), selectors.parse_networks(["10.0.0.2"], "--exclude-cidr")]))
        pol = Policy(idle_time_ms=pick([0.0, 10_000.0, 60_000.0]),
                     window_ms=pick([60_000.0, 10_000.0]),
                     verdicts=pick([None, frozenset({"dead"}), frozenset({"active", "unknown"})]),
                     middlebox=pick([None, middlebox.parse("20"), middlebox.parse("aws-nlb")]),
                     idle_metric=pick(["data", "any"]))
        sock, held, all_ = pick(sockets), pick(owner_sets), pick([True, False])
        act = pick([None, Activity(sock.cookie, NOW - 500 * MS, NOW - 40_000 * MS)])
        cl = explain.kill_clauses(sock, act, NOW, pol, sel, held, all_)
        kill_would = ((all_ or selectors.narrows(sel)) and selectors.matches(sel, sock)
                      and selectors.owned_by(sel, held) and idle.decide(sock, act, NOW, pol).victim)
        assert (explain.decision(cl)[0] == "would-destroy") == kill_would, (sock, sel, pol, cl)
        assert all(c.holds for c in cl) == kill_would


def test_the_ports_text():
    assert explain.ports_text(selectors.parse_ports(["8000-8100,22,23"])) == "22-23,8000-8100"


# -- the report -----------------------------------------------------------------------------


def an_explanation(**kw):
    s = kw.pop("sock", None) or sk(inode=4242)
    pol = Policy(idle_time_ms=10_000.0, window_ms=10_000.0)
    act = kw.pop("activity", Activity(7, NOW - 25_000 * MS, NOW - 30_000 * MS, 12, 3, 300))
    v = idle.decide(s, act, NOW, pol)
    held = kw.pop("holders", (Owner(812, 5, "post\x1b[2Jgres", "/system.slice/pg"),))
    summary = OwnerSummary(tuple(sorted({h.pid for h in held})), tuple(sorted({h.comm for h in held})),
                           tuple(sorted({h.cgroup for h in held if h.cgroup})))
    cl = explain.kill_clauses(s, act, NOW, pol, Selector(dports=selectors.parse_ports(["41234"])),
                              summary, False)
    fields = dict(verdict=v, activity=act, now_ns=NOW, holders=held, unreadable=0, owners=summary,
                  peer=sk(8, "10.0.0.2", 41234, "10.0.0.1", 5432), window_ms=pol.window_ms,
                  evidence="idle from BPF: the tracker's map pinned in /x", clauses=cl,
                  decision=explain.decision(cl))
    fields.update(kw)
    return Explanation(**fields)


def documented_keys():
    """The keys README's explain table documents (### Output, after the JSON Lines table)."""
    section = re.search(r"^`tcpidle explain --json`.*?\n\n(\|.*?)\n\n", README, re.M | re.S)
    assert section, "README.md: no `tcpidle explain --json` paragraph and table in ### Output"
    keys = []
    for cell in re.findall(r"^\| (.*?) \|", section.group(1), re.M):
        keys += re.findall(r"`([a-z_.]+)`", cell)
    return keys


def test_the_json_object_has_the_audit_rows_keys_then_the_documented_ones():
    e = an_explanation()
    obj = report.explanation_object(e)
    row = report.row(e.verdict, None, {4242: e.owners})
    assert list(obj)[:len(row)] == list(row)
    extra = [k for k in obj if k not in row]
    nested = ["kill." + k for k in obj["kill"]] + ["tcp_info." + k for k in obj["tcp_info"]] + [
        "inet_diag." + k for k in obj["inet_diag"]] + ["probe." + k for k in obj["probe"]] + [
        "owners." + k for k in obj["owners"][0]] + ["kill.clauses." + k for k in obj["kill"]["clauses"][0]]
    assert sorted(documented_keys()) == sorted(extra + nested)


def test_the_json_object_carries_every_fact():
    out = io.StringIO()
    report.explanation(an_explanation(), True, out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["cookie"] == 7 and obj["pids"] == [812] and obj["comms"] == ["post\x1b[2Jgres"]
    assert obj["owners"] == [{"pid": 812, "fd": 5, "comm": "post\x1b[2Jgres", "cgroup": "/system.slice/pg"}]
    assert "\x1b" not in lines[0]  # escaped by the encoder
    assert obj["verdict"] == "unknown" and obj["verdict_rule"] == "no-evidence"
    assert obj["verdict_rule_text"] == health.RULES["no-evidence"][1]
    assert obj["idle_source"] == "bpf" and obj["idle_ms"] == 30000.0 and obj["last_rx_ms"] == 25000.0
    assert obj["probe"] == {"last_segment_ms": 25000.0, "last_data_ms": 30000.0, "segments": 12,
                            "data_segments": 3, "bytes": 300}
    assert obj["tcp_info"]["retransmits"] == 0 and obj["tcp_info"]["snd_wnd"] == 65536
    assert obj["inet_diag"] == {"timer": "none", "timer_expires_ms": 5000, "timer_retrans": 0,
                                "recv_q": 0, "send_q": 0}
    assert obj["flow_idle_ms"] == 25000.0 and obj["peer_cookie"] == 8 and obj["window_ms"] == 10000.0
    assert obj["kill"]["action"] == "would-destroy" and obj["kill"]["by"] is None
    assert [c["clause"] for c in obj["kill"]["clauses"]] == ["state", "dport", "idle-time"]
    spared = an_explanation(sock=sk(inode=4242, state=TcpState.CLOSE_WAIT))
    k = report.explanation_object(spared)["kill"]
    assert k["action"] == "spared" and k["by"] == "state" and k["reason"].startswith("spared by --state")


def test_no_tcp_info_and_no_probe_are_null():
    e = an_explanation(sock=sk(inode=0, state=TcpState.TIME_WAIT, info=False), activity=None,
                       holders=(), peer=None)
    obj = report.explanation_object(e)
    assert obj["tcp_info"] is None and obj["probe"] is None and obj["owners"] == []
    assert obj["peer_cookie"] is None and obj["verdict_rule"] == "time-wait"


def test_the_human_output_labels_each_fact_and_escapes_other_users_text():
    out = io.StringIO()
    report.explanation(an_explanation(), False, out)
    text = out.getvalue()
    assert "\x1b" not in text and "post\\x1b[2Jgres[812] fd 5  cgroup /system.slice/pg" in text
    labels = [line.split()[0] for line in text.splitlines() if not line.startswith(" ")]
    assert labels == ["cookie", "connection", "netns", "owners", "peer", "idle", "tcp_info", "timer",
                      "queues", "probe", "verdict", "kill"]
    assert "ipv4 ESTABLISHED 10.0.0.1:5432 -> 10.0.0.2:41234" in text
    assert "12 segments (3 with data, 300 bytes), last segment 25.0 s ago" in text
    assert "unknown (rule no-evidence: " in text and "(window 10.0 s)" in text
    assert "would be destroyed" in text
    assert re.search(r"^\s+yes dport\s+remote port 41234 is in --dport 41234$", text, re.M)


def test_owners_that_could_not_be_read_are_said():
    out = io.StringIO()
    report.explanation(an_explanation(holders=(), unreadable=3), False, out)
    assert "none readable (3 processes could not be read: run as root)" in out.getvalue()

