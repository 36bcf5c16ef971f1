"""The /proc fallback: the only code that can kill a process.

Used when SOCK_DESTROY is unavailable (a kernel built without
CONFIG_INET_DIAG_DESTROY) or the user asks for `--use-proc`:

* `duplicate_socket` duplicates the owner's descriptor with pidfd_getfd and
  checks its inode *and* cookie: the one way into an owner's socket, also
  used by `tcpidle.retrofit` (keep-alive armed in the owner's socket);
* `shutdown_socket` shuts such a duplicate down: the owner lives on;
* `kill_owner` SIGKILLs the owner through a pidfd (`--proc-action kill`);
* `apply_fallback` runs one of them over a list of sockets, given their
  holders from `owners.owners_by_inode`, and says what happened to each in
  `model.Action` words, with the holders' `OwnerSummary` (`each_held_socket`
  and `first_holder` are that bookkeeping, for any action).

Nothing here prints; failures are exceptions (`ProcActionError`, its
`SocketGone` kind for "that socket or process is no longer there", and
`AttachRefused` for a pidfd_getfd the kernel refused).
"""

from __future__ import annotations

import errno
import os
import signal
import socket as _socket
import stat
import struct
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

from .errors import RuntimeFailure
from .model import SO_COOKIE, Action, OwnerSummary, Socket
from .owners import Owner, owners_by_inode, socket_inode, summarize

__all__ = [
    "ProcActionError",
    "SocketGone",
    "AttachRefused",
    "FallbackResult",
    "duplicate_socket",
    "shutdown_socket",
    "kill_owner",
    "apply_fallback",
    "each_held_socket",
    "first_holder",
    "ptrace_refusal",
    "NO_OWNER",
]

# pidfd_getfd(2) has the same number on every architecture that uses the
# unified syscall table (added in 5.6); Python has no wrapper for it.
NR_PIDFD_GETFD = 438

NO_OWNER = "no process holds this socket"


# kill_owner's readlink of one fd: the fd is closed or the process exited.
_VANISHED = (FileNotFoundError, ProcessLookupError)


class ProcActionError(RuntimeFailure):
    """A /proc fallback action failed."""


class SocketGone(ProcActionError):
    """The process exited, or its fd no longer holds the socket we meant."""


class AttachRefused(ProcActionError):
    """The kernel refused pidfd_getfd (EPERM): this process may not attach to the owner.

    `pid`, `comm`, `inode` and `cause` (ptrace_refusal's words) let a caller say it once
    per owner, whatever the number of its sockets.
    """

    def __init__(self, owner: Owner, inode: int):
        self.pid, self.comm, self.inode, self.cause = owner.pid, owner.comm, inode, ptrace_refusal()
        super().__init__("pidfd_getfd(%s) refused (EPERM): %s" % (_describe(owner, inode),
                                                                  self.cause))


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
    if os.getuid() != os.geteuid():
        # The attach check compares the real uid (PTRACE_MODE_REALCREDS), not the effective.
        return ("attaching to the owner needs CAP_SYS_PTRACE or the owner's uid as the real uid "
                "(this process's real uid is %d, its effective %d)" % (os.getuid(), os.geteuid()))
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


