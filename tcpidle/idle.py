"""The idle decision: a pure function of (socket, activity, now_ns, policy).

Owns the merge rule of DESIGN.md.  Two witnesses say when a socket last
received something:
  * tcp_info (`tcpi_last_data_recv`, `tcpi_last_ack_recv`): milliseconds, but
    counted in jiffies (1-10 ms steps), payload only when in order, and a
    32-bit jiffies difference that wraps after ~49.7 days at HZ=1000;
  * the BPF probe (`Activity`): bpf_ktime_get_ns() of every segment seen by
    tcp_rcv_established, exact to the nanosecond but only while attached.

The probe refines; it never makes a socket look idler than tcp_info says.
If the probe's idle time exceeds tcp_info's by more than one jiffy, the probe
missed traffic (it was detached, or its entry was evicted and re-created) and
tcp_info wins.
"""

from __future__ import annotations

from typing import Optional, Tuple

from . import health, middlebox
from .model import Activity, Policy, Socket, TcpState, Verdict

# One jiffy at the slowest common HZ (100) plus rounding: the most tcp_info's
# millisecond figure can lag behind the truth.
JIFFY_SLACK_MS = 10.0

NS_PER_MS = 1_000_000

# States with no receive path yet: a listener never receives data and a
# SYN_SENT socket has not been answered, so tcp_info's last-receive stamp is
# still 0 and its "idle time" is the time since boot.
_NO_RECEIVE_PATH = frozenset({TcpState.LISTEN, TcpState.SYN_SENT})


def tcp_info_idle_ms(sock: Socket, policy: Policy) -> Optional[float]:
    """Idle time as tcp_info tells it, or None when unknown.

    With `idle_metric == "any"`, the last ACK of any kind counts as well.
    Values above `last_recv_limit_ms` are treated as unknown (tcp_closer's
    --last_recv_limit: a bogus stamp on a socket that never received data).
    """
    idle = sock.last_data_recv_ms
    if idle is None or sock.state in _NO_RECEIVE_PATH:
        return None
    if policy.idle_metric == "any" and sock.last_ack_recv_ms is not None:
        idle = min(idle, sock.last_ack_recv_ms)
    if policy.last_recv_limit_ms is not None and idle > policy.last_recv_limit_ms:
        return None
    return float(idle)


def merge(
    sock: Socket, activity: Optional[Activity], now_ns: int, policy: Policy
) -> Tuple[Optional[float], Optional[str], Optional[float]]:
    """Return (idle_ms, idle_source, last_rx_ms) by the merge rule."""
    info_ms = tcp_info_idle_ms(sock, policy)
    if activity is None:
        return info_ms, ("tcp_info" if info_ms is not None else None), None

    last_rx_ms = _age_ms(now_ns, activity.last_segment_ns)
    stamp = activity.last_segment_ns if policy.idle_metric == "any" else activity.last_data_ns
    probe_ms = _age_ms(now_ns, stamp)
    if probe_ms is None:
        # The probe saw segments but no payload yet (or none at all).
        return info_ms, ("tcp_info" if info_ms is not None else None), last_rx_ms
    if info_ms is not None and probe_ms > info_ms + JIFFY_SLACK_MS:
        return info_ms, "tcp_info", last_rx_ms
    return probe_ms, "bpf", last_rx_ms


def _age_ms(now_ns: int, stamp_ns: int) -> Optional[float]:
    if not stamp_ns:
        return None
    return max(0, now_ns - stamp_ns) / NS_PER_MS


def decide(sock: Socket, activity: Optional[Activity], now_ns: int, policy: Policy) -> Verdict:
    """Decide whether `sock` is idle enough to act on under `policy`, and its health.

    `idle_time_ms == 0` selects every matched socket, as tcp_closer's `-t 0`,
    including those whose idle time is unknown (TIME_WAIT has no tcp_info).
    Otherwise the socket must be known to be idle at least that long.  Both
    filters below narrow that further: `policy.verdicts` (only connections
    whose health verdict is listed) and `policy.middlebox` (only those past
    the middlebox's timeout).  With `policy.keepalive` (the keep-alive
    retrofit) a socket whose keep-alive timer is armed is no victim, and a
    middlebox's victims include those at risk.
    """
    idle_ms, source, last_rx_ms = merge(sock, activity, now_ns, policy)
    if policy.idle_time_ms <= 0:
        victim = True
    else:
        victim = idle_ms is not None and idle_ms >= policy.idle_time_ms
    verdict = health.assess(sock, idle_ms, last_rx_ms, policy.window_ms)
    if policy.verdicts is not None and verdict.verdict not in policy.verdicts:
        victim = False
    if policy.keepalive is not None and victim and health.keepalive_armed(sock):
        victim = False  # keep-alive retrofit: armed already (by its owner, or by us)
    exposure = None
    if policy.middlebox is not None:
        exposure = middlebox.exposure(sock, last_rx_ms, policy.middlebox)
        # Killing is for those past the timeout; keep-alive also saves those at risk.
        if exposure != middlebox.PAST and not (policy.keepalive is not None
                                               and exposure == middlebox.AT_RISK):
            victim = False
    return Verdict(sock, idle_ms, source, last_rx_ms, victim, verdict, exposure)


def received_since(before: Optional[Activity], after: Optional[Activity], policy: Policy) -> bool:
    """True if the probe saw the socket receive (data, or any segment with
    idle_metric "any") between two readings of its entry.

    The engine asks this of each victim right before destroying it: a
    connection that was idle at the scan but woke up since must be spared.
    No entry now means no new evidence (a destroyed socket's entry is
    deleted; SOCK_DESTROY then answers ENOENT anyway).
    """
    if after is None:
        return False
    return _stamp(after, policy) > (_stamp(before, policy) if before is not None else 0)


def tcp_info_received_since(before: Socket, after: Socket, policy: Policy) -> bool:
    """True if tcp_info shows a receive (as idle_metric counts it) between two
    readings of one socket.

    tcp_info's ages are "now minus the last receive" in jiffies: without a
    receive the second age can only be larger, so a smaller one is news.
    Unknown ages (no tcp_info, over --last-recv-limit) are no evidence.
    """
    old, new = tcp_info_idle_ms(before, policy), tcp_info_idle_ms(after, policy)
    return old is not None and new is not None and new < old


def _stamp(activity: Activity, policy: Policy) -> int:
    return activity.last_segment_ns if policy.idle_metric == "any" else activity.last_data_ns
