"""Selectors: parsing with one-line errors, matching, and bytecode that agrees with matching."""

import random
import struct
from ipaddress import ip_network

import pytest

from tcpidle import selectors as sel
from tcpidle.errors import UsageError
from tcpidle.model import AF_INET, AF_INET6, PortSet, Selector, Socket, TcpState


def sock(sport=1000, dport=2000, src="10.0.0.1", dst="10.0.0.2", family=AF_INET, state=1, uid=0):
    return Socket(cookie=1, family=family, state=state, src=src, sport=sport, dst=dst, dport=dport,
                  inode=1, uid=uid, raw_id=b"\0" * 48)


# -- parsing ---------------------------------------------------------------

@pytest.mark.parametrize("values, ranges", [
    (["22"], ((22, 22),)),
    (["22,23,24"], ((22, 24),)),
    (["8000-8100", "22"], ((22, 22), (8000, 8100))),
    (["1-65535"], ((1, 65535),)),
    (["10-20,15-30", "31"], ((10, 31),)),
    ([" 80 , 443 "], ((80, 80), (443, 443))),
])
def test_parse_ports(values, ranges):
    assert sel.parse_ports(values).ranges == ranges


def test_parse_ports_empty_is_none():
    assert sel.parse_ports([]) is None


@pytest.mark.parametrize("value, needle", [
    ("0", "port 0 is out of range"),
    ("65536", "port 65536 is out of range"),
    ("80,,81", "empty item"),
    ("90-80", "backwards"),
    ("abc", "'abc' is not a port number"),
    ("-5", "'' is not a port number"),
    ("1-", "'' is not a port number"),
    ("", "empty item"),
])
def test_parse_ports_errors_name_the_value(value, needle):
    with pytest.raises(UsageError) as err:
        sel.parse_ports([value], "--dport")
    message = str(err.value)
    assert needle in message
    assert "--dport" in message and "\n" not in message


def test_parse_networks():
    nets = sel.parse_networks(["10.0.0.0/8", "fd00::/64", "192.0.2.7"], "--dst")
    assert nets == (ip_network("10.0.0.0/8"), ip_network("fd00::/64"), ip_network("192.0.2.7/32"))


@pytest.mark.parametrize("value, needle", [
    ("10.1.2.3/8", "write 10.0.0.0/8 for the network, or 10.1.2.3 for the host"),
    ("fd00::1/64", "write fd00::/64 for the network, or fd00::1 for the host"),
    ("fe80::1%lo", "scope id"),
    ("fe80::1%2/128", "scope id"),
])
def test_parse_networks_refuses_what_cannot_mean_one_thing(value, needle):
    with pytest.raises(UsageError) as err:
        sel.parse_networks([value], "--dst")
    assert needle in str(err.value) and "--dst" in str(err.value)


@pytest.mark.parametrize("value", ["10.0.0.0/33", "nonsense", "::1/129", "1.2.3"])
def test_parse_networks_errors(value):
    with pytest.raises(UsageError, match="--src"):
        sel.parse_networks([value], "--src")


def test_parse_states_names_and_groups():
    assert sel.parse_states([]) == {TcpState.ESTABLISHED}
    assert sel.parse_states(["time-wait", "close-wait"]) == {TcpState.TIME_WAIT, TcpState.CLOSE_WAIT}
    assert TcpState.LISTEN not in sel.parse_states(["connected"])
    assert TcpState.SYN_SENT not in sel.parse_states(["synchronized"])
    assert TcpState.LISTEN in sel.parse_states(["all"])
    with pytest.raises(UsageError, match="'bogus'"):
        sel.parse_states(["bogus"])


def test_states_mask_adds_new_syn_recv():
    assert sel.states_mask({TcpState.ESTABLISHED}) == 1 << 1
    mask = sel.states_mask({TcpState.SYN_RECV})
    assert mask & (1 << 3) and mask & (1 << 12)


# -- matching --------------------------------------------------------------

def test_matches_ports_and_families():
    s = Selector(dports=PortSet(((2000, 2000),)), families=frozenset({AF_INET}))
    assert sel.matches(s, sock())
    assert not sel.matches(s, sock(dport=2001))
    assert not sel.matches(s, sock(family=AF_INET6, src="::1", dst="::1"))


def test_matches_state():
    s = Selector(states=frozenset({TcpState.TIME_WAIT}))
    assert not sel.matches(s, sock())
    assert sel.matches(s, sock(state=6))


def test_matches_cidr_including_v4_mapped():
    s = Selector(dst=(ip_network("10.0.0.0/24"),))
    assert sel.matches(s, sock(dst="10.0.0.2"))
    assert not sel.matches(s, sock(dst="10.0.1.2"))
    assert sel.matches(s, sock(family=AF_INET6, src="::ffff:10.0.0.1", dst="::ffff:10.0.0.9"))
    assert not sel.matches(s, sock(family=AF_INET6, src="fd00::1", dst="fd00::2"))


