"""Everything tcpidle shows: rows on stdout, summaries and log lines elsewhere.

Owns the output contract of DESIGN.md: JSON Lines (one object per
connection, the contract's keys exactly) or a human table on stdout; a
summary on stderr; the log (stderr with -v, a log file with -f, syslog
unless --disable-syslog), where every kill is a line carrying cookie,
4-tuple, idle time, idle source, verdict and outcome; and the tracker's event log.
The commands hand it what a pass returned (`audit_pass`; kill's batches
one by one as they are done, `log_batch`, `show`, `summary_kill`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from typing import Dict, Optional, Sequence, TextIO

from . import sinks
from .errors import RuntimeFailure
from .model import FAMILY_NAMES, Outcome, OwnerSummary, TcpState, Verdict
from .safetext import printable

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
        except Exception:  # noqa: BLE001  # pragma: no cover - syslog(3) itself does not fail
            self.handleError(record)


def setup_logging(verbose: int = 0, logfile: Optional[str] = None, syslog: bool = True) -> None:
    """Configure the "tcpidle" logger once per process.

    stderr gets warnings, plus info with -v and debug with -vv; the log file
    and syslog get every kill (info) and above.  Messages are made printable
    (sinks.PrintableFormatter); a log that cannot be written is recorded in
    sinks.FAILURES, never a traceback.
    """
    sinks.quiet_logging_errors()
    for old in log.handlers:
        old.close()
    log.handlers.clear()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    err = sinks.StderrHandler()
    err.setLevel(logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG)
    err.setFormatter(sinks.PrintableFormatter("tcpidle: %(message)s"))
    log.addHandler(err)
    if logfile:
        try:
            fh = sinks.LogFileHandler(logfile)
        except OSError as exc:
            raise RuntimeFailure("log file %s: %s" % (logfile, exc.strerror or exc)) from None
        fh.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
        fh.setFormatter(sinks.PrintableFormatter(
            "%(asctime)s tcpidle[%(process)d] %(levelname)s %(message)s"))
        log.addHandler(fh)
    if syslog:
        sh = _Syslog()
        sh.setLevel(logging.INFO)
        sh.setFormatter(sinks.PrintableFormatter("%(message)s"))
        log.addHandler(sh)
    # The logger's own level is the lowest any handler takes, so a record no
    # handler wants (a kill line with only stderr at WARNING) is never built.
    log.setLevel(min(h.level for h in log.handlers))


def reopen_logs() -> None:
    """Reopen the log file (on SIGHUP)."""
    for handler in log.handlers:
        if isinstance(handler, sinks.LogFileHandler):
            handler.reopen()


def log_batch(outcomes: Sequence[Outcome], spared: Sequence = (), said_per_owner=frozenset()) -> None:
    """The log lines of one destroy batch: one per victim acted on, one per victim spared.

    `said_per_owner`: the inodes of victims whose failure is said once per owner
    (a refused pidfd_getfd): their lines are info (log file, syslog, -v), not warnings.
    """
    for outcome in outcomes:
        log_outcome(outcome, quiet=outcome.verdict.socket.inode in said_per_owner)
    for spare in spared:
        log_spared(spare.verdict, spare.reason)


def log_spared(verdict: Verdict, reason: str) -> None:
    """One log line per victim the re-check left alone, with why."""
    if not log.isEnabledFor(logging.INFO):
        return
    s = verdict.socket
    log.info("spared cookie=%d %s %s -> %s state=%s idle_ms=%s source=%s: %s",
             s.cookie, FAMILY_NAMES.get(s.family, "?"), endpoint(s.src, s.sport),
             endpoint(s.dst, s.dport), s.state_name, _ms(verdict.idle_ms),
             verdict.idle_source or "-", reason)


def log_outcome(outcome: Outcome, quiet: bool = False) -> None:
    """One log line per act: the key facts of the kill, cookie first (a failure is a
    warning, unless `quiet`: said otherwise)."""
    v = outcome.verdict
    s = v.socket
    level = logging.WARNING if outcome.action == "failed" and not quiet else logging.INFO
    if not log.isEnabledFor(level):  # no handler wants it: don't format it
        return
    log.log(
        level,
        "%s cookie=%d %s %s -> %s state=%s idle_ms=%s source=%s verdict=%s owners=%s%s",
        outcome.action, s.cookie, FAMILY_NAMES.get(s.family, "?"), endpoint(s.src, s.sport),
        endpoint(s.dst, s.dport), s.state_name, _ms(v.idle_ms), v.idle_source or "-",
        v.health.verdict if v.health else "-", owners_text(outcome.pids, outcome.comms),
        (" error=%s" % outcome.error) if outcome.error else "",
    )


# --------------------------------------------------------------------------
# rows


# One JSON object per connection, written from one template: the single
# definition of the keys (DESIGN.md's table, plus `cgroups`, then the evidence
# of health of issue 11, then `action`/`error` for a victim acted on).
# Building a dict and encoding it cost ~6 us a row, half the time of a
# 100k-socket audit; the template does both in ~2 us.  Addresses are
# inet_ntop text and never need escaping; every other string goes through
# json.dumps.  What many rows share (a reason's text, a socket's vitals: a
# kill's victims are alike) is made once and kept (`_Kept`).
_KEYS = ('{"cookie":%d,"netns":%s,"family":%s,"state":%s,"src":"%s","sport":%d,"dst":"%s",'
         '"dport":%d,"idle_ms":%s,"idle_source":%s,"last_rx_ms":%s,"inode":%d,"uid":%d,'
         '"pids":%s,"comms":%s,"cgroups":%s,"verdict":%s,"verdict_reason":%s,"keepalive":%s,'
         '"unacked":%s,"retrans":%s,"backoff":%s,"last_ack_ms":%s,"last_send_ms":%s,'
         '"send_q":%s,"recv_q":%s,"middlebox":%s')
_ROW = _KEYS + "}"
_ROW_ACTED = _KEYS + ',"action":%s,"error":%s}'
_FAMILY_JSON = {f: '"%s"' % name for f, name in FAMILY_NAMES.items()}
_STATE_JSON = {int(st): '"%s"' % st.name for st in TcpState}
_SOURCE_JSON = {None: "null", "bpf": '"bpf"', "tcp_info": '"tcp_info"'}
_dumps = json.dumps  # ASCII output: everything outside ' '..'~' escaped, DEL and C1 included


class _Quoted(dict):
    """value -> its JSON text, computed once per distinct value (labels, actions, errors)."""

    def __missing__(self, value):
        text = self[value] = _dumps(value)
        return text


_quoted = _Quoted({None: "null"})


class _Kept(dict):
    """key -> text made by `make(key)`, kept for the next rows; forgotten in one go
    past `limit` entries (a long audit's variety must not grow a tracker)."""

    def __init__(self, make, limit: int = 4096):
        super().__init__()
        self.make, self.limit = make, limit

    def __missing__(self, key):
        if len(self) >= self.limit:
            self.clear()
        text = self[key] = self.make(key)
        return text


def _reason_text(r: str) -> str:
    # Reasons are health.py's words and numbers; quote-free text is inserted
    # as is, anything else goes through the encoder.
    return _dumps(r) if ('"' in r or "\\" in r or not r.isprintable()) else '"%s"' % r


def _vitals_text(v) -> tuple:
    """The row's texts of `keepalive`, `unacked`, `retrans`, `backoff`, `send_q`, `recv_q`."""
    return ("true" if v.timer == 2 else "false",  # model.TIMER_KEEPALIVE
            "null" if v.unacked is None else "%d" % v.unacked,
            "null" if v.retransmits is None else "%d" % v.retransmits,
            "null" if v.backoff is None else "%d" % v.backoff,
            "null" if v.send_q is None else "%d" % v.send_q,
            "null" if v.recv_q is None else "%d" % v.recv_q)


_reasons = _Kept(_reason_text)
_vitals = _Kept(_vitals_text)
_NO_VITALS = ("null",) * 6


Owners = Dict[int, OwnerSummary]  # by socket inode


def json_line(verdict: Verdict, outcome: Optional[Outcome] = None, owners: Optional[Owners] = None) -> str:
    """The JSON object of one connection (with `action`/`error` when acted on), no newline."""
    s = verdict.socket
    if outcome is not None:
        pids, comms, cgroups = outcome.pids, outcome.comms, outcome.cgroups
    else:
        held = owners.get(s.inode) if owners else None
        pids, comms, cgroups = held if held else ((), (), ())
    # The evidence of health: the verdict, its reason, and what it rests on.
    h = verdict.health
    if h is None:
        name = reason = "null"
    else:
        name, reason = _quoted[h.verdict], _reasons[h.reason]
    v = s.vitals
    keepalive, unacked, retrans, backoff, send_q, recv_q = _NO_VITALS if v is None else _vitals[v]
    idle_ms, last_rx_ms = verdict.idle_ms, verdict.last_rx_ms
    ack, sent = s.last_ack_recv_ms, s.last_data_sent_ms
    values = (
        s.cookie, _quoted[s.netns], _FAMILY_JSON.get(s.family) or _dumps(str(s.family)),
        _STATE_JSON.get(s.state) or _dumps(s.state_name), s.src, s.sport, s.dst, s.dport,
        "null" if idle_ms is None else repr(round(idle_ms, 3)),  # float repr is JSON's
        _SOURCE_JSON.get(verdict.idle_source) or _dumps(verdict.idle_source),
        "null" if last_rx_ms is None else repr(round(last_rx_ms, 3)), s.inode, s.uid,
        _dumps(list(pids)) if pids else "[]", _dumps(list(comms)) if comms else "[]",
        _dumps(list(cgroups)) if cgroups else "[]", name, reason,
        keepalive, unacked, retrans, backoff,
        "null" if ack is None else "%d" % ack, "null" if sent is None else "%d" % sent,
        send_q, recv_q, _quoted[verdict.exposure],
    )
    if outcome is None:
        return _ROW % values
    error = outcome.error
    return _ROW_ACTED % (values + (_quoted[outcome.action],
                                   "null" if error is None else _dumps(error)))


def owners_text(pids: Sequence[int], comms: Sequence[str]) -> str:
    """"nginx[812,813]": the owners' names, then their pids; "-" when unknown."""
    if not pids:
        return "-"
    return "%s[%s]" % (",".join(comms) or "?", ",".join(str(p) for p in pids))


def row(verdict: Verdict, outcome: Optional[Outcome] = None, owners: Optional[Owners] = None) -> Dict:
    """The same object as a dict (event log, table)."""
    return json.loads(json_line(verdict, outcome, owners))


def _ms(ms: Optional[float]) -> str:
    return "-" if ms is None else ("%.3f" % ms if ms < 10 else "%.0f" % ms)


def endpoint(addr: str, port: int) -> str:
    return "[%s]:%d" % (addr, port) if ":" in addr else "%s:%d" % (addr, port)


def show(items: Sequence, as_json: bool, owners: Optional[Owners] = None, out: TextIO = None,
         header_shown: Optional[list] = None) -> Optional[list]:
    """Write connections -- Verdicts (audit) or Outcomes (kill) -- as JSON Lines or a table.

    Returns the table's header.  A kill reports batch by batch: given the
    header shown for the batch before (`header_shown`), a table with the
    same columns continues without printing it again.
    """
    out = out or sinks.stdout()  # a broken stdout drops rows, never the rest (sinks)
    if as_json:
        acted = bool(items) and isinstance(items[0], Outcome)
        lines = [json_line(i.verdict, i) if acted else json_line(i, None, owners) for i in items]
        if lines:
            out.write("\n".join(lines))
            out.write("\n")
        out.flush()
        return header_shown
    return write_table([row(i.verdict, i) if isinstance(i, Outcome) else row(i, None, owners)
                        for i in items], out, header_shown)


def write_table(rows: Sequence[Dict], out: TextIO, header_shown: Optional[list] = None) -> Optional[list]:
    """An aligned table of row() dicts; its header unless it equals `header_shown`.  Returns the header."""
    if not rows:
        return header_shown
    with_action = "action" in rows[0]
    with_netns = any(r["netns"] is not None for r in rows)
    with_middlebox = any(r.get("middlebox") is not None for r in rows)
    header = (["NETNS"] if with_netns else []) + [
        "STATE", "LOCAL", "PEER", "IDLE_MS", "SOURCE", "VERDICT",
    ] + (["MIDDLEBOX"] if with_middlebox else []) + ["OWNER", "COOKIE"] + (
        ["ACTION"] if with_action else [])
    table = [header]
    for r in rows:
        owner = owners_text(r["pids"], r["comms"])
        line = ([str(r["netns"] or "-")] if with_netns else []) + [
            r["state"], endpoint(r["src"], r["sport"]), endpoint(r["dst"], r["dport"]),
            _ms(r["idle_ms"]), r["idle_source"] or "-", r.get("verdict") or "-",
        ] + ([r["middlebox"] or "-"] if with_middlebox else []) + [
            owner, str(r["cookie"]),
        ]
        if with_action:
            line.append(r["action"] + (" (%s)" % r["error"] if r["error"] else ""))
        table.append([printable(cell) for cell in line])  # owners' text (safetext)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    numeric = {header.index("IDLE_MS"), header.index("COOKIE")}
    for line in table[1:] if header == header_shown else table:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.write("  ".join(cells).rstrip() + "\n")
    out.flush()
    return header


def show_groups(groups: Sequence, as_json: bool, out: TextIO = None) -> None:
    """One line per group (groups.Count): its key, total, and a count per column."""
    out = out or sys.stdout
    if as_json:
        for g in groups:
            out.write(_dumps({"by": g.by, "group": g.key, "pids": list(g.pids), "comms": list(g.comms),
                              "total": g.total, "counts": g.counts}) + "\n")
        out.flush()
        return
    if not groups:
        return
    columns = list(groups[0].counts)
    table = [[groups[0].by.upper(), "TOTAL"] + [c.upper() for c in columns]]
    for g in groups:
        table.append([g.key, str(g.total)] + [str(g.counts.get(c, 0)) for c in columns])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        cells = [cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)]
        out.write("  ".join(cells).rstrip() + "\n")
    out.flush()


