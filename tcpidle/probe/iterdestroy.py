"""The in-kernel destroy backend: one BPF TCP iterator pass per namespace.

Owns the question "can this kernel decide and destroy inside the socket's
lock, and what did such a pass do?".  bpf/iterdestroy.bpf.c is an `iter/tcp`
program that applies the selection, the idle decision, the protected list and
the kill cap to each TCP socket and calls the kfunc bpf_sock_destroy()
(Linux >= 6.5) on each victim, writing one record per socket acted on to the
iterator's seq output.

The program is compiled once per boot and loaded with maps of tcpidle's own
(iterprog.py: the cache, BPF_PROG_LOAD as an iterator, the kfunc call); this
module writes a run's selection and policy into those maps (`config_of`,
`IterDestroy`), runs passes and decodes them.  The iterator walks the
namespace of the process that creates the iterator fd
(bpf_iter_init_seq_net), so that fd is made inside the namespace
(tcpidle.netns, the only setns) and read from ours.

A kill cap picks the idlest N, as the netlink path does, in two passes: the
first decides without destroying (every victim and its idle time comes
back), user space keeps the N idlest, and the second pass is given exactly
those cookies: each is decided again under its lock and destroyed, or
reported spared if it received data in between.

Idle time is idle.py's merge rule, decided in the kernel.  What the socket
holds: `icsk_ack.lrcvtime` (jiffies of the last data segment received; what
tcp_info's tcpi_last_data_recv is made from) and, with --idle-metric any,
`tcp_sock.rcv_tstamp` (last ACK received; tcpi_last_ack_recv).  Precision:
one jiffy (1000/HZ ms; 4 ms at HZ=250), as tcp_info, since they are the same
fields.  Given the probe's per-socket storage (`storage_fd`: the tracker's
pinned map), the program reads each socket's record with
bpf_sk_storage_get() (no create) and decides on its bpf_ktime_get_ns()
stamp: nanoseconds, unless the record is older than the socket's own stamp
by more than idle.JIFFY_SLACK_MS (the probe missed traffic); a socket
without a record is decided on its jiffies.  Each record says which
(`idle_source`: "bpf" or "tcp_info"), as a netlink pass's verdicts do.
"""

from __future__ import annotations

import math
import os
import platform
import struct
import time
import socket
from ipaddress import IPv4Network, IPv6Network
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from ..model import AF_INET, AF_INET6, Policy, PortSet, Selector
from . import ProbeUnavailable, iterprog

# --- the record the BPF program writes (struct rec in bpf/iterdestroy.bpf.c)
REC = struct.Struct("<QBBBBiHHI16s16sI4xQQQ")
# struct rec's idle_known bits
IDLE_JIFFIES, IDLE_BPF, IDLE_RX = 1, 2, 4
OUTCOMES = {0: "destroyed", 1: "failed", 2: "dry-run", 3: "capped", 4: "not-full-socket",
            5: "spared", 6: "left-selection"}
# the kfunc call patch lives with the loader; named here for the pure tests
KFUNC_SENTINEL, BPF_PSEUDO_KFUNC_CALL, patch_kfunc = (iterprog.KFUNC_SENTINEL,
                                                      iterprog.BPF_PSEUDO_KFUNC_CALL,
                                                      iterprog.patch_kfunc)


class Record(NamedTuple):
    """One socket the pass acted on."""

    cookie: int
    family: int
    state: int
    outcome: str
    err: int  # -errno from bpf_sock_destroy, 0 on success
    src: str
    sport: int
    dst: str
    dport: int
    idle_jiffies: Optional[int]  # what the socket's own stamps say (tcp_info's figure)
    uid: int
    inode: int  # 0: no file holds it
    # the addresses as inet_diag_sockid carries them (IPv4: 4 bytes, then zeros)
    src_raw: bytes = b""
    dst_raw: bytes = b""
    # the idle decided on, ns: the probe's (idle_source "bpf") or the jiffies'
    idle_ns: Optional[int] = None
    idle_source: Optional[str] = None  # "bpf", "tcp_info", None: unknown
    last_rx_ns: Optional[int] = None  # since the probe's last segment (with its record)


