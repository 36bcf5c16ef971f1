"""The kill pass streams its dump: decided chunk by chunk, kept only where it must be.

A poll of 100,000 sockets used to hold a Socket and a Verdict for every one
of them until it ended (~1.6 KB each: 209 MB resident at 100k); now each
chunk of the dump is decided as it arrives (diag.DumpDecoder's sink,
Scope.stream) and counted into a Tally (tcpidle.tally), which keeps the
victims and the exposed only.  Checked here against the fake kernel
(tests/lab/fake_netlink.py), no root:

- a streamed scan decides exactly what deciding the whole dump at once
  decides (random tables, selectors and policies; with and without probe
  records, inline or from a map);
- while the dump streams, no socket outlives its chunk unless it is a
  victim or exposed; the kill pass keeps no verdict per socket;
- the decoder with a sink hands over every record once, in order, and
  keeps none itself.
"""

from __future__ import annotations

import collections
import random
import socket
import weakref

import pytest

from tcpidle import diag, engine as engine_mod, idle, middlebox, scope as scope_mod, selectors
from tcpidle.engine import Engine
from tcpidle.evidence import Evidence, InlineReader
from tcpidle.model import Activity, Policy, PortSet, Selector, TcpState
from tcpidle.passes import run_pass
from tcpidle.scope import Scope
from tests.lab.fake_netlink import FakeKernel, load_records

V4, V6 = socket.AF_INET, socket.AF_INET6
NOW_NS = 5_000_000_000_000  # the fixed "now" of every dump here (scope's clock, patched)
STATES = (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.FIN_WAIT1, TcpState.TIME_WAIT,
          TcpState.LISTEN)


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(diag.DiagSocket, "single_walk", True)

    class Clock:
        @staticmethod
        def monotonic_ns():
            return NOW_NS

    monkeypatch.setattr(scope_mod, "time", Clock)
    return FakeKernel()


def fill(kernel: FakeKernel, rng: random.Random, n: int):
    """`n` sockets of random family, state, ports, ages and owner (inode 0: an orphan)."""
    out = []
    for _ in range(n):
        fam = rng.choice((V4, V6))
        state = rng.choice(STATES)
        try:
            template = kernel.template(fam, state)
        except KeyError:
            template = kernel.template(fam, TcpState.ESTABLISHED)
            state = TcpState.ESTABLISHED
        loop = "127.0.0.1" if fam == V4 else "::1"
        age = rng.choice((None, 0, 5, 999, 30_000, 120_000, 4_000_000))
        out.append(kernel.own.add(
            template, state=state, sport=rng.randrange(1024, 65536), dport=rng.choice((80, 443, 5432)),
            src=loop, dst=loop, uid=0, inode=rng.choice((0, kernel.new_inode())),
            last_data_recv_ms=age, last_ack_recv_ms=None if age is None else rng.randrange(0, age + 1),
            last_data_sent_ms=None if age is None else rng.randrange(0, 200_000)))
    return out


def random_records(rng: random.Random, socks):
    """Probe records for about half of them: stamps older or newer than tcp_info says."""
    recs = {}
    for sk in socks:
        if rng.random() < 0.5:
            seg = NOW_NS - rng.randrange(0, 200_000) * 1_000_000
            data = rng.choice((0, seg, seg - rng.randrange(0, 10_000) * 1_000_000))
            recs[sk.cookie] = Activity(sk.cookie, seg, data, 3, 2, 100)
    return recs


def random_policy(rng: random.Random) -> Policy:
    box = middlebox.parse(rng.choice(("350", "60"))) if rng.random() < 0.4 else None
    return Policy(idle_time_ms=rng.choice((0.0, 1000.0, 60_000.0)),
                  idle_metric=rng.choice(("data", "any")),
                  last_recv_limit_ms=rng.choice((None, 3_000_000.0)),
                  window_ms=rng.choice((30_000.0, 60_000.0)),
                  verdicts=rng.choice((None, frozenset({"dead", "unknown", "close-wait"}))),
                  middlebox=box)


def random_selector(rng: random.Random) -> Selector:
    return Selector(families=frozenset(rng.choice(((V4,), (V6,), (V4, V6)))),
                    states=frozenset(rng.sample(STATES, rng.randrange(1, len(STATES) + 1))),
                    dports=rng.choice((None, PortSet(((80, 443),)))),
                    exclude_ports=rng.choice((None, PortSet(((443, 443),)))))