# --------------------------------------------------------------------------
# audit's pass (kill's are reported batch by batch: passes.run_pass)


def audit_pass(scan, as_json: bool, elapsed_ms: float, min_idle_ms: float,
               evidence_note: str, shown: Optional[Sequence[Verdict]] = None,
               by: Optional[str] = None, box=None) -> None:
    """audit's output of an engine.Scan: `shown` (default: the victims, every match with
    --min-idle 0), idlest first -- one line per group with `by`; with a middlebox `box`,
    each owner's connections together and a line per owner on stderr; the summary."""
    from . import groups, middlebox

    shown = sorted(scan.victims if shown is None else shown,
                   key=lambda v: (v.idle_ms is None, -(v.idle_ms or 0.0)))
    if by is not None:
        show_groups(groups.count(shown, by, scan.owners), as_json)
    elif box is not None:
        exposed = groups.count(shown, "owner", scan.owners, label=lambda v: v.exposure,
                               columns=(middlebox.PAST, middlebox.AT_RISK))
        order = {g.key: i for i, g in enumerate(exposed)}
        shown.sort(key=lambda v: (order[groups.key(v, "owner", scan.owners)[1]],
                                  v.exposure != middlebox.PAST))
        show(shown, as_json, owners=scan.owners)
        for g in exposed:
            note("middlebox %s: %s: %d past the timeout, %d at risk" % (
                box.name, g.key, g.counts[middlebox.PAST], g.counts[middlebox.AT_RISK]))
    else:
        show(shown, as_json, owners=scan.owners)
    summary_audit(scan.verdicts, len(shown), scan.seen, elapsed_ms, min_idle_ms, evidence_note)


