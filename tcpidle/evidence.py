"""The BPF evidence a run has of when sockets received, and where it comes from.

Owns `Evidence`, the one object the engine is handed when it is built: a
snapshot of the probe's records (read right after the dump), fresh records
of given cookies (the re-check right before a destroy), the map's health
(`stats`), a one-line description for the summary, and `close`.  Behind it
is a probe map reader (`tcpidle.probe`: an attached `Probe`, or the
`PinnedMap` of a tracker), or nothing at all.

Where it comes from is chosen here, in this order (`choose`):
  1. `--watch S`: attach a probe of our own and observe for S seconds;
  2. the pinned map of a running (or stopped) `tcpidle track` under the pin
     directory: history gathered by the tracker, read without compiling;
  3. nothing: idle times come from tcp_info alone, and the run says so
     (or fails with --require-bpf).
The tracker has a probe of its own, its maps pinned (`attach_tracker`): where
it can, the probe is loaded by a short-lived helper process and its link
pinned too (probe/detached.py), so the tracker holds no compiler and the
probe records on between trackers.

Where the probe records into per-socket storage (tp_btf + sk_storage, Linux
5.11 on), its evidence is read **inline**: the INET_DIAG dump the pass makes
anyway carries each socket's value (`InlineReader`, diag.Storages), so there
is no map read, no join on cookies and no priming; `bind_scope` makes the
scope's dumps ask for it.
A stale pinned map (tracker stopped) is harmless: the merge rule in idle.py
never lets the probe make a socket look idler than tcp_info says.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

from . import diag
from .errors import RuntimeFailure
from .model import DEFAULT_MAP_SIZE, DEFAULT_PIN_DIR, Activity, filled, fills_directly

log = logging.getLogger("tcpidle")

NO_PROBE = "no BPF probe: idle from tcp_info (for ns precision run `tcpidle track`, or `audit --watch S`)"


class Evidence:
    """What the probe knows, for one run; without a reader, nothing (tcp_info alone).

    `reader` is a probe map reader (activity/lookup/stats/close);
    `close` is how to let go of it (default: reader.close());
    `problems` says what degraded under it since (default: nothing can).
    """

    def __init__(self, reader=None, description: str = NO_PROBE,
                 close: Optional[Callable[[], None]] = None,
                 problems: Optional[Callable[[], List[str]]] = None, detached: bool = False):
        self.reader = reader
        self.detached = detached  # the probe is pinned and records on after close()
        self.description = description
        self._close = close if close is not None else (reader.close if reader is not None else None)
        self._problems = problems

    @property
    def present(self) -> bool:
        """Is there a probe behind it?"""
        return self.reader is not None

    @property
    def streams(self) -> bool:
        """Do its records come with the dump itself (inline storage), or is there
        no probe at all?  Then a pass can decide each socket as it is decoded
        (`take`); a map's snapshot must be read after the whole dump."""
        return self.reader is None or isinstance(self.reader, InlineReader)

    def take(self) -> Dict[int, Activity]:
        """While a dump streams: the records of the sockets decoded since the last
        call ({} without a probe).  snapshot() after the dump ends it."""
        return self.reader.take() if self.reader is not None else {}

    def snapshot(self) -> Dict[int, Activity]:
        """Every record of the probe's map, by cookie ({} without a probe)."""
        return self.reader.activity() if self.reader is not None else {}

    def lookup(self, cookies: Sequence[int], batch=None) -> Dict[int, Activity]:
        """Fresh records of just these cookies ({} without a probe); OSError if the map cannot be read.

        `batch`: (DiagSocket, Sockets) of one destroy batch, which inline
        storage dumps alone (InlineReader.lookup); a map reader looks the
        cookies up and needs none."""
        if self.reader is None:
            return {}
        if batch is not None and isinstance(self.reader, InlineReader):
            return self.reader.lookup(cookies, batch)
        return self.reader.lookup(cookies)

    @property
    def dumps_to_recheck(self) -> bool:
        """Does a re-check dump to read fresh records (inline storage)?  Then
        batches keep their ports together (Scope.batches(by_port=True))."""
        return isinstance(self.reader, InlineReader)

    def stats(self) -> Optional[dict]:
        """The map's health (entries, max_entries, evicted, ...); None without a probe."""
        return self.reader.stats() if self.reader is not None else None

    def problems(self) -> List[str]:
        """What degraded since it was opened, one line each: the tracker's
        pins vanished or replaced (Probe.pin_problems); [] when all is well."""
        return self._problems() if self._problems is not None else []

    def bind_scope(self, scope) -> None:
        """Make the scope's dumps carry the inline storage (no-op otherwise)."""
        if isinstance(self.reader, InlineReader):
            self.reader.bind(scope)

    def close(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            close()


_ACTIVITY_FIELDS = ("cookie", "last_segment_ns", "last_data_ns", "segments", "data_segments",
                    "bytes")
_FAST_ACTIVITY = fills_directly(Activity, _ACTIVITY_FIELDS)


def _activity(cookie, seg, data, nseg, ndata, nbytes) -> Activity:
    """Activity(...), filled as the dump decoder fills a Socket
    (model.fills_directly): one is made per socket per poll."""
    return filled(Activity, {"cookie": cookie, "last_segment_ns": seg, "last_data_ns": data,
                             "segments": nseg, "data_segments": ndata, "bytes": nbytes})


class InlineReader:
    """The probe's per-socket storage, as the scope's dumps return it.

    activity(): the values the dumps since the last call carried, by cookie
    (the pass reads it right after its dump).  take(): the same, part by part
    while a dump streams (a pass that decides each chunk as it arrives), then
    activity() ends the dump: stats() counts the records of the whole dump.
    lookup(cookies): the re-check
    before a destroy -- exact INET_DIAG lookups carry no storage, so the
    scope is dumped once more (storage only, no tcp_info) and the values of
    these cookies returned.  `storage_fd` is the map's fd (the tracker's own,
    or one opened from the pin); the map id tells its values apart in the
    replies.
    """

    storage = "sk_storage"

    def __init__(self, storage_fd: int, map_id: int, hook: str = "tp_btf",
                 close: Optional[Callable[[], None]] = None, counters=None):
        self.storages = diag.Storages([storage_fd])
        self.map_id = map_id
        self.hook = hook
        self._close = close
        self._counters = counters  # the probe's counters map reader, when we have it
        self._scope = None
        self._entries = 0  # records the last dump carried
        self._taken = 0  # records take() returned since the last activity()

    def bind(self, scope) -> None:
        self._scope = scope
        scope.storage = self.storages

    @property
    def refused(self) -> Optional[str]:
        """Why the dumps carry no storage (EPERM), None while they do."""
        return self.storages.refused

    def _take(self) -> Dict[int, Activity]:
        from .probe.maps import VALUE  # struct only: no ctypes, no bcc

        out = {}
        mid = self.map_id
        unpack, size = VALUE.unpack_from, VALUE.size
        make = _activity if _FAST_ACTIVITY else Activity
        for cookie, per_map in self.storages.stores.items():
            raw = per_map.get(mid)
            if raw is not None and len(raw) >= size:
                out[cookie] = make(cookie, *unpack(raw))
        self.storages.stores.clear()
        return out

    def take(self) -> Dict[int, Activity]:
        out = self._take()
        self._taken += len(out)
        return out

    def activity(self) -> Dict[int, Activity]:
        out = self._take()
        self._entries, self._taken = self._taken + len(out), 0
        return out

    def lookup(self, cookies: Sequence[int], batch=None) -> Dict[int, Activity]:
        """The re-check's fresh records of `cookies`: dumped once more, chunk by
        chunk, keeping the storage of these cookies alone.  `batch` is
        (DiagSocket of their namespace, their Sockets): the dump is then that
        namespace's, narrowed to the batch's ports (Scope.dump_batch_storages);
        without it, the whole selection in every namespace."""
        want = set(cookies)
        stores = self.storages.stores
        if self._scope is not None:
            kept: Dict[int, Dict[int, bytes]] = {}

            def chunk(socks) -> None:
                for c in want.intersection(stores):
                    kept[c] = stores[c]
                stores.clear()

            stores.clear()
            if batch is not None:
                self._scope.dump_batch_storages(batch[0], batch[1], sink=chunk)
            else:
                self._scope.dump_storages(sink=chunk)
            stores.update(kept)
        fresh = self._take()
        return {c: fresh[c] for c in cookies if c in fresh}

    def stats(self) -> Dict[str, int]:
        c = self._counters.counters() if self._counters is not None else {}
        return {"entries": self._entries, "inserts": c.get("inserts", 0),
                "deletes": 0, "evicted": 0, "failed": c.get("failed", 0),
                "no_cookie": 0, "max_entries": 0}

    def close(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            close()


def attach_tracker(pin_dir: Optional[str], map_size: int = DEFAULT_MAP_SIZE, hook: str = "auto",
                   require_bpf: bool = False, cache_dir: Optional[str] = None,
                   selector=None) -> Evidence:
    """The tracker's own probe, its maps pinned in `pin_dir` (None: not pinned).

    Closing it keeps the pins, so a restarted tracker, and `audit`/`kill`
    meanwhile, carry on with its history; a pinned (detached) probe also
    goes on recording until `track --cleanup`, an in-process one detaches.
    BPF that cannot run here leaves tcp_info alone, with a warning (a
    RuntimeFailure with require_bpf); a pin directory that cannot be used
    (held by another tracker, foreign maps, no bpffs) is fatal: tracking on
    without the probe would hide it.
    """
    from . import probe  # ctypes, libbpf and bcc: the tracker's alone

    try:
        # loaded by a helper process and pinned where it can be (no bcc here)
        attached = probe.tracker_probe(pin_dir, map_size=map_size, hook=hook,
                                       cache_dir=cache_dir, selector=selector, log=log)
    except probe.PinError:
        raise
    except probe.ProbeUnavailable as e:
        if require_bpf:
            raise RuntimeFailure("BPF probe unavailable: %s; --require-bpf given" % e) from None
        log.warning("no BPF probe (%s): idle times from tcp_info alone "
                    "(jiffy precision, in-order data only)", e)
        return Evidence(None, "no BPF probe: idle times from tcp_info")
    for note in attached.pin_notes:
        log.info("%s", note)
    if attached.needs_cookie_priming:
        # Every poll's dump gives the sockets it lists their cookie; this
        # hook sees a socket's segments from then on.
        log.info("%s sees a connection from the first poll that lists it on", attached.hook)
    text = "BPF probe on %s" % attached.describe()
    if attached.storage_fd is not None:
        text += "; per-socket storage, read inline in the INET_DIAG dumps"
        if attached.pin_dir:
            text += "; maps pinned in %s" % attached.describe_pins()
        return Evidence(InlineReader(attached.storage_fd, attached.storage_id, attached.hook,
                                     counters=attached), text,
                        close=lambda: attached.close(keep_pins=True),
                        problems=attached.pin_problems,
                        detached=isinstance(attached, probe.DetachedProbe))
    pins = attached.describe_pins()
    if pins:
        try:
            text += "; maps pinned in %s, %d entries" % (pins, len(attached.activity()))
        except OSError:
            text += "; maps pinned in %s" % pins
    return Evidence(attached, text, close=lambda: attached.close(keep_pins=True),
                    problems=attached.pin_problems,
                    detached=isinstance(attached, probe.DetachedProbe))


def choose(pin_dir: str = DEFAULT_PIN_DIR, watch_s: Optional[float] = None,
           map_size: int = DEFAULT_MAP_SIZE, require_bpf: bool = False,
           progress: Optional[Callable[[str], None]] = None,
           prime: Optional[Callable[[], int]] = None) -> Evidence:
    """The best evidence available; RuntimeFailure if --require-bpf finds none.

    `prime` (with --watch) makes the kernel give every socket to be scanned
    its cookie, for hooks that cannot (Probe.needs_cookie_priming); it
    returns how many sockets it asked about.
    """
    reason = None
    if watch_s or _pinned(pin_dir) or _pinned_storage(pin_dir):
        from . import probe  # ctypes and libbpf: only when there is BPF to read
    if watch_s:
        try:
            return _watch(probe, watch_s, map_size, progress, prime)
        except probe.ProbeUnavailable as exc:
            reason = "BPF probe unavailable: %s" % exc
    elif _pinned_storage(pin_dir):
        try:
            return _open_pinned_storage(probe, pin_dir)
        except OSError as exc:
            reason = "cannot open the tracker's pinned storage in %s: %s" % (
                pin_dir, os.strerror(exc.errno or 0))
        except probe.ProbeUnavailable as exc:
            reason = "cannot use the tracker's pinned storage: %s" % exc
    elif _pinned(pin_dir):
        try:
            pinned = probe.PinnedMap.open(pin_dir)
        except probe.ProbeUnavailable as exc:
            reason = "cannot read the tracker's pinned map in %s: %s" % (pin_dir, exc)
        else:
            return Evidence(pinned, "idle from BPF: the tracker's map pinned in %s" % pin_dir)
    unreadable = None if (watch_s or reason) else _unreadable_pins(pin_dir)
    if require_bpf:
        raise RuntimeFailure((reason or unreadable
                              or "no BPF activity source (no tracker pinned in %s, no --watch)"
                              % pin_dir) + "; --require-bpf given")
    if reason:
        log.warning("%s; idle from tcp_info", reason)
        return Evidence(None, reason + "; idle from tcp_info")
    if unreadable:  # said with -v: most hosts an unprivileged user looks at run no tracker
        log.info("%s; idle from tcp_info", unreadable)
    return Evidence(None, NO_PROBE)


def _pinned(pin_dir: str) -> bool:
    return os.path.exists(os.path.join(pin_dir, "activity"))


def _unreadable_pins(pin_dir: str) -> Optional[str]:
    """Why the pin directory cannot even be looked into (a user not root: the
    tracker's pins are root's), None if it can (or there is none)."""
    try:
        os.stat(os.path.join(pin_dir, "activity"))
    except PermissionError as e:
        return "cannot look for the tracker's pins in %s: %s (they are root's)" % (
            pin_dir, e.strerror)
    except OSError:
        pass
    return None


def _pinned_storage(pin_dir: str) -> bool:
    return os.path.exists(os.path.join(pin_dir, "storage"))


def _open_pinned_storage(probe, pin_dir: str) -> Evidence:
    """The tracker's per-socket storage map, opened from its pin, for inline dumps."""
    from .probe.maps import STORAGE_PIN, layout_problem, map_info, obj_get
    from .probe.pins import check_pin

    path = os.path.join(pin_dir, STORAGE_PIN)
    check_pin(path)  # ours, not a symlink (PinError)
    fd = obj_get(path)
    try:
        info = map_info(fd)
        why = layout_problem(STORAGE_PIN, info.type, info.key_size, info.value_size,
                             info.max_entries, info.map_flags)
        if why:
            raise probe.ProbeUnavailable("%s is %s" % (path, why))
    except BaseException:
        os.close(fd)
        raise
    return Evidence(InlineReader(fd, info.id, close=lambda: os.close(fd)),
                    "idle from BPF: the tracker's per-socket storage pinned in %s, "
                    "read inline in the INET_DIAG dump" % pin_dir)


# While watching, sockets opened since the last dump have no cookie yet: the
# dump is repeated this often, unless one dump costs more than a tenth of it.
PRIME_EVERY_S = 2.0


def _watch(probe, watch_s: float, map_size: int, progress, prime) -> Evidence:
    attached = probe.Probe.attach(map_size=map_size, log=log,  # logs hook, headers, start-up time
                                  sk_storage=True)
    try:
        primer = _Primer(prime if attached.needs_cookie_priming else None, attached.hook)
        deadline = time.monotonic() + watch_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            primer.maybe()
            if progress:
                progress("watching traffic with the BPF probe: %.0f s left" % left)
            time.sleep(min(1.0, left))
    except BaseException:
        attached.close()
        raise
    hook = attached.describe().partition(" (")[0]  # without the notes on hooks not taken
    if attached.storage_fd is not None:
        return Evidence(InlineReader(attached.storage_fd, attached.storage_id, attached.hook,
                                     close=attached.close, counters=attached),
                        "idle from BPF: %s + per-socket storage (inline), watched %g s"
                        % (hook, watch_s))
    return Evidence(attached, "idle from BPF: %s, watched %g s" % (hook, watch_s))


class _Primer:
    """Gives the selected sockets their cookies (an INET_DIAG dump) for hooks
    that cannot: at once, then every PRIME_EVERY_S while that stays cheap.

    The hook keys segments by the cookie a socket already has; sockets
    opened between two dumps are seen from the next one on, and until then
    tcp_info serves them.
    """

    def __init__(self, prime: Optional[Callable[[], int]], hook: str):
        self.prime = prime
        self.hook = hook
        self.last = None  # monotonic time of the last dump
        self.cost = 0.0

    def maybe(self) -> None:
        if self.prime is None:
            return
        now = time.monotonic()
        if self.last is not None and (now - self.last < PRIME_EVERY_S
                                      or self.cost > PRIME_EVERY_S / 10):
            return
        count = self.prime()
        self.cost = time.monotonic() - now
        (log.info if self.last is None else log.debug)(
            "%s: cookies primed for %d sockets (%.0f ms)", self.hook, count, self.cost * 1000)
        self.last = now
