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

Why a pinned link keeps recording: tp_btf is attached with
BPF_RAW_TRACEPOINT_OPEN, which returns a BPF link (a bpf_link since Linux
5.7, bpf_raw_tracepoint_open() "primes" one), and a link, like a map, can be
pinned in bpffs (BPF_OBJ_PIN, 5.7).  The program stays attached as long as
anything holds the link: here its pin.  So the probe records while no
tracker runs (between a stop and a restart, the history has no gap), and
`tcpidle track --cleanup` unpins the link, which detaches it.

Which probe is pinned: beside the link, a one-entry array map (META_PIN)
holds a JSON record of the loader: the tag of the request (sha256 of the C
source, this module's format, the kernel and the map size, hook and
selection asked for), the hook and its notes.  bpffs holds BPF objects only,
not files, hence a map.  A tracker whose request has the same tag reuses
the pinned probe (no compile at all); another tag makes the loader load a
new one into the same maps and pin it in place of the old: the new program
is attached before the old pin goes, so no segment is missed meanwhile.

Where this cannot work the tracker loads the probe itself, as before, and
says why in -v: no pin directory; a kernel before 5.11 (no per-socket
storage from tp_btf, so the LRU path, whose destroy hook is a perf-event
tracepoint attachment that cannot be pinned); a hook other than tp_btf asked
for or chosen (kprobe and classic tracepoint attachments are perf events,
not links; BPF_LINK_CREATE for perf events came only in 5.15, and kernels
that have it have tp_btf); a link the kernel refuses to pin.
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
from .maps import (LINK_PIN, META_PIN, PIN_NAMES, STORAGE_PIN, layout_problem, libbpf, map_info,
                   obj_get, read_counters)
from .pins import check_pin, check_pin_dir, lock_pin_dir, unlock_pin_dir

_log = logging.getLogger("tcpidle.probe")

# Bump when what the loader builds changes in a way the C source does not show.
FORMAT = 1
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
    """None if the tracker's probe can be loaded detached; else why not (one line)."""
    from .features import release_at_least

    if pin_dir is None:
        return "no pin directory"
    if hook not in ("auto", "tp_btf"):
        return "hook %s is not a BPF link" % hook
    if not release_at_least(os.uname().release, (5, 11)):
        return ("Linux %s has no per-socket storage for tp_btf (5.11): the LRU path's destroy "
                "hook cannot be pinned" % os.uname().release)
    return None


# -- bpf(2) beyond libbpf's common calls ------------------------------------------------


def _sys_bpf(cmd: int, attr: bytes) -> int:
    from .tpbtf import TpBtfError, _syscall_bpf

    buf = ctypes.create_string_buffer(attr, len(attr))
    try:
        ret = _syscall_bpf(cmd, buf)
    except TpBtfError as e:
        raise OSError(errno.ENOSYS, str(e)) from None
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))
    return ret


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
    fd = _sys_bpf(BPF_PROG_GET_FD_BY_ID, prog_id.to_bytes(4, sys.byteorder) + bytes(8))
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
    fd = _sys_bpf(BPF_MAP_CREATE, attr)
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


