"""`tcpidle track`: the tracking daemon.

Owns the life of the daemon around the one-pass engine:

- the BPF probe attached with its maps pinned in bpffs (default
  /sys/fs/bpf/tcpidle), so that a restarted tracker carries on with the
  history of the last one (see Probe.attach(pin_dir=...));
- a poll every interval: one engine.run_pass with the probe's activity
  map; each destroy batch, as soon as it is done, logged (report), written
  to the event log as JSON lines and counted in the metrics, then to stdout
  as rows;
- signals.  SIGTERM and SIGINT stop the daemon within the current poll
  (between two destroy batches):
  handlers only set a flag and write a byte to a self-pipe, and the sleep
  between polls is a select() on that pipe, so no lock is ever taken in a
  handler.  The probe is then detached and its pins kept; exit 0.  SIGHUP
  reopens the log file and the event log, in the loop, between writes;
- containment: a poll that fails (a netlink error such as ENOBUFS, a
  malformed dump, a vanished namespace, anything else) is logged, counted
  and retried at the next interval.  Only usage and privilege errors end
  the daemon.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import select
import signal
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Sequence

from . import report, sinks
from .engine import Engine, require_privilege, run_pass
from .errors import PrivilegeError, RuntimeFailure, TcpidleError
from .model import Outcome, Policy, Selector
from .probe import DEFAULT_PIN_DIR, PinError, Probe, ProbeUnavailable, remove_pins

log = logging.getLogger("tcpidle")

DEFAULT_INTERVAL_S = 10.0
DEFAULT_MAP_SIZE = 65536
DEFAULT_MAX_KILLS = 100

__all__ = [
    "DEFAULT_PIN_DIR", "TrackOptions", "Tracker", "EventLog", "run", "cleanup",
]


@dataclass
class TrackOptions:
    """How the daemon runs (the Selector and Policy say what it does)."""

    interval: float = DEFAULT_INTERVAL_S
    pin_dir: Optional[str] = DEFAULT_PIN_DIR  # None: maps not pinned
    map_size: int = DEFAULT_MAP_SIZE
    hook: str = "auto"
    as_json: bool = False
    event_log: Optional[str] = None
    metrics_port: Optional[int] = None
    metrics_addr: str = "127.0.0.1"
    namespaces: Optional[object] = None  # a netns.Watch (or a Netns list); None: our own
    cache_dir: Optional[str] = None  # kernel header cache of the probe
    require_bpf: bool = False  # no probe: fail rather than track with tcp_info
    processes: bool = False  # -p: owners of every victim, from /proc


# ---------------------------------------------------------------------------
# the event log


class EventLog:
    """--event-log: one JSON line per victim acted on, appended and flushed.

    Each line is report.row() of the outcome (the keys of the JSON output)
    with "ts" (wall clock, ISO 8601, UTC) and "dry_run" added.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._file: Optional[sinks.AppendFile] = sinks.AppendFile(path, sinks.EVENT_LOG)
        except OSError as e:
            raise RuntimeFailure("event log %s: %s" % (path, e.strerror or e)) from None

    def write(self, outcomes: Sequence[Outcome], dry_run: bool, ts: Optional[str] = None) -> None:
        if not outcomes:
            return
        ts = ts or now_iso()
        lines = []
        for outcome in outcomes:
            obj = {"ts": ts}
            obj.update(report.row(outcome.verdict, outcome))
            obj["dry_run"] = dry_run
            lines.append(json.dumps(obj, separators=(",", ":")) + "\n")
        # A failed write is recorded in sinks.FAILURES (said once per poll), never raised.
        self._file.write("".join(lines), len(lines))

    def reopen(self) -> None:
        """After logrotate moved the file away (SIGHUP)."""
        self._file.reopen()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------
# the loop


