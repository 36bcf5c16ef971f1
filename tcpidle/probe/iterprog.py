"""The in-kernel destroy program as an object: compiled once per boot, then only loaded.

Owns getting bpf/iterdestroy.bpf.c into the kernel fast.  bcc's in-process
clang compile costs ~0.5 s of CPU (2 s and more of wall time on a loaded
machine) and parsing vmlinux BTF in Python another ~0.5 s, while the kill
itself takes a few ms a namespace.  The program's text depends only on the
running kernel (its struct offsets, from BTF); everything a run decides is in
maps (see the C file's header).  So:

  * `kernel_facts()`: the BTF ids of `bpf_iter_tcp` and `bpf_sock_destroy`,
    CONFIG_HZ and the struct offsets -- or why this kernel cannot -- found once
    per boot and kept in the trusted cache (`iterdestroy-kernel.json`);
  * `compiled()`: the program's instructions, where each map is referenced
    (bcc puts its own map fds in `ld_imm64` instructions: the relocations) and
    each map's definition, compiled by bcc once per boot and program text and
    kept in `iterdestroy-<hash>.json`;
  * `Loaded`: the maps created by tcpidle's own BPF_MAP_CREATE (sizes chosen
    per run), their fds written into the relocated instructions, the kfunc
    call patched, BPF_PROG_LOAD as an iterator program.  A run then needs no
    bcc, no clang and no BTF parse: load + pass.

The cache is the header cache (kheaders.trusted_cache_dir): root loads these
instructions into the kernel, and the verifier checks memory safety, not
intent -- a program written by someone else could destroy any socket.  So a
cache file is used only if it and its directory pass the same trust rules as
the headers (owned by root or us, writable by no one else), and is replaced
otherwise; a cache that cannot be used only costs the compile.  Each file
carries the boot identity (release + boot id: BTF cannot change without a
reboot) and is ignored when it belongs to another boot.

bpf(2) is called directly (ctypes); bcc 0.26 cannot load this program type.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import struct
from typing import Dict, List, NamedTuple, Optional, Tuple

from . import ProbeUnavailable

log = logging.getLogger("tcpidle.probe")

FORMAT = 1  # of the cache files; bumped when their layout or meaning changes
SOURCE = "iterdestroy.bpf.c"
FUNCTION = b"bpf_iter__tcp"
# Every map of the C file, by name.
MAP_NAMES = ("config", "sports", "dports", "excl_ports", "src_nets", "dst_nets", "excl_nets",
             "owners", "uids", "cookies", "counts", "errors")
KFUNC_SENTINEL = 0x7FFFF

# bpf(2) commands, program type, attach type (include/uapi/linux/bpf.h)
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM = 0, 1, 2
BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 3, 4
BPF_PROG_LOAD, BPF_LINK_CREATE, BPF_ITER_CREATE = 5, 28, 33
BPF_PROG_TYPE_TRACING, BPF_TRACE_ITER = 26, 28
BPF_PSEUDO_MAP_FD, BPF_PSEUDO_KFUNC_CALL = 1, 2
_NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "s390x": 351, "ppc64le": 361}
_LD_IMM64, _CALL = 0x18, 0x85


class MapDef(NamedTuple):
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


class Compiled(NamedTuple):
    """The program as bcc compiled it, its map fds taken out."""

    code: bytes
    relocs: List[Tuple[int, str]]  # (instruction index of an ld_imm64, map name)
    maps: Dict[str, MapDef]


class KernelFacts(NamedTuple):
    iter_id: int  # BTF id of bpf_iter_tcp (the attach target)
    kfunc_id: int  # BTF id of bpf_sock_destroy
    hz: int
    offsets: Dict[str, int]


# --- bpf(2)

_libc = None


def bpf(cmd: int, attr: bytearray) -> int:
    """bpf(2) with a bpf_attr built by the caller; OSError on failure."""
    global _libc
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise ProbeUnavailable("bpf(2) number unknown on %s" % platform.machine())
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    r = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), buf, ctypes.c_uint(len(attr)))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def map_create(name: str, d: MapDef) -> int:
    attr = bytearray(72)
    struct.pack_into("<IIIII", attr, 0, d.type, d.key_size, d.value_size, d.max_entries, d.flags)
    attr[28:28 + 15] = name.encode()[:15].ljust(15, b"\0")
    try:
        return bpf(BPF_MAP_CREATE, attr)
    except OSError as e:
        raise ProbeUnavailable("BPF map %s for the BPF destroy: %s" % (name, e.strerror)) \
            from None


def _elem(cmd: int, fd: int, key: ctypes.Array, value: Optional[ctypes.Array] = None,
          flags: int = 0) -> int:
    attr = bytearray(32)
    struct.pack_into("<IxxxxQQQ", attr, 0, fd, ctypes.addressof(key),
                     ctypes.addressof(value) if value is not None else 0, flags)
    return bpf(cmd, attr)


def map_update(fd: int, key: bytes, value: bytes) -> None:
    _elem(BPF_MAP_UPDATE_ELEM, fd, ctypes.create_string_buffer(key, len(key)),
          ctypes.create_string_buffer(value, len(value)))


def map_lookup(fd: int, key: bytes, value_size: int) -> Optional[bytes]:
    out = ctypes.create_string_buffer(value_size)
    try:
        _elem(BPF_MAP_LOOKUP_ELEM, fd, ctypes.create_string_buffer(key, len(key)), out)
    except OSError as e:
        if e.errno == 2:  # ENOENT
            return None
        raise
    return out.raw


def map_keys(fd: int, key_size: int) -> List[bytes]:
    """Every key of a hash map (BPF_MAP_GET_NEXT_KEY from none)."""
    keys = []
    cur = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        attr = bytearray(32)
        struct.pack_into("<IxxxxQQ", attr, 0, fd, ctypes.addressof(cur) if cur is not None else 0,
                         ctypes.addressof(nxt))
        try:
            bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except OSError as e:
            if e.errno == 2:  # ENOENT: the last key
                return keys
            raise
        keys.append(nxt.raw)
        cur = ctypes.create_string_buffer(nxt.raw, key_size)


def map_delete(fd: int, key: bytes) -> None:
    _elem(BPF_MAP_DELETE_ELEM, fd, ctypes.create_string_buffer(key, len(key)))


def relocate(code: bytes, relocs: List[Tuple[int, str]], fds: Dict[str, int]) -> bytearray:
    """The instructions with each map reference pointing at our map's fd."""
    out = bytearray(code)
    for index, name in relocs:
        op, regs, off, _imm = struct.unpack_from("<BBhi", out, index * 8)
        if op != _LD_IMM64 or regs >> 4 != BPF_PSEUDO_MAP_FD:
            raise ValueError("instruction %d is not a map reference" % index)
        struct.pack_into("<BBhi", out, index * 8, op, regs, off, fds[name])
    return out


