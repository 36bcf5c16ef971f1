"""What the running kernel offers the probe, and the plan of hooks to try.

Owns the question "which receive hook, and configured how?":

- detection: tracefs and the tracepoints' format files, kprobe support, the
  struct offsets from BTF (tcpidle.probe.btf) -- `detect_features`;
- the choice, pure: tp_btf/tcp_probe where the kernel has BTF, then the
  tcp_probe raw tracepoint, a kprobe where the kernel has kprobes, the
  classic tcp:tcp_probe tracepoint; every hook left out or failing is
  reported with its reason (`plan_hooks`, `attach_first`);
- the destroy hooks to try (`destroy_hooks`): the raw tracepoint, whose
  attachment is a pinnable BPF link, then the classic tracepoint;
- the -D flags that configure the C source for that plan (`build_cflags`).

Nothing here loads BPF: loader.py does, following this plan.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import UsageError
from . import ProbeUnavailable, one_line
from .btf import cached_btf_offsets

# Best first: tp_btf/tcp_probe (typed arguments: direct loads, the cookie
# created on demand); the same tracepoint with its raw arguments (no perf
# record built); a kprobe; the classic tracepoint (its record costs, but
# always carries the cookie).  See the header comment of bpf/tcpidle.bpf.c.
# No fentry: it has tp_btf's call site and arguments but also needs BPF
# trampolines, which some kernels refuse (the development kernel), and no
# kernel of the lab loads fentry where tp_btf fails (README).
HOOKS = ("tp_btf", "raw_tracepoint", "kprobe", "tracepoint")
# Hooks that read the cookie from the socket, where it is 0 until an
# INET_DIAG dump (or SO_COOKIE...) asked for it: prime_cookies() after
# attaching.  tp_btf too before Linux 5.12 (KernelFeatures.tracing_cookie_helper).
LAZY_COOKIE_HOOKS = frozenset(("raw_tracepoint", "kprobe"))
RCV_FUNC = "tcp_rcv_established"

_log = logging.getLogger("tcpidle.probe")


@dataclass(frozen=True)
class KernelFeatures:
    """What hook selection needs to know about the running kernel.

    `btf_offsets` holds the -D values for the socket/skb readers, or
    `btf_error` says why there are none.  `*_fields` are the field names of
    the tracepoints' format files (None: no such tracepoint).
    """

    btf_offsets: Optional[Dict[str, int]]
    btf_error: Optional[str]
    kprobes: bool
    tcp_probe_fields: Optional[frozenset]
    destroy_fields: Optional[frozenset]
    # bpf_get_socket_cookie() callable from tracing programs (tp_btf):
    # Linux 5.12 on (commit c5dbb89fc2ac); before it the verifier refuses
    # the helper there, and tp_btf reads the cookie from the socket instead.
    tracing_cookie_helper: bool = True
    # bpf_sk_storage_get() callable from tracing programs (tp_btf): Linux
    # 5.11 on; the storage then replaces the LRU map.
    tracing_sk_storage: bool = True

    @property
    def tp_has_sk(self) -> bool:
        """tcp:tcp_probe's record has the skaddr/skbaddr pointers (the selftest uses them).

        Not in every kernel that has the tracepoint: Debian's 5.10 and 6.1
        records lack them (the lab's format files).
        """
        return {"skaddr", "skbaddr"} <= (self.tcp_probe_fields or frozenset())


def unavailable_reasons(f: KernelFeatures) -> Dict[str, Optional[str]]:
    """For each hook, None if worth trying, else why it cannot work here."""
    out: Dict[str, Optional[str]] = {}
    no_btf = None if f.btf_offsets else "no struct offsets from kernel BTF (%s)" % (
        f.btf_error or "unknown")
    if f.tcp_probe_fields is None:
        out["tp_btf"] = out["raw_tracepoint"] = "no tcp:tcp_probe tracepoint"
    else:
        out["tp_btf"] = out["raw_tracepoint"] = no_btf
    if not f.kprobes:
        out["kprobe"] = "kernel has no kprobes"
    else:
        out["kprobe"] = no_btf
    if f.tcp_probe_fields is None:
        out["tracepoint"] = "no tcp:tcp_probe tracepoint"
    elif not {"sock_cookie", "data_len"} <= f.tcp_probe_fields:
        out["tracepoint"] = "tcp:tcp_probe lacks sock_cookie/data_len (kernel too old)"
    else:
        out["tracepoint"] = None
    return out


def plan_hooks(requested: str, reasons: Dict[str, Optional[str]]) -> Tuple[List[str], List[str]]:
    """The hooks to try in order, and notes on those left out.

    "auto" tries every available hook in the order of HOOKS; a named hook is
    the only candidate and must be available.
    """
    if requested != "auto" and requested not in HOOKS:
        raise UsageError("unknown BPF hook %r (want auto, %s)" % (requested, ", ".join(HOOKS)))
    if requested != "auto":
        if reasons.get(requested):
            raise ProbeUnavailable("BPF hook %s unavailable: %s" % (requested, reasons[requested]))
        return [requested], []
    candidates = [h for h in HOOKS if not reasons.get(h)]
    notes = ["%s: %s" % (h, reasons[h]) for h in HOOKS if reasons.get(h)]
    if not candidates:
        raise ProbeUnavailable("no BPF hook available (%s)" % "; ".join(notes))
    return candidates, notes


def attach_first(candidates: Sequence[str], try_attach: Callable[[str], None],
                 notes: Sequence[str] = (), log=None) -> Tuple[str, List[str]]:
    """Attach the first candidate that works; return (hook, notes).

    try_attach(hook) raises on failure; its message becomes the hook's note,
    is logged, and the next candidate is tried.
    """
    log = log or _log
    notes = list(notes)
    for i, hook in enumerate(candidates):
        try:
            try_attach(hook)
        except Exception as e:  # noqa: BLE001 - bcc raises bare Exception
            why = one_line(e)
            notes.append("%s: %s" % (hook, why))
            nxt = candidates[i + 1] if i + 1 < len(candidates) else None
            log.info("BPF hook %s failed: %s%s", hook, why, "; trying %s" % nxt if nxt else "")
            continue
        return hook, _hook_order(notes)
    raise ProbeUnavailable("no BPF hook could attach (%s)" % "; ".join(_hook_order(notes)))


def _hook_order(notes: Sequence[str]) -> List[str]:
    """Notes about hooks in the order of HOOKS, other notes after them."""
    def key(note: str) -> int:
        name = note.split(":", 1)[0]
        return HOOKS.index(name) if name in HOOKS else len(HOOKS)

    return sorted(notes, key=key)


def tracefs() -> str:
    for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.isdir(os.path.join(d, "events")):
            return d
    return "/sys/kernel/tracing"


def ensure_tracefs(log=None) -> bool:
    """Mount tracefs at /sys/kernel/tracing when no tracefs is visible; True if mounted now.

    Tracepoints are found and attached through tracefs (bcc reads the
    record layouts and the event ids there).  systemd mounts it at boot, but
    `ip netns exec` gives its command a fresh /sys without it.
    """
    if any(os.path.isdir(os.path.join(d, "events"))
           for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")):
        return False
    target = "/sys/kernel/tracing"
    if not os.path.isdir(target):
        return False
    import ctypes  # only here: detection alone needs no libc calls

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(b"tracefs", target.encode(), b"tracefs", 0, None) != 0:
        (log or _log).info("no tracefs, and mounting one at %s failed: %s",
                           target, os.strerror(ctypes.get_errno()))
        return False
    (log or _log).info("mounted tracefs at %s", target)
    return True


def tracepoint_fields(category: str, event: str, root: Optional[str] = None) -> Optional[frozenset]:
    """Field names in a tracepoint's format file, None if it has none."""
    path = os.path.join(root or tracefs(), "events", category, event, "format")
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("field:"):
            decl = line[len("field:"):].split(";", 1)[0].strip()
            names.add(decl.split()[-1].split("[", 1)[0])
    return frozenset(names)


def kprobes_available() -> bool:
    """bcc attaches kprobes via the perf kprobe PMU or tracefs kprobe_events."""
    return (os.path.exists("/sys/bus/event_source/devices/kprobe/type")
            or os.path.exists(os.path.join(tracefs(), "kprobe_events")))


def detect_features(need_btf: bool = True, cache_dir: Optional[str] = None) -> KernelFeatures:
    offsets, err = None, None
    if need_btf:
        try:
            offsets = cached_btf_offsets(cache_dir)
        except Exception as e:  # noqa: BLE001 - BTFError, or OSError details
            err = one_line(e)
    else:
        err = "not needed"
    return KernelFeatures(
        btf_offsets=offsets, btf_error=err, kprobes=kprobes_available(),
        tcp_probe_fields=tracepoint_fields("tcp", "tcp_probe"),
        destroy_fields=tracepoint_fields("tcp", "tcp_destroy_sock"),
        tracing_cookie_helper=release_at_least(os.uname().release, (5, 12)),
        tracing_sk_storage=release_at_least(os.uname().release, (5, 11)))


def release_at_least(release: str, version: Tuple[int, ...]) -> bool:
    """True if a kernel release string ("5.10.0-46-amd64") is >= version (pure).

    Used only where no probe can ask the kernel itself: whether the verifier
    accepts a helper in a program type shows only by loading a program of
    that type, and a tp_btf program needs its BTF target to load at all.
    """
    nums = []
    for part in release.split("-", 1)[0].split("+", 1)[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        nums.append(int(digits))
    return tuple(nums) >= tuple(version)


def selection_cflags(selector) -> List[str]:
    """-D flags restricting the per-socket storage to a selection (pure).

    The storage is created only for sockets of the selector's family (when
    it names one) whose local and remote ports lie within the span of its
    port sets (lowest to highest: a superset of several ranges; user space
    still applies the selector exactly).  No restriction: [].  Kernel memory
    is then bounded by the selection, not by every socket of the host.
    """
    if selector is None:
        return []
    flags = []
    fams = sorted(selector.families)
    if len(fams) == 1:
        flags.append("-DTCPIDLE_SEL_FAMILY=%d" % fams[0])
    for side, ports in (("SPORT", selector.sports), ("DPORT", selector.dports)):
        if ports is not None and ports.ranges:
            lo, hi = ports.ranges[0][0], ports.ranges[-1][1]
            if (lo, hi) != (0, 65535):
                flags += ["-DTCPIDLE_SEL_%s_LO=%d" % (side, lo),
                          "-DTCPIDLE_SEL_%s_HI=%d" % (side, hi)]
    return ["-DTCPIDLE_SELECT"] + flags if flags else []


def destroy_hooks(f: KernelFeatures) -> List[str]:
    """The destroy hooks to try, best first (pure): [] if none can work here.

    "raw_tracepoint": tcp_destroy_sock as a raw tracepoint, reading the
    cookie at its BTF offset; its attachment is a BPF link, which can be
    pinned (detached.py).  "tracepoint": the classic tcp:tcp_destroy_sock,
    whose record carries the cookie; a perf event, which cannot.  Both fire
    at the same call site and delete the same entries.
    """
    if f.destroy_fields is None:  # no such tracepoint
        return []
    out = ["raw_tracepoint"] if f.btf_offsets else []
    if "sock_cookie" in f.destroy_fields:
        out.append("tracepoint")
    return out


def build_cflags(map_size: int, hooks: Sequence[str], offsets: Optional[Dict[str, int]],
                 destroy: bool, selftest: bool = False, tp_has_sk: bool = False,
                 tracing_cookie_helper: bool = True, sk_storage: bool = False,
                 selector=None, selection: Optional[Sequence[str]] = None,
                 destroy_raw: bool = False) -> List[str]:
    """The -D flags that configure the C source (no text substitution).

    destroy: the classic tcp:tcp_destroy_sock hook (on_destroy); destroy_raw:
    its raw tracepoint (on_destroy_raw, needs the offsets); both may be
    compiled, the loader attaches one (destroy_hooks).
    tp_has_sk: tcp:tcp_probe's record has skaddr/skbaddr (the selftest reads
    them); tracing_cookie_helper: tp_btf may call bpf_get_socket_cookie
    (KernelFeatures); sk_storage: tp_btf records into per-socket storage
    instead of the LRU map, created only for sockets of `selector`
    (selection_cflags), or `selection`, those flags made already.
    """
    flags = ["-DMAX_ENTRIES=%d" % map_size]
    for h in hooks:
        flags.append("-DTCPIDLE_HOOK_%s" % h.upper())
    if tp_has_sk:
        flags.append("-DTCPIDLE_TP_HAS_SK")
    if "tp_btf" in hooks and not tracing_cookie_helper:
        flags.append("-DTCPIDLE_TP_BTF_READ_COOKIE")
    if "tp_btf" in hooks and sk_storage:
        flags.append("-DTCPIDLE_SK_STORAGE")
        flags += list(selection) if selection is not None else selection_cflags(selector)
    if offsets and (selftest or destroy_raw or set(hooks) & {"tp_btf", "raw_tracepoint", "kprobe"}):
        flags += ["-D%s=%d" % kv for kv in sorted(offsets.items())]
    if destroy:
        flags.append("-DTCPIDLE_DESTROY")
    if destroy_raw and offsets:
        flags.append("-DTCPIDLE_DESTROY_RAW")
    if selftest:
        flags.append("-DTCPIDLE_SELFTEST")
    return flags

