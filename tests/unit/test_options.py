"""Every option that takes a value, checked at parse time (tcpidle.options), no root needed.

The command lines are parsed with click's make_context, which converts and
checks every parameter but never runs a command body: a bad value that got
through would show here as a parse that succeeds, never as a kill.  A
table of bad values per option, a table of good ones (the checks must not
refuse what users write), and a guard that no option of any command is
missing from the tables.
"""

import os
import socket

import click
import pytest


from tcpidle import cli, options
from tcpidle.errors import UsageError


def _int_bad(lo, hi):
    return [str(lo - 1), str(hi + 1), "1.5", "nan", "inf", "١٢", "²", "", "1e3", "0x1", "1_0", " 1"]


MS_BAD = ["nan", "NaN", "inf", "-inf", "Infinity", "1e300", str(options.MAX_MS + 1), "-1", "-0.5",
          "٣", "²", "１０", "1_000", " 5", "5 ", "", "0x10", "5ms", "1e", "--"]
S_BAD = ["nan", "inf", "1e300", "0", "-1", "0.001", "1e-300", "86401", "١", "", "1_0", "10s"]




PORTS_BAD = ["", "0", "65536", "٨٠", "²", "80,,81", "90-80", "abc", "1-", "-1", ",", "80, "]
CIDR_BAD = ["", "10.1.2.3/8", "fd00::1/64", "fe80::1%lo", "fe80::1%2/128", "nonsense",
            "10.0.0.0/33", "١٠.0.0.0/8", "10.0.0.0/٨", "10.0.0.0/8,"]
STATE_BAD = ["", "bogus", ",", "established,"]
COMM_BAD = ["", " ", "x" * 16, "é" * 8]
CGROUP_BAD = ["", " ", "system.slice", "0::/x"]
# The keep-alive retrofit: whole seconds / probes within the kernel's bounds (a zero is EINVAL there).
KA_IDLE_BAD = _int_bad(1, 32767) + ["0", "-5", "1e300"]
KA_COUNT_BAD = _int_bad(1, 127) + ["0", "1000"]
KA_TRIPLE_BAD = ["", " ", "1", "1,1", "1,1,2,3", "0,1,2", "1,0,2", "1,1,0", "32768,1,1",
                 "1,32768,1", "1,1,128", "1.5,1,2", "1,1,nan", "1, 1,2", "١,1,2", "1,,2", "a,b,c",
                 "1;1;2"]


