"""The scan-to-destroy window: what changes there is noticed, and every batch is reported.

The engine (or the whole CLI, in-process) runs against real sockets in a
namespace made here, with real SOCK_DESTROY; the lab's Window hooks the
netlink exchanges of the pass so that the test changes the world at exactly
one point of it: right before the re-check of a batch, or right after a
batch was destroyed.  Ground truth comes from the sockets themselves.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import subprocess
import sys
import time

import pytest

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from lab.netns import NetnsFactory, cookie_of as cookie  # noqa: E402
from lab.window import Pairs, Window, aborted, fill_send_queue, read_to_end, reset  # noqa: E402

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, SOCK_DESTROY)")]

IDLE_MS = 150


@pytest.fixture
def make_ns():
    factory = NetnsFactory("tiwin-")
    yield factory
    factory.cleanup()


@pytest.fixture
def ns(make_ns):
    return make_ns()


@pytest.fixture
def pairs(ns):
    p = Pairs(ns.name)
    yield p
    p.close()


def engine_for(ns_name, port, **policy):
    from tcpidle import netns
    from tcpidle.engine import Engine
    from tcpidle.model import Policy, PortSet, Selector
    from tcpidle.scope import Scope

    return Engine(Scope(Selector(sports=PortSet(((port, port),))), netns.Watch([ns_name])),
                  Policy(idle_time_ms=policy.pop("idle_time_ms", IDLE_MS), **policy))


def run_cli(capsys, *argv):
    """tcpidle's main() in this process: (exit status, stdout, stderr)."""
    from tcpidle import cli

    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        gc.enable()  # main() turns automatic collection off for the CLI
    out, err = capsys.readouterr()
    return code, out, err


def rows_of(out):
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# -- 1: what left the selection or received data is spared --------------------------


def test_a_victim_that_left_the_selection_or_received_data_is_spared(ns, pairs, capsys, tmp_path,
                                                                     monkeypatch):
    """Four idle connections chosen by the scan.  Before the destroy batch, the
    owner of one exits while 4 MB it wrote still wait for a slow peer (the
    socket goes FIN-WAIT-1: a destroy would throw the data away and reset the
    peer), and data reaches another.  Both are spared, with their reasons in
    the log and the summary; the peer of the first gets every byte and EOF;
    the other two are destroyed."""
    slow_client, leaving = pairs.pair(rcvbuf=4096)
    woken_client, woken = pairs.pair()
    others = pairs.many(2)
    written = fill_send_queue(leaving)
    assert written > 0
    time.sleep(0.4)  # every server end idle > IDLE_MS

    window = Window(monkeypatch)

    def world_moves(_socks):
        leaving.close()  # the owner exits; the kernel keeps sending: FIN-WAIT-1
        woken_client.sendall(b"late")

    window.before("lookup", 1, world_moves)
    log = tmp_path / "kill.log"
    code, out, err = run_cli(capsys, "kill", "--netns", ns.name, "-s", pairs.server_port,
                             "-t", IDLE_MS, "--json", "-f", log, "--disable-syslog",
                             "--pin-dir", tmp_path / "no-pins")
    assert code == 0, err
    rows = rows_of(out)
    assert sorted(r["cookie"] for r in rows) == sorted(cookie(a) for _, a in others), rows
    assert {r["action"] for r in rows} == {"destroyed"} and {r["state"] for r in rows} == {"ESTABLISHED"}
    assert "2 spared (1 left the selection, 1 data received after the scan)" in err, err
    text = log.read_text()
    assert "left the selection (now FIN_WAIT1)" in text, text
    assert "spared cookie=%d" % cookie(woken) in text and "received data after the scan" in text

    got, err_no = read_to_end(slow_client)
    assert (got, err_no) == (written, None)  # all the data, then EOF: no reset
    assert woken.recv(8) == b"late"
    woken.sendall(b"alive")
    assert woken_client.recv(8) == b"alive"
    assert all(aborted(a) for _, a in others)