class MapReader:
    """A probe map read after the dump (the LRU path): activity() is its snapshot."""

    def __init__(self, records):
        self.records = records

    def activity(self):
        return dict(self.records)

    def close(self):
        pass


class Inline(InlineReader):
    """Records "carried inline": every chunk's take() answers from the table."""

    def __init__(self, records):
        super().__init__(storage_fd=99, map_id=1)  # the fake kernel ignores the fd
        self.records = records

    def take(self):
        return self.records

    def activity(self):
        return {}


def as_whole(kernel, selector, policy, records):
    """The reference: the whole dump decoded at once, then every match decided."""
    s = Scope(selector, open_diag=kernel.open_diag)
    with kernel.open_diag(None, None) as ds:
        socks = ds.dump_sockets(s.families, s.states_mask, s.bytecode)
    return [idle.decide(sk, records.get(sk.cookie), NOW_NS, policy) for sk in socks
            if selectors.matches(selector, sk)]


def key(v):
    return (v.socket.cookie, v.idle_ms, v.idle_source, v.last_rx_ms, v.victim, v.health,
            v.exposure)


@pytest.mark.parametrize("seed", range(12))
def test_a_streamed_scan_decides_as_the_whole_dump_does(kernel, seed):
    rng = random.Random(seed)
    socks = fill(kernel, rng, rng.randrange(200, 1500))
    kernel.own.chunk = rng.choice((600, 4096, 32768))  # records per recv(): a few to ~90
    selector, policy = random_selector(rng), random_policy(rng)
    records = random_records(rng, socks) if seed % 3 else {}
    want = as_whole(kernel, selector, policy, records)
    reader = (None, MapReader(records), Inline(records))[seed % 3]
    engine = Engine(Scope(selector, open_diag=kernel.open_diag), policy, Evidence(reader))
    lean = engine.scan(every=False)
    full = engine.scan(every=True)
    assert lean.verdicts is None and lean.seen == full.seen >= len(want)
    assert [key(v) for v in full.verdicts] == [key(v) for v in want]
    for scan in (lean, full):
        assert scan.matched == len(want)
        assert [key(v) for v in scan.victims] == [key(v) for v in want if v.victim]
        assert [key(v) for v in scan.tally.exposed] == [
            key(v) for v in want if v.exposure in (middlebox.PAST, middlebox.AT_RISK)]
        assert list(scan.tally.idle_ms) == [v.idle_ms for v in want if v.idle_ms is not None]
        by = {}
        for v in want:
            by[v.health.verdict] = by.get(v.health.verdict, 0) + 1
        assert scan.tally.by_verdict == by
        # The re-check compares each victim's record with a fresh one.
        assert {c: r for c, r in scan.records.items() if c in {v.socket.cookie for v in scan.victims}} \
            == {v.socket.cookie: records[v.socket.cookie] for v in scan.victims
                if v.socket.cookie in records}
    assert set(lean.records) <= {v.socket.cookie for v in lean.victims}


@pytest.mark.parametrize("every", [False, True])
def test_no_socket_outlives_its_chunk_unless_acted_on(kernel, every):
    """While the dump streams, the sockets of earlier chunks still alive are the
    victims and the exposed, no others (every=True, audit's scan, keeps them all:
    the check fails there, which shows it can)."""
    rng = random.Random(7)
    fill(kernel, rng, 3000)
    kernel.own.chunk = 8192
    policy = Policy(idle_time_ms=100_000.0)
    engine = Engine(Scope(Selector(states=frozenset(STATES)), open_diag=kernel.open_diag), policy)
    alive = weakref.WeakSet()
    held = []  # sockets alive from earlier chunks, at each chunk; and what the tally kept
    stream = engine.scope.stream

    def watched(scan, sink):
        def chunk(socks, now_ns):
            held.append((len(alive), len(scan.tally.victims) + len(scan.tally.exposed)))
            alive.update(socks)
            sink(socks, now_ns)
        return stream(scan, chunk)

    engine.scope.stream = watched
    scan = engine.scan(every=every)
    assert len(held) > 10 and scan.matched == 3000
    assert 0 < len(scan.victims) < scan.matched // 2
    over = [(n, kept) for n, kept in held if n > kept]
    if every:
        assert over  # audit's scan keeps every verdict
    else:
        assert not over, over[:5]


