"""Loading one bcc-compiled function as a BTF-typed raw tracepoint (tp_btf).

Owns one job: turn a function that bcc compiled (its maps created, their
fds already in the instructions) into an attached `tp_btf/<tracepoint>`
program, and detach it again.

Why not bcc: a tp_btf program is BPF_PROG_TYPE_TRACING with expected attach
type BPF_TRACE_RAW_TP and `attach_btf_id` = the BTF id of the typedef
`btf_trace_<tracepoint>` in vmlinux.  bcc 0.26 derives the attach type and
the BTF target from the function's name prefix (kfunc__ -> fentry, lsm__ ->
LSM...) and overrides what the caller passes, and has no prefix for tp_btf;
`attach_raw_tracepoint` loads a plain BPF_PROG_TYPE_RAW_TRACEPOINT.  So the
instructions are taken from bcc (`bpf_function_start/size`) and
BPF_PROG_LOAD is issued here through ctypes.

Why tp_btf at all: it fires where the raw tracepoint fires, but the
verifier knows the arguments' BTF types, so the program reads the socket
and the skb with direct loads (no bpf_probe_read_kernel call each) and may
call helpers that need a typed socket: bpf_get_socket_cookie() (creates the
cookie when the socket has none: every socket is seen from its first
segment) and bpf_sk_storage_get().  It needs BTF, not BPF trampolines (the
fentry machinery), so kernels that refuse fentry still load it.

Attaching is BPF_RAW_TRACEPOINT_OPEN with no name (the kernel takes the
tracepoint from the program's attach_btf_id), which is what libbcc's
bpf_attach_kfunc(fd) sends; the returned fd is a BPF link, closing it
detaches.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Optional, Tuple

from .bpfsys import bpf
from .btf import TYPEDEF, BTF, BTFError

# include/uapi/linux/bpf.h
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_RAW_TP = 23

# union bpf_attr for BPF_PROG_LOAD, up to attach_btf_id (offset 108): prog_type,
# insn_cnt, insns, license, log_level, log_size, log_buf, kern_version,
# prog_flags, prog_name[16], prog_ifindex, expected_attach_type, prog_btf_fd,
# func_info_rec_size, func_info, func_info_cnt, line_info_rec_size,
# line_info, line_info_cnt, attach_btf_id.  The kernel accepts a shorter
# attr than its own (the rest reads as zero), so old kernels take it too.
_PROG_LOAD = struct.Struct("=IIQQIIQII16sIIIIQIIQII")
_LOG_SIZE = 1 << 20


class TpBtfError(Exception):
    """The tp_btf program could not be loaded or attached (one-line reason)."""


def btf_target(tracepoint: str, btf: Optional[BTF] = None) -> int:
    """BTF id of typedef btf_trace_<tracepoint> in vmlinux; TpBtfError if none."""
    try:
        return (btf or BTF.load()).find("btf_trace_" + tracepoint, TYPEDEF)
    except BTFError as e:
        raise TpBtfError("no tp_btf target: %s" % e) from None


def _prog_load(attr) -> int:
    """BPF_PROG_LOAD: the fd, or -errno (the caller retries with a log)."""
    try:
        return bpf(BPF_PROG_LOAD, attr)
    except OSError as e:
        return -(e.errno or errno.EINVAL)


def load(module, fn_name: bytes, tracepoint: str, btf_id: Optional[int] = None) -> int:
    """BPF_PROG_LOAD of bcc module's compiled function fn_name as tp_btf; the prog fd.

    The verifier's log is in the TpBtfError of a refused load (last line).
    """
    from bcc import libbcc  # the caller (loader.py) has bcc already

    lib = libbcc.lib
    start = lib.bpf_function_start(module.module, fn_name)
    size = lib.bpf_function_size(module.module, fn_name)
    if not start or not size:
        raise TpBtfError("bcc compiled no function %s" % fn_name.decode())
    if btf_id is None:
        btf_id = btf_target(tracepoint)
    license_ = ctypes.c_char_p(lib.bpf_module_license(module.module) or b"GPL")
    log = ctypes.create_string_buffer(_LOG_SIZE)
    attr = ctypes.create_string_buffer(_PROG_LOAD.size + 4)  # + attach_prog_fd (0)
    fields = [BPF_PROG_TYPE_TRACING, size // 8, start,
              ctypes.cast(license_, ctypes.c_void_p).value, 0, 0, 0, 0, 0,
              fn_name[:15], 0, BPF_TRACE_RAW_TP, 0, 0, 0, 0, 0, 0, 0, btf_id]
    _PROG_LOAD.pack_into(attr, 0, *fields)
    fd = _prog_load(attr)
    if fd == -13 or fd == -1:  # EACCES/EPERM: the verifier's reason is in the log
        fields[4:7] = [1, _LOG_SIZE, ctypes.addressof(log)]
        _PROG_LOAD.pack_into(attr, 0, *fields)
        fd = _prog_load(attr)
    if fd < 0:
        lines = [ln for ln in log.value.decode(errors="replace").splitlines() if ln.strip()]
        raise TpBtfError("BPF_PROG_LOAD tp_btf/%s: %s%s" % (
            tracepoint, os.strerror(-fd), (" (%s)" % lines[-1]) if lines else ""))
    return fd


def attach(prog_fd: int) -> int:
    """BPF_RAW_TRACEPOINT_OPEN of a loaded tp_btf program; the link fd."""
    from bcc import libbcc

    link = libbcc.lib.bpf_attach_kfunc(prog_fd)
    if link < 0:
        # libbpf returns -errno; older libbcc returned -1 with errno set
        err = -link if link < -1 else (ctypes.get_errno() or 1)
        raise TpBtfError("BPF_RAW_TRACEPOINT_OPEN: %s" % os.strerror(err))
    return link


def load_and_attach(module, fn_name: bytes, tracepoint: str) -> Tuple[int, int]:
    """(prog fd, link fd) of fn_name attached as tp_btf/<tracepoint>."""
    prog = load(module, fn_name, tracepoint)
    try:
        return prog, attach(prog)
    except BaseException:
        os.close(prog)
        raise
