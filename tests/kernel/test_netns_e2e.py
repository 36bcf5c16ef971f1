"""Containers: --netns, --all-netns and owner selectors on the real kernel.

tcpidle runs in the test's own namespace and reaches into namespaces the
test creates; the farms inside them are on a port nothing else here uses.
"""

import os
import subprocess
import sys
import time

import pytest

from tcpidle import netns as tnetns
from tcpidle.engine import Engine
from tcpidle.scope import Scope
from tcpidle.model import PortSet, Policy, Selector

from conftest import REPO_ROOT, parse_json_lines

pytestmark = pytest.mark.kernel

# --all-netns sees every namespace of the host, other test runs' too (the
# machine is shared): ports of this run's own, so that `kill --all-netns -d
# PORT` cannot reach another run's connections.  Privileged ports: no
# namespace's ephemeral range reaches below 1024 (the benchmarks' namespaces
# use 10000-65535, so their clients' ports are the remote ports of their
# servers' ends, and 20000-29999 destroyed two of another run's there).
PORT = 600 + (os.getpid() % 190) * 2
OTHER = PORT + 1
IDLE_MS = 400


def tcpidle(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "tcpidle", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def clients(farm, port=None, label=None):
    """The farm's client records (optionally to `port`, with `label`)."""
    return [c for c in farm.status().values()
            if c["role"] == "client" and (port is None or c["remote"][1] == port)
            and (label is None or c["label"] == label)]


@pytest.fixture
def three(make_netns, make_farm):
    """Three namespaces, each with idle and active clients to PORT and OTHER (v4 and v6)."""
    out = []
    for _ in range(3):
        ns = make_netns()
        farm = make_farm(ns)
        farm.serve([PORT, OTHER])
        farm.populate([PORT, OTHER], idle=1, active=1)
        out.append((ns, farm))
    time.sleep(IDLE_MS / 1000 + 0.4)
    return out


def alive_and_pinging(farm, exclude=()):
    status = farm.status()
    ids = [i for i, c in status.items() if i not in exclude]
    pings = farm.ping(ids)
    return all(status[i]["alive"] for i in ids) and all(pings[i] for i in ids)


def test_netns_touches_only_that_namespace(three):
    (ns0, farm0), rest = three[0], three[1:]
    result = tcpidle("kill", "--netns", ns0.name, "-d", PORT, "-t", IDLE_MS, "--json", "--disable-syslog")
    assert result.returncode == 0, result.stderr
    rows = parse_json_lines(result.stdout)
    victims = {c["cookie"]: c["id"] for c in clients(farm0, PORT, "idle")}
    assert len(victims) == 2  # one IPv4, one IPv6
    assert {r["cookie"] for r in rows} == set(victims)
    assert {r["netns"] for r in rows} == {ns0.name}
    assert {r["action"] for r in rows} == {"destroyed"}
    st = farm0.wait_until(lambda s: all(s[i]["error_name"] for i in victims.values()))
    assert {st[i]["error_name"] for i in victims.values()} == {"ECONNABORTED"}
    assert alive_and_pinging(farm0, exclude={i for c in victims.values() for i in (c, peer_id(st, c))})
    for _, farm in rest:
        assert alive_and_pinging(farm)


def peer_id(status, cid):
    me = status[cid]
    for i, other in status.items():
        if other["local"] == me["remote"] and other["remote"] == me["local"]:
            return i
    return None


def test_all_netns_audit_labels_each_namespace(three):
    result = tcpidle("audit", "--all-netns", "-d", PORT, "--json", "-p")
    assert result.returncode == 0, result.stderr
    rows = {r["cookie"]: r for r in parse_json_lines(result.stdout)}
    for ns, farm in three:
        mine = clients(farm, PORT)
        assert len(mine) == 4  # idle + active, v4 + v6
        for c in mine:
            assert c["cookie"] in rows, (ns.name, c)
            assert rows[c["cookie"]]["netns"] == ns.name
            assert rows[c["cookie"]]["pids"] == [farm.pid]
        for c in clients(farm, OTHER):
            assert c["cookie"] not in rows
    # Namespaces are visited once each: no cookie twice.
    assert len(rows) == len(parse_json_lines(result.stdout))


def test_kill_all_netns_kills_idle_everywhere_and_nothing_else(three):
    result = tcpidle("kill", "--all-netns", "-d", PORT, "-t", IDLE_MS, "--json", "--disable-syslog")
    assert result.returncode == 0, result.stderr
    rows = parse_json_lines(result.stdout)
    expected = {c["cookie"] for _, farm in three for c in clients(farm, PORT, "idle")}
    assert len(expected) == 6
    assert {r["cookie"] for r in rows} == expected
    for ns, farm in three:
        victims = [c["id"] for c in clients(farm, PORT, "idle")]
        st = farm.wait_until(lambda s: all(s[i]["error_name"] for i in victims))
        assert {st[i]["error_name"] for i in victims} == {"ECONNABORTED"}
        spared = {i for v in victims for i in (v, peer_id(st, v))}
        assert alive_and_pinging(farm, exclude=spared)


@pytest.fixture
def named_python(tmp_path):
    """A python whose process name (comm) is ours to choose: exec through a symlink."""
    def make(name):
        path = tmp_path / name
        path.symlink_to(os.path.realpath(sys.executable))
        return str(path)
    return make


def test_owner_attribution_and_owner_selectors(make_netns, make_farm, named_python):
    from lab.farm import Farm  # the module the fixtures use

    ns = make_netns()
    server = make_farm(ns)
    server.serve([PORT])
    alpha = Farm(ns.name, python=named_python("tcpidle-alpha"))
    beta = Farm(ns.name, python=named_python("tcpidle-beta"))
    try:
        alpha.populate([PORT], addrs=("127.0.0.1",), idle=2, active=0)
        beta.populate([PORT], addrs=("127.0.0.1",), idle=2, active=0)
        audit = tcpidle("audit", "--netns", ns.name, "-d", PORT, "--json", "-p")
        rows = {r["cookie"]: r for r in parse_json_lines(audit.stdout)}
        for farm, comm in ((alpha, "tcpidle-alpha"), (beta, "tcpidle-beta")):
            for c in clients(farm):
                assert rows[c["cookie"]]["pids"] == [farm.pid]
                assert rows[c["cookie"]]["comms"] == [comm]
                with open("/proc/%d/cgroup" % farm.pid) as f:
                    cgroup = f.readline().strip().split(":", 2)[2]
                assert rows[c["cookie"]]["cgroups"] == [cgroup]

        by_comm = tcpidle("audit", "--netns", ns.name, "--comm", "tcpidle-alpha", "--json")
        assert {r["cookie"] for r in parse_json_lines(by_comm.stdout)} == {c["cookie"] for c in clients(alpha)}

        # Without -p no /proc walk: owners are unknown (as ss without -p).
        plain = tcpidle("audit", "--netns", ns.name, "-d", PORT, "--json")
        assert {tuple(r["pids"]) for r in parse_json_lines(plain.stdout)} == {()}

        killed = tcpidle("kill", "--netns", ns.name, "--pid", beta.pid, "--json", "--disable-syslog")
        assert killed.returncode == 0, killed.stderr
        assert {r["cookie"] for r in parse_json_lines(killed.stdout)} == {c["cookie"] for c in clients(beta)}
        beta_ids = [c["id"] for c in clients(beta)]
        st = beta.wait_until(lambda s: all(s[i]["error_name"] for i in beta_ids))
        assert {st[i]["error_name"] for i in beta_ids} == {"ECONNABORTED"}
        assert alive_and_pinging(alpha)
    finally:
        alpha.stop()
        beta.stop()


def test_netns_by_pid_and_by_path(make_netns, make_farm):
    ns = make_netns()
    farm = make_farm(ns)
    farm.serve([PORT])
    farm.populate([PORT], addrs=("127.0.0.1",), idle=1, active=0)
    want = {c["cookie"] for c in clients(farm)}
    for spec in (str(farm.pid), "/run/netns/" + ns.name):
        result = tcpidle("audit", "--netns", spec, "-d", PORT, "--json")
        rows = parse_json_lines(result.stdout)
        assert {r["cookie"] for r in rows} == want, spec
        assert {r["netns"] for r in rows} == {ns.name}  # named, whichever way it was reached


def test_namespace_that_vanishes_is_skipped_not_fatal(make_netns, make_farm, caplog):
    keep, doomed = make_netns(), make_netns()
    farm = make_farm(keep)
    farm.serve([PORT])
    farm.populate([PORT], addrs=("127.0.0.1",), idle=1, active=0)
    spaces = [tnetns.resolve(keep.name), tnetns.resolve(doomed.name)]
    doomed.delete()  # between listing and entering
    engine = Engine(Scope(Selector(dports=PortSet(((PORT, PORT),))), spaces), Policy())
    with caplog.at_level("WARNING", logger="tcpidle"):
        scan = engine.scan()
    assert {v.socket.cookie for v in scan.verdicts} == {c["cookie"] for c in clients(farm)}
    assert any("is gone" in rec.getMessage() for rec in caplog.records)


def test_unnamed_namespace_of_a_process_is_found_and_labelled_by_inode():
    # A namespace only a process holds (as a container runtime leaves them).
    holder = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    try:
        path = "/proc/%d/ns/net" % holder.pid
        deadline = time.monotonic() + 5
        while os.stat(path).st_ino == os.stat("/proc/self/ns/net").st_ino:
            assert time.monotonic() < deadline, "unshare did not enter a new namespace"
            time.sleep(0.02)
        inode = os.stat(path).st_ino
        found = {ns.inode: ns for ns in tnetns.all_namespaces()}
        assert found[inode].label == inode
        holder.kill()
        holder.wait()
        # The process is gone, so is its namespace: entering it says so.
        with pytest.raises(tnetns.NetnsGone):
            with tnetns.entered(found[inode]):
                pass
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
