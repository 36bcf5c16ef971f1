"""Pure tests of the probe's decisions and readers (no root, no BPF).

Covers: which hook is chosen given what the kernel offers and which attach
fails (and what is said about it), the -D flags, decoding of map values,
the eviction arithmetic, the BTF reader (on a hand-made blob and on the
running kernel's /sys/kernel/btf/vmlinux), tracefs format parsing, and the
header-tree search and merge (on fake trees and on the installed ones).
"""

from __future__ import annotations

import logging
import os
import struct

import pytest

from tcpidle.probe import kheaders
from tcpidle.probe.btf import BTF, BTFError, VMLINUX
from tcpidle.errors import UsageError
from tcpidle.model import Activity
from tcpidle.probe import (
    HOOKS,
    KernelFeatures,
    ProbeUnavailable,
    VALUE,
    attach_first,
    bpf_source,
    build_cflags,
    decode_entries,
    evicted_count,
    plan_hooks,
    possible_cpus,
    tracepoint_fields,
    unavailable_reasons,
)

OFFS = {"TCPIDLE_SKB_CB_OFF": 40, "TCPIDLE_CB_SEQ_OFF": 0, "TCPIDLE_CB_END_SEQ_OFF": 4,
        "TCPIDLE_CB_FLAGS_OFF": 12, "TCPIDLE_CB_FLAGS_SIZE": 2, "TCPIDLE_SK_COOKIE_OFF": 88,
        "TCPIDLE_SK_FAMILY_OFF": 16, "TCPIDLE_SK_NUM_OFF": 14, "TCPIDLE_SK_DPORT_OFF": 12}
TP_FIELDS = frozenset({"sock_cookie", "data_len", "skbaddr", "skaddr"})


def feats(btf=True, kprobes=True, tp=TP_FIELDS, destroy=frozenset({"sock_cookie"})):
    return KernelFeatures(btf_offsets=OFFS if btf else None,
                          btf_error=None if btf else "cannot read /sys/kernel/btf/vmlinux",
                          kprobes=kprobes, tcp_probe_fields=tp, destroy_fields=destroy)


# -- hook choice ----------------------------------------------------------------


def test_everything_available_tries_hooks_best_first():
    cands, notes = plan_hooks("auto", unavailable_reasons(feats()))
    assert cands == ["tp_btf", "raw_tracepoint", "kprobe", "tracepoint"]
    assert notes == []


def test_this_machine_shape_no_kprobes():
    cands, notes = plan_hooks("auto", unavailable_reasons(feats(kprobes=False)))
    assert cands == ["tp_btf", "raw_tracepoint", "tracepoint"]
    assert notes == ["kprobe: kernel has no kprobes"]


def test_no_btf_leaves_only_the_tracepoint():
    cands, notes = plan_hooks("auto", unavailable_reasons(feats(btf=False)))
    assert cands == ["tracepoint"]
    assert [n.split(":")[0] for n in notes] == ["tp_btf", "raw_tracepoint", "kprobe"]
    assert all("BTF" in n for n in notes)


def test_old_tracepoint_without_cookie_is_not_a_candidate():
    r = unavailable_reasons(feats(tp=frozenset({"data_len", "sport"})))
    assert "sock_cookie" in r["tracepoint"]
    # Its raw arguments (sk, skb) are all the raw hook needs.
    assert r["raw_tracepoint"] is None
    r = unavailable_reasons(feats(tp=None))
    assert r["tracepoint"] == r["raw_tracepoint"] == r["tp_btf"] == "no tcp:tcp_probe tracepoint"


def test_nothing_available_is_probe_unavailable_with_all_reasons():
    r = unavailable_reasons(feats(btf=False, kprobes=False, tp=None))
    with pytest.raises(ProbeUnavailable) as e:
        plan_hooks("auto", r)
    msg = str(e.value)
    assert "tp_btf" in msg and "kprobe" in msg and "tcp_probe" in msg
    assert "\n" not in msg


def test_named_hook_must_be_available():
    r = unavailable_reasons(feats(kprobes=False))
    assert plan_hooks("tracepoint", r) == (["tracepoint"], [])
    with pytest.raises(ProbeUnavailable, match="kprobe unavailable: kernel has no kprobes"):
        plan_hooks("kprobe", r)


