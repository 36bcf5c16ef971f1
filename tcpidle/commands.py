"""The use cases: audit, kill, kill -i, keepalive, track and track --cleanup, each wired once.

Each command takes the parsed options, checks what click cannot (exit 2,
nothing touched), builds its objects once -- the `Selector` and `Policy`,
the `Scope` (namespaces, and how a DiagSocket is opened in each:
`open_diag`, the one injection point for tests), the `Evidence`, the
`Engine` -- runs its pass or its loop, hands what happened to `report`,
and returns the exit status.  Nothing is changed after it is built.

One pass reads top-down: command -> scope and selection -> dump -> decide
-> act -> outcomes -> report.
"""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from typing import Optional

from . import evidence, groups, health, middlebox, netns, privilege, report, selectors
from .engine import LEFT_SELECTION_OTHER, RECEIVED, Engine, Spare
from .errors import PrivilegeError, RuntimeFailure, UsageError
from .model import AF_INET, AF_INET6, DEFAULT_MAP_SIZE, DEFAULT_PIN_DIR, Keepalive, Policy, Selector
from .scope import OpenDiag, Scope, open_diag

# ---------------------------------------------------------------------------
# from options to records


def build_selector(opts) -> Selector:
    """The Selector of the parsed selector options; UsageError on bad values."""
    families = set()
    if opts["ipv4"]:
        families.add(AF_INET)
    if opts["ipv6"]:
        families.add(AF_INET6)
    return Selector(
        families=frozenset(families or {AF_INET, AF_INET6}),
        states=selectors.parse_states(opts["states"]),
        sports=selectors.parse_ports(opts["sports"], "--sport"),
        dports=selectors.parse_ports(opts["dports"], "--dport"),
        src=selectors.parse_networks(opts["srcs"], "--src"),
        dst=selectors.parse_networks(opts["dsts"], "--dst"),
        pids=frozenset(opts["pids"]),
        comms=frozenset(opts["comms"]),
        cgroups=tuple(opts["cgroups"]),
        uids=frozenset(opts["uids"]),
    )


def build_namespaces(opts) -> Optional[netns.Watch]:
    """The namespaces to visit, listed again at every scan: None for our own only."""
    if opts["all_netns"] and opts["netns_specs"]:
        raise UsageError("--netns and --all-netns exclude each other")
    if opts["all_netns"]:
        return netns.Watch(None, log=report.log)
    if opts["netns_specs"]:
        return netns.Watch(opts["netns_specs"], log=report.log)
    return None


def build_policy(opts, idle_time: float, **extra) -> Policy:
    """The Policy: the idle threshold, and the health window, verdict filter and middlebox."""
    window = opts["active_within"]
    if window is None or window <= 0:
        window = idle_time if idle_time > 0 else health.DEFAULT_WINDOW_MS
    verdicts = health.parse_verdicts(opts["verdicts"]) if opts["verdicts"] is not None else None
    box = (middlebox.parse(opts["middlebox"], opts["risk_fraction"])
           if opts["middlebox"] is not None else None)
    return Policy(idle_time_ms=idle_time, idle_metric=opts["idle_metric"],
                  last_recv_limit_ms=opts["last_recv_limit"], window_ms=window, verdicts=verdicts,
                  middlebox=box, **extra)


def audit_shown(scan, policy: Policy, min_idle: float):
    """What audit shows: every match, or the victims of --min-idle / --verdict; with
    --middlebox, the connections past its timeout or at risk (within those filters)."""
    if policy.middlebox is None:
        return scan.victims
    return [v for v in scan.verdicts if v.exposure in (middlebox.PAST, middlebox.AT_RISK)
            and (policy.verdicts is None or v.health.verdict in policy.verdicts)
            and (min_idle <= 0 or (v.idle_ms is not None and v.idle_ms >= min_idle))]


def require_privilege(what: str) -> None:
    """Refuse early, with one line, when CAP_NET_ADMIN is missing."""
    if not privilege.has_cap_net_admin():
        raise PrivilegeError("%s needs CAP_NET_ADMIN: run as root" % what)


def _require_narrowing(selector: Selector, all_: bool, what: str) -> None:
    if not selectors.narrows(selector) and not all_:
        raise UsageError("%s needs a port, address or owner selector (-s, -d, --src, --dst, --pid, "
                         "--comm, --cgroup, --uid) or --all" % what)