def duplicate_socket(owner: Owner, inode: int, cookie: Optional[int]) -> _socket.socket:
    """The socket OWNER holds at its fd, duplicated into this process and checked.

    The fd is fetched with pidfd_getfd and checked before it is handed out:
    the fd number may have been closed and reused since the walk, so the
    duplicate must have inode INODE and SO_COOKIE COOKIE (None skips the
    cookie check; the cookie is the identity INET_DIAG reported).  The
    duplicate shares the owner's open file description: what is done to it
    (shutdown, setsockopt) is done to the owner's socket; closing it (the
    caller's `with`) does not close the owner's fd.

    Raises SocketGone if the process exited or the fd no longer holds that
    socket, AttachRefused when the kernel refuses pidfd_getfd (EPERM),
    ProcActionError for anything else.
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
                raise AttachRefused(owner, inode) from None
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
    finally:
        if dupfd >= 0:
            os.close(dupfd)
    if cookie is None:
        return sock
    try:
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
    except BaseException:
        sock.close()
        raise
    return sock


def shutdown_socket(owner: Owner, inode: int, cookie: Optional[int]) -> None:
    """shutdown(SHUT_RDWR) the socket OWNER holds, from outside the process.

    The fd is duplicated and checked by `duplicate_socket` (inode and
    cookie) before anything is done.  The owner then reads EOF / gets EPIPE
    and lives on.

    Raises SocketGone if the process exited or the fd no longer holds that
    socket, ProcActionError for anything else (no permission, shutdown
    refused).
    """
    with duplicate_socket(owner, inode, cookie) as sock:
        try:
            sock.shutdown(_socket.SHUT_RDWR)
        except OSError as e:
            raise ProcActionError(
                "shutdown(%s): %s" % (_describe(owner, inode), e.strerror)
            ) from None


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
        if socket_inode(link) != inode:
            raise SocketGone("%s: the fd now holds %s" % (_describe(owner, inode), link))
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            raise SocketGone("pid %d has exited" % owner.pid) from None
        except OSError as e:
            raise ProcActionError("kill pid %d: %s" % (owner.pid, e.strerror)) from None
    finally:
        os.close(pidfd)


def first_holder(holders: Sequence[Owner], act: Callable[[Owner], str],
                 refused: Optional[List["AttachRefused"]] = None) -> Tuple[str, Optional[str]]:
    """(model.Action, error text): act(owner) on each holder in turn until one works.

    Every holder shares one socket: the first fd that still holds it is
    enough, and `act` returns what it did.  Others are tried only if an fd
    turned out gone or refused.  A refusal (AttachRefused) is also appended
    to REFUSED, when given, so that it can be said once per owner.
    """
    gone: List[str] = []
    failed: List[str] = []
    for o in holders:
        try:
            return act(o), None
        except SocketGone as e:
            gone.append(str(e))
        except ProcActionError as e:
            failed.append(str(e))
            if refused is not None and isinstance(e, AttachRefused):
                refused.append(e)
    if failed:
        return Action.FAILED, "; ".join(failed)
    return Action.GONE, "; ".join(gone)


def _fallback_one(
    sock: Socket, action: str, holders: Sequence[Owner]
) -> Tuple[str, Optional[str]]:
    """(model.Action, error text) for one socket with its HOLDERS."""
    if action == "shutdown":
        def shut(o: Owner) -> str:
            shutdown_socket(o, sock.inode, sock.cookie)
            return Action.SHUTDOWN

        return first_holder(holders, shut)
    # kill: every process holding the socket must die, else it survives.
    gone: List[str] = []
    failed: List[str] = []
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


class FallbackResult(NamedTuple):
    """What the fallback did to one socket."""

    socket: Socket
    action: str  # a model.Action value
    error: Optional[str]
    owners: OwnerSummary  # the holders it found (or was given)


def apply_fallback(
    sockets: Sequence[Socket],
    action: str,
    owners: Optional[Dict[int, List[Owner]]] = None,
) -> List[FallbackResult]:
    """Shut down (action "shutdown") or kill the owners of ("kill") SOCKETS.

    OWNERS is a map from `owners_by_inode`; None walks /proc once for all the
    sockets.  Returns one FallbackResult per socket, in order.  A socket no
    process holds (TIME_WAIT, orphans after close, inode 0) is FAILED with
    NO_OWNER; one whose possible holders could not be read says so.
    """
    if action not in ("shutdown", "kill"):
        raise ValueError("proc action must be 'shutdown' or 'kill', not %r" % (action,))
    return each_held_socket(sockets, owners, lambda s, holders: _fallback_one(s, action, holders))


def each_held_socket(
    sockets: Sequence[Socket],
    owners: Optional[Dict[int, List[Owner]]],
    one: Callable[[Socket, Sequence[Owner]], Tuple[str, Optional[str]]],
) -> List[FallbackResult]:
    """one(socket, its holders) -> (model.Action, error) for each of SOCKETS that a
    process holds, in order; the others FAILED (see apply_fallback).  OWNERS as
    apply_fallback's (None: one /proc walk for all)."""
    if owners is None:
        owners = owners_by_inode({s.inode for s in sockets if s.inode})
    out = []
    for s in sockets:
        holders = owners.get(s.inode, []) if s.inode else []
        if not holders:
            # Inode 0: no file holds it (TIME_WAIT, an orphan after close).
            out.append(FallbackResult(s, Action.FAILED, _no_holder(owners) if s.inode else NO_OWNER,
                                      summarize(holders)))
            continue
        act, err = one(s, holders)
        out.append(FallbackResult(s, act, err, summarize(holders)))
    return out
