"""The middle of tcpidle, driven through the fake NETLINK_SOCK_DIAG kernel (no root).

`tcpidle kill` and the engine run unchanged down to the netlink socket
object: diag builds real requests and decodes real answers, the fake kernel
(tests/lab/fake_netlink.py) parses those requests and answers with recorded
inet_diag_msg records and acks.  Owners come from a fake /proc tree
(tests/lab/fake_proc.py) at pids no process can have.  What is checked, each
against the fake kernel's record of what it was asked and what it did:
the whole dump is read before the first destroy; victims go in batches of
256, each asked about again right before its destroy (a victim that
received data since the scan is spared, even one that woke while an earlier
batch was destroyed); outcomes (destroyed, gone on ENOENT, failed; EPERM
fails the run; EOPNOTSUPP switches to the /proc fallback once); owner
selectors --pid/--comm/--cgroup/--uid; --dry-run; max kills; namespaces
known by inode, and never acted on once their path names another.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import List

import pytest

from tcpidle import cli, diag, netns, owners, privilege
from tcpidle.engine import Engine
from tcpidle.model import Action, Policy, PortSet, Selector, TcpState
from tcpidle.scope import Scope
from tests.lab.fake_netlink import FakeKernel
from tests.lab.fake_proc import FIRST_PID, SELECTOR_PID, Holder, make_proc

V4, V6 = socket.AF_INET, socket.AF_INET6


@pytest.fixture
def kernel(monkeypatch, tmp_path):
    """A fake kernel (handed to a Scope as its open_diag), and an empty fake /proc."""
    k = FakeKernel()
    monkeypatch.setattr(diag.DiagSocket, "single_walk", True)  # a class-wide latch
    proc = tmp_path / "proc"
    proc.mkdir()
    walk = owners.owners_by_inode
    monkeypatch.setattr(owners, "owners_by_inode",
                        lambda inodes=None, proc_root=None: walk(inodes, str(proc)))
    # The fake kernel grants CAP_NET_ADMIN (kill checks it before anything else).
    monkeypatch.setattr(privilege, "has_cap_net_admin", lambda *a, **kw: True)
    k.proc = str(proc)
    k.tmp = tmp_path
    yield k
    logging.getLogger("tcpidle").handlers.clear()


@dataclass
class Run:
    code: int
    rows: List[dict]
    err: str

    def by_cookie(self):
        return {r["cookie"]: r for r in self.rows}


def tcpidle(kernel, capsys, *argv) -> Run:
    """`tcpidle ARGV --json` in this process, as main() runs it; its exit status, rows, stderr.

    The command line has no injection point (commands' open_diag is bound
    when they are defined), so for these runs the seam is the one below it:
    the function that creates diag's netlink sockets makes the fake kernel's.
    """
    args = list(argv) + ["--json", "--disable-syslog", "--pin-dir", str(kernel.tmp / "no-pins")]
    code = 0
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(diag, "_open_netlink", kernel.open_netlink)
            cli.main(args)
    except SystemExit as exc:
        code = exc.code
    finally:
        gc.enable()  # main() turns the collector off for the process
        logging.getLogger("tcpidle").handlers.clear()
    out, err = capsys.readouterr()
    return Run(code, [json.loads(line) for line in out.splitlines() if line.strip()], err)


def cookies(socks):
    return [s.cookie for s in socks]


def alive(ns):
    return {s.cookie for s in ns.sockets}


# -- the recorded dumps, replayed -------------------------------------------------------


def test_replayed_dumps_decode_as_recorded(kernel):
    """The fake answers with the recorded records: a dump of everything is the recording."""
    kernel.own.replay("dump_v4.bin")
    kernel.own.replay("dump_v6.bin")
    with kernel.open_diag(None, None) as ds:
        got = ds.dump_sockets([V4, V6], 0xFFFFFFFF)
    want = []
    for name in ("dump_v4.bin", "dump_v6.bin"):
        with open(os.path.join(os.path.dirname(__file__), "..", "data", name), "rb") as f:
            want += diag.decode_dump(f.read())
    assert sorted(got, key=lambda s: s.cookie) == sorted(want, key=lambda s: s.cookie)
    (dump,) = kernel.of_kind("dump")
    assert dump.request["type"] == diag.TCPDIAG_GETSOCK  # both families in one walk


def test_kill_by_port_and_threshold_on_the_recording(kernel, capsys):
    """-d 4401 -t 300: of the recorded connections to port 4401, the one idle 604 ms."""
    kernel.own.replay("dump_v4.bin")
    kernel.own.replay("dump_v6.bin")
    before = {s.cookie: s for s in kernel.own.sockets}
    run = tcpidle(kernel, capsys, "kill", "-d", "4401", "-t", "300")
    assert run.code == 0, run.err
    assert kernel.destroyed() == [37]
    (row,) = run.rows
    s = before[37]
    assert (row["cookie"], row["src"], row["sport"], row["dst"], row["dport"]) == (
        37, "127.0.0.1", s.sport, "127.0.0.1", 4401)
    assert (row["uid"], row["inode"], row["state"]) == (65534, s.inode, "ESTABLISHED")
    assert (row["idle_ms"], row["idle_source"], row["action"], row["error"]) == (
        604.0, "tcp_info", "destroyed", None)
    assert 37 not in alive(kernel.own) and 40 in alive(kernel.own)  # 40: idle 204 ms
    # The port travelled as bytecode and the kernel side filtered by it.
    (dump,) = kernel.of_kind("dump")
    assert dump.request["bytecode"] and dump.request["states"] == 1 << 1
    assert all(before[c].dport == 4401 for c in dump.cookies)
    assert "kill: 1 destroyed" in run.err


# -- order, batches, the re-check -------------------------------------------------------


def test_whole_dump_is_read_before_the_first_destroy(kernel, capsys):
    kernel.own.established(V4, 300, dport=5432)
    kernel.own.established(V6, 300, dport=5432)
    kernel.own.chunk = 4096  # ~10 records a recv(): a dump of many parts
    run = tcpidle(kernel, capsys, "kill", "-d", "5432", "-t", "1000")
    assert run.code == 0, run.err
    assert len(kernel.destroyed()) == 600 and not kernel.own.sockets
    kinds = [e.kind for e in kernel.events]
    first_destroy = kinds.index("destroy")
    dumps = [e for e in kernel.events[:first_destroy] if e.kind == "dump"]
    assert dumps and all(e.done for e in dumps)
    assert "dump" not in kinds[first_destroy:]
    assert kernel.violations == []


def test_fake_kernel_notices_a_destroy_during_a_dump(kernel):
    """The ordering check above can fail: a destroy mid-walk is recorded."""
    kernel.own.established(V4, 50, dport=5432)
    kernel.own.chunk = 1024
    with kernel.open_diag(None, None) as ds:
        socks = ds.dump_sockets([V4], 0xFFFFFFFF)  # read to the end: fine
        walker = kernel.open_netlink(None, 1 << 20)
        walker.send(diag.build_dump_request(V4, 0xFFFFFFFF, seq=7))
        walker.recv_into(bytearray(1 << 16))  # one part read, the walk goes on
        assert ds.destroy(socks[:1]) == [0]
        walker.close()
    assert kernel.violations and "in progress" in kernel.violations[0]


def test_victims_go_in_batches_of_256_each_asked_again_right_before(kernel, capsys):
    kernel.own.established(V4, 300, dport=5432)
    kernel.own.established(V6, 300, dport=5432)
    run = tcpidle(kernel, capsys, "kill", "-d", "5432", "-t", "1000")
    assert run.code == 0, run.err
    acts = [e for e in kernel.events if e.kind != "dump"]
    assert [(e.kind, len(e.cookies)) for e in acts] == [
        ("lookup", 256), ("destroy", 256), ("lookup", 256), ("destroy", 256),
        ("lookup", 88), ("destroy", 88)]
    for lookup, destroy in zip(acts[::2], acts[1::2]):
        assert lookup.cookies == destroy.cookies
    (dump,) = kernel.of_kind("dump")
    assert kernel.destroyed() == dump.cookies  # in dump order, each once
    assert {r["action"] for r in run.rows} == {"destroyed"} and len(run.rows) == 600


def test_a_table_kill_prints_its_header_once_over_all_batches(kernel, capsys):
    """Batches are reported as they complete; the table goes on under one header."""
    kernel.own.established(V4, 600, dport=5432)
    args = ["kill", "-d", "5432", "-t", "1000", "--disable-syslog",
            "--pin-dir", str(kernel.tmp / "no-pins")]
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(diag, "_open_netlink", kernel.open_netlink)
            cli.main(args)
    except SystemExit as exc:
        assert exc.code == 0
    finally:
        gc.enable()
        logging.getLogger("tcpidle").handlers.clear()
    lines = capsys.readouterr().out.splitlines()
    assert len([e for e in kernel.events if e.kind == "destroy"]) == 3  # three batches
    assert [line.split()[0] for line in lines].count("STATE") == 1 and lines[0].startswith("STATE")
    assert len(lines) == 1 + 600


def test_diag_batches_fit_256_and_the_receive_buffer(kernel):
    """One send() carries at most 256 requests, fewer if their acks would overflow the buffer."""
    kernel.own.established(V4, 600, dport=5432)
    with kernel.open_diag(None, None) as ds:
        socks = ds.dump_sockets([V4], 1 << 1)
        assert ds.destroy(socks[:300]) == [0] * 300
    with diag.DiagSocket(rcvbuf=64 << 10, open_socket=kernel.open_netlink) as ds:  # acks of 127 requests fit 128 KiB
        assert ds.destroy(socks[300:]) == [0] * 300
    assert [len(e.cookies) for e in kernel.of_kind("destroy")] == [256, 44, 127, 127, 46]
    assert kernel.destroyed() == cookies(socks)


def test_victims_that_received_since_the_scan_are_spared(kernel, capsys):
    """One wakes between the dump and the first batch, one while batch 1 is destroyed."""
    socks = kernel.own.established(V4, 600, dport=5432)
    early, late = socks[5], socks[400]  # batch 1, batch 2

    def wake(event):
        if event.kind == "dump" and event.done:
            early.receive()
        if event.kind == "destroy" and len(kernel.of_kind("destroy")) == 1:
            late.receive()

    kernel.on_event.append(wake)
    run = tcpidle(kernel, capsys, "kill", "-d", "5432", "-t", "1000")
    assert run.code == 0, run.err
    assert alive(kernel.own) == {early.cookie, late.cookie}
    assert len(kernel.destroyed()) == 598
    assert early.cookie not in run.by_cookie() and late.cookie not in run.by_cookie()
    assert "598 destroyed, 2 spared (data received after the scan)" in run.err


def test_without_a_threshold_only_the_selection_is_checked_again(kernel, capsys):
    """-t 0 acts on every matching connection, idle or not: one that received data since the
    scan is still destroyed, one that left the selection (its state) is spared."""
    busy, closing, plain = kernel.own.established(V4, 3, dport=5432, idle_ms=5)

    def change(event):
        if event.kind == "dump" and event.done:
            busy.receive()
            closing.state = 4  # FIN_WAIT1: no longer "established"

    kernel.on_event.append(change)
    run = tcpidle(kernel, capsys, "kill", "-d", "5432", "-t", "0")
    assert run.code == 0, run.err
    assert [e.kind for e in kernel.events] == ["dump", "lookup", "destroy"]
    assert sorted(kernel.destroyed()) == sorted([busy.cookie, plain.cookie])
    assert alive(kernel.own) == {closing.cookie}


# -- outcomes ---------------------------------------------------------------------------


def test_outcomes_destroyed_gone_and_failed(kernel, capsys):
    ok, reused, vanished, busy = kernel.own.established(V4, 4, dport=5432)
    busy.destroy_errno = errno.EBUSY
    newcomer = []

    def race(event):
        if event.kind == "dump" and event.done:
            kernel.own.sockets.remove(vanished)  # closed before the re-check
        if event.kind == "lookup" and len(kernel.of_kind("lookup")) == 1:
            # Between the re-check and the destroy, `reused` closes and a new
            # connection takes its 4-tuple: same ports, another cookie.
            kernel.own.sockets.remove(reused)
            newcomer.append(kernel.own.add(reused.template, **{
                k: getattr(reused, k) for k in ("family", "state", "sport", "dport", "src",
                                                "dst", "uid", "inode")},
                last_data_recv_ms=0, last_ack_recv_ms=0, last_data_sent_ms=0))

    kernel.on_event.append(race)
    run = tcpidle(kernel, capsys, "kill", "-d", "5432", "-t", "1000")
    rows = run.by_cookie()
    assert rows[ok.cookie]["action"] == "destroyed" and rows[ok.cookie]["error"] is None
    assert rows[reused.cookie]["action"] == "gone"
    assert rows[vanished.cookie]["action"] == "gone"
    assert rows[busy.cookie]["action"] == "failed"
    assert rows[busy.cookie]["error"] == "SOCK_DESTROY: " + os.strerror(errno.EBUSY)
    assert kernel.destroyed() == [ok.cookie]
    assert newcomer[0].cookie in alive(kernel.own)  # the cookie check spared the newcomer
    assert run.code == 1  # a kill failed
    assert "1 destroyed" in run.err and "2 gone" in run.err and "1 failed" in run.err


def test_an_acked_destroy_of_an_orphan_that_stays_is_failed(kernel, capsys):
    """Before Linux 6.11 an orphaned socket (no file: inode 0) is acked 0 and stays: the
    destroyed orphans are looked at again, and one still there is failed."""
    stays, goes, owned = kernel.own.established(V4, 3, dport=5432)
    stays.survives_destroy = True
    stays.inode = goes.inode = 0
    run = tcpidle(kernel, capsys, "kill", "-d", "5432", "-t", "1000")
    assert run.code == 1
    rows = run.by_cookie()
    assert rows[goes.cookie]["action"] == "destroyed"
    assert rows[stays.cookie]["action"] == "failed"
    assert "acked SOCK_DESTROY but the socket remains" in rows[stays.cookie]["error"]
    assert rows[owned.cookie]["action"] == "destroyed"
    assert kernel.destroyed() == [goes.cookie, owned.cookie]
    (again,) = kernel.of_kind("lookup")[1:]  # after the destroy: the orphans only
    assert again.cookies == [stays.cookie, goes.cookie]


def test_eperm_fails_the_run_with_one_line(kernel, capsys):
    """EPERM ends the run after the batch it hit: that batch reported failed, no later one sent."""
    kernel.own.established(V4, 300, dport=5432)
    kernel.own.capable = False
    run = tcpidle(kernel, capsys, "kill", "-d", "5432", "-t", "1000")
    assert run.code == 1
    assert len(kernel.of_kind("destroy")) == 1  # the second batch was never sent
    assert len(run.rows) == 256
    assert {(r["action"], r["error"]) for r in run.rows} == {
        ("failed", "SOCK_DESTROY: " + os.strerror(errno.EPERM))}
    assert run.err.strip().splitlines()[-1] == (
        "tcpidle: error: SOCK_DESTROY refused (EPERM): need CAP_NET_ADMIN in this network namespace")
    assert "Traceback" not in run.err
    assert len(kernel.own.sockets) == 300


def engine_for(kernel, port: int, namespaces=None, **policy) -> Engine:
    """An engine for connections to `port`, reaching the fake kernel through Scope's open_diag."""
    scope = Scope(Selector(dports=PortSet(((port, port),))), namespaces, kernel.open_diag)
    return Engine(scope, Policy(**policy))


