"""The values of the command line, checked before anything is done.

Owns the click parameter types of every option that takes a value: numbers
(finite, in range, written in ASCII digits), paths (log files, the pin
directory, network namespaces), selectors (ports, CIDRs, states, owners)
and addresses.  cli.py only declares options with these types; click
converts every value before the command body runs, so a bad one stops the
run with one line naming the option (exit 2) before the kernel, a log or a
pin is touched.  Each type returns what the layers below already take
(floats, ints, the user's strings), so parsing proper stays in selectors.py
and netns.py; the types call it early.

Why so strict:
  * ASCII only: Python's int() and float() accept other scripts' digits
    ("٣"), superscripts pass str.isdigit() and then fail in int(),
    underscores ("1_000") and surrounding blanks pass silently;
  * finite and bounded: "inf", "nan" and "1e300" are floats; nan compares
    false with everything (a `--watch nan` never ended, an `-i nan` poll
    never slept), inf and huge values overflow the nanosecond clock
    arithmetic (`-t inf` made the first poll kill);
  * an empty owner selector (`--comm ''`) is no selector, and must not
    satisfy the "kill needs a selector" guard while matching everything;
  * a selector that cannot match anything is refused rather than left to
    select nothing (or, worse, everything): an IPv6 scope id (INET_DIAG
    reports no scope), a CIDR with host bits (see `Cidrs`), a process name
    longer than the kernel keeps (15 bytes), a cgroup prefix that is not a
    path;
  * paths: a FIFO nobody reads blocks open(2) forever, a directory or a
    file that is no namespace fails only later (setns EINVAL, exit 1).

Bounds, one place (README "Bad input" lists them).
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import re
import stat
from typing import Optional

import click

from . import netns, selectors, sinks
from .errors import UsageError
from .model import MAX_KEEPCNT, MAX_KEEPIDLE_S, MAX_KEEPINTVL_S, Keepalive

# Idle thresholds in ms: 10 years.  More is no threshold (tcp_info's own
# counter wraps after 49.7 days), and ms * 1e6 must stay far inside the
# signed 64-bit nanoseconds the decision compares with.
MAX_MS = 10 * 365 * 24 * 3600 * 1000
# Periods in seconds (-i/--interval, --watch): 10 ms to one day.  Shorter
# is a busy loop on the kernel's socket hash, longer is no tracker.
MIN_PERIOD_S = 0.01
MAX_PERIOD_S = 24 * 3600.0
PID_MAX = 1 << 22  # PID_MAX_LIMIT on 64-bit kernels
UID_MAX = (1 << 32) - 2  # (uid_t)-1 is "no uid"
MAX_KILLS = (1 << 31) - 1  # --max-kills-per-interval; 0 = no limit
TASK_COMM_LEN = 16  # /proc/PID/comm keeps 15 bytes and a NUL

_INTEGER = re.compile(r"[-+]?[0-9]+\Z")
_DECIMAL = re.compile(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?\Z")
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z")


def option_name(param: Optional[click.Parameter]) -> str:
    """The name an error gives an option: its first long spelling ("--idle-time")."""
    if param is None:
        return "value"
    opts = list(getattr(param, "opts", ()) or ())
    return next((o for o in opts if o.startswith("--")), opts[0] if opts else param.name)


def _fail(param, value, reason: str) -> None:
    raise UsageError("%s %r: %s" % (option_name(param), value, reason))


def _text(param, value) -> str:
    """The raw text of a value: non-empty, no NUL."""
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        _fail(param, text, "empty")
    if "\0" in text:
        _fail(param, text, "contains a NUL byte")
    return text


# ---------------------------------------------------------------------------
# numbers


class Number(click.ParamType):
    """A finite number in [lo, hi] written in ASCII ("600000", "0.5", "1e3").

    `integer`: digits only.  `positive`: 0 is refused too (lo is then the
    smallest value allowed).  `unit` is said in range errors.
    """

    def __init__(self, lo: float, hi: float, integer: bool = False, positive: bool = False,
                 unit: str = "", metavar: Optional[str] = None):
        self.lo, self.hi, self.integer, self.positive, self.unit = lo, hi, integer, positive, unit
        self.name = "integer" if integer else "number"
        self._metavar = metavar

    def get_metavar(self, param, *args, **kwargs):  # click 8.0-8.2 and 8.2+ signatures
        return self._metavar

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            _fail(param, value, "not a number")
        if isinstance(value, (int, float)):  # a default, or a caller passing numbers
            text, number = repr(value), value
        else:
            text = _text(param, value)
            pattern = _INTEGER if self.integer else _DECIMAL
            if not pattern.match(text):
                lowered = text.strip().lower().lstrip("+-")
                if lowered in ("inf", "infinity", "nan"):
                    _fail(param, text, "not a finite number")
                _fail(param, text, "not %s written in ASCII digits" % (
                    "an integer" if self.integer else "a number"))
            number = int(text) if self.integer else float(text)
        if isinstance(number, float) and not math.isfinite(number):
            _fail(param, text, "not a finite number")
        if self.integer and isinstance(number, float):
            if not number.is_integer():
                _fail(param, text, "not an integer")
            number = int(number)
        unit = (" " + self.unit) if self.unit else ""
        if number < 0 and self.lo >= 0:
            _fail(param, text, "must not be negative")
        if self.positive and number <= 0:
            _fail(param, text, "must be positive")
        if number < self.lo:
            _fail(param, text, "must be at least %s%s" % (_g(self.lo), unit))
        if number > self.hi:
            _fail(param, text, "must be at most %s%s" % (_g(self.hi), unit))
        return number


def _g(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else "%g" % number


def milliseconds() -> Number:
    """-t/--idle-time, --min-idle, --last-recv-limit: 0 to MAX_MS (10 years)."""
    return Number(0, MAX_MS, unit="ms (10 years)", metavar="MS")


def seconds() -> Number:
    """-i/--interval, --watch: MIN_PERIOD_S to MAX_PERIOD_S."""
    return Number(MIN_PERIOD_S, MAX_PERIOD_S, positive=True, unit="s", metavar="S")


def integer(lo: int, hi: int, metavar: Optional[str] = None) -> Number:
    """--map-size, --max-kills-per-interval, --metrics-port, --pid, --uid."""
    return Number(lo, hi, integer=True, metavar=metavar)


# The keep-alive retrofit's settings (tcpidle keepalive --idle/--interval/--count,
# track --keepalive IDLE,INTERVAL,COUNT): whole seconds and probes, as the kernel
# takes them, within its bounds (a zero is EINVAL there).
KEEPALIVE_PARTS = (("IDLE", lambda: integer(1, MAX_KEEPIDLE_S, "S")),
                   ("INTERVAL", lambda: integer(1, MAX_KEEPINTVL_S, "S")),
                   ("COUNT", lambda: integer(1, MAX_KEEPCNT, "N")))


def keepalive_idle() -> Number:
    return KEEPALIVE_PARTS[0][1]()


def keepalive_interval() -> Number:
    return KEEPALIVE_PARTS[1][1]()


def keepalive_count() -> Number:
    return KEEPALIVE_PARTS[2][1]()


class KeepaliveSettings(click.ParamType):
    """track --keepalive IDLE,INTERVAL,COUNT: three whole numbers, each checked as
    tcpidle keepalive's --idle, --interval and --count; returns model.Keepalive."""

    name = "keepalive"

    def get_metavar(self, param, *args, **kwargs):
        return "IDLE,INTERVAL,COUNT"

    def convert(self, value, param, ctx):
        if isinstance(value, Keepalive):
            return value
        text = _text(param, value)
        parts = text.split(",")
        if len(parts) != 3:
            _fail(param, text, "three numbers IDLE,INTERVAL,COUNT (seconds, seconds, probes), "
                               "e.g. 60,10,6")
        numbers = []
        for (label, kind), part in zip(KEEPALIVE_PARTS, parts):
            try:
                numbers.append(kind().convert(part, None, ctx))
            except UsageError as e:
                reason = str(e).split(": ", 1)[-1]
                _fail(param, text, "%s %r: %s" % (label, part, reason))
        return Keepalive(*numbers)