def _evidence(opts, watch: Optional[float] = None, map_size: Optional[int] = None,
              prime=None) -> evidence.Evidence:
    """The evidence for this run, its choice said with -v."""
    found = evidence.choose(opts["pin_dir"], watch, map_size or DEFAULT_MAP_SIZE,
                            opts["require_bpf"], progress=report.progress if watch else None,
                            prime=prime)
    report.log.info("%s", found.description)
    return found


# ---------------------------------------------------------------------------
# the commands


def audit(min_idle: float, watch: Optional[float], map_size: int, open_diag: OpenDiag = open_diag,
          hist: bool = False, by: Optional[str] = None, **opts) -> int:
    """Report matching connections and their idle time (or their histogram, or counts per
    group and verdict); never kills."""
    selector = build_selector(opts)
    namespaces = build_namespaces(opts)
    policy = build_policy(opts, min_idle)
    report.setup_logging(opts["verbose"], None, syslog=False)
    if opts["processes"] and not privilege.is_root():
        report.note("not root: owners are shown only for your own processes")
    scope = Scope(selector, namespaces, open_diag)
    seen = _evidence(opts, watch, map_size, prime=scope.prime_cookies)
    seen.bind_scope(scope)
    try:
        engine = Engine(scope, policy, seen, want_owners=opts["processes"] or by == "owner")
        started = time.monotonic()
        scan = engine.survey(lambda sc: audit_shown(sc, policy, min_idle),
                             owners_needed=by == "owner" or policy.middlebox is not None)
        stats = seen.stats()
        if stats is not None:
            report.probe_stats(stats)
    finally:
        seen.close()
    scan.close()
    elapsed_ms = (time.monotonic() - started) * 1000
    if hist:
        report.histograms(groups.group(audit_shown(scan, policy, min_idle), by, scan.owners), by,
                          opts["as_json"])
        report.summary_audit(scan.verdicts, len(scan.victims), scan.seen, elapsed_ms, min_idle,
                             seen.description)
    else:
        report.audit_pass(scan, opts["as_json"], elapsed_ms, min_idle, seen.description,
                          shown=audit_shown(scan, policy, min_idle), by=by, box=policy.middlebox)
    return 0


def kill(idle_time: float, dry_run: bool, use_proc: bool, proc_action: str, logfile: Optional[str],
         disable_syslog: bool, all_: bool, interval: Optional[float],
         open_diag: OpenDiag = open_diag, destroy_with: str = "auto", **opts) -> int:
    """Destroy matching connections idle for at least idle_time, once or every interval."""
    backend = destroy_backend(use_proc, destroy_with)
    use_proc = backend == "proc"
    selector = build_selector(opts)
    namespaces = build_namespaces(opts)
    _require_narrowing(selector, all_, "kill")
    policy = build_policy(opts, idle_time, dry_run=dry_run, use_proc=use_proc, proc_action=proc_action,
                          destroy_with=backend)
    if not dry_run:
        require_privilege("kill")
    report.setup_logging(opts["verbose"], logfile, syslog=not disable_syslog)
    if destroy_with == "bpf":
        _require_bpf_destroy()
        if interval is None and policy.verdicts is None and policy.middlebox is None:
            return _kill_in_kernel(selector, namespaces, policy, opts)
        # Polls, and health verdicts (decided in user space): the engine's pass,
        # each batch's victims destroyed by the iterator (decided again there).
    if opts["verbose"]:
        report.log.info("destroy: %s", _destroy_note(policy.destroy_with))
    seen = _evidence(opts)
    engine = None
    try:
        scope = Scope(selector, namespaces, open_diag)
        seen.bind_scope(scope)
        engine = Engine(scope, policy, seen, want_owners=opts["processes"])
        if interval is None:
            status = _kill_once(engine, opts["as_json"])
            stats = seen.stats()  # the map's health, as audit says it (evictions: a warning)
            if stats is not None:
                report.probe_stats(stats)
            return status
        return _poll(engine, interval, opts["as_json"], seen)
    finally:
        if engine is not None:
            engine.close()
        seen.close()


