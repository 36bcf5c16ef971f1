"""Keep-alive retrofit: keep-alive armed in a socket another process owns.

`tcpidle keepalive` and `track --keepalive` do this instead of destroying:
for each connection, the owner's descriptor is duplicated and checked to be
that socket (`fallback.duplicate_socket`: pidfd_getfd, inode and cookie),
then TCP_KEEPINTVL, TCP_KEEPCNT, SO_KEEPALIVE and TCP_KEEPIDLE are set on
the duplicate, which shares the owner's open file description, and the
duplicate is closed.  From then on the kernel probes the peer: a live peer
answers every probe and the connection lives; after `count` unanswered
probes the kernel aborts the connection itself (tcp_keepalive_timer ->
tcp_write_err: the owner's next call fails with ETIMEDOUT, the peer gets a
reset if it is there to receive one).

Why this order of setsockopts: SO_KEEPALIVE arms the timer for the
socket's current keep-alive time (tcp_set_keepalive), and TCP_KEEPIDLE
then re-arms it for the time left of the new idle time, counted from the
last segment received (tcp_sock_set_keepidle_locked: a connection idle
longer than that is probed at once).  The interval and count only matter
once probes are out, so they go first: the timer never runs with the
system's defaults in between (tcp_keepalive_intvl 75 s, 9 probes).

A socket whose owner already turned SO_KEEPALIVE on (its timer hidden from
INET_DIAG by a pending retransmission) is left as it is: the owner's own
settings win (`keepalive-on`).

Nothing here prints.
"""

from __future__ import annotations

import socket as _socket
from typing import Dict, List, NamedTuple, Optional, Sequence

from .fallback import AttachRefused, FallbackResult, ProcActionError, duplicate_socket, \
    each_held_socket, first_holder
from .model import Action, Keepalive, Socket
from .owners import Owner

__all__ = ["arm", "apply_keepalive", "Retrofit", "refusal_lines"]

def arm(owner: Owner, inode: int, cookie: Optional[int], settings: Keepalive) -> str:
    """Arm keep-alive in the socket OWNER holds; Action.KEEPALIVE_SET, or
    Action.KEEPALIVE_ON when the owner had it on already (left as it is).

    Raises what `fallback.duplicate_socket` raises, and ProcActionError when a
    setsockopt fails.
    """
    with duplicate_socket(owner, inode, cookie) as sock:
        try:
            if sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE):
                return Action.KEEPALIVE_ON
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_KEEPINTVL, settings.interval_s)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_KEEPCNT, settings.count)
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_KEEPIDLE, settings.idle_s)
        except OSError as e:
            raise ProcActionError("setsockopt(pid %d fd %d socket:[%d]): %s" % (
                owner.pid, owner.fd, inode, e.strerror or e)) from None
    return Action.KEEPALIVE_SET


class Retrofit(NamedTuple):
    """What apply_keepalive did: one FallbackResult per socket, in order, and each
    refused pidfd_getfd (to be said once per owner)."""

    results: List[FallbackResult]
    refused: List[AttachRefused]


def apply_keepalive(sockets: Sequence[Socket], settings: Keepalive,
                    owners: Optional[Dict[int, List[Owner]]] = None) -> Retrofit:
    """Arm keep-alive in each of SOCKETS through the first of its holders that works.

    OWNERS as `fallback.apply_fallback`'s (None: one /proc walk for all).  A
    socket no process holds is FAILED (no descriptor to duplicate).
    """
    refused: List[AttachRefused] = []

    def one(sock: Socket, holders: Sequence[Owner]):
        return first_holder(holders, lambda o: arm(o, sock.inode, sock.cookie, settings), refused)

    return Retrofit(each_held_socket(sockets, owners, one), refused)


def refusal_lines(refused: Sequence[AttachRefused]) -> List[str]:
    """One line per owner whose pidfd_getfd the kernel refused, in the order met: who,
    why, and how many of the connections it holds were left as they were."""
    first: Dict[int, AttachRefused] = {}
    inodes: Dict[int, set] = {}
    for e in refused:
        first.setdefault(e.pid, e)
        inodes.setdefault(e.pid, set()).add(e.inode)
    out = []
    for pid, e in first.items():
        n = len(inodes[pid])
        out.append("pid %d (%s): pidfd_getfd refused (EPERM): %s; %d connection%s left as %s" % (
            pid, e.comm or "?", e.cause, n, "" if n == 1 else "s", "it was" if n == 1 else "they were"))
    return out