def test_a_failed_re_check_spares_instead_of_killing(ns, pairs, capsys, tmp_path, monkeypatch):
    """The lookup of the re-check fails (a netlink error): no victim is
    destroyed on the scan's word alone; they are spared and said to be."""
    from tcpidle.errors import NetlinkError

    conns = pairs.many(3)
    time.sleep(0.4)
    window = Window(monkeypatch)

    def failing(_real, _nl, _socks):
        raise NetlinkError(errno.ENOBUFS, "INET_DIAG lookup answer")

    window.instead("lookup", 1, failing)
    code, out, err = run_cli(capsys, "kill", "--netns", ns.name, "-s", pairs.server_port,
                             "-t", IDLE_MS, "--json", "--disable-syslog", "-v",
                             "--pin-dir", tmp_path / "no-pins")
    assert code == 0, err
    assert rows_of(out) == []
    assert "3 spared (not asked about again)" in err, err
    assert "INET_DIAG lookup failed" in err
    assert window.calls["destroy"] == 0
    for c, a in conns:
        c.sendall(b"ok")
        assert a.recv(2) == b"ok"


def test_a_destroy_the_kernel_acks_while_the_socket_stays_is_a_failure(ns, pairs, monkeypatch):
    """Before Linux 6.11 SOCK_DESTROY acked an orphaned socket and left it.
    Two orphans (owners closed them with data unsent to a slow peer:
    FIN-WAIT-1, inode 0), selected by state.  The kernel here destroys
    orphans, so the lab plays the old kernel for one of them (its request is
    not sent, its answer is 0); the look again after the destroy finds it
    and reports it failed, not destroyed.  The other is destroyed."""
    from tcpidle.model import Policy, PortSet, Selector, TcpState
    from tcpidle import netns
    from tcpidle.engine import Engine
    from tcpidle.scope import Scope

    slow = []
    orphans = []
    for _ in range(2):
        client, server = pairs.pair(rcvbuf=4096)
        fill_send_queue(server)
        orphans.append((cookie(server), server.getsockname(), server.getpeername()))
        server.close()
        slow.append(client)
    stays = orphans[0][0]
    window = Window(monkeypatch)

    def old_kernel(real, _nl, socks):
        answers = iter(real([s for s in socks if s.cookie != stays]))
        return [0 if s.cookie == stays else next(answers) for s in socks]

    window.instead("destroy", 1, old_kernel)
    port = pairs.server_port
    engine = Engine(Scope(Selector(sports=PortSet(((port, port),)),
                                   states=frozenset({TcpState.FIN_WAIT1})), netns.Watch([ns.name])),
                    Policy(idle_time_ms=0))
    outcomes = {o.verdict.socket.cookie: o for o in engine.act(engine.scan())}
    assert set(outcomes) == {c for c, _, _ in orphans}
    assert {o.verdict.socket.inode for o in outcomes.values()} == {0}
    assert outcomes[stays].action == "failed"
    assert outcomes[stays].error.startswith(
        "the kernel acked SOCK_DESTROY but the socket remains (FIN_WAIT1;")
    assert outcomes[orphans[1][0]].action == "destroyed"
    # Ground truth: the peer of the destroyed one is reset, the other one's gets its data.
    assert read_to_end(slow[1])[1] == errno.ECONNRESET
    assert read_to_end(slow[0])[1] is None