def keepalive(idle_time: float, idle_s: int, interval_s: int, count: int, dry_run: bool,
              exclude_ports, exclude_cidrs, logfile: Optional[str], disable_syslog: bool,
              all_: bool, open_diag: OpenDiag = open_diag, **opts) -> int:
    """Arm keep-alive in the matching connections that have none (tcpidle.retrofit), once.

    kill's pass with another action: the same selection, protected list,
    threshold, re-check, batches, outputs and exit statuses.  No
    CAP_NET_ADMIN needed: what it takes is ptrace access to the owners,
    and a refusal is said per owner (exit 1).
    """
    selector = _protected(build_selector(opts), exclude_ports, exclude_cidrs)
    namespaces = build_namespaces(opts)
    _require_narrowing(selector, all_, "keepalive")
    policy = build_policy(opts, idle_time, dry_run=dry_run,
                          keepalive=Keepalive(idle_s, interval_s, count))
    report.setup_logging(opts["verbose"], logfile, syslog=not disable_syslog)
    report.log.info("keep-alive: idle %d s, a probe every %d s, %d unanswered abort the "
                    "connection (within %d s)", idle_s, interval_s, count,
                    idle_s + interval_s * count)
    _warn_if_late(policy)
    seen = _evidence(opts)
    try:
        scope = Scope(selector, namespaces, open_diag)
        seen.bind_scope(scope)
        return _kill_once(Engine(scope, policy, seen, want_owners=opts["processes"]),
                          opts["as_json"], "keepalive")
    finally:
        seen.close()


def _protected(selector: Selector, exclude_ports, exclude_cidrs) -> Selector:
    """The selector with its protected list (--exclude-port, --exclude-cidr)."""
    return replace(
        selector,
        exclude_ports=selectors.parse_ports(exclude_ports, "--exclude-port"),
        exclude_nets=selectors.parse_networks(exclude_cidrs, "--exclude-cidr"),
    )


def _warn_if_late(policy: Policy) -> None:
    """A keep-alive whose first probe comes after the middlebox's timeout cannot keep the
    flow open there: said once (the retrofit still finds dead peers)."""
    box, ka = policy.middlebox, policy.keepalive
    if box is not None and ka is not None and ka.idle_s * 1000.0 >= box.timeout_ms:
        report.log.warning("keep-alive idle %d s is not shorter than the middlebox's %g s "
                           "timeout: its probes come too late to keep flows open there",
                           ka.idle_s, box.timeout_ms / 1000.0)


def destroy_backend(use_proc: bool, destroy_with: str) -> str:
    """The destroy backend --use-proc and --destroy-with ask for together: auto,
    netlink, bpf or proc; a usage error when they disagree."""
    if use_proc and destroy_with not in ("auto", "proc"):
        raise UsageError("--use-proc and --destroy-with %s exclude each other" % destroy_with)
    return "proc" if use_proc else destroy_with


def _require_bpf_destroy() -> None:
    """--destroy-with bpf on a kernel that cannot: exit 1, said plainly, before anything."""
    from . import kdestroy

    reason = kdestroy.unavailable()
    if reason is not None:
        raise RuntimeFailure("--destroy-with bpf: %s" % reason)


def _destroy_note(destroy_with: str) -> str:
    """What -v says about the destroy backend of an engine's run."""
    from . import kdestroy

    if destroy_with == "bpf":
        return ("the BPF TCP iterator + bpf_sock_destroy, given each batch's victims by cookie "
                "(decided in user space, re-checked, then decided again and destroyed in the "
                "kernel under each socket's lock)")
    reason = kdestroy.unavailable()
    bpf = "available" if reason is None else "unavailable: %s" % reason
    if destroy_with == "proc":
        return "the /proc fallback (--use-proc); the BPF iterator (--destroy-with bpf): %s" % bpf
    first = "netlink SOCK_DESTROY, cookie-checked, re-checked before each batch"
    if destroy_with == "netlink":
        return "%s (--destroy-with netlink: nothing else if the kernel answers EOPNOTSUPP); " \
               "the BPF iterator (--destroy-with bpf): %s" % (first, bpf)
    if reason is None:
        # Why netlink goes first in auto although the iterator is here: the
        # measurements are in the README ("Which backend auto uses").
        return "%s (first: no program to load, faster unless thousands are destroyed at " \
               "once, and its rows carry the evidence of health; --destroy-with bpf decides " \
               "in the kernel under each socket's lock); if the kernel answers EOPNOTSUPP, " \
               "the BPF iterator (available here), then /proc" % first
    return "%s; if the kernel answers EOPNOTSUPP, the /proc fallback (the BPF iterator is " \
           "unavailable: %s)" % (first, reason)


