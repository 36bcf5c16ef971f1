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
    each map's definition, compiled by bcc once per boot, program text and
    variant (with or without the probe's per-socket storage) and kept in
    `iterdestroy-<hash>.json`; writing one removes the stale program files
    (`remove_stale`);
  * `Loaded`: the maps created by tcpidle's own BPF_MAP_CREATE (sizes chosen
    per run) or given (the probe's storage, the tracker's pin), their fds
    written into the relocated instructions, the kfunc call patched,
    BPF_PROG_LOAD as an iterator program.  A run then needs no bcc, no clang
    and no BTF parse: load + pass.

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
import json
import logging
import os
import re
import struct
from typing import Dict, List, NamedTuple, Optional, Tuple

from . import ProbeUnavailable
from .bpfsys import bpf

try:  # the same digest without hashlib's OpenSSL binding, whose import is ~2.5 ms a run
    from _sha256 import sha256 as _sha256
except ImportError:  # pragma: no cover - an interpreter built without it
    from hashlib import sha256 as _sha256

log = logging.getLogger("tcpidle.probe")

FORMAT = 1  # of the cache files; bumped when their layout or meaning changes
SOURCE = "iterdestroy.bpf.c"
FUNCTION = b"bpf_iter__tcp"
# Every map of the C file, by name.
MAP_NAMES = ("config", "sports", "dports", "excl_ports", "src_nets", "dst_nets", "excl_nets",
             "owners", "uids", "cookies", "counts", "errors")
# With storage=True (-DTCPIDLE_ITER_STORAGE) the program also reads the
# probe's per-socket storage: a map never created here, the pinned one is given.
STORAGE_MAP = "sk_activity"
STORAGE_CFLAG = "-DTCPIDLE_ITER_STORAGE"
KFUNC_SENTINEL = 0x7FFFF

# bpf(2) commands, program type, attach type (include/uapi/linux/bpf.h)
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM = 0, 1, 2
BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 3, 4
BPF_PROG_LOAD, BPF_LINK_CREATE, BPF_ITER_CREATE = 5, 28, 33
BPF_PROG_TYPE_TRACING, BPF_TRACE_ITER = 26, 28
BPF_PSEUDO_MAP_FD, BPF_PSEUDO_KFUNC_CALL = 1, 2
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


# The names compiled() writes: the program files, and their temporaries
# (_write_cache's "<name>.<pid>").  Nothing else in the cache is ever removed.
_PROGRAM_FILE = re.compile(r"^iterdestroy-([0-9a-f]{24})\.json(?:\.([0-9]+))?$")
# A program file of another key, this boot, unused this long is stale.  Not
# at once: several tcpidle versions (an installed one, a checkout) can run
# on one boot with one cache, and each would remove the other's file and
# compile again at every run.  A use refreshes the file's mtime (compiled()).
UNUSED_S = 24 * 3600