class DetachedProbe:
    """The pinned probe, as the tracker holds it: fds on its storage, counters and link.

    Offers what the tracker uses of a `Probe` (storage_fd, storage_id, hook,
    describe, counters, pin_problems, close).  close() leaves everything
    pinned and attached: the probe goes on recording for the next tracker.
    """

    storage = "sk_storage"
    needs_cookie_priming = False
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
        self.storage_fd = fds[STORAGE_PIN]
        self.storage_id = ids[STORAGE_PIN]
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
        fds: Dict[str, int] = {}
        try:
            path = os.path.join(directory, LINK_PIN)
            if not check_pin(path):
                return None, "%s is missing" % path
            fds[LINK_PIN] = obj_get(path, read_only=False)
            used = prog_map_ids(link_prog_id(fds[LINK_PIN]))
            ids = {}
            for name in (STORAGE_PIN, PIN_NAMES[1]):
                path = os.path.join(directory, name)
                if not check_pin(path):
                    raise ProbeUnavailable("%s is missing" % path)
                fds[name] = obj_get(path)
                info = map_info(fds[name])
                why = layout_problem(name, info.type, info.key_size, info.value_size,
                                     info.max_entries, info.map_flags)
                if why:
                    raise ProbeUnavailable("%s is %s" % (path, why))
                if info.id not in used:
                    raise ProbeUnavailable("%s is not the map the pinned program records "
                                           "into" % path)
                ids[name] = info.id
            ids[LINK_PIN] = link_prog_id(fds[LINK_PIN])
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
        return cls(directory, lock, meta, fds, ids, reused), ""

    def describe(self) -> str:
        what = "tp_btf tcp_probe" if self.hook == "tp_btf" else self.hook
        return what + (" (%s)" % "; ".join(self.hook_notes) if self.hook_notes else "")

    def describe_pins(self) -> str:
        """"DIR (new maps); ..." as Probe says it, and where the probe comes from."""
        maps = self.loader_pins or "%s (reused storage and counters)" % self.pin_dir
        return "%s; the probe pinned beside them (%s, loaded by pid %s)" % (
            maps, "reused" if self.reused else "new", self.meta.get("pid", "?"))

    def counters(self) -> Dict[str, int]:
        return read_counters(self._fds[PIN_NAMES[1]])

    def stats(self) -> Dict[str, int]:
        c = self.counters()
        return {"entries": 0, "inserts": c["inserts"], "deletes": 0, "evicted": 0,
                "failed": c["failed"], "no_cookie": 0, "max_entries": 0}

    def pin_problems(self) -> List[str]:
        """What became of the pins: [] while each is there and holds what we opened."""
        out = []
        for name in (STORAGE_PIN, PIN_NAMES[1], LINK_PIN):
            path = os.path.join(self.pin_dir, name)
            try:
                if not check_pin(path):
                    out.append("%s vanished (bpffs unmounted, or the pin removed)" % path)
                    continue
                fd = obj_get(path, read_only=(name != LINK_PIN))
                try:
                    got = link_prog_id(fd) if name == LINK_PIN else map_info(fd).id
                finally:
                    os.close(fd)
            except (OSError, PinError) as e:
                out.append("%s: %s" % (path, getattr(e, "strerror", None) or one_line(e)))
                continue
            if got != self._ids[name]:
                out.append("%s now holds another %s (id %d, not %d)" % (
                    path, "program" if name == LINK_PIN else "map", got, self._ids[name]))
        return out

    def close(self, keep_pins: bool = True) -> None:
        """Let go of the fds and the lock; the pinned probe records on (keep_pins is
        accepted for Probe's signature: a detached probe is removed by cleanup only)."""
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
        if pin_dir is not None:
            log.info("BPF probe loaded in this process (%s): bcc's compiler stays in its memory",
                     why_not)
        return Probe.attach(map_size=map_size, hook=hook, cache_dir=cache_dir, pin_dir=pin_dir,
                            sk_storage=True, selector=selector, log=log)
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
            for name in (LINK_PIN, META_PIN):  # a probe pinned earlier would record on beside it
                path = os.path.join(pin_dir, name)
                if check_pin(path):
                    os.unlink(path)
            handed = True
            return Probe.attach(map_size=map_size, hook=hook, cache_dir=cache_dir,
                                pin_dir=pin_dir, sk_storage=True, selection=selection, log=log,
                                held_lock=lock)
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
        link = probe.link_fd
        if probe.storage_fd is None or link is None:
            return {"inprocess": "the kernel took %s%s, which cannot be pinned here" % (
                probe.describe(), "" if probe.storage_fd is not None else " with the LRU map")}
        try:
            _replace_pin(link, os.path.join(pin_dir, LINK_PIN))
        except OSError as e:
            return {"inprocess": "the kernel refused to pin the probe's BPF link (%s)"
                    % one_line(e)}
        record = {"tag": request["tag"], "hook": probe.hook, "notes": probe.hook_notes,
                  "headers": probe.header_source, "pid": os.getpid(), "loaded": time.time(),
                  "startup_ms": round(probe.startup_ms)}
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
