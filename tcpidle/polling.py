"""The polling loop of `kill -i` and `tcpidle track`: a pass every interval until stopped.

Owns the loop around the engine's pass:

- a poll every interval: `passes.run_pass` (each destroy batch reported,
  and for the tracker written to the event log and counted in the metrics,
  as soon as it is done; a stop request ends the poll between two batches);
- signals.  SIGTERM and SIGINT stop the loop within the current poll:
  handlers only set a flag and write a byte to a self-pipe, and the sleep
  between polls is a select() on that pipe, so no lock is ever taken in a
  handler.  SIGHUP reopens the log file and the event log, in the loop,
  between writes;
- containment: a poll that fails (a netlink error such as ENOBUFS, a
  malformed dump, a vanished namespace, anything else) is logged, counted
  and retried at the next interval.  Only usage and privilege errors end
  the loop.

It knows nothing of BPF: the probe (if any) is inside the engine's
`Evidence`, and its map statistics are read through it for the metrics.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import time
from typing import Callable, Dict, List, Optional

from . import report, sinks
from .engine import Batch, Engine
from .errors import PrivilegeError, RuntimeFailure, TcpidleError
from .evidence import Evidence
from .model import Outcome
from .passes import run_pass

log = logging.getLogger("tcpidle")

FULL_GC_EVERY = 32  # polls between two full collections (Poller._collect)


class LoopControl:
    """Stop and reopen requests, safe from signal handlers and other threads.

    request_stop() and request_reopen() set a flag and poke a self-pipe;
    sleep_until() is a select() on that pipe, so a stop wakes it at once.
    Built (and installed) before anything slow, such as attaching a probe,
    so a SIGTERM meanwhile is not lost.
    """

    def __init__(self):
        self.stop = False
        self.reopen = False
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def request_stop(self) -> None:
        self.stop = True
        self._poke()

    def request_reopen(self) -> None:
        self.reopen = True
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wfd, b"\0")
        except OSError:  # pipe full (already poked) or closed
            pass

    def install(self) -> Callable[[], None]:
        """SIGTERM/SIGINT stop, SIGHUP reopens logs; returns a function restoring the old handlers."""
        wanted = {
            signal.SIGTERM: lambda signum, frame: self.request_stop(),
            signal.SIGINT: lambda signum, frame: self.request_stop(),
            signal.SIGHUP: lambda signum, frame: self.request_reopen(),
        }
        previous = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, less when poked."""
        ready, _, _ = select.select([self._rfd], [], [], seconds)
        if ready:
            self._drain()

    def _drain(self) -> None:
        try:
            while os.read(self._rfd, 64):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1


