"""A small reader of the running kernel's BTF, for struct member offsets.

Owns one job: answer "at which byte offset does struct S keep member a.b.c on
*this* kernel?" from /sys/kernel/btf/vmlinux.  The tp_btf, raw tracepoint and
kprobe hooks of the probe need a few such offsets (sk_buff.cb, tcp_skb_cb.seq,
.end_seq, .tcp_flags, sock.__sk_common.skc_cookie); taking them from the
running kernel's own type information, instead of from a header tree that may
belong to another kernel, is what keeps the probe free of header struct
layouts.  The offsets reach the BPF C code as -D compiler flags.

The offsets the probe needs (OFFSET_MACROS) are read once per boot and kept
in the cache directory (`cached_btf_offsets`): parsing vmlinux BTF in Python
costs ~0.2 s.

Format (include/uapi/linux/btf.h): a header, then a type section of
variable-length records (type ids count from 1, id 0 is void), then a string
section.  Only what member lookup needs is decoded.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from typing import Dict, List, Optional, Tuple

from .kheaders import HeadersNotFound, UntrustedCache, check_trusted, trusted_cache_dir

VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

# Kinds (BTF_KIND_*) and the size of the data that follows each record.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_FIXED_EXTRA = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_PER_MEMBER = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
# Kinds that only qualify or rename another type: skipped when resolving.
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}


class BTFError(Exception):
    """The BTF blob is unreadable or lacks what was asked."""


class BTF:
    """Parsed type records of one BTF blob (vmlinux BTF has no base)."""

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BTFError("BTF too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BTFError("bad BTF magic %#x (big-endian BTF is not supported)" % magic)
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._types_start = hdr_len + type_off
        self._types_end = self._types_start + type_len
        self._str_start = hdr_len + str_off
        self._str_end = self._str_start + str_len
        # _pos[id] = byte offset of the record of type id (index 0 = void).
        self._pos: List[int] = [0]
        self._by_name: Optional[Dict[Tuple[int, str], int]] = None
        self._index()

    @classmethod
    def load(cls, path: str = VMLINUX) -> "BTF":
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as e:
            raise BTFError("cannot read %s: %s" % (path, e.strerror)) from e

    def _index(self) -> None:
        data, pos, end = self._data, self._types_start, self._types_end
        unpack = struct.unpack_from
        while pos < end:
            self._pos.append(pos)
            _name, info, _size = unpack("<III", data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            pos += 12 + _FIXED_EXTRA.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen
            if kind > ENUM64 or kind == 0:
                raise BTFError("unknown BTF kind %d" % kind)
        if pos != end:
            raise BTFError("BTF type section overruns its length")

    def _str(self, off: int) -> str:
        start = self._str_start + off
        stop = self._data.index(b"\0", start, self._str_end)
        return self._data[start:stop].decode()

    def _rec(self, tid: int) -> Tuple[int, int, int, int, bool, int]:
        """(name_off, kind, vlen, size_or_type, kind_flag, pos) of type tid."""
        pos = self._pos[tid]
        name, info, size = struct.unpack_from("<III", self._data, pos)
        return name, (info >> 24) & 0x1F, info & 0xFFFF, size, bool(info >> 31), pos

    def find(self, name: str, kind: int = STRUCT) -> int:
        """Type id of the named struct, union, function or typedef; BTFError if absent."""
        if self._by_name is None:
            index = {}
            for tid in range(1, len(self._pos)):
                name_off, k, _v, _s, _kf, _p = self._rec(tid)
                if name_off and k in (STRUCT, UNION, FUNC, TYPEDEF):
                    index.setdefault((k, self._str(name_off)), tid)
            self._by_name = index
        try:
            return self._by_name[(kind, name)]
        except KeyError:
            what = {STRUCT: "struct ", UNION: "union ", FUNC: "function ",
                    TYPEDEF: "typedef "}.get(kind, "")
            raise BTFError("%s%s not in BTF" % (what, name)) from None

    def has_func(self, name: str) -> bool:
        """Is there a FUNC record of this name (a kernel function or kfunc)?"""
        want = name.encode()
        for tid in range(1, len(self._pos)):
            name_off, k, _v, _s, _kf, _p = self._rec(tid)
            if k == FUNC and name_off:
                start = self._str_start + name_off
                if self._data[start:start + len(want) + 1] == want + b"\0":
                    return True
        return False

    def _resolve(self, tid: int) -> int:
        for _ in range(32):
            _n, kind, _v, ref, _kf, _p = self._rec(tid)
            if kind not in _MODIFIERS:
                return tid
            tid = ref
        raise BTFError("type chain too long at id %d" % tid)

    def _members(self, tid: int):
        """Yield (name, type_id, bit_offset, bitfield_size) of a struct/union."""
        _n, kind, vlen, _size, kflag, pos = self._rec(tid)
        if kind not in (STRUCT, UNION):
            raise BTFError("type %d is not a struct or union" % tid)
        for i in range(vlen):
            name_off, mtype, off = struct.unpack_from("<III", self._data, pos + 12 + 12 * i)
            # With kind_flag the offset word packs bitfield size (high 8 bits)
            # and bit offset (low 24 bits); else it is the bit offset alone.
            bits, bsize = (off & 0xFFFFFF, off >> 24) if kflag else (off, 0)
            yield (self._str(name_off) if name_off else ""), mtype, bits, bsize

    def _member_bits(self, tid: int, name: str) -> Optional[Tuple[int, int]]:
        """(bit offset, type id) of a member, looking into anonymous members."""
        for mname, mtype, bits, _bsize in self._members(tid):
            if mname == name:
                return bits, mtype
            if not mname:
                inner = self._resolve(mtype)
                if self._rec(inner)[1] in (STRUCT, UNION):
                    found = self._member_bits(inner, name)
                    if found:
                        return bits + found[0], found[1]
        return None

    def offsetof(self, struct_name: str, path: str) -> int:
        """Byte offset of member `path` ("a.b.c") in struct struct_name."""
        tid = self.find(struct_name)
        total = 0
        for part in path.split("."):
            found = self._member_bits(self._resolve(tid), part)
            if found is None:
                raise BTFError("struct %s has no member %s" % (struct_name, path))
            bits, tid = found
            total += bits
        if total % 8:
            raise BTFError("%s.%s is a bitfield" % (struct_name, path))
        return total // 8

    def sizeof(self, struct_name: str) -> int:
        return self._rec(self.find(struct_name))[3]

    def member_size(self, struct_name: str, path: str) -> int:
        """Size in bytes of the member's type (ints, pointers, structs)."""
        tid = self.find(struct_name)
        for part in path.split("."):
            found = self._member_bits(self._resolve(tid), part)
            if found is None:
                raise BTFError("struct %s has no member %s" % (struct_name, path))
            tid = found[1]
        size = self._type_size(tid)
        if size is None:
            raise BTFError("size of %s.%s unknown (kind %d)"
                           % (struct_name, path, self._rec(self._resolve(tid))[1]))
        return size

    def _type_size(self, tid: int, depth: int = 0) -> Optional[int]:
        """Bytes of a type (ints, pointers, structs, arrays of them); None if unsized."""
        tid = self._resolve(tid)
        _n, kind, _v, size, _kf, pos = self._rec(tid)
        if kind == PTR:
            return 8
        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT):
            return size
        if kind == ARRAY and depth < 8:
            # struct btf_array {u32 type; u32 index_type; u32 nelems;}
            elem, _index, nelems = struct.unpack_from("<III", self._data, pos + 12)
            esize = self._type_size(elem, depth + 1)
            return None if esize is None else esize * nelems
        return None