def test_exclusions_win():
    s = Selector(dports=PortSet(((2000, 2000),)), exclude_ports=PortSet(((1000, 1000),)))
    assert not sel.matches(s, sock(sport=1000, dport=2000))
    s = Selector(exclude_nets=(ip_network("10.0.0.2/32"),))
    assert not sel.matches(s, sock())


# -- bytecode --------------------------------------------------------------

def test_no_ports_no_bytecode():
    assert sel.compile_bytecode(Selector()) == b""


def test_single_port_program_is_ge_le():
    program = sel.compile_bytecode(Selector(dports=PortSet(((443, 443),))))
    ops = [struct.unpack_from("=BBH", program, i) for i in range(0, len(program), 4)]
    # D_GE 443 (fail -> reject), D_LE 443 (fail -> reject)
    assert ops == [(4, 8, 20), (0, 0, 443), (5, 8, 12), (0, 0, 443)]
    sel.audit_bytecode(program)


def _random_portset(rng):
    items = []
    for _ in range(rng.randint(1, 5)):
        lo = rng.choice([1, 2, 100, 65535, rng.randint(1, 65535)])
        hi = rng.choice([lo, min(65535, lo + rng.randint(0, 40)), 65535])
        items.append("%d-%d" % (lo, hi) if hi > lo else str(lo))
    return sel.parse_ports([",".join(items)])


def _random_port_selector(rng, p_ports: float) -> Selector:
    return Selector(
        sports=_random_portset(rng) if rng.random() < p_ports else None,
        dports=_random_portset(rng) if rng.random() < p_ports else None,
        exclude_ports=_random_portset(rng) if rng.random() < 0.3 else None,
    )


def test_bytecode_agrees_with_matches_on_random_selectors():
    rng = random.Random(20261121)
    for _ in range(400):
        s = _random_port_selector(rng, 0.6)
        program = sel.compile_bytecode(s)
        if program:
            sel.audit_bytecode(program)
        edges = [p for lo, hi in ((s.sports or PortSet(())).ranges + (s.dports or PortSet(())).ranges
                                  + (s.exclude_ports or PortSet(())).ranges)
                 for p in (lo - 1, lo, hi, hi + 1) if 1 <= p <= 65535]
        for _ in range(60):
            sp = rng.choice(edges + [rng.randint(1, 65535)])
            dp = rng.choice(edges + [rng.randint(1, 65535)])
            expected = sel.matches(s, sock(sport=sp, dport=dp))
            got = sel.run_bytecode(program, sp, dp) if program else True
            assert got == expected, (s, sp, dp)


def test_a_batch_box_narrows_the_selection_and_nothing_else():
    """compile_bytecode(s, box): a socket passes iff the selection takes it and
    its ports are in the box (the re-check's per-batch storage dump)."""
    rng = random.Random(20261202)
    for _ in range(300):
        s = _random_port_selector(rng, 0.5)
        socks = [sock(sport=rng.randint(1, 65535), dport=rng.choice([443, rng.randint(1, 65535)]))
                 for _ in range(rng.randint(1, 4))]
        box = sel.port_box(socks)
        program = sel.compile_bytecode(s, box)
        sel.audit_bytecode(program)
        for x in socks:
            assert sel.run_bytecode(program, x.sport, x.dport) == sel.matches(s, x)
        for _ in range(60):
            sp = rng.choice([box[0] - 1, box[0], box[1], box[1] + 1, rng.randint(1, 65535)])
            dp = rng.choice([box[2] - 1, box[2], box[3], box[3] + 1, rng.randint(1, 65535)])
            if not (1 <= sp <= 65535 and 1 <= dp <= 65535):
                continue
            inside = box[0] <= sp <= box[1] and box[2] <= dp <= box[3]
            expected = inside and sel.matches(s, sock(sport=sp, dport=dp))
            assert sel.run_bytecode(program, sp, dp) == expected, (s, box, sp, dp)


def test_thousands_of_ports_fit():
    # tcp_closer caps at 128 ports; a 2,000-port list compiles and runs.
    ports = ",".join(str(p) for p in range(2, 4002, 2))
    s = Selector(dports=sel.parse_ports([ports]))
    program = sel.compile_bytecode(s)
    sel.audit_bytecode(program)
    assert sel.run_bytecode(program, 1, 3000)
    assert not sel.run_bytecode(program, 1, 3001)


def test_too_many_ranges_raise():
    ports = ",".join(str(p) for p in range(2, 20000, 2))
    with pytest.raises(sel.BytecodeTooLong):
        sel.compile_bytecode(Selector(dports=sel.parse_ports([ports])))


def test_auditor_rejects_a_bad_jump():
    program = bytearray(sel.compile_bytecode(Selector(dports=PortSet(((443, 443),)))))
    struct.pack_into("=BBH", program, 0, 4, 8, 6)  # `no` not a multiple of 4
    with pytest.raises(ValueError):
        sel.audit_bytecode(bytes(program))
