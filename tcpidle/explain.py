"""One connection explained: which socket the user means, and would a kill act on it? (pure)

Owns `tcpidle explain`'s decisions, none of them I/O:

* `parse_target`: the user's CONNECTION, a socket cookie (decimal, as every
  output prints it) or a 4-tuple `ADDR:PORT-ADDR:PORT` (IPv6 in brackets;
  `->` or a blank between the ends also do, as log lines and ss print
  them), with a one-line error naming the argument;
* `pick`: the sockets of a dump the target names -- the written order
  (local end first) preferred, the reverse order otherwise (a 4-tuple
  copied from the peer's side) -- and the other end of each when it is in
  the same namespace (a loopback connection has both);
* `kill_clauses`: each clause of a kill's decision about one socket, in the
  order kill applies them -- the "needs a selector" guard, every selector
  given (family, state, ports, addresses, uid, owners), the protected list,
  the idle threshold, the verdict filter, the middlebox -- with whether it
  holds and why.  Each clause is judged by the very function kill uses
  (`selectors.matches`, `owned_by`, `is_protected` on a selector holding
  that clause alone; `idle.decide` on a policy holding that filter alone),
  so explain cannot tell another story than kill: the clauses all hold
  exactly when kill's own predicates select the socket as a victim
  (tests/unit/test_explain.py checks that over many cases);
* `decision`: destroyed or spared, and by which clause.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace
from typing import List, NamedTuple, Optional, Sequence, Tuple

from . import health, idle, middlebox, selectors
from .errors import UsageError
from .model import (AF_INET, AF_INET6, Activity, OwnerSummary, Policy, PortSet, Selector, Socket,
                    TcpState, Verdict)

ARGUMENT = "CONNECTION"
COOKIE_MAX = (1 << 64) - 2  # ~0 is INET_DIAG_NOCOOKIE, never a socket's

_ENDPOINT = r"(\[[^\]]*\]|[^\s\[\]:>-]+):([0-9]+)"
_TUPLE = re.compile(r"\A" + _ENDPOINT + r"\s*(?:->|-|\s)\s*" + _ENDPOINT + r"\Z")


class Target(NamedTuple):
    """The connection the user names: a cookie, or two endpoints in the order written."""

    text: str
    cookie: Optional[int] = None
    first: Optional[Tuple[object, int]] = None  # (ip_address, port), the local end if written so
    second: Optional[Tuple[object, int]] = None


def _bad(text: str, why: str) -> UsageError:
    return UsageError("%s %r: %s" % (ARGUMENT, text, why))


def parse_target(text: str) -> Target:
    """'123' -> a cookie; '10.0.0.1:5432-10.0.0.2:41234', '[fd00::1]:22-[fd00::2]:5050'
    -> two endpoints; UsageError naming the argument otherwise."""
    raw = text.strip()
    if raw.isascii() and raw.isdigit():
        cookie = int(raw)
        if not 1 <= cookie <= COOKIE_MAX:
            raise _bad(text, "a socket cookie is 1 to %d" % COOKIE_MAX)
        return Target(text, cookie=cookie)
    m = _TUPLE.match(raw)
    if not m:
        raise _bad(text, "neither a socket cookie (decimal digits) nor a 4-tuple "
                         "ADDR:PORT-ADDR:PORT (IPv6 in brackets: [fd00::1]:22-[fd00::2]:5050)")
    first = _endpoint(text, m.group(1), m.group(2))
    second = _endpoint(text, m.group(3), m.group(4))
    if first[0].version != second[0].version:
        raise _bad(text, "one end is IPv4, the other IPv6")
    return Target(text, first=first, second=second)


def _endpoint(text: str, addr: str, port: str) -> Tuple[object, int]:
    bracketed = addr.startswith("[")
    bare = addr[1:-1] if bracketed else addr
    if "%" in bare:
        raise _bad(text, "an IPv6 scope id cannot be matched (INET_DIAG reports addresses "
                         "without one)")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        raise _bad(text, "%r is not an IPv4 or IPv6 address" % bare) from None
    if ip.version == 4 and bracketed:
        raise _bad(text, "brackets are for IPv6 addresses: write %s:%s" % (bare, port))
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise _bad(text, "port %s is out of range 0-65535" % port)
    return _plain(ip), int(port)


def _plain(ip):
    """An address as compared: a v4-mapped IPv6 address (a dual-stack socket talking
    IPv4) is its IPv4 address."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def search_selector(target: Target) -> Selector:
    """What to dump to find the target: every state of both families, and for a 4-tuple
    its two ports at either end (the kernel filters by port; `pick` decides)."""
    everything = frozenset(TcpState)
    if target.cookie is not None:
        return Selector(states=everything)
    wanted = (target.first[1], target.second[1])
    if 0 in wanted:  # a listener's peer is port 0: no port filter
        return Selector(states=everything)
    ports = selectors.parse_ports([",".join(str(p) for p in wanted)])
    return Selector(states=everything, sports=ports, dports=ports)