# -D macro -> (struct, member path, member sizes allowed) read from kernel BTF.
OFFSET_MACROS = {
    "TCPIDLE_SKB_CB_OFF": ("sk_buff", "cb", (48,)),
    "TCPIDLE_CB_SEQ_OFF": ("tcp_skb_cb", "seq", (4,)),
    "TCPIDLE_CB_END_SEQ_OFF": ("tcp_skb_cb", "end_seq", (4,)),
    # u8 until Linux 6.18 widened it to u16 for AccECN's AE bit
    "TCPIDLE_CB_FLAGS_OFF": ("tcp_skb_cb", "tcp_flags", (1, 2)),
    "TCPIDLE_SK_COOKIE_OFF": ("sock", "__sk_common.skc_cookie", (8,)),
    # the selection in the kernel (tp_btf + sk_storage): family, local port
    # (host order), remote port (network order)
    "TCPIDLE_SK_FAMILY_OFF": ("sock", "__sk_common.skc_family", (2,)),
    "TCPIDLE_SK_NUM_OFF": ("sock", "__sk_common.skc_num", (2,)),
    "TCPIDLE_SK_DPORT_OFF": ("sock", "__sk_common.skc_dport", (2,)),
}
# Members whose size varies by kernel: their size goes to the C code too.
SIZE_MACROS = {"TCPIDLE_CB_FLAGS_SIZE": "TCPIDLE_CB_FLAGS_OFF"}


def btf_offsets(path: str = VMLINUX) -> Dict[str, int]:
    """-D values for the tp_btf/raw tracepoint/kprobe readers, from the running kernel's BTF.

    Raises BTFError when BTF is missing or a member is not found or has an
    unexpected size.
    """
    btf = BTF.load(path)
    out = {}
    sizes = {}
    for macro, (st, member, allowed) in OFFSET_MACROS.items():
        got = btf.member_size(st, member)
        if got not in allowed:
            raise BTFError("%s.%s is %d bytes, expected %s"
                           % (st, member, got, " or ".join(map(str, allowed))))
        out[macro] = btf.offsetof(st, member)
        sizes[macro] = got
    for macro, of in SIZE_MACROS.items():
        out[macro] = sizes[of]
    return out


def _boot_identity() -> str:
    """Release and boot id: vmlinux BTF cannot change without a reboot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return "%s %s" % (os.uname().release, boot)


def cached_btf_offsets(cache_dir: Optional[str]) -> Dict[str, int]:
    """btf_offsets(), remembered in cache_dir for the current boot.

    Parsing all of vmlinux BTF in Python takes ~0.2 s, a third of start-up;
    the answer only changes with the kernel, so it is kept per boot.  The
    offsets tell the probe where to read kernel memory: a cache that another
    user could have written is neither read nor written (said in the log).
    """
    log = logging.getLogger("tcpidle.probe")
    try:
        path = os.path.join(trusted_cache_dir(cache_dir), "btf-offsets.json")
    except UntrustedCache as e:
        log.warning("%s; BTF offsets not cached", e)
        return btf_offsets()
    except (HeadersNotFound, OSError):
        return btf_offsets()  # a cache that cannot be made only costs time
    ident = _boot_identity()
    try:
        check_trusted(path, "BTF offset cache")
        with open(path) as f:
            saved = json.load(f)
        wanted = set(OFFSET_MACROS) | set(SIZE_MACROS)
        if saved.get("boot") == ident and set(saved.get("offsets", {})) == wanted:
            return {k: int(v) for k, v in saved["offsets"].items()}
    except UntrustedCache as e:
        log.warning("%s; computed again", e)  # and replaced below: the directory is ours
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    offsets = btf_offsets()
    try:
        tmp = "%s.%d" % (path, os.getpid())
        with open(tmp, "w") as f:
            json.dump({"boot": ident, "offsets": offsets}, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs time
    return offsets

