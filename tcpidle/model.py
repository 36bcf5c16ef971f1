"""The records that flow through tcpidle, as frozen dataclasses.

Owns the vocabulary shared by every module: a `Socket` (one decoded INET_DIAG
record, identified by its cookie, with its `Vitals`), an `Activity` (what the
BPF probe saw of that cookie), the user's `Selector` and `Policy`, the
`Verdict` of the decision (idle time, `Health`, middlebox exposure), the
`OwnerSummary` of the processes holding a socket and the
`Outcome` of acting on it.  Nothing past the decoder sees a
raw netlink message, and nothing here does I/O.

`fills_directly` / `filled`: the fast way to make the records made once per
socket per pass (a Socket in the decoder and from an iterator record, an
Activity from the probe's storage).
"""

from __future__ import annotations

import socket as _socket
from dataclasses import dataclass, field, fields
from enum import IntEnum
from ipaddress import IPv4Network, IPv6Network
from typing import NamedTuple, Optional, Tuple, Union

AF_INET = _socket.AF_INET
AF_INET6 = _socket.AF_INET6

Network = Union[IPv4Network, IPv6Network]


class TcpState(IntEnum):
    """Kernel TCP states (include/net/tcp_states.h); values are the kernel's."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


FAMILY_NAMES = {AF_INET: "ipv4", AF_INET6: "ipv6"}

# Where `tcpidle track` pins its BPF maps, and `audit`/`kill` look for them.
DEFAULT_PIN_DIR = "/sys/fs/bpf/tcpidle"

# Entries of the probe's map (--map-size) unless told otherwise, and at most.
DEFAULT_MAP_SIZE = 65536
MAX_MAP_SIZE = 1 << 24

# getsockopt(SOL_SOCKET, SO_COOKIE) (include/uapi/asm-generic/socket.h): the
# socket's cookie, the same 64-bit number INET_DIAG reports as idiag_cookie
# and the probe keys its records by.  Python's socket module does not name it.
SO_COOKIE = 57


@dataclass(frozen=True)
class Socket:
    """One TCP socket as INET_DIAG reported it.

    `raw_id` is the 48-byte `struct inet_diag_sockid` exactly as dumped
    (network-order ports and addresses, interface, cookie): SOCK_DESTROY sends
    it back unchanged, so the kernel looks up the same 4-tuple and refuses with
    ENOENT if the socket found there has another cookie.
    """

    cookie: int
    family: int
    state: int
    src: str
    sport: int
    dst: str
    dport: int
    inode: int
    uid: int
    raw_id: bytes = field(repr=False)
    # tcp_info fields, in milliseconds; None when the kernel sent no tcp_info
    # (TIME_WAIT and NEW_SYN_RECV sockets have none).
    last_data_recv_ms: Optional[int] = None
    last_ack_recv_ms: Optional[int] = None  # any ACK the peer sent (keep-alive replies too)
    last_data_sent_ms: Optional[int] = None  # data sent, retransmissions included
    # The namespace's name under /run/netns, else its inode; None for the
    # caller's own namespace.
    netns: Union[str, int, None] = None
    # What INET_DIAG says of the connection's health (timers, queues,
    # retransmissions); None only in hand-made records.
    vitals: Optional["Vitals"] = None

    @property
    def state_name(self) -> str:
        try:
            return TcpState(self.state).name
        except ValueError:
            return "UNKNOWN(%d)" % self.state


class Vitals(NamedTuple):
    """The evidence of health INET_DIAG gives about one socket (tcpidle/health.py reads it).

    The first five come from `struct inet_diag_msg` and are in every dumped
    record; the rest from tcp_info, None without it (TIME_WAIT, or a dump
    made without INET_DIAG_INFO).  A NamedTuple in one Socket field rather
    than eleven fields of their own: the decoder fills each Socket's
    __dict__, and eleven more entries would cost it a third more time.
    """

    timer: int  # idiag_timer: 0 none, 1 retransmit, 2 keep-alive, 3 TIME_WAIT, 4 zero-window probe
    timer_retrans: int  # idiag_retrans: RTO timeouts (timer 1) or probes out (2, 4)
    timer_expires_ms: int  # idiag_expires: ms until the timer fires
    recv_q: int  # idiag_rqueue: bytes received, not yet read (listener: accept queue)
    send_q: int  # idiag_wqueue: bytes written, not yet acknowledged (listener: backlog)
    unacked: Optional[int] = None  # tcpi_unacked: segments in flight, not acknowledged
    retransmits: Optional[int] = None  # tcpi_retransmits: RTO timeouts since new data was acked
    total_retrans: Optional[int] = None  # tcpi_total_retrans: segments retransmitted, ever
    backoff: Optional[int] = None  # tcpi_backoff: exponential backoff of the RTO / probe timer
    probes: Optional[int] = None  # tcpi_probes: keep-alive / zero-window probes unanswered
    snd_wnd: Optional[int] = None  # tcpi_snd_wnd: the peer's advertised window, bytes (Linux >= 5.4)


# idiag_timer values (net/ipv4/inet_diag.c, what `ss -o` prints as on/keepalive/timewait/persist).
TIMER_NONE = 0
TIMER_RETRANSMIT = 1
TIMER_KEEPALIVE = 2
TIMER_TIME_WAIT = 3
TIMER_ZERO_WINDOW = 4


@dataclass(frozen=True)
class Activity:
    """What the BPF probe recorded for one socket cookie.

    Times are CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns); 0 means never.
    """

    cookie: int
    last_segment_ns: int
    last_data_ns: int
    segments: int = 0
    data_segments: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class PortSet:
    """A set of ports as sorted, merged, inclusive ranges: ((22, 22), (8000, 8100))."""

    ranges: Tuple[Tuple[int, int], ...]

    def __contains__(self, port: int) -> bool:
        # Checked once per dumped socket: a plain loop over the sorted ranges
        # is 4x faster than any() over a generator.
        for lo, hi in self.ranges:
            if port < lo:
                return False
            if port <= hi:
                return True
        return False


@dataclass(frozen=True)
class Selector:
    """Which sockets a run concerns.

    `families` and `states` are never empty (the CLI fills defaults); a port
    set or network tuple left empty/None matches everything.
    """

    families: frozenset = frozenset({AF_INET, AF_INET6})
    states: frozenset = frozenset({TcpState.ESTABLISHED})
    sports: Optional[PortSet] = None
    dports: Optional[PortSet] = None
    src: Tuple[Network, ...] = ()
    dst: Tuple[Network, ...] = ()
    # Selectors that need the /proc owner map (issue: containers).
    pids: frozenset = frozenset()
    comms: frozenset = frozenset()
    uids: frozenset = frozenset()
    cgroups: Tuple[str, ...] = ()
    # Protected list: wins over every other selector.
    exclude_ports: Optional[PortSet] = None
    exclude_nets: Tuple[Network, ...] = ()

    @property
    def narrows_by_address(self) -> bool:
        """True when a port or address selector is given (kill needs one, or --all)."""
        return bool(self.sports or self.dports or self.src or self.dst)


@dataclass(frozen=True)
class Policy:
    """How idleness is decided and what is done about it."""

    idle_time_ms: float = 0.0
    idle_metric: str = "data"  # "data" or "any"
    # tcpi_last_data_recv values above this are treated as unknown (tcp_closer's
    # --last_recv_limit): they come from sockets that never received data, whose
    # jiffies stamp is 0, or from a wrapped 32-bit counter.  None = no limit.
    last_recv_limit_ms: Optional[float] = None
    dry_run: bool = False
    use_proc: bool = False
    proc_action: str = "shutdown"  # "shutdown" or "kill"
    # --destroy-with: "auto" (netlink, on EOPNOTSUPP the BPF iterator where the
    # kernel has it, then /proc), or one forced: "netlink", "bpf", "proc".
    destroy_with: str = "auto"
    max_kills: Optional[int] = None
    # Health (tcpidle/health.py): data received within window_ms is "active";
    # past it a connection is quiet, dead or unknown by the evidence.
    window_ms: float = 60_000.0
    # Act only on these verdicts (kill --verdict); None = whatever the verdict.
    verdicts: Optional[frozenset] = None
    # A middlebox's idle timeout (tcpidle/middlebox.py): connections are judged
    # past it / at risk, and only those past it are victims.  None = no middlebox.
    middlebox: Optional[object] = None
    # Arm keep-alive in the victims instead of destroying them (tcpidle keepalive,
    # track --keepalive); connections whose keep-alive timer is armed are no victims.
    keepalive: Optional["Keepalive"] = None


# The kernel's bounds on the keep-alive settings (include/net/tcp.h: MAX_TCP_KEEPIDLE,
# MAX_TCP_KEEPINTVL, MAX_TCP_KEEPCNT); setsockopt refuses others with EINVAL.
MAX_KEEPIDLE_S = 32767
MAX_KEEPINTVL_S = 32767
MAX_KEEPCNT = 127


class Keepalive(NamedTuple):
    """The keep-alive settings armed in an owner's socket (tcpidle/retrofit.py): the first
    probe after `idle_s` without anything received, then one every `interval_s`; after
    `count` unanswered the kernel aborts the connection (the owner gets ETIMEDOUT)."""

    idle_s: int  # TCP_KEEPIDLE
    interval_s: int  # TCP_KEEPINTVL
    count: int  # TCP_KEEPCNT


class Health(NamedTuple):
    """A connection's health verdict (tcpidle/health.py) and the rule that gave it, in words."""

    verdict: str  # "active", "quiet", "dead", "zero-window", "close-wait", "orphan", "unknown"
    reason: str
    rule: str = ""  # the rule's name, a key of health.RULES ("dead-retransmits", ...)