# -- 2: every batch is reported as soon as it is done ----------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_after_the_first_batch_loses_no_report(ns, pairs, capsys, tmp_path, monkeypatch,
                                                        signum):
    """300 victims, two batches (256 + 44).  The signal arrives right after the
    first batch was destroyed: its 256 rows and log lines are out, the second
    batch is never sent, the run says so and exits 128 + the signal."""
    conns = pairs.many(300)
    time.sleep(0.4)
    window = Window(monkeypatch)
    window.after("destroy", 1, lambda _socks, _answers: signal.raise_signal(signum))
    log = tmp_path / "kill.log"
    code, out, err = run_cli(capsys, "kill", "--netns", ns.name, "-s", pairs.server_port,
                             "-t", IDLE_MS, "--json", "-f", log, "--disable-syslog",
                             "--pin-dir", tmp_path / "no-pins")
    assert code == 128 + signum, err
    rows = rows_of(out)
    assert len(rows) == 256 and {r["action"] for r in rows} == {"destroyed"}
    assert len([ln for ln in log.read_text().splitlines() if " destroyed cookie=" in ln]) == 256
    assert "interrupted by %s: 256 connections acted on, 44 not" % signal.Signals(signum).name in err
    assert window.sizes["destroy"] == [256]
    hit = {cookie(a) for _, a in conns if aborted(a)}
    assert hit == {r["cookie"] for r in rows}


def test_an_error_in_a_later_batch_loses_no_report(ns, pairs, capsys, tmp_path, monkeypatch):
    """The second destroy batch fails with a netlink error: the first batch's
    rows and log lines are out, the summary says the pass was cut short, exit 1."""
    from tcpidle.errors import NetlinkError

    conns = pairs.many(300)
    time.sleep(0.4)
    window = Window(monkeypatch)

    def failing(_real, _nl, _socks):
        raise NetlinkError(errno.EIO, "SOCK_DESTROY answer")

    window.instead("destroy", 2, failing)
    log = tmp_path / "kill.log"
    code, out, err = run_cli(capsys, "kill", "--netns", ns.name, "-s", pairs.server_port,
                             "-t", IDLE_MS, "--json", "-f", log, "--disable-syslog",
                             "--pin-dir", tmp_path / "no-pins")
    assert code == 1, err
    rows = rows_of(out)
    assert len(rows) == 256 and {r["action"] for r in rows} == {"destroyed"}
    assert len([ln for ln in log.read_text().splitlines() if " destroyed cookie=" in ln]) == 256
    assert "stopped by an error (SOCK_DESTROY answer: Input/output error), 44 not acted on" in err
    assert {cookie(a) for _, a in conns if aborted(a)} == {r["cookie"] for r in rows}


def test_eperm_in_a_later_batch_loses_no_report(ns, pairs, capsys, monkeypatch):
    """The kernel refuses the second destroy batch with EPERM (the engine's
    thread lost CAP_NET_ADMIN after the first batch; capabilities are per
    thread, so only that thread): the first batch's 256 rows are out, the
    refused victims are reported failed, and the run ends with the privilege
    error."""
    import threading

    from lab.window import drop_thread_capability
    from tcpidle.errors import PrivilegeError
    from tcpidle.passes import run_pass

    conns = pairs.many(300)
    time.sleep(0.4)
    window = Window(monkeypatch)
    window.after("destroy", 1, lambda _socks, _answers: drop_thread_capability(12))  # CAP_NET_ADMIN
    box = {}

    def run():
        try:
            run_pass(engine_for(ns.name, pairs.server_port), True, "kill")
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert isinstance(box.get("error"), PrivilegeError), box
    out, err = capsys.readouterr()
    rows = rows_of(out)
    assert [r["action"] for r in rows] == ["destroyed"] * 256 + ["failed"] * 44
    assert {r["error"] for r in rows[256:]} == {"SOCK_DESTROY: Operation not permitted"}
    assert "stopped by an error (SOCK_DESTROY refused (EPERM)" in err
    assert {cookie(a) for _, a in conns if aborted(a)} == {r["cookie"] for r in rows[:256]}


