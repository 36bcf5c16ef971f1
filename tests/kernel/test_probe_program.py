"""Kernel tests of the compiled probe: its BPF instructions, read back from bcc.

bcc compiles every variant of bpf/tcpidle.bpf.c even where the kernel would
refuse to load it (fentry here), and hands back the instructions
(`BPF.dump_func`).  Some bugs are visible only there: bcc 0.26 declares
`bpf_get_socket_cookie` as returning u32, so a program that calls it through
bcc's prototype keys the map by the low 32 bits of the cookie -- right until
a host has made 2^32 sockets, then wrong, and no test here can make that
many.  The instructions show it at once: clang zero-extends the helper's
return value (`r <<= 32; r >>= 32`) before storing the key.
"""

from __future__ import annotations

import struct
from typing import List, Sequence, Tuple

import pytest

from tcpidle.probe import bpf_source, btf_offsets, build_cflags, kheaders
from tcpidle.probe.features import RCV_FUNC
from tcpidle.probe.loader import _dispose, _env, _module_class

pytestmark = pytest.mark.kernel

BPF_FUNC_get_socket_cookie = 46  # include/uapi/linux/bpf.h, enum bpf_func_id
# Instruction classes and fields (include/uapi/linux/bpf_common.h, bpf.h)
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
MOV, CALL, EXIT, DW = 0xB0, 0x80, 0x90, 0x18
CLOBBERED_BY_CALL = frozenset(range(6))  # r0-r5; r6-r9 are callee-saved


def decode(raw: bytes) -> List[Tuple[int, int, int, int, int]]:
    """(code, dst, src, off, imm) per 8-byte instruction; lddw's second half skipped."""
    out = []
    i = 0
    while i < len(raw):
        code, regs, off, imm = struct.unpack_from("<BBhi", raw, i)
        out.append((code, regs & 0x0F, regs >> 4, off, imm))
        i += 16 if code == (LD | DW) else 8
    return out


def cookie_truncations(insns: Sequence[Tuple[int, int, int, int, int]]) -> List[str]:
    """What happens to each bpf_get_socket_cookie() result before it is stored.

    From the call on, follow the registers holding the cookie (r0, and the
    registers it is copied to) in program order until it is stored to the
    stack as a 64-bit word (where record() keeps the map key).  Any ALU
    operation on it before that (a shift, a mask, a 32-bit move), a narrower
    store, or losing it, is reported.  Straight-line tracking is enough: the
    probe stores the key before any branch back.
    """
    problems = []
    calls = [i for i, (code, _, src, _, imm) in enumerate(insns)
             if code == (JMP | CALL) and src == 0 and imm == BPF_FUNC_get_socket_cookie]
    if not calls:
        return ["no call of bpf_get_socket_cookie"]
    for at in calls:
        held = {0}
        for pc in range(at + 1, len(insns)):
            code, dst, src, off, imm = insns[pc]
            cls, op, by_reg = code & 0x07, code & 0xF0, bool(code & 0x08)
            where = "insn %d after the call at %d" % (pc, at)
            if cls == STX and src in held:
                if code & 0x18 != DW:
                    problems.append("%s: stored in fewer than 64 bits" % where)
                break  # the 64-bit store of the key: intact
            if cls in (ALU, ALU64):
                if op == MOV and cls == ALU64:
                    if by_reg and src in held:
                        held.add(dst)
                    else:
                        held.discard(dst)
                    continue
                if dst in held or (cls == ALU and by_reg and src in held):
                    problems.append("%s: %s op %#x on the cookie (code %#04x, imm %d)"
                                    % (where, "32-bit" if cls == ALU else "64-bit", op, code, imm))
                    break
                continue
            if cls in (LD, LDX):
                held.discard(dst)
            elif cls in (JMP, JMP32) and op == CALL:
                held -= CLOBBERED_BY_CALL
            elif cls == JMP and op == EXIT:
                held.clear()
            if not held:
                problems.append("%s: the cookie was dropped before it was stored" % where)
                break
    return problems


def compile_fentry(cache_dir, text=None):
    """Instructions of the fentry program: the probe's own, or of `text`."""
    tree = kheaders.find_headers(cache_dir=cache_dir)
    flags = build_cflags(16, ["fentry"], btf_offsets(), destroy=True)
    kwargs = {"text": text.encode()} if text else {"src_file": bpf_source().encode()}
    with _env("BCC_KERNEL_SOURCE", tree.env):
        module = _module_class()(cflags=flags, **kwargs)
    try:
        return decode(module.dump_func(("kfunc__" + RCV_FUNC).encode()))
    finally:
        _dispose(module)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiprog-cache"))


def test_fentry_keys_the_map_by_the_whole_64_bit_cookie(cache_dir):
    problems = cookie_truncations(compile_fentry(cache_dir))
    assert problems == []


# A program that calls the helper through a u32 prototype, as bcc 0.26's
# helpers.h declares it: the check above must see the truncation.
U32_PROTOTYPE = r"""
struct sock;
struct sk_buff;
static u32 (*cookie32)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;
BPF_HASH(keys, u64, u64, 16);
KFUNC_PROBE(tcp_rcv_established, struct sock *sk, struct sk_buff *skb)
{
    u64 cookie = cookie32(sk);
    u64 one = 1;

    keys.update(&cookie, &one);
    return 0;
}
"""


def test_the_check_sees_a_u32_prototype(cache_dir):
    problems = cookie_truncations(compile_fentry(cache_dir, U32_PROTOTYPE))
    assert problems and "on the cookie" in problems[0], problems
