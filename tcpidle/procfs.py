"""Who holds a socket, and the /proc fallback ways of getting rid of it.

Owns everything tcpidle learns or does through /proc and pidfds:

* `owners_by_inode` maps socket inodes to the processes (pid, fd, comm,
  cgroup, network namespace) holding them, in one race-tolerant pass over
  /proc/*/fd/*.
* `shutdown_socket` and `kill_owner` are the actions used when SOCK_DESTROY is
  unavailable (kernel built without CONFIG_INET_DIAG_DESTROY) or the user asks
  for `--use-proc`; `apply_fallback` runs them over a list of sockets and says
  what happened to each, in `model.Action` words.
* `has_cap_net_admin` / `is_root` let the CLI refuse early with one line.

Nothing here prints; failures are exceptions (`ProcActionError`, and its
`SocketGone` kind for "that socket or process is no longer there").
"""

from __future__ import annotations

import errno
import os
import signal
import socket as _socket
import stat
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .errors import RuntimeFailure
from .model import Action, Socket

__all__ = [
    "Owner",
    "ProcActionError",
    "ProcWalkError",
    "SocketGone",
    "Owners",
    "owners_by_inode",
    "shutdown_socket",
    "kill_owner",
    "apply_fallback",
    "has_capability",
    "has_cap_net_admin",
    "is_root",
    "NO_OWNER",
]

# include/uapi/asm-generic/socket.h; Python's socket module does not name it.
SO_COOKIE = 57
# pidfd_getfd(2) has the same number on every architecture that uses the
# unified syscall table (added in 5.6); Python has no wrapper for it.
NR_PIDFD_GETFD = 438
# include/uapi/linux/capability.h
CAP_NET_ADMIN = 12

NO_OWNER = "no process holds this socket"

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
# kill_owner's readlink of one fd: the fd is closed or the process exited.
_VANISHED = (FileNotFoundError, ProcessLookupError)


class ProcWalkError(RuntimeFailure):
    """The /proc walk failed for a reason other than a process or fd going away."""


def _walk_error(path: str, e: OSError) -> ProcWalkError:
    return ProcWalkError("walking /proc for socket owners: %s: %s" % (
        path, os.strerror(e.errno) if e.errno else e))


class Owners(dict):
    """inode -> [Owner] (what owners_by_inode returns), and the pids of the
    processes whose descriptors could not be read (`unreadable`)."""

    unreadable: Tuple[int, ...] = ()


class ProcActionError(RuntimeFailure):
    """A /proc fallback action failed."""


class SocketGone(ProcActionError):
    """The process exited, or its fd no longer holds the socket we meant."""


@dataclass(frozen=True)
class Owner:
    """One (process, fd) pair holding a socket."""

    pid: int
    fd: int
    comm: str = ""
    # Path from /proc/PID/cgroup: the cgroup v2 line ("0::/path") when there
    # is one, else the best v1 line; None when unreadable.
    cgroup: Optional[str] = None
    # Inode of /proc/PID/ns/net: the network namespace the process lives in
    # (a socket may belong to another one, if it was passed or created after
    # setns; socket inodes are unique host-wide so no filtering needs this).
    netns_inode: Optional[int] = None


# ---------------------------------------------------------------------------
# The walk


def _socket_inode(link: str) -> Optional[int]:
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


def _netns_inode(pid_dir: str) -> Optional[int]:
    try:
        return os.stat(pid_dir + "/ns/net").st_ino
    except OSError as e:
        if e.errno in _GONE_ERRNOS or e.errno in _DENIED_ERRNOS:
            return None
        raise _walk_error(pid_dir + "/ns/net", e) from None


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
            ino = _socket_inode(link)
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
    with_netns: bool = True,
) -> "Owners":
    """Map socket inode -> holders, in one pass over PROC_ROOT/*/fd/*.

    With `inodes`, only those sockets are kept (the walk is still one pass);
    None keeps every socket.  Processes and fds that vanish mid-walk are
    skipped.  comm, cgroup and netns are read once per process, and only for
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
        netns = _netns_inode(pid_dir) if with_netns else None
        for fd, ino in sorted(pairs):
            result.setdefault(ino, []).append(
                Owner(pid=pid, fd=fd, comm=comm, cgroup=cgroup, netns_inode=netns)
            )
    result.unreadable = tuple(unreadable)
    return result


# ---------------------------------------------------------------------------
# pidfd plumbing

_libc = None


def _pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """Duplicate TARGETFD of the process behind PIDFD into this process.

    Needs PTRACE_MODE_ATTACH_REALCREDS over the target (root, or same uid
    with a permissive Yama).  The new fd shares the target's open file
    description: shutting it down shuts the owner's socket down; closing it
    does not close the owner's fd.
    """
    native = getattr(os, "pidfd_getfd", None)
    if native is not None:
        return native(pidfd, targetfd)
    import ctypes  # only the /proc fallback needs it, and only before Python 3.14

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    fd = _libc.syscall(
        ctypes.c_long(NR_PIDFD_GETFD),
        ctypes.c_long(pidfd),
        ctypes.c_long(targetfd),
        ctypes.c_long(0),
    )
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


YAMA_PTRACE_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"


def ptrace_refusal(yama_path: str = YAMA_PTRACE_SCOPE) -> str:
    """Why the kernel refuses pidfd_getfd, in words: it needs ptrace's attach
    access to the owner (PTRACE_MODE_ATTACH_REALCREDS), which Yama restricts
    (ptrace_scope 1: descendants only, 2: CAP_SYS_PTRACE only, 3: nobody)
    and which otherwise takes the owner's uid or CAP_SYS_PTRACE."""
    try:
        with open(yama_path) as f:
            scope = int(f.read().strip() or 0)
    except (OSError, ValueError):
        scope = None
    if scope == 3:
        return ("Yama forbids attaching to any process (%s = 3; only a reboot lifts it): "
                "use SOCK_DESTROY instead of --use-proc" % yama_path)
    if scope in (1, 2):
        return ("attaching to the owner needs CAP_SYS_PTRACE (%s = %d)" % (yama_path, scope))
    return "attaching to the owner needs CAP_SYS_PTRACE (or running as the owner's user)"


