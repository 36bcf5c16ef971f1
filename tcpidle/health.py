"""The health verdict of one connection: is its peer there? (pure; no I/O)

Owns the rules that turn the kernel's evidence (`model.Vitals`, the
tcp_info times, the BPF probe's last segment) into one of seven verdicts,
each with the rule that gave it and its evidence in words:

  active       data received within the window;
  quiet        no data for the window, but the peer demonstrably answers:
               a segment of any kind (an ACK, a keep-alive reply) arrived
               within the window (probe's last segment, tcpi_last_ack_recv);
  dead         the peer does not answer: data is unacknowledged after
               DEAD_RETRANSMITS retransmission timeouts and nothing came from
               the peer since our last (re)transmission; or DEAD_PROBES
               keep-alive / zero-window probes are out unanswered (the
               persist timer's probes with an open window are local send
               failures, no evidence about the peer);
  zero-window  the peer advertises a zero window (tcpi_snd_wnd 0; Linux < 5.4:
               the persist timer, idiag_timer 4, alone) and we are probing it,
               or data waits behind it with nothing in flight: such a
               connection stays ESTABLISHED forever;
  close-wait   the peer closed (its FIN arrived), the owner never closed;
  orphan       the owner closed, the kernel still holds the connection
               (no inode: FIN-WAIT-1 with unsent data, FIN-WAIT-2, CLOSING,
               LAST-ACK);
  unknown      not enough evidence; the reason says what is missing.

The rules are tried in that order of strength: states first (they are
facts), then death (positive evidence of silence), zero-window, then the
clocks.  Why these thresholds:

* DEAD_RETRANSMITS = 3 is the kernel's own `net.ipv4.tcp_retries1`
  default, the count after which TCP "decides that something is wrong"
  and asks the network layer to re-check the route.  tcpi_retransmits
  (icsk_retransmits) counts RTO timeouts since the peer last acknowledged
  new data and is reset by such an ACK, so 3 means at least 3 backed-off
  timeouts (>= 1.4 s at the 200 ms minimum RTO) without progress.  A dup
  ACK (a live peer that cannot take the data) leaves the count but moves
  tcpi_last_ack_recv: hence "nothing from the peer since we last sent".
* DEAD_PROBES = 2: icsk_probes_out is reset by every acceptable ACK
  (tcp_ack), so two probes out means the first went unanswered for a whole
  probe interval; one probe out may just be waiting for its answer.
"""

from __future__ import annotations

from typing import Optional

from .model import TIMER_KEEPALIVE, TIMER_RETRANSMIT, TIMER_ZERO_WINDOW, Health, Socket, TcpState

ACTIVE = "active"
QUIET = "quiet"
DEAD = "dead"
ZERO_WINDOW = "zero-window"
CLOSE_WAIT = "close-wait"
ORPHAN = "orphan"
UNKNOWN = "unknown"
# Every verdict, in the order reports list them.
VERDICTS = (ACTIVE, QUIET, DEAD, ZERO_WINDOW, CLOSE_WAIT, ORPHAN, UNKNOWN)

DEAD_RETRANSMITS = 3
DEAD_PROBES = 2
# The window when the user gives none (-t, --min-idle or --active-within);
# model.Policy.window_ms defaults to the same.
DEFAULT_WINDOW_MS = 60_000.0

# Every rule assess() tries, by the name its Health carries (`rule`), in the
# order it tries them: the verdict it gives and what it says, in words (the
# README's table of rules; `tcpidle explain` prints them).
RULES = {
    "close-wait": (CLOSE_WAIT, "state CLOSE_WAIT: the peer closed, the owner never did"),
    "orphan": (ORPHAN, "FIN-WAIT-1, FIN-WAIT-2, CLOSING or LAST-ACK with no inode: the owner "
               "closed, the kernel still holds it"),
    "time-wait": (UNKNOWN, "TIME_WAIT: the connection is over"),
    "listener": (UNKNOWN, "a listener is no connection"),
    "handshake": (UNKNOWN, "a handshake in progress"),
    "no-tcp-info": (UNKNOWN, "the kernel sent no tcp_info"),
    "dead-retransmits": (DEAD, "data unacknowledged after %d retransmission timeouts and "
                         "nothing from the peer since our last (re)transmission"
                         % DEAD_RETRANSMITS),
    "dead-probes": (DEAD, "%d keep-alive or zero-window probes out, unanswered" % DEAD_PROBES),
    "zero-window": (ZERO_WINDOW, "the peer advertises a zero window and we probe it, or data "
                    "waits behind it with nothing in flight"),
    "active": (ACTIVE, "data received within the window"),
    "quiet": (QUIET, "no data for the window, but a segment from the peer within it"),
    "no-evidence": (UNKNOWN, "none of the rules above holds: the reason says what is missing"),
}

