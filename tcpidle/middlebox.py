"""Middlebox idle timeouts: which connections a load balancer or NAT has dropped, or will.

Owns the presets (`--middlebox aws-nlb|...|SECONDS`) and the pure rule that
says, of one connection, whether it is past a middlebox's idle timeout
(the middlebox has forgotten the flow: the connection is dead on the far
side whatever the local state says) or at risk (idle for more than a
fraction of the timeout, and no keep-alive armed that will fire in time).

A middlebox's idle timer restarts with any packet in either direction, so
the flow's idle time is the least of: since data was sent
(tcpi_last_data_sent, retransmissions included), since data was received,
since the peer's last ACK (keep-alive replies too), and since the probe's
last segment where a probe runs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from .errors import UsageError
from .model import TIMER_KEEPALIVE, Socket, TcpState

PAST = "past"
AT_RISK = "at-risk"
SAFE = "safe"

# Sockets no middlebox keeps a flow for (yet): their tcp_info times are since boot.
_NOT_A_FLOW = frozenset({TcpState.LISTEN, TcpState.SYN_SENT, TcpState.NEW_SYN_RECV})

MAX_SECONDS = 7 * 86400  # a week: far beyond any middlebox's idle timeout

# Fraction of the timeout past which an idle flow with no keep-alive is at risk.
DEFAULT_RISK_FRACTION = 0.5


class Preset(NamedTuple):
    seconds: float
    what: str
    source: str


# Defaults as the vendors document them (README.md, "Middlebox presets").
PRESETS = {
    "aws-nlb": Preset(350, "AWS Network Load Balancer, TCP idle timeout (default)",
                      "https://docs.aws.amazon.com/elasticloadbalancing/latest/network/update-idle-timeout.html"),
    "aws-nat": Preset(350, "AWS NAT gateway, idle connection timeout",
                      "https://docs.aws.amazon.com/vpc/latest/userguide/nat-gateway-troubleshooting.html"),
    "azure-lb": Preset(240, "Azure Load Balancer, TCP idle timeout (default 4 min)",
                       "https://learn.microsoft.com/azure/load-balancer/load-balancer-tcp-idle-timeout"),
    "gcp-nat": Preset(1200, "Google Cloud NAT, TCP established idle timeout (default)",
                      "https://cloud.google.com/nat/docs/tune-nat-configuration#nat-timeouts"),
    "gce-lb": Preset(600, "Google Cloud load balancers, backend keep-alive / idle timeout",
                     "https://cloud.google.com/load-balancing/docs/https#timeouts_and_retries"),
}


class Middlebox(NamedTuple):
    """A timeout to judge connections against."""

    name: str  # the preset's name, or "SECONDS s"
    timeout_ms: float
    risk_fraction: float = DEFAULT_RISK_FRACTION


def parse(text: str, risk_fraction: float = DEFAULT_RISK_FRACTION,
          option: str = "--middlebox") -> Middlebox:
    """A preset name or a number of seconds; UsageError otherwise."""
    if not 0.0 < risk_fraction <= 1.0:
        raise UsageError("--risk-fraction must be in (0, 1], got %s" % risk_fraction)
    key = text.strip().lower()
    if key in PRESETS:
        return Middlebox(key, PRESETS[key].seconds * 1000.0, risk_fraction)
    try:
        seconds = float(key)
    except ValueError:
        raise UsageError("%s: %r is neither a preset (%s) nor a number of seconds"
                         % (option, text, ", ".join(sorted(PRESETS)))) from None
    if not 0 < seconds <= MAX_SECONDS:  # also refuses nan
        raise UsageError("%s: the timeout must be more than 0 and at most %d seconds, got %s"
                         % (option, MAX_SECONDS, text))
    return Middlebox("%g s" % seconds, seconds * 1000.0, risk_fraction)


def flow_idle_ms(sock: Socket, last_rx_ms: Optional[float]) -> Optional[float]:
    """Ms since any packet of the flow in either direction, as far as we know; None if unknown."""
    best = None
    for t in (sock.last_data_sent_ms, sock.last_data_recv_ms, sock.last_ack_recv_ms, last_rx_ms):
        if t is not None and (best is None or t < best):
            best = t
    return None if best is None else float(best)


def exposure(sock: Socket, last_rx_ms: Optional[float], box: Middlebox) -> Optional[str]:
    """PAST, AT_RISK or SAFE for `sock` behind `box`; None when its idle time is unknown.

    A keep-alive armed to fire before the timeout (flow idle + the timer's
    time left < timeout) keeps the flow alive: not at risk.  A flow already
    past the timeout is past it, keep-alive or not: the middlebox dropped
    it before the probe could refresh it.
    """
    if sock.state in _NOT_A_FLOW:
        return None
    idle = flow_idle_ms(sock, last_rx_ms)
    if idle is None:
        return None
    if idle >= box.timeout_ms:
        return PAST
    if idle < box.risk_fraction * box.timeout_ms:
        return SAFE
    v = sock.vitals
    if v is not None and v.timer == TIMER_KEEPALIVE and idle + v.timer_expires_ms < box.timeout_ms:
        return SAFE
    return AT_RISK
