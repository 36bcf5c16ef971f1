"""Compiling, loading and attaching the probe: the only module that imports bcc.

Owns the life of one attached probe (`Probe`): bcc compiles
bpf/tcpidle.bpf.c with the -D flags of the hook plan (features.py) against a
header tree (kheaders.py); the receive hook is attached, the first of the
plan that the kernel accepts; the maps are read through a maps.MapReader
and, for the tracker, live in a pin directory (pins.py); `close()` detaches.
bcc is imported only inside `Probe.attach`, so importing this module needs
no bcc.

`selftest=True` (for tests) compiles the tracepoint hook with a check of the
BTF-offset readers the other hooks use, counted in the counters map.
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from ..errors import UsageError
from ..model import DEFAULT_MAP_SIZE
from . import PinError, ProbeUnavailable, kheaders, one_line, tpbtf
from .features import (HOOKS, LAZY_COOKIE_HOOKS, RCV_FUNC, attach_first, build_cflags,
                       destroy_hooks, detect_features, ensure_tracefs, plan_hooks,
                       unavailable_reasons)
from .maps import DESTROY_LINK_PIN, LINK_PIN, MAX_MAP_SIZE, MapReader, map_info
from .pins import PinSession, check_pin_dir

_log = logging.getLogger("tcpidle.probe")


def bpf_source() -> str:
    """Path of bpf/tcpidle.bpf.c (package data of tcpidle.bpf)."""
    from .. import bpf as _pkg  # noqa: F401  (tcpidle.bpf maps to bpf/)

    return os.path.join(os.path.dirname(_pkg.__file__), "tcpidle.bpf.c")


@contextmanager
def _captured_stderr(sink: List[str]) -> Iterator[None]:
    """Send C-level stderr (bcc, libbpf, clang) to sink instead of the terminal.

    bcc prints compiler diagnostics and whole verifier logs on fd 2; when an
    expected failure (a hook refused) falls through to the next hook, that is
    noise for the user but useful in the debug log.
    """
    import sys

    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - stderr may be closed or replaced
        pass
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                sink.append(text)


@contextmanager
def _env(name: str, value: Optional[str]) -> Iterator[None]:
    """Set an environment variable (seen by bcc's getenv) for a block."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _module_class():
    """A bcc BPF subclass that compiles only: we attach programs one by one.

    bcc's constructor attaches every function named kfunc__*, kprobe__*,
    tracepoint__* itself, and if one fails the half-made object (maps,
    attached programs) cannot be cleaned up: auto-attach is turned off.
    The tp_btf program is loaded outside bcc (tpbtf.py); its fds are kept
    here and closed with the module.
    """
    from bcc import BPF

    class _Module(BPF):
        tp_btf_fds: Tuple[int, ...] = ()

        def _trace_autoload(self):
            pass

        def close_tp_btf(self):
            fds, self.tp_btf_fds = self.tp_btf_fds, ()
            for fd in reversed(fds):  # the link first: detaches
                os.close(fd)

        def cleanup(self):
            self.close_tp_btf()
            super().cleanup()

    return _Module


def _dispose(module) -> None:
    try:
        module.cleanup()
    finally:
        atexit.unregister(module.cleanup)
        atexit.unregister(module.donothing)


class _Loaded(NamedTuple):
    """What _load() built: the bcc module, its maps' reader, the hook attached."""

    module: object
    reader: MapReader
    hook: str
    hook_notes: List[str]
    header_source: str
    lazy_cookie: bool  # the hook reads the cookie from the socket (see needs_cookie_priming)
    storage_fd: Optional[int]  # the sk_storage map's fd (bcc's), None: the LRU map records
    # the destroy hook attached (features.destroy_hooks), None: none (storage, or none works)
    destroy_hook: Optional[str] = None


class Probe:
    """The attached probe: a bcc module, a reader of its maps, maybe a pin directory.

    Read it with activity()/lookup()/stats(); close() detaches.  Built by
    attach() only.
    """

    def __init__(self, loaded: _Loaded, pins: Optional[PinSession], startup_ms: float):
        self._module = loaded.module  # None once closed
        self.reader = loaded.reader
        self.hook = loaded.hook
        # "sk_storage": per-socket storage, read inline in INET_DIAG dumps
        # (storage_fd, storage_id); "lru": the activity map, keyed by cookie
        self.storage_fd = loaded.storage_fd
        self.storage = "lru" if loaded.storage_fd is None else "sk_storage"
        self.storage_id = None if loaded.storage_fd is None else map_info(loaded.storage_fd).id
        self.hook_notes = loaded.hook_notes
        self.header_source = loaded.header_source
        self.destroy_hook = loaded.destroy_hook
        self._lazy_cookie = loaded.lazy_cookie
        self._pins = pins
        self.pin_dir = pins.directory if pins else None
        self.pins_reused = tuple(pins.reused) if pins else ()
        self.pin_notes = list(pins.notes) if pins else []
        self.startup_ms = startup_ms
        self._suspended = False

    @classmethod
    def attach(cls, map_size: int = DEFAULT_MAP_SIZE, hook: str = "auto", log=None,
               cache_dir: Optional[str] = None, selftest: bool = False,
               pin_dir: Optional[str] = None, sk_storage: bool = False,
               selector=None, held_lock: Optional[Tuple[int, str]] = None,
               selection: Optional[Sequence[str]] = None) -> "Probe":
        """Compile and attach the probe; ProbeUnavailable(reason) if impossible.

        map_size bounds the activity map; hook is "auto" or one of HOOKS;
        cache_dir is where adapted header trees are kept (default:
        kheaders.default_cache_dir()); selftest (for tests) makes the
        tracepoint hook check the BTF-offset readers of the other hooks.

        pin_dir (a directory on bpffs, mounted at /sys/fs/bpf if needed) makes
        the maps persistent: they are pinned as pin_dir/activity and
        pin_dir/counters, or, if pinned there already, the existing maps are
        reused with their contents (a pinned activity map of another size is
        reused at its own size, with a warning).  The directory is locked
        (flock) while attached, so two trackers never feed the same maps.
        close(keep_pins=True) leaves the pins for the next attach.

        sk_storage: where tp_btf attaches on a kernel that allows it (5.11
        on), record into per-socket storage (pinned as pin_dir/storage)
        instead of the activity map: read it inline in INET_DIAG dumps
        (storage_fd, storage_id).  selector (a model.Selector): the storage
        is created only for its sockets (family, port spans), None: all;
        selection: the -D flags of a selector made already
        (features.selection_cflags), for a loader in another process.

        held_lock: the pin directory's lock, taken by the caller
        (pins.lock_pin_dir) and handed over; (-1, "") when the process that
        started this one holds it (detached.py's loader).
        """
        log = log or _log
        t0 = time.monotonic()
        if not isinstance(map_size, int) or not 1 <= map_size <= MAX_MAP_SIZE:
            raise UsageError("BPF map size must be 1..%d, not %r" % (MAX_MAP_SIZE, map_size))
        if hook != "auto" and hook not in HOOKS:
            plan_hooks(hook, {})  # raises the UsageError
        if pin_dir is not None:
            pin_dir = check_pin_dir(pin_dir)
        if os.geteuid() != 0:
            raise ProbeUnavailable("loading BPF needs root")
        pins = PinSession.open(pin_dir, map_size, log, held_lock) if pin_dir is not None else None
        try:
            loaded = _load(map_size if pins is None else pins.map_size, hook, log,
                           cache_dir, selftest, pins, sk_storage, selector, selection)
        except BaseException:
            if pins is not None:
                pins.abort()
            raise
        probe = cls(loaded, pins, (time.monotonic() - t0) * 1000.0)
        log.info("BPF probe on %s (%s); headers: %s; %.0f ms",
                 probe.hook, "; ".join(probe.hook_notes) or "first choice",
                 probe.header_source, probe.startup_ms)
        if pins is not None:
            log.info("BPF maps pinned in %s (%s)", pins.directory, pins.describe())
        return probe

    # -- reading: the reader's

    def activity(self):
        """A snapshot of the activity map, keyed by socket cookie."""
        return self.reader.activity()

    def lookup(self, cookies: Sequence[int]):
        """The entries of just these cookies, read now."""
        return self.reader.lookup(cookies)

    def stats(self):
        return self.reader.stats()

    def counters(self):
        return self.reader.counters()

    @property
    def max_entries(self) -> int:
        return self.reader.max_entries

    # -- what is attached

    def describe(self) -> str:
        """One line for humans: the hook, and why others were not used."""
        what = {"tp_btf": "tp_btf tcp_probe", "raw_tracepoint": "raw tracepoint tcp_probe",
                "kprobe": "kprobe %s" % RCV_FUNC, "tracepoint": "tracepoint tcp:tcp_probe"}[self.hook]
        return what + (" (%s)" % "; ".join(self.hook_notes) if self.hook_notes else "")

    def describe_pins(self) -> Optional[str]:
        """"DIR (reused activity and counters)" / "DIR (new maps)"; None if not pinned."""
        pins = self._pins
        return None if pins is None else "%s (%s)" % (pins.directory, pins.describe())

    def pin_problems(self) -> List[str]:
        """What became of the pins since attach: [] while they are there and
        hold this probe's maps (and when nothing is pinned)."""
        if self._pins is None:
            return []
        ids = dict(self.reader.map_ids)
        if self.storage_id is not None:
            ids["storage"] = self.storage_id
        return self._pins.problems(ids)

    def pinnable_links(self) -> Tuple[Dict[str, int], Optional[str]]:
        """({pin name: fd} of every attachment, None) where each one is a BPF link;
        ({}, why not) otherwise: what detached.py pins so the probe outlives us.

        tp_btf and raw tracepoints are attached with BPF_RAW_TRACEPOINT_OPEN,
        which returns a BPF link (Linux 5.7 on); kprobes and classic
        tracepoints are perf events, which die with the process that holds them.
        """
        module = self._module
        if module is None or self._suspended:
            return {}, "the probe is closed or suspended"
        if self.hook == "tp_btf" and len(module.tp_btf_fds) == 2:
            links = {LINK_PIN: module.tp_btf_fds[1]}
        elif self.hook == "raw_tracepoint" and b"tcp_probe" in module.raw_tracepoint_fds:
            links = {LINK_PIN: module.raw_tracepoint_fds[b"tcp_probe"]}
        else:
            return {}, "the %s hook is a perf event, not a BPF link" % self.hook
        if self.destroy_hook == "raw_tracepoint":
            links[DESTROY_LINK_PIN] = module.raw_tracepoint_fds[DESTROY_TP]
        elif self.destroy_hook is not None:
            return {}, ("the destroy hook is the classic tcp:tcp_destroy_sock tracepoint, a "
                        "perf event, not a BPF link")
        return links, None

    @property
    def needs_cookie_priming(self) -> bool:
        """True if the hook only sees sockets whose cookie was asked for already.

        The raw tracepoint and the kprobe, and tp_btf on kernels before 5.12
        (no bpf_get_socket_cookie for tracing programs there).
        """
        return self._lazy_cookie

    def suspend(self) -> None:
        """Detach the receive hook (maps and the destroy hook stay); resume() re-attaches it.

        For measuring the probe's cost with and without it in one process
        (bench/bench_probe_tools.py), without compiling again.
        """
        if self._module is None:
            raise ValueError("probe is closed")
        if not self._suspended:
            _detach_hook(self._module, self.hook)
            self._suspended = True

    def resume(self) -> None:
        if self._module is None:
            raise ValueError("probe is closed")
        if self._suspended:
            _attach_hook(self._module, self.hook)
            self._suspended = False

    def selftest_counts(self) -> Tuple[int, int]:
        """(agreeing, disagreeing) BTF-offset reads, when attached with selftest."""
        c = self.counters()
        return c["selftest_ok"], c["selftest_bad"]

    def close(self, keep_pins: bool = False) -> None:
        """Detach the programs; unpin (unless keep_pins) and free the maps.

        With keep_pins the maps outlive this process in bpffs, holding what
        was recorded until now: the next attach(pin_dir=...) carries on with
        them, and PinnedMap can still read them.  Closing twice is harmless.
        """
        module, self._module = self._module, None
        if module is not None:
            _dispose(module)
        self.reader.close()
        pins, self._pins = self._pins, None
        if pins is not None:
            pins.release(remove=not keep_pins)

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load(map_size: int, hook: str, log, cache_dir: Optional[str], selftest: bool,
          pins: Optional[PinSession], sk_storage: bool = False, selector=None,
          selection: Optional[Sequence[str]] = None) -> _Loaded:
    """Compile, load and attach: the body of attach() once inputs are checked."""
    try:
        _module_class()  # bcc importable?
    except ImportError:
        raise ProbeUnavailable("bcc Python module not found (install python3-bpfcc)") from None

    ensure_tracefs(log)
    need_btf = selftest or hook in ("auto", "tp_btf", "raw_tracepoint", "kprobe")
    feats = detect_features(need_btf, cache_dir)
    candidates, notes = plan_hooks(hook, unavailable_reasons(feats))
    destroys = destroy_hooks(feats)
    if selftest and not (feats.tp_has_sk and feats.btf_offsets):
        raise ProbeUnavailable("selftest needs tcp_probe skbaddr/skaddr and kernel BTF")
    try:
        tree = kheaders.find_headers(cache_dir=cache_dir)
    except (kheaders.HeadersNotFound, OSError) as e:
        raise ProbeUnavailable(one_line(e)) from None

    sk_storage = sk_storage and feats.tracing_sk_storage and "tp_btf" in candidates
    build = dict(map_size=map_size, feats=feats, tree=tree, selftest=selftest, pins=pins,
                 selector=selector, selection=selection, log=log)
    if sk_storage:
        # The storage build first: the tp_btf hook alone, no activity map
        # (it would be created, preallocated, for nothing) and no destroy
        # hook.  Where the kernel refuses it (the verifier; a helper missing
        # for tracing programs despite the version), the LRU build of the
        # whole plan follows: a second compile, on that failure only.
        try:
            return _build(["tp_btf"], list(notes), destroys=[], storage=True, **build)
        except PinError:
            raise
        except ProbeUnavailable as e:
            notes.append("tp_btf + sk_storage refused (%s): the LRU map instead" % e)
            log.info("%s", notes[-1])
            if pins is not None and pins.storage_created:  # no program writes it
                pins.drop_storage()
    if not destroys:
        notes.append("no tcp:tcp_destroy_sock with sock_cookie: entries of closed "
                     "sockets stay until evicted")
    return _build(candidates, notes, destroys=destroys, storage=False, **build)


def _build(candidates: Sequence[str], notes: List[str], destroys: Sequence[str], storage: bool,
           map_size, feats, tree, selftest, pins, selector, selection, log) -> _Loaded:
    """Compile bpf/tcpidle.bpf.c for these hooks, attach the first the kernel
    takes; storage: the per-socket storage build (tp_btf alone); destroys:
    the destroy hooks to try (features.destroy_hooks), the first that attaches."""
    Module = _module_class()
    sk_storage = storage

    cflags = build_cflags(map_size, candidates, feats.btf_offsets, "tracepoint" in destroys,
                          selftest, tp_has_sk=feats.tp_has_sk,
                          tracing_cookie_helper=feats.tracing_cookie_helper,
                          sk_storage=sk_storage, selector=selector, selection=selection,
                          destroy_raw="raw_tracepoint" in destroys)
    if pins is not None:
        cflags += pins.cflags()
        if sk_storage:
            # bcc's pin-path section (see the C source): reused if pinned,
            # once checked to be ours
            why = pins.storage_problem()
            if why:
                raise PinError("%s: remove it with `tcpidle track --cleanup --pin-dir %s`"
                               % (why, pins.directory))
            pins.storage_created = not os.path.exists(pins.path("storage"))
            cflags.append('-DTCPIDLE_PIN_STORAGE="%s"' % pins.path("storage"))
    diag: List[str] = []
    try:
        with _env("BCC_KERNEL_SOURCE", tree.env), _captured_stderr(diag):
            module = Module(src_file=bpf_source().encode(), cflags=cflags)
    except Exception as e:  # noqa: BLE001 - bcc raises bare Exception
        for d in diag:
            log.debug("bcc: %s", d)
        detail = _first_error(diag) or one_line(e)
        raise ProbeUnavailable("BPF compile failed with headers %s: %s"
                               % (tree.source, detail)) from None
    for d in diag:
        log.debug("bcc compile: %s", d)

    try:
        destroy_hook = _attach_destroy(module, destroys, notes, log)

        def try_attach(h: str) -> None:
            out: List[str] = []
            try:
                with _captured_stderr(out):
                    _attach_hook(module, h)
            finally:
                for d in out:
                    log.debug("bcc %s: %s", h, d)

        chosen, notes = attach_first(candidates, try_attach, notes, log)
        reader = MapReader(None if storage else module[b"activity"].get_fd(),
                           module[b"counters"].get_fd())
    except ProbeUnavailable:
        _dispose(module)
        raise
    except Exception as e:  # noqa: BLE001 - bcc's bare Exception, OSError from map info
        _dispose(module)
        raise ProbeUnavailable("attaching BPF failed: %s" % one_line(e)) from None
    except BaseException:
        _dispose(module)
        raise
    lazy = chosen in LAZY_COOKIE_HOOKS or (chosen == "tp_btf" and not feats.tracing_cookie_helper)
    if chosen == "tp_btf" and lazy:
        notes.append("tp_btf reads the cookie from the socket (bpf_get_socket_cookie is "
                     "for tracing programs since Linux 5.12)")
    storage_fd = None
    if sk_storage and chosen == "tp_btf":
        from bcc import libbcc

        storage_fd = libbcc.lib.bpf_table_fd(module.module, b"sk_activity")
        lazy = False  # the storage is found from the socket: no cookie needed
    return _Loaded(module, reader, chosen, notes, tree.source, lazy, storage_fd, destroy_hook)


DESTROY_TP = b"tcp_destroy_sock"


def _attach_destroy(module, destroys: Sequence[str], notes: List[str], log) -> Optional[str]:
    """Attach the first destroy hook of `destroys` the kernel takes; which one (None: none).

    The raw tracepoint first: a BPF link, so the probe can outlive its loader
    (detached.py).  Where it fails, the classic tracepoint deletes the same
    entries; its failure, the last, is raised as before.
    """
    for i, hook in enumerate(destroys):
        last = i == len(destroys) - 1
        try:
            if hook == "raw_tracepoint":
                module.attach_raw_tracepoint(tp=DESTROY_TP, fn_name=b"on_destroy_raw")
            else:
                module.attach_tracepoint(tp=b"tcp:tcp_destroy_sock", fn_name=b"on_destroy")
        except Exception as e:  # noqa: BLE001 - bcc raises bare Exception
            if last:
                raise
            notes.append("destroy hook %s failed (%s): the %s instead"
                         % (hook, one_line(e), destroys[i + 1]))
            log.info("%s", notes[-1])
            continue
        return hook
    return None


def _attach_hook(module, hook: str) -> None:
    if hook == "tp_btf":
        # BPF_PROG_TYPE_TRACING / BPF_TRACE_RAW_TP, loaded by tpbtf.py
        # because bcc cannot (see there)
        try:
            if module.tp_btf_fds:  # resume(): the program stays loaded while suspended
                module.tp_btf_fds = (module.tp_btf_fds[0], tpbtf.attach(module.tp_btf_fds[0]))
            else:
                module.tp_btf_fds = tpbtf.load_and_attach(module, b"on_tcp_probe_btf",
                                                          "tcp_probe")
        except tpbtf.TpBtfError as e:
            raise ProbeUnavailable(str(e)) from None
    elif hook == "raw_tracepoint":
        # BPF_PROG_TYPE_RAW_TRACEPOINT via BPF_RAW_TRACEPOINT_OPEN: called
        # with the tracepoint's arguments, before any perf record is built
        module.attach_raw_tracepoint(tp=b"tcp_probe", fn_name=b"on_tcp_probe_raw")
    elif hook == "kprobe":
        module.attach_kprobe(event=RCV_FUNC.encode(), fn_name=b"on_rcv_kprobe")
    elif hook == "tracepoint":
        module.attach_tracepoint(tp=b"tcp:tcp_probe", fn_name=b"on_tcp_probe")
    else:
        raise ValueError(hook)


def _detach_hook(module, hook: str) -> None:
    if hook == "tp_btf":
        # the link alone: closing it detaches; the program stays for resume()
        prog, link = module.tp_btf_fds
        os.close(link)
        module.tp_btf_fds = (prog,)
    elif hook == "raw_tracepoint":
        module.detach_raw_tracepoint(b"tcp_probe")
    elif hook == "kprobe":
        module.detach_kprobe(event=RCV_FUNC.encode())
    elif hook == "tracepoint":
        module.detach_tracepoint(b"tcp:tcp_probe")
    else:
        raise ValueError(hook)


def _first_error(diag: Sequence[str]) -> Optional[str]:
    """The first clang "file:line:col: error: ..." line of bcc's output."""
    for text in diag:
        for line in text.splitlines():
            if " error: " in line or line.startswith("error: "):
                return " ".join(line.split())
    return None


def compile_only(source_name: str, cflags: Sequence[str], log=None):
    """Compile bpf/<source_name> with bcc and create its maps; load and attach nothing.

    For programs bcc cannot load itself (the destroy iterator: iterdestroy.py
    loads its bytecode with its own bpf(2) calls).  Release with dispose().
    """
    log = log or logging.getLogger("tcpidle")
    try:
        tree = kheaders.find_headers()
    except (kheaders.HeadersNotFound, OSError) as e:
        raise ProbeUnavailable(one_line(e)) from None
    path = os.path.join(os.path.dirname(bpf_source()), source_name)
    diag: List[str] = []
    try:
        with _env("BCC_KERNEL_SOURCE", tree.env), _captured_stderr(diag):
            module = _module_class()(src_file=path.encode(), cflags=list(cflags))
    except ImportError:
        raise ProbeUnavailable("bcc (python3-bpfcc) is not installed") from None
    except Exception as e:  # noqa: BLE001 - bcc raises bare Exception
        for d in diag:
            log.debug("bcc: %s", d)
        raise ProbeUnavailable("BPF compile of %s failed with headers %s: %s"
                               % (source_name, tree.source, _first_error(diag) or one_line(e))) \
            from None
    return module


def dispose(module) -> None:
    """Free what compile_only made (its maps)."""
    _dispose(module)