def _ends(sock: Socket):
    return ((_plain(ipaddress.ip_address(sock.src)), sock.sport),
            (_plain(ipaddress.ip_address(sock.dst)), sock.dport))


def order(target: Target, sock: Socket) -> Optional[int]:
    """0: `sock` is the target as written (its cookie, or local end first); 1: the
    4-tuple written from the peer's side; None: not the target."""
    if target.cookie is not None:
        return 0 if sock.cookie == target.cookie else None
    local, remote = _ends(sock)
    if (local, remote) == (target.first, target.second):
        return 0
    if (local, remote) == (target.second, target.first):
        return 1
    return None


def named(target: Target, socks: Sequence[Socket]) -> List[Socket]:
    """The sockets the target names: as written if any, else written from the peer's side."""
    found = [(order(target, s), s) for s in socks]
    exact = [s for o, s in found if o == 0]
    return exact if exact else [s for o, s in found if o == 1]


def other_end(sock: Socket, socks: Sequence[Socket]) -> Optional[Socket]:
    """The socket at the other end of `sock`'s connection, when the dump has it
    (same namespace, 4-tuple reversed; a listener or TIME_WAIT has none)."""
    if sock.state in (TcpState.LISTEN, TcpState.TIME_WAIT):
        return None
    local, remote = _ends(sock)
    for s in socks:
        if s.netns == sock.netns and s is not sock and s.state not in (
                TcpState.LISTEN, TcpState.TIME_WAIT) and _ends(s) == (remote, local):
            return s
    return None


def pick(target: Target, socks: Sequence[Socket]) -> List[Socket]:
    """The sockets to decide: those the target names, then the other end of each."""
    chosen = named(target, socks)
    ends = [e for e in (other_end(s, socks) for s in chosen) if e is not None and e not in chosen]
    return chosen + ends


# ---------------------------------------------------------------------------
# what is known


class Explanation(NamedTuple):
    """Everything `tcpidle explain` tells of one connection (report.explanation prints it)."""

    verdict: Verdict  # the socket, its idle time and source, its health, middlebox exposure
    activity: Optional[Activity]  # the probe's record, None without one
    now_ns: int  # CLOCK_MONOTONIC when it was judged (the probe's ages count from it)
    holders: Tuple  # owners.Owner (pid, fd, comm, cgroup) of each descriptor holding it
    unreadable: int  # processes whose descriptors could not be read
    owners: OwnerSummary
    peer: Optional[Socket]  # the other end, when it is in the same namespace
    window_ms: float  # the health window the verdict used
    evidence: str  # where the BPF evidence came from (evidence.Evidence.description)
    clauses: Sequence["Clause"]
    decision: Tuple[str, Optional["Clause"]]

    @property
    def flow_idle_ms(self) -> Optional[float]:
        """Ms since any packet either way, as a middlebox counts (middlebox.flow_idle_ms)."""
        return middlebox.flow_idle_ms(self.verdict.socket, self.verdict.last_rx_ms)

    def probe_ages(self) -> Optional[dict]:
        """The probe's record as ages (ms before `now_ns`, None for never) and counts."""
        a = self.activity
        if a is None:
            return None
        return {"last_segment_ms": _age(self.now_ns, a.last_segment_ns),
                "last_data_ms": _age(self.now_ns, a.last_data_ns),
                "segments": a.segments, "data_segments": a.data_segments, "bytes": a.bytes}


