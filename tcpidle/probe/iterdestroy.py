"""The in-kernel destroy backend: one BPF TCP iterator pass per namespace.

Owns the question "can this kernel decide and destroy inside the socket's
lock, and what did such a pass do?".  bpf/iterdestroy.bpf.c is an `iter/tcp`
program that applies the selection, the idle decision, the protected list and
the kill cap to each TCP socket and calls the kfunc bpf_sock_destroy()
(Linux >= 6.5) on each victim, writing one record per socket acted on to the
iterator's seq output; this module compiles it, loads it, runs a pass in a
namespace and decodes the records.

What bcc 0.26 does not do, done here with bpf(2) through ctypes:
  * BPF_PROG_LOAD as BPF_PROG_TYPE_TRACING with expected attach type
    BPF_TRACE_ITER and attach_btf_id = vmlinux BTF id of `bpf_iter_tcp`
    (bcc only compiles, through loader.compile_only, the one bcc import; its
    maps are created by bcc and their fds are already in the bytecode);
  * the kfunc call: bcc cannot emit a call to an extern __ksym, so the C calls
    a sentinel helper number (KFUNC_SOCK_DESTROY) and the instruction is
    rewritten into a BPF_PSEUDO_KFUNC_CALL whose imm is the BTF id of
    `bpf_sock_destroy` (off 0: vmlinux BTF);
  * BPF_LINK_CREATE (attach type BPF_TRACE_ITER) and BPF_ITER_CREATE; the
    iterator walks the namespace of the process that creates the iterator fd
    (bpf_iter_init_seq_net), so both are made inside the namespace
    (tcpidle.netns, the only setns) and read from ours.

Kept in one place until the probe's own ctypes loader (probe-v2) lands; this
module's `_bpf` is meant to be replaced by it.

Idle time here is what the socket holds: `icsk_ack.lrcvtime` (jiffies of the
last data segment received; what tcp_info's tcpi_last_data_recv is made from)
and, with --idle-metric any, `tcp_sock.rcv_tstamp` (last ACK received;
tcpi_last_ack_recv).  Precision: one jiffy (1000/HZ ms; 4 ms at HZ=250), as
tcp_info, since they are the same fields.
"""

from __future__ import annotations

import ctypes
import gzip
import math
import os
import platform
import struct
import time
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from ..model import AF_INET, AF_INET6, Policy, PortSet, Selector
from . import ProbeUnavailable

# --- the record the BPF program writes (struct rec in bpf/iterdestroy.bpf.c)
REC = struct.Struct("<QBBBBiHHI16s16sI4xQ")
OUTCOMES = {0: "destroyed", 1: "failed", 2: "dry-run", 3: "capped", 4: "not-full-socket"}
KFUNC_SENTINEL = 0x7FFFF

# bpf(2) commands, program type, attach type (include/uapi/linux/bpf.h)
BPF_PROG_LOAD, BPF_LINK_CREATE, BPF_ITER_CREATE = 5, 28, 33
BPF_PROG_TYPE_TRACING, BPF_TRACE_ITER = 26, 28
BPF_PSEUDO_KFUNC_CALL = 2
_NR_BPF = {"x86_64": 321, "aarch64": 280}


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
    idle_jiffies: Optional[int]
    uid: int
    inode: int  # 0: no file holds it


def _addr(raw: bytes, family: int) -> str:
    if family == AF_INET:
        return str(ip_address(raw[12:16]))
    return str(ip_address(raw))


def decode_records(data: bytes) -> List[Record]:
    """The iterator's output as records; a torn tail is an error, not dropped."""
    if len(data) % REC.size:
        raise ValueError("iterator output of %d bytes is not a whole number of %d-byte "
                         "records" % (len(data), REC.size))
    out = []
    for fields in REC.iter_unpack(data):
        cookie, fam, state, outcome, known, err, sport, dport, idle, src, dst, uid, ino = fields
        out.append(Record(cookie, fam, state, OUTCOMES.get(outcome, "unknown(%d)" % outcome),
                          err, _addr(src, fam), sport, _addr(dst, fam), dport,
                          idle if known else None, uid, ino))
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


