"""The `tcpidle` command line: flags in, one call to `commands`, exit status out.

Owns the flags (click), their help, and the translation of exceptions into
exit statuses: 2 for bad input (found before anything is touched), 1 for
failures at run time, 0 otherwise.  Every error is one line on stderr,
`tcpidle: error: ...`.  What each command does is in `tcpidle.commands`.
"""

from __future__ import annotations

import gc
import sys

# Importing the command line builds a few thousand classes, functions and
# dicts; meanwhile the cyclic garbage collector ran ~20 times over them (for
# cycles that are never garbage), 2-3 ms of every start.  Off while importing,
# then as it was (main() turns it off for the run anyway).
_gc_was_on = gc.isenabled()
gc.disable()
try:
    from typing import List, Optional

    import click

    from . import commands, groups, options, report, sinks
    from .errors import TcpidleError
    from .model import DEFAULT_MAP_SIZE, DEFAULT_PIN_DIR, MAX_MAP_SIZE
finally:
    if _gc_was_on:
        gc.enable()

EPILOG_SELECTORS = """\b
Ports: `-d 443`, `-d 22,8000-8100`, repeatable. `sport` is the socket's
local port, `dport` the remote one (as tcp_closer).
States: ss's names (established, syn-sent, syn-recv, fin-wait-1,
fin-wait-2, time-wait, close-wait, last-ack, closing, listening, closed)
and groups (all, connected, synchronized). Default: established."""


# ---------------------------------------------------------------------------
# option sets (reusable decorators)