class Lines(logging.Handler):
    """The tcpidle logger's messages, each once, as the log file would get them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: List[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines():
    logger = logging.getLogger("tcpidle")
    handler = Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)


@pytest.fixture
def no_iterator(monkeypatch):
    """A kernel without bpf_sock_destroy (before 6.5): EOPNOTSUPP goes to /proc.
    (Where the kernel has it, the iterator goes first: tests/kernel/test_kill_bpf_e2e.py.)"""
    from tcpidle import kdestroy
    monkeypatch.setattr(kdestroy, "unavailable",
                        lambda: "this kernel has no bpf_sock_destroy() kfunc (Linux >= 6.5)")


def test_eopnotsupp_switches_to_the_proc_fallback_once(kernel, log_lines, no_iterator):
    socks = kernel.own.established(V4, 300, dport=5432)
    make_proc(kernel.proc, {FIRST_PID: Holder("psql", [s.inode for s in socks])})
    kernel.own.destroy_supported = False
    engine = engine_for(kernel, 5432, idle_time_ms=1000)
    first = engine.act(engine.scan())
    assert len(kernel.of_kind("destroy")) == 1  # refused once: the second batch went to /proc
    kernel.own.established(V4, 2, dport=5432, first_sport=40000)
    second = engine.act(engine.scan())
    assert len(kernel.of_kind("destroy")) == 1  # nor did the second pass try again
    said = [m for m in log_lines if "SOCK_DESTROY is not supported" in m]
    assert len(said) == 1 and "nor is the BPF iterator (this kernel has no bpf_sock_destroy" \
        in said[0] and "falling back to /proc" in said[0]
    assert len(first) == 300 and len(second) == 302
    # The fallback's outcomes: its owner (an impossible pid) has "exited".
    assert {o.action for o in first} == {Action.GONE}
    assert all(o.pids == (FIRST_PID,) and o.comms == ("psql",) for o in first)
    assert all("pid %d has exited" % FIRST_PID in o.error for o in first)
    assert len(kernel.own.sockets) == 302  # SOCK_DESTROY never succeeded


def test_a_kernel_that_cannot_destroy_time_wait_keeps_sock_destroy_for_the_rest(kernel, log_lines):
    # Debian's 5.10 (the lab): SOCK_DESTROY works, but tcp_abort() answers
    # EOPNOTSUPP for a TIME_WAIT socket.  That is no kernel without SOCK_DESTROY:
    # the run must not switch to /proc for everything after it.
    live = kernel.own.established(V4, 3, dport=5432)
    tw = kernel.own.established(V4, 2, dport=5432, first_sport=30000, state=TcpState.TIME_WAIT,
                                destroy_errno=errno.EOPNOTSUPP, last_data_recv_ms=None,
                                last_ack_recv_ms=None, last_data_sent_ms=None)
    selector = Selector(dports=PortSet(((5432, 5432),)),
                        states=frozenset((TcpState.ESTABLISHED, TcpState.TIME_WAIT)))
    engine = Engine(Scope(selector, None, kernel.open_diag), Policy(idle_time_ms=0))
    first = engine.act(engine.scan())
    by_cookie = {o.verdict.socket.cookie: o for o in first}
    assert {by_cookie[s.cookie].action for s in live} == {Action.DESTROYED}
    assert {by_cookie[s.cookie].action for s in tw} == {Action.FAILED}
    assert all("cannot destroy a TIME_WAIT socket" in by_cookie[s.cookie].error for s in tw)
    assert not [m for m in log_lines if "SOCK_DESTROY is not supported" in m]
    more = kernel.own.established(V4, 2, dport=5432, first_sport=40000)
    second = engine.act(engine.scan())
    assert {o.action for o in second if o.verdict.socket.cookie in {s.cookie for s in more}} == {
        Action.DESTROYED}  # still through SOCK_DESTROY, not /proc


def test_eopnotsupp_with_forced_netlink_fails_each_victim_and_goes_nowhere_else(
        kernel, log_lines, no_iterator):
    socks = kernel.own.established(V4, 3, dport=5432)
    make_proc(kernel.proc, {FIRST_PID: Holder("psql", [s.inode for s in socks])})
    kernel.own.destroy_supported = False
    engine = engine_for(kernel, 5432, idle_time_ms=1000, destroy_with="netlink")
    out = engine.act(engine.scan())
    assert [o.action for o in out] == [Action.FAILED] * 3
    assert all("CONFIG_INET_DIAG_DESTROY is off" in o.error and "--destroy-with netlink"
               in o.error for o in out)
    assert engine.in_kernel is None and not engine.use_proc
    assert len(kernel.own.sockets) == 3


# -- owners, dry run, max kills -----------------------------------------------------------


@pytest.fixture
def owned(kernel):
    """nginx (uid 0) and redis (uid 65534, in a pod) hold one socket each; a third has no owner."""
    nginx, = kernel.own.established(V4, 1, dport=8080, first_sport=21000)
    redis, = kernel.own.established(V4, 1, dport=6379, first_sport=22000, uid=65534)
    orphan, = kernel.own.established(V6, 1, dport=8080, first_sport=23000)
    make_proc(kernel.proc, {
        SELECTOR_PID: Holder("nginx", [nginx.inode], "/system.slice/nginx.service"),
        SELECTOR_PID + 1: Holder("redis", [redis.inode], "/kubepods/pod1/redis"),
    }, impossible=False)
    return {"nginx": nginx, "redis": redis, "orphan": orphan}


@pytest.mark.parametrize("args, chosen", [
    (["--pid", str(SELECTOR_PID)], {"nginx"}),
    (["--pid", str(SELECTOR_PID + 1), "--pid", str(SELECTOR_PID)], {"nginx", "redis"}),
    (["--comm", "redis"], {"redis"}),
    (["--cgroup", "/kubepods"], {"redis"}),
    (["--cgroup", "/system.slice/nginx"], {"nginx"}),
    (["--cgroup", "/system.slice/redis"], set()),
    (["--uid", "65534"], {"redis"}),
    (["--uid", "0"], {"nginx", "orphan"}),
    (["--uid", "0", "--comm", "redis"], set()),
    (["-d", "8080", "--comm", "nginx"], {"nginx"}),
])
def test_owner_selectors(kernel, capsys, owned, args, chosen):
    run = tcpidle(kernel, capsys, "kill", "-t", "1000", *args)
    assert run.code == 0, run.err
    want = {owned[name].cookie for name in chosen}
    assert set(kernel.destroyed()) == want
    assert set(run.by_cookie()) == want
    truth = {"nginx": ([SELECTOR_PID], ["nginx"], ["/system.slice/nginx.service"]),
             "redis": ([SELECTOR_PID + 1], ["redis"], ["/kubepods/pod1/redis"]),
             "orphan": ([], [], [])}
    walked = {"--pid", "--comm", "--cgroup"} & set(args)  # --uid is INET_DIAG's, no /proc walk
    for name in chosen:
        row = run.by_cookie()[owned[name].cookie]
        assert (row["pids"], row["comms"], row["cgroups"]) == (truth[name] if walked else ([], [], []))
        assert row["uid"] == owned[name].uid


def test_dry_run_touches_nothing(kernel, capsys, owned):
    run = tcpidle(kernel, capsys, "kill", "-d", "8080", "-t", "1000", "--dry-run")
    assert run.code == 0, run.err
    assert {r["action"] for r in run.rows} == {"would-destroy"}
    assert set(run.by_cookie()) == {owned["nginx"].cookie, owned["orphan"].cookie}
    assert [e.kind for e in kernel.events] == ["dump"]  # no lookup, no destroy
    assert len(kernel.own.sockets) == 3
    assert "kill (dry run): 2 would-destroy" in run.err


def test_max_kills_act_on_the_idlest(kernel):
    socks = [kernel.own.established(V4, 1, dport=5432, first_sport=20000 + i, idle_ms=ms)[0]
             for i, ms in enumerate((10_000, 50_000, 30_000, 40_000, 20_000))]
    engine = engine_for(kernel, 5432, idle_time_ms=1000, max_kills=2)
    outcomes = engine.act(engine.scan())
    assert [o.verdict.socket.cookie for o in outcomes] == [socks[1].cookie, socks[3].cookie]
    assert sorted(kernel.destroyed()) == sorted([socks[1].cookie, socks[3].cookie])


# -- namespaces -------------------------------------------------------------------------


def ns_file(kernel, name):
    path = kernel.tmp / name
    path.write_text("")
    return str(path), kernel.add_namespace(str(path), name)


def pass_over(engine):
    """One scan and its act, the scan's namespace descriptors closed after."""
    scan = engine.scan()
    try:
        return scan, engine.act(scan)
    finally:
        scan.close()