@pytest.fixture
def paths(tmp_path):
    """Files of every kind the path options must refuse or accept."""
    p = {}
    p["dir"] = str(tmp_path)
    p["file"] = str(tmp_path / "file")
    open(p["file"], "w").close()
    p["fifo"] = str(tmp_path / "fifo")
    os.mkfifo(p["fifo"])
    p["sock"] = str(tmp_path / "sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(p["sock"])
    p["missing_dir_file"] = str(tmp_path / "nowhere" / "x.log")
    p["new"] = str(tmp_path / "new.log")
    p["trailing_slash"] = str(tmp_path / "new.d") + "/"
    yield p
    s.close()


def bad_table(paths):
    """(command, option, bad value): every option of every command that takes a value."""
    selectors = {
        "--sport": PORTS_BAD, "--dport": PORTS_BAD, "--src": CIDR_BAD, "--dst": CIDR_BAD,
        "--state": STATE_BAD, "--pid": _int_bad(1, options.PID_MAX),
        "--uid": _int_bad(0, options.UID_MAX), "--comm": COMM_BAD, "--cgroup": CGROUP_BAD,
        "--netns": ["", " ", ".", "..", paths["file"], paths["dir"], paths["fifo"], paths["sock"],
                    "/proc/self/ns/mnt", "/proc/self/ns/user", "tcpidle-no-such-ns", "١", "0"],
        "--idle-metric": ["", "bogus", "DATA"],
        "--last-recv-limit": MS_BAD,
        "--pin-dir": ["", " ", paths["file"], paths["fifo"], paths["sock"]],
        # issue 11
        "--verdict": ["", " ", ",", "deadd", "dead,", "DEAD", "dead,bogus"],
        "--active-within": MS_BAD,
        "--middlebox": ["", " ", "aws", "0", "-3", "nan", "inf", "1e300", "١٠", "１０", "3s",
                        str(7 * 86400 + 1)],
        "--risk-fraction": ["", "0", "-0.5", "1.5", "nan", "inf", "٠.5", "half"],
    }
    logs = ["", " ", paths["dir"], paths["fifo"], paths["sock"], paths["missing_dir_file"],
            paths["trailing_slash"]]
    kill = {"--idle-time": MS_BAD, "--proc-action": ["", "bogus"], "--logfile": logs}
    table = {
        "audit": dict(selectors, **{"--min-idle": MS_BAD, "--watch": S_BAD,
                                    "--map-size": _int_bad(1, 1 << 24),
                                    "--by": ["", "bogus", "DPORT", "OWNER", "uid"]}),
        "kill": dict(selectors, **kill, **{"--interval": S_BAD,
                                           "--destroy-with": ["", "bogus", "BPF", "ebpf"]}),
        "track": dict(selectors, **kill, **{
            "--interval": S_BAD, "--map-size": _int_bad(1, 1 << 24),
            "--bpf-hook": ["", "bogus"], "--max-kills-per-interval": _int_bad(0, options.MAX_KILLS),
            "--exclude-port": PORTS_BAD, "--exclude-cidr": CIDR_BAD, "--event-log": logs,
            "--metrics-port": _int_bad(1, 65535),
            "--metrics-addr": ["", " ", "not a host", "fe80::1%lo", "-x", "a..b"],
            "--keepalive": KA_TRIPLE_BAD,
            "--destroy-with": ["", "bogus", "BPF", "ebpf"],
        }),
        "keepalive": dict(selectors, **{
            "--idle-time": MS_BAD, "--logfile": logs, "--exclude-port": PORTS_BAD,
            "--exclude-cidr": CIDR_BAD, "--idle": KA_IDLE_BAD, "--interval": KA_IDLE_BAD,
            "--count": KA_COUNT_BAD,
        }),
        "explain": dict(selectors, **{"--idle-time": MS_BAD, "--exclude-port": PORTS_BAD,
                                      "--exclude-cidr": CIDR_BAD}),
    }
    return table


# What each command needs besides the option under test: a selector (so that kill's
# "needs a selector" guard cannot be what answers), and explain's CONNECTION.
BASE = {"audit": ["-d", "1"], "kill": ["-d", "1"], "track": ["-d", "1"],
        "explain": ["4097", "-d", "1"],
        "keepalive": ["-d", "1", "--idle", "1", "--interval", "1", "--count", "2"]}
COMMANDS = list(BASE)


def good_table(paths):
    return {
        "--sport": ["22", "22,8000-8100", "1-65535"], "--dport": ["443"],
        "--src": ["10.0.0.0/8", "192.0.2.7", "::1", "::ffff:10.0.0.0/104", "10.0.0.0/255.0.0.0"],
        "--dst": ["fd00::/64,10.1.0.0/16"], "--state": ["established", "all", "syn-sent,time-wait"],
        "--pid": ["1", str(options.PID_MAX)], "--uid": ["0", "1000", str(options.UID_MAX)],
        "--comm": ["nginx", "x" * 15, "café"], "--cgroup": ["/", "/system.slice/"],
        "--netns": ["/proc/self/ns/net", str(os.getpid())],
        "--idle-metric": ["data", "any"], "--last-recv-limit": ["0", "1000", "1e3"],
        "--pin-dir": [paths["dir"], paths["new"]],
        "--idle-time": ["0", "600000", "0.5", ".5", "1e3", "+7", str(options.MAX_MS)],
        "--proc-action": ["shutdown", "kill"],
        "--destroy-with": ["auto", "netlink", "bpf", "proc"],
        "--logfile": [paths["new"], paths["file"], "/dev/null"],
        "--min-idle": ["0", "1.5"], "--watch": ["0.01", "10", "86400"],
        "--by": ["dport", "sport", "netns", "owner"],
        "--map-size": ["1", "65536"], "--interval": ["0.2", "10", "1e1"],
        "--bpf-hook": ["auto", "tracepoint"], "--max-kills-per-interval": ["0", "100"],
        "--exclude-port": ["22"], "--exclude-cidr": ["10.0.0.0/8"],
        "--event-log": [paths["new"]], "--metrics-port": ["1", "9733", "65535"],
        "--metrics-addr": ["127.0.0.1", "::1", "0.0.0.0", "localhost", "node-1.example"],
        "--verdict": ["dead", "dead,zero-window", "close-wait", " quiet , unknown "],
        "--active-within": ["0", "60000", "1.5e3"],
        "--middlebox": ["aws-nlb", "aws-nat", "azure-lb", "gcp-nat", "gce-lb", "AWS-NLB", "3", "2.5",
                        str(7 * 86400)],
        "--risk-fraction": ["0.5", "1", ".25"],
        "--keepalive": ["1,1,2", "60,10,6", "32767,32767,127"],
        "--idle": ["1", "60", "32767"], "--count": ["1", "6", "127"],
    }


# Where one spelling means another thing in one command: keepalive's --interval is the
# probe interval (whole seconds), kill's and track's the poll period.
GOOD_BY_COMMAND = {"keepalive": {"--interval": ["1", "10", "32767"]}}


def parse(command, args):
    """Parse (and check) a command line without running it; the parsed params."""
    cmd = cli.cli.commands[command]
    ctx = cmd.make_context(command, list(args))
    return ctx.params


def error_line(command, args):
    """The one line main() would print for this command line (AssertionError if none)."""
    try:
        parse(command, args)
    except click.UsageError as exc:
        return "tcpidle: error: " + cli._one_line(exc.format_message())
    except UsageError as exc:
        return "tcpidle: error: " + cli._one_line(str(exc))
    raise AssertionError("accepted: %s %s" % (command, args))


def _cases(paths, table_fn):
    for command, opts in table_fn(paths).items():
        for option, values in opts.items():
            for value in values:
                yield command, option, value


def _value_options(command):
    return {next(o for o in p.opts if o.startswith("--")) for p in cli.cli.commands[command].params
            if isinstance(p, click.Option) and not p.is_flag and not p.count}


def test_every_option_with_a_value_is_in_the_tables(tmp_path):
    paths = {k: str(tmp_path / k) for k in ("dir", "file", "fifo", "sock", "missing_dir_file",
                                            "new", "trailing_slash")}
    bad, good = bad_table(paths), good_table(paths)
    assert set(COMMANDS) == set(cli.cli.commands) - {"doctor"}, (  # doctor: test_doctor.py
        "a command missing from these tables: give it a BASE and a bad_table entry")
    for command in COMMANDS:
        assert _value_options(command) == set(bad[command]), command
        assert _value_options(command) <= set(good), command


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_values_are_one_line_naming_the_option(paths, command):
    for cmd, option, value in _cases(paths, bad_table):
        if cmd != command:
            continue
        line = error_line(command, BASE[command] + [option, value])
        assert "\n" not in line
        assert option in line or any(o in line for o in _spellings(command, option)), (
            option, value, line)


def _spellings(command, option):
    for p in cli.cli.commands[command].params:
        if option in getattr(p, "opts", ()):
            return p.opts
    return ()


@pytest.mark.parametrize("command", COMMANDS)
def test_good_values_are_accepted(paths, command):
    reader = os.open(paths["fifo"], os.O_RDONLY | os.O_NONBLOCK)  # a FIFO with a reader is fine
    try:
        good = good_table(paths)
        for option in sorted(_value_options(command)):
            values = GOOD_BY_COMMAND.get(command, {}).get(option, good[option])
            for value in values + ([paths["fifo"]] if option in ("--logfile", "--event-log")
                                   else []):
                parse(command, BASE[command] + [option, value])
    finally:
        os.close(reader)
    assert not os.path.exists(paths["new"]), "checking a log path must not create it"


@pytest.mark.parametrize("text, expected", [
    ("0", 0.0), ("600000", 600000.0), ("1e3", 1000.0), (".5", 0.5), ("+7", 7.0),
])
def test_milliseconds_convert(text, expected):
    assert options.milliseconds().convert(text, None, None) == expected


def test_numbers_from_defaults_are_checked_too():
    assert options.seconds().convert(10.0, None, None) == 10.0
    with pytest.raises(UsageError, match="finite"):
        options.seconds().convert(float("nan"), None, None)
    with pytest.raises(UsageError, match="at most"):
        options.milliseconds().convert(float(options.MAX_MS) * 2, None, None)
    assert options.integer(0, 5).convert(3, None, None) == 3
    with pytest.raises(UsageError, match="not a number"):
        options.integer(0, 5).convert(True, None, None)


@pytest.mark.parametrize("value, reason", [
    ("nan", "not a finite number"), ("inf", "not a finite number"),
    ("٣", "not a number written in ASCII digits"), ("1e300", "must be at most"),
    ("-1", "must not be negative"),
])
def test_number_reasons(value, reason):
    line = error_line("kill", ["-d", "1", "-t", value])
    assert line == "tcpidle: error: --idle-time %r: %s" % (value, reason) or reason in line, line


def test_period_bounds_are_said():
    assert "must be positive" in error_line("kill", ["-d", "1", "-i", "0"])
    assert "at least 0.01 s" in error_line("kill", ["-d", "1", "-i", "0.001"])
    assert "at most 86400 s" in error_line("track", ["-d", "1", "-i", "1e300"])


def test_empty_owner_selector_is_no_selector():
    for option in ("--comm", "--cgroup", "--pid", "--uid"):
        line = error_line("kill", [option, ""])
        assert option in line and "selector" not in line, line


def test_fifo_without_reader_is_refused_at_once(paths):
    line = error_line("track", ["-d", "1", "--event-log", paths["fifo"]])
    assert "FIFO that no process reads" in line


def test_netns_reasons(paths):
    assert "a mount namespace" in error_line("audit", ["--netns", "/proc/self/ns/mnt"])
    assert "a directory" in error_line("audit", ["--netns", paths["dir"]])
    assert "no namespace file" in error_line("audit", ["--netns", paths["file"]])
    assert "empty" in error_line("audit", ["--netns", ""])
