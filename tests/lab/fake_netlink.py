"""A fake NETLINK_SOCK_DIAG kernel for the unit tier: real messages, no root.

What it emulates
----------------
The kernel side of the netlink sockets `tcpidle.diag.DiagSocket` talks to,
one `FakeNamespace` per network namespace, each holding a table of TCP
sockets.  Every socket is a *recorded* inet_diag_msg (tests/data/dump_*.bin,
recorded from a real kernel by tests/lab/record_dump.py, the way `ss` replays
a dump saved with --diag) with some fields rewritten (cookie, ports, uid,
inode, state, tcp_info ages), so the bytes tcpidle decodes are the kernel's
own layout, attributes included.  `FakeSocket` is what `diag` sends requests
to and receives answers from:

* dump requests, both kinds: SOCK_DIAG_BY_FAMILY (`inet_diag_req_v2`, one
  family; AF_UNSPEC is refused with ENOENT as sock_diag_rcv_msg does) and the
  legacy TCPDIAG_GETSOCK (`inet_diag_req`, every family in one walk; a
  namespace can refuse it with EINVAL like a kernel without the compat
  handler).  The states mask is applied, the INET_DIAG_REQ_BYTECODE filter is
  checked with the Python model of the kernel's verifier
  (`selectors.audit_bytecode`, EINVAL if refused) and run with the model of
  its interpreter (`selectors.run_bytecode`), and INET_DIAG_INFO is included
  only when the ext bit asks for it.  The answer is multipart (NLM_F_MULTI),
  `chunk` bytes of records per recv(), NLMSG_DONE last; the walk is lazy, as
  the kernel's: records are produced as they are read, so the dump is "in
  progress" until NLMSG_DONE has been received;
* exact requests, many per send(), processed at send() time and answered in
  order with the request's seq and the socket's port id: SOCK_DESTROY
  (NLM_F_ACK: an NLMSG_ERROR carrying 0 or -errno, header-only with
  NETLINK_CAP_ACK) and the exact lookup (SOCK_DIAG_BY_FAMILY without
  NLM_F_DUMP: one record, or an NLMSG_ERROR).  The sockid is looked up by
  family, ports and addresses, then its cookie is checked the way
  sock_diag_check_cookie does (INET_DIAG_NOCOOKIE, all ones, skips the
  check): a mismatch answers ENOENT;
* the errors tcpidle must handle: ENOENT (no such socket / other cookie),
  EOPNOTSUPP (`destroy_supported=False`: no CONFIG_INET_DIAG_DESTROY; answered
  before the lookup, as inet_diag_cmd_exact does), EPERM (`capable=False`: no
  CAP_NET_ADMIN over the namespace; answered after the lookup, as
  sock_diag_destroy does), any errno per socket (`FakeTcp.destroy_errno`,
  `.lookup_errno`), and the orphaned socket of kernels before 6.11 that
  SOCK_DESTROY acks with 0 but leaves in place (`.survives_destroy`);
* SO_RCVBUF/SO_SNDBUF (doubled on read, as the kernel reports them), bind,
  NETLINK_CAP_ACK; a namespace is chosen by the inode of the netns fd the
  socket is opened with (any file will do: `FakeKernel.add_namespace(path)`).

How it is plugged in: `FakeKernel.open_diag` is a `scope.OpenDiag` (the
injection point of `Scope`): a real `diag.DiagSocket` whose netlink sockets
come from `FakeKernel.open_netlink`, which stands where `diag._open_netlink`
creates real ones (tests running the command line replace that function,
the seam below commands that have no injection point of their own).

Everything a request did is appended to `FakeKernel.events`, one
`Event(kind, ns, cookies, ...)` per dump or per send() of exact requests, so
tests can check order (whole dump read before the first destroy), batching
and re-checks.  `FakeKernel.on_event` callbacks run after each event: a test
can make a socket receive data "between" two batches (hooks see a dump
twice: when it is requested, and with `done` set once NLMSG_DONE was read).  SOCK_DESTROY of a
socket whose namespace is mid-dump is also recorded in `violations` (the
ss -K bug: destroying during the walk shifts the hash chains).

What it does not emulate
------------------------
Hash-table order and chain shifts (records come in table order), sockets
other than TCP, any attribute but the recorded ones, tcp_info fields other
than the state and the three ages tcpidle reads, the passage of time (ages
change only when a test changes them), receive-queue overflow (ENOBUFS) and
lost acks, partial sends, NETLINK_EXT_ACK, multicast, and the real
namespaces, capabilities and BPF.  The kernel tier (tests/kernel) covers
those with real sockets.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from tcpidle import diag, selectors

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")

NLH = struct.Struct("=IHHII")
RTA = struct.Struct("=HH")
I32 = struct.Struct("=i")
REQ_V2 = struct.Struct("=BBBxI48s")  # family, protocol, ext, pad, states, sockid
REQ_V1 = struct.Struct("=BBBB48sII")  # family, src_len, dst_len, ext, sockid, states, dbs
NLM_F_MULTI = 0x02
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
NETLINK_CAP_ACK = 10
# Offsets in a whole record (nlmsghdr included).
_FAMILY, _STATE, _SOCKID, _UID, _INODE, _ATTRS = 16, 17, 20, 80, 84, 88
# tcp_info fields, from the start of the INET_DIAG_INFO payload.
_TI_STATE, _TI_SENT, _TI_RECV, _TI_ACK = 0, 44, 52, 56
DEFAULT_CHUNK = 32768  # what one recv() of a dump carries at most (one skb)
_RMEM_MAX = 212992  # net.core.rmem_max's default: what SO_RCVBUF is capped at


def load_records(name: str) -> List[bytes]:
    """The inet_diag_msg records of one recorded dump, each a whole netlink message."""
    with open(os.path.join(DATA, name), "rb") as f:
        buf = f.read()
    out, off = [], 0
    while off < len(buf):
        n, t, _f, _s, _p = NLH.unpack_from(buf, off)
        if t == diag.SOCK_DIAG_BY_FAMILY:
            out.append(buf[off:off + n])
        off += (n + 3) & ~3
    return out


def _attrs(msg: bytes):
    """(offset, length, type) of each attribute of a record."""
    a = _ATTRS
    while a + 4 <= len(msg):
        n, t = RTA.unpack_from(msg, a)
        yield a, n, t
        a += (n + 3) & ~3


@dataclass
class FakeTcp:
    """One TCP socket of the fake kernel, made from a recorded record.

    Ages are tcp_info's milliseconds since the event (None: no tcp_info, as
    for TIME_WAIT).  `destroy_errno` / `lookup_errno`: answer this errno to
    SOCK_DESTROY / a lookup of this socket instead of doing it.
    """

    template: bytes
    family: int
    state: int
    cookie: int
    sport: int
    dport: int
    src: str
    dst: str
    uid: int
    inode: int
    last_data_recv_ms: Optional[int]
    last_ack_recv_ms: Optional[int]
    last_data_sent_ms: Optional[int]
    destroy_errno: int = 0
    lookup_errno: int = 0
    # An orphaned socket on a kernel before 6.11: tcp_abort skips it, yet
    # SOCK_DESTROY is acked 0 and the socket stays.
    survives_destroy: bool = False

    @property
    def key(self) -> Tuple[int, int, int, bytes, bytes]:
        return (self.family, self.sport, self.dport, _packed(self.family, self.src),
                _packed(self.family, self.dst))

    def receive(self) -> None:
        """Data arrives now: tcp_info's receive ages drop to 0."""
        self.last_data_recv_ms = 0
        self.last_ack_recv_ms = 0

    def sockid(self, cookie: Optional[int] = None) -> bytes:
        c = self.cookie if cookie is None else cookie
        src, dst = _packed(self.family, self.src), _packed(self.family, self.dst)
        return struct.pack("!HH16s16s", self.sport, self.dport, src, dst) + struct.pack(
            "=III", 0, c & 0xFFFFFFFF, c >> 32)

    def message(self, msgtype: int, flags: int, seq: int, pid: int, want_info: bool) -> bytes:
        """This socket as the kernel would send it: the template, rewritten."""
        b = bytearray(self.template[:_ATTRS])
        b[_FAMILY] = self.family
        b[_STATE] = self.state
        b[_SOCKID:_SOCKID + 48] = self.sockid()
        struct.pack_into("=II", b, _UID, self.uid, self.inode)
        for a, n, t in _attrs(self.template):
            chunk = bytearray(self.template[a:a + ((n + 3) & ~3)])
            if t == diag.INET_DIAG_INFO:
                if not want_info or self.last_data_recv_ms is None:
                    continue
                chunk[4 + _TI_STATE] = self.state
                for off, value in ((_TI_SENT, self.last_data_sent_ms),
                                   (_TI_RECV, self.last_data_recv_ms),
                                   (_TI_ACK, self.last_ack_recv_ms)):
                    struct.pack_into("=I", chunk, 4 + off, value or 0)
            b += chunk
        NLH.pack_into(b, 0, len(b), msgtype, flags, seq, pid)
        return bytes(b)