# --------------------------------------------------------------------------
# the event log (track --event-log)


class EventLog:
    """--event-log: one JSON line per victim acted on, appended and flushed.

    Each line is row() of the outcome (the keys of the JSON output)
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
            obj.update(row(outcome.verdict, outcome))
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
    from datetime import datetime, timezone  # the tracker's event log alone

    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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


# How the summary names the re-check's reasons (engine.Spare.kind).
SPARED_TEXT = {"received-data": "data received after the scan",
               "left-selection": "left the selection", "not-rechecked": "not asked about again",
               "verdict-changed": "verdict changed since the scan"}


def summary_kill(outcomes: Sequence[Outcome], matched: int, victims: int, elapsed_ms: float,
                 dry_run: bool, prefix: str = "kill", spared=0, cut: Optional[str] = None,
                 left: int = 0, victims_are: str = "idle") -> None:
    """The one-line summary of a pass.  `spared`: a count (of victims that received
    data) or one Spare.kind per victim spared; `cut`: why the pass ended early,
    with `left` victims not acted on; `victims_are` what made them victims."""
    counts = Counter(o.action for o in outcomes)
    parts = ", ".join("%d %s" % (n, a) for a, n in sorted(counts.items()))
    kinds = Counter({"received-data": spared} if isinstance(spared, int) else spared)
    kinds = +kinds  # drop zero counts
    if kinds:
        parts += "%s%d spared (%s)" % (", " if parts else "", sum(kinds.values()), ", ".join(
            SPARED_TEXT.get(k, k) if len(kinds) == 1 else "%d %s" % (n, SPARED_TEXT.get(k, k))
            for k, n in sorted(kinds.items())))
    parts = parts or "nothing to do"
    text = "%s%s: %s; %d %s of %d matched; %.0f ms" % (
        prefix, " (dry run)" if dry_run else "", parts, victims, victims_are, matched, elapsed_ms)
    if cut:
        text += "; %s, %d not acted on" % (cut, left)
    _err(text)


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


def histograms(grouped: Sequence, by: Optional[str], as_json: bool, out: TextIO = None) -> None:
    """audit --hist: a log2 histogram of idle times (ms) per group, or JSON Lines, one per group.

    `grouped` is tcpidle.groups.group()'s [(label, verdicts)].  Connections
    whose idle time is unknown are not in the histogram; their number is said.
    """
    from . import histogram

    out = out or sinks.stdout()
    unknown_total = 0
    for n, (label, verdicts) in enumerate(grouped):
        known = [v.idle_ms for v in verdicts if v.idle_ms is not None]
        unknown = len(verdicts) - len(known)
        unknown_total += unknown
        counts = histogram.log2_counts(known)
        if as_json:
            out.write(json.dumps({"by": by, "group": label, "count": len(known), "unknown": unknown,
                                  "unit": "ms", "buckets": histogram.buckets(counts)}) + "\n")
            continue
        if by is not None:
            out.write("%s%s = %s\n" % ("\n" if n else "", by, label))
        for line in histogram.format_log2(counts, "msecs") or ["     (no connection with a known idle time)"]:
            out.write(line + "\n")
    out.flush()
    if unknown_total:
        note("%d connection%s with unknown idle time (TIME_WAIT, listeners) not in the histogram"
             % (unknown_total, "" if unknown_total == 1 else "s"))


def lines(rows: Sequence[str], out: TextIO = None) -> None:
    """Lines of text on stdout (doctor's table or JSON Lines)."""
    out = out or sinks.stdout()
    for row in rows:
        out.write(row + "\n")
    out.flush()


def note(text: str) -> None:
    """A one-line remark for the user on stderr (not a log record)."""
    _err(text)


def error(text: str) -> None:
    _err("error: " + text)


def _err(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")  # clear a progress line
    sinks.write_stderr("tcpidle: %s\n" % printable(text))


def set_stdout_line_buffered() -> None:
    """Polling modes write rows as they happen; keep them flowing to pipes."""
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):  # pragma: no cover
        os.environ.setdefault("PYTHONUNBUFFERED", "1")


# --------------------------------------------------------------------------
# tcpidle explain: one connection


_TIMERS = {0: "none", 1: "retransmit", 2: "keepalive", 3: "time-wait", 4: "zero-window-probe"}


def explanation_object(e) -> Dict:
    """`tcpidle explain --json`'s object (explain.Explanation): the audit row's keys, then
    the rule, the owners' descriptors, every evidence field and what a kill would do."""
    from . import health

    v = e.verdict
    s = v.socket
    obj = row(v, None, {s.inode: e.owners})
    h = v.health
    obj["verdict_rule"] = h.rule if h is not None else None
    obj["verdict_rule_text"] = health.RULES[h.rule][1] if h is not None and h.rule in health.RULES \
        else None
    obj["window_ms"] = e.window_ms
    obj["owners"] = [{"pid": o.pid, "fd": o.fd, "comm": o.comm, "cgroup": o.cgroup}
                     for o in e.holders]
    obj["owners_unreadable"] = e.unreadable
    vit = s.vitals
    obj["inet_diag"] = None if vit is None else {
        "timer": _TIMERS.get(vit.timer, str(vit.timer)), "timer_expires_ms": vit.timer_expires_ms,
        "timer_retrans": vit.timer_retrans, "recv_q": vit.recv_q, "send_q": vit.send_q}
    has_info = s.last_data_recv_ms is not None or (vit is not None and vit.unacked is not None)
    obj["tcp_info"] = None if not has_info else {
        "last_data_recv_ms": s.last_data_recv_ms, "last_ack_recv_ms": s.last_ack_recv_ms,
        "last_data_sent_ms": s.last_data_sent_ms,
        **({k: None for k in _INFO_FIELDS} if vit is None else
           {k: getattr(vit, f) for k, f in _INFO_FIELDS.items()})}
    obj["probe"] = e.probe_ages()
    obj["evidence_source"] = e.evidence
    flow = e.flow_idle_ms
    obj["flow_idle_ms"] = None if flow is None else round(flow, 3)
    obj["peer_cookie"] = e.peer.cookie if e.peer is not None else None
    action, by = e.decision
    obj["kill"] = {
        "action": action, "by": by.name if by is not None else None,
        "reason": _kill_reason(e), "clauses": [{"clause": c.name, "holds": c.holds, "text": c.text}
                                               for c in e.clauses]}
    return obj


# The rules that compare times with the window (health.RULES): their reason shows it.
_CLOCK_RULES = ("active", "quiet", "no-evidence")

_INFO_FIELDS = {"unacked": "unacked", "retransmits": "retransmits", "total_retrans": "total_retrans",
                "backoff": "backoff", "probes": "probes", "snd_wnd": "snd_wnd"}


def _kill_reason(e) -> str:
    action, by = e.decision
    if action == "spared":
        return "spared by %s: %s" % (_clause_name(by.name), by.text)
    return ("would be destroyed (cookie-checked SOCK_DESTROY; asked about again right before: "
            "one that received data or left the selection meanwhile is spared)")


def _clause_name(name: str) -> str:
    """How the human output names a clause: by its option where it has one."""
    return {"selector": "the selector guard", "family": "-4/-6", "idle-time": "-t",
            "protected": "the protected list"}.get(name, "--" + name)


def explanation(e, as_json: bool, out: TextIO = None) -> None:
    """`tcpidle explain`: one JSON object, or the facts in labelled lines."""
    out = out or sinks.stdout()
    if as_json:
        out.write(_dumps(explanation_object(e)) + "\n")
        out.flush()
        return
    o = explanation_object(e)
    rows = [("cookie", "%d  (inode %d, uid %d)" % (o["cookie"], o["inode"], o["uid"])),
            ("connection", "%s %s %s -> %s" % (o["family"], o["state"], endpoint(o["src"], o["sport"]),
                                               endpoint(o["dst"], o["dport"]))),
            ("netns", "this one" if o["netns"] is None else str(o["netns"]))]
    if o["owners"]:
        for i, h in enumerate(o["owners"]):
            rows.append(("owners" if i == 0 else "", "%s[%d] fd %d%s" % (
                h["comm"] or "?", h["pid"], h["fd"], "  cgroup %s" % h["cgroup"] if h["cgroup"] else "")))
    else:
        rows.append(("owners", "none readable (%d processes could not be read: run as root)"
                     % o["owners_unreadable"] if o["owners_unreadable"] else
                     "no process holds it" if o["inode"] == 0 else "none found"))
    if o["peer_cookie"] is not None:
        rows.append(("peer", "cookie %d is the other end, in the same namespace" % o["peer_cookie"]))
    rows.append(("idle", "%s since data was received (%s)%s" % (
        _dur_text(o["idle_ms"]), o["idle_source"] or "no source",
        "; %s since any segment (bpf)" % _dur_text(o["last_rx_ms"]) if o["last_rx_ms"] is not None
        else "")))
    info = o["tcp_info"]
    if info is None:
        rows.append(("tcp_info", "none (the kernel sends none in this state)"))
    else:
        rows.append(("tcp_info", "last data received %s ago, last ACK received %s ago, last data "
                     "sent %s ago" % tuple(_dur_text(info[k]) for k in (
                         "last_data_recv_ms", "last_ack_recv_ms", "last_data_sent_ms"))))
        rows.append(("", "unacked %s, retransmits %s (total %s), backoff %s, probes %s, peer's "
                     "window %s" % tuple("-" if info[k] is None else str(info[k]) for k in (
                         "unacked", "retransmits", "total_retrans", "backoff", "probes",
                         "snd_wnd"))))
    diag = o["inet_diag"]
    if diag is not None:
        rows.append(("timer", diag["timer"] if diag["timer"] == "none" else
                     "%s, fires in %s, %d out" % (diag["timer"], _dur_text(diag["timer_expires_ms"]),
                                                 diag["timer_retrans"])))
        rows.append(("queues", "send %d bytes (not acknowledged), receive %d bytes (not read)"
                     % (diag["send_q"], diag["recv_q"])))
    p = o["probe"]
    rows.append(("probe", o["evidence_source"] if p is None else
                 "%d segments (%d with data, %d bytes), last segment %s ago, last data %s ago; %s" % (
                     p["segments"], p["data_segments"], p["bytes"], _dur_text(p["last_segment_ms"]),
                     _dur_text(p["last_data_ms"]), o["evidence_source"])))
    rows.append(("verdict", "%s (rule %s: %s)" % (o["verdict"], o["verdict_rule"],
                                                 o["verdict_rule_text"])))
    rows.append(("", o["verdict_reason"] + (" (window %s)" % _dur_text(o["window_ms"])
                                            if o["verdict_rule"] in _CLOCK_RULES else "")))
    if o["middlebox"] is not None:
        rows.append(("middlebox", "%s (flow idle %s)" % (o["middlebox"], _dur_text(o["flow_idle_ms"]))))
    rows.append(("kill", o["kill"]["reason"]))
    for c in o["kill"]["clauses"]:
        rows.append(("", "%s %-10s %s" % ("yes" if c["holds"] else "NO ", c["clause"], c["text"])))
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        out.write(printable(("%-*s  %s" % (width, label, text)).rstrip()) + "\n")
    out.flush()


def _dur_text(ms: Optional[float]) -> str:
    from .health import duration

    return "unknown" if ms is None else duration(ms)