def test_the_kill_pass_keeps_no_verdict_per_socket(kernel):
    rng = random.Random(3)
    fill(kernel, rng, 500)
    engine = Engine(Scope(Selector(states=frozenset(STATES)), open_diag=kernel.open_diag),
                    Policy(idle_time_ms=100_000.0, dry_run=True))
    done = run_pass(engine, as_json=True, name="kill", quiet_if_empty=True)
    assert done.scan.verdicts is None
    assert done.scan.matched == 500 and len(done.outcomes) == len(done.scan.victims) > 0


@pytest.mark.parametrize("name", ["dump_v4.bin", "dump_v6.bin"])
def test_a_decoder_with_a_sink_hands_over_every_record_once(name):
    records = load_records(name)
    whole = b"".join(records) + diag._NLMSGHDR.pack(20, diag.NLMSG_DONE, 2, 0, 0) + b"\0" * 4
    want = diag.decode_dump(whole)
    got = []
    dec = diag.DumpDecoder(sink=lambda socks: got.append(socks))
    for i in range(0, len(records), 3):  # three records a chunk
        assert not dec.feed(b"".join(records[i:i + 3]))
        assert dec.sockets == []
    assert dec.feed(whole[sum(map(len, records)):])
    assert [sk for part in got for sk in part] == want and dec.delivered == len(want)
    assert all(0 < len(part) <= 3 for part in got)


