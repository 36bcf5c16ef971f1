"""Maps that outlive the process: bpffs, pin directories, pinned maps.

Owns the question "may this pin directory be used, and what is in it?":

- bpffs: recognised by its magic, mounted at /sys/fs/bpf when missing;
- a tracker's pin directory: maps created pinned, or reused with their
  history when a previous tracker left them -- checked before bcc uses them
  (bcc's BPF_TABLE_PINNED, see the C source, reuses whatever is pinned at
  the path as is), locked against a second tracker (flock on the directory:
  released by the kernel however the holder dies), removed on request;
- `PinnedMap`: the maps a tracker pinned, opened read-only by another
  process (`audit`, `kill`) and read with maps.MapReader.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import RuntimeFailure, UsageError
from ..model import DEFAULT_PIN_DIR
from . import PinError, ProbeUnavailable, one_line
from .maps import MAP_SPECS, PIN_NAMES, BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, \
    MapReader, map_info, obj_get

BPF_FS_MAGIC = 0xCAFE4A11
SYS_BPFFS = "/sys/fs/bpf"

_log = logging.getLogger("tcpidle.probe")


def _fs_type(path: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is first
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (path, os.strerror(err)))
    return struct.unpack_from("l", buf.raw)[0] & 0xFFFFFFFF


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


class PinnedMap(MapReader):
    """Read-only view of the maps a tracker pinned (Probe.attach(pin_dir=...))."""

    @classmethod
    def open(cls, directory: str) -> "PinnedMap":
        fds = []
        try:
            for name in PIN_NAMES:
                fds.append(obj_get(os.path.join(directory, name)))
            for fd, want in zip(fds, (BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY)):
                if map_info(fd).type != want:
                    raise ProbeUnavailable("%s does not hold tcpidle maps" % directory)
            return cls(fds[0], fds[1], own_fds=True)
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise ProbeUnavailable(one_line(e)) from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise


@dataclass(frozen=True)
class PinInfo:
    """What a pinned map is: enough to tell whether this probe can use it."""

    map_type: int
    key_size: int
    value_size: int
    max_entries: int


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
        fd = obj_get(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise PinError("cannot open %s: %s" % (path, os.strerror(e.errno))) from None
    try:
        info = map_info(fd)
    except OSError as e:
        raise PinError("%s: %s" % (path, one_line(e))) from None
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
        want_type, want_key, want_value, want_entries = MAP_SPECS[name]
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


class PinSession:
    """The pin directory of one attach: lock, reuse plan, and cleanup on failure."""

    def __init__(self, directory: str, lock_fd: int, map_size: int, reused: List[str],
                 notes: List[str]):
        self.directory = directory
        self.lock_fd = lock_fd
        self.map_size = map_size
        self.reused = reused
        self.notes = notes

    @classmethod
    def open(cls, directory: str, map_size: int, log) -> "PinSession":
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