def test_unknown_hook_is_a_usage_error():
    with pytest.raises(UsageError):
        plan_hooks("uprobe", {})


def fake_kernel(failing):
    """try_attach for a kernel where the hooks in `failing` fail with that text."""
    tried = []

    def try_attach(hook):
        tried.append(hook)
        if hook in failing:
            raise Exception(failing[hook])

    return try_attach, tried


def test_failed_tp_btf_falls_through_and_is_logged(caplog):
    try_attach, tried = fake_kernel({"tp_btf": "Need super-user privileges to run"})
    with caplog.at_level(logging.INFO, logger="tcpidle.probe"):
        hook, notes = attach_first(["tp_btf", "tracepoint"], try_attach,
                                   ["kprobe: kernel has no kprobes"])
    assert hook == "tracepoint"
    assert tried == ["tp_btf", "tracepoint"]
    # bcc's misleading EPERM text is rewritten; notes come in HOOKS order
    assert notes == ["tp_btf: load refused: Operation not permitted",
                     "kprobe: kernel has no kprobes"]
    assert "BPF hook tp_btf failed: load refused: Operation not permitted; trying tracepoint" \
        in caplog.text


def test_first_working_hook_wins_and_later_ones_are_not_tried():
    try_attach, tried = fake_kernel({})
    hook, notes = attach_first(list(HOOKS), try_attach)
    assert (hook, notes, tried) == ("tp_btf", [], ["tp_btf"])


def test_raw_tracepoint_chosen_when_tp_btf_fails_then_kprobe():
    try_attach, tried = fake_kernel({"tp_btf": "Failed to attach BPF to entry kernel func"})
    hook, notes = attach_first(list(HOOKS), try_attach)
    assert hook == "raw_tracepoint" and tried == ["tp_btf", "raw_tracepoint"]
    assert notes == ["tp_btf: Failed to attach BPF to entry kernel func"]
    try_attach, tried = fake_kernel({"tp_btf": "no trampoline", "raw_tracepoint": "EINVAL"})
    hook, notes = attach_first(list(HOOKS), try_attach)
    assert hook == "kprobe" and tried == ["tp_btf", "raw_tracepoint", "kprobe"]


def test_all_attaches_failing_is_probe_unavailable():
    try_attach, _ = fake_kernel({h: "boom %s" % h for h in HOOKS})
    with pytest.raises(ProbeUnavailable) as e:
        attach_first(list(HOOKS), try_attach)
    assert str(e.value) == ("no BPF hook could attach (tp_btf: boom tp_btf; "
                            "raw_tracepoint: boom raw_tracepoint; "
                            "kprobe: boom kprobe; tracepoint: boom tracepoint)")


# -- the destroy hook -------------------------------------------------------------


def test_destroy_hook_raw_tracepoint_first_where_the_cookie_offset_is_known():
    from tcpidle.probe.features import destroy_hooks

    # the raw tracepoint (a BPF link: pinnable) reads the cookie at its BTF
    # offset; the classic one (a perf event) carries it in its record
    assert destroy_hooks(feats()) == ["raw_tracepoint", "tracepoint"]
    assert destroy_hooks(feats(btf=False)) == ["tracepoint"]
    assert destroy_hooks(feats(destroy=frozenset({"skaddr"}))) == ["raw_tracepoint"]
    assert destroy_hooks(feats(destroy=None)) == []  # no tcp_destroy_sock at all


def test_cflags_of_the_raw_destroy_hook_carry_the_cookie_offset():
    f = build_cflags(16, ["tracepoint"], OFFS, destroy=True, destroy_raw=True)
    assert "-DTCPIDLE_DESTROY_RAW" in f and "-DTCPIDLE_DESTROY" in f
    assert "-DTCPIDLE_SK_COOKIE_OFF=88" in f  # on_destroy_raw reads it
    # no offsets, no raw destroy hook (it could not read the cookie)
    assert "-DTCPIDLE_DESTROY_RAW" not in build_cflags(16, ["tracepoint"], None, True,
                                                       destroy_raw=True)