def _kill_in_kernel(selector: Selector, namespaces, policy: Policy, opts) -> int:
    """kill --destroy-with bpf: one iterator pass per namespace, decided and destroyed in
    the kernel under each socket's lock; reported as a netlink pass is."""
    from . import kdestroy
    from .probe import ProbeUnavailable

    started = time.monotonic()
    owner_inodes = None
    if selectors.needs_owners(selector):
        from . import owners  # the /proc walk: owner selectors and -p alone

        found = owners.owners_by_inode()
        owner_inodes = [ino for ino, holders in found.items()
                        if selectors.owned_by(selector, owners.summarize(holders))]
    # the tracker's per-socket storage, where it is pinned: the pass reads its records
    seen = _evidence(opts)
    try:
        storage = kdestroy.storage_fd_of(seen)
        if seen.present and storage is None:
            text = ("the BPF iterator reads the probe's per-socket storage only, not its map by "
                    "cookie: idle from the sockets' own stamps (jiffies)")
            if opts["require_bpf"]:
                raise RuntimeFailure("--destroy-with bpf: %s; --require-bpf given" % text)
            report.log.warning("%s", text)
        done = kdestroy.run(Scope(selector, namespaces), policy, owner_inodes, storage)
    except ProbeUnavailable as e:
        raise RuntimeFailure("--destroy-with bpf: %s" % e) from None
    finally:
        seen.close()
    report.log.info("destroy: in the kernel (BPF TCP iterator + bpf_sock_destroy, no re-check "
                    "needed): %s", ", ".join("%s %.0f ms" % ("own namespace" if k is None else k, v)
                                             for k, v in done.ms_by_namespace.items()))
    outcomes = done.outcomes
    if opts["processes"] or owner_inodes is not None:
        from . import owners

        held = owners.summaries_by_inode(o.verdict.socket.inode for o in outcomes
                                         if o.verdict.socket.inode)
        outcomes = [replace(o, pids=s.pids, comms=s.comms, cgroups=s.cgroups) if s else o
                    for o, s in ((o, held.get(o.verdict.socket.inode)) for o in outcomes)]
    if done.capped:
        report.log.warning("%d more idle connections over the kill cap were left alone",
                           done.capped)
    spared = [Spare(v, RECEIVED + " (between the kill cap's two passes)" if what == "spared"
                    else LEFT_SELECTION_OTHER) for v, what in done.spared]
    report.log_batch(outcomes, spared)
    report.show(outcomes, opts["as_json"])
    report.summary_kill(outcomes, done.matched, len(outcomes) + done.capped + len(spared),
                        (time.monotonic() - started) * 1000.0, policy.dry_run,
                        spared=[s.kind for s in spared])
    for text in done.missing:
        report.error(text)
    return 1 if done.missing or done.untold_failures or any(o.action == "failed" for o in outcomes) \
        else 0


def _kill_once(engine: Engine, as_json: bool, name: str = "kill") -> int:
    """One pass; its exit status.  SIGTERM/SIGINT during it stop it between two
    destroy batches: what was done is reported, and the status is 128 + the
    signal's number.  A namespace named with --netns that is gone fails the run."""
    from .passes import run_pass  # kill's alone, like the signals it stops on
    from .signals import StopOnSignal

    with StopOnSignal() as stopped:
        done = run_pass(engine, as_json, name, stop=stopped)
    if stopped.signum:
        report.error("interrupted by %s: %d connections acted on, %d not"
                     % (signal.Signals(stopped.signum).name, len(done.outcomes), done.interrupted))
        return 128 + stopped.signum
    for text in done.scan.missing:
        report.error(text)
    return 1 if done.scan.missing or any(o.action == "failed" for o in done.outcomes) else 0


def _poll(engine: Engine, interval: float, as_json: bool, seen: evidence.Evidence) -> int:
    """kill -i: the tracker's loop without a probe of its own (the evidence,
    for the map's evictions, said each interval they grow); 0 on SIGINT/SIGTERM."""
    from .polling import Poller

    poller = Poller(engine, interval, evidence=seen, as_json=as_json, name="kill")
    restore = poller.install_signals()
    report.set_stdout_line_buffered()
    report.note("polling every %g s; SIGINT or SIGTERM stops" % interval)
    try:
        poller.run()
    finally:
        poller.close()
        restore()
    report.note("stopped after %d polls" % poller.polls)
    return 0