def _open_pidfd(owner: Owner) -> int:
    try:
        return os.pidfd_open(owner.pid)
    except ProcessLookupError:
        raise SocketGone("pid %d has exited" % owner.pid) from None
    except OSError as e:
        raise ProcActionError("pidfd_open(%d): %s" % (owner.pid, e.strerror)) from None


def _describe(owner: Owner, inode: int) -> str:
    return "pid %d (%s) fd %d socket:[%d]" % (owner.pid, owner.comm or "?", owner.fd, inode)


# ---------------------------------------------------------------------------
# Actions


def shutdown_socket(owner: Owner, inode: int, cookie: Optional[int]) -> None:
    """shutdown(SHUT_RDWR) the socket OWNER holds, from outside the process.

    The fd is fetched with pidfd_getfd and checked before anything is done:
    the fd number may have been closed and reused since the walk, so the
    duplicate must have inode INODE and SO_COOKIE COOKIE (None skips the
    cookie check; the cookie is the identity INET_DIAG reported).  The owner
    then reads EOF / gets EPIPE and lives on.

    Raises SocketGone if the process exited or the fd no longer holds that
    socket, ProcActionError for anything else (no permission, shutdown
    refused).
    """
    pidfd = _open_pidfd(owner)
    try:
        try:
            dupfd = _pidfd_getfd(pidfd, owner.fd)
        except OSError as e:
            # ESRCH: the process exited after pidfd_open.  EBADF: the fd is
            # closed now.
            if e.errno in (errno.ESRCH, errno.EBADF):
                raise SocketGone(
                    "%s: %s" % (_describe(owner, inode), os.strerror(e.errno))
                ) from None
            if e.errno == errno.EPERM:
                raise ProcActionError("pidfd_getfd(%s) refused (EPERM): %s" % (
                    _describe(owner, inode), ptrace_refusal())) from None
            raise ProcActionError(
                "pidfd_getfd(%s): %s" % (_describe(owner, inode), os.strerror(e.errno))
            ) from None
    finally:
        os.close(pidfd)
    try:
        st = os.fstat(dupfd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_ino != inode:
            raise SocketGone(
                "%s: the fd now holds another file (inode %d)"
                % (_describe(owner, inode), st.st_ino)
            )
        # socket.socket(fileno=) takes ownership of dupfd; from here on the
        # socket object closes it.
        sock = _socket.socket(fileno=dupfd)
        dupfd = -1
        with sock:
            if cookie is not None:
                try:
                    raw = sock.getsockopt(_socket.SOL_SOCKET, SO_COOKIE, 8)
                except OSError as e:
                    raise ProcActionError(
                        "%s: SO_COOKIE: %s" % (_describe(owner, inode), e.strerror)
                    ) from None
                got = struct.unpack("=Q", raw)[0]
                if got != cookie:
                    raise SocketGone(
                        "%s: cookie %d is not the expected %d"
                        % (_describe(owner, inode), got, cookie)
                    )
            try:
                sock.shutdown(_socket.SHUT_RDWR)
            except OSError as e:
                raise ProcActionError(
                    "shutdown(%s): %s" % (_describe(owner, inode), e.strerror)
                ) from None
    finally:
        if dupfd >= 0:
            os.close(dupfd)


def kill_owner(owner: Owner, inode: int, proc_root: str = "/proc") -> None:
    """SIGKILL OWNER's process, if it still holds socket INODE at its fd.

    The pidfd is opened *before* the fd check.  If the process then dies and
    its pid is reused before the check, the check may read the newcomer, but
    the signal goes through the pidfd to the original (dead) process and
    fails with ESRCH: a recycled pid is never hit.
    """
    pidfd = _open_pidfd(owner)
    try:
        path = "%s/%d/fd/%d" % (proc_root, owner.pid, owner.fd)
        try:
            link = os.readlink(path)
        except _VANISHED:
            raise SocketGone("%s: fd is closed or the process exited" % _describe(owner, inode)) from None
        except OSError as e:
            raise ProcActionError("readlink %s: %s" % (path, e.strerror)) from None
        if _socket_inode(link) != inode:
            raise SocketGone("%s: the fd now holds %s" % (_describe(owner, inode), link))
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            raise SocketGone("pid %d has exited" % owner.pid) from None
        except OSError as e:
            raise ProcActionError("kill pid %d: %s" % (owner.pid, e.strerror)) from None
    finally:
        os.close(pidfd)


def _unique_pids(holders: Sequence[Owner]) -> Tuple[Tuple[int, ...], Tuple[str, ...]]:
    pids: List[int] = []
    comms: List[str] = []
    for o in holders:
        if o.pid not in pids:
            pids.append(o.pid)
            comms.append(o.comm)
    return tuple(pids), tuple(comms)


def _fallback_one(
    sock: Socket, action: str, holders: Sequence[Owner]
) -> Tuple[str, Optional[str]]:
    """(model.Action, error text) for one socket with its HOLDERS."""
    gone: List[str] = []
    failed: List[str] = []
    if action == "shutdown":
        # Every holder shares one socket: the first fd that still holds it is
        # enough.  Others are tried only if an fd turned out gone or refused.
        for o in holders:
            try:
                shutdown_socket(o, sock.inode, sock.cookie)
                return Action.SHUTDOWN, None
            except SocketGone as e:
                gone.append(str(e))
            except ProcActionError as e:
                failed.append(str(e))
        if failed:
            return Action.FAILED, "; ".join(failed)
        return Action.GONE, "; ".join(gone)
    # kill: every process holding the socket must die, else it survives.
    killed = 0
    seen: Set[int] = set()
    for o in holders:
        if o.pid in seen:
            continue
        try:
            kill_owner(o, sock.inode)
            killed += 1
            seen.add(o.pid)
        except SocketGone as e:
            # This fd is gone; another fd of the same process may still hold
            # it, so the pid is not marked seen.
            gone.append(str(e))
        except ProcActionError as e:
            seen.add(o.pid)
            failed.append(str(e))
    if failed:
        return Action.FAILED, "; ".join(failed)
    if killed:
        return Action.PROCESS_KILLED, None
    return Action.GONE, "; ".join(gone)


def _no_holder(owners) -> str:
    """Why no holder was found: none exists, or the ones that may exist could not be read."""
    unreadable = getattr(owners, "unreadable", ())
    if not unreadable:
        return NO_OWNER
    return ("no readable process holds this socket: the descriptors of %d processes could not "
            "be read (pid %s%s; another user's need CAP_SYS_PTRACE)" % (
                len(unreadable), ", ".join(str(p) for p in unreadable[:5]),
                ", ..." if len(unreadable) > 5 else ""))


def apply_fallback(
    sockets: Sequence[Socket],
    action: str,
    owners: Optional[Dict[int, List[Owner]]] = None,
) -> List[Tuple[Socket, str, Optional[str], Tuple[int, ...], Tuple[str, ...]]]:
    """Shut down (action "shutdown") or kill the owners of ("kill") SOCKETS.

    OWNERS is a map from `owners_by_inode`; None walks /proc once for all the
    sockets.  Returns, per socket and in order: (socket, model.Action value,
    error text or None, holder pids, holder comms).  A socket no process
    holds (TIME_WAIT, orphans after close, inode 0) is FAILED with NO_OWNER.
    """
    if action not in ("shutdown", "kill"):
        raise ValueError("proc action must be 'shutdown' or 'kill', not %r" % (action,))
    if owners is None:
        owners = owners_by_inode({s.inode for s in sockets if s.inode})
    out = []
    for s in sockets:
        holders = owners.get(s.inode, []) if s.inode else []
        pids, comms = _unique_pids(holders)
        if not holders:
            # Inode 0: no file holds it (TIME_WAIT, an orphan after close).
            out.append((s, Action.FAILED, _no_holder(owners) if s.inode else NO_OWNER,
                        pids, comms))
            continue
        act, err = _fallback_one(s, action, holders)
        out.append((s, act, err, pids, comms))
    return out


# ---------------------------------------------------------------------------
# Privilege


def has_capability(cap: int, status_path: str = "/proc/self/status") -> bool:
    """True if bit CAP is set in the effective capability set (CapEff)."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool((int(line.split()[1], 16) >> cap) & 1)
    except (OSError, ValueError, IndexError):
        return False
    return False


def has_cap_net_admin(status_path: str = "/proc/self/status") -> bool:
    """SOCK_DESTROY and dumping other users' sockets need CAP_NET_ADMIN."""
    return has_capability(CAP_NET_ADMIN, status_path)


def is_root() -> bool:
    """Effective uid 0 (pidfd_getfd on other users' processes needs it or
    CAP_SYS_PTRACE)."""
    return os.geteuid() == 0