def test_detached_probe_pins_per_path():
    from tcpidle.probe.detached import detachable, pinned_names

    assert pinned_names({"storage": "sk_storage"}) == (("storage", "counters"), ("link",))
    assert pinned_names({}) == (("storage", "counters"), ("link",))  # format 1 records
    assert pinned_names({"storage": "lru", "destroy": "raw_tracepoint"}) == (
        ("activity", "counters"), ("link", "destroy_link"))
    assert pinned_names({"storage": "lru", "destroy": None}) == (
        ("activity", "counters"), ("link",))
    # links: tp_btf and raw tracepoints; perf events: kprobes and classic tracepoints
    for hook in ("auto", "tp_btf", "raw_tracepoint"):
        assert detachable("/sys/fs/bpf/tcpidle", hook) is None
    for hook in ("kprobe", "tracepoint"):
        assert detachable("/sys/fs/bpf/tcpidle", hook) == "hook %s is not a BPF link" % hook
    assert detachable(None, "auto") == "no pin directory"


# -- compiler flags, source -----------------------------------------------------


def test_cflags_configure_the_source_without_text_substitution():
    f = build_cflags(16, ["tracepoint"], OFFS, destroy=True)
    assert f == ["-DMAX_ENTRIES=16", "-DTCPIDLE_HOOK_TRACEPOINT", "-DTCPIDLE_DESTROY"]
    f = build_cflags(65536, ["tp_btf", "tracepoint"], OFFS, destroy=False)
    assert "-DTCPIDLE_HOOK_TP_BTF" in f and "-DTCPIDLE_SKB_CB_OFF=40" in f
    assert "-DTCPIDLE_DESTROY" not in f
    f = build_cflags(16, ["raw_tracepoint"], OFFS, destroy=True)
    assert "-DTCPIDLE_HOOK_RAW_TRACEPOINT" in f and "-DTCPIDLE_CB_FLAGS_OFF=12" in f
    f = build_cflags(8, ["tracepoint"], OFFS, destroy=True, selftest=True)
    assert "-DTCPIDLE_SELFTEST" in f and "-DTCPIDLE_SK_COOKIE_OFF=88" in f


def test_cflags_follow_the_kernel_tracepoint_record_and_cookie_helper():
    # the selftest reads skaddr/skbaddr only where the record has them
    assert "-DTCPIDLE_TP_HAS_SK" not in build_cflags(8, ["tracepoint"], OFFS, True, True)
    assert "-DTCPIDLE_TP_HAS_SK" in build_cflags(8, ["tracepoint"], OFFS, True, True,
                                                 tp_has_sk=True)
    # tp_btf before 5.12 reads the cookie from the socket
    assert "-DTCPIDLE_TP_BTF_READ_COOKIE" in build_cflags(
        8, ["tp_btf"], OFFS, True, tracing_cookie_helper=False)
    assert "-DTCPIDLE_TP_BTF_READ_COOKIE" not in build_cflags(8, ["tp_btf"], OFFS, True)
    assert "-DTCPIDLE_TP_BTF_READ_COOKIE" not in build_cflags(
        8, ["raw_tracepoint"], OFFS, True, tracing_cookie_helper=False)


def test_record_pointers_and_kernel_release():
    from tcpidle.probe.features import release_at_least

    assert feats().tp_has_sk
    # Debian 5.10's and 6.1's tcp_probe records
    assert not feats(tp=frozenset({"sock_cookie", "data_len", "saddr"})).tp_has_sk
    assert not feats(tp=None).tp_has_sk
    assert release_at_least("5.12.0", (5, 12))
    assert release_at_least("6.12.118+deb13-amd64", (5, 12))
    assert release_at_least("6.18.44-fc-v657", (5, 12))
    assert not release_at_least("5.10.0-46-amd64", (5, 12))
    assert not release_at_least("5.11", (5, 12))
    assert release_at_least("6.1.0-57-amd64", (6, 1))


def test_source_has_every_macro_the_flags_set():
    with open(bpf_source()) as f:
        src = f.read()
    for macro in ("MAX_ENTRIES", "TCPIDLE_HOOK_TRACEPOINT", "TCPIDLE_HOOK_TP_BTF",
                  "TCPIDLE_HOOK_KPROBE", "TCPIDLE_DESTROY", "TCPIDLE_SELFTEST",
                  "TCPIDLE_TP_HAS_SK", "TCPIDLE_TP_BTF_READ_COOKIE", *OFFS):
        assert macro in src
    # The documented value layout matches the reader's.
    assert VALUE.size == 40 and "40 bytes" in src