def _age(now_ns: int, stamp_ns: int) -> Optional[float]:
    return None if not stamp_ns else max(0, now_ns - stamp_ns) / idle.NS_PER_MS


# ---------------------------------------------------------------------------
# would a kill act on it?


class Clause(NamedTuple):
    """One clause of a kill's decision: its name, whether it holds for the socket, why."""

    name: str  # "selector", "family", "state", "sport", ..., "idle-time", "verdict", "middlebox"
    holds: bool
    text: str


_EVERY = Selector(states=frozenset(TcpState))  # matches every socket
_FAMILY = {AF_INET: "IPv4 (-4)", AF_INET6: "IPv6 (-6)"}


def _only(**field) -> Selector:
    """A selector that selects by this field alone."""
    return replace(_EVERY, **field)


def kill_clauses(sock: Socket, activity: Optional[Activity], now_ns: int, policy: Policy,
                 selector: Selector, owners: OwnerSummary, all_: bool) -> List[Clause]:
    """Each clause of `kill` (or a tracker's poll) with these options, for `sock`, in
    kill's order; only those the options give, the state and the threshold always."""
    out: List[Clause] = []
    if all_:
        out.append(Clause("selector", True, "--all given: kill may run without a selector"))
    elif not selectors.narrows(selector):
        out.append(Clause("selector", False, "no port, address or owner selector and no --all: "
                                             "kill refuses to run"))
    if selector.families != _EVERY.families:
        ok = selectors.matches(_only(families=selector.families), sock)
        out.append(Clause("family", ok, "%s %s %s" % (
            _FAMILY.get(sock.family, "?"), "is" if ok else "is not",
            " / ".join(_FAMILY[f] for f in sorted(selector.families)))))
    ok = selectors.matches(_only(states=selector.states), sock)
    states = ", ".join(selectors.state_names(selector.states))
    out.append(Clause("state", ok, "%s (%s) %s in --state %s%s" % (
        sock.state_name, selectors.state_names([sock.state])[0], "is" if ok else "is not", states,
        " (the default)" if selector.states == {TcpState.ESTABLISHED} else "")))
    for name, field, what, value in (
            ("sport", "sports", "local port", sock.sport),
            ("dport", "dports", "remote port", sock.dport)):
        ports = getattr(selector, field)
        if ports is not None:
            ok = selectors.matches(_only(**{field: ports}), sock)
            out.append(Clause(name, ok, "%s %d %s in --%s %s" % (
                what, value, "is" if ok else "is not", name, ports_text(ports))))
    for name, what, value in (("src", "local address", sock.src), ("dst", "remote address", sock.dst)):
        nets = getattr(selector, name)
        if nets:
            ok = selectors.matches(_only(**{name: nets}), sock)
            out.append(Clause(name, ok, "%s %s %s in --%s %s" % (
                what, value, "is" if ok else "is not", name, ",".join(str(n) for n in nets))))
    if selector.uids:
        ok = selectors.matches(_only(uids=selector.uids), sock)
        out.append(Clause("uid", ok, "uid %d %s in --uid %s" % (
            sock.uid, "is" if ok else "is not", _join(sorted(selector.uids)))))
    out += _owner_clauses(selector, owners)
    if selector.exclude_ports is not None or selector.exclude_nets:
        hit = selectors.is_protected(_only(exclude_ports=selector.exclude_ports,
                                           exclude_nets=selector.exclude_nets), sock)
        given = " ".join(
            (["--exclude-port %s" % ports_text(selector.exclude_ports)]
             if selector.exclude_ports is not None else [])
            + (["--exclude-cidr %s" % ",".join(str(n) for n in selector.exclude_nets)]
               if selector.exclude_nets else []))
        out.append(Clause("protected", not hit, "%s by %s (either end counts; the protected "
                                                "list wins over every selector)"
                          % ("protected" if hit else "not protected", given)))
    out.append(_threshold(sock, activity, now_ns, policy))
    if policy.verdicts is not None:
        alone = idle.decide(sock, activity, now_ns, replace(policy, idle_time_ms=0.0, middlebox=None))
        out.append(Clause("verdict", alone.victim, "verdict %s %s in --verdict %s" % (
            alone.health.verdict, "is" if alone.victim else "is not",
            ",".join(v for v in health.VERDICTS if v in policy.verdicts))))
    if policy.middlebox is not None:
        out.append(_middlebox(sock, activity, now_ns, policy))
    return out


