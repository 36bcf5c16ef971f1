"""Pure parts of the BPF iterator destroy backend (no root, no BPF).

The record decoder against records packed as the C struct lays them out, the
config map a selection and a policy become, the port bitmap and LPM keys the
maps are filled with, and the kfunc call patch.
"""

from __future__ import annotations

import struct

import pytest

from tcpidle.model import AF_INET, AF_INET6, Policy, Selector, TcpState
from tcpidle.probe import iterdestroy as it
from tcpidle.selectors import parse_networks, parse_ports, states_mask

def config_of(selector, policy, hz=250, **kw):
    return it.config_of(selector, policy, hz, states_mask(selector.states), **kw)


def given(config):
    return {name for name, bit in it.CFG.items() if config.flags & bit}


def test_records_decode_as_the_c_struct_lays_them_out():
    v4 = b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 1])
    v4b = b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 2])
    v6 = bytes.fromhex("fd000231000000000000000000000001")
    data = (it.REC.pack(7, AF_INET, 1, 0, 1, 0, 40000, 443, 1234, v4, v4b, 1000, 2 ** 40 + 3,
                        4936000000, 0)
            + it.REC.pack(2 ** 63 + 5, AF_INET6, 8, 1, 0, -103, 22, 50000, 99, v6, v6, 0, 0,
                          0, 0)
            + it.REC.pack(9, AF_INET, 6, 4, 0, 0, 1, 2, 0, v4, v4, 0, 0, 0, 0)
            # the probe's record decided (IDLE_BPF), its last segment known (IDLE_RX)
            + it.REC.pack(11, AF_INET, 1, 0, 7, 0, 1, 2, 1250, v4, v4, 0, 0, 4999123456, 17))
    assert it.REC.size == 88
    a, b, c, d = it.decode_records(data)
    assert a == it.Record(7, AF_INET, TcpState.ESTABLISHED, "destroyed", 0, "10.0.0.1", 40000,
                          "10.0.0.2", 443, 1234, 1000, 2 ** 40 + 3,
                          bytes([10, 0, 0, 1]) + bytes(12), bytes([10, 0, 0, 2]) + bytes(12),
                          4936000000, "tcp_info", None)
    assert (b.cookie, b.outcome, b.err, b.src, b.sport, b.dport, b.idle_jiffies) == \
        (2 ** 63 + 5, "failed", -103, "fd00:231::1", 22, 50000, None)
    assert (b.idle_ns, b.idle_source, b.last_rx_ns) == (None, None, None)
    assert b.src_raw == v6
    assert (c.state, c.outcome) == (TcpState.TIME_WAIT, "not-full-socket")
    assert (d.idle_jiffies, d.idle_ns, d.idle_source, d.last_rx_ns) == \
        (1250, 4999123456, "bpf", 17)
    assert it.decode_records(b"") == []


def test_a_verdict_says_where_its_idle_time_came_from():
    """The probe's ns idle (IDLE_BPF) is the verdict's, said "bpf", with the age of
    its last segment; else the socket's jiffies, said "tcp_info", as on the netlink path."""
    from tcpidle import kdestroy
    v4 = b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 1])
    bpf, info, unknown = it.decode_records(
        it.REC.pack(1, AF_INET, 1, 0, 7, 0, 1, 2, 1250, v4, v4, 0, 0, 4999123456, 2500000)
        + it.REC.pack(2, AF_INET, 1, 0, 1, 0, 1, 2, 1250, v4, v4, 0, 0, 5000000000, 0)
        + it.REC.pack(3, AF_INET, 1, 0, 0, 0, 1, 2, 0, v4, v4, 0, 0, 0, 0))
    v = kdestroy.verdict_of(bpf, None, 250)
    assert (v.idle_ms, v.idle_source, v.last_rx_ms) == (4999.123456, "bpf", 2.5)
    assert v.socket.last_data_recv_ms == 5000  # what tcp_info would say, as before
    v = kdestroy.verdict_of(info, None, 250)
    assert (v.idle_ms, v.idle_source, v.last_rx_ms) == (5000.0, "tcp_info", None)
    v = kdestroy.verdict_of(unknown, None, 250)
    assert (v.idle_ms, v.idle_source) == (None, None)


