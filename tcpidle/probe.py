"""The BPF probe: compile, attach, pin and read bpf/tcpidle.bpf.c.

The only module that imports bcc (lazily, inside `Probe.attach`, so that
importing this module, `ProbeUnavailable` and `PinnedMap` works without it).
It owns:

- choosing the receive hook at run time: fentry on tcp_rcv_established where
  it loads, else a kprobe where the kernel has kprobes, else the tcp:tcp_probe
  tracepoint; every hook that is skipped or fails is reported with its reason
  (`Probe.hook`, `Probe.hook_notes`);
- the kernel header tree bcc compiles against (tcpidle.kheaders) and the
  struct offsets the fentry, raw tracepoint and kprobe hooks need, read from
  the running kernel's BTF
  (tcpidle.btf), handed to the C code as -D flags;
- reading the maps fast: BPF_MAP_LOOKUP_BATCH through libbpf, falling back to
  key-by-key iteration on kernels without it (< 5.6);
- pinning the maps in bpffs and reading pinned maps from another process;
- pin directories for the tracker: maps created pinned, or reused with
  their history when a previous tracker left them (checked before bcc uses
  them, locked against a second tracker), and removed on request.

Everything that can go wrong before the probe runs (no bcc, no privilege, no
headers, compile failure, no hook) raises `ProbeUnavailable` with a one-line
reason; callers carry on with tcp_info.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from . import kheaders
from .errors import RuntimeFailure, UsageError
from .model import DEFAULT_PIN_DIR, Activity

# Best first: fentry (a BTF trampoline, the cookie generated on demand);
# the tcp_probe tracepoint with its raw arguments (no perf record built);
# a kprobe; the classic tracepoint (its record costs, but always carries
# the cookie).  See the header comment of bpf/tcpidle.bpf.c.
HOOKS = ("fentry", "raw_tracepoint", "kprobe", "tracepoint")
# Hooks that read the cookie from the socket, where it is 0 until an
# INET_DIAG dump (or SO_COOKIE...) asked for it: prime_cookies() after attaching.
LAZY_COOKIE_HOOKS = frozenset(("raw_tracepoint", "kprobe"))
RCV_FUNC = "tcp_rcv_established"
# Indexes of the per-CPU "counters" array; keep in step with the C source.
COUNTERS = ("inserts", "deletes", "failed", "no_cookie", "selftest_ok", "selftest_bad")
# struct tcpidle_activity (see the header comment of the C source).
VALUE = struct.Struct("=5Q")
KEY_SIZE = 8
MAX_MAP_SIZE = 1 << 24
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_FS_MAGIC = 0xCAFE4A11
BPF_F_RDONLY = 1 << 3
PIN_NAMES = ("activity", "counters")

_log = logging.getLogger("tcpidle.probe")


class ProbeUnavailable(RuntimeFailure):
    """The BPF probe cannot run here; the message is the one-line reason."""


# --------------------------------------------------------------------------
# What the running kernel offers (detection), and the hook choice (pure).


@dataclass(frozen=True)
class KernelFeatures:
    """What hook selection needs to know about the running kernel.

    `btf_offsets` holds the -D values for the socket/skb readers, or
    `btf_error` says why there are none.  `*_fields` are the field names of
    the tracepoints' format files (None: no such tracepoint).
    """

    btf_offsets: Optional[Dict[str, int]]
    btf_error: Optional[str]
    kprobes: bool
    tcp_probe_fields: Optional[frozenset]
    destroy_fields: Optional[frozenset]


def unavailable_reasons(f: KernelFeatures) -> Dict[str, Optional[str]]:
    """For each hook, None if worth trying, else why it cannot work here."""
    out: Dict[str, Optional[str]] = {}
    no_btf = None if f.btf_offsets else "no struct offsets from kernel BTF (%s)" % (
        f.btf_error or "unknown")
    out["fentry"] = no_btf
    if f.tcp_probe_fields is None:
        out["raw_tracepoint"] = "no tcp:tcp_probe tracepoint"
    else:
        out["raw_tracepoint"] = no_btf
    if not f.kprobes:
        out["kprobe"] = "kernel has no kprobes"
    else:
        out["kprobe"] = no_btf
    if f.tcp_probe_fields is None:
        out["tracepoint"] = "no tcp:tcp_probe tracepoint"
    elif not {"sock_cookie", "data_len"} <= f.tcp_probe_fields:
        out["tracepoint"] = "tcp:tcp_probe lacks sock_cookie/data_len (kernel too old)"
    else:
        out["tracepoint"] = None
    return out


def plan_hooks(requested: str, reasons: Dict[str, Optional[str]]) -> Tuple[List[str], List[str]]:
    """The hooks to try in order, and notes on those left out.

    "auto" tries every available hook in the order of HOOKS; a named hook is
    the only candidate and must be available.
    """
    if requested != "auto" and requested not in HOOKS:
        raise UsageError("unknown BPF hook %r (want auto, %s)" % (requested, ", ".join(HOOKS)))
    if requested != "auto":
        if reasons.get(requested):
            raise ProbeUnavailable("BPF hook %s unavailable: %s" % (requested, reasons[requested]))
        return [requested], []
    candidates = [h for h in HOOKS if not reasons.get(h)]
    notes = ["%s: %s" % (h, reasons[h]) for h in HOOKS if reasons.get(h)]
    if not candidates:
        raise ProbeUnavailable("no BPF hook available (%s)" % "; ".join(notes))
    return candidates, notes


def attach_first(candidates: Sequence[str], try_attach: Callable[[str], None],
                 notes: Sequence[str] = (), log=None) -> Tuple[str, List[str]]:
    """Attach the first candidate that works; return (hook, notes).

    try_attach(hook) raises on failure; its message becomes the hook's note,
    is logged, and the next candidate is tried.
    """
    log = log or _log
    notes = list(notes)
    for i, hook in enumerate(candidates):
        try:
            try_attach(hook)
        except Exception as e:  # bcc raises bare Exception
            why = _one_line(e)
            notes.append("%s: %s" % (hook, why))
            nxt = candidates[i + 1] if i + 1 < len(candidates) else None
            log.info("BPF hook %s failed: %s%s", hook, why, "; trying %s" % nxt if nxt else "")
            continue
        return hook, _hook_order(notes)
    raise ProbeUnavailable("no BPF hook could attach (%s)" % "; ".join(_hook_order(notes)))


def _hook_order(notes: Sequence[str]) -> List[str]:
    """Notes about hooks in the order of HOOKS, other notes after them."""
    def key(note: str) -> int:
        name = note.split(":", 1)[0]
        return HOOKS.index(name) if name in HOOKS else len(HOOKS)

    return sorted(notes, key=key)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    # bcc says this for any EPERM at load, which as root means the kernel
    # refused the program type (lockdown, missing trampoline support...).
    if text == "Need super-user privileges to run":
        text = "load refused: %s" % os.strerror(errno.EPERM)
    return text


def tracefs() -> str:
    for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.isdir(os.path.join(d, "events")):
            return d
    return "/sys/kernel/tracing"


def ensure_tracefs(log=None) -> bool:
    """Mount tracefs at /sys/kernel/tracing when no tracefs is visible; True if mounted now.

    Tracepoints are found and attached through tracefs (bcc reads the
    record layouts and the event ids there).  systemd mounts it at boot, but
    `ip netns exec` gives its command a fresh /sys without it.
    """
    if any(os.path.isdir(os.path.join(d, "events"))
           for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")):
        return False
    target = "/sys/kernel/tracing"
    if not os.path.isdir(target):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(b"tracefs", target.encode(), b"tracefs", 0, None) != 0:
        (log or _log).info("no tracefs, and mounting one at %s failed: %s",
                           target, os.strerror(ctypes.get_errno()))
        return False
    (log or _log).info("mounted tracefs at %s", target)
    return True


def tracepoint_fields(category: str, event: str, root: Optional[str] = None) -> Optional[frozenset]:
    """Field names in a tracepoint's format file, None if it has none."""
    path = os.path.join(root or tracefs(), "events", category, event, "format")
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("field:"):
            decl = line[len("field:"):].split(";", 1)[0].strip()
            names.add(decl.split()[-1].split("[", 1)[0])
    return frozenset(names)