# -- map decoding ---------------------------------------------------------------


def test_decode_entries():
    vals = VALUE.pack(10, 8, 3, 2, 99) + VALUE.pack(20, 0, 1, 0, 0)
    got = decode_entries([7, 9], vals)
    assert got == {7: Activity(7, 10, 8, 3, 2, 99), 9: Activity(9, 20, 0, 1, 0, 0)}


def test_evicted_is_what_left_other_than_by_destroy():
    assert evicted_count(inserts=40, deletes=3, entries=16) == 21
    assert evicted_count(inserts=5, deletes=1, entries=4) == 0
    # a counter read that raced ahead of the map read never goes negative
    assert evicted_count(inserts=5, deletes=2, entries=4) == 0


@pytest.mark.parametrize("text,n", [("0-1\n", 2), ("0\n", 1), ("0-3,8-11\n", 12), ("0,2\n", 3)])
def test_possible_cpus(tmp_path, text, n):
    p = tmp_path / "possible"
    p.write_text(text)
    assert possible_cpus(str(p)) == n


def test_tracepoint_fields_from_a_format_file(tmp_path):
    d = tmp_path / "events" / "tcp" / "tcp_probe"
    d.mkdir(parents=True)
    (d / "format").write_text(
        "name: tcp_probe\nID: 1\nformat:\n"
        "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
        "\tfield:__u8 saddr[28];\toffset:8;\tsize:28;\tsigned:0;\n"
        "\tfield:__u16 data_len;\toffset:76;\tsize:2;\tsigned:0;\n"
        "\tfield:__u64 sock_cookie;\toffset:112;\tsize:8;\tsigned:0;\n"
        "\tfield:const void * skbaddr;\toffset:120;\tsize:8;\tsigned:0;\n\n"
        "print fmt: \"x\"\n")
    got = tracepoint_fields("tcp", "tcp_probe", str(tmp_path))
    assert got == {"common_type", "saddr", "data_len", "sock_cookie", "skbaddr"}
    assert tracepoint_fields("tcp", "nope", str(tmp_path)) is None


# -- BTF ------------------------------------------------------------------------


def make_btf():
    """A tiny BTF blob:

    [1] int (4 bytes)   [2] struct inner {int a @0; int b @4}
    [3] union <anon> {int x @0; struct inner in @0}
    [4] typedef inner_t -> 2
    [5] struct outer (kind_flag) {int flags:4 @bit0; int odd:4 @bit4;
                                  <anon> union @8; inner_t t @16; int *p @24}
    [6] ptr -> 1
    """
    strings = b"\0int\0inner\0a\0b\0x\0in\0inner_t\0outer\0flags\0odd\0t\0p\0"

    def s(name):
        return strings.index(name.encode() + b"\0")

    types = b""
    types += struct.pack("<III", s("int"), 1 << 24, 4) + struct.pack("<I", 32)
    types += struct.pack("<III", s("inner"), (4 << 24) | 2, 8)
    types += struct.pack("<III", s("a"), 1, 0) + struct.pack("<III", s("b"), 1, 32)
    types += struct.pack("<III", 0, (5 << 24) | 2, 8)
    types += struct.pack("<III", s("x"), 1, 0) + struct.pack("<III", s("in"), 2, 0)
    types += struct.pack("<III", s("inner_t"), 8 << 24, 2)
    types += struct.pack("<III", s("outer"), (1 << 31) | (4 << 24) | 5, 32)
    types += struct.pack("<III", s("flags"), 1, (4 << 24) | 0)
    types += struct.pack("<III", s("odd"), 1, (4 << 24) | 4)
    types += struct.pack("<III", 0, 3, 64)
    types += struct.pack("<III", s("t"), 4, 128)
    types += struct.pack("<III", s("p"), 6, 192)
    types += struct.pack("<III", 0, 2 << 24, 1)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_btf_reader_on_a_hand_made_blob():
    b = BTF(make_btf())
    assert b.offsetof("inner", "b") == 4
    assert b.offsetof("outer", "x") == 8  # through the anonymous union
    assert b.offsetof("outer", "in.b") == 12  # nested, through a named member
    assert b.offsetof("outer", "t.b") == 20  # through a typedef
    assert b.offsetof("outer", "flags") == 0
    assert b.member_size("outer", "p") == 8
    assert b.member_size("outer", "t") == 8
    assert b.sizeof("outer") == 32
    with pytest.raises(BTFError, match="bitfield"):
        b.offsetof("outer", "odd")
    with pytest.raises(BTFError, match="no member"):
        b.offsetof("outer", "missing")
    with pytest.raises(BTFError, match="not in BTF"):
        b.offsetof("nope", "a")