class Verdict(NamedTuple):
    """The decision for one socket: its idle time, its health, whether to act.

    A NamedTuple, not a frozen dataclass: one is made per socket scanned,
    and this is a third of the cost (0.2 us against 0.6 us).
    """

    socket: Socket
    idle_ms: Optional[float]
    idle_source: Optional[str]  # "bpf", "tcp_info" or None
    last_rx_ms: Optional[float]  # any segment, probe only
    victim: bool  # True when the policy acts on the socket (idle long enough, or -t 0)
    health: Optional[Health] = None
    # With a middlebox policy: "past", "at-risk", "safe", or None (unknown / none).
    exposure: Optional[str] = None


class Action:
    DESTROYED = "destroyed"
    WOULD_DESTROY = "would-destroy"
    SHUTDOWN = "shutdown"
    PROCESS_KILLED = "process-killed"
    GONE = "gone"
    FAILED = "failed"
    # tcpidle keepalive / track --keepalive (tcpidle/retrofit.py)
    KEEPALIVE_SET = "keepalive-set"
    WOULD_SET_KEEPALIVE = "would-set-keepalive"
    KEEPALIVE_ON = "keepalive-on"  # the owner had SO_KEEPALIVE on already: its settings kept


class OwnerSummary(NamedTuple):
    """The processes holding one socket, as every output shows them.

    Sorted and without repeats: two nginx workers sharing a socket are
    pids (812, 813), comms ("nginx",).  `cgroups` are the holders' cgroup
    paths (containers), unreadable ones left out.
    """

    pids: Tuple[int, ...] = ()
    comms: Tuple[str, ...] = ()
    cgroups: Tuple[str, ...] = ()


NO_OWNERS = OwnerSummary()


@dataclass(frozen=True)
class Outcome:
    """What happened to one victim."""

    verdict: Verdict
    action: str
    error: Optional[str] = None
    pids: Tuple[int, ...] = ()
    comms: Tuple[str, ...] = ()
    cgroups: Tuple[str, ...] = ()


def fills_directly(cls, names) -> bool:
    """True if `cls` is still a plain frozen dataclass with exactly the fields
    `names`, so `filled(cls, {...})` makes the object its __init__ would.

    The generated __init__ of a frozen dataclass pays one object.__setattr__
    per field; filling the new instance's __dict__ at once costs ~0.6 us
    instead of 1.6-2 us a Socket, the largest single cost of decoding a dump.
    Same object, same ==/hash.  A field added, a __post_init__ or __slots__
    makes this False, and the callers use the class itself."""
    return ({f.name for f in fields(cls)} == set(names)
            and not hasattr(cls, "__post_init__") and not hasattr(cls, "__slots__"))


def filled(cls, values: dict, _new=object.__new__, _set=object.__setattr__):
    """An instance of `cls` whose __dict__ is `values` (see fills_directly)."""
    obj = _new(cls)
    _set(obj, "__dict__", values)
    return obj