def kprobes_available() -> bool:
    """bcc attaches kprobes via the perf kprobe PMU or tracefs kprobe_events."""
    return (os.path.exists("/sys/bus/event_source/devices/kprobe/type")
            or os.path.exists(os.path.join(tracefs(), "kprobe_events")))


# -D macro -> (struct, member path, member sizes allowed) read from kernel BTF.
OFFSET_MACROS = {
    "TCPIDLE_SKB_CB_OFF": ("sk_buff", "cb", (48,)),
    "TCPIDLE_CB_SEQ_OFF": ("tcp_skb_cb", "seq", (4,)),
    "TCPIDLE_CB_END_SEQ_OFF": ("tcp_skb_cb", "end_seq", (4,)),
    # u8 until Linux 6.18 widened it to u16 for AccECN's AE bit
    "TCPIDLE_CB_FLAGS_OFF": ("tcp_skb_cb", "tcp_flags", (1, 2)),
    "TCPIDLE_SK_COOKIE_OFF": ("sock", "__sk_common.skc_cookie", (8,)),
}
# Members whose size varies by kernel: their size goes to the C code too.
SIZE_MACROS = {"TCPIDLE_CB_FLAGS_SIZE": "TCPIDLE_CB_FLAGS_OFF"}


def btf_offsets(path: str = "/sys/kernel/btf/vmlinux") -> Dict[str, int]:
    """-D values for the fentry/raw tracepoint/kprobe readers, from the running kernel's BTF.

    Raises tcpidle.btf.BTFError when BTF is missing or a member is not found
    or has an unexpected size.
    """
    from .btf import BTF, BTFError

    btf = BTF.load(path)
    out = {}
    sizes = {}
    for macro, (st, member, allowed) in OFFSET_MACROS.items():
        got = btf.member_size(st, member)
        if got not in allowed:
            raise BTFError("%s.%s is %d bytes, expected %s"
                           % (st, member, got, " or ".join(map(str, allowed))))
        out[macro] = btf.offsetof(st, member)
        sizes[macro] = got
    for macro, of in SIZE_MACROS.items():
        out[macro] = sizes[of]
    return out