def cflags(selector: Selector, policy: Policy, hz: int, offsets: Dict[str, int],
           state_mask: int, owners: Optional[int] = None) -> List[str]:
    """The -D flags that fix a pass's selection and policy before load.

    `state_mask` is selectors.states_mask(selector.states) (the selection's
    own rule, SYN_RECV asking for request sockets too; the probe package sits
    below selectors).  `owners` is the number of owner socket inodes (None:
    no owner selector).
    """
    fam = (1 if AF_INET in selector.families else 0) | (2 if AF_INET6 in selector.families else 0)
    limit = policy.last_recv_limit_ms
    flags = {
        "FAMILY_MASK": fam,
        "STATE_MASK": state_mask,
        "HAS_SPORTS": int(selector.sports is not None),
        "HAS_DPORTS": int(selector.dports is not None),
        "HAS_EXCL_PORTS": int(selector.exclude_ports is not None),
        "HAS_SRC": int(bool(selector.src)),
        "HAS_DST": int(bool(selector.dst)),
        "HAS_EXCL_NETS": int(bool(selector.exclude_nets)),
        "HAS_OWNERS": int(owners is not None),
        "OWNERS_SIZE": max(1, owners or 0),
        "HAS_UIDS": int(bool(selector.uids)),
        "UIDS_SIZE": max(1, len(selector.uids)),
        "THRESH_J": ms_to_jiffies(policy.idle_time_ms, hz),
        # "above the limit": floor, so limit_ms itself stays known
        "LIMIT_J": int(limit * hz // 1000) if limit is not None else 0,
        "IDLE_ANY": int(policy.idle_metric == "any"),
        "MAX_KILLS": policy.max_kills or 0,
        "DRY_RUN": int(policy.dry_run),
    }
    flags.update({k: offsets[k] for k in list(OFFSET_FIELDS) + [SOCKET_INO]})
    return ["-D%s=%d" % kv for kv in sorted(flags.items())]


# --- facts about this kernel

def kernel_hz(release: Optional[str] = None) -> int:
    """CONFIG_HZ of the running kernel, from its config (jiffies have no other interface)."""
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
    raise ProbeUnavailable("the BPF destroy needs the kernel's HZ: no CONFIG_HZ in "
                           "/proc/config.gz or /boot/config-%s" % release)


def kernel_ids() -> Tuple[int, int]:
    """BTF ids of bpf_iter_tcp and bpf_sock_destroy; ProbeUnavailable when absent."""
    from .btf import FUNC, BTF, BTFError
    try:
        btf = BTF.load()
        iter_id = btf.find("bpf_iter_tcp", FUNC)
    except BTFError as e:
        raise ProbeUnavailable("no BPF TCP iterator: %s" % e) from None
    try:
        kfunc = btf.find("bpf_sock_destroy", FUNC)
    except BTFError:
        raise ProbeUnavailable("this kernel has no bpf_sock_destroy() kfunc (Linux >= 6.5)") \
            from None
    return iter_id, kfunc


def btf_offsets() -> Dict[str, int]:
    from .btf import BTF, BTFError
    try:
        btf = BTF.load()
        out = {k: btf.offsetof(s, m) for k, (s, m) in OFFSET_FIELDS.items()}
        out[SOCKET_INO] = (btf.offsetof("socket_alloc", "vfs_inode")
                           - btf.offsetof("socket_alloc", "socket")
                           + btf.offsetof("inode", "i_ino"))
        return out
    except BTFError as e:
        raise ProbeUnavailable("BTF offsets for the BPF destroy: %s" % e) from None


# --- bpf(2)

def _bpf(cmd: int, attr: bytearray) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise ProbeUnavailable("bpf(2) number unknown on %s" % platform.machine())
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    r = libc.syscall(nr, cmd, buf, len(attr))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def patch_kfunc(code: bytearray, btf_id: int) -> int:
    """Turn each call of the sentinel helper into a kfunc call; the count patched."""
    n = 0
    for i in range(0, len(code), 8):
        op, regs, _off, imm = struct.unpack_from("<BBhi", code, i)
        if op == 0x85 and imm == KFUNC_SENTINEL and regs >> 4 == 0:
            struct.pack_into("<BBhi", code, i, op, (regs & 0x0F) | (BPF_PSEUDO_KFUNC_CALL << 4),
                             0, btf_id)
            n += 1
    return n


def _prog_load(code: bytes, attach_btf_id: int) -> int:
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 20)
    attr = bytearray(128)
    struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_TRACING, len(code) // 8,
                     ctypes.addressof(insns), ctypes.addressof(lic), 1, len(log),
                     ctypes.addressof(log))
    attr[48:48 + 12] = b"tcpidle_kill"
    struct.pack_into("<I", attr, 68, BPF_TRACE_ITER)
    struct.pack_into("<I", attr, 108, attach_btf_id)
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except OSError as e:
        tail = log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise ProbeUnavailable("the kernel refused the BPF destroy program (%s)%s" % (
            e.strerror, ": " + " / ".join(tail) if tail else "")) from None