def _owner_clauses(selector: Selector, owners: OwnerSummary) -> List[Clause]:
    out = []
    holders = "held by %s" % _holders(owners) if owners.pids else "no process holds it"
    for name, field, given in (("pid", "pids", _join(sorted(selector.pids))),
                               ("comm", "comms", ",".join(sorted(selector.comms))),
                               ("cgroup", "cgroups", ",".join(selector.cgroups))):
        value = getattr(selector, field)
        if value:
            ok = selectors.owned_by(_only(**{field: value}), owners)
            extra = ""
            if name == "cgroup" and owners.cgroups:
                extra = " (cgroup %s)" % ", ".join(owners.cgroups)
            out.append(Clause(name, ok, "%s%s: %s --%s %s" % (
                holders, extra, "matches" if ok else "does not match", name, given)))
    return out


def _holders(owners: OwnerSummary) -> str:
    return "%s[%s]" % (",".join(owners.comms) or "?", _join(owners.pids))


def _threshold(sock, activity, now_ns, policy) -> Clause:
    alone = idle.decide(sock, activity, now_ns, replace(policy, verdicts=None, middlebox=None))
    t = policy.idle_time_ms
    if t <= 0:
        return Clause("idle-time", alone.victim, "-t 0: every matching connection, idle or not")
    if alone.idle_ms is None:
        return Clause("idle-time", alone.victim, "idle time unknown: only -t 0 destroys it")
    return Clause("idle-time", alone.victim, "idle %s (%s) %s -t %s" % (
        duration(alone.idle_ms), alone.idle_source, ">=" if alone.victim else "<", duration(t)))


def _middlebox(sock, activity, now_ns, policy) -> Clause:
    box = policy.middlebox
    alone = idle.decide(sock, activity, now_ns, replace(policy, idle_time_ms=0.0, verdicts=None))
    flow = middlebox.flow_idle_ms(sock, alone.last_rx_ms)
    what = "%s (timeout %s)" % (box.name, duration(box.timeout_ms))
    if alone.exposure is None:
        text = "flow idle time unknown: not judged against %s" % what
    elif alone.exposure == middlebox.PAST:
        text = "flow idle %s: past %s" % (duration(flow), what)
    else:
        text = "flow idle %s: %s against %s; kill destroys only those past it" % (
            duration(flow), alone.exposure, what)
    return Clause("middlebox", alone.victim, text)


def decision(clauses: Sequence[Clause]) -> Tuple[str, Optional[Clause]]:
    """("would-destroy", None) when every clause holds, else ("spared", the first that fails)."""
    for clause in clauses:
        if not clause.holds:
            return "spared", clause
    return "would-destroy", None


def ports_text(ports: PortSet) -> str:
    """PortSet(((22, 22), (8000, 8100))) -> "22,8000-8100"."""
    return ",".join(str(lo) if lo == hi else "%d-%d" % (lo, hi) for lo, hi in ports.ranges)


def _join(numbers) -> str:
    return ",".join(str(n) for n in numbers)


duration = health.duration  # milliseconds in words, as the verdicts' reasons say them