def track(idle_time: float, dry_run: bool, use_proc: bool, proc_action: str, logfile: Optional[str],
          disable_syslog: bool, all_: bool, interval: float, map_size: int, bpf_hook: str,
          max_kills_per_interval: int, exclude_ports, exclude_cidrs, event_log: Optional[str],
          metrics_port: Optional[int], metrics_addr: str, cleanup: bool,
          open_diag: OpenDiag = open_diag, cache_dir: Optional[str] = None,
          keepalive: Optional[Keepalive] = None, destroy_with: str = "auto", **opts) -> int:
    """The daemon: the probe attached with its maps pinned, a kill pass every interval.

    Runs until SIGTERM/SIGINT and returns 0.  Fatal errors (usage,
    privilege, an unusable pin directory, a metrics port that cannot be
    bound) raise before or instead of the loop; the probe is detached and
    its pins kept on every way out.
    """
    from .polling import LoopControl, Poller

    if cleanup:
        return clean_pins(opts["pin_dir"])
    if keepalive is not None and use_proc:
        raise UsageError("--keepalive and --use-proc exclude each other (keep-alive is armed "
                         "instead of killing)")
    if keepalive is not None and destroy_with != "auto":
        raise UsageError("--keepalive and --destroy-with %s exclude each other (keep-alive is "
                         "armed instead of killing)" % destroy_with)
    backend = destroy_backend(use_proc, destroy_with)
    use_proc = backend == "proc"
    selector = _protected(build_selector(opts), exclude_ports, exclude_cidrs)
    namespaces = build_namespaces(opts)
    _require_narrowing(selector, all_, "track")
    policy = build_policy(opts, idle_time, dry_run=dry_run, use_proc=use_proc, proc_action=proc_action,
                          max_kills=max_kills_per_interval or None, keepalive=keepalive,
                          destroy_with=backend)
    _warn_if_late(policy)
    report.setup_logging(opts["verbose"], logfile, syslog=not disable_syslog)
    if destroy_with == "bpf":
        _require_bpf_destroy()
    if opts["verbose"] and keepalive is None:
        report.log.info("destroy: %s", _destroy_note(policy.destroy_with))
    if not policy.dry_run:
        require_privilege("track")
    scope = Scope(selector, namespaces, open_diag)
    events = report.EventLog(event_log) if event_log else None
    metrics = None
    seen = None
    engine = None
    signals = LoopControl()  # before the slow start: a SIGTERM meanwhile stops the loop at once
    restore = signals.install()
    report.set_stdout_line_buffered()
    try:
        if metrics_port is not None:
            from .metrics import Metrics  # prometheus_client: the daemon's alone

            metrics = Metrics()
            try:
                metrics.serve(metrics_port, metrics_addr)
            except OSError as e:
                raise RuntimeFailure("metrics: cannot listen on %s port %d: %s" % (
                    metrics_addr, metrics_port, e.strerror or e)) from None
            metrics.observe_probe(None)
        seen = evidence.attach_tracker(opts["pin_dir"], map_size, bpf_hook, opts["require_bpf"],
                                       cache_dir, selector=selector)
        seen.bind_scope(scope)
        if metrics is not None and seen.reader is not None:
            metrics.observe_probe_kind(seen.reader.hook, seen.reader.storage)
        engine = Engine(scope, policy, seen, want_owners=opts["processes"])
        poller = Poller(engine, interval, signals, evidence=seen,
                        events=events, metrics=metrics, as_json=opts["as_json"])
        report.note(seen.description)
        report.note("polling every %g s: idle >= %g ms%s%s%s; SIGTERM or SIGINT stops, "
                    "SIGHUP reopens logs" % (
                        interval, policy.idle_time_ms,
                        ", arming keep-alive (idle %d s, interval %d s, %d probes) instead of "
                        "killing" % keepalive if keepalive is not None else "",
                        ", at most %d kills per interval" % policy.max_kills
                        if policy.max_kills is not None else "",
                        " (dry run)" if policy.dry_run else ""))
        if metrics is not None:
            report.note("metrics on http://%s:%d/metrics" % (_url_host(metrics_addr), metrics_port))
        poller.run()
        report.note("stopped after %d polls (%d acted on, %d failed polls)%s" % (
            poller.polls, poller.acted, poller.errors,
            ("; the BPF probe records on, pinned in %s (`tcpidle track --cleanup` stops it)"
             if seen.detached else "; BPF maps kept in %s") % opts["pin_dir"]
            if seen.present and opts["pin_dir"] else ""))
        return 0
    finally:
        if engine is not None:
            engine.close()  # the BPF iterator, where one was loaded
        if seen is not None:
            seen.close()
        if metrics is not None:
            metrics.close()
        if events is not None:
            events.close()
        signals.close()
        restore()


