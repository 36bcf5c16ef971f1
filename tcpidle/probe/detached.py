"""The tracker's probe, loaded by a short-lived process and pinned: it outlives its loader.

Owns one question: "is the probe pinned in this directory the one this
tracker wants, and if not, who loads it?"

Why: bcc compiles with LLVM inside the process that calls it, and keeps the
compiler's memory (~130 MB) for the life of that process.  A tracker that
compiles itself holds ~155 MB resident for nothing.  So the tracker starts
`python -m tcpidle.probe.detached` (the loader, the only process that
imports bcc), which compiles, loads and attaches as `Probe.attach` always
did, then pins the receive hook's BPF link next to the maps and exits.  The
tracker opens only the pins (ctypes and libbpf; no bcc, no LLVM).

Why a pinned link keeps recording: tp_btf and raw tracepoints are attached
with BPF_RAW_TRACEPOINT_OPEN, which returns a BPF link (a bpf_link since
Linux 5.7: bpf_raw_tracepoint_open() makes a bpf_raw_tp_link for raw and
tp_btf programs alike, checked in 5.10's kernel/bpf/syscall.c), and a link,
like a map, can be pinned in bpffs (BPF_OBJ_PIN takes maps, programs and
links, kernel/bpf/inode.c, 5.7 on).  The program stays attached as long as
anything holds the link: here its pin.  So the probe records while no
tracker runs (between a stop and a restart, the history has no gap), and
`tcpidle track --cleanup` unpins the link, which detaches it.

Both paths of the probe are pinned so: per-socket storage (tp_btf, Linux
5.11 on) is one link, the receive hook's; the LRU map (Linux 5.10, or a
raw_tracepoint hook asked for) is two, the receive hook's and the destroy
hook's, which deletes the entries of dying sockets from the tcp_destroy_sock
raw tracepoint (bpf/tcpidle.bpf.c, on_destroy_raw).  With the LRU map the
probe keeps recording while no tracker runs only for sockets that have a
cookie already (a tracker's dump numbered them; on 5.10 tp_btf cannot call
bpf_get_socket_cookie).

Which probe is pinned: beside the links, a one-entry array map (META_PIN)
holds a JSON record of the loader: the tag of the request (sha256 of the C
source, this module's format, the kernel and the map size, hook and
selection asked for), the hook and its notes, where it records (storage or
LRU), whether its hook needs the cookies primed, its destroy hook.  bpffs
holds BPF objects only, not files, hence a map.  A tracker whose request has
the same tag reuses the pinned probe (no compile at all); another tag makes
the loader load a new one into the same maps and pin it in place of the old:
the new program is attached before the old pin goes, so no segment is missed
meanwhile.

Where this cannot work the tracker loads the probe itself, as before, and
says why in -v: no pin directory; a kprobe or classic tracepoint hook asked
for or chosen, or the classic tcp:tcp_destroy_sock tracepoint as the destroy
hook (no BTF offsets to read the cookie in the raw one): perf events, not
links (BPF_LINK_CREATE for perf events came only in 5.15, and kernels that
have it have tp_btf); a link the kernel refuses to pin (before 5.7).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from ..model import DEFAULT_MAP_SIZE
from . import PinError, ProbeUnavailable, one_line
from .bpfsys import bpf
from .maps import (DESTROY_LINK_PIN, LINK_PIN, META_PIN, PIN_NAMES, STORAGE_PIN, MapReader,
                   layout_problem, libbpf, map_info, obj_get, read_counters)
from .pins import check_pin, check_pin_dir, lock_pin_dir, unlock_pin_dir

_log = logging.getLogger("tcpidle.probe")

# Bump when what the loader builds changes in a way the C source does not show.
# 2: the LRU path too (record fields storage, lazy_cookie, destroy).
FORMAT = 2
# The meta map: BPF_MAP_TYPE_ARRAY, int key, one value of META_SIZE bytes (JSON, NUL-padded).
BPF_MAP_TYPE_ARRAY = 2
META_SIZE = 1024
BPF_MAP_CREATE = 0
BPF_PROG_GET_FD_BY_ID = 13
LOADER_TIMEOUT_S = 300.0  # a compile takes ~0.5 s, much longer on a loaded host


def request_tag(map_size: int, hook: str, selection: Sequence[str]) -> str:
    """What a pinned probe must have been loaded for, to be reused (pure but for the files read)."""
    from .loader import bpf_source

    h = hashlib.sha256()
    with open(bpf_source(), "rb") as f:
        h.update(f.read())
    u = os.uname()
    h.update(json.dumps([FORMAT, u.release, u.version, u.machine, map_size, hook,
                         list(selection)]).encode())
    return h.hexdigest()[:32]


def detachable(pin_dir: Optional[str], hook: str) -> Optional[str]:
    """None if the tracker's probe can be loaded detached; else why not (one line).

    Only what the request alone shows: whether the kernel's choice of hooks
    can be pinned shows once they are attached (the loader says so then).
    """
    if pin_dir is None:
        return "no pin directory"
    if hook in ("kprobe", "tracepoint"):
        return "hook %s is not a BPF link" % hook
    return None


# -- bpf(2) beyond libbpf's common calls ------------------------------------------------


def _obj_info(fd: int, size: int, setup: Optional[Dict[int, int]] = None) -> bytes:
    """BPF_OBJ_GET_INFO_BY_FD into a zeroed buffer (u32/u64 fields preset by offset)."""
    buf = ctypes.create_string_buffer(size)
    for off, val in (setup or {}).items():  # 8-aligned offsets hold u64 fields, others u32
        width = 8 if off % 8 == 0 else 4
        buf[off:off + width] = val.to_bytes(width, sys.byteorder)
    n = ctypes.c_uint32(size)
    ret = libbpf().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(n))
    if ret < 0:
        err = ctypes.get_errno() or -ret
        raise OSError(err, "BPF_OBJ_GET_INFO_BY_FD: %s" % os.strerror(err))
    return buf.raw


def link_prog_id(link_fd: int) -> int:
    """struct bpf_link_info: type, id, prog_id (u32 each)."""
    raw = _obj_info(link_fd, 64)
    return int.from_bytes(raw[8:12], sys.byteorder)


def prog_map_ids(prog_id: int) -> List[int]:
    """The ids of the maps a loaded program uses (struct bpf_prog_info:
    nr_map_ids u32 at 52, map_ids u64 pointer at 56)."""
    fd = bpf(BPF_PROG_GET_FD_BY_ID, prog_id.to_bytes(4, sys.byteorder) + bytes(8))
    try:
        ids = (ctypes.c_uint32 * 16)()
        raw = _obj_info(fd, 88, {52: 16, 56: ctypes.addressof(ids)})
        n = min(int.from_bytes(raw[52:56], sys.byteorder), 16)
        return list(ids[:n])
    finally:
        os.close(fd)


def _pin(fd: int, path: str) -> None:
    if libbpf().bpf_obj_pin(fd, os.fsencode(path)) < 0:
        err = ctypes.get_errno() or errno.EINVAL
        raise OSError(err, "BPF_OBJ_PIN %s: %s" % (path, os.strerror(err)))


def _replace_pin(fd: int, path: str) -> None:
    """Pin fd at path in place of whatever tcpidle pinned there before."""
    if check_pin(path):
        os.unlink(path)
    _pin(fd, path)


def write_meta(path: str, record: Dict) -> None:
    """A new one-entry array holding record (JSON), pinned at path in place of the old one."""
    data = json.dumps(record, sort_keys=True).encode()
    if len(data) > META_SIZE:
        record = dict(record, notes=[])
        data = json.dumps(record, sort_keys=True).encode()
    attr = (BPF_MAP_TYPE_ARRAY.to_bytes(4, sys.byteorder) + (4).to_bytes(4, sys.byteorder)
            + META_SIZE.to_bytes(4, sys.byteorder) + (1).to_bytes(4, sys.byteorder)
            + bytes(12) + b"tcpidle_probe".ljust(16, b"\0"))
    fd = bpf(BPF_MAP_CREATE, attr)
    try:
        key = ctypes.c_uint32(0)
        value = ctypes.create_string_buffer(data.ljust(META_SIZE, b"\0"), META_SIZE)
        lib = libbpf()
        lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_uint64]
        if lib.bpf_map_update_elem(fd, ctypes.byref(key), value, 0) < 0:
            err = ctypes.get_errno() or errno.EINVAL
            raise OSError(err, "meta map update: %s" % os.strerror(err))
        _replace_pin(fd, path)
    finally:
        os.close(fd)


def read_meta(path: str) -> Optional[Dict]:
    """The loader's record pinned at path; None if none, or not ours."""
    if not check_pin(path):
        return None
    fd = obj_get(path)
    try:
        info = map_info(fd)
        if (info.type, info.key_size, info.value_size, info.max_entries) != (
                BPF_MAP_TYPE_ARRAY, 4, META_SIZE, 1):
            return None
        key = ctypes.c_uint32(0)
        value = ctypes.create_string_buffer(META_SIZE)
        if libbpf().bpf_map_lookup_elem(fd, ctypes.byref(key), value) < 0:
            return None
        try:
            record = json.loads(value.raw.rstrip(b"\0").decode())
        except ValueError:
            return None
        return record if isinstance(record, dict) else None
    finally:
        os.close(fd)


