"""Kernel tests of the compiled probe: its BPF instructions, read back from bcc.

bcc compiles every variant of bpf/tcpidle.bpf.c, even one it cannot load
itself (tp_btf: tcpidle/probe/tpbtf.py loads it), and hands back the instructions
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
from tcpidle.probe.loader import _dispose, _env, _module_class

pytestmark = pytest.mark.kernel

BPF_FUNC_get_socket_cookie = 46  # include/uapi/linux/bpf.h, enum bpf_func_id
# Instruction classes and fields (include/uapi/linux/bpf_common.h, bpf.h)
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
MOV, CALL, EXIT, DW, JNE = 0xB0, 0x80, 0x90, 0x18, 0x50
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
    store, or losing it, is reported.  Straight-line tracking is enough (the
    probe stores the key before any branch back), except that a test of the
    cookie against 0 (`if rX != 0 goto`) is followed to where it is non-zero:
    the other way is the no-cookie path, which stores nothing.
    """
    problems = []
    calls = [i for i, (code, _, src, _, imm) in enumerate(insns)
             if code == (JMP | CALL) and src == 0 and imm == BPF_FUNC_get_socket_cookie]
    if not calls:
        return ["no call of bpf_get_socket_cookie"]
    for at in calls:
        held = {0}
        pc = at
        while pc + 1 < len(insns):
            pc += 1
            code, dst, src, off, imm = insns[pc]
            cls, op, by_reg = code & 0x07, code & 0xF0, bool(code & 0x08)
            where = "insn %d after the call at %d" % (pc, at)
            if cls == JMP and op == JNE and not by_reg and imm == 0 and dst in held:
                pc += off  # to the non-zero cookie's path (the loop adds the 1)
                continue
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


def compile_tp_btf(cache_dir, text=None):
    """Instructions of the tp_btf program (LRU variant: the cookie is its map key):
    the probe's own, or of `text`."""
    tree = kheaders.find_headers(cache_dir=cache_dir)
    flags = build_cflags(16, ["tp_btf"], btf_offsets(), destroy=True)
    kwargs = {"text": text.encode()} if text else {"src_file": bpf_source().encode()}
    with _env("BCC_KERNEL_SOURCE", tree.env):
        module = _module_class()(cflags=flags, **kwargs)
    try:
        return decode(module.dump_func(b"on_tcp_probe_btf"))
    finally:
        _dispose(module)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiprog-cache"))


def test_tp_btf_keys_the_map_by_the_whole_64_bit_cookie(cache_dir):
    problems = cookie_truncations(compile_tp_btf(cache_dir))
    assert problems == []


# A program that calls the helper through a u32 prototype, as bcc 0.26's
# helpers.h declares it: the check above must see the truncation.
U32_PROTOTYPE = r"""
static u32 (*cookie32)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;
BPF_HASH(keys, u64, u64, 16);
int on_tcp_probe_btf(u64 *ctx)
{
    u64 cookie = cookie32((void *)ctx[0]);
    u64 one = 1;

    keys.update(&cookie, &one);
    return 0;
}
"""


def test_the_check_sees_a_u32_prototype(cache_dir):
    problems = cookie_truncations(compile_tp_btf(cache_dir, U32_PROTOTYPE))
    assert problems and "on the cookie" in problems[0], problems
