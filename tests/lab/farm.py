"""A connection farm: TCP servers and clients driven over stdin/stdout with JSON lines.

This file is two things:

* a standalone program (stdlib only), run inside a namespace as
  ``ip netns exec NS python farm.py [--max-seconds S]``.  It listens, connects,
  keeps "active" connections talking, echoes, and reports what every socket
  it owns has seen: its cookie, its inode, the first errno (ECONNABORTED=103
  on the side whose socket was destroyed, ECONNRESET=104 on the side that got
  the RST), or an orderly EOF;
* the `Farm` class the tests use to start one such process and talk to it.

Wire protocol between the sockets, one message a line, so that either side
of any connection can be pinged whichever farm owns the other side:

    D\\n        data from an active client, answered with d\\n
    d\\n        the answer (ignored)
    P<tok>\\n   ping request, answered with p<tok>\\n by whoever receives it
    p<tok>\\n   ping answer

Control protocol on stdin/stdout: a request ``{"id": N, "cmd": NAME, ...}``
gets exactly one response ``{"id": N, "ok": true, ...}`` or
``{"id": N, "ok": false, "error": TEXT}``.  The first line the program prints
is ``{"event": "ready", "pid": PID}``.  Commands:

    serve    ports=[..] addrs=[..]            -> listening=[[addr, port], ..]
    connect  addr port n label tag source     -> conns=[record, ..]
    status                                    -> conns=[record, ..]
    ping     ids=[..]|null timeout            -> results={id: bool}
    label    ids=[..] label                   -> (relabels; "active" talks)
    close    ids=[..]                         -> (orderly close)
    quit                                      -> exits

and, for the benchmarks (bench/common.py), *groups*: tens of thousands of
connections whose both ends this farm holds, passively (no per-connection
record, nothing in the event loop), closed with an RST so no TIME_WAIT
piles up:

    group_open   group family(4|6) addr port count -> client=[cookie..] server=[..]
    group_close  group count|null             -> client=[..] server=[..] closed=N
    group_ping                                -> pinged=N (a byte each way on each)
    group_active group period                 -> (its server ends send a byte
                                                  every period s; 0 stops)
    run          argv stdout_path             -> wall user sys maxrss_kb rc stderr
                                                 (a command timed from inside
                                                  the namespace, by GNU time)

The program is bounded: it exits when stdin closes, on ``quit``, or after
``--max-seconds`` (default 120).  ``--ignore-sigint`` leaves Ctrl-C to the
parent (the benchmarks end their farms themselves).
"""

import argparse
import errno
import json
import os
import queue
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

# SO_COOKIE (include/uapi/asm-generic/socket.h): the same 64-bit value INET_DIAG
# reports as idiag_cookie and the BPF probe keys its map with.  Python's socket
# module has no constant for it, and this program runs under a bare interpreter
# (a renamed python, for owner tests) that cannot import tcpidle.model.SO_COOKIE:
# tests/unit/test_layers.py checks the two agree.
SO_COOKIE = 57
ACTIVE_PERIOD_S = 0.05
FARM_PATH = os.path.abspath(__file__)
GNU_TIME = "/usr/bin/time"
LINGER_RST = struct.pack("ii", 1, 0)  # close() sends an RST: no TIME_WAIT


# --------------------------------------------------------------------------
# The program
# --------------------------------------------------------------------------


def _family_name(family):
    return "ipv6" if family == socket.AF_INET6 else "ipv4"