def listed(path, ns, label):
    """The namespace as a listing names it (--netns wants a real nsfs file: engine level)."""
    return netns.Netns(path, ns.inode, label)


def test_each_namespace_is_acted_on_through_its_own_socket(kernel):
    blue_path, blue = ns_file(kernel, "blue")
    green_path, green = ns_file(kernel, "green")
    b = blue.established(V4, 2, dport=5432)
    g = green.established(V6, 3, dport=5432)
    kernel.own.established(V4, 4, dport=5432)  # not asked for
    engine = engine_for(kernel, 5432, namespaces=[listed(blue_path, blue, "blue"),
                                          listed(green_path, green, "green")], idle_time_ms=1000)
    _scan, outcomes = pass_over(engine)
    assert sorted(kernel.destroyed()) == sorted(cookies(b + g))
    assert not blue.sockets and not green.sockets and len(kernel.own.sockets) == 4
    labels = {o.verdict.socket.cookie: o.verdict.socket.netns for o in outcomes}
    assert {labels[c] for c in cookies(b)} == {"blue"}
    assert {labels[c] for c in cookies(g)} == {"green"}
    assert {o.action for o in outcomes} == {Action.DESTROYED}
    for e in kernel.events:
        assert e.ns in (blue, green)


def test_the_destroy_goes_where_the_dump_went(kernel):
    """After blue's dump its path names green: the victims are destroyed in blue, green untouched."""
    blue_path, blue = ns_file(kernel, "blue")
    green_path, green = ns_file(kernel, "green")
    victims = blue.established(V4, 3, dport=5432)
    green.established(V4, 3, dport=5432)

    def swap(event):
        if event.kind == "dump" and event.done and event.ns is blue:
            os.replace(green_path, blue_path)

    kernel.on_event.append(swap)
    engine = engine_for(kernel, 5432, namespaces=[listed(blue_path, blue, "blue")], idle_time_ms=1000)
    _scan, outcomes = pass_over(engine)
    assert {e.ns for e in kernel.events} == {blue}
    assert sorted(kernel.destroyed()) == sorted(cookies(victims))
    assert {o.action for o in outcomes} == {Action.DESTROYED} and len(green.sockets) == 3


