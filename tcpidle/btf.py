"""A small reader of the running kernel's BTF, for struct member offsets.

Owns one job: answer "at which byte offset does struct S keep member a.b.c on
*this* kernel?" from /sys/kernel/btf/vmlinux.  The fentry, raw tracepoint and
kprobe hooks of the probe need a few such offsets (sk_buff.cb, tcp_skb_cb.seq,
.end_seq, .tcp_flags, sock.__sk_common.skc_cookie); taking them from the
running kernel's own type information, instead of from a header tree that may
belong to another kernel, is what keeps the probe free of header struct
layouts.  The offsets reach the BPF C code as -D compiler flags.

Format (include/uapi/linux/btf.h): a header, then a type section of
variable-length records (type ids count from 1, id 0 is void), then a string
section.  Only what member lookup needs is decoded.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple

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
        """Type id of the named struct (or other kind); BTFError if absent."""
        if self._by_name is None:
            index = {}
            for tid in range(1, len(self._pos)):
                name_off, k, _v, _s, _kf, _p = self._rec(tid)
                if name_off and k in (STRUCT, UNION):
                    index.setdefault((k, self._str(name_off)), tid)
            self._by_name = index
        try:
            return self._by_name[(kind, name)]
        except KeyError:
            raise BTFError("struct %s not in BTF" % name) from None

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