def stale_files(names, keep, boot: str, boot_of, mtime_of, now: float, alive=None) -> List[str]:
    """Of a cache directory's names, the program files to remove (pure given the callables).

    A program file whose key is not one of `keep` (the keys of this source
    and kernel) is stale when it belongs to another boot (`boot_of(name)`;
    None: unreadable, also stale) or was last used UNUSED_S ago or more
    (`mtime_of(name)`).  One of a current key is replaced in place by the
    next compile, so it is kept.  A temporary is stale when its writer is
    gone (`alive(pid)` false): a live one is another run's write under way.
    """
    alive = alive or _pid_alive
    out = []
    for name in names:
        m = _PROGRAM_FILE.match(name)
        if m is None:
            continue
        if m.group(2) is not None:
            if not alive(int(m.group(2))):
                out.append(name)
        elif m.group(1) not in keep and (boot_of(name) != boot
                                         or now - mtime_of(name) >= UNUSED_S):
            out.append(name)
    return sorted(out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: someone's
    return True


def remove_stale(keep, boot: str) -> List[str]:
    """Remove the stale program files of the trusted cache (`stale_files`); their names.

    Only in the directory the trust rules accept (the one compiled() wrote
    to), only names of our own pattern, looked at and unlinked relative to
    the directory opened once (a rename of a directory above cannot redirect
    it), never following a symlink (unlink removes the link itself)."""
    import time

    where = _cache_dir()
    if where is None:
        return []
    try:
        dfd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return []

    def boot_of(name: str) -> Optional[str]:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
            with os.fdopen(fd) as f:
                saved = json.load(f)
            return saved.get("boot") if isinstance(saved, dict) else None
        except (OSError, ValueError):
            return None

    def mtime_of(name: str) -> float:
        try:
            return os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mtime
        except OSError:
            return 0.0

    removed = []
    try:
        for name in stale_files(os.listdir(dfd), set(keep), boot, boot_of, mtime_of,
                                time.time()):
            try:
                os.unlink(name, dir_fd=dfd)
                removed.append(name)
            except OSError:
                pass  # gone meanwhile, or read-only: only costs disk
    finally:
        os.close(dfd)
    if removed:
        log.debug("removed stale BPF destroy program files from %s: %s", where, " ".join(removed))
    return removed


def _touch(name: str) -> None:
    """The cache file was used now (its mtime: stale_files keeps used files)."""
    where = _cache_dir()
    if where is not None:
        try:
            os.utime(os.path.join(where, name), follow_symlinks=False)
        except (OSError, NotImplementedError):
            pass


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
    # Beside loader.bpf_source()'s file, found as it does (tcpidle.bpf maps to
    # bpf/), without importing the loader: what it needs for bcc (ctypes.util,
    # subprocess, the probe's features) cost each kill ~9 ms of start-up.
    from .. import bpf as _pkg
    return os.path.join(os.path.dirname(_pkg.__file__), SOURCE)


def program_key(source: bytes, offsets: Dict[str, int], storage: bool = False) -> str:
    """What the compiled program depends on: its text, the -D offsets, the variant."""
    h = _sha256(source)
    h.update(json.dumps(sorted(offsets.items())).encode())
    h.update(b"format %d" % FORMAT)
    if storage:
        h.update(STORAGE_CFLAG.encode())
    return h.hexdigest()[:24]


def cflags(offsets: Dict[str, int], storage: bool = False) -> List[str]:
    return (["-D%s=%d" % kv for kv in sorted(offsets.items())] + ["-Wno-int-to-void-pointer-cast"]
            + ([STORAGE_CFLAG] if storage else []))


def _compile(offsets: Dict[str, int], storage: bool = False) -> Compiled:
    """bcc compiles the C; its instructions, map references and map definitions are kept."""
    from bcc import libbcc

    from .loader import compile_only, dispose
    from .maps import map_info
    module = compile_only(SOURCE, cflags(offsets, storage))
    try:
        code = bytes(module.dump_func(FUNCTION))
        by_fd = {}
        maps = {}
        for name in MAP_NAMES + ((STORAGE_MAP,) if storage else ()):
            # bcc 0.26's Table knows no socket storage: its fd from libbcc
            fd = (module[name.encode()].map_fd if name != STORAGE_MAP
                  else libbcc.lib.bpf_table_fd(module.module, name.encode()))
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


def compiled(facts: KernelFacts, storage: bool = False) -> Compiled:
    """The compiled program (`storage`: the variant reading the probe's storage): from
    the cache of this boot, else compiled now and kept."""
    with open(source_path(), "rb") as f:
        source = f.read()
    key = program_key(source, facts.offsets, storage)
    name = "iterdestroy-%s.json" % key
    boot = boot_identity()
    saved = _read_cache(name, boot)
    if saved is not None and saved.get("key") == key:
        _touch(name)
        try:
            return Compiled(bytes.fromhex(saved["code"]),
                            [(int(i), str(n)) for i, n in saved["relocs"]],
                            {str(n): MapDef(*(int(x) for x in d))
                             for n, d in saved["maps"].items()})
        except (KeyError, TypeError, ValueError):
            pass
    prog = _compile(facts.offsets, storage)
    _write_cache(name, {"format": FORMAT, "boot": boot, "key": key, "code": prog.code.hex(),
                        "relocs": prog.relocs, "maps": {n: list(d) for n, d in prog.maps.items()}})
    # both variants of this source and kernel stay; every other program file goes
    remove_stale([program_key(source, facts.offsets, v) for v in (False, True)], boot)
    return prog


class Loaded:
    """The program loaded with maps of its own; `sizes` overrides max_entries by map name.

    `given` names maps not created here (the probe's storage): their fds are
    the caller's, duplicated, so close() releases only copies of them.
    `fds[name]` are the maps; `prog` the program fd.  close() releases all.
    """

    def __init__(self, facts: KernelFacts, prog: Compiled, sizes: Dict[str, int],
                 given: Optional[Dict[str, int]] = None):
        given = given or {}
        self.facts = facts
        self.defs = {n: d._replace(max_entries=max(1, sizes.get(n, d.max_entries)))
                     for n, d in prog.maps.items() if n not in given}
        unknown = set(given) - set(prog.maps)
        if unknown:
            raise ProbeUnavailable("the BPF destroy program has no map %s"
                                   % ", ".join(sorted(unknown)))
        self.fds: Dict[str, int] = {}
        self.prog: Optional[int] = None
        try:
            for name, fd in given.items():
                self.fds[name] = os.dup(fd)
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