def test_socket_of_a_record_is_what_inet_diag_would_say():
    from tcpidle import diag, kdestroy
    v6 = bytes.fromhex("fd000231000000000000000000000001")
    rec, = it.decode_records(it.REC.pack(2 ** 33 + 7, AF_INET6, 1, 0, 1, 0, 40000, 443, 250,
                                         v6, v6, 1000, 77, 0, 0))
    sock = kdestroy.socket_of(rec, "ns1", 250)
    assert (sock.cookie, sock.src, sock.sport, sock.dport, sock.inode, sock.uid, sock.netns) == \
        (2 ** 33 + 7, "fd00:231::1", 40000, 443, 77, 1000, "ns1")
    assert sock.last_data_recv_ms == 1000  # 250 jiffies at HZ=250
    # the inet_diag_sockid SOCK_DESTROY sends back: network-order ports, cookie halves
    sport, dport, src, dst, c0, c1 = diag._SOCKID.unpack(sock.raw_id)
    assert (sport, dport, src, dst, c0 | c1 << 32) == (
        struct.unpack("=H", struct.pack(">H", 40000))[0],
        struct.unpack("=H", struct.pack(">H", 443))[0], v6, v6, 2 ** 33 + 7)
    v4 = b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 1])
    rec, = it.decode_records(it.REC.pack(1, AF_INET, 6, 4, 0, 0, 1, 2, 0, v4, v4, 0, 0, 0, 0))
    sock = kdestroy.socket_of(rec, None, 250)
    assert sock.raw_id[4:8] == bytes([10, 0, 0, 1]) and sock.raw_id[8:20] == b"\0" * 12
    assert sock.last_data_recv_ms is None


def test_a_torn_record_is_an_error():
    with pytest.raises(ValueError):
        it.decode_records(b"\0" * 89)


def test_threshold_in_jiffies_is_the_first_age_tcp_info_would_call_that_idle():
    assert it.ms_to_jiffies(0, 250) == 0
    assert it.ms_to_jiffies(1000, 250) == 250
    assert it.ms_to_jiffies(1001, 250) == 251  # 250 jiffies = 1000 ms < 1001
    assert it.ms_to_jiffies(3, 250) == 1
    assert it.ms_to_jiffies(1000, 1000) == 1000


def test_config_from_a_selection_and_a_policy():
    sel = Selector(families=frozenset({AF_INET6}),
                   states=frozenset({TcpState.ESTABLISHED, TcpState.SYN_RECV}),
                   dports=parse_ports(["443"]),
                   exclude_nets=parse_networks(["10.0.0.0/8"], "--exclude-cidr"))
    c = config_of(sel, Policy(idle_time_ms=60000, idle_metric="any", max_kills=5,
                              last_recv_limit_ms=1000.0), owners=True)
    assert c.family_mask == 2
    assert c.state_mask == (1 << 1) | (1 << 3) | (1 << 12)  # SYN_RECV asks for requests too
    assert given(c) == {"dports", "excl_nets", "owners", "idle_any"}
    assert (c.thresh_j, c.limit_j, c.max_kills) == (15000, 250, 5)
    assert (c.thresh_ns, c.jiffy_ns) == (60 * 10 ** 9, 4000000)  # for the probe's stamps
    # as struct config lays it out: six u32 (one of them padding), then the u64 cap,
    # the threshold in ns and one jiffy in ns
    assert c.pack() == struct.pack("<IIIIIIQQQ", 2, c.state_mask, c.flags, 15000, 250, 0, 5,
                                   60 * 10 ** 9, 4000000)


def test_config_defaults_select_everything_established_with_no_cap():
    c = config_of(Selector(), Policy(dry_run=True))
    assert c.family_mask == 3 and c.state_mask == 1 << 1
    assert given(c) == {"dry_run"}
    assert (c.thresh_j, c.limit_j, c.max_kills) == (0, 0, 0)


def test_config_says_which_lists_are_given_and_overrides_for_the_caps_first_pass():
    c = config_of(Selector(src=parse_networks(["10.0.0.0/8"], "--src"),
                           sports=parse_ports(["1"]), exclude_ports=parse_ports(["2"])), Policy())
    assert given(c) == {"src", "sports", "excl_ports"}
    c = config_of(Selector(dst=parse_networks(["::1/128"], "--dst"), uids=frozenset({0, 1000})),
                  Policy(max_kills=7), cookies=True, dry_run=True, max_kills=0)
    assert given(c) == {"dst", "uids", "cookies", "dry_run"}
    assert c.max_kills == 0