def _iter_fd(prog_fd: int) -> int:
    attr = bytearray(64)
    struct.pack_into("<III", attr, 0, prog_fd, 0, BPF_TRACE_ITER)
    link = _bpf(BPF_LINK_CREATE, attr)
    try:
        attr = bytearray(8)
        struct.pack_into("<II", attr, 0, link, 0)
        return _bpf(BPF_ITER_CREATE, attr)
    finally:
        os.close(link)


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
    """The destroy program compiled and loaded for one selection and policy.

    `state_mask`: selectors.states_mask(selector.states).  `owner_inodes`:
    the socket inodes the owner selectors matched (None: no owner selector).
    `run(netns_fd)` is one pass in that namespace (None: ours).
    """

    def __init__(self, selector: Selector, policy: Policy, state_mask: int,
                 owner_inodes: Optional[Iterable[int]] = None):
        iter_id, kfunc_id = kernel_ids()
        self.hz = kernel_hz()
        owners = None if owner_inodes is None else sorted(set(owner_inodes))
        flags = cflags(selector, policy, self.hz, btf_offsets(), state_mask,
                       None if owners is None else len(owners))
        self._module = _compile(flags)
        try:
            self._fill(selector, owners)
            code = bytearray(self._module.dump_func(b"bpf_iter__tcp"))
            if not policy.dry_run and patch_kfunc(code, kfunc_id) != 1:
                raise ProbeUnavailable("the BPF destroy program has no bpf_sock_destroy call")
            self._prog = _prog_load(bytes(code), iter_id)
        except BaseException:
            _dispose(self._module)
            raise

    def _fill(self, selector: Selector, owners: Optional[List[int]]) -> None:
        m = self._module
        for name, ports in ((b"sports", selector.sports), (b"dports", selector.dports),
                            (b"excl_ports", selector.exclude_ports)):
            if ports is not None:
                table = m[name]
                for word, bits in port_bitmap(ports).items():
                    table[ctypes.c_int(word)] = ctypes.c_uint64(bits)
        for name, nets in ((b"src_nets", selector.src), (b"dst_nets", selector.dst),
                           (b"excl_nets", selector.exclude_nets)):
            table = m[name]
            for plen, addr in lpm_entries(nets):
                key = table.Key()
                key.prefixlen = plen
                key.addr = (ctypes.c_ubyte * 16)(*addr)
                table[key] = ctypes.c_ubyte(1)
        if owners:
            table = m[b"owners"]
            for inode in owners:
                table[ctypes.c_uint64(inode)] = ctypes.c_ubyte(1)
        table = m[b"uids"]
        for uid in selector.uids:
            table[ctypes.c_uint32(uid)] = ctypes.c_ubyte(1)

    def run(self, netns_fd: Optional[int] = None) -> PassResult:
        """One pass: every TCP socket of the namespace, decided and acted on under its lock."""
        from .. import netns
        counts = self._module[b"counts"]
        for i in range(3):
            counts[ctypes.c_int(i)] = ctypes.c_uint64(0)
        errors = self._module[b"errors"]
        errors.clear()
        start = time.monotonic()
        if netns_fd is None:
            fd = _iter_fd(self._prog)
        else:
            with netns.entered_fd(netns_fd):
                fd = _iter_fd(self._prog)
        chunks = []
        try:
            while True:
                data = os.read(fd, 1 << 16)
                if not data:
                    break
                chunks.append(data)
        finally:
            os.close(fd)
        failed = {k.value: v.value for k, v in errors.items()}
        records = with_errors(decode_records(b"".join(chunks)), failed)
        return PassResult(records, counts[ctypes.c_int(1)].value,
                          (time.monotonic() - start) * 1000, counts[ctypes.c_int(2)].value)

    def close(self) -> None:
        if self._prog is not None:
            os.close(self._prog)
            self._prog = None
            _dispose(self._module)

    def __enter__(self) -> "IterDestroy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _compile(flags: List[str]):
    """bcc compiles bpf/iterdestroy.bpf.c and creates its maps (through loader.py)."""
    from .loader import compile_only
    return compile_only("iterdestroy.bpf.c", flags + ["-Wno-int-to-void-pointer-cast"])


def _dispose(module) -> None:
    from .loader import dispose
    dispose(module)