def _packed(family: int, text: str) -> bytes:
    return socket.inet_pton(family, text).ljust(16, b"\0")


@dataclass
class Event:
    """One thing the fake kernel was asked: a dump, or one send() of exact requests."""

    kind: str  # "dump", "destroy" or "lookup"
    ns: "FakeNamespace"
    cookies: List[int] = field(default_factory=list)  # dump: returned; else: asked about
    answers: List[int] = field(default_factory=list)  # exact requests: errno each (0 = done)
    hit: List[Optional[int]] = field(default_factory=list)  # exact: cookie of the socket found
    request: Optional[dict] = None  # dump: the parsed request
    done: bool = False  # dump: NLMSG_DONE was read


class FakeNamespace:
    """One network namespace of the fake kernel: its socket table and its quirks."""

    def __init__(self, kernel: "FakeKernel", inode: int, name: str):
        self.kernel = kernel
        self.inode = inode
        self.name = name
        self.sockets: List[FakeTcp] = []
        self.destroy_supported = True  # False: no CONFIG_INET_DIAG_DESTROY (EOPNOTSUPP)
        self.capable = True  # False: no CAP_NET_ADMIN over this namespace (EPERM)
        self.legacy_dump = True  # False: TCPDIAG_GETSOCK refused (EINVAL)
        self.chunk = DEFAULT_CHUNK
        self.dumping = 0  # dumps in progress (requested, NLMSG_DONE not read yet)

    def __repr__(self) -> str:
        return "<FakeNamespace %s>" % self.name

    # -- building the table

    def add(self, template: bytes, **fields) -> FakeTcp:
        """A socket from a recorded record; `fields` override what it recorded."""
        sk = self.kernel.decode_template(template)
        for k, v in fields.items():
            if not hasattr(sk, k):
                raise TypeError("FakeTcp has no field %r" % k)
            setattr(sk, k, v)
        if "cookie" not in fields:
            sk.cookie = self.kernel.new_cookie()
        self.sockets.append(sk)
        return sk

    def replay(self, name: str) -> List[FakeTcp]:
        """Every socket of a recorded dump (tests/data/NAME), as recorded (cookies included)."""
        return [self.add(t, cookie=self.kernel.decode_template(t).cookie)
                for t in load_records(name)]

    def established(self, family: int, n: int, dport: int, idle_ms: int = 60_000,
                    first_sport: int = 20000, **fields) -> List[FakeTcp]:
        """`n` ESTABLISHED sockets to `dport`, cloned from a recorded one, idle `idle_ms`."""
        template = self.kernel.template(family, 1)
        loop = "127.0.0.1" if family == socket.AF_INET else "::1"
        out = []
        for i in range(n):
            kw = dict(state=1, sport=first_sport + i, dport=dport, src=loop, dst=loop, uid=0,
                      inode=self.kernel.new_inode(), last_data_recv_ms=idle_ms,
                      last_ack_recv_ms=idle_ms, last_data_sent_ms=idle_ms)
            kw.update(fields)
            out.append(self.add(template, **kw))
        return out

    def find(self, key) -> Optional[FakeTcp]:
        for sk in self.sockets:
            if sk.key == key:
                return sk
        return None

    # -- the kernel's side of requests

    def select(self, families: Sequence[int], states: int, bytecode: bytes) -> List[FakeTcp]:
        return [sk for sk in self.sockets
                if sk.family in families and states & (1 << sk.state)
                and (not bytecode or selectors.run_bytecode(bytecode, sk.sport, sk.dport))]