def test_btf_reader_rejects_garbage():
    with pytest.raises(BTFError):
        BTF(b"\0" * 64)
    blob = bytearray(make_btf())
    struct.pack_into("<I", blob, 24 + 4, 31 << 24)  # an unknown kind
    with pytest.raises(BTFError):
        BTF(bytes(blob))


needs_vmlinux_btf = pytest.mark.skipif(not os.access(VMLINUX, os.R_OK),
                                       reason="kernel has no readable BTF")


@needs_vmlinux_btf
def test_btf_of_the_running_kernel_has_the_probe_offsets():
    b = BTF.load()
    skb = b.sizeof("sk_buff")
    length, data = b.offsetof("sk_buff", "len"), b.offsetof("sk_buff", "data")
    assert 0 < length < skb and length % 4 == 0
    assert 0 < data < skb and data % 8 == 0
    assert b.member_size("sk_buff", "len") == 4
    assert b.member_size("sk_buff", "data") == 8
    # skc_cookie sits in struct sock_common, the first member of struct sock
    assert b.offsetof("sock", "__sk_common") == 0
    ck = b.offsetof("sock", "__sk_common.skc_cookie")
    assert ck == b.offsetof("sock_common", "skc_cookie")
    assert 0 < ck < b.sizeof("sock_common") and ck % 8 == 0
    assert b.member_size("sock", "__sk_common.skc_cookie") == 8
    # the TCP control block lives in skb->cb, which is char[48]
    assert b.member_size("sk_buff", "cb") == 48
    assert b.sizeof("tcp_skb_cb") <= 48
    assert (b.offsetof("tcp_skb_cb", "seq"), b.offsetof("tcp_skb_cb", "end_seq")) == (0, 4)
    assert b.member_size("tcp_skb_cb", "tcp_flags") in (1, 2)  # u16 since 6.18


@needs_vmlinux_btf
def test_probe_btf_offsets_helper():
    from tcpidle.probe import btf_offsets

    offs = btf_offsets()
    assert set(offs) == set(OFFS)
    assert offs["TCPIDLE_CB_SEQ_OFF"] != offs["TCPIDLE_CB_END_SEQ_OFF"]
    assert offs["TCPIDLE_CB_FLAGS_OFF"] + offs["TCPIDLE_CB_FLAGS_SIZE"] <= 48


# -- kernel headers -------------------------------------------------------------


def fake_debian(root, ver="6.1.0-9", flavour="amd64", arch="x86"):
    """A minimal Debian-style split header pair under root."""
    common = root / ("linux-headers-%s-common" % ver)
    build = root / ("linux-headers-%s-%s" % (ver, flavour))
    for d in ("include/linux", "include/uapi/linux", "arch/%s/include/asm" % arch,
              "arch/%s/include/uapi/asm" % arch):
        (common / d).mkdir(parents=True)
    (common / "include/linux/kconfig.h").write_text("/* kconfig */\n")
    (common / "Makefile").write_text("# top\n")
    for d in ("include/generated/uapi/linux", "include/config",
              "arch/%s/include/generated/asm" % arch):
        (build / d).mkdir(parents=True)
    (build / "include/generated/autoconf.h").write_text("#define CONFIG_X 1\n")
    (build / "include/generated/utsrelease.h").write_text(
        '#define UTS_RELEASE "%s-%s"\n' % (ver, flavour))
    (build / "Makefile").write_text("include %s/Makefile\n" % common)
    return common, build


