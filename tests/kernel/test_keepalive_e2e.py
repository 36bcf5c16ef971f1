"""End to end: `tcpidle keepalive` and `track --keepalive` arm keep-alive in the owner's socket.

The connections are the test process's own (lab.tcp, made inside namespaces
the tests create), so the test reads their socket options and errors
directly, and tcpidle, run in the namespace, duplicates them out of this
very process with pidfd_getfd.  What is shown is the issue's list: a peer
cut off is aborted by the kernel within idle + interval x count (measured)
and the owner sees ETIMEDOUT; a live peer answers the probes and the
connection keeps working; the owner's other sockets are untouched; a
refused pidfd_getfd changes nothing and is one line per owner (exit 1);
--dry-run touches nothing; the tracker arms each new connection once.
"""

import errno
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from lab.netns import cookie_of, wait_for
from lab.tcp import accept, connect, cut, exchange, fill_window, listen
from test_track import read_lines

pytestmark = pytest.mark.kernel
pytest_plugins = ["test_track"]  # trackers, pin_dir

# 1 s idle, then 2 probes 1 s apart: a dead peer is aborted 3 s after the last segment.
IDLE, INTERVAL, COUNT = 1, 1, 2
KEEPALIVE = ["--idle", IDLE, "--interval", INTERVAL, "--count", COUNT]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def keepalive_opts(sock):
    """(SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT) as the owner sees them."""
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


def audit(run_tcpidle, json_lines, ns, *args):
    res = run_tcpidle(ns, "audit", "--json", *args)
    assert res.returncode == 0, res.stderr
    return {r["cookie"]: r for r in json_lines(res.stdout)}


def pair(a, b, lst, addr, port, sockets):
    c = connect(a, addr, port)
    p = accept(lst)
    sockets.extend([c, p])
    exchange(c, p)
    return c, p


def test_a_cut_off_peer_is_aborted_by_the_kernel_within_idle_plus_interval_times_count(
        veth_pair, run_tcpidle, json_lines, sockets):
    a, b = veth_pair
    port = 7201
    lst = listen(b, "10.231.0.2", port)
    sockets.append(lst)
    c, _ = pair(a, b, lst, "10.231.0.2", port, sockets)
    last_rx = time.monotonic()  # c just received the peer's byte
    default = keepalive_opts(c)
    assert default[0] == 0
    cut(a, b, "blackhole")  # b's answers (its ACKs of the probes) never come back

    started = time.monotonic()
    res = run_tcpidle(a, "keepalive", "-d", port, *KEEPALIVE, "--json", "--disable-syslog")
    done = time.monotonic()
    assert res.returncode == 0, res.stderr
    rows = json_lines(res.stdout)
    assert [(r["cookie"], r["action"], r["error"]) for r in rows] == [
        (cookie_of(c), "keepalive-set", None)], (rows, res.stderr)
    assert "keepalive: 1 keepalive-set; 1 without keep-alive of 1 matched" in res.stderr
    assert keepalive_opts(c) == (1, IDLE, INTERVAL, COUNT)

    # The owner blocks in recv: the kernel's abort wakes it with ETIMEDOUT.
    c.settimeout(IDLE + INTERVAL * COUNT + 30)
    with pytest.raises(OSError) as exc:
        c.recv(1)
    aborted = time.monotonic()
    assert exc.value.errno == errno.ETIMEDOUT, exc.value
    # The first probe goes IDLE s after the last segment received, or at once when
    # keep-alive is armed later than that; COUNT probes INTERVAL s apart go unanswered.
    earliest = max(last_rx + IDLE, started) + INTERVAL * COUNT
    latest = max(last_rx + IDLE, done) + INTERVAL * COUNT
    print("keep-alive abort: %.2f s after the last segment received, %.2f s after "
          "tcpidle exited (armed %.2f-%.2f s after the last segment; bound %.2f-%.2f s)" % (
              aborted - last_rx, aborted - done, started - last_rx, done - last_rx,
              earliest - last_rx, latest - last_rx))
    assert earliest - 0.05 <= aborted <= latest + 1.5, (aborted - last_rx, earliest - last_rx,
                                                        latest - last_rx)
    assert a.run("ss", "-tnH", "dport", "=", ":%d" % port).stdout.strip() == ""