def patch_kfunc(code: bytearray, btf_id: int) -> int:
    """Turn each call of the sentinel helper into a kfunc call; the count patched.

    bcc cannot emit a call to an extern __ksym: the C calls helper number
    KFUNC_SENTINEL, and the call becomes BPF_PSEUDO_KFUNC_CALL with imm = the
    BTF id of bpf_sock_destroy (off 0: vmlinux BTF)."""
    n = 0
    for i in range(0, len(code), 8):
        op, regs, _off, imm = struct.unpack_from("<BBhi", code, i)
        if op == _CALL and imm == KFUNC_SENTINEL and regs >> 4 == 0:
            struct.pack_into("<BBhi", code, i, op, (regs & 0x0F) | (BPF_PSEUDO_KFUNC_CALL << 4),
                             0, btf_id)
            n += 1
    return n


def prog_load(code: bytes, attach_btf_id: int) -> int:
    insns = ctypes.create_string_buffer(bytes(code), len(code))
    lic = ctypes.create_string_buffer(b"GPL")
    logbuf = ctypes.create_string_buffer(1 << 20)
    attr = bytearray(128)
    struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_TRACING, len(code) // 8,
                     ctypes.addressof(insns), ctypes.addressof(lic), 1, len(logbuf),
                     ctypes.addressof(logbuf))
    attr[48:48 + 12] = b"tcpidle_kill"
    struct.pack_into("<I", attr, 68, BPF_TRACE_ITER)
    struct.pack_into("<I", attr, 108, attach_btf_id)
    try:
        return bpf(BPF_PROG_LOAD, attr)
    except OSError as e:
        tail = logbuf.value.decode(errors="replace").strip().splitlines()[-3:]
        raise ProbeUnavailable("the kernel refused the BPF destroy program (%s)%s" % (
            e.strerror, ": " + " / ".join(tail) if tail else "")) from None


