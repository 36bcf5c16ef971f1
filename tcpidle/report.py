"""Everything tcpidle shows: rows on stdout, summaries and log lines elsewhere.

Owns the output contract of DESIGN.md: JSON Lines (one object per
connection, the contract's keys exactly) or a human table on stdout; a
summary on stderr; and the log (stderr with -v, a log file with -f, syslog
unless --disable-syslog), where every kill is a line carrying cookie,
4-tuple, idle time, idle source and outcome.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from collections import Counter
from typing import Dict, Iterable, Optional, Sequence, TextIO

from .model import FAMILY_NAMES, Outcome, Verdict

log = logging.getLogger("tcpidle")

# --------------------------------------------------------------------------
# logging


class _Syslog(logging.Handler):
    """libc syslog(3): never fails when no syslog daemon listens."""

    _LEVELS = {
        logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2,
    }

    def __init__(self):
        super().__init__()
        import syslog

        self._syslog = syslog
        syslog.openlog("tcpidle", syslog.LOG_PID, syslog.LOG_DAEMON)

    def emit(self, record):
        try:
            self._syslog.syslog(self._LEVELS.get(record.levelno, 6), self.format(record))
        except Exception:  # pragma: no cover - syslog(3) itself does not fail
            self.handleError(record)


class _ReopenableFile(logging.FileHandler):
    """A log file that `reopen()` closes and opens again (SIGHUP, logrotate)."""

    def reopen(self):
        self.acquire()
        try:
            if self.stream:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def setup_logging(verbose: int = 0, logfile: Optional[str] = None, syslog: bool = True) -> None:
    """Configure the "tcpidle" logger once per process.

    stderr gets warnings, plus info with -v and debug with -vv; the log file
    and syslog get every kill (info) and above.
    """
    log.handlers.clear()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG)
    err.setFormatter(logging.Formatter("tcpidle: %(message)s"))
    log.addHandler(err)
    if logfile:
        fh = _ReopenableFile(logfile)
        fh.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
        fh.setFormatter(logging.Formatter("%(asctime)s tcpidle[%(process)d] %(levelname)s %(message)s"))
        log.addHandler(fh)
    if syslog:
        sh = _Syslog()
        sh.setLevel(logging.INFO)
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)


def reopen_logs() -> None:
    """Reopen the log file (on SIGHUP)."""
    for handler in log.handlers:
        if isinstance(handler, _ReopenableFile):
            handler.reopen()


def log_outcome(outcome: Outcome) -> None:
    """One log line per act: the key facts of the kill, cookie first."""
    v = outcome.verdict
    s = v.socket
    level = logging.WARNING if outcome.action == "failed" else logging.INFO
    log.log(
        level,
        "%s cookie=%d %s %s -> %s state=%s idle_ms=%s source=%s owners=%s%s",
        outcome.action, s.cookie, FAMILY_NAMES.get(s.family, "?"), endpoint(s.src, s.sport),
        endpoint(s.dst, s.dport), s.state_name, _ms(v.idle_ms), v.idle_source or "-",
        ",".join("%d/%s" % pc for pc in zip(outcome.pids, outcome.comms)) or "-",
        (" error=%s" % outcome.error) if outcome.error else "",
    )


# --------------------------------------------------------------------------
# rows


def row(verdict: Verdict, outcome: Optional[Outcome] = None, owners: Optional[Dict] = None) -> Dict:
    """The JSON object of one connection: DESIGN.md's keys, plus `cgroups`."""
    s = verdict.socket
    if outcome is not None:
        pids, comms, cgroups = list(outcome.pids), list(outcome.comms), list(outcome.cgroups)
    else:
        held = (owners or {}).get(s.inode, ())
        pids = sorted({o.pid for o in held})
        comms = sorted({o.comm for o in held})
        cgroups = sorted({o.cgroup for o in held if o.cgroup})
    obj = {
        "cookie": s.cookie,
        "netns": s.netns,
        "family": FAMILY_NAMES.get(s.family, str(s.family)),
        "state": s.state_name,
        "src": s.src,
        "sport": s.sport,
        "dst": s.dst,
        "dport": s.dport,
        "idle_ms": _round(verdict.idle_ms),
        "idle_source": verdict.idle_source,
        "last_rx_ms": _round(verdict.last_rx_ms),
        "inode": s.inode,
        "uid": s.uid,
        "pids": pids,
        "comms": comms,
        "cgroups": cgroups,  # issue "Containers": the owners' cgroup paths
    }
    if outcome is not None:
        obj["action"] = outcome.action
        obj["error"] = outcome.error
    return obj


