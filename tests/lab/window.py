"""Acting inside tcpidle's scan-to-destroy window, deterministically.

Between the dump that picks the victims and the SOCK_DESTROY of each batch,
the world moves on: an owner exits with unsent data, data arrives, a
namespace's name is deleted, a signal comes.  The product has no hook for
that (it must not); the lab gets one by wrapping the two netlink exchanges
the engine makes per batch, `DiagSocket.lookup` (the re-check, and the look
again after a destroy) and `DiagSocket.destroy`, on the class, for one test
(pytest's monkeypatch undoes it).  The engine runs in the test's own
process (Engine, run_pass or cli.main) so the wrapper runs in the middle of
its pass; the requests still go to the real kernel.

    window = Window(monkeypatch)
    window.before("lookup", 1, lambda socks: victim.close())   # FIN-WAIT-1 now
    window.after("destroy", 1, lambda socks, answers: signal.raise_signal(SIGTERM))

Besides the hooks it gives in-process connection pairs inside a namespace
(`Pairs`): the test owns both ends, so it can write, close, reset and read
them at any point of the pass.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Callable, Dict, List

from .netns import close_all, cookie_of, in_netns

SO_LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends RST, no TIME_WAIT


class Window:
    """Hooks on DiagSocket.lookup / destroy: run a test's action at the n-th call."""

    def __init__(self, monkeypatch):
        from tcpidle import diag

        self.calls: Dict[str, int] = {"lookup": 0, "destroy": 0}
        self.sizes: Dict[str, List[int]] = {"lookup": [], "destroy": []}
        self._before: Dict[tuple, Callable] = {}
        self._after: Dict[tuple, Callable] = {}
        self._replace: Dict[tuple, Callable] = {}
        for name in ("lookup", "destroy"):
            monkeypatch.setattr(diag.DiagSocket, name, self._wrap(name, getattr(diag.DiagSocket, name)))

    def before(self, method: str, nth: int, action: Callable) -> None:
        """action(sockets) right before the nth call of `method` (1 = first) reaches the kernel."""
        self._before[(method, nth)] = action

    def after(self, method: str, nth: int, action: Callable) -> None:
        """action(sockets, answers) right after the nth call of `method` returned."""
        self._after[(method, nth)] = action

    def instead(self, method: str, nth: int, action: Callable) -> None:
        """The nth call of `method` is action(real_method, diag_socket, sockets) -> answers
        (to fail a call, or to send the kernel only part of a batch)."""
        self._replace[(method, nth)] = action

    def _wrap(self, name: str, real: Callable) -> Callable:
        def wrapper(diag_socket, sockets, *args, **kw):
            self.calls[name] += 1
            n = self.calls[name]
            self.sizes[name].append(len(sockets))
            if (name, n) in self._before:
                self._before[(name, n)](sockets)
            if (name, n) in self._replace:
                answers = self._replace[(name, n)](
                    lambda socks: real(diag_socket, socks, *args, **kw), diag_socket, sockets)
            else:
                answers = real(diag_socket, sockets, *args, **kw)
            if (name, n) in self._after:
                self._after[(name, n)](sockets, answers)
            return answers

        return wrapper


class Pairs:
    """Connected TCP pairs on 127.0.0.1 inside namespace `ns_name`, both ends ours.

    Client ends are made by a thread inside the namespace (a socket keeps
    the namespace it was born in); `server_port` is the listener's port, so
    a selector on it (sport) picks the server ends.
    """

    def __init__(self, ns_name: str, addr: str = "127.0.0.1"):
        self.ns = ns_name
        self.addr = addr
        self.listener = in_netns(ns_name, self._listen)
        self.server_port = self.listener.getsockname()[1]
        self.socks: List[socket.socket] = []
        self._lock = threading.Lock()

    def _listen(self):
        s = socket.socket(socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.addr, 0))
        s.listen(1024)
        return s

    def pair(self, rcvbuf: int = 0, bind_port: int = 0):
        """(client, server) of a new connection.  rcvbuf: the client's SO_RCVBUF
        (small: a slow peer); bind_port: the client's own port (to make a
        4-tuple again)."""
        def make():
            c = socket.socket(socket.AF_INET)
            if rcvbuf:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if bind_port:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                c.bind((self.addr, bind_port))
            c.connect(self.listener.getsockname())
            return c

        c = in_netns(self.ns, make)
        a, _ = self.listener.accept()
        for s in (c, a):
            s.settimeout(5)
            cookie_of(s)  # numbered now, as a dump would (probe hooks key on it)
        with self._lock:
            self.socks += [c, a]
        return c, a

    def many(self, n: int):
        return [self.pair() for _ in range(n)]

    def close(self):
        close_all(self.socks + [self.listener])
        self.socks = []


def fill_send_queue(sock: socket.socket, chunk: int = 65536, limit: int = 64 << 20) -> int:
    """Write to `sock` until its send buffer is full (the peer does not read); bytes written."""
    sock.setblocking(False)
    total = 0
    try:
        while total < limit:
            try:
                total += sock.send(b"x" * chunk)
            except BlockingIOError:
                break
    finally:
        sock.settimeout(5)
    return total


def read_to_end(sock: socket.socket, timeout: float = 20.0) -> tuple:
    """Read until EOF or an error: (bytes read, errno or None)."""
    sock.settimeout(timeout)
    got = 0
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return got, None
            got += len(data)
    except OSError as e:
        return got, e.errno


def reset(sock: socket.socket) -> None:
    """Close `sock` with an RST (SO_LINGER 0): its 4-tuple is free at once."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, SO_LINGER_RESET)
    sock.close()


def aborted(sock: socket.socket) -> bool:
    """True if SOCK_DESTROY hit this end: it reads ECONNABORTED (an error is
    reported at once; a live socket with nothing to read says EAGAIN)."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError as e:
        return e.errno == 103  # ECONNABORTED
    finally:
        sock.settimeout(5)
    return False


def drop_thread_capability(cap: int) -> None:
    """Clear capability `cap` from the calling thread's effective set (capset(2)).

    Capabilities are per thread: only this thread loses it, and with the
    thread the loss ends.  A netlink request is judged by the sender's
    capabilities at send time, so an engine running in this thread gets
    EPERM from SOCK_DESTROY from now on.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # {effective, permitted, inheritable} x 2
    nr_capget, nr_capset = 125, 126  # x86_64
    if libc.syscall(nr_capget, header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[(cap // 32) * 3] &= ~(1 << (cap % 32))
    if libc.syscall(nr_capset, header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


__all__ = ["Window", "Pairs", "fill_send_queue", "read_to_end", "reset", "aborted", "drop_thread_capability"]