def iter_fd(prog_fd: int) -> int:
    """A new iterator of prog: its pass walks the namespace of the calling thread."""
    attr = bytearray(64)
    struct.pack_into("<III", attr, 0, prog_fd, 0, BPF_TRACE_ITER)
    link = bpf(BPF_LINK_CREATE, attr)
    try:
        attr = bytearray(8)
        struct.pack_into("<II", attr, 0, link, 0)
        return bpf(BPF_ITER_CREATE, attr)
    finally:
        os.close(link)


# --- the cache

def _cache_dir() -> Optional[str]:
    from .kheaders import HeadersNotFound, UntrustedCache, trusted_cache_dir
    try:
        return trusted_cache_dir()
    except UntrustedCache as e:
        log.warning("%s; the BPF destroy program is not cached", e)
    except (HeadersNotFound, OSError):
        pass
    return None


def _read_cache(name: str, boot: str) -> Optional[dict]:
    from .kheaders import UntrustedCache, check_trusted
    where = _cache_dir()
    if where is None:
        return None
    path = os.path.join(where, name)
    try:
        check_trusted(path, "BPF destroy cache")
        with open(path) as f:
            saved = json.load(f)
    except UntrustedCache as e:
        log.warning("%s; made again", e)  # and replaced: the directory is ours
        return None
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("boot") != boot:
        return None
    return saved


def _write_cache(name: str, content: dict) -> None:
    where = _cache_dir()
    if where is None:
        return
    path = os.path.join(where, name)
    tmp = "%s.%d" % (path, os.getpid())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs time


def boot_identity() -> str:
    from .btf import _boot_identity
    return _boot_identity()


def _find_kernel_facts() -> KernelFacts:
    """From vmlinux BTF and the kernel config (slow: ~0.5 s of BTF parsing)."""
    from .btf import BTF, FUNC, BTFError
    from .iterdestroy import OFFSET_FIELDS, SOCKET_INO, kernel_hz
    try:
        btf = BTF.load()
        iter_id = btf.find("bpf_iter_tcp", FUNC)
    except BTFError as e:
        raise ProbeUnavailable("no BPF TCP iterator: %s" % e) from None
    try:
        kfunc = btf.find("bpf_sock_destroy", FUNC)
    except BTFError:
        raise ProbeUnavailable("this kernel has no bpf_sock_destroy() kfunc (Linux >= 6.5)") \
            from None
    try:
        offsets = {k: btf.offsetof(s, m) for k, (s, m) in OFFSET_FIELDS.items()}
        offsets[SOCKET_INO] = (btf.offsetof("socket_alloc", "vfs_inode")
                               - btf.offsetof("socket_alloc", "socket")
                               + btf.offsetof("inode", "i_ino"))
    except BTFError as e:
        raise ProbeUnavailable("BTF offsets for the BPF destroy: %s" % e) from None
    return KernelFacts(iter_id, kfunc, kernel_hz(), offsets)


_facts: Optional[Tuple[str, object]] = None


def kernel_facts() -> KernelFacts:
    """What the program needs from this kernel, found once per boot; ProbeUnavailable
    (also remembered for the boot: BTF and the config do not change) when it cannot."""
    global _facts
    boot = boot_identity()
    if _facts is not None and _facts[0] == boot:
        found = _facts[1]
    else:
        saved = _read_cache("iterdestroy-kernel.json", boot)
        found = None
        if saved is not None:
            try:
                if saved.get("unavailable"):
                    found = str(saved["unavailable"])
                else:
                    found = KernelFacts(int(saved["iter_id"]), int(saved["kfunc_id"]),
                                        int(saved["hz"]),
                                        {str(k): int(v) for k, v in saved["offsets"].items()})
            except (KeyError, TypeError, ValueError, AttributeError):
                found = None
        if found is None:
            try:
                found = _find_kernel_facts()
                content = dict(found._asdict())
            except ProbeUnavailable as e:
                found = str(e)
                content = {"unavailable": found}
            content.update(format=FORMAT, boot=boot)
            _write_cache("iterdestroy-kernel.json", content)
        _facts = (boot, found)
    if isinstance(found, str):
        raise ProbeUnavailable(found)
    return found