# States in which the owner may have closed while the kernel finishes the
# connection; with no inode (no struct socket) the owner is gone.
_CLOSING = frozenset({TcpState.FIN_WAIT1, TcpState.FIN_WAIT2, TcpState.CLOSING, TcpState.LAST_ACK})
_HANDSHAKE = frozenset({TcpState.SYN_SENT, TcpState.SYN_RECV, TcpState.NEW_SYN_RECV})
# Plain ints for assess(), asked of every socket of every poll: an IntEnum
# member read is a class attribute lookup, 3x the cost of a module global.
_CLOSE_WAIT = int(TcpState.CLOSE_WAIT)
_TIME_WAIT = int(TcpState.TIME_WAIT)
_LISTEN = int(TcpState.LISTEN)


def keepalive_armed(sock: Socket) -> Optional[bool]:
    """Is the keep-alive timer armed?  None when unknown (no evidence).

    INET_DIAG shows one timer: a pending retransmission or zero-window
    timer hides the keep-alive one, so False means "not seen armed".
    """
    v = sock.vitals
    return None if v is None else v.timer == TIMER_KEEPALIVE


def peer_heard_ms(sock: Socket, last_rx_ms: Optional[float]) -> Optional[float]:
    """Ms since the last segment of any kind from the peer: the probe's
    last segment where present, else (and never later than) tcp_info's last ACK."""
    ack = sock.last_ack_recv_ms
    if last_rx_ms is None:
        return None if ack is None else float(ack)
    if ack is None or last_rx_ms < ack:
        return last_rx_ms
    return float(ack)


def assess(sock: Socket, idle_ms: Optional[float], last_rx_ms: Optional[float],
           window_ms: float = DEFAULT_WINDOW_MS) -> Health:
    """The verdict for `sock`.

    `idle_ms` is the merged time since data was received (idle.merge),
    `last_rx_ms` the probe's time since any segment (None without probe),
    `window_ms` the threshold between active and quiet/unknown.
    """
    state = sock.state
    v = sock.vitals
    if state == _CLOSE_WAIT:
        return Health(CLOSE_WAIT, "the peer closed; the owner has not"
                      + ("" if sock.inode else " (never accepted)")
                      + (", %d bytes unread" % v.recv_q if v is not None and v.recv_q else ""),
                      "close-wait")
    if state in _CLOSING and not sock.inode:
        unsent = " with %d bytes not acknowledged" % v.send_q if v is not None and v.send_q else ""
        return Health(ORPHAN, "the owner closed; the kernel still holds it in %s%s"
                      % (sock.state_name, unsent), "orphan")
    if state == _TIME_WAIT:
        return Health(UNKNOWN, "TIME_WAIT: the connection is over, only its 4-tuple is kept",
                      "time-wait")
    if state == _LISTEN:
        return Health(UNKNOWN, "a listener, not a connection", "listener")
    if state in _HANDSHAKE:
        return Health(UNKNOWN, "handshake not complete (%s)" % sock.state_name, "handshake")
    if v is None or v.unacked is None:
        return Health(UNKNOWN, "no tcp_info for this socket", "no-tcp-info")

    heard = peer_heard_ms(sock, last_rx_ms)
    sent = sock.last_data_sent_ms
    silent_since_send = heard is not None and sent is not None and heard >= sent
    if v.unacked and v.retransmits >= DEAD_RETRANSMITS and silent_since_send:
        return Health(DEAD, "%d segments unacknowledged after %d retransmission timeouts "
                      "(backoff %d); nothing from the peer for %s"
                      % (v.unacked, v.retransmits, v.backoff, _dur(heard)), "dead-retransmits")
    # snd_wnd (Linux >= 5.4) says whether the window is really shut; older
    # kernels have only the persist timer to tell.  Timer 4 with an open
    # window is the kernel retrying sends that failed locally (a link gone
    # down): its probes never reached the peer and say nothing about it.
    shut = v.snd_wnd == 0 or (v.snd_wnd is None and v.timer == TIMER_ZERO_WINDOW)
    if v.probes >= DEAD_PROBES and (v.timer == TIMER_KEEPALIVE
                                    or (v.timer == TIMER_ZERO_WINDOW and shut)):
        what = "keep-alive" if v.timer == TIMER_KEEPALIVE else "zero-window"
        return Health(DEAD, "%d %s probes unanswered; nothing from the peer for %s"
                      % (v.probes, what, _dur(heard)), "dead-probes")
    if shut and (v.timer == TIMER_ZERO_WINDOW or (v.send_q and not v.unacked)):
        return Health(ZERO_WINDOW, "the peer advertises a zero window; %d bytes wait to be sent"
                      % v.send_q, "zero-window")
    if idle_ms is not None and idle_ms < window_ms:
        return Health(ACTIVE, "data received %s ago" % _dur(idle_ms), "active")
    if heard is not None and heard < window_ms:
        return Health(QUIET, "no data for %s; the peer answered %s ago"
                      % (_dur(idle_ms) if idle_ms is not None else "an unknown time", _dur(heard)),
                      "quiet")
    return Health(UNKNOWN, _missing(sock, idle_ms, heard, window_ms), "no-evidence")