# -- the tracker's side -----------------------------------------------------------------

ACTIVITY_PIN, COUNTERS_PIN = PIN_NAMES


def _storage_of(meta: Dict) -> str:
    """"sk_storage" or "lru": where the pinned probe records (records of
    format 1, before the LRU path was detached, were all storage)."""
    return "lru" if meta.get("storage") == "lru" else "sk_storage"


def pinned_names(meta: Dict) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(maps, links) a pinned probe of this record is made of (pure).

    Per-socket storage: the storage and the counters, the receive hook's
    link.  The LRU map: the activity map and the counters, the receive
    hook's link and, where there is one, the destroy hook's.
    """
    if _storage_of(meta) == "sk_storage":
        return (STORAGE_PIN, COUNTERS_PIN), (LINK_PIN,)
    links = (LINK_PIN, DESTROY_LINK_PIN) if meta.get("destroy") else (LINK_PIN,)
    return (ACTIVITY_PIN, COUNTERS_PIN), links


class DetachedProbe:
    """The pinned probe, as the tracker holds it: fds on its maps and links.

    Offers what the tracker uses of a `Probe` (hook, storage, describe,
    counters, stats, pin_problems, close; storage_fd/storage_id where it
    records into per-socket storage, activity/lookup where it records into
    the LRU map).  close() leaves everything pinned and attached: the probe
    goes on recording for the next tracker.
    """

    pin_notes: List[str] = []

    def __init__(self, directory: str, lock: Tuple[int, str], meta: Dict, fds: Dict[str, int],
                 ids: Dict[str, int], reused: bool):
        self.pin_dir = directory
        self._lock = lock
        self.meta = meta
        self._fds = fds
        self._ids = ids
        self.reused = reused
        self.hook = meta.get("hook", "tp_btf")
        self.hook_notes = list(meta.get("notes", []))
        self.header_source = meta.get("headers", "?")
        self.storage = _storage_of(meta)
        # the hook reads the cookie from the socket (tp_btf before 5.12, the
        # raw tracepoint): the tracker's dumps number its sockets
        self.needs_cookie_priming = bool(meta.get("lazy_cookie", False))
        self.destroy_hook = meta.get("destroy")
        self.storage_fd = fds.get(STORAGE_PIN)
        self.storage_id = ids.get(STORAGE_PIN)
        self.reader = (MapReader(fds[ACTIVITY_PIN], fds[COUNTERS_PIN])
                       if self.storage == "lru" else None)
        self.loader_pins: Optional[str] = None  # the loader's Probe.describe_pins()

    @classmethod
    def open(cls, directory: str, lock: Tuple[int, str], tag: str,
             reused: bool) -> Tuple[Optional["DetachedProbe"], str]:
        """(the pinned probe, "") if it matches tag and is whole; else (None, why not)."""
        meta = read_meta(os.path.join(directory, META_PIN))
        if meta is None:
            return None, "no probe pinned"
        if meta.get("tag") != tag:
            return None, ("the pinned probe was loaded for another version, kernel, size or "
                          "selection (tag %s, want %s)" % (meta.get("tag"), tag))
        maps, links = pinned_names(meta)
        fds: Dict[str, int] = {}
        try:
            ids = {}
            used = {}
            for name in links:
                path = os.path.join(directory, name)
                if not check_pin(path):
                    return None, "%s is missing" % path
                fds[name] = obj_get(path, read_only=False)
                ids[name] = link_prog_id(fds[name])
                used[name] = prog_map_ids(ids[name])
            for name in maps:
                path = os.path.join(directory, name)
                if not check_pin(path):
                    raise ProbeUnavailable("%s is missing" % path)
                fds[name] = obj_get(path)
                info = map_info(fds[name])
                why = layout_problem(name, info.type, info.key_size, info.value_size,
                                     info.max_entries, info.map_flags)
                if why:
                    raise ProbeUnavailable("%s is %s" % (path, why))
                # every map the receive program's; the destroy program
                # deletes from the activity map
                if info.id not in used[LINK_PIN] or (
                        name == ACTIVITY_PIN and DESTROY_LINK_PIN in used
                        and info.id not in used[DESTROY_LINK_PIN]):
                    raise ProbeUnavailable("%s is not the map the pinned program records "
                                           "into" % path)
                ids[name] = info.id
            probe = cls(directory, lock, meta, fds, ids, reused)
        except (OSError, ProbeUnavailable) as e:
            for fd in fds.values():
                os.close(fd)
            if isinstance(e, PinError):
                raise
            return None, one_line(e)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return probe, ""

    def describe(self) -> str:
        what = {"tp_btf": "tp_btf tcp_probe",
                "raw_tracepoint": "raw tracepoint tcp_probe"}.get(self.hook, self.hook)
        return what + (" (%s)" % "; ".join(self.hook_notes) if self.hook_notes else "")

    def describe_pins(self) -> str:
        """"DIR (new maps); ..." as Probe says it, and where the probe comes from."""
        maps = self.loader_pins or "%s (reused %s and counters)" % (
            self.pin_dir, "storage" if self.storage == "sk_storage" else "activity")
        return "%s; the probe pinned beside them (%s, loaded by pid %s)" % (
            maps, "reused" if self.reused else "new", self.meta.get("pid", "?"))

    def counters(self) -> Dict[str, int]:
        return read_counters(self._fds[COUNTERS_PIN])

    # -- the LRU map (where the probe records into it)

    def activity(self):
        """A snapshot of the activity map, keyed by socket cookie ({} with storage)."""
        return self.reader.activity() if self.reader is not None else {}

    def lookup(self, cookies: Sequence[int]):
        return self.reader.lookup(cookies) if self.reader is not None else {}

    @property
    def max_entries(self) -> int:
        return self.reader.max_entries if self.reader is not None else 0

    def stats(self) -> Dict[str, int]:
        if self.reader is not None:
            return self.reader.stats()
        c = self.counters()
        return {"entries": 0, "inserts": c["inserts"], "deletes": 0, "evicted": 0,
                "failed": c["failed"], "no_cookie": 0, "max_entries": 0}

    def pin_problems(self) -> List[str]:
        """What became of the pins: [] while each is there and holds what we opened."""
        out = []
        maps, links = pinned_names(self.meta)
        for name in maps + links:
            path = os.path.join(self.pin_dir, name)
            is_link = name in links
            try:
                if not check_pin(path):
                    out.append("%s vanished (bpffs unmounted, or the pin removed)" % path)
                    continue
                fd = obj_get(path, read_only=not is_link)
                try:
                    got = link_prog_id(fd) if is_link else map_info(fd).id
                finally:
                    os.close(fd)
            except (OSError, PinError) as e:
                out.append("%s: %s" % (path, getattr(e, "strerror", None) or one_line(e)))
                continue
            if got != self._ids[name]:
                out.append("%s now holds another %s (id %d, not %d)" % (
                    path, "program" if is_link else "map", got, self._ids[name]))
        return out

    def close(self, keep_pins: bool = True) -> None:
        """Let go of the fds and the lock; the pinned probe records on (keep_pins is
        accepted for Probe's signature: a detached probe is removed by cleanup only)."""
        if self.reader is not None:
            self.reader.close()  # not its fds: ours, closed below
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        lock, self._lock = self._lock, (-1, "")
        unlock_pin_dir(lock)


def tracker_probe(pin_dir: Optional[str], map_size: int = DEFAULT_MAP_SIZE, hook: str = "auto",
                  cache_dir: Optional[str] = None, selector=None, log=None):
    """The tracker's probe: a DetachedProbe where possible, else an in-process `Probe`.

    ProbeUnavailable (PinError) as Probe.attach raises them.
    """
    from .features import selection_cflags
    from .loader import Probe

    log = log or _log
    why_not = detachable(pin_dir, hook)
    if why_not is None and os.geteuid() != 0:
        raise ProbeUnavailable("loading BPF needs root")
    if why_not is not None:
        if pin_dir is None:
            return Probe.attach(map_size=map_size, hook=hook, cache_dir=cache_dir,
                                sk_storage=True, selector=selector, log=log)
        log.info("BPF probe loaded in this process (%s): bcc's compiler stays in its memory",
                 why_not)
        probe = Probe.attach(map_size=map_size, hook=hook, cache_dir=cache_dir, pin_dir=pin_dir,
                             sk_storage=True, selector=selector, log=log)
        _retire_or_close(probe, log)
        return probe
    pin_dir = check_pin_dir(pin_dir)
    selection = selection_cflags(selector)
    tag = request_tag(map_size, hook, selection)
    lock = lock_pin_dir(pin_dir, log)
    handed = False
    try:
        probe, why = DetachedProbe.open(pin_dir, lock, tag, reused=True)
        if probe is not None:
            handed = True
            log.info("BPF probe: reusing the one pinned in %s (loaded by pid %s, %s ago; no "
                     "compile)", pin_dir, probe.meta.get("pid", "?"),
                     _ago(probe.meta.get("loaded")))
            return probe
        log.info("BPF probe: %s in %s: loading one in a helper process", why, pin_dir)
        result = run_loader(pin_dir, map_size, hook, cache_dir, selection, tag, log)
        if result.get("inprocess"):
            log.info("BPF probe loaded in this process (%s): bcc's compiler stays in its memory",
                     result["inprocess"])
            handed = True
            probe = Probe.attach(map_size=map_size, hook=hook, cache_dir=cache_dir,
                                 pin_dir=pin_dir, sk_storage=True, selection=selection, log=log,
                                 held_lock=lock)
            _retire_or_close(probe, log)
            return probe
        probe, why = DetachedProbe.open(pin_dir, lock, tag, reused=False)
        if probe is None:
            raise ProbeUnavailable("the probe the loader pinned in %s cannot be used: %s"
                                   % (pin_dir, why))
        probe.loader_pins = result.get("pins")
        handed = True
        return probe
    finally:
        if not handed:
            unlock_pin_dir(lock)


def retire_pinned_probe(probe, log) -> None:
    """Unpin the detached probe an earlier tracker left in the pin directory of
    `probe` (attached in this process, the directory locked by it): its links
    (unpinned and unused, the kernel detaches and frees them) and its record;
    and its storage too when `probe` records into the LRU map, so that
    `audit`/`kill` read the live map, not the one nothing writes to any more.

    Called once `probe` is attached: the old one records until the new one
    does (a few segments counted by both, no gap; a failed attach leaves the
    old one recording)."""
    pin_dir = probe.pin_dir
    names = [LINK_PIN, DESTROY_LINK_PIN, META_PIN]
    if probe.storage_fd is None:
        names.append(STORAGE_PIN)
    gone = []
    for name in names:
        path = os.path.join(pin_dir, name)
        if check_pin(path):
            os.unlink(path)
            gone.append(name)
    if LINK_PIN in gone:
        log.info("BPF probe: the one pinned in %s is detached (%s); this tracker's own records "
                 "instead", pin_dir, "its storage unpinned too" if STORAGE_PIN in gone
                 else "its storage kept")


def _retire_or_close(probe, log) -> None:
    try:
        retire_pinned_probe(probe, log)
    except BaseException:
        probe.close(keep_pins=True)
        raise


def _ago(when) -> str:
    try:
        s = max(0.0, time.time() - float(when))
    except (TypeError, ValueError):
        return "?"
    return "%.0f s" % s if s < 120 else "%.0f min" % (s / 60) if s < 7200 else "%.1f h" % (s / 3600)


class _Collect(logging.Handler):
    """The loader's log records, handed back to the tracker to log as its own."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: List[Tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))


def run_loader(pin_dir: str, map_size: int, hook: str, cache_dir: Optional[str],
               selection: Sequence[str], tag: str, log) -> Dict:
    """Start the loader (`python -m tcpidle.probe.detached`) and wait for it; its result.

    {"hook": ..., ...} when it pinned a probe; {"inprocess": why} when it could
    not; ProbeUnavailable (PinError) as Probe.attach would have raised.
    """
    import select
    import tempfile

    rfd, wfd = os.pipe()  # the result comes back on a pipe of its own (stdout is not ours)
    request = {"pin_dir": pin_dir, "map_size": map_size, "hook": hook, "cache_dir": cache_dir,
               "selection": list(selection), "tag": tag, "result_fd": wfd}
    chunks: List[bytes] = []
    with tempfile.TemporaryFile() as errf:
        try:
            try:
                proc = subprocess.Popen([sys.executable, "-m", "tcpidle.probe.detached",
                                         json.dumps(request)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=errf, pass_fds=(wfd,))
            finally:
                os.close(wfd)
        except OSError as e:
            os.close(rfd)
            raise ProbeUnavailable("cannot start the probe's loader: %s" % one_line(e)) from None
        try:
            deadline = time.monotonic() + LOADER_TIMEOUT_S
            while True:  # read as it comes: a verifier log can be larger than a pipe
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([rfd], [], [], left)[0]:
                    proc.kill()
                    proc.wait()
                    raise ProbeUnavailable("the probe's loader did not finish in %.0f s"
                                           % LOADER_TIMEOUT_S)
                chunk = os.read(rfd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
            proc.wait()
        finally:
            os.close(rfd)
        try:
            result = json.loads(b"".join(chunks).decode())
        except ValueError:
            errf.seek(0)
            err = " ".join(errf.read().decode(errors="replace").split()[-30:])
            raise ProbeUnavailable("the probe's loader failed (exit %s): %s"
                                   % (proc.returncode, err or "no result")) from None
    for level, text in result.get("log", []):
        log.log(level, "%s", text)
    if "error" in result:
        raise (PinError if result.get("pin_error") else ProbeUnavailable)(result["error"])
    return result


# -- the loader's side ------------------------------------------------------------------


def load_and_pin(request: Dict, log) -> Dict:
    """In the loader: compile, attach and pin as requested; the result for the tracker."""
    from .loader import Probe

    pin_dir = request["pin_dir"]
    probe = Probe.attach(map_size=request["map_size"], hook=request["hook"],
                         cache_dir=request["cache_dir"], pin_dir=pin_dir, sk_storage=True,
                         selection=request["selection"], log=log, held_lock=(-1, ""))
    try:
        links, why = probe.pinnable_links()
        if why:
            return {"inprocess": "the kernel took %s, which cannot be pinned here: %s" % (
                probe.describe(), why)}
        try:
            # the receive hook's link first, then the destroy hook's (LRU)
            for name in (LINK_PIN, DESTROY_LINK_PIN):
                if name in links:
                    _replace_pin(links[name], os.path.join(pin_dir, name))
        except OSError as e:
            return {"inprocess": "the kernel refused to pin the probe's BPF link (%s)"
                    % one_line(e)}
        stale = os.path.join(pin_dir, DESTROY_LINK_PIN)
        if DESTROY_LINK_PIN not in links and check_pin(stale):
            os.unlink(stale)  # an earlier LRU probe's destroy hook: it would delete on
        record = {"tag": request["tag"], "hook": probe.hook, "notes": probe.hook_notes,
                  "headers": probe.header_source, "pid": os.getpid(), "loaded": time.time(),
                  "startup_ms": round(probe.startup_ms), "storage": probe.storage,
                  "lazy_cookie": probe.needs_cookie_priming, "destroy": probe.destroy_hook}
        write_meta(os.path.join(pin_dir, META_PIN), record)
        return dict(record, pins=probe.describe_pins())
    finally:
        # Our fds go; the pinned link keeps the program attached, the pins the maps.
        probe.close(keep_pins=True)


def main() -> int:
    """The loader process: the JSON request as its argument, the JSON result
    written to the request's result_fd (a pipe from the tracker)."""
    collect = _Collect()
    root = logging.getLogger("tcpidle")  # tcpidle.probe's records reach it too
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    root.propagate = False  # nothing on our stderr: the tracker logs them
    log = logging.getLogger("tcpidle.probe")
    request = json.loads(sys.argv[1])
    try:
        result = load_and_pin(request, log)
    except ProbeUnavailable as e:
        result = {"error": str(e), "pin_error": isinstance(e, PinError)}
    except Exception as e:  # noqa: BLE001 - said to the tracker as one line, never a traceback
        result = {"error": "the probe's loader: %s" % one_line(e)}
    result["log"] = collect.records
    with os.fdopen(request["result_fd"], "w") as out:
        out.write(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