def decode_records(data: bytes) -> List[Record]:
    """The iterator's output as records; a torn tail is an error, not dropped.

    Addresses are made text once each (a kill's victims share a few), by
    inet_ntop: ipaddress costs ~10 us an address, a tenth of a kill's time."""
    if len(data) % REC.size:
        raise ValueError("iterator output of %d bytes is not a whole number of %d-byte "
                         "records" % (len(data), REC.size))
    out = []
    texts: Dict[Tuple[int, bytes], Tuple[str, bytes]] = {}
    ntop = socket.inet_ntop
    append = out.append
    new = Record.__new__
    for fields in REC.iter_unpack(data):
        (cookie, fam, state, outcome, known, err, sport, dport, idle, src, dst, uid, ino,
         idle_ns, rx_ns) = fields
        addrs = []
        for raw in (src, dst):
            found = texts.get((fam, raw))
            if found is None:
                if fam == AF_INET:
                    found = (ntop(AF_INET, raw[12:16]), raw[12:16] + bytes(12))
                else:
                    found = (ntop(AF_INET6, raw), raw)
                texts[(fam, raw)] = found
            addrs.append(found)
        append(new(Record, cookie, fam, state, OUTCOMES.get(outcome) or "unknown(%d)" % outcome,
                   err, addrs[0][0], sport, addrs[1][0], dport,
                   idle if known & IDLE_JIFFIES else None, uid, ino, addrs[0][1], addrs[1][1],
                   idle_ns if known & (IDLE_JIFFIES | IDLE_BPF) else None,
                   "bpf" if known & IDLE_BPF else "tcp_info" if known & IDLE_JIFFIES else None,
                   rx_ns if known & IDLE_RX else None))
    return out


# --- configuration before load (pure)

def ms_to_jiffies(ms: float, hz: int) -> int:
    """The smallest jiffies count whose tcp_info age (jiffies * 1000 / HZ) is >= ms."""
    return int(math.ceil(ms * hz / 1000.0 - 1e-9)) if ms > 0 else 0


def port_bitmap(ports: PortSet) -> Dict[int, int]:
    """64-bit words (index -> bits) of a 65536-bit set: bit p%64 of word p//64."""
    words: Dict[int, int] = {}
    for lo, hi in ports.ranges:
        for p in range(lo, hi + 1):
            words[p >> 6] = words.get(p >> 6, 0) | (1 << (p & 63))
    return words


def lpm_entries(nets: Sequence) -> List[Tuple[int, bytes]]:
    """(prefix length, 16-byte address) keys; IPv4 as ::ffff:a.b.c.d, as the program reads it."""
    out = []
    for net in nets:
        if isinstance(net, IPv4Network):
            out.append((96 + net.prefixlen, b"\0" * 10 + b"\xff\xff" + net.network_address.packed))
        elif isinstance(net, IPv6Network):
            out.append((net.prefixlen, net.network_address.packed))
        else:
            raise TypeError("not a network: %r" % (net,))
    return out


OFFSET_FIELDS = {
    "OFF_FAMILY": ("sock_common", "skc_family"),
    "OFF_STATE": ("sock_common", "skc_state"),
    "OFF_NUM": ("sock_common", "skc_num"),
    "OFF_DPORT": ("sock_common", "skc_dport"),
    "OFF_DADDR": ("sock_common", "skc_daddr"),
    "OFF_RCV_SADDR": ("sock_common", "skc_rcv_saddr"),
    "OFF_V6_DADDR": ("sock_common", "skc_v6_daddr"),
    "OFF_V6_RCV_SADDR": ("sock_common", "skc_v6_rcv_saddr"),
    "OFF_LRCVTIME": ("inet_connection_sock", "icsk_ack.lrcvtime"),
    "OFF_RCV_TSTAMP": ("tcp_sock", "rcv_tstamp"),
    "OFF_SK_SOCKET": ("sock", "sk_socket"),
}
# Not a plain member: from a struct socket to its inode's i_ino (both live in
# one struct socket_alloc; SOCK_INODE() in the kernel).
SOCKET_INO = "OFF_SOCKET_INO"


CFG = {"sports": 1 << 0, "dports": 1 << 1, "excl_ports": 1 << 2, "src": 1 << 3,
       "dst": 1 << 4, "excl_nets": 1 << 5, "owners": 1 << 6, "uids": 1 << 7,
       "cookies": 1 << 8, "idle_any": 1 << 9, "dry_run": 1 << 10}
# struct config in bpf/iterdestroy.bpf.c
CONFIG = struct.Struct("<IIIIIIQQQ")