def clean_pins(pin_dir: str = DEFAULT_PIN_DIR) -> int:
    """track --cleanup: remove the pinned maps (refused while a tracker runs)."""
    from .probe import remove_pins

    removed = remove_pins(pin_dir)
    for path in removed:
        report.note("removed %s" % path)
    if not removed:
        report.note("nothing pinned in %s" % pin_dir)
    return 0


def _url_host(addr: str) -> str:
    return "[%s]" % addr if ":" in addr else addr


def explain(connection: str, idle_time: float, all_: bool, exclude_ports=(), exclude_cidrs=(),
            open_diag: OpenDiag = open_diag, **opts) -> int:
    """Everything known about one connection, and what a kill with these options would do
    to it; 1 when no connection is found (or the target names several), never kills."""
    from . import explain as why
    from . import owners

    target = why.parse_target(connection)
    selector = _protected(build_selector(opts), exclude_ports, exclude_cidrs)
    namespaces = build_namespaces(opts)
    policy = build_policy(opts, idle_time)
    report.setup_logging(opts["verbose"], None, syslog=False)
    scope = Scope(why.search_selector(target), namespaces, open_diag)
    seen = _evidence(opts)
    seen.bind_scope(scope)
    try:
        scan = Engine(scope, policy, seen).find(lambda socks: why.pick(target, socks))
    finally:
        seen.close()
    scan.close()
    for text in scan.missing:
        report.error(text)
    socks = [v.socket for v in scan.verdicts]
    found = why.named(target, socks)
    where = _where(opts)
    if not found:
        report.note("no connection %s %s" % (
            "with cookie %d" % target.cookie if target.cookie is not None else target.text.strip(),
            where))
        return 1
    if len(found) > 1:
        report.note("%s names %d connections %s: %s; give its cookie (or --netns)" % (
            target.text.strip(), len(found), where, ", ".join(
                "cookie %d (%s)" % (s.cookie, "own namespace" if s.netns is None
                                    else "netns %s" % s.netns) for s in found)))
        return 1
    verdict = next(v for v in scan.verdicts if v.socket is found[0])
    sock = verdict.socket
    held = owners.owners_by_inode([sock.inode]) if sock.inode else owners.Owners()
    summary = owners.summarize(held.get(sock.inode))
    activity = scan.records.get(sock.cookie)
    clauses = why.kill_clauses(sock, activity, scan.taken_ns[sock.cookie], policy, selector,
                               summary, all_)
    report.explanation(why.Explanation(
        verdict=verdict, activity=activity, now_ns=scan.taken_ns[sock.cookie], holders=tuple(held.get(sock.inode) or ()),
        unreadable=len(held.unreadable), owners=summary, peer=why.other_end(sock, socks),
        window_ms=policy.window_ms, evidence=seen.description, clauses=clauses,
        decision=why.decision(clauses)), opts["as_json"])
    return 0


def _where(opts) -> str:
    """Where explain looked, in words."""
    if opts["all_netns"]:
        return "in any network namespace"
    if opts["netns_specs"]:
        return "in network namespace %s" % ", ".join(opts["netns_specs"])
    return "in this network namespace (--netns NAME or --all-netns look elsewhere)"


def doctor(netns_specs, pin_dir: str, no_probe: bool, as_json: bool) -> int:
    """What this kernel and caller allow (tcpidle.doctor owns the checks); 0 or 1 with the reason."""
    from . import doctor as doc

    watch = build_namespaces({"all_netns": False, "netns_specs": netns_specs})
    namespaces = watch().found if watch is not None else []
    started = time.monotonic()
    checks = doc.run(namespaces, pin_dir=pin_dir, probe=not no_probe)
    code, reason = doc.decide(checks)
    report.lines(doc.json_lines(checks) if as_json else doc.table(checks))
    report.note("%s (%.1f s)" % (reason, time.monotonic() - started))
    return code
