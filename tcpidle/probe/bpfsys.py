"""The bpf(2) system call itself, for the places that build a bpf_attr by hand.

libbpf (through ctypes, maps.py) serves the common commands.  What it does
not, or what bcc 0.26 cannot do -- BPF_PROG_LOAD of tp_btf and iterator
programs, BPF_LINK_CREATE / BPF_ITER_CREATE, the doctor's BTF and map probes,
BPF_PROG_GET_FD_BY_ID -- goes through `bpf()` here: one syscall-number table,
one error convention (OSError with the kernel's errno).

The attr may be shorter than the running kernel's union bpf_attr: the kernel
copies what it is given and reads the rest as zero
(bpf_check_uarg_tail_zero), so one layout serves old kernels and new.
"""

from __future__ import annotations

import ctypes
import errno
import os

# __NR_bpf by machine (arch/*/entry/syscalls, include/uapi/asm-generic/unistd.h)
_NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "ppc64": 361,
           "s390x": 351, "armv7l": 386, "i686": 357}

_libc = None


def syscall_number(machine: str | None = None) -> int:
    """__NR_bpf for `machine` (default: this one); OSError ENOSYS if unknown."""
    machine = machine or os.uname().machine
    nr = _NR_BPF.get(machine)
    if nr is None:
        raise OSError(errno.ENOSYS, "bpf(2) number unknown on %s" % machine)
    return nr


def bpf(cmd: int, attr) -> int:
    """bpf(2): the fd or value the kernel returns; OSError(errno) on failure.

    `attr` is a bytearray or a ctypes buffer when the kernel writes into it
    (e.g. BPF_MAP_LOOKUP_ELEM's out pointer is in the caller's memory, but
    BPF_OBJ_GET_INFO_BY_FD's info_len comes back in the attr); bytes are
    copied first."""
    global _libc
    nr = syscall_number()
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    if isinstance(attr, bytearray):
        buf, size = (ctypes.c_char * len(attr)).from_buffer(attr), len(attr)
    elif isinstance(attr, bytes):
        buf, size = ctypes.create_string_buffer(attr, len(attr)), len(attr)
    else:
        buf, size = attr, ctypes.sizeof(attr)
    r = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), buf, ctypes.c_uint(size))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r