def _round(ms: Optional[float]) -> Optional[float]:
    return None if ms is None else round(ms, 3)


def _ms(ms: Optional[float]) -> str:
    return "-" if ms is None else ("%.3f" % ms if ms < 10 else "%.0f" % ms)


def endpoint(addr: str, port: int) -> str:
    return "[%s]:%d" % (addr, port) if ":" in addr else "%s:%d" % (addr, port)


def write_rows(rows: Iterable[Dict], as_json: bool, out: TextIO = None) -> None:
    """Write rows as JSON Lines or as an aligned table."""
    out = out or sys.stdout
    rows = list(rows)
    if as_json:
        write = out.write
        dumps = json.JSONEncoder(separators=(",", ":")).encode
        for obj in rows:
            write(dumps(obj))
            write("\n")
        out.flush()
        return
    if not rows:
        return
    with_action = "action" in rows[0]
    with_netns = any(r["netns"] is not None for r in rows)
    header = (["NETNS"] if with_netns else []) + [
        "STATE", "LOCAL", "PEER", "IDLE_MS", "SOURCE", "OWNER", "COOKIE",
    ] + (["ACTION"] if with_action else [])
    table = [header]
    for r in rows:
        owner = ",".join("%s/%s" % (c, p) for p, c in zip(r["pids"], r["comms"])) or "-"
        line = ([str(r["netns"] or "-")] if with_netns else []) + [
            r["state"], endpoint(r["src"], r["sport"]), endpoint(r["dst"], r["dport"]),
            _ms(r["idle_ms"]), r["idle_source"] or "-", owner, str(r["cookie"]),
        ]
        if with_action:
            line.append(r["action"] + (" (%s)" % r["error"] if r["error"] else ""))
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    numeric = {header.index("IDLE_MS"), header.index("COOKIE")}
    for line in table:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.write("  ".join(cells).rstrip() + "\n")
    out.flush()


# --------------------------------------------------------------------------
# summaries (stderr)


def summary_audit(verdicts: Sequence[Verdict], shown: int, seen: int, elapsed_ms: float,
                  min_idle_ms: float, source_note: str) -> None:
    fams = Counter(FAMILY_NAMES.get(v.socket.family, "?") for v in verdicts)
    sources = Counter(v.idle_source or "unknown" for v in verdicts)
    text = "audit: %d connection%s matched (%s)" % (
        len(verdicts), "" if len(verdicts) == 1 else "s",
        ", ".join("%s %d" % kv for kv in sorted(fams.items())) or "none",
    )
    if min_idle_ms > 0:
        text += ", %d idle >= %s ms" % (shown, _ms(min_idle_ms))
    text += "; idle from %s" % ", ".join("%s %d" % kv for kv in sorted(sources.items())) if verdicts else ""
    text += "; %s; %.0f ms" % (source_note, elapsed_ms)
    _err(text)


def summary_kill(outcomes: Sequence[Outcome], matched: int, victims: int, elapsed_ms: float,
                 dry_run: bool, prefix: str = "kill") -> None:
    counts = Counter(o.action for o in outcomes)
    parts = ", ".join("%d %s" % (n, a) for a, n in sorted(counts.items())) or "nothing to do"
    _err("%s%s: %s; %d idle of %d matched; %.0f ms" % (
        prefix, " (dry run)" if dry_run else "", parts, victims, matched, elapsed_ms))


def probe_stats(stats: Dict) -> None:
    """The probe map's health, with -v: entries, and those evicted or never created."""
    log.info(
        "BPF map: %d entries of %s; %d evicted, %d not created (map full), %d without cookie",
        stats.get("entries", 0), stats.get("max_entries", "?"), stats.get("evicted", 0),
        stats.get("failed", 0), stats.get("no_cookie", 0),
    )
    if stats.get("evicted") or stats.get("failed"):
        log.warning("the BPF map lost %d entries: raise --map-size for full precision",
                    stats.get("evicted", 0) + stats.get("failed", 0))


def progress(text: str) -> None:
    """A transient progress line on a terminal; nothing when stderr is not one."""
    if sys.stderr.isatty():
        sys.stderr.write("\rtcpidle: %s\x1b[K" % text)
        sys.stderr.flush()


def note(text: str) -> None:
    """A one-line remark for the user on stderr (not a log record)."""
    _err(text)


def error(text: str) -> None:
    _err("error: " + text)


def _err(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")  # clear a progress line
    sys.stderr.write("tcpidle: %s\n" % text)
    sys.stderr.flush()


def set_stdout_line_buffered() -> None:
    """Polling modes write rows as they happen; keep them flowing to pipes."""
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):  # pragma: no cover
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
