"""Network namespaces: naming them, listing them, and opening sockets inside them.

Owns the only `setns(2)` in tcpidle.  INET_DIAG and SOCK_DESTROY only see the
namespace the netlink socket was created in, so to reach another namespace we
enter it just long enough to create a socket, and return at once -- also on
errors.  A socket keeps the namespace it was born in, so everything after
that runs from our own namespace; no thread is ever left in a foreign one.
"""

from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, NamedTuple, Optional, Sequence, Union

from .errors import RuntimeFailure, UsageError

RUN_NETNS = "/run/netns"
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Netns:
    """A network namespace: where to open it and what to call it in reports.

    `label` is the name under /run/netns where one exists, else the inode;
    None stands for the caller's own namespace.
    """

    path: Optional[str]  # None: the caller's own namespace
    inode: int
    label: Union[str, int, None]


class NetnsGone(RuntimeFailure):
    """The namespace disappeared (its last process exited, its name was deleted)."""


_libc = None


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python >= 3.12
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    import ctypes  # only before Python 3.12, and only when entering a namespace
    import ctypes.util

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "setns: " + os.strerror(err))


def _own_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def own() -> Netns:
    """The caller's own namespace."""
    return Netns(None, _own_inode(), None)


def _names() -> dict:
    """inode -> name for every namespace named under /run/netns."""
    names = {}
    try:
        entries = sorted(os.listdir(RUN_NETNS))
    except FileNotFoundError:
        return names
    for name in entries:
        try:
            names.setdefault(os.stat(os.path.join(RUN_NETNS, name)).st_ino, name)
        except OSError:
            continue
    return names


def resolve(spec: str) -> Netns:
    """NAME (under /run/netns), PATH (an ns file) or PID -> Netns; UsageError if none.

    The file is checked to be a network namespace before anything is done
    (see `_check_netns_file`): setns(2) would refuse anything else only
    later, with a bare EINVAL.
    """
    spec = str(spec)
    if not spec.strip():
        raise UsageError("--netns %r: empty (give a name under %s, an ns file or a PID)"
                         % (spec, RUN_NETNS))
    spec = spec.strip()
    if spec.isascii() and spec.isdigit():
        path = "/proc/%s/ns/net" % spec
        what = "process %s" % spec
    elif "/" in spec:
        path, what = spec, spec
    elif spec in (".", ".."):
        raise UsageError("--netns %r: not a namespace name" % spec)
    else:
        path, what = os.path.join(RUN_NETNS, spec), "name %r" % spec
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UsageError("--netns %s: no network namespace for %s (%s)" % (spec, what, exc.strerror)) from None
    _check_netns_file(spec, path, st)
    if st.st_ino == _own_inode():
        return own()
    label = _names().get(st.st_ino, st.st_ino)
    return Netns(path, st.st_ino, label)


NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), include/uapi/linux/nsfs.h (Linux >= 4.11)
_NS_TYPES = {0x00020000: "mount", 0x00008000: "cgroup", 0x04000000: "UTS", 0x08000000: "IPC",
             0x10000000: "user", 0x20000000: "PID", 0x00000080: "time"}


def _nstype(fd: int) -> Optional[int]:
    """The kind of namespace `fd` is (CLONE_NEW*), None if it is none (nsfs's ioctl
    NS_GET_NSTYPE; any other file answers ENOTTY)."""
    import fcntl

    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        return None


def _check_netns_file(spec: str, path: str, st: os.stat_result) -> None:
    """UsageError unless `path` is a network namespace file.

    Namespace files (/proc/PID/ns/net, the bind mounts under /run/netns)
    are regular nsfs inodes; the mode test comes first so that a FIFO or a
    device is never opened.  The nsfs ioctl NS_GET_NSTYPE then says which
    kind of namespace it is; any other file answers ENOTTY.
    """
    import stat

    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise UsageError("--netns %s: %s is not a network namespace (%s)" % (spec, path, kind))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise UsageError("--netns %s: %s: %s" % (spec, path, exc.strerror or exc)) from None
    try:
        nstype = _nstype(fd)
    finally:
        os.close(fd)
    if nstype != CLONE_NEWNET:
        kind = ("a %s namespace" % _NS_TYPES.get(nstype, "%#x" % nstype)) if nstype else "no namespace file"
        raise UsageError("--netns %s: %s is not a network namespace (%s)" % (spec, path, kind))


