"""Maps that outlive the process: bpffs, pin directories, pinned maps.

Owns the question "may this pin directory be used, and what is in it?":

- bpffs: recognised by its magic, mounted at /sys/fs/bpf when missing, and
  then root-only (mode=700; the kernel's default is 1777, open to all);
- a tracker's pin directory: created root-only; a pre-existing one must be
  a real directory owned by us and writable by nobody else, and each pin in
  it a BPF object of ours, not a symlink -- else `PinError`, one line.  Maps
  found there are checked before bcc uses them (bcc's BPF_TABLE_PINNED, see
  the C source, reuses whatever is pinned at the path as is) and reused with
  their history;
- the lock against a second tracker: an flock on a file in /run/tcpidle
  (root-only), named for the pin directory's inode.  Not on the directory
  itself: whoever can open a directory can flock it, and would keep the
  root tracker from starting.  The kernel drops the lock however its holder
  dies;
- `PinSession.problems()`: whether the pins are still there and still ours,
  for a tracker that runs on while someone unmounts bpffs or removes them;
- cleanup: only BPF pins on bpffs are removed, never ordinary files;
- `PinnedMap`: the maps a tracker pinned, checked the same way, opened
  read-only by another process (`audit`, `kill`), read with maps.MapReader.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import RuntimeFailure, UsageError
from ..model import DEFAULT_PIN_DIR
from . import PinError, ProbeUnavailable, one_line
from .maps import (DESTROY_LINK_PIN, LINK_PIN, META_PIN, PIN_NAMES, STORAGE_PIN, MapReader,
                   layout_problem, map_info, obj_get)

# Every name tcpidle pins in a pin directory: the maps, the storage, the probe.
ALL_PINS = PIN_NAMES + (STORAGE_PIN, LINK_PIN, DESTROY_LINK_PIN, META_PIN)

BPF_FS_MAGIC = 0xCAFE4A11
SYS_BPFFS = "/sys/fs/bpf"
# Where trackers lock their pin directories: on tmpfs, created root-only
# (only root can create it: /run is root's).
LOCK_DIR = "/run/tcpidle"

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


def mount_bpffs(path: str = SYS_BPFFS) -> bool:
    """Mount a BPF filesystem at path unless one is there; True if mounted now.

    systemd mounts /sys/fs/bpf at boot (mode=700); minimal systems and
    containers may not, and pins need it.  Mounted root-only as systemd
    does: without options the kernel makes the root 1777, where any user
    could make directories for the tracker to trip on.
    """
    if is_bpffs(path):
        return False
    os.makedirs(path, mode=0o700, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    if libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, b"mode=700") != 0:
        err = ctypes.get_errno()
        raise ProbeUnavailable("cannot mount a BPF filesystem at %s: %s" % (path, os.strerror(err)))
    return True


@dataclass(frozen=True)
class PinInfo:
    """What a pinned map is: enough to tell whether this probe can use it."""

    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int = 0


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


# -- who may touch the pins ----------------------------------------------------------


def _owners_ok() -> Tuple[int, ...]:
    """Owners whose pins and directories we trust: root, and ourselves."""
    return tuple(sorted({0, os.geteuid()}))


def check_directory(directory: str, what: str = "pin directory") -> None:
    """PinError unless directory is a real directory of root's (or ours)
    that no one else can write to.

    Another user's directory, or one others can write to, lets them delete
    the pins, or replace them with maps or symlinks of their own.
    """
    try:
        st = os.lstat(directory)
    except OSError as e:
        raise PinError("%s %s: %s" % (what, directory, e.strerror or e)) from None
    if stat.S_ISLNK(st.st_mode):
        raise PinError("%s %s is a symbolic link: refused (give the real directory)"
                       % (what, directory))
    if not stat.S_ISDIR(st.st_mode):
        raise PinError("%s %s is not a directory" % (what, directory))
    if st.st_uid not in _owners_ok():
        raise PinError("%s %s belongs to uid %d, not root: refused (another user could "
                       "remove or replace the pins; remove it, or choose another --pin-dir)"
                       % (what, directory, st.st_uid))
    if st.st_mode & 0o022:
        raise PinError("%s %s is writable by other users (mode %o): refused (chmod 700 it, "
                       "or choose another --pin-dir)"
                       % (what, directory, stat.S_IMODE(st.st_mode)))


def make_pin_dir(directory: str) -> None:
    """Create directory root-only if missing (mkdir's mode: no moment when
    others could open it), then check_directory()."""
    try:
        os.makedirs(os.path.dirname(directory), mode=0o700, exist_ok=True)
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise PinError("pin directory %s: %s" % (directory, e.strerror or e)) from None
    check_directory(directory)


def check_pin(path: str) -> bool:
    """False if nothing is at path; True if a BPF pin of ours is; else PinError.

    bpf(BPF_OBJ_GET) follows symlinks: a symlink planted at a pin's path
    would hand us another object, or one in another user's directory.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise PinError("%s: %s" % (path, e.strerror or e)) from None
    if stat.S_ISLNK(st.st_mode):
        raise PinError("%s is a symbolic link, not a BPF pin: refused (remove it with "
                       "`tcpidle track --cleanup --pin-dir %s`)" % (path, os.path.dirname(path)))
    if not stat.S_ISREG(st.st_mode):  # on bpffs, pinned objects are regular inodes
        raise PinError("%s is not a BPF pin" % path)
    if st.st_uid not in _owners_ok():
        raise PinError("%s was pinned by uid %d, not root: refused" % (path, st.st_uid))
    return True