class Config(NamedTuple):
    family_mask: int
    state_mask: int
    flags: int
    thresh_j: int
    limit_j: int
    max_kills: int
    thresh_ns: int = 0
    jiffy_ns: int = 0

    def pack(self) -> bytes:
        return CONFIG.pack(self.family_mask, self.state_mask, self.flags, self.thresh_j,
                           self.limit_j, 0, self.max_kills, self.thresh_ns, self.jiffy_ns)


def config_of(selector: Selector, policy: Policy, hz: int, state_mask: int,
              owners: bool = False, cookies: bool = False, dry_run: Optional[bool] = None,
              max_kills: Optional[int] = None) -> Config:
    """What the program's config map says for a selection and policy (pure).

    `state_mask` is selectors.states_mask(selector.states) (the selection's
    own rule, SYN_RECV asking for request sockets too; the probe package sits
    below selectors).  `owners`: an owner selector was resolved into socket
    inodes; `cookies`: only the chosen cookies are looked at.  `dry_run` and
    `max_kills` override the policy's (the cap's first pass).
    """
    fam = (1 if AF_INET in selector.families else 0) | (2 if AF_INET6 in selector.families else 0)
    limit = policy.last_recv_limit_ms
    given = {
        "sports": selector.sports is not None,
        "dports": selector.dports is not None,
        "excl_ports": selector.exclude_ports is not None,
        "src": bool(selector.src),
        "dst": bool(selector.dst),
        "excl_nets": bool(selector.exclude_nets),
        "owners": owners,
        "uids": bool(selector.uids),
        "cookies": cookies,
        "idle_any": policy.idle_metric == "any",
        "dry_run": policy.dry_run if dry_run is None else dry_run,
    }
    return Config(
        family_mask=fam, state_mask=state_mask,
        flags=sum(CFG[k] for k, on in given.items() if on),
        thresh_j=ms_to_jiffies(policy.idle_time_ms, hz),
        # "above the limit": floor, so limit_ms itself stays known
        limit_j=int(limit * hz // 1000) if limit is not None else 0,
        max_kills=(policy.max_kills or 0) if max_kills is None else max_kills,
        thresh_ns=int(round(policy.idle_time_ms * 1e6)) if policy.idle_time_ms > 0 else 0,
        jiffy_ns=1_000_000_000 // hz)


def idlest(records: Sequence["Record"], n: int) -> List["Record"]:
    """The n victims idle longest (unknown idle last, as the netlink path orders)."""
    return sorted(records, key=lambda r: -(r.idle_ns or 0))[:n]


# --- facts about this kernel

HZ_CHOICES = (100, 250, 300, 1000)  # the values Kconfig offers (kernel/Kconfig.hz)
TIMER_LIST = "/proc/timer_list"


def kernel_hz(release: Optional[str] = None, timer_list: str = TIMER_LIST) -> int:
    """CONFIG_HZ of the running kernel: from its config, else measured.

    Jiffies have no interface of their own.  The config is at /proc/config.gz
    (CONFIG_IKCONFIG_PROC) or /boot/config-RELEASE (distributions); a system
    with neither (a container's root, the kernel lab's VMs) gets HZ measured
    from /proc/timer_list (root only), which prints CLOCK_MONOTONIC ("now at")
    and the jiffies counter in one read: two reads 0.2 s apart give the tick
    rate, rounded to the value Kconfig offers (they are 20 % or more apart, the
    measure within 2 %).  Found once per boot (iterprog.kernel_facts)."""
    import gzip  # the first run of a boot alone (iterprog.kernel_facts keeps the answer)

    release = release or platform.release()
    for path in ("/proc/config.gz", "/boot/config-%s" % release):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                for line in f:
                    if line.startswith("CONFIG_HZ="):
                        return int(line.split("=", 1)[1])
        except (OSError, ValueError):
            continue
    try:
        return hz_from_timer_list(timer_list)
    except (OSError, ValueError) as e:
        raise ProbeUnavailable("the BPF destroy needs the kernel's HZ: no CONFIG_HZ in "
                               "/proc/config.gz or /boot/config-%s, and %s: %s"
                               % (release, timer_list, getattr(e, "strerror", None) or e)) \
            from None


def hz_from_timer_list(path: str = TIMER_LIST) -> int:
    """HZ measured: two samples of (CLOCK_MONOTONIC ns, jiffies) 0.2 s apart."""
    first = _timer_list_sample(path)
    time.sleep(0.2)
    return hz_of_samples(first, _timer_list_sample(path))


def _timer_list_sample(path: str) -> Tuple[int, int]:
    import re
    with open(path) as f:
        text = f.read()
    now = re.search(r"^now at (\d+) nsecs", text, re.M)
    jiffies = re.search(r"^jiffies: (\d+)", text, re.M)
    if not now or not jiffies:
        raise ValueError("no 'now at' or 'jiffies:' line")
    return int(now.group(1)), int(jiffies.group(1))


def hz_of_samples(first: Tuple[int, int], second: Tuple[int, int]) -> int:
    """The Kconfig HZ that (ns, jiffies) samples tick at; ValueError if none is near (pure)."""
    (n1, j1), (n2, j2) = first, second
    if n2 <= n1:
        raise ValueError("the samples are not in time order")
    rate = (j2 - j1) * 1e9 / (n2 - n1)
    best = min(HZ_CHOICES, key=lambda hz: abs(hz - rate))
    if abs(best - rate) > best * 0.08:
        raise ValueError("jiffies advanced at %.1f Hz, not a known HZ" % rate)
    return best


def kernel_ids() -> Tuple[int, int]:
    """BTF ids of bpf_iter_tcp and bpf_sock_destroy; ProbeUnavailable when absent."""
    from .iterprog import kernel_facts
    facts = kernel_facts()
    return facts.iter_id, facts.kfunc_id


# --- the backend

class PassResult(NamedTuple):
    records: List[Record]
    matched: int  # sockets the selection matched (victims or not)
    elapsed_ms: float
    # destroys that failed but whose error the program could not keep (its
    # errors map full): their records say "destroyed"; said as a failure
    untold_failures: int = 0


def with_errors(records: List[Record], errors: Dict[int, int]) -> List[Record]:
    """The records with each failed destroy's outcome: the program writes a record
    before its destroy (see bpf/iterdestroy.bpf.c) and keeps failures aside."""
    if not errors:
        return records
    return [r._replace(outcome="failed", err=errors[r.cookie])
            if r.outcome == "destroyed" and r.cookie in errors else r for r in records]


class IterDestroy:
    """The destroy program loaded for one selection and policy (no compile: iterprog).

    `state_mask`: selectors.states_mask(selector.states).  `owner_inodes`:
    the socket inodes the owner selectors matched (None: no owner selector).
    `cookie_room`: how many chosen cookies a pass may be given (`choose`).
    `storage_fd`: the probe's per-socket storage map (the tracker's pin; the
    caller keeps it open and checked its layout): idle from its records where
    a socket has one.  `run(netns_fd)` is one pass in that namespace (None:
    ours); `kill(netns_fd)` is the pass with the kill cap's order (the idlest N).
    """

    def __init__(self, selector: Selector, policy: Policy, state_mask: int,
                 owner_inodes: Optional[Iterable[int]] = None, cookie_room: int = 0,
                 storage_fd: Optional[int] = None):
        facts = iterprog.kernel_facts()
        self.hz = facts.hz
        self.selector, self.policy, self.state_mask = selector, policy, state_mask
        owners = None if owner_inodes is None else sorted(set(owner_inodes))
        self.has_owners = owners is not None
        self.with_storage = storage_fd is not None
        room = max(cookie_room, policy.max_kills or 0)
        self._prog = iterprog.Loaded(
            facts, iterprog.compiled(facts, storage=self.with_storage),
            {"owners": len(owners or ()), "uids": len(selector.uids), "cookies": room},
            given={} if storage_fd is None else {iterprog.STORAGE_MAP: storage_fd})
        self.room = max(1, room)
        self.code = self._prog.code
        try:
            self._fill(selector, owners)
            self.configure()
        except BaseException:
            self._prog.close()
            raise

    def _update(self, name: str, key: bytes, value: bytes) -> None:
        iterprog.map_update(self._prog.fds[name], key, value)

    def _fill(self, selector: Selector, owners: Optional[List[int]]) -> None:
        for name, ports in (("sports", selector.sports), ("dports", selector.dports),
                            ("excl_ports", selector.exclude_ports)):
            if ports is not None:
                for word, bits in port_bitmap(ports).items():
                    self._update(name, struct.pack("<I", word), struct.pack("<Q", bits))
        for name, nets in (("src_nets", selector.src), ("dst_nets", selector.dst),
                           ("excl_nets", selector.exclude_nets)):
            for plen, addr in lpm_entries(nets):
                self._update(name, struct.pack("<I", plen) + addr, b"\1")
        for inode in owners or ():
            self._update("owners", struct.pack("<Q", inode), b"\1")
        for uid in selector.uids:
            self._update("uids", struct.pack("<I", uid), b"\1")

    def configure(self, cookies: bool = False, dry_run: Optional[bool] = None,
                  max_kills: Optional[int] = None) -> Config:
        """Write the config the next passes run with (the policy's, unless overridden)."""
        cfg = config_of(self.selector, self.policy, self.hz, self.state_mask, self.has_owners,
                        cookies, dry_run, max_kills)
        self._update("config", struct.pack("<I", 0), cfg.pack())
        return cfg

    def choose(self, cookies: Iterable[int]) -> None:
        """Only these sockets from now on (at most `cookie_room`), each decided again."""
        fd = self._prog.fds["cookies"]
        for key in iterprog.map_keys(fd, 8):
            iterprog.map_delete(fd, key)
        wanted = sorted(set(cookies))
        if len(wanted) > self.room:
            raise ValueError("%d cookies for a map of %d" % (len(wanted), self.room))
        for c in wanted:
            iterprog.map_update(fd, struct.pack("<Q", c), b"\1")
        self.configure(cookies=True)

    def run(self, netns_fd: Optional[int] = None) -> PassResult:
        """One pass: every TCP socket of the namespace, decided and acted on under its lock."""
        from .. import netns
        fds = self._prog.fds
        for i in range(3):
            iterprog.map_update(fds["counts"], struct.pack("<I", i), bytes(8))
        for key in iterprog.map_keys(fds["errors"], 8):
            iterprog.map_delete(fds["errors"], key)
        start = time.monotonic()
        if netns_fd is None:
            fd = iterprog.iter_fd(self._prog.prog)
        else:
            with netns.entered_fd(netns_fd):
                fd = iterprog.iter_fd(self._prog.prog)
        chunks = []
        try:
            while True:
                data = os.read(fd, 1 << 16)
                if not data:
                    break
                chunks.append(data)
        finally:
            os.close(fd)
        failed = {}
        for key in iterprog.map_keys(fds["errors"], 8):
            value = iterprog.map_lookup(fds["errors"], key, 4)
            if value is not None:
                failed[struct.unpack("<Q", key)[0]] = struct.unpack("<i", value)[0]
        records = with_errors(decode_records(b"".join(chunks)), failed)
        counts = [struct.unpack("<Q", iterprog.map_lookup(fds["counts"], struct.pack("<I", i), 8)
                                or bytes(8))[0] for i in range(3)]
        return PassResult(records, counts[1], (time.monotonic() - start) * 1000, counts[2])

    def kill(self, netns_fd: Optional[int] = None) -> PassResult:
        """The pass under the policy's kill cap, which keeps the idlest N (two passes).

        Without a cap, or in a dry run, this is one pass (a dry run's cap
        orders the records it returns).  With one, the first pass decides
        without destroying, the N idlest victims are chosen, and the second
        pass is given only those: each decided again, under its lock, and
        destroyed, or reported "spared" if it received data in between.  The
        rest come back "capped"."""
        cap = self.policy.max_kills
        if not cap:
            return self.run(netns_fd)
        self.configure(dry_run=True, max_kills=0)
        first = self.run(netns_fd)
        # victims: those it would destroy, and the not-full sockets it would
        # hand to SOCK_DESTROY (unknown idle: last, as on the netlink path)
        victims = [r for r in first.records if r.outcome in ("dry-run", "not-full-socket")]
        keep = idlest(victims, cap)
        kept = {r.cookie for r in keep}
        capped = [r._replace(outcome="capped") for r in victims if r.cookie not in kept]
        if self.policy.dry_run:
            self.configure()
            return first._replace(records=keep + capped)
        try:
            self.choose(kept)
            second = self.run(netns_fd) if kept else PassResult([], 0, 0.0)
        finally:
            self.configure()
        return PassResult(second.records + capped, first.matched,
                          first.elapsed_ms + second.elapsed_ms, second.untold_failures)

    def close(self) -> None:
        if self._prog is not None:
            self._prog.close()
            self._prog = None

    def __enter__(self) -> "IterDestroy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