def test_scan_skips_a_namespace_whose_path_names_another(kernel):
    """The pid-reuse check: a listed namespace whose path now names another is not dumped."""
    blue_path, blue = ns_file(kernel, "blue")
    green_path, green = ns_file(kernel, "green")
    green.established(V4, 3, dport=5432)
    was_blue = listed(blue_path, blue, "blue")
    os.replace(green_path, blue_path)  # blue's process exited, its pid went to green's
    engine = engine_for(kernel, 5432, namespaces=[was_blue], idle_time_ms=1000)
    scan, _outcomes = pass_over(engine)
    assert scan.verdicts == [] and kernel.events == []
    assert len(green.sockets) == 3


def test_open_fd_checks_the_inode_it_listed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("")
    b.write_text("")
    fd = netns.open_fd(netns.Netns(str(a), os.stat(a).st_ino, "a"))
    os.close(fd)
    with pytest.raises(netns.NetnsGone, match="now names another"):
        netns.open_fd(netns.Netns(str(a), os.stat(b).st_ino, "a"))
    with pytest.raises(netns.NetnsGone, match="is gone"):
        netns.open_fd(netns.Netns(str(tmp_path / "missing"), 1, "x"))


def test_a_kernel_without_the_one_walk_dump_is_asked_per_family(kernel, capsys):
    kernel.own.legacy_dump = False
    v4 = kernel.own.established(V4, 2, dport=5432)
    v6 = kernel.own.established(V6, 2, dport=5432)
    run = tcpidle(kernel, capsys, "kill", "-d", "5432", "-t", "1000")
    assert run.code == 0, run.err
    assert sorted(kernel.destroyed()) == sorted(cookies(v4 + v6))
    dumps = kernel.of_kind("dump")
    assert [d.answers for d in dumps] == [[errno.EINVAL], [], []]
    assert [d.request["families"] for d in dumps[1:]] == [(V4,), (V6,)]
    assert diag.DiagSocket.single_walk is False