def pinned_info(path: str) -> Optional[PinInfo]:
    """PinInfo of the map pinned at path; None if nothing is pinned there."""
    if not check_pin(path):
        return None
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
    return PinInfo(info.type, info.key_size, info.value_size, info.max_entries, info.map_flags)


def plan_pinned_maps(found: Dict[str, Optional[PinInfo]], map_size: int,
                     directory: str) -> Tuple[int, List[str], List[str]]:
    """(map size to build with, names of the pins reused, warnings) -- pure.

    A pinned map of the wrong type, key/value size, entries or flags
    (another program's, or another layout) is refused: bcc would attach our
    programs to it as is.  A pinned activity map of another max_entries is
    reused at its own size: its history is worth more than the size asked for.
    """
    size, reused, notes = map_size, [], []
    for name in PIN_NAMES:
        info = found.get(name)
        if info is None:
            continue
        problem = layout_problem(name, info.map_type, info.key_size, info.value_size,
                                 info.max_entries, info.map_flags)
        if problem:
            raise PinError("%s is %s: remove it with `tcpidle track --cleanup --pin-dir %s`"
                           % (os.path.join(directory, name), problem, directory))
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


class PinnedMap(MapReader):
    """Read-only view of the maps a tracker pinned (Probe.attach(pin_dir=...)).

    open() checks the directory, each pin and each map's layout before
    anything is read; every problem is one PinError line.
    """

    @classmethod
    def open(cls, directory: str) -> "PinnedMap":
        check_directory(directory)
        fds = []
        try:
            for name in PIN_NAMES:
                path = os.path.join(directory, name)
                if not check_pin(path):
                    raise PinError("%s is missing (%s)" % (path, "no tcpidle tracker pinned "
                                   "there" if name == "activity" else "the activity map is "
                                   "pinned without it"))
                fds.append(obj_get(path))
                info = map_info(fds[-1])
                problem = layout_problem(name, info.type, info.key_size, info.value_size,
                                         info.max_entries, info.map_flags)
                if problem:
                    raise PinError("%s is %s" % (path, problem))
            return cls(fds[0], fds[1], own_fds=True)
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise PinError("%s: %s" % (directory, e.strerror or one_line(e))) from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise


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


