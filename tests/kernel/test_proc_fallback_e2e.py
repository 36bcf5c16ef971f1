"""End to end: `kill --use-proc`, the /proc fallback instead of SOCK_DESTROY.

With the default `--proc-action shutdown` the connection is shut down inside
its owner (the owner reads EOF or an error) and the owner keeps running, its
other connections untouched.  With `--proc-action kill` the owner process is
killed: it is a farm process of its own, so that its death is observable and
the other farms (the server, a bystander client) must survive.
"""

import time

import pytest

pytestmark = pytest.mark.kernel

PORT, OTHER = 7001, 7002


def ended_badly_or_eof(rec):
    return not rec["alive"] and (rec["eof"] or rec["error"] is not None)


def assert_alive(farm, ids):
    st = farm.status()
    for i in ids:
        assert st[i]["alive"] and st[i]["error"] is None and not st[i]["eof"], st[i]
    res = farm.ping(ids)
    assert all(res.values()), res


def test_use_proc_shutdown_ends_the_connection_and_spares_the_owner(
        netns, make_farm, run_tcpidle, json_lines):
    server = make_farm(netns)
    server.serve([PORT, OTHER])
    owner = make_farm(netns)
    victims = owner.connect("127.0.0.1", PORT, label="idle")
    victims += owner.connect("::1", PORT, label="idle")
    keep = owner.connect("127.0.0.1", PORT, label="active")
    keep += owner.connect("::1", OTHER, label="idle")
    time.sleep(0.6)

    res = run_tcpidle(netns, "kill", "--use-proc", "-d", PORT, "-t", 300, "--json")
    assert res.returncode == 0, res.stderr
    rows = json_lines(res.stdout)
    assert sorted(r["cookie"] for r in rows) == sorted(v["cookie"] for v in victims), rows
    for row in rows:
        assert row["action"] == "shutdown" and row["error"] is None, row
        assert owner.pid in row["pids"], row
        assert server.pid not in row["pids"], row

    ids = [v["id"] for v in victims]
    st = owner.wait_until(lambda s: all(not s[i]["alive"] for i in ids), timeout=5)
    for i in ids:
        assert ended_badly_or_eof(st[i]), st[i]
    # the owner lives on, and so do its other connections
    assert owner.running()
    assert_alive(owner, [k["id"] for k in keep])
    # the server side of the victims saw the connection end too
    sst = server.wait_until(
        lambda s: sum(1 for r in s.values() if not r["alive"]) == len(victims), timeout=5)
    assert sum(1 for r in sst.values() if ended_badly_or_eof(r)) == len(victims), sst


def test_use_proc_kill_kills_the_owner_process(netns, make_farm, run_tcpidle, json_lines):
    server = make_farm(netns)
    server.serve([PORT, OTHER])
    owner = make_farm(netns)
    victim = owner.connect("127.0.0.1", PORT, label="idle")[0]
    bystander = make_farm(netns)
    keep = bystander.connect("127.0.0.1", PORT, label="active")
    keep += bystander.connect("::1", OTHER, label="idle")
    time.sleep(0.6)

    res = run_tcpidle(netns, "kill", "--use-proc", "--proc-action", "kill",
                      "-d", PORT, "-t", 300, "--json")
    assert res.returncode == 0, res.stderr
    rows = json_lines(res.stdout)
    assert [r["cookie"] for r in rows] == [victim["cookie"]], rows
    assert rows[0]["action"] == "process-killed" and rows[0]["error"] is None, rows
    assert rows[0]["pids"] == [owner.pid], rows

    rc = owner.proc.wait(timeout=5)
    assert rc < 0, "owner should die of a signal, exit status %s" % rc
    # nobody else was killed
    assert server.running() and bystander.running()
    assert_alive(bystander, [k["id"] for k in keep])
    sst = server.wait_until(lambda s: any(not r["alive"] for r in s.values()), timeout=5)
    ended = [r for r in sst.values() if not r["alive"]]
    assert len(ended) == 1 and ended[0]["remote"] == victim["local"], ended


def test_eopnotsupp_switches_to_the_proc_fallback_once_and_says_so(
        netns, make_farm, monkeypatch, caplog):
    """A kernel without CONFIG_INET_DIAG_DESTROY answers EOPNOTSUPP.

    This kernel has SOCK_DESTROY, so only that one answer is substituted;
    the dump, the /proc walk and the shutdown in the owner are real.
    """
    import errno

    from tcpidle import diag, netns as tnetns
    from tcpidle.engine import Engine
    from tcpidle.model import PortSet, Policy, Selector
    from tcpidle.scope import Scope

    server = make_farm(netns)
    server.serve([PORT])
    owner = make_farm(netns)
    victims = owner.connect("127.0.0.1", PORT, label="idle", n=2)
    calls = []

    def no_destroy(self, sockets, batch=256):
        calls.append(len(sockets))
        return [errno.EOPNOTSUPP] * len(sockets)

    monkeypatch.setattr(diag.DiagSocket, "destroy", no_destroy)
    # ... and no bpf_sock_destroy (a kernel before 6.5, or without BTF): where the
    # kernel has it, the BPF iterator goes before /proc (test_kill_bpf_e2e.py)
    from tcpidle import kdestroy
    monkeypatch.setattr(kdestroy, "unavailable", lambda: "no bpf_sock_destroy (Linux < 6.5)")
    engine = Engine(Scope(Selector(dports=PortSet(((PORT, PORT),))), [tnetns.resolve(netns.name)]),
                    Policy())
    with caplog.at_level("WARNING", logger="tcpidle"):
        outcomes = engine.act(engine.scan())
        assert {o.action for o in outcomes} == {"shutdown"}
        assert {o.verdict.socket.cookie for o in outcomes} == {v["cookie"] for v in victims}
        assert all(o.pids == (owner.pid,) for o in outcomes)
        # Sticky: the next pass goes straight to /proc, without asking the kernel again.
        more = owner.connect("127.0.0.1", PORT, label="idle")
        again = engine.act(engine.scan())
        assert [o.action for o in again] == ["shutdown"] and again[0].verdict.socket.cookie == more[0]["cookie"]
    assert calls == [2]
    said = [r.getMessage() for r in caplog.records if "CONFIG_INET_DIAG_DESTROY" in r.getMessage()]
    assert len(said) == 1 and "falling back to /proc" in said[0]
    st = owner.wait_until(lambda s: all(ended_badly_or_eof(s[v["id"]]) for v in victims + more))
    assert all(ended_badly_or_eof(st[v["id"]]) for v in victims + more)
    assert owner.running()