def _options(*options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


selector_options = _options(
    click.option("-4", "--ipv4", "ipv4", is_flag=True, help="IPv4 sockets only."),
    click.option("-6", "--ipv6", "ipv6", is_flag=True, help="IPv6 sockets only."),
    click.option("-s", "--sport", "sports", multiple=True, type=options.Ports(), metavar="PORTS",
                 help="Local port(s): list and ranges, e.g. 22,8000-8100. Repeatable."),
    click.option("-d", "--dport", "dports", multiple=True, type=options.Ports(), metavar="PORTS",
                 help="Remote port(s): list and ranges. Repeatable."),
    click.option("--src", "srcs", multiple=True, type=options.Cidrs(), metavar="CIDR",
                 help="Local address or network. Repeatable."),
    click.option("--dst", "dsts", multiple=True, type=options.Cidrs(), metavar="CIDR",
                 help="Remote address or network. Repeatable."),
    click.option("--state", "states", multiple=True, type=options.States(), metavar="NAME",
                 help="TCP state or group (default established). Repeatable."),
    click.option("--pid", "pids", multiple=True, type=options.integer(1, options.PID_MAX), metavar="PID",
                 help="Only sockets held by this process. Repeatable."),
    click.option("--comm", "comms", multiple=True, type=options.Comm(), metavar="NAME",
                 help="Only sockets held by a process of this name (as in /proc/PID/comm). Repeatable."),
    click.option("--cgroup", "cgroups", multiple=True, type=options.CgroupPrefix(), metavar="PREFIX",
                 help="Only sockets held by a process whose cgroup path starts with PREFIX. Repeatable."),
    click.option("--uid", "uids", multiple=True, type=options.integer(0, options.UID_MAX), metavar="UID",
                 help="Only sockets of this user id. Repeatable."),
    click.option("--netns", "netns_specs", multiple=True, type=options.NetnsSpec(), metavar="NAME|PATH|PID",
                 help="Work in this network namespace: a name under /run/netns, an ns file, or a PID. Repeatable."),
    click.option("--all-netns", is_flag=True,
                 help="Work in every network namespace of the host (/run/netns and /proc/*/ns/net), each once."),
)

verbose_option = click.option("-v", "--verbose", count=True, help="More detail on stderr (-vv: debug).")

# How a connection is judged: its evidence, its verdict, a middlebox (audit, kill, track, explain).
judge_options = _options(
    click.option("--idle-metric", type=click.Choice(["data", "any"]), default="data", show_default=True,
                 help="data: time since payload was received; any: since any segment (ACKs, keep-alives)."),
    click.option("--last-recv-limit", "--last_recv_limit", "last_recv_limit", type=options.milliseconds(),
                 default=None, metavar="MS",
                 help="Treat tcp_info idle times above MS as unknown (tcp_closer's option)."),
    click.option("--pin-dir", default=DEFAULT_PIN_DIR, type=options.PinDir(), show_default=True,
                 metavar="DIR",
                 help="Where a running `tcpidle track` pins its BPF map; read when present."),
    click.option("--require-bpf", is_flag=True,
                 help="Fail (exit 1) rather than fall back to tcp_info when no BPF evidence is available."),
    click.option("--verdict", "verdicts", type=options.Verdicts(), default=None, metavar="LIST",
                 help="Only connections with these verdicts: active, quiet, dead, zero-window, "
                      "close-wait, orphan, unknown (comma list). With kill: what is destroyed."),
    click.option("--active-within", type=options.milliseconds(), default=None, metavar="MS", help="Data received within MS is 'active'; past it a connection is quiet, "
                 "dead or unknown by its evidence. Default: -t / --min-idle when given, else 60000."),
    click.option("--middlebox", type=options.Middlebox(), default=None, metavar="PRESET|SECONDS",
                 help="A load balancer's or NAT's idle timeout: aws-nlb, aws-nat (350 s), azure-lb "
                      "(240 s), gcp-nat (1200 s), gce-lb (600 s), or seconds. audit lists the "
                      "connections past it and at risk; kill destroys those past it."),
    click.option("--risk-fraction", type=options.Number(0, 1, positive=True, metavar="F"), default=0.5,
                 show_default=True,
                 help="With --middlebox: idle for more than F x the timeout with no keep-alive "
                      "armed in time is 'at risk'."),
)

evidence_options = _options(
    judge_options,
    click.option("--json", "as_json", is_flag=True, help="JSON Lines on stdout, one object per connection."),
    click.option("-p", "--processes", is_flag=True,
                 help="Show the owning processes (pids, names, cgroups): one pass over /proc, as ss -p."),
    verbose_option,
)

idle_time_option = click.option(
    "-t", "--idle-time", "--idle_time", "idle_time", type=options.milliseconds(), default=0.0,
    metavar="MS", show_default=True,
    help="Kill connections idle at least MS milliseconds; 0 = every matching connection.")
all_option = click.option("--all", "all_", is_flag=True,
                          help="Allow acting with no port, address or owner selector.")
protected_options = _options(
    click.option("--exclude-port", "exclude_ports", multiple=True, type=options.Ports(), metavar="PORTS",
                 help="Protected: never touch a connection with such a port at either end. Repeatable."),
    click.option("--exclude-cidr", "exclude_cidrs", multiple=True, type=options.Cidrs(), metavar="CIDR",
                 help="Protected: never touch a connection with an address in CIDR at either end. Repeatable."),
)
_logfile = click.option("-f", "--logfile", type=options.LogPath(), default=None, metavar="PATH",
                        help="Append a log line per connection acted on to this file.")
_disable_syslog = click.option("--disable-syslog", "--disable_syslog", "disable_syslog", is_flag=True,
                               help="Do not log to syslog.")
_destroy_with = click.option(
    "--destroy-with", type=click.Choice(["auto", "netlink", "bpf", "proc"]), default="auto",
    show_default=True,
    help="netlink: SOCK_DESTROY; bpf: destroy inside the kernel (BPF TCP iterator, Linux >= "
         "6.5; a one-shot kill also decides there); proc: the /proc fallback; auto: netlink, "
         "where the kernel lacks SOCK_DESTROY the iterator, then /proc.")

kill_options = _options(
    idle_time_option,
    click.option("--dry-run", is_flag=True, help="Report what would be destroyed; touch nothing."),
    click.option("--use-proc", "--use_proc", "use_proc", is_flag=True,
                 help="Use the /proc fallback instead of SOCK_DESTROY."),
    click.option("--proc-action", type=click.Choice(["shutdown", "kill"]), default="shutdown",
                 show_default=True,
                 help="Fallback action: shut the socket down in its owner (owner lives) or SIGKILL the owner."),
    _logfile,
    _disable_syslog,
    all_option,
)


# ---------------------------------------------------------------------------
# commands


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tcpidle")
def cli():
    """Find idle and dead TCP connections and destroy them, leaving their processes alive.

    \b
    tcpidle audit   report connections and how long each has been idle
    tcpidle kill    destroy the idle ones (SOCK_DESTROY, cookie-checked)
    tcpidle track   a daemon: BPF probe + audit/kill every interval
    tcpidle explain everything about one connection, and what a kill would do to it
    tcpidle keepalive  arm TCP keep-alive in the owners' sockets instead of killing
    tcpidle doctor  what this kernel allows (destroy, probe hooks, BPF, pidfd)

    Idle time is the time since data was last received, from the kernel's
    tcp_info (jiffies precision), refined to the nanosecond by a BPF probe
    where one is running (`tcpidle track`, or `audit --watch S`).
    """


@cli.command(epilog=EPILOG_SELECTORS)
@selector_options
@evidence_options
@click.option("--min-idle", type=options.milliseconds(), default=0.0, metavar="MS",
              show_default=True, help="Show only connections idle at least MS milliseconds.")
@click.option("--watch", type=options.seconds(), default=None, metavar="S",
              help="Attach the BPF probe and observe S seconds before reporting (ns precision).")
@click.option("--map-size", type=options.integer(1, MAX_MAP_SIZE, "N"), default=DEFAULT_MAP_SIZE,
              show_default=True,
              help="Entries of the probe's map with --watch.")
@click.option("--hist", is_flag=True,
              help="Print a log2 histogram of idle times (ms, as bcc's tools) instead of the connections.")
@click.option("--by", type=click.Choice(groups.BY), default=None,
              help="One line per remote port, local port, namespace or owner, with counts per "
                   "verdict; with --hist: one histogram per group.")
def audit(min_idle, watch, map_size, hist, by, **opts):
    """Report matching connections and their idle time. Never kills.

    \b
    Examples:
      tcpidle audit -p                     every established connection, idlest first, with owners
      tcpidle audit --min-idle 600000      idle for 10 minutes or more
      tcpidle audit -d 5432 --json         connections to PostgreSQL, JSON Lines
      tcpidle audit --watch 10 -v          observe 10 s with the BPF probe, then report
      tcpidle audit --all-netns --comm nginx   nginx's connections in every container
      tcpidle audit --state all -6         every IPv6 TCP socket
      tcpidle audit --hist --by dport      idle times per remote port, log2 histograms
    """
    sys.exit(commands.audit(min_idle, watch, map_size, hist=hist, by=by, **opts))


@cli.command(epilog=EPILOG_SELECTORS)
@selector_options
@evidence_options
@kill_options
@click.option("-i", "--interval", type=options.seconds(), default=None, metavar="S", help="Poll every S seconds until SIGINT/SIGTERM instead of once.")
@_destroy_with
def kill(idle_time, dry_run, use_proc, proc_action, logfile, disable_syslog, all_, interval, **opts):
    """Destroy matching connections idle for at least --idle-time.

    Needs a port, address or owner selector, or --all. Right before its
    destroy each victim is asked about again (state and tcp_info, and the
    probe's map where there is one): one that left the selection, received
    data since the scan, or could not be asked about is spared. Each kill is
    logged with the socket cookie, 4-tuple, idle time, idle source and
    outcome, batch by batch; SIGTERM/SIGINT stop between two batches (exit
    128 + the signal).

    \b
    Examples:
      tcpidle kill -d 5432 -t 600000           kill connections to port 5432 idle 10+ min
      tcpidle kill -s 8080 -t 30000 --dry-run  show what would be killed on local port 8080
      tcpidle kill -d 443 --dst 10.0.0.0/8 -t 60000 -i 10   poll every 10 s
      tcpidle kill --all-netns -d 6379 -t 300000            in every container too
      tcpidle kill -d 22 --use-proc            without SOCK_DESTROY: shut down in the owner
      tcpidle kill -d 6379 -t 60000 --destroy-with bpf   decide and destroy in the kernel
    """
    sys.exit(commands.kill(idle_time, dry_run, use_proc, proc_action, logfile, disable_syslog, all_,
                           interval, **opts))


# ---------------------------------------------------------------------------
# track: the daemon


@cli.command(epilog=EPILOG_SELECTORS)
@selector_options
@evidence_options
@kill_options
@click.option("-i", "--interval", type=options.seconds(), default=10.0, show_default=True, metavar="S",
              help="Poll every S seconds.")
@click.option("--map-size", type=options.integer(1, MAX_MAP_SIZE, "N"), default=DEFAULT_MAP_SIZE,
              show_default=True,
              help="Entries of the BPF activity map (a map already pinned keeps its own size).")
@click.option("--bpf-hook", type=click.Choice(["auto", "tp_btf", "raw_tracepoint", "kprobe", "tracepoint"]),
              default="auto", show_default=True,
              help="Where the probe hooks the receive path (auto: the best that works).")
@click.option("--max-kills-per-interval", type=options.integer(0, options.MAX_KILLS), default=100,
              show_default=True,
              metavar="N", help="Act on at most N connections per poll, the idlest first; 0 = no limit.")
@protected_options
@click.option("--event-log", type=options.LogPath(), default=None, metavar="PATH",
              help="Append one JSON line per connection acted on (reopened on SIGHUP).")
@click.option("--metrics-port", type=options.integer(1, 65535), default=None, metavar="N",
              help="Serve Prometheus metrics on this port (/metrics).")
@click.option("--metrics-addr", type=options.Address(), default="127.0.0.1", show_default=True,
              metavar="ADDR",
              help="Address the metrics endpoint listens on.")
@click.option("--keepalive", type=options.KeepaliveSettings(), default=None,
              help="Arm keep-alive (idle s, interval s, probes) in every new matching connection "
                   "without it, instead of killing (as `tcpidle keepalive`).")
@click.option("--cleanup", is_flag=True, help="Remove the BPF maps pinned in --pin-dir, then exit.")
@_destroy_with
def track(idle_time, dry_run, use_proc, proc_action, logfile, disable_syslog, all_, interval, map_size,
          bpf_hook, max_kills_per_interval, exclude_ports, exclude_cidrs, event_log, metrics_port,
          metrics_addr, cleanup, keepalive, **opts):
    """Run as a daemon: BPF probe attached, kill idle connections every --interval.

    The probe's maps are pinned in --pin-dir (bpffs, mounted if missing), so a
    restarted tracker keeps the history, and `audit`/`kill` read it. Needs a
    port, address or owner selector, or --all. Protected ports and networks
    (--exclude-port, --exclude-cidr) win over every selector. SIGTERM/SIGINT
    stop (the pins stay), SIGHUP reopens the log file and the event log.

    \b
    Examples:
      tcpidle track -d 5432 -t 600000 --interval 30 --exclude-port 22
      tcpidle track --all --dry-run --event-log /var/log/tcpidle/events.jsonl
      tcpidle track -d 6379 -t 300000 --metrics-port 9733
      tcpidle track -d 5432 --keepalive 60,10,6   arm keep-alive in new connections instead
      tcpidle track --cleanup              remove the pinned maps
    """
    sys.exit(commands.track(idle_time, dry_run, use_proc, proc_action, logfile, disable_syslog, all_,
                            interval, map_size, bpf_hook, max_kills_per_interval, exclude_ports,
                            exclude_cidrs, event_log, metrics_port, metrics_addr, cleanup,
                            keepalive=keepalive, **opts))


# ---------------------------------------------------------------------------
# keepalive: the retrofit instead of killing


@cli.command(epilog=EPILOG_SELECTORS)
@selector_options
@evidence_options
@click.option("-t", "--idle-time", "--idle_time", "idle_time", type=options.milliseconds(), default=0.0,
              metavar="MS", show_default=True,
              help="Only connections idle at least MS milliseconds; 0 = every matching connection.")
@click.option("--idle", "idle_s", type=options.keepalive_idle(), required=True,
              help="First probe after S seconds with nothing received (TCP_KEEPIDLE).")
@click.option("--interval", "interval_s", type=options.keepalive_interval(), required=True,
              help="Then a probe every S seconds (TCP_KEEPINTVL).")
@click.option("--count", type=options.keepalive_count(), required=True,
              help="Abort the connection after N probes unanswered (TCP_KEEPCNT).")
@click.option("--dry-run", is_flag=True, help="Report where keep-alive would be armed; touch nothing.")
@protected_options
@_logfile
@_disable_syslog
@all_option
def keepalive(idle_time, idle_s, interval_s, count, dry_run, exclude_ports, exclude_cidrs, logfile,
              disable_syslog, all_, **opts):
    """Arm TCP keep-alive in matching connections that have none, instead of killing them.

    For each one, the owner's descriptor is duplicated (pidfd_getfd),
    checked to be that socket (inode and cookie), given SO_KEEPALIVE,
    TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT, and closed. The kernel then
    probes the peer: a live peer answers and the connection lives on; a dead
    one is aborted by the kernel within IDLE + INTERVAL x COUNT seconds (the
    owner gets ETIMEDOUT). Needs a selector, or --all; protected ports and
    networks win; a socket whose owner set keep-alive itself is left as it
    is. A refused pidfd_getfd (Yama ptrace_scope, no CAP_SYS_PTRACE over
    another user's process) is one error line per owner, nothing changed.

    \b
    Examples:
      tcpidle keepalive -d 5432 --idle 60 --interval 10 --count 6
      tcpidle keepalive --comm grpc-server --idle 30 --interval 5 --count 3 --dry-run
      tcpidle keepalive -d 443 --middlebox aws-nlb --idle 120 --interval 30 --count 4
      tcpidle keepalive --all-netns -s 6379 -t 300000 --idle 60 --interval 10 --count 3
    """
    sys.exit(commands.keepalive(idle_time, idle_s, interval_s, count, dry_run, exclude_ports,
                                exclude_cidrs, logfile, disable_syslog, all_, **opts))


# ---------------------------------------------------------------------------
# explain: one connection


@cli.command(epilog=EPILOG_SELECTORS)
@click.argument("connection", type=options.Connection())
@selector_options
@judge_options
@idle_time_option
@all_option
@protected_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@verbose_option
def explain(connection, idle_time, all_, exclude_ports, exclude_cidrs, **opts):
    """Everything known about one connection, and what a kill would do to it.

    CONNECTION is a socket cookie (as every output prints it) or a 4-tuple
    LOCAL-REMOTE, e.g. 10.0.0.1:5432-10.0.0.2:41234 (either order; IPv6 in
    brackets: [fd00::1]:22-[fd00::2]:5050). Shown: state, owners (pid,
    name, fd, cgroup), namespace, every tcp_info and INET_DIAG field tcpidle
    reads, the BPF probe's record when a tracker's pins (or storage) are
    there, the verdict and the rule that gave it. Given kill's options
    (selectors, -t, --verdict, --middlebox, --all, the protected list of
    track), it says whether that kill would destroy the connection or spare
    it, and by which clause. Never kills. Exit 1 when no such connection
    is found.

    \b
    Examples:
      tcpidle explain 4097                            everything about the socket with cookie 4097
      tcpidle explain 10.0.0.1:5432-10.0.0.2:41234    by 4-tuple (local end first, or the peer's)
      tcpidle explain 4097 -d 5432 -t 600000          would `kill -d 5432 -t 600000` destroy it?
      tcpidle explain 4097 -d 5432 --verdict dead --exclude-port 22
      tcpidle explain '[fd00::1]:22-[fd00::2]:5050' --all-netns --json
    """
    sys.exit(commands.explain(connection, idle_time, all_, exclude_ports, exclude_cidrs, **opts))


# ---------------------------------------------------------------------------
# doctor: what this kernel allows (tcpidle.doctor owns the checks)


@cli.command()
@click.option("--netns", "netns_specs", multiple=True, type=options.NetnsSpec(), metavar="NAME|PATH|PID",
              help="Also check INET_DIAG dumps in this network namespace. Repeatable.")
@click.option("--pin-dir", default=DEFAULT_PIN_DIR, type=options.PinDir(), show_default=True,
              metavar="DIR", help="Where the tracker pins its BPF maps.")
@click.option("--no-probe", is_flag=True, help="Skip compiling and attaching the probe on each hook.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines on stdout, one object per check.")
def doctor(netns_specs, pin_dir, no_probe, as_json):
    """Say what this kernel and this caller allow: which probe hooks load,
    whether SOCK_DESTROY works, the /proc fallback, BTF, bpffs and pins.

    Each answer is found by trying where that harms nothing (a destroy of a
    connection of its own in a private network namespace, a probe attach on
    each hook). Exit 0 when tcpidle can destroy connections here, 1 (with
    the reason) when it cannot at all.

    \b
    Examples:
      tcpidle doctor                   the table
      tcpidle doctor --json | jq -r 'select(.status=="no") | .name'
      tcpidle doctor --netns blue      can tcpidle dump in namespace blue?
    """
    sys.exit(commands.doctor(netns_specs, pin_dir, no_probe, as_json))


# ---------------------------------------------------------------------------
# entry point


def main(argv: Optional[List[str]] = None) -> None:
    """Run the CLI with one-line errors and the documented exit statuses.

    Called without `argv` (the process's own command line: the `tcpidle`
    script, `python -m tcpidle`) it ends the process itself (`_leave`); with
    `argv` (a test, a caller in-process) it raises SystemExit as usual."""
    # A scan makes one object per socket and keeps them all: the cyclic
    # garbage collector would rescan them again and again (~35% of a
    # 100k-socket audit) for cycles tcpidle does not make.  Polling loops
    # collect once after each poll instead.
    gc.disable()
    status = _run(argv)
    if argv is None and isinstance(status, int):
        _leave(status)
    sys.exit(status)


def _run(argv: Optional[List[str]]):
    """The command's exit status (an int, or what SystemExit carried)."""
    try:
        status = cli.main(args=argv, prog_name="tcpidle", standalone_mode=False)
    except SystemExit as exc:
        status = exc.code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        report.error("aborted")
        return 1
    except click.UsageError as exc:
        report.error(_one_line(exc.format_message()))
        return 2
    except TcpidleError as exc:
        report.error(_one_line(str(exc)))
        return exc.exit_code
    except PermissionError as exc:
        report.error("permission denied: %s (run as root)" % (exc.strerror or exc))
        return 1
    except OSError as exc:
        report.error(_one_line(str(exc)))
        return 1
    except KeyboardInterrupt:
        return 130
    # A status of 0 becomes 1 when an output (stdout, log file, event log) lost lines.
    return sinks.exit_status(status if isinstance(status, int) else 0 if status is None else 1)


def _leave(status: int) -> None:
    """End the process with `status`, without the interpreter's teardown.

    What must happen at exit still does: the atexit hooks run (logging's
    shutdown, which flushes and closes the log file and syslog; bcc's
    clean-up; weakref finalizers such as temporary directories), then
    stdout and stderr are flushed (a stdout that cannot be flushed makes the
    status 120, as Python's own exit does).  What is skipped is freeing every
    object one by one and a last full collection: 15-20 ms of CPU after an
    empty run and ~40 ms after a kill of 10,000 connections (bench/README.md,
    "Start-up"), for memory the kernel takes back at once anyway.
    """
    import atexit
    import os

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                if stream is sys.stdout:
                    status = 120
        os._exit(status)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


if __name__ == "__main__":  # pragma: no cover
    main()