def _lock_path(directory: str) -> str:
    """The lock file of a pin directory: named for its inode, so that two
    paths to one directory (a bind mount, a symlinked parent) share it."""
    st = os.stat(directory)
    return os.path.join(LOCK_DIR, "pins-%d-%d.lock" % (st.st_dev, st.st_ino))


def _lock_dir_ready() -> None:
    """/run/tcpidle, root-only; PinError if it is not ours alone."""
    try:
        os.mkdir(LOCK_DIR, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise PinError("cannot create %s for the tracker's lock: %s"
                       % (LOCK_DIR, e.strerror or e)) from None
    check_directory(LOCK_DIR, "lock directory")
    if os.stat(LOCK_DIR).st_mode & 0o077:
        raise PinError("lock directory %s is open to other users (mode %o): refused"
                       % (LOCK_DIR, stat.S_IMODE(os.stat(LOCK_DIR).st_mode)))


def _lock_dir(directory: str) -> Tuple[int, str]:
    """(fd holding an exclusive flock for directory, the lock file); PinError if taken.

    The holder unlinks the lock file before it lets go (_unlock), so a lock
    won on a file that is no longer at its path was won too late: try again.
    """
    import fcntl

    _lock_dir_ready()
    path = _lock_path(directory)
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise PinError("lock for %s: %s" % (directory, e.strerror or e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            mine, there = os.fstat(fd), os.stat(path)
        except BlockingIOError:
            os.close(fd)
            pid = pin_dir_holder(directory)
            raise PinError("%s is in use by another tcpidle tracker%s" % (
                directory, " (pid %d)" % pid if pid else "")) from None
        except FileNotFoundError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
            return fd, path
        os.close(fd)
    raise PinError("lock for %s: kept changing under us" % directory)


def lock_pin_dir(directory: str, log=None) -> Tuple[int, str]:
    """Make directory ready on bpffs and lock it for this tracker: the lock
    (fd, path), to hand to PinSession.open or release with unlock_pin_dir."""
    ensure_bpffs(directory, log)
    make_pin_dir(directory)
    return _lock_dir(directory)


def unlock_pin_dir(lock: Tuple[int, str]) -> None:
    if lock[0] >= 0:
        _unlock(*lock)


def _unlock(fd: int, path: str) -> None:
    """Unlink the lock file, then let go (see _lock_dir): /run/tcpidle keeps
    no file for pin directories no tracker holds."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def pin_dir_holder(directory: str) -> Optional[int]:
    """None if no tracker holds directory; else its pid (0 if unknown)."""
    import fcntl

    try:
        fd = os.open(_lock_path(directory), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
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
    # set by the loader when this attach lets bcc create (and pin) the storage
    storage_created = False

    """The pin directory of one attach: lock, reuse plan, and cleanup on failure."""

    def __init__(self, directory: str, lock: Tuple[int, str], map_size: int, reused: List[str],
                 notes: List[str]):
        self.directory = directory
        self.lock_fd, self.lock_path = lock
        self.map_size = map_size
        self.reused = reused
        self.notes = notes

    @classmethod
    def open(cls, directory: str, map_size: int, log,
             held_lock: Optional[Tuple[int, str]] = None) -> "PinSession":
        """held_lock: the directory's lock, taken already (lock_pin_dir) and
        handed over, released with the session; (-1, "") when the process
        that spawned us holds it (the detached probe's loader)."""
        notes = ensure_bpffs(directory, log)
        make_pin_dir(directory)
        lock = _lock_dir(directory) if held_lock is None else held_lock
        try:
            found = {name: pinned_info(os.path.join(directory, name)) for name in PIN_NAMES}
            size, reused, warnings = plan_pinned_maps(found, map_size, directory)
        except BaseException:
            if lock[0] >= 0:
                _unlock(*lock)
            raise
        for w in warnings:
            log.warning("%s", w)
        return cls(directory, lock, size, reused, notes + warnings)

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

    def problems(self, map_ids: Dict[str, int]) -> List[str]:
        """What became of the pins while attached: [] while each pin named in
        map_ids is there and holds the map of that id (the attached probe's).

        A pin vanishes when bpffs is unmounted or someone removes it; the maps
        live on in this process, but other processes (audit, kill) can no
        longer read them and the next tracker starts without their history.
        """
        out = []
        for name, want in map_ids.items():
            path = self.path(name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                out.append("%s vanished (bpffs unmounted, or the pin removed)" % path)
                continue
            except OSError as e:
                out.append("%s: %s" % (path, e.strerror or e))
                continue
            if stat.S_ISLNK(st.st_mode):
                out.append("%s was replaced by a symbolic link" % path)
                continue
            try:
                fd = obj_get(path)
                try:
                    got = map_info(fd).id
                finally:
                    os.close(fd)
            except OSError as e:
                out.append("%s: %s" % (path, e.strerror or e))
                continue
            if got != want:
                out.append("%s now holds another map (id %d, not %d)" % (path, got, want))
        return out

    def _unlink(self, names: Sequence[str]) -> None:
        for name in names:
            try:
                os.unlink(self.path(name))
            except FileNotFoundError:
                pass

    def _unlock(self) -> None:
        if self.lock_fd >= 0:
            _unlock(self.lock_fd, self.lock_path)
            self.lock_fd = -1

    def abort(self) -> None:
        """Attach failed: remove the pins this attempt created, keep reused ones."""
        self._unlink([n for n in PIN_NAMES if n not in self.reused])
        if self.storage_created:
            self._unlink([STORAGE_PIN])
        self._unlock()

    def release(self, remove: bool) -> None:
        if remove:
            self._unlink(ALL_PINS)
        self._unlock()

    def drop_storage(self) -> None:
        """Unpin the storage this attach created (its program was refused)."""
        self._unlink([STORAGE_PIN])
        self.storage_created = False

    def storage_problem(self) -> Optional[str]:
        """Why the storage pinned here cannot be reused (None: nothing pinned, or ours).

        Checked before bcc opens it (bcc reuses whatever is pinned at the
        path, as is): a pin of ours, and a socket storage map of our layout.
        """
        info = pinned_info(self.path(STORAGE_PIN))
        if info is None:
            return None
        why = layout_problem(STORAGE_PIN, info.map_type, info.key_size, info.value_size,
                             info.max_entries, info.map_flags)
        return None if why is None else "%s is %s" % (self.path(STORAGE_PIN), why)


def remove_pins(directory: str = DEFAULT_PIN_DIR) -> List[str]:
    """Remove the pins of directory (and the directory when left empty).

    Returns the paths removed, [] if there was nothing.  Only BPF pins on a
    BPF filesystem are removed: a directory elsewhere is refused with
    nothing touched (UsageError), and anything else found under a pin's name
    (a symlink, a directory) is left alone, with PinError.  Refuses while a
    tracker holds the directory: its maps would live on, unpinned, and its
    history be lost at its next restart.
    """
    directory = check_pin_dir(directory)
    if not os.path.lexists(directory):
        return []
    if not is_bpffs(directory):
        raise UsageError("--pin-dir %s is not on a BPF filesystem: nothing removed "
                         "(cleanup removes BPF pins only)" % directory)
    check_directory(directory)
    try:
        lock = _lock_dir(directory)
    except PinError as e:
        raise RuntimeFailure("%s: stop it before --cleanup" % e) from None
    removed = []
    try:
        # The links first: unpinning them detaches the probe (the last
        # reference to a pinned link is its pin once no tracker runs).
        pins = [os.path.join(directory, name) for name in
                (LINK_PIN, DESTROY_LINK_PIN) + PIN_NAMES + (STORAGE_PIN, META_PIN)]
        present = [path for path in pins if check_pin(path)]  # all checked before any unlink
        for path in present:
            os.unlink(path)
            removed.append(path)
        if not os.listdir(directory) and not os.path.ismount(directory):
            os.rmdir(directory)
            removed.append(directory)
    finally:
        _unlock(*lock)
    return removed