def all_namespaces() -> List[Netns]:
    """Every distinct namespace reachable through /run/netns and /proc/*/ns/net, once each.

    The caller's own comes first.  Processes exiting mid-walk are skipped.
    """
    seen = {_own_inode()}
    found = [own()]
    names = _names()
    for inode, name in names.items():
        if inode not in seen:
            seen.add(inode)
            found.append(Netns(os.path.join(RUN_NETNS, name), inode, name))
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        path = "/proc/%s/ns/net" % pid
        try:
            inode = os.stat(path).st_ino
        except OSError:
            continue  # exited, or not ours to see
        if inode not in seen:
            seen.add(inode)
            found.append(Netns(path, inode, inode))
    return found


class Listing(NamedTuple):
    """The namespaces of one scan.

    `missing`: a text for each namespace the user named (--netns) that is
    not there now; `named`: the namespaces were asked for by name, path or
    pid (one that vanishes is an error), not found by --all-netns (one that
    vanishes has ended, which is news to nobody).
    """

    found: List[Netns]
    missing: Sequence[str] = ()
    named: bool = True


class Watch:
    """The namespaces a run visits, listed again at every scan (called by the engine).

    `--all-netns` (specs None): every namespace alive now, so a tracker
    sees containers started after it, and stops visiting ended ones (both
    said once in the log).  `--netns SPEC...`: names and paths are resolved
    again each time, so a name deleted and made again is picked up; a pid
    keeps the namespace it named at start (the pid may be reused by a
    process of another namespace: `open_fd` refuses that).
    """

    def __init__(self, specs: Optional[Sequence[str]] = None, log=None):
        self.specs = None if specs is None else list(specs)
        self._log = log if log is not None else logging.getLogger("tcpidle")
        self._fixed = {}
        self._known: Optional[dict] = None
        if self.specs is not None:
            for spec in self.specs:  # bad specs are usage errors now, not at the first scan
                ns = resolve(spec)
                if _is_pid(spec):
                    self._fixed[spec] = ns

    def __call__(self) -> Listing:
        if self.specs is None:
            found = all_namespaces()
            self._note_changes(found)
            return Listing(found, [], False)
        found, missing, seen = [], [], set()
        for spec in self.specs:
            ns = self._fixed.get(spec)
            if ns is None:
                try:
                    ns = resolve(spec)
                except UsageError:
                    missing.append("network namespace %s is gone" % spec)
                    continue
            if ns.inode not in seen:
                seen.add(ns.inode)
                found.append(ns)
        return Listing(found, missing, True)

    def _note_changes(self, found: List[Netns]) -> None:
        now = {ns.inode: ns.label for ns in found}
        if self._known is not None:
            for inode in now.keys() - self._known.keys():
                self._log.info("network namespace %s appeared", now[inode])
            for inode in self._known.keys() - now.keys():
                self._log.info("network namespace %s ended", self._known[inode])
        self._known = now


def _is_pid(spec: str) -> bool:
    return str(spec).strip().isdigit()


def open_fd(ns: Netns) -> int:
    """Open `ns` (O_RDONLY, close-on-exec) and check it is still the namespace we listed.

    Raises NetnsGone when it vanished, or when a PID path now names another
    namespace (the process exited and its pid was reused): never act on a
    namespace we did not list.
    """
    try:
        fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise NetnsGone("network namespace %s is gone" % (ns.label,)) from None
    if os.fstat(fd).st_ino != ns.inode:
        os.close(fd)
        raise NetnsGone("network namespace %s is gone (its path now names another)" % (ns.label,))
    return fd


@contextmanager
def entered_fd(fd: int) -> Iterator[None]:
    """Run the body with this thread inside the network namespace `fd`; always return.

    setns(CLONE_NEWNET) moves the calling thread only, and a socket stays in
    the namespace it was created in, so callers enter just to create sockets.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(fd)
        except OSError as exc:
            if exc.errno == errno.EINVAL and _nstype(fd) != CLONE_NEWNET:
                # `ip netns add` creates /run/netns/NAME as an empty file before
                # it bind-mounts the namespace on it (and `delete` leaves the
                # file a moment after the unmount): listed in that window, the
                # path opened as a plain file, which setns() refuses.
                raise NetnsGone("its path was no namespace when listed") from None
            raise
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


@contextmanager
def entered(ns: Netns) -> Iterator[None]:
    """Run the body inside `ns`; always return to the original namespace."""
    if ns.path is None:
        yield
        return
    fd = open_fd(ns)
    try:
        with entered_fd(fd):
            yield
    finally:
        os.close(fd)