def test_a_live_peer_answers_the_probes_and_the_owners_other_sockets_are_untouched(
        netns, run_tcpidle, json_lines, sockets):
    port, other_port = 7202, 7203
    lst, other_lst = listen(netns, "127.0.0.1", port), listen(netns, "127.0.0.1", other_port)
    sockets.extend([lst, other_lst])
    c, p = pair(netns, netns, lst, "127.0.0.1", port, sockets)
    other, _ = pair(netns, netns, other_lst, "127.0.0.1", other_port, sockets)  # not selected
    own, _ = pair(netns, netns, lst, "127.0.0.1", port, sockets)  # selected, keep-alive its own
    own.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    own.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 300)
    before = {s.fileno(): keepalive_opts(s) for s in (other, own)}

    res = run_tcpidle(netns, "keepalive", "-d", port, *KEEPALIVE, "--json", "--disable-syslog",
                      "-p")
    assert res.returncode == 0, res.stderr
    rows = json_lines(res.stdout)
    assert [(r["cookie"], r["action"], r["pids"]) for r in rows] == [
        (cookie_of(c), "keepalive-set", [os.getpid()])], (rows, res.stderr)
    assert keepalive_opts(c) == (1, IDLE, INTERVAL, COUNT)
    # The other socket (another port) and the one whose owner armed keep-alive itself:
    # exactly as they were.
    assert {s.fileno(): keepalive_opts(s) for s in (other, own)} == before
    assert keepalive_opts(other)[0] == 0 and keepalive_opts(own)[:2] == (1, 300)

    # Past idle + interval x count with nothing sent: the probes are answered.
    time.sleep(IDLE + INTERVAL * COUNT + 1.5)
    row = audit(run_tcpidle, json_lines, netns, "-d", port, "--active-within", 2500)[cookie_of(c)]
    assert row["state"] == "ESTABLISHED" and row["keepalive"] is True, row
    assert row["verdict"] == "quiet" and row["idle_ms"] >= 2500 and row["last_ack_ms"] < 2500, row
    exchange(c, p)  # and it still carries data
    c.sendall(b"more")
    assert p.recv(4) == b"more"
    # Once armed, never again: nothing left to do.
    res = run_tcpidle(netns, "keepalive", "-d", port, *KEEPALIVE, "--json", "--disable-syslog")
    assert res.returncode == 0 and json_lines(res.stdout) == [], (res.stdout, res.stderr)
    assert "nothing to do" in res.stderr


def test_dry_run_and_the_protected_list_touch_nothing(netns, run_tcpidle, json_lines, sockets):
    port = 7204
    lst = listen(netns, "127.0.0.1", port)
    sockets.append(lst)
    c, _ = pair(netns, netns, lst, "127.0.0.1", port, sockets)
    res = run_tcpidle(netns, "keepalive", "-d", port, *KEEPALIVE, "--json", "--dry-run",
                      "--disable-syslog")
    assert res.returncode == 0, res.stderr
    assert [(r["cookie"], r["action"]) for r in json_lines(res.stdout)] == [
        (cookie_of(c), "would-set-keepalive")], res.stdout
    assert "keepalive (dry run): 1 would-set-keepalive" in res.stderr
    res = run_tcpidle(netns, "keepalive", "-d", port, "--exclude-port", port, *KEEPALIVE,
                      "--json", "--disable-syslog")
    assert res.returncode == 0 and json_lines(res.stdout) == [], res.stdout
    assert keepalive_opts(c)[0] == 0
    row = audit(run_tcpidle, json_lines, netns, "-d", port)[cookie_of(c)]
    assert row["keepalive"] is False, row


OWNER = textwrap.dedent("""
    import socket, sys
    held = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(2)]
    print(" ".join(str(s.getsockname()[1]) for s in held), flush=True)
    for line in sys.stdin:  # each line: the owner's SO_KEEPALIVE of each socket
        print(" ".join(str(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)) for s in held),
              flush=True)
""")
# tcpidle with the owner's effective (and file-system) uid but another real uid: it may read
# the owner's /proc/PID/fd (PTRACE_MODE_READ_FSCREDS), and pidfd_getfd, which checks the real
# uid (PTRACE_MODE_ATTACH_REALCREDS), is refused with EPERM as by Yama or a missing
# CAP_SYS_PTRACE.
OWNER_UID = 65534
OWNER_IDS = ["setpriv", "--reuid", str(OWNER_UID), "--regid", str(OWNER_UID), "--clear-groups"]
NOT_ATTACHING = ["setpriv", "--ruid", str(OWNER_UID - 1), "--euid", str(OWNER_UID), "--regid",
                 str(OWNER_UID), "--clear-groups"]