def _attr(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return diag._RTATTR.pack(n, atype) + payload + b"\0" * (-n & 3)


def _storage(map_id: int, value: bytes) -> bytes:
    return _attr(diag.SK_DIAG_BPF_STORAGE | 0x8000,  # NLA_F_NESTED, as the kernel sets it
                 _attr(diag.SK_DIAG_BPF_STORAGE_MAP_ID, diag._U32.pack(map_id))
                 + _attr(diag.SK_DIAG_BPF_STORAGE_MAP_VALUE, value))


@pytest.mark.parametrize("maps", [[(7, bytes(range(40)))], [(7, b"\1" * 40), (9, b"\2" * 8)],
                                  [(3, b"abcde")], [(5, b"")]])
def test_one_storage_is_read_in_one_unpack_as_the_walk_reads_it(monkeypatch, maps):
    """INET_DIAG_SK_BPF_STORAGES' payload: the one-map fast path gives what the
    attribute walk gives (and the walk still reads two maps, or a value of any length)."""
    payload = b"".join(_storage(mid, value) for mid, value in maps)
    buf = b"\xff" * 8 + payload + b"\xee" * 8  # not at offset 0, other bytes around it
    fast = diag._decode_storages(buf, 8, 8 + len(payload))
    monkeypatch.setattr(diag, "_ONE_STORAGE_LEN", 1 << 30)  # the walk alone
    walked = diag._decode_storages(buf, 8, 8 + len(payload))
    assert fast == walked == dict(maps)


def test_inline_records_are_the_activities_the_dataclass_makes():
    from tcpidle import evidence

    a, b = evidence._activity(11, 2, 3, 4, 5, 6), Activity(11, 2, 3, 4, 5, 6)
    assert a == b and hash(a) == hash(b) and repr(a) == repr(b)
    with pytest.raises(Exception):
        a.cookie = 12  # still frozen


def test_the_recheck_keeps_the_storage_of_its_batch_alone():
    """InlineReader.lookup (the re-check before a destroy batch) dumps the selection
    again for the storage: only the batch's cookies are kept, chunk by chunk."""
    from tcpidle.probe.maps import VALUE

    reader = InlineReader(storage_fd=99, map_id=4)
    stores = reader.storages.stores
    peak = []

    class Scope_:
        def dump_storages(self, sink=None):
            for lo in range(0, 1000, 100):  # ten chunks of 100 sockets
                stores.update({c: {4: VALUE.pack(c, c, 1, 1, 1)} for c in range(lo, lo + 100)})
                peak.append(len(stores))
                if sink is not None:
                    sink([None] * 100)
            return 1000

    reader._scope = Scope_()
    got = reader.lookup([5, 350, 999, 5000])
    assert got == {c: Activity(c, c, c, 1, 1, 1) for c in (5, 350, 999)}
    assert max(peak) <= 100 + 3 and not stores


def test_the_recheck_dumps_each_batch_s_ports_alone(kernel, monkeypatch):
    """With inline storage every destroy batch's re-check dumps again (exact
    lookups carry no storage).  That dump is narrowed to the batch: batches
    keep one family and their ports together, and the kernel returns every
    victim of the batch and the selected sockets among them, so all the
    batches together dump the selection at most once, not once per batch."""
    monkeypatch.setattr(engine_mod, "DUMPED_BATCH", 100)
    rng = random.Random(11)
    for sport in rng.sample(range(1024, 65536), 1500):  # no two 4-tuples alike
        fam = rng.choice((V4, V6))
        loop = "127.0.0.1" if fam == V4 else "::1"
        kernel.own.add(kernel.template(fam, TcpState.ESTABLISHED), state=TcpState.ESTABLISHED,
                       sport=sport, dport=rng.choice((80, 443, 5432)),
                       src=loop, dst=loop, uid=0, inode=0, last_data_recv_ms=rng.choice((5, 120_000)),
                       last_ack_recv_ms=5, last_data_sent_ms=5)
    selector = Selector(states=frozenset({TcpState.ESTABLISHED}), dports=PortSet(((80, 443),)))
    engine = Engine(Scope(selector, open_diag=kernel.open_diag), Policy(idle_time_ms=60_000.0),
                    Evidence(InlineReader(storage_fd=99, map_id=1)))  # the fake ignores the fd
    engine.evidence.bind_scope(engine.scope)
    batches = []
    dump_batch = engine.scope.dump_batch_storages

    def watched(nl, sockets, sink):
        got = []
        dump_batch(nl, sockets, lambda socks: (got.extend(socks), sink(socks)))
        batches.append((list(sockets), got))

    engine.scope.dump_batch_storages = watched
    scan = engine.scan()
    victims = {v.socket.cookie for v in scan.victims}
    assert len(victims) > 400
    outcomes = engine.act(scan)
    assert {o.verdict.socket.cookie for o in outcomes if o.action == "destroyed"} == victims
    per_family = collections.Counter(v.socket.family for v in scan.victims)
    assert sum(len(b) for b, _ in batches) == len(victims)
    assert len(batches) == sum(-(-n // 100) for n in per_family.values())
    for batch, got in batches:
        assert len(batch) <= 100 and len({s.family for s in batch}) == 1
        assert [(s.sport, s.dport) for s in batch] == sorted((s.sport, s.dport) for s in batch)
        assert {s.cookie for s in batch} <= {s.cookie for s in got}  # every victim seen again
        assert all(selectors.matches(selector, s) for s in got)
    dumped = sum(len(got) for _, got in batches)
    assert dumped <= scan.matched, (dumped, scan.matched)  # per batch, it was batches x matched


def test_a_record_the_re_check_s_dump_lacks_spares_its_victim(kernel):
    """Inline storage lives as long as its socket, so a victim recorded at the
    scan whose record the re-check's dump does not carry was missed by that
    dump: it is spared, said so; victims the probe never recorded are decided
    on tcp_info again and destroyed.  (The fake kernel carries no storage.)"""
    rng = random.Random(5)
    socks = [kernel.own.add(kernel.template(V4, TcpState.ESTABLISHED), state=TcpState.ESTABLISHED,
                            sport=2000 + i, dport=80, src="127.0.0.1", dst="127.0.0.1", uid=0,
                            inode=0, last_data_recv_ms=120_000, last_ack_recv_ms=5,
                            last_data_sent_ms=5) for i in range(40)]
    recorded = {sk.cookie for sk in rng.sample(socks, 15)}
    old = NOW_NS - 100_000 * 1_000_000
    reader = Inline({c: Activity(c, old, old, 3, 2, 100) for c in recorded})
    engine = Engine(Scope(Selector(dports=PortSet(((80, 80),))), open_diag=kernel.open_diag),
                    Policy(idle_time_ms=60_000.0), Evidence(reader))
    engine.evidence.bind_scope(engine.scope)
    scan = engine.scan()
    assert len(scan.victims) == 40
    batches = list(engine.act_batches(scan))
    spared = {s.verdict.socket.cookie: s.reason for b in batches for s in b.spared}
    assert spared == {c: engine_mod.NO_FRESH_RECORD for c in recorded}
    assert {o.verdict.socket.cookie for b in batches for o in b.outcomes if o.action == "destroyed"} \
        == {sk.cookie for sk in socks} - recorded