def test_find_candidates_pairs_debian_trees(tmp_path):
    common, build = fake_debian(tmp_path)
    (tmp_path / "unrelated").mkdir()
    cands = kheaders.find_candidates(str(tmp_path), "x86")
    assert cands == [kheaders.Candidate("6.1.0-9-amd64", str(build), str(common))]
    assert kheaders.find_candidates(str(tmp_path), "arm64") == []


def test_rank_prefers_exact_then_same_series_then_newest():
    c = [kheaders.Candidate(r, "/b/" + r, "/c/" + r)
         for r in ("5.10.0-1-amd64", "6.1.0-9-amd64", "6.1.0-12-amd64", "6.5.0-1-amd64")]
    assert kheaders.rank(c, "6.1.0-9-amd64")[0].release == "6.1.0-9-amd64"
    assert kheaders.rank(c, "6.1.99-custom")[0].release == "6.1.0-12-amd64"
    assert kheaders.rank(c, "6.18.44-fc")[0].release == "6.5.0-1-amd64"


def test_merged_tree_is_what_bcc_needs_and_is_reused(tmp_path):
    common, build = fake_debian(tmp_path / "src")
    cand = kheaders.find_candidates(str(tmp_path / "src"), "x86")[0]
    cache = tmp_path / "cache"
    tree = kheaders.merged_tree(cand, str(cache), "x86")
    assert tree == str(cache / "kheaders-6.1.0-9-amd64")
    # bcc's relative include paths all resolve inside one directory
    for rel in ("include/linux/kconfig.h", "include/generated/autoconf.h", "include/config",
                "include/uapi/linux", "arch/x86/include/asm", "arch/x86/include/uapi/asm",
                "arch/x86/include/generated/asm", "Makefile"):
        assert os.path.exists(os.path.join(tree, rel)), rel
    # the objtree's Makefile (which includes the common one) wins the clash
    assert os.path.realpath(os.path.join(tree, "Makefile")) == str(build / "Makefile")
    # nothing was written into the source trees
    assert not os.path.lexists(common / "include/generated")
    # a second call reuses the tree
    mtime = os.stat(tree).st_mtime_ns
    assert kheaders.merged_tree(cand, str(cache), "x86") == tree
    assert os.stat(tree).st_mtime_ns == mtime
    assert [n for n in os.listdir(cache) if n.startswith(".")] == []


def test_merged_tree_is_rebuilt_when_links_dangle(tmp_path):
    fake_debian(tmp_path / "src")
    cand = kheaders.find_candidates(str(tmp_path / "src"), "x86")[0]
    tree = kheaders.merged_tree(cand, str(tmp_path / "cache"), "x86")
    os.unlink(os.path.join(tree, "include", "generated"))
    os.symlink("/nonexistent", os.path.join(tree, "include", "generated"))
    assert kheaders.merged_tree(cand, str(tmp_path / "cache"), "x86") == tree
    assert os.path.isfile(os.path.join(tree, "include/generated/autoconf.h"))


def test_find_headers_order(tmp_path, monkeypatch):
    monkeypatch.setattr(kheaders, "kernel_arch", lambda machine=None: "x86")
    src, mods, cache = tmp_path / "src", tmp_path / "modules", tmp_path / "cache"
    fake_debian(src)
    mods.mkdir()
    # no /lib/modules tree: the /usr/src pair is merged and handed to bcc
    t = kheaders.find_headers("6.18.1-custom", str(cache), str(src), str(mods), environ={})
    assert t.env == t.path == str(cache / "kheaders-6.1.0-9-amd64")
    assert "linux-headers-6.1.0-9-common + " in t.source
    assert "headers of 6.1.0-9-amd64 for running 6.18.1-custom" in t.source
    # /lib/modules/<release>/build with kconfig.h: bcc finds it on its own
    build = mods / "6.18.1-custom" / "build"
    (build / "include/linux").mkdir(parents=True)
    (build / "include/linux/kconfig.h").write_text("")
    t = kheaders.find_headers("6.18.1-custom", str(cache), str(src), str(mods), environ={})
    assert t.env is None and t.source == str(build)
    # the user's BCC_KERNEL_SOURCE wins when usable
    t = kheaders.find_headers("6.18.1-custom", str(cache), str(src), str(mods),
                              environ={"BCC_KERNEL_SOURCE": str(build)})
    assert t.env == str(build)