class Poller:
    """Runs the engine's pass every `interval` seconds until asked to stop.

    `evidence` is the engine's (for the probe's map statistics in the
    metrics); `events` an event log (report.EventLog) and `metrics` a
    metrics.Metrics, both optional; `name` prefixes the per-poll summary:
    "track", or "kill" for kill -i.
    """

    def __init__(self, engine: Engine, interval: float, signals: Optional[LoopControl] = None,
                 evidence: Optional[Evidence] = None, events=None, metrics=None,
                 as_json: bool = False, clock: Callable[[], float] = time.monotonic,
                 name: str = "track"):
        if not interval > 0:
            raise ValueError("interval must be positive")
        self.engine = engine
        self.interval = interval
        self.signals = signals if signals is not None else LoopControl()
        self.evidence = evidence
        self.events = events
        self.metrics = metrics
        self.as_json = as_json
        self.clock = clock
        self.name = name
        self.polls = 0
        self.errors = 0
        self.acted = 0
        self._ts = ""  # wall-clock time of the current poll, for its event log lines
        self._problems: List[str] = []  # the evidence's, as last said
        self._evicted: Optional[int] = None

    # -- control (signal-handler safe) ---------------------------------------------

    def request_stop(self) -> None:
        self.signals.request_stop()

    def request_reopen(self) -> None:
        self.signals.request_reopen()

    def install_signals(self) -> Callable[[], None]:
        return self.signals.install()

    # -- one poll ------------------------------------------------------------------

    def poll(self) -> List[Outcome]:
        """One pass, reported; raises whatever the pass raises.

        Each destroy batch goes to the event log and the metrics as soon as
        it is done (`_batch_done`), so a failure later in the poll loses none
        of it; a stop request (SIGTERM) ends the poll between two batches.
        A namespace named with --netns that is gone makes the poll count as
        failed, said each poll until it is back.
        """
        self._ts = report.now_iso()
        done = run_pass(self.engine, self.as_json, self.name, quiet_if_empty=True, clock=self.clock,
                        on_batch=self._batch_done, stop=lambda: self.signals.stop)
        scan = done.scan
        self.polls += 1
        self.acted += len(done.outcomes)
        stats = self._probe_stats()  # first: the gauges then move together
        self._say_degradation(stats)
        if self.metrics is not None:
            self.metrics.observe_tally(scan.tally, (), done.seconds, time.time(),
                                       owners=scan.owners)
            self.metrics.observe_probe(stats)
            self.metrics.observe_pins(len(self._problems))
        log.debug("poll %d: %d sockets dumped, %d matched, %d idle, %d acted on; %.1f ms",
                  self.polls, scan.seen, scan.matched, len(scan.victims),
                  len(done.outcomes), done.seconds * 1000.0)
        if scan.missing:
            self.errors += 1
            log.error("poll incomplete: %s (looked for again every poll)", "; ".join(scan.missing))
            if self.metrics is not None:
                self.metrics.observe_error()
        return done.outcomes

    def _batch_done(self, batch: Batch) -> None:
        """Event log lines and metrics of one destroy batch."""
        if self.events is not None and batch.outcomes:  # a failed write is recorded (sinks)
            self.events.write(batch.outcomes, self.engine.policy.dry_run, self._ts)
        if self.metrics is not None:
            self.metrics.observe_batch(batch.outcomes, [s.kind for s in batch.spared])

    def _probe_stats(self) -> Optional[Dict[str, int]]:
        if self.evidence is None:
            return None
        try:
            return self.evidence.stats()
        except OSError as e:
            log.warning("reading BPF map statistics: %s", e)
            return None

    def _say_degradation(self, stats: Optional[Dict[str, int]]) -> None:
        """Say what degrades under the evidence: its problems (the tracker's
        pins vanished or replaced), once per change; LRU evictions, each
        interval they grow."""
        if self.evidence is None:
            return
        problems = self.evidence.problems()
        if problems != self._problems:
            for text in problems:
                log.warning("BPF pins: %s: the maps live on in this tracker, but audit and kill "
                            "cannot read them and a restart starts without their history", text)
            if not problems:
                log.warning("BPF pins are in place again")
            self._problems = problems
        if stats is None:
            return
        if self._evicted is not None and stats["evicted"] > self._evicted:
            log.warning("BPF map: %d entries evicted since the last poll (%d in all; %d of %d "
                        "entries in use): raise --map-size for full precision",
                        stats["evicted"] - self._evicted, stats["evicted"], stats["entries"],
                        stats["max_entries"])
        self._evicted = stats["evicted"]

    def poll_safely(self) -> Optional[List[Outcome]]:
        """poll(), with every failure but a usage or privilege error contained."""
        started = self.clock()
        try:
            return self.poll()
        except TcpidleError as exc:
            if exc.exit_code == 2 or isinstance(exc, PrivilegeError):
                raise
            self._failed(exc, started)
        except PermissionError:
            raise
        except Exception as exc:  # noqa: BLE001 - the daemon outlives any one poll
            self._failed(exc, started)
        return None

    def _failed(self, exc: BaseException, started: float) -> None:
        self.errors += 1
        text = " ".join(str(exc).split()) or type(exc).__name__
        log.error("poll failed: %s: %s (retrying in %g s)", type(exc).__name__, text,
                  self.interval)
        log.debug("poll failure", exc_info=exc)
        if self.metrics is not None:
            self.metrics.observe_error(self.clock() - started)

    # -- the loop --------------------------------------------------------------------

    def run(self) -> None:
        """Poll every interval until request_stop()."""
        while not self.signals.stop:
            self._reopen_if_asked()
            started = self.clock()
            self.poll_safely()
            self._say_output_failures()
            self._collect()
            self._sleep_until(started + self.interval)

    def _collect(self) -> None:
        """The cycles a poll left, freed after it (the CLI disables automatic
        collection: see cli.main).  A full collection walks every object of the
        process, ~10 ms a poll here whatever the poll did; what a poll leaves
        is young, so the young generations are collected after each poll and
        everything every FULL_GC_EVERY polls."""
        gc.collect(2 if self.polls % FULL_GC_EVERY == 0 else 1)

    def _say_output_failures(self) -> None:
        """Outputs that lost lines this interval: said once, counted in the metrics."""
        lost = sinks.say_new_failures()
        if lost and self.metrics is not None:
            self.metrics.observe_output_errors(lost)

    def _sleep_until(self, deadline: float) -> None:
        while not self.signals.stop:
            self._reopen_if_asked()
            left = deadline - self.clock()
            if left <= 0:
                return
            self.signals.wait(left)

    def _reopen_if_asked(self) -> None:
        if not self.signals.reopen:
            return
        self.signals.reopen = False
        report.reopen_logs()
        if self.events is not None:
            try:
                self.events.reopen()
            except RuntimeFailure as e:
                log.error("%s", e)
        log.info("log files reopened (SIGHUP)")

    def close(self) -> None:
        self.signals.close()