def test_the_cap_keeps_the_idlest_unknown_last():
    v4 = b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 1])
    recs = it.decode_records(b"".join(
        it.REC.pack(cookie, AF_INET, 1, 2, known, 0, 1, 2, idle, v4, v4, 0, 0, ns, 0)
        for cookie, known, idle, ns in ((1, 1, 50, 200000000), (2, 0, 0, 0),
                                        (3, 1, 900, 3600000000), (4, 1, 300, 1200000000),
                                        # the probe's ns: idler than 4, less than 3
                                        (5, 3, 300, 1300000000))))
    assert [r.cookie for r in it.idlest(recs, 2)] == [3, 5]
    assert [r.cookie for r in it.idlest(recs, 9)] == [3, 5, 4, 1, 2]


def test_port_bitmap():
    words = it.port_bitmap(parse_ports(["22", "63-65", "65535"]))
    assert words == {0: (1 << 22) | (1 << 63), 1: 0b11, 1023: 1 << 63}


def test_lpm_keys_put_ipv4_in_the_mapped_range():
    keys = it.lpm_entries(parse_networks(["10.1.0.0/16", "fd00::/8"], "--src"))
    assert keys == [(112, b"\0" * 10 + b"\xff\xff" + bytes([10, 1, 0, 0])),
                    (8, b"\xfd" + b"\0" * 15)]


def test_the_sentinel_call_becomes_a_kfunc_call_and_nothing_else_changes():
    call = struct.pack("<BBhi", 0x85, 0, 0, it.KFUNC_SENTINEL)
    helper = struct.pack("<BBhi", 0x85, 0, 0, 6)       # bpf_trace_printk, untouched
    mov = struct.pack("<BBhi", 0xB7, 0x01, 0, it.KFUNC_SENTINEL)  # r1 = sentinel, not a call
    local = struct.pack("<BBhi", 0x85, 0x10, 0, it.KFUNC_SENTINEL)  # a BPF-to-BPF call
    code = bytearray(helper + call + mov + local)
    assert it.patch_kfunc(code, 65741) == 1
    assert code[:8] == helper and code[16:] == mov + local
    assert struct.unpack_from("<BBhi", code, 8) == (0x85, it.BPF_PSEUDO_KFUNC_CALL << 4, 0, 65741)


def test_failed_destroys_are_told_apart_by_the_errors_map():
    v4 = b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 1])
    recs = it.decode_records(it.REC.pack(1, AF_INET, 1, 0, 1, 0, 1, 2, 3, v4, v4, 0, 0, 0, 0)
                             + it.REC.pack(2, AF_INET, 1, 0, 1, 0, 1, 2, 3, v4, v4, 0, 0, 0, 0)
                             + it.REC.pack(3, AF_INET, 1, 2, 1, 0, 1, 2, 3, v4, v4, 0, 0, 0, 0))
    out = it.with_errors(recs, {2: -95, 3: -1})
    assert [(r.cookie, r.outcome, r.err) for r in out] == [
        (1, "destroyed", 0), (2, "failed", -95), (3, "dry-run", 0)]
    assert it.with_errors(recs, {}) == recs


def test_flag_bits_and_outcomes_are_the_c_files():
    import re

    from tcpidle.probe import iterprog
    with open(iterprog.source_path()) as f:
        c = f.read()
    bits = {m.group(1).lower(): 1 << int(m.group(2))
            for m in re.finditer(r"#define CFG_(\w+) \(1 << (\d+)\)", c)}
    assert bits == it.CFG
    outs = {int(m.group(2)): m.group(1) for m in re.finditer(r"#define OUT_(\w+) (\d+)", c)}
    assert {k: v.lower().replace("_", "-") for k, v in outs.items()} == {
        k: {"not-full-socket": "not-full", "left-selection": "left"}.get(v, v)
        for k, v in it.OUTCOMES.items()}
    assert set(re.findall(r"^BPF_\w+\((\w+),", c, re.M)) == \
        set(iterprog.MAP_NAMES) | {iterprog.STORAGE_MAP}
    idle = {m.group(1): 1 << int(m.group(2))
            for m in re.finditer(r"#define IDLE_(\w+) \(1 << (\d+)\)", c)}
    assert idle == {"JIFFIES": it.IDLE_JIFFIES, "BPF": it.IDLE_BPF, "RX": it.IDLE_RX}
    # the slack is idle.py's
    from tcpidle import idle as merge_rule
    slack = re.search(r"#define SLACK_NS (\d+)ULL", c).group(1)
    assert int(slack) == merge_rule.JIFFY_SLACK_MS * 1_000_000


