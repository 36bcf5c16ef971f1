"""Which sockets a run concerns: parsing selectors, matching them, compiling them.

Owns three views of one `model.Selector`:
  * parsing the user's text (ports, ranges, CIDRs, state names) with one-line
    errors (`errors.UsageError`) that name the offending value;
  * the pure Python predicates, the reference semantics: `matches()` of a
    socket as INET_DIAG reports it, `owned_by()` of the processes holding it
    (--pid, --comm, --cgroup, which need the /proc walk), `narrows()` (does
    the selector name what to kill?);
  * `compile_bytecode()`, the same port filter as INET_DIAG_REQ_BYTECODE so the
    kernel drops non-matching sockets before they cross netlink.  States and
    families are not bytecode: they travel in the request itself
    (`idiag_states`, one dump per family).

The kernel's filter is an optimisation; `matches()` is always applied to what
the dump returns as well, so a wrong program could only make us see fewer
sockets, never kill a socket the user did not select.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Iterable, List, Optional, Sequence, Tuple

from .errors import UsageError
from .model import AF_INET, AF_INET6, Network, OwnerSummary, PortSet, Selector, Socket, TcpState

# ---------------------------------------------------------------------------
# ports


def parse_ports(values: Iterable[str], option: str = "--port") -> Optional[PortSet]:
    """Parse repeatable comma lists and ranges into one merged `PortSet`.

    >>> parse_ports(["22,8000-8100", "23"]).ranges
    ((22, 23), (8000, 8100))

    Returns None when `values` is empty (no port selector given).
    """
    ranges: List[Tuple[int, int]] = []
    for value in values:
        for item in str(value).split(","):
            ranges.append(_parse_port_item(item.strip(), value, option))
    if not ranges:
        return None
    return PortSet(_merge(ranges))


def _parse_port_item(item: str, whole: str, option: str) -> Tuple[int, int]:
    if not item:
        raise UsageError("%s %r: empty item in port list" % (option, whole))
    if "-" in item:
        lo_text, _, hi_text = item.partition("-")
        lo = _parse_port(lo_text, whole, option)
        hi = _parse_port(hi_text, whole, option)
        if lo > hi:
            raise UsageError("%s %r: range %s is backwards (%d > %d)" % (option, whole, item, lo, hi))
        return lo, hi
    port = _parse_port(item, whole, option)
    return port, port


def _parse_port(text: str, whole: str, option: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()):  # "²".isdigit(), and int("٨٠") == 80
        raise UsageError("%s %r: %r is not a port number" % (option, whole, text))
    port = int(text)
    if not 1 <= port <= 65535:
        raise UsageError("%s %r: port %d is out of range 1-65535" % (option, whole, port))
    return port


def _merge(ranges: Sequence[Tuple[int, int]]) -> Tuple[Tuple[int, int], ...]:
    """Sort and merge overlapping or adjacent inclusive ranges."""
    merged: List[Tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return tuple(merged)


# ---------------------------------------------------------------------------
# addresses


def parse_networks(values: Iterable[str], option: str) -> Tuple[Network, ...]:
    """Parse CIDRs (or bare addresses, taken as /32 or /128).

    Refused, because they cannot mean one thing: host bits ("10.1.2.3/8":
    the host or the network 10.0.0.0/8? ss takes the network; a tool that
    destroys connections does not guess, and the error gives both
    spellings), and IPv6 scope ids ("fe80::1%eth0": INET_DIAG reports
    addresses without a scope, so it would match on every interface).
    """
    nets = []
    for value in values:
        for item in str(value).split(","):
            item = item.strip()
            if "%" in item:
                raise UsageError("%s %r: an IPv6 scope id cannot be matched (INET_DIAG reports "
                                 "addresses without one)" % (option, item))
            try:
                net = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise UsageError("%s %r: not an IPv4/IPv6 address or CIDR" % (option, item)) from None
            host = item.partition("/")[0]
            if ipaddress.ip_address(host) != net.network_address:
                raise UsageError("%s %r: host bits set: write %s for the network, or %s for the "
                                 "host" % (option, item, net, host))
            nets.append(net)
    return tuple(nets)


def _address_in(address: str, nets: Sequence[Network]) -> bool:
    addr = ipaddress.ip_address(address)
    # A v4-mapped IPv6 address (::ffff:10.0.0.1, a dual-stack socket talking
    # IPv4) also matches IPv4 networks.
    mapped = getattr(addr, "ipv4_mapped", None)
    for net in nets:
        if addr.version == net.version and addr in net:
            return True
        if mapped is not None and net.version == 4 and mapped in net:
            return True
    return False


# ---------------------------------------------------------------------------
# states

_STATE_NAMES = {
    "established": {TcpState.ESTABLISHED},
    "syn-sent": {TcpState.SYN_SENT},
    "syn-recv": {TcpState.SYN_RECV},
    "fin-wait-1": {TcpState.FIN_WAIT1},
    "fin-wait-2": {TcpState.FIN_WAIT2},
    "time-wait": {TcpState.TIME_WAIT},
    "closed": {TcpState.CLOSE},
    "close-wait": {TcpState.CLOSE_WAIT},
    "last-ack": {TcpState.LAST_ACK},
    "listening": {TcpState.LISTEN},
    "closing": {TcpState.CLOSING},
}
# ss's groups (misc/ss.c): connected = all but listening and closed;
# synchronized = connected but syn-sent.
_ALL = set().union(*_STATE_NAMES.values())
_STATE_GROUPS = {
    "all": _ALL,
    "connected": _ALL - {TcpState.LISTEN, TcpState.CLOSE},
    "synchronized": _ALL - {TcpState.LISTEN, TcpState.CLOSE, TcpState.SYN_SENT},
}
STATE_CHOICES = sorted(_STATE_NAMES) + sorted(_STATE_GROUPS)


def parse_states(names: Iterable[str]) -> frozenset:
    """ss state names and groups -> set of `TcpState`; empty input -> {ESTABLISHED}."""
    states = set()
    for value in names:
        for name in str(value).split(","):
            key = name.strip().lower()
            found = _STATE_NAMES.get(key) or _STATE_GROUPS.get(key)
            if not found:
                raise UsageError(
                    "--state %r: unknown state (known: %s)" % (name, ", ".join(STATE_CHOICES))
                )
            states |= found
    return frozenset(states or {TcpState.ESTABLISHED})


def state_names(states: Iterable[int]) -> List[str]:
    """ss's names of these states, in the kernel's order: {ESTABLISHED, CLOSE_WAIT} ->
    ["established", "close-wait"] (request sockets, NEW_SYN_RECV, are syn-recv)."""
    names = {}
    for name, found in _STATE_NAMES.items():
        for state in found:
            names[state] = name
    names.setdefault(TcpState.NEW_SYN_RECV, "syn-recv")
    out = []
    for state in sorted(states):
        name = names.get(state, str(int(state)))
        if name not in out:
            out.append(name)
    return out


def states_mask(states: Iterable[int]) -> int:
    """The `idiag_states` bit mask for a set of states.

    Pending connections live in the kernel's hash as TCP_NEW_SYN_RECV request
    sockets but are reported as SYN_RECV, so asking for SYN_RECV asks for both.
    """
    mask = 0
    for state in states:
        mask |= 1 << int(state)
        if state == TcpState.SYN_RECV:
            mask |= 1 << int(TcpState.NEW_SYN_RECV)
    return mask


# ---------------------------------------------------------------------------
# the Python predicate


def matches(selector: Selector, sock: Socket) -> bool:
    """True when `sock` is selected by everything INET_DIAG tells of it.

    uids are matched here against the socket's own uid from INET_DIAG; the
    other owner selectors need the processes holding the socket:
    `owned_by()`, for sockets `needs_owners()` says must be looked up.
    """
    if sock.family not in selector.families:
        return False
    if sock.state not in selector.states:
        return False
    if selector.sports is not None and sock.sport not in selector.sports:
        return False
    if selector.dports is not None and sock.dport not in selector.dports:
        return False
    if selector.src and not _address_in(sock.src, selector.src):
        return False
    if selector.dst and not _address_in(sock.dst, selector.dst):
        return False
    if selector.uids and sock.uid not in selector.uids:
        return False
    return not is_protected(selector, sock)


def needs_owners(selector: Selector) -> bool:
    """Do the owner selectors (--pid, --comm, --cgroup) need the /proc walk?"""
    return bool(selector.pids or selector.comms or selector.cgroups)


def owned_by(selector: Selector, owners: OwnerSummary) -> bool:
    """True when the processes holding a socket satisfy --pid, --comm and --cgroup.

    Each given selector needs one holder that matches it (any pid, any
    name, any cgroup path starting with a given prefix); a socket nobody
    holds matches none.
    """
    if selector.pids and not any(pid in selector.pids for pid in owners.pids):
        return False
    if selector.comms and not any(comm in selector.comms for comm in owners.comms):
        return False
    if selector.cgroups and not any(
        path.startswith(prefix) for path in owners.cgroups for prefix in selector.cgroups
    ):
        return False
    return True


def narrows(selector: Selector) -> bool:
    """Does the selector name what to kill (ports, addresses or owners)?

    kill and track refuse to run without one unless --all is given.
    """
    return selector.narrows_by_address or bool(selector.pids or selector.comms or selector.cgroups
                                               or selector.uids)


def is_protected(selector: Selector, sock: Socket) -> bool:
    """True when the protected list (--exclude-port/--exclude-cidr) covers `sock`.

    Either end counts: a protected port or network on the local or the remote
    side protects the connection.
    """
    ports = selector.exclude_ports
    if ports is not None and (sock.sport in ports or sock.dport in ports):
        return True
    nets = selector.exclude_nets
    return bool(nets) and (_address_in(sock.src, nets) or _address_in(sock.dst, nets))


# ---------------------------------------------------------------------------
# INET_DIAG bytecode (include/uapi/linux/inet_diag.h)
#
# struct inet_diag_bc_op { u8 code; u8 yes; u16 no; }.  The kernel
# (net/ipv4/inet_diag.c: inet_diag_bc_run) runs the program from the start:
# each op either succeeds (advance by `yes`) or fails (advance by `no`); the
# socket is accepted iff execution lands exactly on the end of the program.
# The verifier (inet_diag_bc_audit) walks the `yes` chain only and requires
# every `yes` and `no` to be a multiple of 4, at least the op size, and at most
# "remaining length + 4" -- so "jump to end + 4" is the canonical reject.
#
# Every fragment below keeps that convention: accepting falls through to its
# end, rejecting jumps to end + 4.  That makes composition local:
#   AND(a, b): a's reject jumps are stretched by len(b).
#   OR(a, b):  a, JMP(over b), b -- a's rejects already land on b's start.
#              (built for n terms at once: see _or)
#   NOT(a):    a, JMP(to end + 4) -- a's rejects land on the new end.
# Port comparisons use GE/LE pairs, not S_EQ/D_EQ, which older kernels lack.

BC_NOP, BC_JMP = 0, 1
BC_S_GE, BC_S_LE, BC_D_GE, BC_D_LE = 2, 3, 4, 5
BC_S_EQ, BC_D_EQ = 11, 12

_OP = struct.Struct("=BBH")
# `no` is a u16 and the netlink attribute length too; stay well inside both.
MAX_BYTECODE = 60000


class BytecodeTooLong(Exception):
    """The port sets need more bytecode than INET_DIAG accepts."""


class _Fragment:
    """A bytecode fragment: a list of [code, yes, no] ops (port values as ops too)."""

    __slots__ = ("ops",)

    def __init__(self, ops):
        self.ops = ops

    @property
    def size(self) -> int:
        return 4 * len(self.ops)

    def rejects(self):
        """Indices of ops whose failure jump leaves the fragment to end + 4."""
        out = []
        i = 0
        while i < len(self.ops):
            code, yes, no = self.ops[i]
            if code != BC_NOP and 4 * i + no == self.size + 4:
                out.append(i)
            i += yes // 4 if yes else 1
        return out


def _compare(code: int, port: int) -> _Fragment:
    # The port travels in the `no` field of a second, pseudo op.
    return _Fragment([[code, 8, 12], [0, 0, port]])


def _and(a: _Fragment, b: _Fragment) -> _Fragment:
    ops = [list(op) for op in a.ops]
    for i in a.rejects():
        ops[i][2] += b.size
    return _Fragment(ops + [list(op) for op in b.ops])


def _or(terms: Sequence[_Fragment]) -> _Fragment:
    """OR of many terms in one linear pass: t1, JMP end, t2, JMP end, ..., tn.

    A term's rejects already land just past the JMP that follows it, i.e. on
    the next term; each JMP sends an accepted socket to the end of the chain.
    """
    total = sum(t.size for t in terms) + 4 * (len(terms) - 1)
    ops: List[list] = []
    for i, term in enumerate(terms):
        ops.extend(list(op) for op in term.ops)
        if i < len(terms) - 1:
            ops.append([BC_JMP, 4, total - 4 * len(ops)])
    return _Fragment(ops)


def _not(a: _Fragment) -> _Fragment:
    return _Fragment([list(op) for op in a.ops] + [[BC_JMP, 4, 8]])


def _port_ranges(ge: int, le: int, ports: PortSet) -> _Fragment:
    if 20 * len(ports.ranges) > MAX_BYTECODE:
        raise BytecodeTooLong("%d port ranges" % len(ports.ranges))
    terms = []
    for lo, hi in ports.ranges:
        if lo == 1 and hi == 65535:
            return _Fragment([[BC_NOP, 4, 0]])  # every port: always true
        if lo == 1:
            terms.append(_compare(le, hi))
        elif hi == 65535:
            terms.append(_compare(ge, lo))
        else:
            terms.append(_and(_compare(ge, lo), _compare(le, hi)))
    return _or(terms)


PortBox = Tuple[int, int, int, int]  # sport lo, sport hi, dport lo, dport hi (inclusive)


def port_box(sockets) -> PortBox:
    """The smallest box of (sport, dport) holding every one of `sockets`."""
    sports = [s.sport for s in sockets]
    dports = [s.dport for s in sockets]
    return min(sports), max(sports), min(dports), max(dports)


def compile_bytecode(selector: Selector, box: Optional[PortBox] = None) -> bytes:
    """Compile the port selectors (and protected ports) of `selector` to INET_DIAG bytecode.

    `box` narrows it further to sports and dports within those bounds (the
    re-check's dump of one batch, see scope.Scope.dump_batch_storages).
    Returns b"" when there is nothing to filter by port.  Raises
    `BytecodeTooLong` when the program would exceed what the kernel accepts;
    the caller then dumps unfiltered and relies on `matches()`.
    """
    parts = []
    if box is not None:
        parts.append(_and(_port_ranges(BC_S_GE, BC_S_LE, PortSet(((box[0], box[1]),))),
                          _port_ranges(BC_D_GE, BC_D_LE, PortSet(((box[2], box[3]),)))))
    if selector.sports is not None:
        parts.append(_port_ranges(BC_S_GE, BC_S_LE, selector.sports))
    if selector.dports is not None:
        parts.append(_port_ranges(BC_D_GE, BC_D_LE, selector.dports))
    if selector.exclude_ports is not None:
        either = _or([
            _port_ranges(BC_S_GE, BC_S_LE, selector.exclude_ports),
            _port_ranges(BC_D_GE, BC_D_LE, selector.exclude_ports),
        ])
        parts.append(_not(either))
    if not parts:
        return b""
    program = parts[0]
    for part in parts[1:]:
        program = _and(program, part)
    if program.size > MAX_BYTECODE:
        raise BytecodeTooLong("%d bytes of bytecode for the port selectors" % program.size)
    return b"".join(_OP.pack(*op) for op in program.ops)


def run_bytecode(program: bytes, sport: int, dport: int) -> bool:
    """Evaluate port-only bytecode as the kernel's inet_diag_bc_run does.

    For tests and for `--explain`-style debugging; not used on the hot path.
    """
    pos, length = 0, len(program)
    while length > 0:
        code, yes, no = _OP.unpack_from(program, pos)
        if code == BC_NOP:
            ok = True
        elif code == BC_JMP:
            ok = False
        elif code in (BC_S_GE, BC_S_LE, BC_D_GE, BC_D_LE, BC_S_EQ, BC_D_EQ):
            port = _OP.unpack_from(program, pos + 4)[2]
            value = sport if code in (BC_S_GE, BC_S_LE, BC_S_EQ) else dport
            if code in (BC_S_GE, BC_D_GE):
                ok = value >= port
            elif code in (BC_S_LE, BC_D_LE):
                ok = value <= port
            else:
                ok = value == port
        else:
            raise ValueError("unsupported bytecode op %d" % code)
        step = yes if ok else no
        pos += step
        length -= step
    return length == 0


def audit_bytecode(program: bytes) -> None:
    """Check `program` the way the kernel's inet_diag_bc_audit does; ValueError if it would refuse."""
    length = len(program)
    offsets = set()
    pos, remaining = 0, length
    while remaining > 0:  # the yes chain, as the kernel walks it
        offsets.add(pos)
        code, yes, no = _OP.unpack_from(program, pos)
        min_len = 8 if code in (BC_S_GE, BC_S_LE, BC_D_GE, BC_D_LE, BC_S_EQ, BC_D_EQ) else 4
        if code not in (BC_NOP, BC_JMP) and min_len == 4:
            raise ValueError("op %d at %d not supported by this auditor" % (code, pos))
        if code != BC_NOP:
            if no < min_len or no > remaining + 4 or no & 3:
                raise ValueError("bad no=%d at %d" % (no, pos))
        if yes < min_len or yes > remaining + 4 or yes & 3:
            raise ValueError("bad yes=%d at %d" % (yes, pos))
        pos += yes
        remaining -= yes
    if remaining != 0:
        raise ValueError("program does not end on an op boundary")
    # Every failure jump that lands inside the program must land on an op.
    pos, remaining = 0, length
    while remaining > 0:
        code, yes, no = _OP.unpack_from(program, pos)
        if code != BC_NOP and no < remaining and (pos + no) not in offsets:
            raise ValueError("jump from %d to %d lands inside an op" % (pos, pos + no))
        pos += yes
        remaining -= yes


def selector_families(selector: Selector) -> List[int]:
    """The address families to dump, IPv4 first."""
    return [f for f in (AF_INET, AF_INET6) if f in selector.families]