class FakeKernel:
    """Namespaces, the event log, and the factory that replaces diag's socket creation."""

    def __init__(self):
        self.events: List[Event] = []
        self.violations: List[str] = []
        self.removed: List[int] = []  # cookies of the sockets SOCK_DESTROY removed
        self.on_event: List[Callable[[Event], None]] = []
        self._cookies = itertools.count(1 << 20)
        self._inodes = itertools.count(7_000_000)
        self._ports = itertools.count(1 << 16)
        self.own = FakeNamespace(self, os.stat("/proc/self/ns/net").st_ino, "own")
        self.namespaces: Dict[int, FakeNamespace] = {self.own.inode: self.own}
        self._templates: Dict[Tuple[int, int], bytes] = {}
        for name in ("dump_v4.bin", "dump_v6.bin"):
            for t in load_records(name):
                self._templates.setdefault((t[_FAMILY], t[_STATE]), t)
        self.sockets_opened = 0

    def new_cookie(self) -> int:
        return next(self._cookies)

    def new_inode(self) -> int:
        return next(self._inodes)

    def template(self, family: int, state: int) -> bytes:
        """A recorded record of that family and state."""
        return self._templates[(family, state)]

    def add_namespace(self, path: str, name: Optional[str] = None) -> FakeNamespace:
        """A namespace reached through the file at `path` (any file: it is known by its inode)."""
        inode = os.stat(path).st_ino
        ns = self.namespaces[inode] = FakeNamespace(self, inode, name or path)
        return ns

    @staticmethod
    def decode_template(t: bytes) -> FakeTcp:
        sk = diag.decode_dump(t + NLH.pack(20, diag.NLMSG_DONE, NLM_F_MULTI, 0, 0) + b"\0" * 4)[0]
        return FakeTcp(template=t, family=sk.family, state=sk.state, cookie=sk.cookie,
                       sport=sk.sport, dport=sk.dport, src=sk.src, dst=sk.dst, uid=sk.uid,
                       inode=sk.inode, last_data_recv_ms=sk.last_data_recv_ms,
                       last_ack_recv_ms=sk.last_ack_recv_ms,
                       last_data_sent_ms=sk.last_data_sent_ms)

    # -- what tests look at

    def of_kind(self, kind: str) -> List[Event]:
        return [e for e in self.events if e.kind == kind]

    def destroyed(self) -> List[int]:
        """Cookies of the sockets SOCK_DESTROY really removed, in order."""
        return list(self.removed)

    def record(self, event: Event) -> None:
        self.events.append(event)
        self.notify(event)

    def notify(self, event: Event) -> None:
        """Run the hooks: after each request is answered, and again when a dump's DONE is read."""
        for hook in list(self.on_event):
            hook(event)

    # -- the injection points

    def open_diag(self, netns_fd: Optional[int], label) -> diag.DiagSocket:
        """A scope.OpenDiag: a real DiagSocket whose netlink sockets are this kernel's."""
        return diag.DiagSocket(netns_fd=netns_fd, netns_label=label, open_socket=self.open_netlink)

    def open_netlink(self, netns_fd: Optional[int], rcvbuf: int, sndbuf: int = 0) -> "FakeSocket":
        """A FakeSocket in the namespace of `netns_fd`, as diag._open_netlink makes real ones."""
        if netns_fd is None:
            ns = self.own
        else:
            inode = os.fstat(netns_fd).st_ino
            if inode not in self.namespaces:
                raise OSError(errno.EINVAL, "setns: not a namespace of the fake kernel")
            ns = self.namespaces[inode]
        s = FakeSocket(self, ns, next(self._ports))
        for opt, size in ((diag.SO_RCVBUFFORCE, rcvbuf), (diag.SO_SNDBUFFORCE, sndbuf)):
            if size > 0:
                s.setsockopt(socket.SOL_SOCKET, opt, size)
        s.bind((0, 0))
        self.sockets_opened += 1
        return s