def source_path() -> str:
    from .loader import bpf_source
    return os.path.join(os.path.dirname(bpf_source()), SOURCE)


def program_key(source: bytes, offsets: Dict[str, int]) -> str:
    """What the compiled program depends on: its text and the -D offsets."""
    h = hashlib.sha256(source)
    h.update(json.dumps(sorted(offsets.items())).encode())
    h.update(b"format %d" % FORMAT)
    return h.hexdigest()[:24]


def cflags(offsets: Dict[str, int]) -> List[str]:
    return ["-D%s=%d" % kv for kv in sorted(offsets.items())] + ["-Wno-int-to-void-pointer-cast"]


def _compile(offsets: Dict[str, int]) -> Compiled:
    """bcc compiles the C; its instructions, map references and map definitions are kept."""
    from .loader import compile_only, dispose
    from .maps import map_info
    module = compile_only(SOURCE, cflags(offsets))
    try:
        code = bytes(module.dump_func(FUNCTION))
        by_fd = {}
        maps = {}
        for name in MAP_NAMES:
            fd = module[name.encode()].map_fd
            info = map_info(fd)
            by_fd[fd] = name
            maps[name] = MapDef(info.type, info.key_size, info.value_size, info.max_entries,
                                info.map_flags)
    finally:
        dispose(module)
    relocs = []
    for i in range(0, len(code) - 8, 8):
        op, regs, _off, imm = struct.unpack_from("<BBhi", code, i)
        if op == _LD_IMM64 and regs >> 4:
            if regs >> 4 != BPF_PSEUDO_MAP_FD or imm not in by_fd:
                raise ProbeUnavailable("the BPF destroy program references an unknown object "
                                       "(ld_imm64 src %d imm %d)" % (regs >> 4, imm))
            relocs.append((i // 8, by_fd[imm]))
    return Compiled(code, relocs, maps)


def compiled(facts: KernelFacts) -> Compiled:
    """The compiled program: from the cache of this boot, else compiled now and kept."""
    with open(source_path(), "rb") as f:
        source = f.read()
    key = program_key(source, facts.offsets)
    name = "iterdestroy-%s.json" % key
    boot = boot_identity()
    saved = _read_cache(name, boot)
    if saved is not None and saved.get("key") == key:
        try:
            return Compiled(bytes.fromhex(saved["code"]),
                            [(int(i), str(n)) for i, n in saved["relocs"]],
                            {str(n): MapDef(*(int(x) for x in d))
                             for n, d in saved["maps"].items()})
        except (KeyError, TypeError, ValueError):
            pass
    prog = _compile(facts.offsets)
    _write_cache(name, {"format": FORMAT, "boot": boot, "key": key, "code": prog.code.hex(),
                        "relocs": prog.relocs, "maps": {n: list(d) for n, d in prog.maps.items()}})
    return prog


class Loaded:
    """The program loaded with maps of its own; `sizes` overrides max_entries by map name.

    `fds[name]` are the maps; `prog` the program fd.  close() releases all.
    """

    def __init__(self, facts: KernelFacts, prog: Compiled, sizes: Dict[str, int]):
        self.facts = facts
        self.defs = {n: d._replace(max_entries=max(1, sizes.get(n, d.max_entries)))
                     for n, d in prog.maps.items()}
        self.fds: Dict[str, int] = {}
        self.prog: Optional[int] = None
        try:
            for name, d in self.defs.items():
                self.fds[name] = map_create(name, d)
            code = relocate(prog.code, prog.relocs, self.fds)
            if patch_kfunc(code, facts.kfunc_id) != 1:
                raise ProbeUnavailable("the BPF destroy program has no bpf_sock_destroy call")
            self.code = bytes(code)
            self.prog = prog_load(self.code, facts.iter_id)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.prog is not None:
            os.close(self.prog)
            self.prog = None
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