def _missing(sock: Socket, idle_ms, heard, window_ms) -> str:
    """What would have decided: the evidence that is absent."""
    v = sock.vitals
    parts = []
    if idle_ms is None:
        parts.append("no receive time known")
    if heard is None:
        parts.append("no time of the peer's last segment")
    else:
        parts.append("nothing from the peer for %s (window %s)" % (_dur(heard), _dur(window_ms)))
    if v.unacked:
        if v.timer == TIMER_RETRANSMIT and v.retransmits:
            parts.append("%d segments unacknowledged, %d retransmission timeouts (dead at %d)"
                         % (v.unacked, v.retransmits, DEAD_RETRANSMITS))
        else:
            parts.append("%d segments unacknowledged" % v.unacked)
    else:
        parts.append("no data outstanding to be acknowledged")
    if v.timer == TIMER_ZERO_WINDOW:
        parts.append("%d bytes wait: sends are failing locally (persist timer, window open)"
                     % v.send_q)
    if v.timer == TIMER_KEEPALIVE:
        if v.probes:
            parts.append("%d keep-alive probe out (dead at %d)" % (v.probes, DEAD_PROBES))
        else:
            parts.append("keep-alive armed, next probe in %s" % _dur(v.timer_expires_ms))
    elif v.timer != TIMER_RETRANSMIT:
        parts.append("no keep-alive armed")
    return "; ".join(parts)


def duration(ms: Optional[float]) -> str:
    """Milliseconds as the reasons say them: "850 ms", "12.3 s", "5 min", "2.5 h"; "?" if unknown."""
    if ms is None:
        return "?"
    if ms < 1000:
        return "%d ms" % ms
    if ms < 120_000:
        return "%.1f s" % (ms / 1000.0)
    if ms < 7_200_000:
        return "%.0f min" % (ms / 60_000.0)
    return "%.1f h" % (ms / 3_600_000.0)


_dur = duration


def parse_verdicts(text: str, option: str = "--verdict") -> frozenset:
    """"dead,zero-window" -> frozenset({"dead", "zero-window"}); UsageError on a bad name."""
    from .errors import UsageError

    names = [n.strip() for n in text.split(",")]
    if not any(names):
        raise UsageError("%s: give one or more of %s" % (option, ", ".join(VERDICTS)))
    if not all(names):
        raise UsageError("%s %r: an empty name in the list" % (option, text))
    bad = [n for n in names if n not in VERDICTS]
    if bad:
        raise UsageError("%s: unknown verdict %r (one of %s)" % (option, bad[0], ", ".join(VERDICTS)))
    return frozenset(names)