def test_a_refused_pidfd_getfd_changes_nothing_and_is_one_line_per_owner(
        netns, run_tcpidle, json_lines, sockets):
    probe = subprocess.run(NOT_ATTACHING + [sys.executable, "-c", "import tcpidle.retrofit"],
                           cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if probe.returncode != 0:
        pytest.skip("uid %d cannot run %s with tcpidle" % (OWNER_UID, sys.executable))
    port = 7205
    lst = listen(netns, "127.0.0.1", port)
    sockets.append(lst)
    owner = netns.popen(OWNER_IDS + ["/usr/bin/python3", "-c", OWNER, str(port)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ports = [int(x) for x in owner.stdout.readline().split()]
        peers = [accept(lst) for _ in ports]
        sockets.extend(peers)
        res = run_tcpidle(netns, "keepalive", "-d", port, *KEEPALIVE, "--json",
                          "--disable-syslog", prefix=NOT_ATTACHING)
        assert res.returncode == 1, res.stderr
        rows = json_lines(res.stdout)
        assert sorted((r["sport"], r["action"]) for r in rows) == [
            (p, "failed") for p in sorted(ports)], (rows, res.stderr)
        for r in rows:
            assert "pidfd_getfd(pid %d" % owner.pid in r["error"], r
            assert "refused (EPERM)" in r["error"] and "CAP_SYS_PTRACE" in r["error"], r
        said = [ln for ln in res.stderr.splitlines() if "pidfd_getfd" in ln]
        assert said == ["tcpidle: pid %d (python3): pidfd_getfd refused (EPERM): attaching to "
                        "the owner needs CAP_SYS_PTRACE or the owner's uid as the real uid (this "
                        "process's real uid is %d, its effective %d); 2 connections left as they "
                        "were" % (owner.pid, OWNER_UID - 1, OWNER_UID)], res.stderr
        # Nothing changed: the owner's sockets have no keep-alive and still carry data.
        owner.stdin.write("?\n")
        owner.stdin.flush()
        assert owner.stdout.readline().split() == ["0", "0"]
        rows = audit(run_tcpidle, json_lines, netns, "-s", port)
        assert len(rows) == 2 and all(r["keepalive"] is False for r in rows.values()), rows
        for peer in peers:
            peer.sendall(b"x")
    finally:
        owner.kill()
        owner.wait()


def test_the_tracker_arms_each_new_connection_once(netns, trackers, pin_dir, run_tcpidle,
                                                   json_lines, sockets, tmp_path):
    port = 7206
    lst = listen(netns, "127.0.0.1", port, rcvbuf=4096)
    sockets.append(lst)
    first, _ = pair(netns, netns, lst, "127.0.0.1", port, sockets)
    events = str(tmp_path / "events.jsonl")
    t = trackers(netns, "-d", port, "--keepalive", "%d,%d,%d" % (IDLE, INTERVAL, COUNT),
                 "--interval", 0.2, "--pin-dir", pin_dir, "--event-log", events)
    t.wait_ready(timeout=180)  # the probe's compile: minutes on the lab's emulated kernels
    assert "arming keep-alive (idle 1 s, interval 1 s, 2 probes) instead of killing" in t.stderr()
    assert wait_for(lambda: keepalive_opts(first)[0] == 1, timeout=60), t.stderr()
    late, _ = pair(netns, netns, lst, "127.0.0.1", port, sockets)  # made while it runs
    assert wait_for(lambda: keepalive_opts(late)[0] == 1, timeout=60), t.stderr()
    assert keepalive_opts(late) == (1, IDLE, INTERVAL, COUNT)
    # Data stuck behind a zero window: INET_DIAG shows the probe timer, not the keep-alive
    # one, so the timer alone would have the tracker try this socket again every poll.
    fill_window(late)
    row = wait_for(lambda: (lambda r: r if r["keepalive"] is False else None)(
        audit(run_tcpidle, json_lines, netns, "-d", port)[cookie_of(late)]), timeout=60, step=0.3)
    assert row and row["verdict"] == "zero-window", row
    time.sleep(1.5)  # several polls
    rc, _ = t.stop()
    assert rc == 0, t.stderr()
    acted = sorted((e["cookie"], e["action"]) for e in read_lines(events))
    assert acted == sorted([(cookie_of(first), "keepalive-set"),
                            (cookie_of(late), "keepalive-set")]), (acted, t.stderr())