def test_the_program_cache_is_used_only_when_no_one_else_could_write_it(tmp_path, monkeypatch,
                                                                        caplog):
    """root loads what the cache holds into the kernel: a file another user
    could have written is not believed (the header cache's rules)."""
    import json
    import os

    from tcpidle.probe import iterprog
    cache = tmp_path / "cache"
    monkeypatch.setenv("TCPIDLE_CACHE_DIR", str(cache))
    monkeypatch.setattr(iterprog, "boot_identity", lambda: "6.18 boot-1")
    iterprog._write_cache("iterdestroy-x.json", {"format": iterprog.FORMAT, "boot": "6.18 boot-1",
                                                 "code": "00"})
    path = cache / "iterdestroy-x.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
    assert iterprog._read_cache("iterdestroy-x.json", "6.18 boot-1")["code"] == "00"
    assert iterprog._read_cache("iterdestroy-x.json", "6.18 boot-2") is None  # another boot
    os.chmod(path, 0o622)
    with caplog.at_level("WARNING", logger="tcpidle.probe"):
        assert iterprog._read_cache("iterdestroy-x.json", "6.18 boot-1") is None
    assert "writable by other users" in caplog.text
    os.chmod(path, 0o600)
    os.chmod(cache, 0o777)
    with caplog.at_level("WARNING", logger="tcpidle.probe"):
        assert iterprog._read_cache("iterdestroy-x.json", "6.18 boot-1") is None
    path.write_text(json.dumps({"format": iterprog.FORMAT + 1, "boot": "6.18 boot-1"}))
    os.chmod(cache, 0o700)
    assert iterprog._read_cache("iterdestroy-x.json", "6.18 boot-1") is None  # other format


def test_relocation_points_each_map_reference_at_the_run_s_map():
    from tcpidle.probe import iterprog
    ld = struct.pack("<BBhi", 0x18, 0x11, 0, 7) + struct.pack("<BBhi", 0, 0, 0, 0)
    mov = struct.pack("<BBhi", 0xB7, 0x01, 0, 7)
    code = iterprog.relocate(ld + mov + ld, [(0, "config"), (3, "counts")],
                             {"config": 41, "counts": 42})
    assert struct.unpack_from("<BBhi", code, 0) == (0x18, 0x11, 0, 41)
    assert struct.unpack_from("<BBhi", code, 24) == (0x18, 0x11, 0, 42)
    assert code[16:24] == mov
    with pytest.raises(ValueError):
        iterprog.relocate(mov, [(0, "config")], {"config": 1})


