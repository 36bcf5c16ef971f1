"""The `tcpidle` command line: flags in, one library call, exit status out.

Owns the translation of click flags into a `Selector` and a `Policy`, and of
exceptions into exit statuses: 2 for bad input (found before anything is
touched), 1 for failures at run time, 0 otherwise.  Every error is one line
on stderr, `tcpidle: error: ...`.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import List, Optional

import click

from . import report, selectors
from .engine import Engine, require_privilege
from .errors import TcpidleError, UsageError
from .model import AF_INET, AF_INET6, Policy, Selector

EPILOG_SELECTORS = """\b
Ports: `-d 443`, `-d 22,8000-8100`, repeatable. `sport` is the socket's
local port, `dport` the remote one (as tcp_closer).
States: ss's names (established, syn-sent, syn-recv, fin-wait-1,
fin-wait-2, time-wait, close-wait, last-ack, closing, listening, closed)
and groups (all, connected, synchronized). Default: established."""


# ---------------------------------------------------------------------------
# option sets


def _non_negative(name):
    def check(ctx, param, value):
        if value is not None and value < 0:
            raise click.BadParameter("%s must not be negative (got %s)" % (name, value), param=param)
        return value

    return check


def selector_options(f):
    """-4/-6, ports, CIDRs, states: shared by every command."""
    options = [
        click.option("-4", "--ipv4", "ipv4", is_flag=True, help="IPv4 sockets only."),
        click.option("-6", "--ipv6", "ipv6", is_flag=True, help="IPv6 sockets only."),
        click.option("-s", "--sport", "sports", multiple=True, metavar="PORTS",
                     help="Local port(s): list and ranges, e.g. 22,8000-8100. Repeatable."),
        click.option("-d", "--dport", "dports", multiple=True, metavar="PORTS",
                     help="Remote port(s): list and ranges. Repeatable."),
        click.option("--src", "srcs", multiple=True, metavar="CIDR", help="Local address or network. Repeatable."),
        click.option("--dst", "dsts", multiple=True, metavar="CIDR", help="Remote address or network. Repeatable."),
        click.option("--state", "states", multiple=True, metavar="NAME",
                     help="TCP state or group (default established). Repeatable."),
        click.option("--idle-metric", type=click.Choice(["data", "any"]), default="data", show_default=True,
                     help="data: time since payload was received; any: since any segment (ACKs, keep-alives)."),
        click.option("--last-recv-limit", "--last_recv_limit", "last_recv_limit", type=float, default=None,
                     callback=_non_negative("--last-recv-limit"), metavar="MS",
                     help="Treat tcp_info idle times above MS as unknown (tcp_closer's option)."),
        click.option("--json", "as_json", is_flag=True, help="JSON Lines on stdout, one object per connection."),
        click.option("-v", "--verbose", count=True, help="More detail on stderr (-vv: debug)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def kill_options(f):
    """Options of `kill` (and of the tracker)."""
    options = [
        click.option("-t", "--idle-time", "--idle_time", "idle_time", type=float, default=0.0,
                     callback=_non_negative("--idle-time"), metavar="MS", show_default=True,
                     help="Kill connections idle at least MS milliseconds; 0 = every matching connection."),
        click.option("--dry-run", is_flag=True, help="Report what would be destroyed; touch nothing."),
        click.option("--use-proc", "--use_proc", "use_proc", is_flag=True,
                     help="Use the /proc fallback instead of SOCK_DESTROY."),
        click.option("--proc-action", type=click.Choice(["shutdown", "kill"]), default="shutdown",
                     show_default=True,
                     help="Fallback action: shut the socket down in its owner (owner lives) or SIGKILL the owner."),
        click.option("-f", "--logfile", type=click.Path(dir_okay=False, writable=True), default=None,
                     help="Append a log line per kill to this file."),
        click.option("--disable-syslog", "--disable_syslog", "disable_syslog", is_flag=True,
                     help="Do not log kills to syslog."),
        click.option("--all", "all_", is_flag=True,
                     help="Allow killing with no port or address selector."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def build_selector(ipv4, ipv6, sports, dports, srcs, dsts, states) -> Selector:
    families = set()
    if ipv4:
        families.add(AF_INET)
    if ipv6:
        families.add(AF_INET6)
    return Selector(
        families=frozenset(families or {AF_INET, AF_INET6}),
        states=selectors.parse_states(states),
        sports=selectors.parse_ports(sports, "--sport"),
        dports=selectors.parse_ports(dports, "--dport"),
        src=selectors.parse_networks(srcs, "--src"),
        dst=selectors.parse_networks(dsts, "--dst"),
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

    Idle time is the time since data was last received, from the kernel's
    tcp_info (jiffies precision), refined to the nanosecond by a BPF probe
    where one is running.
    """


@cli.command(epilog=EPILOG_SELECTORS)
@selector_options
@click.option("--min-idle", type=float, default=0.0, callback=_non_negative("--min-idle"), metavar="MS",
              show_default=True, help="Show only connections idle at least MS milliseconds.")
