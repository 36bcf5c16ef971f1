"""Where a run's BPF evidence of activity comes from, if anywhere.

Owns the choice, in this order:
  1. `--watch S`: attach a probe of our own and observe for S seconds;
  2. the pinned map of a running (or stopped) `tcpidle track` under the pin
     directory: history gathered by the tracker, read without compiling;
  3. nothing: idle times come from tcp_info alone, and the run says so
     (or fails with --require-bpf).
A stale pinned map (tracker stopped) is harmless: the merge rule in idle.py
never lets the probe make a socket look idler than tcp_info says.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

from .errors import RuntimeFailure
from .model import DEFAULT_PIN_DIR, Activity

log = logging.getLogger("tcpidle")


@dataclass
class Source:
    """A way to read activity, with a one-line description for the summary."""

    read: Optional[Callable[[], Dict[int, Activity]]]
    description: str
    stats: Optional[Callable[[], dict]] = None
    close: Callable[[], None] = lambda: None
    # Fresh entries of given cookies, for the re-check before a destroy.
    lookup: Optional[Callable[[Sequence[int]], Dict[int, Activity]]] = None


NO_PROBE = "no BPF probe: idle from tcp_info (for ns precision run `tcpidle track`, or `audit --watch S`)"


def open_source(pin_dir: str = DEFAULT_PIN_DIR, watch_s: Optional[float] = None,
                map_size: int = 65536, require_bpf: bool = False,
                progress: Optional[Callable[[str], None]] = None,
                prime: Optional[Callable[[], int]] = None) -> Source:
    """Pick the best activity source available; RuntimeFailure if --require-bpf finds none.

    `prime` (with --watch) makes the kernel give every socket to be scanned
    its cookie, for hooks that cannot (Probe.needs_cookie_priming); it
    returns how many sockets it asked about.
    """
    reason = None
    if watch_s or _pinned(pin_dir):
        from . import probe  # ctypes and libbpf: only when there is BPF to read
    if watch_s:
        try:
            return _watch(probe, watch_s, map_size, progress, prime)
        except probe.ProbeUnavailable as exc:
            reason = "BPF probe unavailable: %s" % exc
    elif _pinned(pin_dir):
        try:
            pinned = probe.PinnedMap.open(pin_dir)
        except probe.ProbeUnavailable as exc:
            reason = "cannot read the tracker's pinned map in %s: %s" % (pin_dir, exc)
        else:
            return Source(pinned.activity, "idle from BPF: the tracker's map pinned in %s" % pin_dir,
                          pinned.stats, pinned.close, pinned.lookup)
    if require_bpf:
        raise RuntimeFailure((reason or "no BPF activity source (no tracker pinned in %s, no --watch)" % pin_dir)
                             + "; --require-bpf given")
    if reason:
        log.warning("%s; idle from tcp_info", reason)
        return Source(None, reason + "; idle from tcp_info")
    return Source(None, NO_PROBE)


def _pinned(pin_dir: str) -> bool:
    return os.path.exists(os.path.join(pin_dir, "activity"))


# While watching, sockets opened since the last dump have no cookie yet: the
# dump is repeated this often, unless one dump costs more than a tenth of it.
PRIME_EVERY_S = 2.0


def _watch(probe, watch_s: float, map_size: int, progress, prime) -> Source:
    attached = probe.Probe.attach(map_size=map_size, log=log)  # logs hook, headers, start-up time
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
    return Source(attached.activity, "idle from BPF: %s, watched %g s" % (hook, watch_s),
                  attached.stats, attached.close, attached.lookup)


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

