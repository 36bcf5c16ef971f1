"""Who holds a socket: the read-only walk of /proc, and the one summary of owners.

Owns what tcpidle learns from /proc about the processes behind sockets:

* `owners_by_inode` maps socket inodes to the processes (pid, fd, comm,
  cgroup) holding them, in one race-tolerant pass over /proc/*/fd/*;
* `summarize` turns a socket's holders into the `model.OwnerSummary` that
  every output shows (JSON rows, the table, log lines, the event log),
  whichever way the socket was found or acted on; `summaries_by_inode` is
  the walk and the summary in one.

Nothing here changes anything: the actions that can (shutdown in the owner,
SIGKILL) are in `fallback`.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .errors import RuntimeFailure
from .model import NO_OWNERS, OwnerSummary

__all__ = ["Owner", "Owners", "ProcWalkError", "owners_by_inode", "summarize",
           "summaries_by_inode", "socket_inode"]

_SOCKET_PREFIX = "socket:["

# What /proc says while the walk goes on, by errno.  A process or fd that
# vanishes mid-walk is normal: its entry disappears (ENOENT), or the task is
# gone between lookup and read (ESRCH).  A process we may not look into
# (EACCES/EPERM: another user's, without CAP_SYS_PTRACE or
# CAP_DAC_READ_SEARCH) is not gone: it is counted as unreadable, so that a
# socket with no readable holder is not called ownerless.  Every other errno
# (EMFILE, ENFILE, ENOMEM, EIO, ...) is a failure of the walk itself: it
# would make every process look ownerless, so it ends the walk, plainly.
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH})
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


class ProcWalkError(RuntimeFailure):
    """The /proc walk failed for a reason other than a process or fd going away."""


def _walk_error(path: str, e: OSError) -> ProcWalkError:
    return ProcWalkError("walking /proc for socket owners: %s: %s" % (
        path, os.strerror(e.errno) if e.errno else e))


class Owners(dict):
    """inode -> [Owner] (what owners_by_inode returns), and the pids of the
    processes whose descriptors could not be read (`unreadable`)."""

    unreadable: Tuple[int, ...] = ()


@dataclass(frozen=True)
class Owner:
    """One (process, fd) pair holding a socket."""

    pid: int
    fd: int
    comm: str = ""
    # Path from /proc/PID/cgroup: the cgroup v2 line ("0::/path") when there
    # is one, else the best v1 line; None when unreadable.
    cgroup: Optional[str] = None


# ---------------------------------------------------------------------------
# The walk


def socket_inode(link: str) -> Optional[int]:
    """The inode in a "socket:[12345]" link target, else None."""
    if not link.startswith(_SOCKET_PREFIX) or not link.endswith("]"):
        return None
    try:
        return int(link[len(_SOCKET_PREFIX) : -1])
    except ValueError:
        return None


def _read_comm(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except OSError as e:
        if e.errno in _GONE_ERRNOS or e.errno in _DENIED_ERRNOS:
            return None
        raise _walk_error(path, e) from None
    # The kernel ends the name with one newline; a name may hold more (any process can
    # name itself so), which belong to it: only the last is dropped.
    return data.decode("utf-8", "replace")[:-1] if data.endswith(b"\n") else data.decode(
        "utf-8", "replace")


def _pick_cgroup(text: str) -> Optional[str]:
    """The most useful path in a /proc/PID/cgroup file.

    Lines are "hierarchy-id:controllers:path".  The cgroup v2 line is
    "0::/path" and is the whole story on a unified host; on a v1 or hybrid
    host prefer the systemd named hierarchy (it names the unit), then the
    first line.
    """
    lines = [ln.split(":", 2) for ln in text.splitlines() if ln.count(":") >= 2]
    if not lines:
        return None
    for hid, ctrl, path in lines:
        if hid == "0" and ctrl == "":
            return path
    for hid, ctrl, path in lines:
        if "name=systemd" in ctrl.split(","):
            return path
    return lines[0][2]


def _read_cgroup(pid_dir: str) -> Optional[str]:
    try:
        with open(pid_dir + "/cgroup", "rb") as f:
            text = f.read(65536).decode("utf-8", "replace")
    except OSError as e:
        if e.errno in _GONE_ERRNOS or e.errno in _DENIED_ERRNOS:
            return None
        raise _walk_error(pid_dir + "/cgroup", e) from None
    return _pick_cgroup(text)


def _fd_sockets(pid_dir: str) -> Optional[List[Tuple[int, int]]]:
    """(fd, socket inode) for each socket fd of one process; [] if it vanished,
    None if its descriptors may not be read (EACCES).

    The fd directory is opened once and links are read relative to it, so a
    process with 20,000 fds costs one path lookup plus one readlinkat each.
    Raises ProcWalkError for errors that are not a process or fd going away.
    """
    try:
        dfd = os.open(pid_dir + "/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in _GONE_ERRNOS or e.errno == errno.ENOTDIR:  # exited; not a process
            return []
        if e.errno in _DENIED_ERRNOS:
            return None
        raise _walk_error(pid_dir + "/fd", e) from None
    out = []
    try:
        try:
            names = os.listdir(dfd)
        except OSError as e:
            if e.errno in _GONE_ERRNOS:
                return []
            if e.errno in _DENIED_ERRNOS:
                return None
            raise _walk_error(pid_dir + "/fd", e) from None
        for name in names:
            try:
                link = os.readlink(name, dir_fd=dfd)
            except OSError as e:
                if e.errno in _GONE_ERRNOS:  # closed after listdir, or the process exited
                    continue
                if e.errno == errno.EINVAL:  # not a link: one odd entry, no socket
                    continue
                if e.errno in _DENIED_ERRNOS:  # it changed credentials (execve of setuid)
                    return None
                raise _walk_error("%s/fd/%s" % (pid_dir, name), e) from None
            ino = socket_inode(link)
            if ino is None:
                continue
            try:
                out.append((int(name), ino))
            except ValueError:
                continue
    finally:
        os.close(dfd)
    return out


def owners_by_inode(
    inodes: Optional[Iterable[int]] = None,
    proc_root: str = "/proc",
) -> Owners:
    """Map socket inode -> holders, in one pass over PROC_ROOT/*/fd/*.

    With `inodes`, only those sockets are kept (the walk is still one pass);
    None keeps every socket.  Processes and fds that vanish mid-walk are
    skipped.  comm and cgroup are read once per process, and only for
    processes holding a wanted socket.  Holders of one inode are ordered by
    pid, then fd.

    The result's `unreadable` lists the processes whose descriptors could
    not be read (EACCES: another user's, without CAP_SYS_PTRACE).

    Raises ProcWalkError if PROC_ROOT cannot be listed or a read fails for
    another reason than a process or fd going away (EMFILE...).
    """
    wanted: Optional[Set[int]] = None if inodes is None else set(inodes)
    result = Owners()
    if wanted is not None and not wanted:
        return result
    try:
        with os.scandir(proc_root) as it:
            pids = [int(e.name) for e in it if e.name.isdigit()]
    except OSError as e:
        raise _walk_error(proc_root, e) from None
    pids.sort()
    unreadable = []
    for pid in pids:
        pid_dir = "%s/%d" % (proc_root, pid)
        pairs = _fd_sockets(pid_dir)
        if pairs is None:
            unreadable.append(pid)
            continue
        if wanted is not None:
            pairs = [(fd, ino) for fd, ino in pairs if ino in wanted]
        if not pairs:
            continue
        comm = _read_comm(pid_dir + "/comm") or ""
        cgroup = _read_cgroup(pid_dir)
        for fd, ino in sorted(pairs):
            result.setdefault(ino, []).append(Owner(pid=pid, fd=fd, comm=comm, cgroup=cgroup))
    result.unreadable = tuple(unreadable)
    return result


# ---------------------------------------------------------------------------
# The summary


def summarize(holders: Optional[Sequence[Owner]]) -> OwnerSummary:
    """The holders of one socket as every output shows them: sorted, no repeats.

    >>> summarize([Owner(813, 4, "nginx"), Owner(812, 4, "nginx")])
    OwnerSummary(pids=(812, 813), comms=('nginx',), cgroups=())
    """
    if not holders:
        return NO_OWNERS
    return OwnerSummary(
        tuple(sorted({o.pid for o in holders})),
        tuple(sorted({o.comm for o in holders})),
        tuple(sorted({o.cgroup for o in holders if o.cgroup})),
    )


def summaries_by_inode(inodes: Iterable[int], proc_root: str = "/proc") -> Dict[int, OwnerSummary]:
    """One /proc pass for `inodes`: inode -> its OwnerSummary (NO_OWNERS when nobody holds it)."""
    wanted = set(inodes)
    found = owners_by_inode(wanted, proc_root) if wanted else {}
    return {inode: summarize(found.get(inode)) for inode in wanted}