def test_the_tracker_logs_and_counts_each_batch_even_when_a_later_one_fails(
        ns, pairs, tmp_path, monkeypatch):
    """A tracker poll whose second batch fails: the event log and the metrics
    have the 256 kills of the first batch; the poll counts as failed."""
    from tcpidle.errors import NetlinkError
    from tcpidle.metrics import Metrics
    from tcpidle.polling import Poller as Tracker
    from tcpidle.report import EventLog

    pairs.many(300)
    time.sleep(0.4)
    window = Window(monkeypatch)

    def failing(_real, _nl, _socks):
        raise NetlinkError(errno.EIO, "SOCK_DESTROY answer")

    window.instead("destroy", 2, failing)
    events = EventLog(str(tmp_path / "events.jsonl"))
    metrics = Metrics(process=False)
    tracker = Tracker(engine_for(ns.name, pairs.server_port), 60, events=events, metrics=metrics)
    try:
        assert tracker.poll_safely() is None  # contained, counted
    finally:
        tracker.close()
        events.close()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 256 and {json.loads(ln)["action"] for ln in lines} == {"destroyed"}
    text = metrics.render().decode()
    assert 'tcpidle_kills_total{outcome="destroyed"} 256.0' in text
    assert "tcpidle_poll_errors_total 1.0" in text


def test_a_tracker_asked_to_stop_mid_poll_stops_between_two_batches(
        ns, pairs, tmp_path, monkeypatch, capsys):
    """SIGTERM to `track` / `kill -i` (request_stop) while a poll destroys:
    the batch in flight completes and is written to the event log; the next
    is not sent, the summary says so, and the loop ends."""
    from tcpidle.polling import Poller as Tracker
    from tcpidle.report import EventLog

    conns = pairs.many(300)
    time.sleep(0.4)
    window = Window(monkeypatch)
    events = EventLog(str(tmp_path / "events.jsonl"))
    tracker = Tracker(engine_for(ns.name, pairs.server_port), 60, events=events)
    window.after("destroy", 1, lambda _socks, _answers: tracker.request_stop())
    try:
        tracker.run()  # one poll, cut after its first batch, then no sleep: stopping
    finally:
        tracker.close()
        events.close()
    assert tracker.polls == 1 and window.sizes["destroy"] == [256]
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 256
    assert {json.loads(ln)["cookie"] for ln in lines} == {cookie(a) for _, a in conns if aborted(a)}
    assert "stopped by a signal, 44 not acted on" in capsys.readouterr().err


# -- 4: namespaces come and go --------------------------------------------------------


def test_a_namespace_whose_name_is_deleted_before_the_destroy_is_still_reached(
        ns, pairs, monkeypatch):
    """--netns NAME, and the name is deleted between the scan and the destroy
    (the namespace lives on: our sockets hold it).  The destroy goes through
    the descriptor the scan opened: destroyed, not reported gone."""
    conns = pairs.many(2)
    time.sleep(0.4)
    window = Window(monkeypatch)
    window.before("lookup", 1, lambda _socks: subprocess.run(
        ["ip", "netns", "delete", ns.name], check=True))
    engine = engine_for(ns.name, pairs.server_port)
    outcomes = engine.act(engine.scan())
    assert sorted(o.verdict.socket.cookie for o in outcomes) == sorted(cookie(a) for _, a in conns)
    assert {o.action for o in outcomes} == {"destroyed"}
    assert all(aborted(a) for _, a in conns)


def test_all_netns_visits_namespaces_made_after_it_started(make_ns, caplog):
    """--all-netns lists the namespaces again at every scan: a namespace made
    after the first scan is visited by the second, one that ended is not
    visited by the third; both are said in the log."""
    from tcpidle import netns
    from tcpidle.engine import Engine
    from tcpidle.scope import Scope
    from tcpidle.model import Policy, PortSet, Selector

    first = make_ns()
    early = Pairs(first.name, addr="127.83.1.1")
    late = None
    try:
        early.many(1)
        port = early.server_port
        # A port and a loopback address no other test uses: --all-netns sees every namespace.
        selector = Selector(sports=PortSet(((port, port),)),
                            src=(__import__("ipaddress").ip_network("127.83.1.1/32"),))
        engine = Engine(Scope(selector, netns.Watch(None)), Policy(idle_time_ms=0, dry_run=True))
        labels = {v.socket.netns for v in engine.scan().verdicts}
        assert labels == {first.name}
        second = make_ns()
        late = Pairs(second.name, addr="127.83.1.1")
        # Same port in the new namespace: bind it explicitly.
        late.listener.close()
        late.listener = _listener_in(second.name, "127.83.1.1", port)
        late.many(1)
        with caplog.at_level("INFO", logger="tcpidle"):
            labels = {v.socket.netns for v in engine.scan().verdicts}
            assert labels == {first.name, second.name}
            early.close()
            first.delete()
            labels = {v.socket.netns for v in engine.scan().verdicts}
            assert labels == {second.name}
        said = [r.getMessage() for r in caplog.records]
        assert "network namespace %s appeared" % second.name in said, said
        assert "network namespace %s ended" % first.name in said, said
    finally:
        early.close()
        if late is not None:
            late.close()


