"""The keep-alive retrofit without root: arming keep-alive in a socket of this very
process (pidfd_getfd on oneself needs no privilege; a loopback connection), the
identity checks before anything is set, the per-owner refusal lines, and which
connections are victims (tcpidle.idle.decide with a keep-alive policy)."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from tcpidle import middlebox
from tcpidle.fallback import AttachRefused, SocketGone
from tcpidle.idle import decide
from tcpidle.model import (AF_INET, SO_COOKIE, TIMER_KEEPALIVE, TIMER_RETRANSMIT, Action, Keepalive,
                           Policy, Socket, Vitals)
from tcpidle.owners import Owner
from tcpidle.retrofit import apply_keepalive, arm, refusal_lines

SETTINGS = Keepalive(idle_s=7, interval_s=3, count=4)


@pytest.fixture
def conn():
    """A loopback TCP connection of this process: (client, server end)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    c = socket.create_connection(ls.getsockname(), timeout=5)
    a, _ = ls.accept()
    ls.close()
    yield c, a
    c.close()
    a.close()


def opts(s):
    return (s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


def ident(s):
    return os.fstat(s.fileno()).st_ino, struct.unpack("=Q", s.getsockopt(
        socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def test_arm_sets_all_four_on_the_owners_socket_and_keeps_its_fd(conn):
    c, a = conn
    inode, cookie = ident(c)
    assert arm(Owner(os.getpid(), c.fileno()), inode, cookie, SETTINGS) == Action.KEEPALIVE_SET
    assert opts(c) == (1, 7, 3, 4)
    c.sendall(b"x")  # our own descriptor is still open and working
    assert a.recv(1) == b"x"


def test_an_owner_who_armed_keep_alive_keeps_its_own_settings(conn):
    c, _ = conn
    c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 300)
    before = opts(c)
    inode, cookie = ident(c)
    assert arm(Owner(os.getpid(), c.fileno()), inode, cookie, SETTINGS) == Action.KEEPALIVE_ON
    assert opts(c) == before


def test_another_socket_behind_the_fd_is_gone_and_nothing_is_set(conn):
    c, _ = conn
    inode, cookie = ident(c)
    owner = Owner(os.getpid(), c.fileno())
    with pytest.raises(SocketGone, match="another file"):
        arm(owner, inode + 1, cookie, SETTINGS)
    with pytest.raises(SocketGone, match="cookie"):
        arm(owner, inode, cookie + 1, SETTINGS)
    assert opts(c)[0] == 0


def sock(inode, cookie=1, timer=0, **kw):
    return Socket(cookie=cookie, family=AF_INET, state=1, src="127.0.0.1", sport=1, dst="127.0.0.1",
                  dport=2, inode=inode, uid=0, raw_id=b"\0" * 48, last_data_recv_ms=100_000,
                  last_ack_recv_ms=100_000, last_data_sent_ms=100_000,
                  vitals=Vitals(timer, 0, 0, 0, 0, 0, 0, 0, 0, 0, 65535), **kw)


def test_apply_goes_through_the_first_holder_that_still_holds_it(conn):
    c, _ = conn
    inode, cookie = ident(c)
    closed = socket.socket()
    stale_fd = closed.fileno()
    closed.close()
    done = apply_keepalive([sock(inode, cookie), sock(0)], SETTINGS,
                           {inode: [Owner(os.getpid(), stale_fd, "me"),
                                    Owner(os.getpid(), c.fileno(), "me")]})
    assert [r.action for r in done.results] == [Action.KEEPALIVE_SET, Action.FAILED]
    assert done.results[1].error == "no process holds this socket"
    assert done.refused == []
    assert opts(c)[0] == 1


def refusal(pid, inode, comm="app"):
    e = AttachRefused.__new__(AttachRefused)
    e.pid, e.comm, e.inode, e.cause = pid, comm, inode, "needs CAP_SYS_PTRACE"
    return e


def test_refusals_are_one_line_per_owner_counting_its_connections():
    lines = refusal_lines([refusal(10, 1), refusal(20, 5, ""), refusal(10, 2), refusal(10, 2)])
    assert lines == [
        "pid 10 (app): pidfd_getfd refused (EPERM): needs CAP_SYS_PTRACE; 2 connections left as "
        "they were",
        "pid 20 (?): pidfd_getfd refused (EPERM): needs CAP_SYS_PTRACE; 1 connection left as it was",
    ]


KA = Policy(keepalive=SETTINGS)


@pytest.mark.parametrize("timer, victim", [(0, True), (TIMER_RETRANSMIT, True),
                                           (TIMER_KEEPALIVE, False)])
def test_a_connection_with_keep_alive_armed_is_no_victim(timer, victim):
    assert decide(sock(3, timer=timer), None, 0, KA).victim is victim
    assert decide(sock(3, timer=timer), None, 0, Policy()).victim is True  # kill: any


def test_keep_alive_also_takes_the_connections_at_risk_behind_a_middlebox():
    box = middlebox.parse("200")  # idle 100 s: at risk (>= half of 200 s), not past it
    assert decide(sock(3), None, 0, Policy(middlebox=box)).victim is False
    v = decide(sock(3), None, 0, Policy(middlebox=box, keepalive=SETTINGS))
    assert v.exposure == middlebox.AT_RISK and v.victim is True
    safe = middlebox.parse("1000")
    assert decide(sock(3), None, 0, Policy(middlebox=safe, keepalive=SETTINGS)).victim is False