def test_find_headers_none(tmp_path):
    with pytest.raises(kheaders.HeadersNotFound, match="no kernel headers"):
        kheaders.find_headers("6.18.1", str(tmp_path / "c"), str(tmp_path), str(tmp_path),
                              environ={})


def test_cache_dir_defaults(monkeypatch):
    monkeypatch.delenv("TCPIDLE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert kheaders.default_cache_dir() == "/var/cache/tcpidle"
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert kheaders.default_cache_dir() == "/x/tcpidle"
    monkeypatch.setenv("TCPIDLE_CACHE_DIR", "/y")
    assert kheaders.default_cache_dir() == "/y"


@pytest.mark.skipif(not kheaders.find_candidates(), reason="no header package installed")
def test_installed_header_packages_are_found():
    cands = kheaders.find_candidates()
    for c in cands:
        assert os.path.isfile(os.path.join(c.common, kheaders.KCONFIG_H))
        assert os.path.isfile(os.path.join(c.build, kheaders.AUTOCONF_H))


@needs_vmlinux_btf
def test_btf_offsets_are_cached_per_boot(tmp_path, monkeypatch):
    import json

    from tcpidle.probe import btf as probe

    first = probe.cached_btf_offsets(str(tmp_path))
    path = tmp_path / "btf-offsets.json"
    saved = json.loads(path.read_text())
    assert saved["offsets"] == first
    # the same boot: the file is believed (proved by planting other values)
    saved["offsets"] = {k: v + 1000 for k, v in first.items()}
    path.write_text(json.dumps(saved))
    assert probe.cached_btf_offsets(str(tmp_path)) == saved["offsets"]
    # another boot or kernel: recomputed from BTF
    monkeypatch.setattr(probe, "_boot_identity", lambda: "other boot")
    assert probe.cached_btf_offsets(str(tmp_path)) == first
    # a corrupt file is recomputed too
    path.write_text("{not json")
    assert probe.cached_btf_offsets(str(tmp_path)) == first


def test_counter_names_follow_the_program_indexes():
    """COUNTERS[i] names the program's counters[i]: the C source's C_* indexes are the truth.

    A swap on either side would file "no cookie" segments under "failed" and so
    on; only the kernel tier would notice otherwise.
    """
    import re

    from tcpidle.probe import COUNTERS

    with open(bpf_source()) as f:
        text = f.read()
    indexes = {int(i): name.lower() for name, i in re.findall(r"^#define C_(\w+)\s+(\d+)", text, re.M)}
    (n,) = re.findall(r"^#define N_COUNTERS\s+(\d+)", text, re.M)
    assert sorted(indexes) == list(range(int(n)))
    assert tuple(indexes[i] for i in range(int(n))) == COUNTERS


def test_selection_cflags_bound_the_storage_by_family_and_port_spans():
    from tcpidle.model import AF_INET, AF_INET6, PortSet, Selector
    from tcpidle.probe.features import selection_cflags

    assert selection_cflags(None) == []
    assert selection_cflags(Selector()) == []  # both families, any port: no check
    f = selection_cflags(Selector(families=frozenset({AF_INET}),
                                  dports=PortSet(((80, 80), (443, 443)))))
    # one family; several ranges become their span (a superset)
    assert f == ["-DTCPIDLE_SELECT", "-DTCPIDLE_SEL_FAMILY=%d" % AF_INET,
                 "-DTCPIDLE_SEL_DPORT_LO=80", "-DTCPIDLE_SEL_DPORT_HI=443"]
    f = selection_cflags(Selector(families=frozenset({AF_INET, AF_INET6}),
                                  sports=PortSet(((7000, 7100),))))
    assert f == ["-DTCPIDLE_SELECT", "-DTCPIDLE_SEL_SPORT_LO=7000", "-DTCPIDLE_SEL_SPORT_HI=7100"]
    # only with the storage: the LRU hooks record every socket, as before
    sel = Selector(sports=PortSet(((22, 22),)))
    assert "-DTCPIDLE_SELECT" not in build_cflags(8, ["tp_btf"], OFFS, True, selector=sel)
    assert "-DTCPIDLE_SELECT" in build_cflags(8, ["tp_btf"], OFFS, True, sk_storage=True,
                                              selector=sel)