class FakeSocket:
    """The NETLINK_SOCK_DIAG socket object diag uses: send, recv_into, sockopts."""

    def __init__(self, kernel: FakeKernel, ns: FakeNamespace, portid: int):
        self.kernel = kernel
        self.ns = ns
        self.portid = portid
        self.queue: List[bytes] = []
        self.cap_ack = False
        self.bufs = {socket.SO_RCVBUF: _RMEM_MAX, socket.SO_SNDBUF: _RMEM_MAX}
        self._dump = None  # (event, remaining records, msgtype, seq, want_info)
        self._wake_r, self._wake_w = socket.socketpair()  # a real fd, for select()
        self.closed = False

    # -- socket API

    def setsockopt(self, level: int, opt: int, value) -> None:
        if level == socket.SOL_SOCKET:
            target = {diag.SO_RCVBUFFORCE: socket.SO_RCVBUF,
                      diag.SO_SNDBUFFORCE: socket.SO_SNDBUF}.get(opt, opt)
            size = value if opt != target else min(value, _RMEM_MAX)
            self.bufs[target] = size
        elif level == diag.SOL_NETLINK and opt == NETLINK_CAP_ACK:
            self.cap_ack = bool(value)

    def getsockopt(self, level: int, opt: int) -> int:
        return 2 * self.bufs[opt]  # the kernel doubles it for bookkeeping

    def bind(self, addr) -> None:
        pass

    def fileno(self) -> int:
        return self._wake_r.fileno()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._dump is not None:
                self.ns.dumping -= 1
                self._dump = None
            self._wake_r.close()
            self._wake_w.close()

    def send(self, data) -> int:
        data = bytes(data)
        off = 0
        exact: Dict[int, Event] = {}
        while off < len(data):
            n, t, flags, seq, _pid = NLH.unpack_from(data, off)
            if n < 16 or off + n > len(data):
                raise OSError(errno.EINVAL, "fake netlink: malformed request")
            msg = data[off:off + n]
            if flags & diag.NLM_F_DUMP == diag.NLM_F_DUMP:
                self._start_dump(msg, t, seq)
            else:
                self._exact(msg, t, flags, seq, exact)
            off += (n + 3) & ~3
        for ev in exact.values():
            self.kernel.record(ev)
        return len(data)

    def recv_into(self, buf, nbytes: int = 0, flags: int = 0) -> int:
        if not self.queue and self._dump is not None:
            self._next_chunk()
        if not self.queue:
            if flags & socket.MSG_DONTWAIT:
                raise BlockingIOError(errno.EAGAIN, "fake netlink: nothing queued")
            raise AssertionError("fake netlink: a blocking recv() with nothing to answer")
        msg = self.queue.pop(0)
        size = len(buf) if not nbytes else nbytes
        n = min(size, len(msg))
        buf[:n] = msg[:n]
        return len(msg) if flags & socket.MSG_TRUNC else n

    # -- dumps

    def _start_dump(self, msg: bytes, msgtype: int, seq: int) -> None:
        if msgtype == diag.TCPDIAG_GETSOCK:
            family, _sl, _dl, ext, _id, states, _dbs = REQ_V1.unpack_from(msg, 16)
            attrs_at = 16 + REQ_V1.size
            if not self.ns.legacy_dump:
                return self._refuse(msg, seq, errno.EINVAL)
            families = (socket.AF_INET, socket.AF_INET6) if family == 0 else (family,)
        elif msgtype == diag.SOCK_DIAG_BY_FAMILY:
            family, proto, ext, states, _id = REQ_V2.unpack_from(msg, 16)
            attrs_at = 16 + REQ_V2.size
            if family not in (socket.AF_INET, socket.AF_INET6):
                return self._refuse(msg, seq, errno.ENOENT)  # no handler for that family
            if proto != socket.IPPROTO_TCP:
                raise NotImplementedError("fake netlink: only TCP is emulated")
            families = (family,)
        else:
            return self._refuse(msg, seq, errno.EINVAL)
        bytecode = b""
        for a, n, t in _attrs_from(msg, attrs_at):
            if t == diag.INET_DIAG_REQ_BYTECODE:
                bytecode = msg[a + 4:a + n]
        if bytecode:
            try:
                selectors.audit_bytecode(bytecode)
            except ValueError:
                return self._refuse(msg, seq, errno.EINVAL)
        want_info = bool(ext & (1 << (diag.INET_DIAG_INFO - 1)))
        request = dict(type=msgtype, families=families, states=states, bytecode=bytecode,
                       want_info=want_info)
        event = Event("dump", self.ns, request=request)
        if self._dump is not None:
            self.ns.dumping -= 1
        self._dump = (event, list(self.ns.select(families, states, bytecode)), msgtype, seq,
                      want_info)
        self.ns.dumping += 1
        self.kernel.record(event)

    def _next_chunk(self) -> None:
        event, left, msgtype, seq, want_info = self._dump
        out = bytearray()
        while left:
            rec = left[0].message(msgtype, NLM_F_MULTI, seq, self.portid, want_info)
            if out and len(out) + len(rec) > self.ns.chunk:
                break
            left.pop(0)
            event.cookies.append(_cookie_of(rec))
            out += rec
        if not left:
            done = NLH.pack(20, diag.NLMSG_DONE, NLM_F_MULTI, seq, self.portid) + I32.pack(0)
            if len(out) + len(done) <= self.ns.chunk or not out:
                out += done
                event.done = True
                self.ns.dumping -= 1
                self._dump = None
                self.kernel.notify(event)
        self.queue.append(bytes(out))

    def _refuse(self, msg: bytes, seq: int, err: int) -> None:
        self.kernel.record(Event("dump", self.ns, answers=[err], done=True))
        self._error(msg, seq, err)

    # -- exact requests

    def _exact(self, msg: bytes, msgtype: int, flags: int, seq: int,
               events: Dict[int, Event]) -> None:
        if msgtype not in (diag.SOCK_DESTROY, diag.SOCK_DIAG_BY_FAMILY):
            return self._error(msg, seq, errno.EINVAL)
        family, proto, ext, _states, sockid = REQ_V2.unpack_from(msg, 16)
        kind = "destroy" if msgtype == diag.SOCK_DESTROY else "lookup"
        event = events.setdefault(msgtype, Event(kind, self.ns))
        sport, dport, src, dst, _if, c0, c1 = struct.unpack("!HH16s16sI", sockid[:40]) + \
            struct.unpack("=II", sockid[40:])
        width = 4 if family == socket.AF_INET else 16
        key = (family, sport, dport, src[:width].ljust(16, b"\0"), dst[:width].ljust(16, b"\0"))
        sk = self.ns.find(key)
        event.cookies.append(c0 | (c1 << 32))
        event.hit.append(sk.cookie if sk is not None else None)
        err = self._check(kind, sk, c0, c1)
        if kind == "destroy" and not err and self.ns.dumping:
            self.kernel.violations.append(
                "SOCK_DESTROY of cookie %d while a dump of %s was in progress" % (sk.cookie, self.ns))
        event.answers.append(err)
        if err:
            return self._error(msg, seq, err)
        if kind == "destroy":
            if not sk.survives_destroy:
                self.ns.sockets.remove(sk)
                self.kernel.removed.append(sk.cookie)
            if flags & diag.NLM_F_ACK:
                self._error(msg, seq, 0)
        else:
            want_info = bool(ext & (1 << (diag.INET_DIAG_INFO - 1)))
            self.queue.append(sk.message(diag.SOCK_DIAG_BY_FAMILY, 0, seq, self.portid, want_info))

    def _check(self, kind: str, sk: Optional[FakeTcp], c0: int, c1: int) -> int:
        if kind == "destroy" and not self.ns.destroy_supported:
            return errno.EOPNOTSUPP  # inet_diag_cmd_exact: no ->destroy handler
        if sk is None:
            return errno.ENOENT
        if not (c0 == INET_DIAG_NOCOOKIE and c1 == INET_DIAG_NOCOOKIE) and \
                (c0, c1) != (sk.cookie & 0xFFFFFFFF, sk.cookie >> 32):
            return errno.ENOENT  # sock_diag_check_cookie: ESTALE, reported as ENOENT
        if kind == "destroy":
            if not self.ns.capable:
                return errno.EPERM  # sock_diag_destroy: netlink_net_capable(CAP_NET_ADMIN)
            return sk.destroy_errno
        return sk.lookup_errno

    def _error(self, msg: bytes, seq: int, err: int) -> None:
        """Queue an NLMSG_ERROR (an ack when err is 0) for request `msg`."""
        echoed = msg[:16] if (self.cap_ack or err == 0) else msg
        body = I32.pack(-err) + echoed
        self.queue.append(NLH.pack(16 + len(body), diag.NLMSG_ERROR, 0, seq, self.portid) + body)


def _attrs_from(msg: bytes, start: int):
    a = start
    while a + 4 <= len(msg):
        n, t = RTA.unpack_from(msg, a)
        if n < 4:
            break
        yield a, n, t
        a += (n + 3) & ~3


def _cookie_of(rec: bytes) -> int:
    c0, c1 = struct.unpack_from("=II", rec, _SOCKID + 40)
    return c0 | (c1 << 32)