@click.option("--no-owners", is_flag=True, help="Do not look up owning processes in /proc (faster).")
def audit(ipv4, ipv6, sports, dports, srcs, dsts, states, idle_metric, last_recv_limit, as_json,
          verbose, min_idle, no_owners):
    """Report matching connections and their idle time. Never kills.

    \b
    Examples:
      tcpidle audit                        every established connection
      tcpidle audit --min-idle 600000      idle for 10 minutes or more
      tcpidle audit -d 5432 --json         connections to PostgreSQL, JSON Lines
      tcpidle audit --state all -6         every IPv6 TCP socket
    """
    selector = build_selector(ipv4, ipv6, sports, dports, srcs, dsts, states)
    policy = Policy(idle_time_ms=min_idle, idle_metric=idle_metric, last_recv_limit_ms=last_recv_limit)
    report.setup_logging(verbose, None, syslog=False)
    started = time.monotonic()
    engine = Engine(selector, policy, want_owners=not no_owners)
    scan = engine.scan()
    shown = scan.victims if min_idle > 0 else scan.verdicts
    shown = sorted(shown, key=lambda v: (v.idle_ms is None, -(v.idle_ms or 0.0)))
    report.write_rows((report.row(v, owners=scan.owners) for v in shown), as_json)
    report.summary_audit(scan.verdicts, len(shown), scan.seen, (time.monotonic() - started) * 1000,
                         min_idle, "no BPF probe: idle from tcp_info")


@cli.command(epilog=EPILOG_SELECTORS)
@selector_options
@kill_options
@click.option("-i", "--interval", type=float, default=None, callback=_non_negative("--interval"),
              metavar="S", help="Poll every S seconds until SIGINT/SIGTERM instead of once.")
def kill(ipv4, ipv6, sports, dports, srcs, dsts, states, idle_metric, last_recv_limit, as_json,
         verbose, idle_time, dry_run, use_proc, proc_action, logfile, disable_syslog, all_, interval):
    """Destroy matching connections idle for at least --idle-time.

    Needs a port or address selector, or --all. Each kill is logged with the
    socket cookie, 4-tuple, idle time, idle source and outcome.

    \b
    Examples:
      tcpidle kill -d 5432 -t 600000           kill connections to port 5432 idle 10+ min
      tcpidle kill -s 8080 -t 30000 --dry-run  show what would be killed on local port 8080
      tcpidle kill -d 443 --dst 10.0.0.0/8 -t 60000 -i 10   poll every 10 s
      tcpidle kill -d 22 --use-proc            without SOCK_DESTROY: shut down in the owner
    """
    selector = build_selector(ipv4, ipv6, sports, dports, srcs, dsts, states)
    if interval is not None and interval == 0:
        raise UsageError("--interval must be positive (got 0)")
    if not selector.narrows_by_address and not all_:
        raise UsageError("kill needs a port or address selector (-s, -d, --src, --dst) or --all")
    policy = Policy(idle_time_ms=idle_time, idle_metric=idle_metric, last_recv_limit_ms=last_recv_limit,
                    dry_run=dry_run, use_proc=use_proc, proc_action=proc_action)
    if not dry_run:
        require_privilege("kill")
    report.setup_logging(verbose, logfile, syslog=not disable_syslog)
    engine = Engine(selector, policy)
    if interval is None:
        failed = _kill_once(engine, as_json, dry_run)
        sys.exit(1 if failed else 0)
    _poll(engine, interval, as_json, dry_run)


def _kill_once(engine: Engine, as_json: bool, dry_run: bool, quiet_if_empty: bool = False) -> int:
    """One scan and act; returns the number of failed kills."""
    started = time.monotonic()
    scan = engine.scan()
    outcomes = engine.act(scan)
    for outcome in outcomes:
        report.log_outcome(outcome)
    report.write_rows((report.row(o.verdict, o) for o in outcomes), as_json)
    if outcomes or not quiet_if_empty:
        report.summary_kill(outcomes, len(scan.verdicts), len(scan.victims),
                            (time.monotonic() - started) * 1000, dry_run)
    return sum(1 for o in outcomes if o.action == "failed")


def _poll(engine: Engine, interval: float, as_json: bool, dry_run: bool) -> None:
    """Scan and act every `interval` seconds until SIGINT or SIGTERM; exit 0."""
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda *_: report.reopen_logs())
    report.set_stdout_line_buffered()
    report.note("polling every %g s; SIGINT or SIGTERM stops" % interval)
    while not stop.is_set():
        try:
            _kill_once(engine, as_json, dry_run, quiet_if_empty=True)
        except TcpidleError as exc:
            if exc.exit_code == 2 or isinstance(exc, _fatal_errors()):
                raise
            report.log.error("poll failed: %s (retrying in %g s)", exc, interval)
        except OSError as exc:
            report.log.error("poll failed: %s (retrying in %g s)", exc, interval)
        stop.wait(interval)
    report.note("stopped")
    sys.exit(0)


def _fatal_errors():
    from .errors import PrivilegeError

    return (PrivilegeError,)


# ---------------------------------------------------------------------------
# entry point


def main(argv: Optional[List[str]] = None) -> None:
    """Run the CLI with one-line errors and the documented exit statuses."""
    try:
        cli.main(args=argv, prog_name="tcpidle", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        report.error("aborted")
        sys.exit(1)
    except click.UsageError as exc:
        report.error(_one_line(exc.format_message()))
        sys.exit(2)
    except TcpidleError as exc:
        report.error(_one_line(str(exc)))
        sys.exit(exc.exit_code)
    except PermissionError as exc:
        report.error("permission denied: %s (run as root)" % (exc.strerror or exc))
        sys.exit(1)
    except OSError as exc:
        report.error(_one_line(str(exc)))
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


if __name__ == "__main__":  # pragma: no cover
    main()