class Tracker:
    """Polls an Engine every `interval` seconds until asked to stop.

    request_stop() and request_reopen() are safe from signal handlers and
    from other threads: they set a flag and poke the self-pipe the loop
    sleeps on.
    """

    def __init__(self, engine: Engine, interval: float, probe: Optional[Probe] = None,
                 events: Optional[EventLog] = None, metrics=None, as_json: bool = False,
                 clock: Callable[[], float] = time.monotonic, name: str = "track"):
        if not interval > 0:
            raise ValueError("interval must be positive")
        self.engine = engine
        self.interval = interval
        self.probe = probe
        self.events = events
        self.metrics = metrics
        self.as_json = as_json
        self.clock = clock
        self.name = name  # prefixes the per-poll summary: "track", or "kill" for kill -i
        self.polls = 0
        self.errors = 0
        self.acted = 0
        self._stop = False
        self._reopen = False
        self._ts = ""  # wall-clock time of the current poll, for its event log lines
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- control (signal-handler safe) ---------------------------------------------

    def request_stop(self) -> None:
        self._stop = True
        self._poke()

    def request_reopen(self) -> None:
        self._reopen = True
        self._poke()

    @property
    def stopping(self) -> bool:
        return self._stop

    def _poke(self) -> None:
        try:
            os.write(self._wfd, b"\0")
        except OSError:  # pipe full (already poked) or closed
            pass

    def install_signals(self) -> Callable[[], None]:
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

    # -- one poll ------------------------------------------------------------------

    def poll(self) -> List[Outcome]:
        """One scan and act; raises whatever they raise.

        Each destroy batch goes to the event log and the metrics as soon as
        it is done (`_batch_done`), so a failure later in the poll loses none
        of it; a stop request (SIGTERM) ends the poll between two batches.
        A namespace named with --netns that is gone makes the poll count as
        failed, said each poll until it is back.
        """
        self._ts = now_iso()
        scan, outcomes, elapsed, spared = run_pass(
            self.engine, self.as_json, self.name, quiet_if_empty=True, clock=self.clock,
            on_batch=self._batch_done, stop=lambda: self._stop)
        self.polls += 1
        self.acted += len(outcomes)
        if self.metrics is not None:
            stats = self._probe_stats()  # first: the gauges then move together
            self.metrics.observe_poll(scan.verdicts, (), elapsed, time.time())
            self.metrics.observe_probe(stats)
        log.debug("poll %d: %d sockets dumped, %d matched, %d idle, %d acted on; %.1f ms",
                  self.polls, scan.seen, len(scan.verdicts), len(scan.victims), len(outcomes),
                  elapsed * 1000.0)
        if scan.missing:
            self.errors += 1
            log.error("poll incomplete: %s (looked for again every poll)", "; ".join(scan.missing))
            if self.metrics is not None:
                self.metrics.observe_error()
        return outcomes

    def _batch_done(self, batch) -> None:
        """Event log lines and metrics of one destroy batch (engine.Batch)."""
        if self.events is not None and batch.outcomes:  # a failed write is recorded (sinks)
            self.events.write(batch.outcomes, self.engine.policy.dry_run, self._ts)
        if self.metrics is not None:
            self.metrics.observe_batch(batch.outcomes, [s.kind for s in batch.spared])

    def _probe_stats(self) -> Optional[Dict[str, int]]:
        if self.probe is None:
            return None
        try:
            return self.probe.stats()
        except OSError as e:
            log.warning("reading BPF map statistics: %s", e)
            return None

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
        while not self._stop:
            self._reopen_if_asked()
            started = self.clock()
            self.poll_safely()
            self._say_output_failures()
            gc.collect()  # the CLI disables automatic collection (see cli.main)
            self._sleep_until(started + self.interval)

    def _say_output_failures(self) -> None:
        """Outputs that lost lines this interval: said once, counted in the metrics."""
        lost = sinks.say_new_failures()
        if lost and self.metrics is not None:
            self.metrics.observe_output_errors(lost)

    def _sleep_until(self, deadline: float) -> None:
        while not self._stop:
            self._reopen_if_asked()
            left = deadline - self.clock()
            if left <= 0:
                return
            ready, _, _ = select.select([self._rfd], [], [], left)
            if ready:
                self._drain()

    def _drain(self) -> None:
        try:
            while os.read(self._rfd, 64):
                pass
        except BlockingIOError:
            pass

    def _reopen_if_asked(self) -> None:
        if not self._reopen:
            return
        self._reopen = False
        report.reopen_logs()
        if self.events is not None:
            try:
                self.events.reopen()
            except RuntimeFailure as e:
                log.error("%s", e)
        log.info("log files reopened (SIGHUP)")

    def close(self) -> None:
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1


