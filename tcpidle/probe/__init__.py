"""The BPF probe (bpf/tcpidle.bpf.c): one module per job.

    features.py  what the running kernel offers; which hook to try, in which
                 order; the -D flags that configure the C source
    btf.py       struct offsets from the running kernel's BTF
    kheaders.py  a kernel header tree bcc can compile against
    maps.py      the maps' layout, and reading them through libbpf (ctypes)
    pins.py      bpffs, pin directories (lock, reuse, cleanup), pinned maps
    loader.py    the only module that imports bcc: compile, attach, detach,
                 selftest -- the attached `Probe`
    tpbtf.py     BPF_PROG_LOAD of a bcc-compiled function as tp_btf (bcc
                 cannot), and its attachment
    detached.py  the tracker's probe loaded by a short-lived process and
                 pinned (its BPF link too), so the tracker holds no bcc

This module owns the probe's errors and the package's public names.  Those
names are resolved lazily (PEP 562 `__getattr__`): `import tcpidle.probe`
costs nothing, and ctypes, libbpf and bcc are loaded only by the command
that reads or attaches BPF (`tcpidle audit` without a probe never does).

Everything that can go wrong before the probe runs (no bcc, no privilege, no
headers, compile failure, no hook) raises `ProbeUnavailable` with a one-line
reason; callers carry on with tcp_info.
"""

from __future__ import annotations

import errno
import importlib
import os

from ..errors import RuntimeFailure
from ..model import DEFAULT_PIN_DIR


class ProbeUnavailable(RuntimeFailure):
    """The BPF probe cannot run here; the message is the one-line reason."""


class PinError(ProbeUnavailable):
    """The pin directory cannot be used (in use, foreign maps, no bpffs).

    Unlike other ProbeUnavailable reasons this is a configuration problem:
    carrying on without the probe would hide it.
    """


def one_line(e: BaseException) -> str:
    """An exception's message on one line, for a ProbeUnavailable reason."""
    text = " ".join(str(e).split()) or type(e).__name__
    # bcc says this for any EPERM at load, which as root means the kernel
    # refused the program type (lockdown, missing trampoline support...).
    if text == "Need super-user privileges to run":
        text = "load refused: %s" % os.strerror(errno.EPERM)
    return text


# Public name -> the submodule that defines it.
_EXPORTS = {
    "features": (
        "HOOKS", "LAZY_COOKIE_HOOKS", "RCV_FUNC", "KernelFeatures", "unavailable_reasons",
        "plan_hooks", "attach_first", "tracefs", "ensure_tracefs", "tracepoint_fields",
        "kprobes_available", "detect_features", "build_cflags"),
    "btf": ("BTF", "BTFError", "OFFSET_MACROS", "SIZE_MACROS", "btf_offsets",
            "cached_btf_offsets"),
    "maps": (
        "COUNTERS", "VALUE", "KEY_SIZE", "MAX_MAP_SIZE", "BPF_MAP_TYPE_PERCPU_ARRAY",
        "BPF_MAP_TYPE_LRU_HASH", "PIN_NAMES", "MAP_SPECS", "MapReader", "libbpf", "map_info",
        "possible_cpus", "decode_entries", "evicted_count", "layout_problem"),
    "pins": (
        "BPF_FS_MAGIC", "SYS_BPFFS", "PinInfo", "PinnedMap", "check_pin_dir", "pinned_info",
        "plan_pinned_maps", "is_bpffs", "mount_bpffs", "ensure_bpffs", "pin_dir_holder",
        "remove_pins", "LOCK_DIR", "check_pin"),
    "loader": ("Probe", "bpf_source"),
    "detached": ("DetachedProbe", "tracker_probe"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["ProbeUnavailable", "PinError", "DEFAULT_PIN_DIR", "one_line", *_WHERE]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        # Not a public name: `from tcpidle.probe import kheaders` goes on to
        # import the submodule.
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    value = getattr(importlib.import_module("." + module, __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