def test_hz_measured_from_two_timer_list_samples():
    s = 10 ** 9
    assert it.hz_of_samples((5 * s, 1000), (5 * s + s // 5, 1050)) == 250
    assert it.hz_of_samples((5 * s, 1000), (5 * s + s // 5, 1051)) == 250  # one tick of slack
    assert it.hz_of_samples((0, 0), (s // 5, 200)) == 1000
    assert it.hz_of_samples((0, 0), (s // 5, 60)) == 300
    assert it.hz_of_samples((0, 0), (s // 5, 20)) == 100
    with pytest.raises(ValueError):
        it.hz_of_samples((0, 0), (s // 5, 40))  # 200 Hz: no such HZ
    with pytest.raises(ValueError):
        it.hz_of_samples((s, 0), (s, 10))


def test_hz_from_the_timer_list_when_no_config_says_it(tmp_path):
    """The running kernel's own /proc/timer_list (root) gives its HZ: the same as its config."""
    import os
    if not os.access(it.TIMER_LIST, os.R_OK):
        pytest.skip("/proc/timer_list is root's")
    assert it.hz_from_timer_list() == it.kernel_hz()


def test_stale_program_files_are_told_by_key_boot_use_and_writer():
    """Only our names; another key goes when it is of another boot (or unreadable) or
    unused for a day, not at once (two tcpidle versions on one boot would each remove
    the other's and compile at every run); a temporary goes when its writer is gone."""
    from tcpidle.probe import iterprog
    cur, old, other = "a" * 24, "b" * 24, "c" * 24
    names = ["iterdestroy-%s.json" % k for k in (cur, old, other)] + [
        "iterdestroy-%s.json" % ("d" * 24), "iterdestroy-kernel.json", "headers-6.18.tar",
        "iterdestroy-%s.json.111" % cur, "iterdestroy-%s.json.222" % old, "iterdestroy-x.json",
        "iterdestroy-%s.json.bak" % old, "iterdestroy-%s.json" % ("e" * 23)]
    boots = {"iterdestroy-%s.json" % old: "boot-1", "iterdestroy-%s.json" % other: "boot-0",
             "iterdestroy-%s.json" % ("d" * 24): "boot-1"}
    used = {"iterdestroy-%s.json" % ("d" * 24): 1000.0 - iterprog.UNUSED_S}
    stale = iterprog.stale_files(names, {cur}, "boot-1", boots.get,
                                 lambda n: used.get(n, 999.0), 1000.0, alive=lambda pid: pid == 111)
    assert stale == sorted(["iterdestroy-%s.json" % other, "iterdestroy-%s.json" % ("d" * 24),
                            "iterdestroy-%s.json.222" % old])


def test_a_new_program_file_removes_the_stale_ones_of_the_trusted_cache(tmp_path, monkeypatch):
    import json
    import os

    from tcpidle.probe import iterprog
    cache = tmp_path / "cache"
    monkeypatch.setenv("TCPIDLE_CACHE_DIR", str(cache))
    iterprog._write_cache("iterdestroy-kernel.json", {"boot": "boot-0"})
    for key, boot in (("a" * 24, "boot-1"), ("b" * 24, "boot-0"), ("c" * 24, "boot-1")):
        iterprog._write_cache("iterdestroy-%s.json" % key, {"format": iterprog.FORMAT,
                                                            "boot": boot, "key": key})
    os.symlink("/etc/passwd", str(cache / ("iterdestroy-%s.json" % ("f" * 24))))
    outside = tmp_path / ("iterdestroy-%s.json" % ("b" * 24))
    outside.write_text(json.dumps({"boot": "boot-0"}))
    removed = iterprog.remove_stale(["a" * 24], "boot-1")
    # another boot's and the symlink (unreadable: the link itself, not /etc/passwd)
    assert removed == ["iterdestroy-%s.json" % ("b" * 24), "iterdestroy-%s.json" % ("f" * 24)]
    assert sorted(os.listdir(cache)) == ["iterdestroy-%s.json" % ("a" * 24),
                                         "iterdestroy-%s.json" % ("c" * 24),
                                         "iterdestroy-kernel.json"]
    assert os.path.exists("/etc/passwd") and outside.exists()
    # an untrusted cache is not cleaned (nor read)
    os.chmod(cache, 0o777)
    try:
        assert iterprog.remove_stale(["a" * 24], "boot-2") == []
        assert len(os.listdir(cache)) == 3
    finally:
        os.chmod(cache, 0o700)


def test_compiling_keeps_both_variants_and_removes_the_stale(tmp_path, monkeypatch):
    """compiled() writes its file and removes the stale ones; the other variant of
    this source and kernel (with or without the probe's storage) stays."""
    import os

    from tcpidle.probe import iterprog
    monkeypatch.setenv("TCPIDLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(iterprog, "boot_identity", lambda: "boot-1")
    facts = iterprog.KernelFacts(1, 2, 250, {"OFF_FAMILY": 16})
    fake = iterprog.Compiled(b"\0" * 8, [], {})
    monkeypatch.setattr(iterprog, "_compile", lambda offsets, storage=False: fake)
    with open(iterprog.source_path(), "rb") as f:
        source = f.read()
    other_variant = "iterdestroy-%s.json" % iterprog.program_key(source, facts.offsets, True)
    iterprog._write_cache(other_variant, {"format": iterprog.FORMAT, "boot": "boot-1"})
    old = os.path.getmtime(tmp_path / "cache" / other_variant) - 2 * iterprog.UNUSED_S
    os.utime(tmp_path / "cache" / other_variant, (old, old))  # kept for its key, not its use
    iterprog._write_cache("iterdestroy-%s.json" % ("b" * 24), {"boot": "boot-0"})
    assert iterprog.compiled(facts) == fake
    mine = "iterdestroy-%s.json" % iterprog.program_key(source, facts.offsets, False)
    assert sorted(os.listdir(tmp_path / "cache")) == sorted([mine, other_variant])