def _family_of(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


class _Conn:
    """One connected socket owned by the farm (client or accepted server side)."""

    def __init__(self, ident, role, sock, label, tag):
        self.id = ident
        self.role = role
        self.sock = sock
        self.label = label
        self.tag = tag
        self.family = sock.family
        self.local = list(sock.getsockname()[:2])
        self.remote = list(sock.getpeername()[:2])
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
        self.cookie = struct.unpack("=Q", raw)[0]
        # The socket's inode, as INET_DIAG reports it in idiag_inode and as
        # /proc/PID/fd links show it ("socket:[INODE]").
        self.inode = os.fstat(sock.fileno()).st_ino
        self.alive = True
        self.error = None
        self.eof = False
        self.inbuf = b""
        self.outbuf = b""
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_rx = time.monotonic()
        self.closed_at = None

    def record(self, peer_id):
        now = time.monotonic()
        return {
            "id": self.id,
            "role": self.role,
            "label": self.label,
            "tag": self.tag,
            "family": _family_name(self.family),
            "local": self.local,
            "remote": self.remote,
            "cookie": self.cookie,
            "inode": self.inode,
            "alive": self.alive,
            "error": self.error,
            "error_name": errno.errorcode.get(self.error) if self.error else None,
            "eof": self.eof,
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "rx_idle_ms": round((now - self.last_rx) * 1000.0, 1),
            "ended_ago_ms": (round((now - self.closed_at) * 1000.0, 1)
                             if self.closed_at is not None else None),
            "peer": peer_id,
        }


class _Program:
    def __init__(self, max_seconds):
        self.sel = selectors.DefaultSelector()
        self.deadline = time.monotonic() + max_seconds
        self.conns = {}
        self.listeners = []
        self.next_id = 1
        self.next_token = 1
        self.stdin_buf = b""
        self.running = True
        # token -> (ping request id, conn id); request id -> pending state
        self.pending_pings = {}
        self.next_tick = time.monotonic() + ACTIVE_PERIOD_S
        self.groups = _Groups()
        os.set_blocking(0, False)
        self.sel.register(0, selectors.EVENT_READ, ("stdin", None))

    # -- output ------------------------------------------------------------

    @staticmethod
    def emit(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    # -- sockets -------------------------------------------------------------

    def _watch(self, conn):
        events = selectors.EVENT_READ
        if conn.outbuf:
            events |= selectors.EVENT_WRITE
        try:
            self.sel.modify(conn.sock, events, ("conn", conn))
        except KeyError:
            self.sel.register(conn.sock, events, ("conn", conn))

    def _end(self, conn, err=None, eof=False):
        """Record how a connection ended and release it (first cause wins)."""
        if not conn.alive:
            return
        if err is not None and conn.error is None and not conn.eof:
            conn.error = err
        if eof and conn.error is None:
            conn.eof = True
        conn.alive = False
        conn.closed_at = time.monotonic()
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        for token, (_, cid) in list(self.pending_pings.items()):
            if cid == conn.id:
                self._ping_done(token, False)

    def _send(self, conn, data):
        if not conn.alive:
            return
        conn.outbuf += data
        self._flush(conn)

    def _flush(self, conn):
        while conn.outbuf and conn.alive:
            try:
                n = conn.sock.send(conn.outbuf)
            except BlockingIOError:
                break
            except OSError as exc:
                self._end(conn, err=exc.errno)
                return
            conn.tx_bytes += n
            conn.outbuf = conn.outbuf[n:]
        if conn.alive:
            self._watch(conn)

    def _readable(self, conn):
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self._end(conn, err=exc.errno)
            return
        if not data:
            self._end(conn, eof=True)
            return
        conn.rx_bytes += len(data)
        conn.last_rx = time.monotonic()
        conn.inbuf += data
        while b"\n" in conn.inbuf and conn.alive:
            line, conn.inbuf = conn.inbuf.split(b"\n", 1)
            if line == b"D":
                self._send(conn, b"d\n")
            elif line.startswith(b"P"):
                self._send(conn, b"p" + line[1:] + b"\n")
            elif line.startswith(b"p"):
                token = line[1:].decode("ascii", "replace")
                if token in self.pending_pings:
                    self._ping_done(token, True)

    def _accept(self, lsock):
        try:
            sock, _ = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = _Conn(self.next_id, "server", sock, "server", None)
        except OSError:
            sock.close()  # reset before we could look at it
            return
        self.next_id += 1
        self.conns[conn.id] = conn
        self._watch(conn)

    # -- pings ---------------------------------------------------------------

    def _ping_done(self, token, ok):
        req, cid = self.pending_pings.pop(token)
        req["results"][str(cid)] = ok
        req["left"] -= 1
        if req["left"] == 0 and not req["answered"]:
            req["answered"] = True
            self.emit({"id": req["rid"], "ok": True, "results": req["results"]})

    def _expire_pings(self, now):
        for token, (req, _) in list(self.pending_pings.items()):
            if now >= req["deadline"]:
                self._ping_done(token, False)

    # -- commands -------------------------------------------------------------

    def _peer_of(self, conn):
        for other in self.conns.values():
            if (other is not conn and other.local == conn.remote
                    and other.remote == conn.local):
                return other.id
        return None

    def _records(self, conns):
        return [c.record(self._peer_of(c)) for c in conns]

    def cmd_serve(self, req):
        out = []
        for addr in req.get("addrs") or ["127.0.0.1", "::1"]:
            family = _family_of(addr)
            for port in req["ports"]:
                lsock = socket.socket(family, socket.SOCK_STREAM)
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                lsock.bind((addr, port))
                lsock.listen(256)
                lsock.setblocking(False)
                self.listeners.append(lsock)
                self.sel.register(lsock, selectors.EVENT_READ, ("listen", lsock))
                out.append(list(lsock.getsockname()[:2]))
        return {"listening": out}

    def cmd_connect(self, req):
        addr, port = req["addr"], int(req["port"])
        family = _family_of(addr)
        made = []
        for _ in range(int(req.get("n", 1))):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                if req.get("source"):
                    sock.bind((req["source"], 0))
                # A blocking connect is fine even to our own listener: the
                # kernel completes the handshake into the accept queue.
                sock.settimeout(float(req.get("timeout", 5.0)))
                sock.connect((addr, port))
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = _Conn(self.next_id, "client", sock,
                             req.get("label", "idle"), req.get("tag"))
            except OSError:
                sock.close()
                raise
            self.next_id += 1
            self.conns[conn.id] = conn
            self._watch(conn)
            made.append(conn)
        # Let our own listeners accept, so peers show up in the next status.
        for _ in range(20):
            if all(self._peer_of(c) is not None for c in made):
                break
            self._poll(0.01)
        return {"conns": self._records(made)}

    def cmd_status(self, req):
        return {"conns": self._records(self.conns.values()), "pid": os.getpid()}

    def cmd_label(self, req):
        for cid in req["ids"]:
            self.conns[int(cid)].label = req["label"]
        return {}

    def cmd_close(self, req):
        for cid in req["ids"]:
            self._end(self.conns[int(cid)])
        return {}

    def cmd_ping(self, req):
        """Answered asynchronously once every ping is answered or timed out."""
        ids = req.get("ids")
        if ids is None:
            ids = list(self.conns)
        pending = {"rid": req["id"], "results": {}, "left": len(ids),
                   "answered": False,
                   "deadline": time.monotonic() + float(req.get("timeout", 2.0))}
        if not ids:
            return {"results": {}}
        for cid in ids:
            conn = self.conns.get(int(cid))
            token = "%d" % self.next_token
            self.next_token += 1
            self.pending_pings[token] = (pending, int(cid))
            if conn is None or not conn.alive:
                self._ping_done(token, False)
            else:
                self._send(conn, ("P%s\n" % token).encode())
        return None  # answered later

    def cmd_group_open(self, req):
        return self.groups.open(req["group"], int(req["family"]), req["addr"], int(req["port"]),
                                int(req["count"]))

    def cmd_group_close(self, req):
        return self.groups.close(req["group"], req.get("count"))

    def cmd_group_ping(self, req):
        return self.groups.ping()

    def cmd_group_active(self, req):
        return self.groups.activate(req["group"], float(req["period"]))

    def cmd_run(self, req):
        return run_timed(req["argv"], req.get("stdout_path"))

    def cmd_quit(self, req):
        self.running = False
        return {}

    def _command(self, line):
        try:
            req = json.loads(line)
        except ValueError as exc:
            self.emit({"id": None, "ok": False, "error": "bad json: %s" % exc})
            return
        handler = getattr(self, "cmd_" + str(req.get("cmd")), None)
        if handler is None:
            self.emit({"id": req.get("id"), "ok": False,
                       "error": "unknown command %r" % req.get("cmd")})
            return
        try:
            resp = handler(req)
        except (OSError, KeyError, ValueError, TypeError) as exc:
            self.emit({"id": req.get("id"), "ok": False,
                       "error": "%s: %s" % (type(exc).__name__, exc)})
            return
        if resp is not None:
            resp.update({"id": req.get("id"), "ok": True})
            self.emit(resp)

    def _stdin(self):
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return
        if not data:
            self.running = False
            return
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            if line.strip():
                self._command(line.decode())

    # -- loop ------------------------------------------------------------------

    def _tick(self):
        for conn in list(self.conns.values()):
            if conn.alive and conn.role == "client" and conn.label == "active":
                self._send(conn, b"D\n")

    def _poll(self, timeout):
        for key, mask in self.sel.select(max(0.0, timeout)):
            kind, obj = key.data
            if kind == "stdin":
                self._stdin()
            elif kind == "listen":
                self._accept(obj)
            elif kind == "conn":
                if not obj.alive:
                    continue
                if mask & selectors.EVENT_READ:
                    self._readable(obj)
                if obj.alive and mask & selectors.EVENT_WRITE:
                    self._flush(obj)

    def run(self):
        self.emit({"event": "ready", "pid": os.getpid()})
        while self.running:
            now = time.monotonic()
            if now >= self.deadline:
                break
            if now >= self.next_tick:
                self._tick()
                # Keep the period, but never try to catch up a backlog of ticks.
                self.next_tick = max(self.next_tick + ACTIVE_PERIOD_S, now)
            self._expire_pings(now)
            wake = min(self.next_tick, self.deadline)
            for req, _ in self.pending_pings.values():
                wake = min(wake, req["deadline"])
            self._poll(wake - time.monotonic())
        self.groups.stop.set()


# --------------------------------------------------------------------------
# Groups: connections held in bulk, for the benchmarks


class _Groups:
    """Groups of connections whose both ends this process holds, passively."""

    def __init__(self):
        self.listeners = {}
        self.groups = {}  # group -> [(client, server)]
        self.active = {}  # group -> period (s)
        self.lock = threading.Lock()
        self.sender = None
        self.stop = threading.Event()

    def listener(self, fam, addr, port):
        key = (fam, addr, port)
        ls = self.listeners.get(key)
        if ls is None:
            ls = socket.socket(fam, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            ls.bind((addr, port))
            ls.listen(4096)
            ls.settimeout(30)  # nothing on loopback may hang a benchmark
            self.listeners[key] = ls
        return ls

    def open(self, group, family, addr, port, count):
        fam = socket.AF_INET6 if family == 6 else socket.AF_INET
        ls = self.listener(fam, addr, port)
        pairs = []
        left = count
        try:
            while left:
                n = min(left, 1000)  # stays inside the accept backlog
                batch = []
                for _ in range(n):
                    c = socket.socket(fam, socket.SOCK_STREAM)
                    c.settimeout(30)
                    batch.append(c)
                    c.connect((addr, port))
                for c in batch:
                    pairs.append((c, ls.accept()[0]))
                left -= n
        except BaseException:
            for c, a in pairs:
                _rst_close(c)
                _rst_close(a)
            raise
        with self.lock:
            self.groups.setdefault(group, []).extend(pairs)
        return {"client": [_cookie(c) for c, _ in pairs], "server": [_cookie(a) for _, a in pairs]}

    def close(self, group, count):
        with self.lock:
            pairs = self.groups.get(group, [])
            if count is None or count >= len(pairs):
                gone, keep = pairs, []
            else:
                gone, keep = pairs[len(pairs) - count:], pairs[: len(pairs) - count]
            if keep:
                self.groups[group] = keep
            else:
                self.groups.pop(group, None)
                self.active.pop(group, None)
        cookies = {"client": [], "server": []}
        for c, a in gone:
            for side, sk in (("client", c), ("server", a)):
                try:
                    cookies[side].append(_cookie(sk))
                except OSError:
                    pass
                _rst_close(sk)
        return dict(cookies, closed=len(gone))

    def ping(self):
        """One byte each way on every connection held: every socket then has
        received data while ESTABLISHED (what the BPF probe records)."""
        with self.lock:
            pairs = [p for group in self.groups.values() for p in group]
        for c, a in pairs:
            c.send(b"p")
            a.send(b"p")
        return {"pinged": len(pairs)}

    def activate(self, group, period):
        with self.lock:
            if period > 0:
                self.active[group] = period
            else:
                self.active.pop(group, None)
        if self.sender is None:
            self.sender = threading.Thread(target=self._send_loop, daemon=True)
            self.sender.start()
        return {}

    def _send_loop(self):
        """Each active group's server ends send one byte every `period`
        seconds, spread evenly over the period in slices, so the client
        ends' tcpi_last_data_recv keeps being refreshed."""
        slices = 50
        while not self.stop.is_set():
            with self.lock:
                work = [(self.groups.get(g, []), p) for g, p in self.active.items()]
            if not work:
                self.stop.wait(0.2)
                continue
            period = min(p for _, p in work)
            socks = [a for pairs, _ in work for _, a in pairs]
            start = time.monotonic()
            step = max(1, -(-len(socks) // slices))
            for k in range(0, len(socks), step):
                for a in socks[k:k + step]:
                    try:
                        a.send(b"x", socket.MSG_DONTWAIT)
                    except OSError:
                        pass  # destroyed, closed or full: not our business here
                due = start + period * (k + step) / max(1, len(socks))
                delay = due - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    return


def _cookie(sock):
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def _rst_close(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    except OSError:
        pass  # already destroyed / reset
    sock.close()


def run_timed(argv, stdout_path=None):
    """Run argv to completion; its wall time, CPU, peak RSS and exit status.

    The command is started by GNU time, which forks it and reads its rusage
    with wait4().  Not by os.wait4() of our own child: at exec() the kernel
    folds the high-water RSS of the *old* mm into the new program's
    ru_maxrss, and a child forked (or vforked) from this Python process
    starts out with our ~10-20 MB, which would swamp ss's 3 MB.  GNU time is
    a small C program, so the floor it leaves is ~1 MB, the same for both
    tools.  The wall clock runs from before the spawn of `time` to its exit:
    its own exec (a fraction of a ms) is in both tools' numbers.
    stdout goes to /dev/null unless `stdout_path` is given.
    """
    with tempfile.TemporaryFile(prefix="tibench-err-") as err, \
            tempfile.NamedTemporaryFile(prefix="tibench-time-", mode="r") as res, \
            open(stdout_path or os.devnull, "wb") as out:
        gnu = os.path.exists(GNU_TIME)
        cmd = ([GNU_TIME, "-q", "-f", "%U %S %M", "-o", res.name] if gnu else []) + list(argv)
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        _pid, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if gnu:
            fields = res.read().split()
            user, system, maxrss = float(fields[-3]), float(fields[-2]), int(fields[-1])
        else:  # fallback: the RSS floor is this Python process's size (see above)
            user, system, maxrss = ru.ru_utime, ru.ru_stime, ru.ru_maxrss
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    return {"wall": wall, "user": user, "sys": system, "maxrss_kb": maxrss,
            "rc": p.returncode, "stderr": stderr[-2000:], "rss_by": "gnu-time" if gnu else "wait4"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--ignore-sigint", action="store_true")
    args = parser.parse_args(argv)
    import resource

    # A benchmark's farm holds up to ~18,000 descriptors: the soft limit is raised to the hard.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _Program(args.max_seconds).run()
    return 0


# --------------------------------------------------------------------------
# The test-side wrapper
# --------------------------------------------------------------------------


class FarmError(RuntimeError):
    """The farm answered a request with an error, or stopped answering."""


class Farm:
    """One farm process, optionally inside a network namespace.

    Every method sends one request and waits (bounded) for its answer.
    Connection records are dicts as described in the module docstring;
    ``status()`` returns them keyed by connection id.
    """

    # Start-up is a Python interpreter importing the farm: ~0.1 s here, but
    # several seconds on an emulated CPU (the kernel lab's QEMU under TCG,
    # ten times slower) while other tests load the machine.
    def __init__(self, ns=None, max_seconds=120.0, python=None, start_timeout=60.0,
                 ignore_sigint=False):
        argv = [python or sys.executable, FARM_PATH, "--max-seconds", str(max_seconds)]
        if ignore_sigint:
            argv.append("--ignore-sigint")
        if ns is not None:
            argv = ["ip", "netns", "exec", ns] + argv
        self.ns = ns
        self._stderr = tempfile.TemporaryFile()
        # `ip netns exec` execs the command in place (no fork), so proc.pid is
        # the farm's own pid: the owner tcpidle finds in /proc.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr,
                                     close_fds=True)
        self._lines = queue.Queue()
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        self._next_id = 1
        self._lock = threading.Lock()
        first = self._next_line(start_timeout)
        if first.get("event") != "ready":
            raise FarmError("farm did not start: %r" % first)
        self.pid = first["pid"]

    def _read_loop(self):
        for raw in self.proc.stdout:
            self._lines.put(raw)
        self._lines.put(None)

    def stderr_text(self):
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _next_line(self, timeout):
        try:
            raw = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise FarmError("farm %s: no answer in %.1fs" % (self.pid_or_none(), timeout))
        if raw is None:
            self.proc.wait(timeout=5)
            raise FarmError("farm exited (%s): %s" % (self.proc.returncode, self.stderr_text()))
        return json.loads(raw)

    def pid_or_none(self):
        return getattr(self, "pid", None)

    def request(self, cmd, timeout=15.0, **args):
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            args.update({"id": rid, "cmd": cmd})
            try:
                self.proc.stdin.write((json.dumps(args) + "\n").encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                raise FarmError("farm is gone: %s" % self.stderr_text())
            end = time.monotonic() + timeout
            while True:
                resp = self._next_line(max(0.01, end - time.monotonic()))
                if resp.get("id") == rid:
                    break
        if not resp.get("ok"):
            raise FarmError("%s failed: %s" % (cmd, resp.get("error")))
        return resp

    # -- commands --------------------------------------------------------------

    def serve(self, ports, addrs=("127.0.0.1", "::1")):
        """Listen on every (addr, port); returns [(addr, port), ...]."""
        resp = self.request("serve", ports=list(ports), addrs=list(addrs))
        return [tuple(x) for x in resp["listening"]]

    def connect(self, addr, port, n=1, label="idle", tag=None, source=None, timeout=5.0):
        """Open n client connections; returns their records."""
        resp = self.request("connect", addr=addr, port=port, n=n, label=label,
                            tag=tag, source=source, timeout=timeout)
        return resp["conns"]

    def status(self):
        """{id: record} for every connection the farm has had."""
        return {c["id"]: c for c in self.request("status")["conns"]}

    def ping(self, ids=None, timeout=2.0):
        """Round-trip a token on each connection; {id: True/False}."""
        resp = self.request("ping", ids=None if ids is None else list(ids),
                            timeout=timeout)
        return {int(k): v for k, v in resp["results"].items()}

    def set_label(self, ids, label):
        self.request("label", ids=list(ids), label=label)

    def close_conns(self, ids):
        self.request("close", ids=list(ids))

    def populate(self, ports, addrs=("127.0.0.1", "::1"), idle=2, active=1):
        """Connect `idle` idle and `active` active clients to every (addr, port).

        The servers may be in this farm or another one.  Returns the client
        records (tag "ADDR:PORT").
        """
        made = []
        for port in ports:
            for addr in addrs:
                tag = "%s:%d" % (addr, port)
                if idle:
                    made += self.connect(addr, port, n=idle, label="idle", tag=tag)
                if active:
                    made += self.connect(addr, port, n=active, label="active", tag=tag)
        return made

    def wait_until(self, predicate, timeout=5.0, interval=0.05):
        """Poll status until predicate(status) is true; returns that status.

        On timeout returns the last status (the caller asserts on it, so the
        failure message shows what the farm saw).
        """
        end = time.monotonic() + timeout
        while True:
            st = self.status()
            if predicate(st) or time.monotonic() >= end:
                return st
            time.sleep(interval)

    # -- lifetime ----------------------------------------------------------------

    def running(self):
        return self.proc.poll() is None

    def stop(self, timeout=5.0):
        """Close stdin (the farm exits), then make sure the process is gone."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self._stderr.close()


def peer_in(record, status):
    """The record in `status` on the other end of `record`'s connection, or None."""
    for other in status.values():
        if other["local"] == record["remote"] and other["remote"] == record["local"]:
            return other
    return None


if __name__ == "__main__":
    sys.exit(main())