def _boot_identity() -> str:
    """Release and boot id: vmlinux BTF cannot change without a reboot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return "%s %s" % (os.uname().release, boot)


def cached_btf_offsets(cache_dir: Optional[str]) -> Dict[str, int]:
    """btf_offsets(), remembered in cache_dir for the current boot.

    Parsing all of vmlinux BTF in Python takes ~0.2 s, a third of start-up;
    the answer only changes with the kernel, so it is kept per boot.
    """
    import json

    path = os.path.join(cache_dir or kheaders.default_cache_dir(), "btf-offsets.json")
    ident = _boot_identity()
    try:
        with open(path) as f:
            saved = json.load(f)
        wanted = set(OFFSET_MACROS) | set(SIZE_MACROS)
        if saved.get("boot") == ident and set(saved.get("offsets", {})) == wanted:
            return {k: int(v) for k, v in saved["offsets"].items()}
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    offsets = btf_offsets()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = "%s.%d" % (path, os.getpid())
        with open(tmp, "w") as f:
            json.dump({"boot": ident, "offsets": offsets}, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs time
    return offsets


def detect_features(need_btf: bool = True, cache_dir: Optional[str] = None) -> KernelFeatures:
    offsets, err = None, None
    if need_btf:
        try:
            offsets = cached_btf_offsets(cache_dir)
        except Exception as e:  # BTFError, or OSError details
            err = _one_line(e)
    else:
        err = "not needed"
    return KernelFeatures(
        btf_offsets=offsets, btf_error=err, kprobes=kprobes_available(),
        tcp_probe_fields=tracepoint_fields("tcp", "tcp_probe"),
        destroy_fields=tracepoint_fields("tcp", "tcp_destroy_sock"))


def build_cflags(map_size: int, hooks: Sequence[str], offsets: Optional[Dict[str, int]],
                 destroy: bool, selftest: bool = False) -> List[str]:
    """The -D flags that configure the C source (no text substitution)."""
    flags = ["-DMAX_ENTRIES=%d" % map_size]
    for h in hooks:
        flags.append("-DTCPIDLE_HOOK_%s" % h.upper())
    if offsets and (selftest or set(hooks) & {"fentry", "raw_tracepoint", "kprobe"}):
        flags += ["-D%s=%d" % kv for kv in sorted(offsets.items())]
    if destroy:
        flags.append("-DTCPIDLE_DESTROY")
    if selftest:
        flags.append("-DTCPIDLE_SELFTEST")
    return flags


def bpf_source() -> str:
    """Path of bpf/tcpidle.bpf.c (package data of tcpidle.bpf)."""
    from . import bpf as _pkg  # noqa: F401  (tcpidle.bpf maps to bpf/)

    return os.path.join(os.path.dirname(_pkg.__file__), "tcpidle.bpf.c")


# --------------------------------------------------------------------------
# libbpf calls through ctypes: map reads, pins, info.


class _BpfInfo(ctypes.Structure):
    # The head of struct bpf_map_info (include/uapi/linux/bpf.h).
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("_rest", ctypes.c_uint8 * 160)]


class _ObjGetOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("file_flags", ctypes.c_uint32),
                ("path_fd", ctypes.c_int)]


_libbpf = None


def libbpf():
    """libbpf's functions, from bcc's own library when loaded, else libbpf.so."""
    global _libbpf
    if _libbpf is not None:
        return _libbpf
    lib = None
    try:
        from bcc.libbcc import lib as bcclib  # resolves libbpf symbols too

        bcclib.bpf_map_lookup_batch  # noqa: B018 (probe the symbol)
        lib = bcclib
    except Exception:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise ProbeUnavailable("libbpf not found: %s" % e) from None
    c = ctypes
    sig = {
        "bpf_map_lookup_batch": [c.c_int, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p,
                                 c.POINTER(c.c_uint32), c.c_void_p],
        "bpf_map_lookup_elem": [c.c_int, c.c_void_p, c.c_void_p],
        "bpf_map_get_next_key": [c.c_int, c.c_void_p, c.c_void_p],
        "bpf_obj_pin": [c.c_int, c.c_char_p],
        "bpf_obj_get_info_by_fd": [c.c_int, c.c_void_p, c.POINTER(c.c_uint32)],
    }
    try:  # libbpf >= 1.0; older ones can only open pins read-write
        lib.bpf_obj_get_opts.argtypes = [c.c_char_p, c.POINTER(_ObjGetOpts)]
        lib.bpf_obj_get_opts.restype = c.c_int
        lib._tcpidle_rdonly_get = True
    except AttributeError:
        sig["bpf_obj_get"] = [c.c_char_p]
    for fn, args in sig.items():
        f = getattr(lib, fn)
        f.argtypes = args
        f.restype = c.c_int
    _libbpf = lib
    return lib


def _errno(ret: int) -> int:
    # libbpf >= 1.0 returns -errno and sets errno; older ones return -1 and
    # set errno.  errno is right in both cases.
    return ctypes.get_errno() or -ret


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = _errno(ret)
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return ret


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """Number of possible CPUs: per-CPU map lookups return one value each."""
    with open(path) as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def map_info(fd: int) -> _BpfInfo:
    info = _BpfInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
           "BPF_OBJ_GET_INFO_BY_FD")
    return info


def decode_entries(keys: Sequence[int], values: bytes) -> Dict[int, Activity]:
    """Activity records from parallel keys and packed values (pure)."""
    out = {}
    for cookie, (seg, data, nseg, ndata, nbytes) in zip(keys, VALUE.iter_unpack(values)):
        out[cookie] = Activity(cookie, seg, data, nseg, ndata, nbytes)
    return out


def evicted_count(inserts: int, deletes: int, entries: int) -> int:
    """Entries that left the map other than by a destroy: LRU evictions."""
    return max(0, inserts - deletes - entries)


class MapReader:
    """Reads the probe's two maps given their file descriptors."""

    def __init__(self, activity_fd: int, counters_fd: int, own_fds: bool = False):
        self._lib = libbpf()
        self.activity_fd = activity_fd
        self.counters_fd = counters_fd
        self._own = own_fds
        info = map_info(activity_fd)
        if info.key_size != KEY_SIZE or info.value_size != VALUE.size:
            raise ProbeUnavailable("activity map has key/value sizes %d/%d, expected %d/%d"
                                   % (info.key_size, info.value_size, KEY_SIZE, VALUE.size))
        self.max_entries = info.max_entries
        self._ncpu = possible_cpus()
        self._batch = True

    # -- raw reads

    def _read_batch(self) -> Tuple[List[int], bytes]:
        cap = self.max_entries + 256  # slack for entries added during the walk
        keys = (ctypes.c_uint64 * cap)()
        vals = ctypes.create_string_buffer(VALUE.size * cap)
        token = ctypes.c_uint32(0)  # hash maps use a u32 bucket cursor
        count = ctypes.c_uint32(0)
        total = 0
        first = True
        while total < cap:
            count.value = cap - total
            ret = self._lib.bpf_map_lookup_batch(
                self.activity_fd, None if first else ctypes.byref(token), ctypes.byref(token),
                ctypes.byref(keys, KEY_SIZE * total), ctypes.byref(vals, VALUE.size * total),
                ctypes.byref(count), None)
            err = _errno(ret) if ret < 0 else 0
            total += count.value
            first = False
            if ret == 0:
                continue
            if err == errno.ENOENT:  # walked past the last bucket
                break
            if err == errno.ENOSPC and total:  # next bucket does not fit
                break
            raise OSError(err, "BPF_MAP_LOOKUP_BATCH: %s" % os.strerror(err))
        return keys[:total], vals.raw[:VALUE.size * total]

    def _read_iter(self) -> Tuple[List[int], bytes]:
        """Key-by-key walk for kernels without batch lookups."""
        keys, vals = [], []
        key, nxt = ctypes.c_uint64(), ctypes.c_uint64()
        val = ctypes.create_string_buffer(VALUE.size)
        prev = None
        for _ in range(self.max_entries + 256):
            ret = self._lib.bpf_map_get_next_key(self.activity_fd, prev, ctypes.byref(nxt))
            if ret < 0:
                break
            key.value = nxt.value
            prev = ctypes.byref(key)
            if self._lib.bpf_map_lookup_elem(self.activity_fd, ctypes.byref(key), val) == 0:
                keys.append(key.value)
                vals.append(val.raw)
        return keys, b"".join(vals)

    def _read(self) -> Tuple[List[int], bytes]:
        if self._batch:
            try:
                return self._read_batch()
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOTSUP, 524):  # 524: ENOTSUPP
                    raise
                self._batch = False
        return self._read_iter()

    def counters(self) -> Dict[str, int]:
        """The per-CPU counters, summed."""
        buf = (ctypes.c_uint64 * self._ncpu)()
        out = {}
        for i, name in enumerate(COUNTERS):
            key = ctypes.c_uint32(i)
            _check(self._lib.bpf_map_lookup_elem(self.counters_fd, ctypes.byref(key), buf),
                   "counters lookup")
            out[name] = sum(buf)
        return out

    # -- the API

    def activity(self) -> Dict[int, Activity]:
        """A snapshot of the map, keyed by socket cookie."""
        keys, vals = self._read()
        return decode_entries(keys, vals)

    def lookup(self, cookies: Sequence[int]) -> Dict[int, Activity]:
        """The entries of just these cookies, read now (absent ones are left out).

        One BPF_MAP_LOOKUP_ELEM each, ~2 us from Python: for a few thousand
        cookies that beats reading a large map whole; past that the whole
        map is read and filtered.
        """
        if len(cookies) > 4096:
            wanted = set(cookies)
            return {c: a for c, a in self.activity().items() if c in wanted}
        key = ctypes.c_uint64()
        val = ctypes.create_string_buffer(VALUE.size)
        lookup, fd, ref_key = self._lib.bpf_map_lookup_elem, self.activity_fd, ctypes.byref(key)
        keys, vals = [], []
        for cookie in cookies:
            key.value = cookie
            if lookup(fd, ref_key, val) == 0:
                keys.append(cookie)
                vals.append(val.raw)
        return decode_entries(keys, b"".join(vals))

    def stats(self) -> Dict[str, int]:
        """entries, inserts, deletes, evicted, failed (and no_cookie, max_entries).

        The counters and the map cannot be read atomically together: they are
        read counters-map-counters, up to three times, until the counters did
        not move meanwhile; evicted is then exact, else a close estimate.
        """
        for _ in range(3):
            before = self.counters()
            entries = len(self._read()[0])
            after = self.counters()
            if before == after:
                break
        c = after
        return {
            "entries": entries,
            "inserts": c["inserts"],
            "deletes": c["deletes"],
            "evicted": evicted_count(c["inserts"], c["deletes"], entries),
            "failed": c["failed"],
            "no_cookie": c["no_cookie"],
            "max_entries": self.max_entries,
        }

    def close(self) -> None:
        if self._own:
            for fd in (self.activity_fd, self.counters_fd):
                if fd >= 0:
                    os.close(fd)
        self.activity_fd = self.counters_fd = -1


