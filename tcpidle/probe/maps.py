"""The probe's maps: their layout, and reading them through libbpf.

Owns the question "what does the map say?", for maps held by this process
(a `Probe`'s) and for maps pinned by another (`pins.PinnedMap`):

- the layout, in step with bpf/tcpidle.bpf.c: the activity map (an LRU hash,
  u64 socket cookie -> struct tcpidle_activity) and the per-CPU counters;
- libbpf's functions through ctypes (`libbpf()`): the system's libbpf, else
  the copy bcc's own library carries -- loading a shared library, not the
  bcc Python module (loader.py is the only module that imports bcc);
- reading fast: BPF_MAP_LOOKUP_BATCH, falling back to key-by-key iteration
  on kernels without it (< 5.6); lookups of given cookies; the counters
  summed over CPUs, and the LRU evictions derived from them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from typing import Dict, List, Optional, Sequence, Tuple

from ..model import MAX_MAP_SIZE, Activity  # noqa: F401 - MAX_MAP_SIZE: a public name of tcpidle.probe
from . import ProbeUnavailable

# Indexes of the per-CPU "counters" array; keep in step with the C source.
COUNTERS = ("inserts", "deletes", "failed", "no_cookie", "selftest_ok", "selftest_bad")
# struct tcpidle_activity (see the header comment of the C source).
VALUE = struct.Struct("=5Q")
KEY_SIZE = 8
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_SK_STORAGE = 24
BPF_F_RDONLY = 1 << 3
PIN_NAMES = ("activity", "counters")
STORAGE_PIN = "storage"  # the per-socket storage, pinned where tp_btf + sk_storage records
# The probe itself, pinned beside its maps where it outlives its loader
# (detached.py): the BPF link of the receive hook, on the LRU path also that
# of the destroy hook (the tcp_destroy_sock raw tracepoint), and a one-entry
# array saying which program it is (the tag of the request it was loaded for).
LINK_PIN = "link"
DESTROY_LINK_PIN = "destroy_link"
META_PIN = "probe"
# What each map must be: name -> (map type, key size, value size, max_entries
# or None for any in 1..MAX_MAP_SIZE, map flags).  bcc creates both with no
# flags; a flag such as BPF_F_NO_COMMON_LRU or BPF_F_RDONLY_PROG would change
# how the programs can use the map, BPF_F_WRONLY whether it can be read.
MAP_SPECS = {
    "activity": (BPF_MAP_TYPE_LRU_HASH, KEY_SIZE, VALUE.size, None, 0),
    "counters": (BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, len(COUNTERS), 0),
    # per-socket storage (STORAGE_PIN, not in PIN_NAMES: pinned only where
    # tp_btf + sk_storage records): int key (the kernel's convention),
    # max_entries 0, BPF_F_NO_PREALLOC (required of this map type)
    "storage": (BPF_MAP_TYPE_SK_STORAGE, 4, VALUE.size, 0, 1),
}


def layout_problem(name: str, map_type: int, key_size: int, value_size: int,
                   max_entries: int, map_flags: int = 0) -> Optional[str]:
    """Why a map of this shape is not tcpidle's `name` map; None if it is (pure).

    Checked before any read: the readers size their buffers from the
    layout, and the kernel writes value_size bytes per CPU into them (a
    counters map of 4096-byte values would overrun the buffer).
    """
    want_type, want_key, want_value, want_entries, want_flags = MAP_SPECS[name]
    if ((map_type, key_size, value_size, map_flags) == (want_type, want_key, want_value, want_flags)
            and (max_entries == want_entries if want_entries is not None
                 else 1 <= max_entries <= MAX_MAP_SIZE)):
        return None
    return ("not a tcpidle %s map (map type %d, key/value %d/%d bytes, %d entries, flags %#x; "
            "want type %d, %d/%d bytes, %s entries, flags %#x)" % (
                name, map_type, key_size, value_size, max_entries, map_flags, want_type,
                want_key, want_value, "1..%d" % MAX_MAP_SIZE if want_entries is None
                else want_entries, want_flags))


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
    """libbpf's functions: the system's libbpf.so, else the copy in bcc's libbcc.

    Debian's libbpfcc links the system libbpf; bcc built elsewhere may carry
    its own copy instead.  Either works: every call takes a file descriptor
    and makes one bpf(2) system call.
    """
    global _libbpf
    if _libbpf is not None:
        return _libbpf
    lib = None
    errors = []
    for name in (ctypes.util.find_library("bpf") or "libbpf.so.1", "libbcc.so.0"):
        try:
            candidate = ctypes.CDLL(name, use_errno=True)
            candidate.bpf_map_lookup_batch  # noqa: B018 (probe the symbol)
        except (OSError, AttributeError) as e:
            errors.append(str(e))
            continue
        lib = candidate
        break
    if lib is None:
        raise ProbeUnavailable("libbpf not found: %s" % "; ".join(errors))
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
    """Reads the probe's two maps given their file descriptors.

    Both maps' layouts are checked first (ProbeUnavailable, naming the map,
    if either is not tcpidle's).
    """

    def __init__(self, activity_fd: Optional[int], counters_fd: int, own_fds: bool = False):
        """activity_fd None: the probe records into per-socket storage and
        has no activity map (its reads are empty; the counters remain)."""
        self._lib = libbpf()
        self.activity_fd = -1 if activity_fd is None else activity_fd
        self.counters_fd = counters_fd
        self._own = own_fds
        infos = {}
        for name, fd in zip(PIN_NAMES, (activity_fd, counters_fd)):
            if fd is None:
                continue
            info = infos[name] = map_info(fd)
            problem = layout_problem(name, info.type, info.key_size, info.value_size,
                                     info.max_entries, info.map_flags)
            if problem:
                raise ProbeUnavailable("the %s map is %s" % (name, problem))
        self.max_entries = infos["activity"].max_entries if "activity" in infos else 0
        # pin name -> map id, what PinSession.problems checks
        self.map_ids = {name: info.id for name, info in infos.items()}
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
        if self.activity_fd < 0:  # no activity map (per-socket storage)
            return [], b""
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
        return read_counters(self.counters_fd, self._ncpu)

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
        if self.activity_fd < 0:
            return {}
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


def read_counters(fd: int, ncpu: Optional[int] = None) -> Dict[str, int]:
    """The per-CPU counters map at fd, summed over CPUs."""
    lib = libbpf()
    buf = (ctypes.c_uint64 * (ncpu or possible_cpus()))()
    out = {}
    for i, name in enumerate(COUNTERS):
        key = ctypes.c_uint32(i)
        _check(lib.bpf_map_lookup_elem(fd, ctypes.byref(key), buf), "counters lookup")
        out[name] = sum(buf)
    return out


def obj_get(path: str, read_only: bool = True) -> int:
    """An fd on the BPF object pinned at path (OSError on failure).

    read_only for maps (enough to read them and to name them in an INET_DIAG
    request); a BPF link must be opened read-write: the kernel refuses other
    flags for links (bpf_obj_do_get, -EINVAL).
    """
    lib = libbpf()
    raw = os.fsencode(path)
    if not read_only:
        fd = lib.bpf_obj_get_opts(raw, None) if getattr(lib, "_tcpidle_rdonly_get", False) \
            else lib.bpf_obj_get(raw)
    elif getattr(lib, "_tcpidle_rdonly_get", False):
        opts = _ObjGetOpts(ctypes.sizeof(_ObjGetOpts), BPF_F_RDONLY, 0)
        fd = lib.bpf_obj_get_opts(raw, ctypes.byref(opts))
    else:
        fd = lib.bpf_obj_get(raw)
    return _check(fd, "open pinned %s" % path)


