"""Destroying inside the kernel: `kill --destroy-with bpf`, one iterator pass per namespace.

Owns turning the BPF iterator's pass (tcpidle.probe.iterdestroy: selection,
idle decision and bpf_sock_destroy() under each socket's lock) into what the
rest of tcpidle reports: one `Outcome` per socket acted on, with the same
actions as the netlink path (destroyed, would-destroy, failed, gone).

No dump and no re-check happen here: the decision and the destroy are one
step in the kernel (see the README, "How connections are destroyed").  The
sockets the kfunc cannot take (TIME_WAIT, request sockets: not full sockets)
come back unacted on and are handed to SOCK_DESTROY in the same namespace;
where the kernel has no SOCK_DESTROY either they are `failed` with that said.
Owner selectors (--pid, --comm, --cgroup, --uid) are resolved first by the
/proc walk (owners.py) into the socket inodes those processes hold; the
program only acts on those.  Where the tracker's per-socket storage is pinned
(`storage_fd_of` the run's Evidence), the program decides on its ns records
(idle_source "bpf"), else on the socket's jiffies ("tcp_info").
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from . import diag, selectors
from .model import Action, Outcome, Policy, Selector, Socket, Verdict, filled
from .probe import ProbeUnavailable
from .scope import NamespaceFds, Scope

log = logging.getLogger("tcpidle")

_SOCKID = struct.Struct("=HH16s16s4xII")
NOT_FULL = "not a full socket (TIME_WAIT or request): bpf_sock_destroy cannot take it"


def unavailable() -> Optional[str]:
    """Why this kernel cannot destroy from a BPF iterator, or None when it can.

    Found once per boot (BTF ids, HZ, offsets; probe.iterprog's cache), so
    asking costs a file read, not a BTF parse."""
    from .probe import iterdestroy
    try:
        iterdestroy.kernel_ids()
    except ProbeUnavailable as e:
        return str(e)
    return None


def storage_fd_of(evidence) -> Optional[int]:
    """The probe's per-socket storage map behind a run's Evidence (the tracker's pin,
    opened and its layout checked by evidence.choose), or None: no probe, or one
    recording into an LRU map by cookie, which the iterator does not read."""
    storages = getattr(getattr(evidence, "reader", None), "storages", None)
    fds = getattr(storages, "map_fds", ())
    return fds[0] if fds else None


def verdict_of(rec, label, hz: int) -> Verdict:
    """The Verdict the pass made of a socket: its idle time and where it came from
    (the probe's ns record, "bpf", else the socket's jiffies, "tcp_info")."""
    sock = socket_of(rec, label, hz)
    if rec.idle_source == "bpf":
        idle = rec.idle_ns / 1e6
    else:
        idle = None if sock.last_data_recv_ms is None else float(sock.last_data_recv_ms)
    return Verdict(sock, idle, rec.idle_source, None if rec.last_rx_ns is None
                   else rec.last_rx_ns / 1e6, True)


def socket_of(rec, label, hz: int) -> Socket:
    """A Socket as INET_DIAG would have reported it, from an iterator record."""
    fam = rec.family
    src = rec.src_raw or socket.inet_pton(fam, rec.src).ljust(16, b"\0")
    dst = rec.dst_raw or socket.inet_pton(fam, rec.dst).ljust(16, b"\0")
    cookie = rec.cookie
    raw = _pack_sockid(_htons(rec.sport), _htons(rec.dport), src, dst,
                       cookie & 0xFFFFFFFF, cookie >> 32)
    idle_ms = None if rec.idle_jiffies is None else rec.idle_jiffies * 1000 // hz
    if not _FAST_FILL:
        return Socket(cookie, fam, rec.state, rec.src, rec.sport, rec.dst, rec.dport,
                      rec.inode, rec.uid, raw, last_data_recv_ms=idle_ms, netns=label)
    # As the decoder makes them (model.fills_directly): 0.6 us instead of
    # 2 us a socket, a tenth of a 10,000-socket kill's time in user space.
    return filled(Socket, {
        "cookie": cookie, "family": fam, "state": rec.state, "src": rec.src,
        "sport": rec.sport, "dst": rec.dst, "dport": rec.dport, "inode": rec.inode,
        "uid": rec.uid, "raw_id": raw, "last_data_recv_ms": idle_ms, "last_ack_recv_ms": None,
        "last_data_sent_ms": None, "netns": label, "vitals": None})


_pack_sockid, _htons = _SOCKID.pack, socket.htons
_FAST_FILL = diag._FAST_FILL


@dataclass
class KernelPass:
    """What the iterator passes did: outcomes, and how many sockets each selection matched."""

    outcomes: List[Outcome] = field(default_factory=list)
    matched: int = 0
    capped: int = 0
    spared: List = field(default_factory=list)  # (Verdict, "spared" | "left-selection")
    untold_failures: int = 0
    missing: List[str] = field(default_factory=list)
    ms_by_namespace: Dict[object, float] = field(default_factory=dict)


def run(scope: Scope, policy: Policy, owner_inodes: Optional[Sequence[int]] = None,
        storage_fd: Optional[int] = None) -> KernelPass:
    """One iterator pass in every namespace of `scope`; ProbeUnavailable when it cannot load.

    `storage_fd`: the probe's per-socket storage (`storage_fd_of`), read by the pass."""
    from .probe.iterdestroy import IterDestroy

    selector: Selector = scope.selector
    done = KernelPass()
    fds = NamespaceFds()
    with IterDestroy(selector, policy, selectors.states_mask(selector.states),
                     owner_inodes, storage_fd=storage_fd) as prog:
        try:
            for fd, label in scope.namespace_fds(fds):
                started = time.monotonic()
                result = prog.kill(fd)
                done.ms_by_namespace[label] = (time.monotonic() - started) * 1000
                done.matched += result.matched
                if result.untold_failures:
                    log.error("%d destroys in namespace %s failed without their error being kept; "
                              "they are reported as destroyed", result.untold_failures,
                              "(own)" if label is None else label)
                    done.untold_failures += result.untold_failures
                _outcomes(done, result.records, label, fd, prog.hz, policy)
        finally:
            done.missing = list(fds.missing)
            fds.close()
    return done


def _outcomes(done: KernelPass, records, label, fd: Optional[int], hz: int,
              policy: Policy) -> None:
    not_full: List[Verdict] = []
    for rec in records:
        verdict = verdict_of(rec, label, hz)
        acted = action_of(rec)
        if acted is not None:
            done.outcomes.append(Outcome(verdict, *acted))
        elif rec.outcome == "capped":
            done.capped += 1
        elif rec.outcome == "not-full-socket":
            not_full.append(verdict)
        elif rec.outcome in ("spared", "left-selection"):
            # the kill cap's second pass: chosen, then no longer a victim under its lock
            done.spared.append((verdict, rec.outcome))
        else:
            done.outcomes.append(Outcome(verdict, Action.FAILED, "unknown iterator outcome %s"
                                         % rec.outcome))
    if not_full:
        done.outcomes.extend(_by_netlink(not_full, label, fd, policy))


_ACTS = {"destroyed": Action.DESTROYED, "dry-run": Action.WOULD_DESTROY}


def action_of(rec) -> Optional[Tuple[str, Optional[str]]]:
    """What the pass did to a socket it acted on, (action, error text), or None
    for an outcome that is no act (capped, not-full-socket, spared,
    left-selection): ENOENT from the kfunc means the socket was gone already."""
    act = _ACTS.get(rec.outcome)
    if act is not None:
        return act, None
    if rec.outcome == "failed":
        err = -rec.err
        if err == errno.ENOENT:
            return Action.GONE, None
        return Action.FAILED, "bpf_sock_destroy: %s" % os.strerror(err)
    return None


def _by_netlink(victims: List[Verdict], label, fd: Optional[int],
                policy: Policy) -> List[Outcome]:
    """TIME_WAIT and request sockets: SOCK_DESTROY, cookie-checked, where the kernel has it."""
    if policy.dry_run:
        return [Outcome(v, Action.WOULD_DESTROY) for v in victims]
    with (diag.DiagSocket() if fd is None
          else diag.DiagSocket(netns_fd=fd, netns_label=label)) as nl:
        errs = nl.destroy([v.socket for v in victims])
    out = []
    for v, err in zip(victims, errs):
        if err == 0:
            out.append(Outcome(v, Action.DESTROYED))
        elif err == errno.ENOENT:
            out.append(Outcome(v, Action.GONE))
        elif err == errno.EOPNOTSUPP:
            out.append(Outcome(v, Action.FAILED, NOT_FULL + ", and this kernel has no "
                               "SOCK_DESTROY"))
        else:
            out.append(Outcome(v, Action.FAILED, "SOCK_DESTROY: %s" % os.strerror(err)))
    return out




class ChosenDestroy:
    """The iterator for victims user space already chose: the netlink path's batches
    when SOCK_DESTROY answers EOPNOTSUPP (a kernel without CONFIG_INET_DIAG_DESTROY).

    Each batch's cookies are given to one pass in their namespace; each
    victim is decided again there under its lock (selection and threshold,
    as the re-check would) and destroyed, or reported back as spared.  The
    program is loaded at the first batch and reused for the rest.
    """

    def __init__(self, selector: Selector, policy: Policy, room: int,
                 storage_fd: Optional[int] = None):
        self.selector = selector
        self.policy = replace(policy, max_kills=None)  # the engine applied the cap already
        self.room = room
        self.storage_fd = storage_fd  # the probe's storage, as the engine's evidence read it
        self._prog = None

    def destroy(self, victims: Sequence[Verdict], fd: Optional[int]
                ) -> Tuple[List[Tuple[Verdict, str, Optional[str]]], List[Tuple[Verdict, str]],
                           List[Verdict]]:
        """(verdict, action, error) for those acted on, (verdict, why) for those spared,
        and the not-full sockets the kfunc cannot take (for the caller's next backend)."""
        from .probe.iterdestroy import IterDestroy

        if self._prog is None:
            self._prog = IterDestroy(self.selector, self.policy,
                                     selectors.states_mask(self.selector.states),
                                     cookie_room=self.room, storage_fd=self.storage_fd)
        by_cookie = {v.socket.cookie: v for v in victims}
        self._prog.choose(by_cookie)
        result = self._prog.run(fd)
        acted: List[Tuple[Verdict, str, Optional[str]]] = []
        spared: List[Tuple[Verdict, str]] = []
        not_full: List[Verdict] = []
        for rec in result.records:
            v = by_cookie.pop(rec.cookie, None)
            if v is None:
                continue  # not one we chose (cannot happen: the program looks at no other)
            act = action_of(rec)
            if act is not None:
                acted.append((v, *act))
            elif rec.outcome == "not-full-socket":
                not_full.append(v)
            else:  # spared, left-selection
                spared.append((v, rec.outcome))
        if result.untold_failures:
            log.error("%d destroys failed without their error being kept; they are reported "
                      "as destroyed", result.untold_failures)
        # chosen, but not in the namespace any more
        acted.extend((v, Action.GONE, None) for v in by_cookie.values())
        return acted, spared, not_full

    def close(self) -> None:
        if self._prog is not None:
            self._prog.close()
            self._prog = None