def _fs_type(path: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is first
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (path, os.strerror(err)))
    return struct.unpack_from("l", buf.raw)[0] & 0xFFFFFFFF


def _require_bpffs(directory: str) -> None:
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if _fs_type(probe) != BPF_FS_MAGIC:
        raise ProbeUnavailable(
            "%s is not on a BPF filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)" % directory)


def is_bpffs(path: str) -> bool:
    try:
        return _fs_type(path) == BPF_FS_MAGIC
    except OSError:
        return False


def mount_bpffs(path: str = "/sys/fs/bpf") -> bool:
    """Mount a BPF filesystem at path unless one is there; True if mounted now.

    systemd mounts /sys/fs/bpf at boot; minimal systems and containers may
    not, and pins need it.  For `tcpidle track`, which pins.
    """
    if is_bpffs(path):
        return False
    os.makedirs(path, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise ProbeUnavailable("cannot mount a BPF filesystem at %s: %s" % (path, os.strerror(err)))
    return True


def _obj_get(path: str) -> int:
    """A read-only fd on the BPF object pinned at path (OSError on failure)."""
    lib = libbpf()
    raw = os.fsencode(path)
    if getattr(lib, "_tcpidle_rdonly_get", False):
        opts = _ObjGetOpts(ctypes.sizeof(_ObjGetOpts), BPF_F_RDONLY, 0)
        fd = lib.bpf_obj_get_opts(raw, ctypes.byref(opts))
    else:
        fd = lib.bpf_obj_get(raw)
    return _check(fd, "open pinned %s" % path)


class PinnedMap(MapReader):
    """Read-only view of maps pinned by Probe.pin() or Probe.attach(pin_dir=...)."""

    @classmethod
    def open(cls, directory: str) -> "PinnedMap":
        fds = []
        try:
            for name in PIN_NAMES:
                fds.append(_obj_get(os.path.join(directory, name)))
            for fd, want in zip(fds, (BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY)):
                if map_info(fd).type != want:
                    raise ProbeUnavailable("%s does not hold tcpidle maps" % directory)
            return cls(fds[0], fds[1], own_fds=True)
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise ProbeUnavailable(_one_line(e)) from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise


# --------------------------------------------------------------------------
# Maps that outlive the process: pin directories (tcpidle track).
#
# bcc's BPF_TABLE_PINNED does the create-or-reuse (see the C source); this
# part checks an existing pin before bcc trusts it blindly, keeps two
# trackers from feeding the same maps (flock on the directory: released by
# the kernel however the holder dies), and removes pins on request.



class PinError(ProbeUnavailable):
    """The pin directory cannot be used (in use, foreign maps, no bpffs).

    Unlike other ProbeUnavailable reasons this is a configuration problem:
    carrying on without the probe would hide it.
    """

SYS_BPFFS = "/sys/fs/bpf"


@dataclass(frozen=True)
class PinInfo:
    """What a pinned map is: enough to tell whether this probe can use it."""

    map_type: int
    key_size: int
    value_size: int
    max_entries: int


# name -> (map type, key size, value size, max_entries or None for any)
PIN_SPECS = {
    "activity": (BPF_MAP_TYPE_LRU_HASH, KEY_SIZE, VALUE.size, None),
    "counters": (BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, len(COUNTERS)),
}


def check_pin_dir(path: str) -> str:
    """The pin directory as an absolute path; UsageError if unusable.

    The paths end up in C string literals (-D flags): quotes, backslashes and
    control characters are refused rather than escaped.
    """
    if not path:
        raise UsageError("the pin directory must not be empty")
    path = os.path.abspath(path)
    if any(c in '"\\' or not c.isprintable() for c in path):
        raise UsageError("pin directory %r: quotes, backslashes and control characters "
                         "are not allowed" % path)
    return path


def pinned_info(path: str) -> Optional[PinInfo]:
    """PinInfo of the map pinned at path; None if nothing is pinned there."""
    try:
        fd = _obj_get(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise PinError("cannot open %s: %s" % (path, os.strerror(e.errno))) from None
    try:
        info = map_info(fd)
    except OSError as e:
        raise PinError("%s: %s" % (path, _one_line(e))) from None
    finally:
        os.close(fd)
    return PinInfo(info.type, info.key_size, info.value_size, info.max_entries)


def plan_pinned_maps(found: Dict[str, Optional[PinInfo]], map_size: int,
                     directory: str) -> Tuple[int, List[str], List[str]]:
    """(map size to build with, names of the pins reused, warnings) -- pure.

    A pinned map of the wrong type or key/value size (another program's, or
    another layout) is refused: bcc would attach our programs to it as is.
    A pinned activity map of another max_entries is reused at its own size:
    its history is worth more than the size asked for.
    """
    size, reused, notes = map_size, [], []
    for name in PIN_NAMES:
        info = found.get(name)
        if info is None:
            continue
        want_type, want_key, want_value, want_entries = PIN_SPECS[name]
        if ((info.map_type, info.key_size, info.value_size) != (want_type, want_key, want_value)
                or (want_entries is not None and info.max_entries != want_entries)):
            raise PinError(
                "%s is not a tcpidle %s map (map type %d, key/value %d/%d bytes, %d entries; "
                "want type %d, %d/%d bytes%s): remove it with `tcpidle track --cleanup "
                "--pin-dir %s`" % (
                    os.path.join(directory, name), name, info.map_type, info.key_size,
                    info.value_size, info.max_entries, want_type, want_key, want_value,
                    "" if want_entries is None else ", %d entries" % want_entries, directory))
        reused.append(name)
    activity = found.get("activity")
    if activity is not None and activity.max_entries != map_size:
        size = activity.max_entries
        notes.append("pinned map %s has %d entries, not %d: reusing it at its size "
                     "(tcpidle track --cleanup starts afresh)"
                     % (os.path.join(directory, "activity"), size, map_size))
    if len(reused) == 1:
        notes.append("only %s was pinned in %s: the eviction count starts over"
                     % (reused[0], directory))
    return size, reused, notes


def _private_mount_namespace() -> bool:
    """True when this process's mount namespace is its own: not init's, not
    its parent's (`ip netns exec` makes one, with a fresh /sys).

    Init's namespace is asked first; where it cannot be read (some
    containers), the parent's.  Unknown counts as shared.
    """
    try:
        mine = os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return False
    for pid in (1, os.getppid()):
        try:
            return os.stat("/proc/%d/ns/mnt" % pid).st_ino != mine
        except OSError:
            continue
    return False


def ensure_bpffs(directory: str, log=None) -> List[str]:
    """Make sure directory can live on bpffs; mount /sys/fs/bpf if needed.

    Returns notes on what was done.  Only /sys/fs/bpf is ever mounted (a
    BPF filesystem elsewhere would hide what is there).
    """
    log = log or _log
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if is_bpffs(probe):
        return []
    if directory != SYS_BPFFS and not directory.startswith(SYS_BPFFS + "/"):
        raise PinError("%s is not on a BPF filesystem (mount one: mount -t bpf bpf DIR)"
                               % directory)
    try:
        mount_bpffs(SYS_BPFFS)
    except ProbeUnavailable as e:
        raise PinError(str(e)) from None
    notes = ["mounted a BPF filesystem at %s" % SYS_BPFFS]
    log.info("%s", notes[0])
    if _private_mount_namespace():
        # A bpffs mount is a new, empty instance, and this one lives only as
        # long as our mount namespace: the pins would die with this process.
        warn = ("%s was not mounted in this process's own mount namespace (ip netns exec "
                "remounts /sys): pins there vanish when tcpidle exits; to keep history across "
                "restarts run tcpidle in the host's mount namespace (--netns) or pin on a "
                "shared BPF filesystem" % SYS_BPFFS)
        log.warning("%s", warn)
        notes.append(warn)
    return notes


def _lock_dir(directory: str) -> int:
    """An fd holding an exclusive flock on directory; ProbeUnavailable if taken."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = pin_dir_holder(directory)
        raise PinError("%s is in use by another tcpidle tracker%s" % (
            directory, " (pid %d)" % pid if pid else "")) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def pin_dir_holder(directory: str) -> Optional[int]:
    """None if no tracker holds directory; else its pid (0 if unknown)."""
    import fcntl

    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            st = os.fstat(fd)
        else:
            return None  # closing the fd drops the probing lock
    finally:
        os.close(fd)
    # /proc/locks: "1: FLOCK  ADVISORY  WRITE 1234 00:2f:5678 0 EOF"
    ident = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == ident:
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return 0


class _PinSession:
    """The pin directory of one attach: lock, reuse plan, and cleanup on failure."""

    def __init__(self, directory: str, lock_fd: int, map_size: int, reused: List[str],
                 notes: List[str]):
        self.directory = directory
        self.lock_fd = lock_fd
        self.map_size = map_size
        self.reused = reused
        self.notes = notes

    @classmethod
    def open(cls, directory: str, map_size: int, log) -> "_PinSession":
        notes = ensure_bpffs(directory, log)
        try:
            os.makedirs(directory, exist_ok=True)
            lock_fd = _lock_dir(directory)
        except OSError as e:
            raise PinError("pin directory %s: %s" % (directory, e.strerror or e)) from None
        try:
            found = {name: pinned_info(os.path.join(directory, name)) for name in PIN_NAMES}
            size, reused, warnings = plan_pinned_maps(found, map_size, directory)
        except BaseException:
            os.close(lock_fd)
            raise
        for w in warnings:
            log.warning("%s", w)
        return cls(directory, lock_fd, size, reused, notes + warnings)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def cflags(self) -> List[str]:
        # String-literal macros; check_pin_dir() refused quotes and backslashes.
        return ['-DTCPIDLE_PIN_ACTIVITY="%s"' % self.path("activity"),
                '-DTCPIDLE_PIN_COUNTERS="%s"' % self.path("counters")]

    def describe(self) -> str:
        if not self.reused:
            return "new maps"
        return "reused %s" % " and ".join(self.reused)

    def _unlink(self, names: Sequence[str]) -> None:
        for name in names:
            try:
                os.unlink(self.path(name))
            except FileNotFoundError:
                pass

    def _unlock(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def abort(self) -> None:
        """Attach failed: remove the pins this attempt created, keep reused ones."""
        self._unlink([n for n in PIN_NAMES if n not in self.reused])
        self._unlock()

    def release(self, remove: bool) -> None:
        if remove:
            self._unlink(PIN_NAMES)
        self._unlock()


def remove_pins(directory: str = DEFAULT_PIN_DIR) -> List[str]:
    """Remove the pins of directory (and the directory when left empty).

    Returns the paths removed, [] if there was nothing.  Refuses while a
    tracker holds the directory: its maps would live on, unpinned, and its
    history be lost at its next restart.
    """
    directory = check_pin_dir(directory)
    if not os.path.isdir(directory):
        return []
    try:
        lock_fd = _lock_dir(directory)
    except PinError as e:
        raise RuntimeFailure("%s: stop it before --cleanup" % e) from None
    removed = []
    try:
        for name in PIN_NAMES:
            path = os.path.join(directory, name)
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
        if not os.listdir(directory) and not os.path.ismount(directory):
            os.rmdir(directory)
            removed.append(directory)
    finally:
        os.close(lock_fd)
    return removed


def pinned_activity(directory: str = DEFAULT_PIN_DIR,
                    log=None) -> Optional[Callable[[], Dict[int, Activity]]]:
    """An activity source reading the maps a tracker pinned, or None.

    None when nothing is pinned there (or it cannot be read: not root, not
    tcpidle's maps; said at info level).  The maps need not be attached
    right now: a stale probe record loses to tcp_info by the merge rule.
    The PinnedMap stays open for the life of the returned bound method
    (`source.__self__.close()` closes it).
    """
    log = log or _log
    if not os.path.exists(os.path.join(directory, "activity")):
        return None
    try:
        reader = PinnedMap.open(directory)
    except ProbeUnavailable as e:
        log.info("pinned BPF maps in %s not used: %s", directory, e)
        return None
    return reader.activity


# --------------------------------------------------------------------------
# Compiling and attaching.


@contextmanager
def _captured_stderr(sink: List[str]) -> Iterator[None]:
    """Send C-level stderr (bcc, libbpf, clang) to sink instead of the terminal.

    bcc prints compiler diagnostics and whole verifier logs on fd 2; when an
    expected failure (fentry refused) falls through to the next hook, that is
    noise for the user but useful in the debug log.
    """
    import sys

    try:
        sys.stderr.flush()
    except Exception:
        pass
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                sink.append(text)


@contextmanager
def _env(name: str, value: Optional[str]) -> Iterator[None]:
    """Set an environment variable (seen by bcc's getenv) for a block."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _module_class():
    """A bcc BPF subclass that compiles only: we attach programs one by one.

    bcc's constructor attaches every function named kfunc__*, kprobe__*,
    tracepoint__* itself, and if one fails the half-made object (maps,
    attached programs) cannot be cleaned up.  We need the kfunc__ name (bcc
    derives the BTF attach target from it), so auto-attach is turned off.
    """
    from bcc import BPF

    class _Module(BPF):
        def _trace_autoload(self):
            pass

    return _Module


def _dispose(module) -> None:
    try:
        module.cleanup()
    finally:
        atexit.unregister(module.cleanup)
        atexit.unregister(module.donothing)


class Probe(MapReader):
    """The attached probe.  Read it with activity()/stats(); close() detaches."""

    hook: str
    hook_notes: List[str]
    header_source: str
    startup_ms: float

    @classmethod
    def attach(cls, map_size: int = 65536, hook: str = "auto", log=None,
               cache_dir: Optional[str] = None, selftest: bool = False,
               pin_dir: Optional[str] = None) -> "Probe":
        """Compile and attach the probe; ProbeUnavailable(reason) if impossible.

        map_size bounds the activity map; hook is "auto" or one of HOOKS;
        cache_dir is where adapted header trees are kept (default:
        kheaders.default_cache_dir()); selftest (for tests) makes the
        tracepoint hook check the BTF-offset readers of the other hooks.

        pin_dir (a directory on bpffs, mounted at /sys/fs/bpf if needed) makes
        the maps persistent: they are pinned as pin_dir/activity and
        pin_dir/counters, or, if pinned there already, the existing maps are
        reused with their contents (a pinned activity map of another size is
        reused at its own size, with a warning).  The directory is locked
        (flock) while attached, so two trackers never feed the same maps.
        close(keep_pins=True) leaves the pins for the next attach.
        """
        log = log or _log
        t0 = time.monotonic()
        if not isinstance(map_size, int) or not 1 <= map_size <= MAX_MAP_SIZE:
            raise UsageError("BPF map size must be 1..%d, not %r" % (MAX_MAP_SIZE, map_size))
        if hook != "auto" and hook not in HOOKS:
            plan_hooks(hook, {})  # raises the UsageError
        if pin_dir is not None:
            pin_dir = check_pin_dir(pin_dir)
        if os.geteuid() != 0:
            raise ProbeUnavailable("loading BPF needs root")
        pins = _PinSession.open(pin_dir, map_size, log) if pin_dir is not None else None
        try:
            self = cls._load(map_size if pins is None else pins.map_size, hook, log,
                             cache_dir, selftest, pins)
        except BaseException:
            if pins is not None:
                pins.abort()
            raise
        self._pin_session = pins
        self.pin_dir = pins.directory if pins else None
        self.pins_reused = tuple(pins.reused) if pins else ()
        self.pin_notes = list(pins.notes) if pins else []
        self.startup_ms = (time.monotonic() - t0) * 1000.0
        log.info("BPF probe on %s (%s); headers: %s; %.0f ms",
                 self.hook, "; ".join(self.hook_notes) or "first choice",
                 self.header_source, self.startup_ms)
        if pins is not None:
            log.info("BPF maps pinned in %s (%s)", pins.directory, pins.describe())
        return self

    @classmethod
    def _load(cls, map_size: int, hook: str, log, cache_dir: Optional[str], selftest: bool,
              pins: "Optional[_PinSession]") -> "Probe":
        """Compile, load and attach: the body of attach() once inputs are checked."""
        try:
            Module = _module_class()
        except ImportError:
            raise ProbeUnavailable("bcc Python module not found (install python3-bpfcc)") from None

        ensure_tracefs(log)
        need_btf = selftest or hook in ("auto", "fentry", "raw_tracepoint", "kprobe")
        feats = detect_features(need_btf, cache_dir)
        candidates, notes = plan_hooks(hook, unavailable_reasons(feats))
        destroy = bool(feats.destroy_fields and "sock_cookie" in feats.destroy_fields)
        if not destroy:
            notes.append("no tcp:tcp_destroy_sock with sock_cookie: entries of closed "
                         "sockets stay until evicted")
        if selftest and not ({"skbaddr", "skaddr"} <= (feats.tcp_probe_fields or set())
                             and feats.btf_offsets):
            raise ProbeUnavailable("selftest needs tcp_probe skbaddr/skaddr and kernel BTF")
        try:
            tree = kheaders.find_headers(cache_dir=cache_dir)
        except (kheaders.HeadersNotFound, OSError) as e:
            raise ProbeUnavailable(_one_line(e)) from None

        cflags = build_cflags(map_size, candidates, feats.btf_offsets, destroy, selftest)
        if pins is not None:
            cflags += pins.cflags()
        diag: List[str] = []
        try:
            with _env("BCC_KERNEL_SOURCE", tree.env), _captured_stderr(diag):
                module = Module(src_file=bpf_source().encode(), cflags=cflags)
        except Exception as e:
            for d in diag:
                log.debug("bcc: %s", d)
            detail = _first_error(diag) or _one_line(e)
            raise ProbeUnavailable("BPF compile failed with headers %s: %s"
                                   % (tree.source, detail)) from None
        for d in diag:
            log.debug("bcc compile: %s", d)

        try:
            if destroy:
                module.attach_tracepoint(tp=b"tcp:tcp_destroy_sock", fn_name=b"on_destroy")

            def try_attach(h: str) -> None:
                out: List[str] = []
                try:
                    with _captured_stderr(out):
                        _attach_hook(module, h)
                finally:
                    for d in out:
                        log.debug("bcc %s: %s", h, d)

            chosen, notes = attach_first(candidates, try_attach, notes, log)
            self = cls(module[b"activity"].get_fd(), module[b"counters"].get_fd())
        except ProbeUnavailable:
            _dispose(module)
            raise
        except Exception as e:  # bcc's bare Exception, OSError from map info
            _dispose(module)
            raise ProbeUnavailable("attaching BPF failed: %s" % _one_line(e)) from None
        except BaseException:
            _dispose(module)
            raise
        self._module = module
        self._suspended = False
        self._pins: List[str] = []
        self.hook = chosen
        self.hook_notes = notes
        self.header_source = tree.source
        return self

    def describe(self) -> str:
        """One line for humans: the hook, and why others were not used."""
        what = {"fentry": "fentry %s" % RCV_FUNC, "raw_tracepoint": "raw tracepoint tcp_probe",
                "kprobe": "kprobe %s" % RCV_FUNC, "tracepoint": "tracepoint tcp:tcp_probe"}[self.hook]
        return what + (" (%s)" % "; ".join(self.hook_notes) if self.hook_notes else "")

    def describe_pins(self) -> Optional[str]:
        """"DIR (reused activity and counters)" / "DIR (new maps)"; None if not pinned."""
        pins = getattr(self, "_pin_session", None)
        return None if pins is None else "%s (%s)" % (pins.directory, pins.describe())

    @property
    def needs_cookie_priming(self) -> bool:
        """True if the hook only sees sockets whose cookie was asked for already."""
        return self.hook in LAZY_COOKIE_HOOKS

    def suspend(self) -> None:
        """Detach the receive hook (maps and the destroy hook stay); resume() re-attaches it.

        For measuring the probe's cost with and without it in one process
        (bench/bench_probe_tools.py), without compiling again.
        """
        if self._module is None:
            raise ValueError("probe is closed")
        if not self._suspended:
            _detach_hook(self._module, self.hook)
            self._suspended = True

    def resume(self) -> None:
        if self._module is None:
            raise ValueError("probe is closed")
        if self._suspended:
            _attach_hook(self._module, self.hook)
            self._suspended = False

    def selftest_counts(self) -> Tuple[int, int]:
        """(agreeing, disagreeing) BTF-offset reads, when attached with selftest."""
        c = self.counters()
        return c["selftest_ok"], c["selftest_bad"]

    def pin(self, directory: str) -> None:
        """Pin both maps as DIR/activity and DIR/counters (DIR on bpffs).

        close() removes the pins: once the programs are detached the maps are
        no longer updated.
        """
        _require_bpffs(directory)
        os.makedirs(directory, exist_ok=True)
        lib = libbpf()
        for name, fd in zip(PIN_NAMES, (self.activity_fd, self.counters_fd)):
            path = os.path.join(directory, name)
            try:
                _check(lib.bpf_obj_pin(fd, os.fsencode(path)), "pin %s" % path)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    raise ProbeUnavailable("%s is already pinned (another tcpidle?)" % path) from None
                raise ProbeUnavailable(_one_line(e)) from None
            self._pins.append(path)

    @classmethod
    def open_pinned(cls, directory: str) -> PinnedMap:
        return PinnedMap.open(directory)

    def unpin(self) -> None:
        """Remove the pins pin() made (the maps live on while attached)."""
        for path in getattr(self, "_pins", []):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._pins = []

    def close(self, keep_pins: bool = False) -> None:
        """Detach the programs; unpin (unless keep_pins) and free the maps.

        With keep_pins the maps outlive this process in bpffs, holding what
        was recorded until now: the next attach(pin_dir=...) carries on with
        them, and PinnedMap can still read them.
        """
        if not keep_pins:
            self.unpin()
        module = getattr(self, "_module", None)
        if module is not None:
            self._module = None
            _dispose(module)
        super().close()
        pins = getattr(self, "_pin_session", None)
        if pins is not None:
            self._pin_session = None
            pins.release(remove=not keep_pins)

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _attach_hook(module, hook: str) -> None:
    if hook == "fentry":
        # load (BPF_PROG_TYPE_TRACING, target found by name in vmlinux BTF)
        # and attach through a BPF trampoline
        module.attach_kfunc(fn_name=("kfunc__" + RCV_FUNC).encode())
    elif hook == "raw_tracepoint":
        # BPF_PROG_TYPE_RAW_TRACEPOINT via BPF_RAW_TRACEPOINT_OPEN: called
        # with the tracepoint's arguments, before any perf record is built
        module.attach_raw_tracepoint(tp=b"tcp_probe", fn_name=b"on_tcp_probe_raw")
    elif hook == "kprobe":
        module.attach_kprobe(event=RCV_FUNC.encode(), fn_name=b"on_rcv_kprobe")
    elif hook == "tracepoint":
        module.attach_tracepoint(tp=b"tcp:tcp_probe", fn_name=b"on_tcp_probe")
    else:
        raise ValueError(hook)


def _detach_hook(module, hook: str) -> None:
    if hook == "fentry":
        module.detach_kfunc(fn_name=("kfunc__" + RCV_FUNC).encode())
    elif hook == "raw_tracepoint":
        module.detach_raw_tracepoint(b"tcp_probe")
    elif hook == "kprobe":
        module.detach_kprobe(event=RCV_FUNC.encode())
    elif hook == "tracepoint":
        module.detach_tracepoint(b"tcp:tcp_probe")
    else:
        raise ValueError(hook)


def _first_error(diag: Sequence[str]) -> Optional[str]:
    """The first clang "file:line:col: error: ..." line of bcc's output."""
    for text in diag:
        for line in text.splitlines():
            if " error: " in line or line.startswith("error: "):
                return " ".join(line.split())
    return None