# ---------------------------------------------------------------------------
# selectors


class _Delegated(click.ParamType):
    """A value parsed (and refused) by the library's own parser, called early."""

    def convert(self, value, param, ctx):
        text = _text(param, value)
        self.check(text, option_name(param))
        return text

    def check(self, text: str, option: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class Verdicts(_Delegated):
    """--verdict: a comma list of health verdicts (see health.parse_verdicts)."""

    name = "verdicts"

    def check(self, text, option):
        from . import health

        health.parse_verdicts(text, option)


class Middlebox(_Delegated):
    """--middlebox: a preset's name or a positive number of seconds (see middlebox.parse)."""

    name = "middlebox"

    def check(self, text, option):
        from . import middlebox

        if not _DECIMAL.match(text) and text.strip().lower() not in middlebox.PRESETS:
            raise UsageError("%s %r: neither a preset (%s) nor a number of seconds in ASCII digits"
                             % (option, text, ", ".join(sorted(middlebox.PRESETS))))
        middlebox.parse(text, option=option)


class Connection(_Delegated):
    """explain's CONNECTION argument: a socket cookie or a 4-tuple (explain.parse_target)."""

    name = "connection"

    def convert(self, value, param, ctx):
        from . import explain

        explain.parse_target(value if isinstance(value, str) else str(value))
        return value

    def get_metavar(self, param, *args, **kwargs):  # click 8.0-8.2 and 8.2+ signatures
        return "CONNECTION"


class Ports(_Delegated):
    """-s/--sport, -d/--dport, --exclude-port: comma lists and ranges of 1-65535."""

    name = "ports"

    def check(self, text, option):
        selectors.parse_ports([text], option)


class Cidrs(_Delegated):
    """--src, --dst, --exclude-cidr: comma lists of addresses or CIDRs, no host
    bits, no IPv6 scope id (see selectors.parse_networks)."""

    name = "cidr"

    def check(self, text, option):
        selectors.parse_networks([text], option)


class States(_Delegated):
    """--state: ss's state names and groups, comma lists."""

    name = "state"

    def check(self, text, option):
        selectors.parse_states([text])


class Comm(_Delegated):
    """--comm: a process name as /proc/PID/comm shows it (1 to 15 bytes)."""

    name = "name"

    def check(self, text, option):
        if len(text.encode("utf-8", "surrogateescape")) >= TASK_COMM_LEN:
            raise UsageError("%s %r: longer than the %d bytes the kernel keeps of a process "
                             "name: it can never match" % (option, text, TASK_COMM_LEN - 1))


class CgroupPrefix(_Delegated):
    """--cgroup: a prefix of a cgroup path, which starts with "/"."""

    name = "prefix"

    def check(self, text, option):
        if not text.startswith("/"):
            raise UsageError("%s %r: a cgroup path starts with / (as in /proc/PID/cgroup, "
                             "e.g. /system.slice/nginx.service)" % (option, text))


class Address(_Delegated):
    """--metrics-addr: an IP address or a host name to listen on."""

    name = "address"

    def check(self, text, option):
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            if not _HOSTNAME.match(text):
                raise UsageError("%s %r: not an IP address or host name" % (option, text)) from None
            return
        if getattr(addr, "scope_id", None):
            raise UsageError("%s %r: give the address without a scope id" % (option, text))


# ---------------------------------------------------------------------------
# paths


class NetnsSpec(_Delegated):
    """--netns NAME|PATH|PID: checked to name a network namespace (netns.resolve)."""

    name = "netns"

    def check(self, text, option):
        netns.resolve(text)


class LogPath(_Delegated):
    """-f/--logfile, --event-log: a file tcpidle appends to.

    Existing: a regular file, a character device (/dev/stderr of a
    terminal) or a FIFO someone reads (opened non-blocking: with no reader
    the open fails at once instead of blocking start-up forever).  New:
    its directory exists and is writable.  The check does not create it.
    """

    name = "path"

    def check(self, text, option):
        try:
            st = os.stat(text)
        except FileNotFoundError:
            parent = os.path.dirname(text) or "."
            if text.endswith("/") or not os.path.isdir(parent):
                raise UsageError("%s %r: no such directory %r" % (option, text, parent)) from None
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError("%s %r: directory %r is not writable" % (option, text, parent))
            return
        except OSError as exc:
            raise UsageError("%s %r: %s" % (option, text, exc.strerror or exc)) from None
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            raise UsageError("%s %r: is a directory" % (option, text))
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
            raise UsageError("%s %r: not a regular file (%s)" % (option, text, _kind(mode)))
        try:
            fd = sinks.open_append(text, create=False)  # a check creates nothing
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno == errno.ENXIO and stat.S_ISFIFO(mode):  # a FIFO without reader
                reason = "a FIFO that no process reads (opening it would block)"
            raise UsageError("%s %r: %s" % (option, text, reason)) from None
        os.close(fd)


class PinDir(_Delegated):
    """--pin-dir: where the tracker pins its maps; a directory, or nothing yet."""

    name = "dir"

    def check(self, text, option):
        try:
            st = os.stat(text)
        except FileNotFoundError:
            return  # track creates it; audit and kill find nothing pinned
        except OSError as exc:
            raise UsageError("%s %r: %s" % (option, text, exc.strerror or exc)) from None
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError("%s %r: not a directory (%s)" % (option, text, _kind(st.st_mode)))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "mode %o" % stat.S_IFMT(mode)
