"""tcpidle.diag against the real kernel (root; network namespaces it creates).

Sockets are made by this test thread after setns() into a throw-away
namespace (tidiag-k-*), and the thread always goes back; the DiagSocket
under test is opened with netns_fd, so the namespace hook is exercised by
every test.  Ground truth comes from the sockets themselves: getsockname /
getpeername, fstat().st_ino, getsockopt(SO_COOKIE), and what recv() says
after a destroy.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from tcpidle import diag, errors
from tcpidle.netns import entered_fd
from tcpidle.probe.features import release_at_least

from lab.netns import Netns as LabNetns, NetnsFactory, cookie_of
from tcpidle.model import AF_INET, AF_INET6, TcpState

pytestmark = pytest.mark.kernel

ALL = 0xFFFFFFFF
EST = 1 << TcpState.ESTABLISHED
LISTEN = 1 << TcpState.LISTEN
TW = 1 << TcpState.TIME_WAIT
FAMS = (AF_INET, AF_INET6)


def thread_netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


class Sockets:
    """Sockets made inside one lab namespace (tests/lab/netns.py); closed at teardown."""

    def __init__(self, ns: LabNetns):
        self.ns = ns
        self.name = ns.name
        self.fd = os.open("/run/netns/" + ns.name, os.O_RDONLY | os.O_CLOEXEC)
        self.socks = []

    @contextlib.contextmanager
    def inside(self):
        """Run the block with this thread in the namespace; always come back."""
        with entered_fd(self.fd):
            yield

    def sock(self, family=AF_INET) -> socket.socket:
        with self.inside():
            s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5)
        self.socks.append(s)
        return s

    def listener(self, family, host, port, v6only=True) -> socket.socket:
        s = self.sock(family)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        s.bind((host, port))
        s.listen(4096)
        return s

    def pair(self, listener, family, host, port, bind=None, reuse=False):
        c = self.sock(family)
        if reuse:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if bind:
            c.bind(bind)
        c.connect((host, port))
        a, _ = listener.accept()
        a.settimeout(5)
        self.socks.append(a)
        return c, a

    def diag(self) -> diag.DiagSocket:
        return diag.DiagSocket(netns_fd=self.fd, netns_label=self.name)

    def close(self):
        for s in self.socks:
            s.close()
        os.close(self.fd)


@pytest.fixture
def namespaces():
    factory = NetnsFactory("tidiag-k-")
    made = []

    def make():
        made.append(Sockets(factory()))
        return made[-1]

    yield make
    for n in made:
        n.close()
    factory.cleanup()


@pytest.fixture
def ns(namespaces):
    return namespaces()


@pytest.fixture
def ns2(namespaces):
    return namespaces()


def truth(s: socket.socket, state: int):
    """What INET_DIAG must report for socket s, from the socket itself."""
    local, peer = s.getsockname(), None
    try:
        peer = s.getpeername()
    except OSError:
        pass
    zero = "::" if s.family == AF_INET6 else "0.0.0.0"
    return (
        s.family, state, local[0], local[1],
        peer[0] if peer else zero, peer[1] if peer else 0,
        os.fstat(s.fileno()).st_ino,
    )


def seen(rec):
    return (rec.family, rec.state, rec.src, rec.sport, rec.dst, rec.dport, rec.inode)


def by_cookie(records):
    return {r.cookie: r for r in records}


# --- dump ---------------------------------------------------------------------


def test_dump_finds_exactly_our_sockets(ns):
    mine = {}
    l4 = ns.listener(AF_INET, "127.0.0.1", 4000)
    l6 = ns.listener(AF_INET6, "::1", 6000)
    ld = ns.listener(AF_INET6, "::", 6001, v6only=False)
    for lst in (l4, l6, ld):
        mine[cookie_of(lst)] = truth(lst, TcpState.LISTEN)
    conns = [
        ns.pair(l4, AF_INET, "127.0.0.1", 4000, bind=("127.0.0.3", 0)),
        ns.pair(l4, AF_INET, "127.0.0.1", 4000),
        ns.pair(l6, AF_INET6, "::1", 6000),
        ns.pair(ld, AF_INET, "127.0.0.1", 6001),  # accepted side is v4-mapped AF_INET6
    ]
    for c, a in conns:
        for s in (c, a):
            mine[cookie_of(s)] = truth(s, TcpState.ESTABLISHED)
    with ns.diag() as ds:
        got = by_cookie(ds.dump_sockets(FAMS, ALL))
    assert set(got) == set(mine)
    for cookie, want in mine.items():
        rec = got[cookie]
        assert seen(rec) == want
        assert rec.uid == 0 and rec.netns == ns.name
        assert rec.last_data_recv_ms is not None and rec.last_ack_recv_ms is not None
    assert any(r.src.startswith("::ffff:127.") for r in got.values())


def _mixed_sockets(ns):
    """Listeners, connections and a TIME_WAIT socket of both families (and v4-mapped)."""
    l4 = ns.listener(AF_INET, "127.0.0.1", 4000)
    l6 = ns.listener(AF_INET6, "::1", 6000)
    ld = ns.listener(AF_INET6, "::", 6001, v6only=False)
    for _ in range(3):
        ns.pair(l4, AF_INET, "127.0.0.1", 4000)
        ns.pair(l6, AF_INET6, "::1", 6000)
        ns.pair(ld, AF_INET, "127.0.0.1", 6001)
    twc, twa = ns.pair(l6, AF_INET6, "::1", 6000)
    twc.close()  # active close: twc ends in TIME_WAIT once twa closes too
    assert twa.recv(1) == b""
    twa.close()


def _identity(rec):
    return (rec.cookie, rec.family, rec.state, rec.src, rec.sport, rec.dst, rec.dport,
            rec.inode, rec.uid, rec.raw_id, rec.last_data_recv_ms is None)


def test_both_families_come_from_one_walk_like_two_per_family_dumps(ns, record_property):
    _mixed_sockets(ns)
    dport_6000 = struct.pack("=BBHBBH", 12, 8, 12, 0, 0, 6000)  # INET_DIAG_BC_D_EQ
    with ns.diag() as ds:
        for bc in (b"", dport_6000):
            per_family = ds.dump(AF_INET, ALL, bc) + ds.dump(AF_INET6, ALL, bc)
            walks = ds.walks
            one_walk = ds.dump_sockets(FAMS, ALL, bc)
            assert ds.walks == walks + 1
            assert sorted(map(_identity, one_walk)) == sorted(map(_identity, per_family))
        assert {r.family for r in ds.dump_sockets(FAMS, ALL)} == set(FAMS)
        # 3 listeners, 9 connections, one TIME_WAIT socket
        assert len(ds.dump_sockets(FAMS, ALL)) == 3 + 2 * 9 + 1
        assert {r.dport for r in ds.dump_sockets(FAMS, ALL, dport_6000)} == {6000}
    assert diag.DiagSocket.single_walk
    record_property("lab_one_walk_dump", "yes")


def test_a_refused_one_walk_dump_falls_back_to_per_family_dumps(ns, monkeypatch, caplog):
    # A kernel without the legacy request refuses it; here the kernel really
    # refuses an unknown message type (EINVAL) sent in its place.
    _mixed_sockets(ns)
    with ns.diag() as ds:
        want = sorted(map(_identity, ds.dump(AF_INET, ALL) + ds.dump(AF_INET6, ALL)))
        monkeypatch.setattr(diag, "TCPDIAG_GETSOCK", 99)
        monkeypatch.setattr(diag.DiagSocket, "single_walk", True)
        with caplog.at_level("INFO", logger="tcpidle"):
            walks = ds.walks
            got = ds.dump_sockets(FAMS, ALL)
            assert ds.walks == walks + 3  # refused, then one per family
            assert sorted(map(_identity, got)) == want
            assert diag.DiagSocket.single_walk is False
            walks = ds.walks
            assert sorted(map(_identity, ds.dump_sockets(FAMS, ALL))) == want
            assert ds.walks == walks + 2  # not asked again
    assert [r.getMessage() for r in caplog.records].count(
        "kernel refused the one-walk dump of both families "
        "(INET_DIAG dump request: Invalid argument): dumping per family") == 1


def test_a_bad_bytecode_does_not_disable_the_one_walk_dump(ns):
    with ns.diag() as ds:
        with pytest.raises(errors.NetlinkError) as ei:
            ds.dump_sockets(FAMS, ALL, struct.pack("=BBH", 12, 0, 0))
        assert ei.value.errno == errno.EINVAL
    assert diag.DiagSocket.single_walk


def test_tcp_info_times_follow_traffic(ns):
    lst = ns.listener(AF_INET, "127.0.0.1", 4000)
    c, a = ns.pair(lst, AF_INET, "127.0.0.1", 4000)
    c.sendall(b"x")
    a.recv(1)
    time.sleep(0.4)
    a.sendall(b"y")
    c.recv(1)
    with ns.diag() as ds:
        got = by_cookie(ds.dump(AF_INET, EST))
    rc, ra = got[cookie_of(c)], got[cookie_of(a)]
    # c sent 400 ms ago and received just now; a the other way round.
    assert rc.last_data_sent_ms >= 350 and rc.last_data_recv_ms < 200
    assert ra.last_data_recv_ms >= 350 and ra.last_data_sent_ms < 200


# The fields of struct tcp_info the decoder reads, at the uapi header's offsets
# (written out here, not taken from diag, so that a wrong offset shows).
_TCP_INFO = struct.Struct("=2xBBB19xI72xI124xI")  # retransmits probes backoff unacked total_retrans snd_wnd
SIOCINQ, SIOCOUTQ = 0x541B, 0x5411
TCP_KEEPIDLE = 4


def tcp_info_of(s: socket.socket):
    rtx, probes, backoff, unacked, total, wnd = _TCP_INFO.unpack(
        s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size))
    return {"retransmits": rtx, "probes": probes, "backoff": backoff, "unacked": unacked,
            "total_retrans": total, "snd_wnd": wnd}


def queued(s: socket.socket, request: int) -> int:
    import fcntl

    return struct.unpack("=i", fcntl.ioctl(s.fileno(), request, b"\0" * 4))[0]


def test_vitals_match_what_the_sockets_say_of_themselves(ns):
    """A keep-alive connection, and one stalled on a zero window (the reader
    stops reading): the dump's timers, queues and tcp_info fields agree with
    getsockopt(TCP_INFO) and SIOCINQ/SIOCOUTQ of the same sockets."""
    lst = ns.listener(AF_INET, "127.0.0.1", 4100)
    ka, ka_peer = ns.pair(lst, AF_INET, "127.0.0.1", 4100)
    ka.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    ka.setsockopt(socket.IPPROTO_TCP, TCP_KEEPIDLE, 30)
    # Small buffers so the window closes after a few KiB.
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    zw, reader = ns.pair(lst, AF_INET, "127.0.0.1", 4100)
    zw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    zw.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sent += zw.send(b"x" * 4096)
        except BlockingIOError:
            time.sleep(0.3)  # let the last segments be acked with the closing window
            try:
                sent += zw.send(b"x" * 4096)
                continue
            except BlockingIOError:
                break
    assert sent > 0
    # The zero-window probe timer runs once nothing is in flight.
    for _ in range(50):
        if tcp_info_of(zw)["snd_wnd"] == 0 and tcp_info_of(zw)["unacked"] == 0:
            break
        time.sleep(0.1)
    before = {"ka": tcp_info_of(ka), "zw": tcp_info_of(zw)}
    with ns.diag() as ds:
        got = by_cookie(ds.dump_sockets(FAMS, EST))
    after = {"ka": tcp_info_of(ka), "zw": tcp_info_of(zw)}
    v_ka, v_zw = got[cookie_of(ka)].vitals, got[cookie_of(zw)].vitals
    v_reader, v_plain = got[cookie_of(reader)].vitals, got[cookie_of(ka_peer)].vitals

    assert v_ka.timer == 2 and 0 < v_ka.timer_expires_ms <= 30000, v_ka  # keep-alive armed
    assert v_plain.timer == 0 and v_plain.timer_expires_ms == 0, v_plain  # nothing armed
    assert v_zw.timer == 4, v_zw  # probing a zero window
    assert v_zw.snd_wnd == 0 and before["zw"]["snd_wnd"] == 0
    assert v_ka.snd_wnd == before["ka"]["snd_wnd"] > 0
    for name, v in (("ka", v_ka), ("zw", v_zw)):
        for field in ("retransmits", "probes", "backoff", "unacked", "total_retrans"):
            lo, hi = sorted((before[name][field], after[name][field]))
            assert lo <= getattr(v, field) <= hi, (name, field, v)
    assert v_zw.backoff >= 1 or after["zw"]["backoff"] == 0  # the probe timer backs off
    assert v_zw.send_q == queued(zw, SIOCOUTQ) > 0
    assert v_reader.recv_q == queued(reader, SIOCINQ) > 0
    assert v_ka.send_q == v_ka.recv_q == 0


def test_dump_sees_only_its_namespace_and_restores_the_thread(ns, ns2):
    a = ns.listener(AF_INET, "127.0.0.1", 4000)
    b = ns2.listener(AF_INET, "127.0.0.1", 4000)
    before = thread_netns_inode()
    with ns.diag() as d1, ns2.diag() as d2:
        assert thread_netns_inode() == before
        assert [r.cookie for r in d1.dump(AF_INET, ALL)] == [cookie_of(a)]
        assert [r.cookie for r in d2.dump(AF_INET, ALL)] == [cookie_of(b)]
        assert d1.dump(AF_INET6, ALL) == []
    assert thread_netns_inode() == before


def test_states_mask_filters(ns):
    lst = ns.listener(AF_INET, "127.0.0.1", 4000)
    c, a = ns.pair(lst, AF_INET, "127.0.0.1", 4000)
    twc, twa = ns.pair(lst, AF_INET, "127.0.0.1", 4000)
    tw_cookie, tw_port = cookie_of(twc), twc.getsockname()[1]
    twc.close()  # active close: the client ends in TIME_WAIT
    assert twa.recv(1) == b""
    twa.close()
    with ns.diag() as ds:
        listen = ds.dump(AF_INET, LISTEN)
        est = ds.dump(AF_INET, EST)
        tw = ds.dump(AF_INET, TW)
        both = ds.dump(AF_INET, LISTEN | EST)
        none = ds.dump(AF_INET, 1 << TcpState.SYN_SENT)
    assert [r.cookie for r in listen] == [cookie_of(lst)]
    assert {r.cookie for r in est} == {cookie_of(c), cookie_of(a)}
    assert [(r.cookie, r.sport, r.state) for r in tw] == [(tw_cookie, tw_port, TcpState.TIME_WAIT)]
    # TIME_WAIT sockets carry no tcp_info and no inode.
    assert tw[0].last_data_recv_ms is None and tw[0].inode == 0
    assert {r.cookie for r in both} == {cookie_of(lst), cookie_of(c), cookie_of(a)}
    assert none == []


def test_bytecode_is_carried_and_bad_bytecode_is_an_error(ns):
    lst = ns.listener(AF_INET, "127.0.0.1", 4000)
    l2 = ns.listener(AF_INET, "127.0.0.1", 4001)
    c, _a = ns.pair(lst, AF_INET, "127.0.0.1", 4000)
    ns.pair(l2, AF_INET, "127.0.0.1", 4001)
    # INET_DIAG_BC_D_EQ (12) {code, yes=8, no=12 (reject)} then {0, 0, port}.
    dport_4000 = struct.pack("=BBHBBH", 12, 8, 12, 0, 0, 4000)
    with ns.diag() as ds:
        assert [r.cookie for r in ds.dump(AF_INET, ALL, dport_4000)] == [cookie_of(c)]
        with pytest.raises(errors.NetlinkError) as ei:
            ds.dump(AF_INET, ALL, struct.pack("=BBH", 12, 0, 0))  # yes=0: rejected by the audit
        assert ei.value.errno == errno.EINVAL
        # The socket is still usable after the error.
        assert len(ds.dump(AF_INET, ALL)) == 6  # 2 listeners, 2 connections
        per_family = ds.dump_sockets(FAMS, ALL, {AF_INET: dport_4000})
        assert [r.cookie for r in per_family] == [cookie_of(c)]
        assert [r.cookie for r in ds.dump_sockets(FAMS, ALL, lambda f: dport_4000)] == [cookie_of(c)]


def test_module_level_dump_sockets(ns):
    lst = ns.listener(AF_INET6, "::1", 6000)
    got = diag.dump_sockets(FAMS, LISTEN, netns_fd=ns.fd, netns_label="x")
    assert [(r.cookie, r.netns) for r in got] == [(cookie_of(lst), "x")]


# --- destroy ------------------------------------------------------------------

KINDS = {
    "ipv4": (AF_INET, "127.0.0.1", AF_INET, "127.0.0.1", True),
    "ipv6": (AF_INET6, "::1", AF_INET6, "::1", True),
    # A v4 client of a dual-stack listener: kill the accepted, v4-mapped socket.
    "v4mapped": (AF_INET6, "::", AF_INET, "127.0.0.1", False),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_destroy_aborts_owner_and_resets_peer(ns, kind, record_property):
    lfam, lhost, cfam, chost, v6only = KINDS[kind]
    lst = ns.listener(lfam, lhost, 5000, v6only=v6only)
    c, a = ns.pair(lst, cfam, chost, 5000)
    victim, peer = (c, a) if kind != "v4mapped" else (a, c)
    with ns.diag() as ds:
        recs = by_cookie(ds.dump_sockets(FAMS, EST))
        rec = recs[cookie_of(victim)]
        if kind == "v4mapped":
            assert rec.family == AF_INET6 and rec.src == "::ffff:127.0.0.1"
        assert ds.destroy([rec]) == [0]
        with pytest.raises(OSError) as owner:
            victim.recv(1)
        assert owner.value.errno == errno.ECONNABORTED
        with pytest.raises(OSError) as other:
            peer.recv(1)
        assert other.value.errno == errno.ECONNRESET
        assert ds.destroy([rec]) == [errno.ENOENT]
        assert ds.dump_sockets(FAMS, EST) == []
    record_property("lab_sock_destroy", "yes")


def test_stale_cookie_is_refused(ns):
    lst = ns.listener(AF_INET, "127.0.0.1", 5000)
    old_c, old_a = ns.pair(lst, AF_INET, "127.0.0.1", 5000, bind=("127.0.0.1", 40000), reuse=True)
    with ns.diag() as ds:
        old = by_cookie(ds.dump(AF_INET, EST))[cookie_of(old_c)]
        # Abortive close (RST): no TIME_WAIT anywhere, the 4-tuple is free at once.
        old_c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        old_c.close()
        with pytest.raises(ConnectionResetError):
            old_a.recv(1)
        old_a.close()
        assert ds.dump(AF_INET, ALL & ~LISTEN) == []
        new_c, new_a = ns.pair(lst, AF_INET, "127.0.0.1", 5000, bind=("127.0.0.1", 40000), reuse=True)
        new = by_cookie(ds.dump(AF_INET, EST))[cookie_of(new_c)]
        # Same 4-tuple and interface, different socket: only the cookie differs.
        assert (new.src, new.sport, new.dst, new.dport) == (old.src, old.sport, old.dst, old.dport)
        assert new.cookie != old.cookie and new.raw_id[:40] == old.raw_id[:40]
        assert ds.destroy([old]) == [errno.ENOENT]
        new_c.sendall(b"still here")
        assert new_a.recv(10) == b"still here"
        new_a.sendall(b"ok")
        assert new_c.recv(2) == b"ok"
        # The tuple lookup itself works: the current record does destroy it.
        assert ds.destroy([new]) == [0]
        with pytest.raises(ConnectionAbortedError):
            new_c.recv(1)


@pytest.mark.parametrize("batch", [256, 7])
def test_lookup_asks_the_kernel_again_about_each_socket(ns, batch):
    """Exact, cookie-checked lookups: fresh tcp_info for the live, ENOENT for the
    gone and for a socket whose 4-tuple now belongs to another one."""
    lst = ns.listener(AF_INET, "127.0.0.1", 5000)
    l6 = ns.listener(AF_INET6, "::1", 5000)
    pairs = [ns.pair(lst, AF_INET, "127.0.0.1", 5000) for _ in range(20)]
    pairs += [ns.pair(l6, AF_INET6, "::1", 5000) for _ in range(20)]
    dual = ns.listener(AF_INET6, "::", 5001, v6only=False)
    pairs += [ns.pair(dual, AF_INET, "127.0.0.1", 5001) for _ in range(5)]  # accepted: v4-mapped
    stale_c, stale_a = ns.pair(lst, AF_INET, "127.0.0.1", 5000, bind=("127.0.0.1", 40000), reuse=True)
    with ns.diag() as ds:
        before = by_cookie(ds.dump_sockets(FAMS, EST))
        time.sleep(0.3)
        woken = pairs[0][1]
        t_woken = time.monotonic()  # before the send: the receive is later
        pairs[0][0].sendall(b"x")  # the accepted end of pair 0 receives
        assert woken.recv(1) == b"x"
        gone_c, gone_a = pairs[-1]
        gone = before[cookie_of(gone_c)]
        closed = {cookie_of(gone_c), cookie_of(gone_a), cookie_of(stale_c), cookie_of(stale_a)}
        assert ds.destroy([gone]) == [0]
        stale = before[cookie_of(stale_c)]
        stale_c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stale_c.close()
        stale_a.close()
        new_c, _new_a = ns.pair(lst, AF_INET, "127.0.0.1", 5000, bind=("127.0.0.1", 40000), reuse=True)
        asked = [r for r in before.values()]
        answers = ds.lookup(asked, batch=batch)
        # ~10 ms here; hundreds under the kernel lab's emulated CPU
        since_wake_ms = (time.monotonic() - t_woken) * 1000 + 20  # + jiffy rounding
    assert len(answers) == len(asked) and ds.lost_answers == 0
    assert sum(r.src.startswith("::ffff:") for r in asked) == 5
    got = {r.cookie: a for r, a in zip(asked, answers)}
    assert got[gone.cookie] == errno.ENOENT
    assert got[stale.cookie] == errno.ENOENT  # same 4-tuple, another socket: not it
    for rec in asked:
        if rec.cookie in closed:  # the two destroyed or closed connections, both ends
            assert got[rec.cookie] == errno.ENOENT
            continue
        now = got[rec.cookie]
        assert now.cookie == rec.cookie and now.raw_id == rec.raw_id and now.netns == ns.name
        assert seen(now) == seen(rec)
        if rec.cookie == cookie_of(woken):
            assert now.last_data_recv_ms < since_wake_ms <= rec.last_data_recv_ms + 250 \
                + since_wake_ms
        else:  # tcp_info aged by the 0.3 s in between
            assert now.last_data_recv_ms >= rec.last_data_recv_ms + 250


@pytest.mark.parametrize("batch", [256, 1, 100000])
def test_batch_of_2000_destroys(ns, batch):
    n = 2000 if batch != 1 else 300
    l4 = ns.listener(AF_INET, "127.0.0.1", 5000)
    l6 = ns.listener(AF_INET6, "::1", 5000)
    b4 = ns.listener(AF_INET, "127.0.0.1", 5001)
    victims = [ns.pair(l4, AF_INET, "127.0.0.1", 5000)[0] for _ in range(n // 2)]
    victims += [ns.pair(l6, AF_INET6, "::1", 5000)[0] for _ in range(n - n // 2)]
    bystanders = [s for _ in range(20) for s in ns.pair(b4, AF_INET, "127.0.0.1", 5001)]
    keep = {cookie_of(s) for s in bystanders + [l4, l6, b4]}
    want = {cookie_of(s) for s in victims}
    with ns.diag() as ds:
        targets = [r for r in ds.dump_sockets(FAMS, EST) if r.dport == 5000]
        assert {r.cookie for r in targets} == want
        results = ds.destroy(targets, batch=batch)
        assert results == [0] * n
        assert ds.lost_answers == 0
        left = {r.cookie for r in ds.dump_sockets(FAMS, ALL)}
    # Exactly the victims are gone (their peers were reset and closed too).
    assert left == keep
    for s in victims:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNABORTED
    for s in bystanders:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def test_dropped_acks_are_never_reported_as_success(ns, monkeypatch):
    """Overflow the ack queue on purpose: the kernel drops acks (ENOBUFS).

    _ACK_TRUESIZE = 1 disables the batch sizing that normally prevents this;
    the receive buffer is the smallest the kernel allows.
    """
    monkeypatch.setattr(diag, "_ACK_TRUESIZE", 1)
    lst = ns.listener(AF_INET, "127.0.0.1", 5000)
    victims = [ns.pair(lst, AF_INET, "127.0.0.1", 5000)[0] for _ in range(400)]
    ds = diag.DiagSocket(netns_fd=ns.fd, rcvbuf=4096)
    with ds:
        targets = [r for r in ds.dump(AF_INET, EST) if r.dport == 5000]
        assert len(targets) == 400
        results = ds.destroy(targets, batch=400)
        assert ds.lost_answers > 0  # the overflow really happened
        # Lost acks were retried: a first destroy that worked reads ENOENT
        # on the retry; never a success that was not acknowledged.
        assert set(results) <= {0, errno.ENOENT}
        assert results.count(0) >= 400 - ds.lost_answers
        assert results.count(errno.ENOENT) <= ds.lost_answers
        assert ds.dump(AF_INET, EST) == []
    for s in victims:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNABORTED


def test_destroy_time_wait(ns, record_property):
    lst = ns.listener(AF_INET, "127.0.0.1", 5000)
    c, a = ns.pair(lst, AF_INET, "127.0.0.1", 5000)
    c.close()
    assert a.recv(1) == b""
    a.close()
    with ns.diag() as ds:
        tw = ds.dump(AF_INET, TW)
        assert len(tw) == 1
        if not release_at_least(os.uname().release, (6, 0)):
            # Before 6.0 the kernel's tcp_abort() cannot take a TIME_WAIT
            # socket: SOCK_DESTROY answers EOPNOTSUPP (Debian 5.10 in the lab),
            # and tcpidle reports it.
            assert ds.destroy(tw) == [errno.EOPNOTSUPP]
            assert len(ds.dump(AF_INET, TW)) == 1
            record_property("lab_time_wait_destroy", "no (EOPNOTSUPP)")
            return
        assert ds.destroy(tw) == [0]
        assert ds.dump(AF_INET, TW) == []
        assert ds.destroy(tw) == [errno.ENOENT]
    record_property("lab_time_wait_destroy", "yes")


def test_destroy_without_cap_net_admin_is_eperm(ns):
    lst = ns.listener(AF_INET, "127.0.0.1", 5000)
    c, a = ns.pair(lst, AF_INET, "127.0.0.1", 5000)
    with ns.diag() as ds:
        rec = by_cookie(ds.dump(AF_INET, EST))[cookie_of(c)]
    code = (
        "import sys, dataclasses; from tcpidle import diag\n"
        "from tcpidle.model import Socket\n"
        "r = Socket(cookie=0, family=%d, state=1, src='', sport=0, dst='', dport=0, inode=0, uid=0,"
        " raw_id=bytes.fromhex(%r))\n"
        "with diag.DiagSocket() as ds: print(ds.destroy([r])[0])\n" % (rec.family, rec.raw_id.hex())
    )
    out = subprocess.run(
        ["ip", "netns", "exec", ns.name, "setpriv", "--reuid=65534", "--regid=65534",
         "--clear-groups", "--inh-caps=-all", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == errno.EPERM
    c.sendall(b"alive")
    assert a.recv(5) == b"alive"


def test_destroy_nothing_and_closed_socket(ns):
    ds = ns.diag()
    assert ds.destroy([]) == []
    ds.close()
    with pytest.raises(ValueError):
        ds.dump(AF_INET, ALL)