# ---------------------------------------------------------------------------
# the daemon


def attach_probe(options: TrackOptions) -> Optional[Probe]:
    """The probe with pinned maps; None (and a warning) when BPF cannot run here.

    A pin directory that cannot be used (held by another tracker, foreign
    maps, no bpffs) is fatal: tracking on without the probe would hide it.
    So is any failure with require_bpf.
    """
    try:
        return Probe.attach(map_size=options.map_size, hook=options.hook,
                            cache_dir=options.cache_dir, pin_dir=options.pin_dir)
    except PinError:
        raise
    except ProbeUnavailable as e:
        if options.require_bpf:
            raise RuntimeFailure("BPF probe unavailable: %s; --require-bpf given" % e) from None
        log.warning("no BPF probe (%s): idle times from tcp_info alone "
                    "(jiffy precision, in-order data only)", e)
        return None


def describe_probe(probe: Optional[Probe]) -> str:
    if probe is None:
        return "no BPF probe: idle times from tcp_info"
    text = "BPF probe on %s" % probe.describe()
    pins = probe.describe_pins()
    if pins:
        try:
            text += "; maps pinned in %s, %d entries" % (pins, len(probe.activity()))
        except OSError:
            text += "; maps pinned in %s" % pins
    return text


def run(selector: Selector, policy: Policy, options: TrackOptions) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit status (0).

    Fatal errors (usage, privilege, an unusable pin directory, a metrics
    port that cannot be bound) raise TcpidleError before or instead of the
    loop; the probe is detached and its pins kept on every way out.
    """
    if not policy.dry_run:
        require_privilege("track")
    engine = Engine(selector, policy, want_owners=options.processes, namespaces=options.namespaces)
    events = EventLog(options.event_log) if options.event_log else None
    metrics = None
    probe = None
    tracker = Tracker(engine, options.interval, events=events, as_json=options.as_json)
    restore = tracker.install_signals()
    report.set_stdout_line_buffered()
    try:
        if options.metrics_port is not None:
            from .metrics import Metrics

            metrics = Metrics()
            try:
                metrics.serve(options.metrics_port, options.metrics_addr)
            except OSError as e:
                raise RuntimeFailure("metrics: cannot listen on %s port %d: %s" % (
                    options.metrics_addr, options.metrics_port, e.strerror or e)) from None
            tracker.metrics = metrics
            metrics.observe_probe(None)
        probe = attach_probe(options)
        if probe is not None:
            tracker.probe = probe
            engine.activity = probe.activity
            engine.recheck = probe.lookup
            for note in probe.pin_notes:
                log.info("%s", note)
            if probe.needs_cookie_priming:
                # Every poll's dump gives the sockets it lists their cookie;
                # this hook sees a socket's segments from then on.
                log.info("%s sees a connection from the first poll that lists it on",
                         probe.hook)
        report.note(describe_probe(probe))
        report.note("polling every %g s: idle >= %g ms%s%s; SIGTERM or SIGINT stops, "
                    "SIGHUP reopens logs" % (
                        options.interval, policy.idle_time_ms,
                        ", at most %d kills per interval" % policy.max_kills
                        if policy.max_kills is not None else "",
                        " (dry run)" if policy.dry_run else ""))
        if metrics is not None:
            report.note("metrics on http://%s:%d/metrics" % (
                _url_host(options.metrics_addr), options.metrics_port))
        tracker.run()
        report.note("stopped after %d polls (%d acted on, %d failed polls)%s" % (
            tracker.polls, tracker.acted, tracker.errors,
            "; BPF maps kept in %s" % probe.pin_dir if probe is not None and probe.pin_dir
            else ""))
        return 0
    finally:
        if probe is not None:
            probe.close(keep_pins=True)
        if metrics is not None:
            metrics.close()
        if events is not None:
            events.close()
        tracker.close()
        restore()


def cleanup(pin_dir: str = DEFAULT_PIN_DIR) -> List[str]:
    """--cleanup: remove the pinned maps (refused while a tracker runs); paths removed."""
    return remove_pins(pin_dir)


def _url_host(addr: str) -> str:
    return "[%s]" % addr if ":" in addr else addr