def _listener_in(ns_name, addr, port):
    import socket

    from lab.netns import in_netns

    def make():
        s = socket.socket(socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(16)
        return s

    return in_netns(ns_name, make)


def test_a_tracker_whose_namespace_name_vanished_counts_it_and_finds_it_again(
        make_ns, tmp_path, caplog):
    """track --netns NAME: the name is deleted (a poll error, said plainly),
    then made again for a new namespace, which the next poll visits."""
    from tcpidle.metrics import Metrics
    from tcpidle.polling import Poller as Tracker

    ns = make_ns()
    name = ns.name
    p1 = Pairs(name)
    p2 = None
    metrics = Metrics(process=False)
    try:
        p1.many(1)
        port = p1.server_port
        time.sleep(0.3)
        tracker = Tracker(engine_for(name, port), 60, metrics=metrics)
        assert [o.action for o in tracker.poll()] == ["destroyed"]
        p1.close()
        subprocess.run(["ip", "netns", "delete", name], check=True)
        with caplog.at_level("ERROR", logger="tcpidle"):
            assert tracker.poll() == []
        assert tracker.errors == 1
        assert "tcpidle_poll_errors_total 1.0" in metrics.render().decode()
        assert any("network namespace %s is gone" % name in r.getMessage() for r in caplog.records)
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        p2 = Pairs(name)
        p2.listener.close()
        p2.listener = _listener_in(name, "127.0.0.1", port)
        (_, a), = p2.many(1)
        time.sleep(0.3)
        outcomes = tracker.poll()
        assert [(o.verdict.socket.cookie, o.action) for o in outcomes] == [(cookie(a), "destroyed")]
        assert tracker.errors == 1
        tracker.close()
    finally:
        p1.close()
        if p2 is not None:
            p2.close()


# -- 10: --use-proc says what happened ------------------------------------------------


def test_use_proc_a_4_tuple_reset_and_reopened_is_gone(ns, pairs, monkeypatch):
    """--use-proc: the victim is reset and its 4-tuple opened again by a new
    connection before the batch.  The cookie-checked lookup says the victim
    is gone (as SOCK_DESTROY would); the newcomer is not touched."""
    from tcpidle import netns
    from tcpidle.engine import Engine
    from tcpidle.scope import Scope
    from tcpidle.model import Policy, PortSet, Selector

    old_client, old_server = pairs.pair()
    old_cookie, old_port = cookie(old_client), old_client.getsockname()[1]
    box = {}
    window = Window(monkeypatch)

    def reopen(_socks):
        reset(old_client)
        read_to_end(old_server, timeout=2)
        box["new"] = pairs.pair(bind_port=old_port)

    window.before("lookup", 1, reopen)
    port = pairs.server_port
    # The client ends (dport = the server's port) are the victims; -t 0: every one.
    engine = Engine(Scope(Selector(dports=PortSet(((port, port),))), netns.Watch([ns.name])),
                    Policy(idle_time_ms=0, use_proc=True))
    outcomes = engine.act(engine.scan())
    assert [(o.verdict.socket.cookie, o.action) for o in outcomes] == [(old_cookie, "gone")]
    new_client, new_server = box["new"]
    assert new_client.getsockname()[1] == old_port and cookie(new_client) != old_cookie
    new_client.sendall(b"new")
    assert new_server.recv(3) == b"new"
