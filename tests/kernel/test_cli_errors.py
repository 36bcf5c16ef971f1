"""Bad input and missing privilege: one error line, the documented exit status,
and not one connection harmed.

Every bad command line below also carries a valid selector for the farm's
port and the default `-t 0` (every matching connection), so a CLI that
ignored the bad value and went on would destroy the farm's connections; the
farm is checked (alive, no error, still round-trips data) after each case.
"""

import os
import subprocess
import sys

import pytest

from lab.farm import Farm
from lab.netns import NetnsFactory

pytestmark = pytest.mark.kernel

PORT = 7001

# (id, kill arguments, strings the error line must contain)
BAD_INPUTS = [
    ("port-0", ["-d", PORT, "-d", "0"], ["--dport", "'0'"]),
    ("port-65536", ["-d", PORT, "-d", "65536"], ["--dport", "65536"]),
    ("sport-0", ["-d", PORT, "-s", "0"], ["--sport", "'0'"]),
    ("empty-list-item", ["-d", PORT, "-d", "80,,81"], ["--dport", "80,,81"]),
    ("backwards-range", ["-d", PORT, "-d", "90-80"], ["--dport", "90-80"]),
    ("not-a-port", ["-d", PORT, "-d", "abc"], ["--dport", "abc"]),
    ("cidr-prefix-33", ["-d", PORT, "--src", "10.0.0.0/33"], ["--src", "10.0.0.0/33"]),
    ("cidr-nonsense", ["-d", PORT, "--dst", "nonsense"], ["--dst", "nonsense"]),
    ("negative-idle-time", ["-d", PORT, "-t", "-5"], ["idle-time", "-5"]),
    ("negative-idle-time-alias", ["-d", PORT, "--idle_time", "-5"], ["idle", "-5"]),
    ("negative-interval", ["-d", PORT, "-i", "-1"], ["interval", "-1"]),
    ("unknown-state", ["-d", PORT, "--state", "bogus"], ["--state", "bogus"]),
    ("no-selector", [], ["selector", "--all"]),
    ("no-selector-with-options", ["-4", "-t", "0", "--state", "established"],
     ["selector", "--all"]),
    ("unknown-proc-action", ["-d", PORT, "--use-proc", "--proc-action", "bogus"],
     ["--proc-action", "bogus"]),
    # numbers: finite, in range, ASCII digits (issue 15 item 6)
    ("interval-inf", ["-d", PORT, "-i", "inf"], ["--interval", "finite"]),
    ("interval-nan", ["-d", PORT, "-i", "nan"], ["--interval", "finite"]),
    ("interval-huge", ["-d", PORT, "-i", "1e300"], ["--interval", "at most"]),
    ("interval-tiny", ["-d", PORT, "-i", "1e-300"], ["--interval", "at least"]),
    ("idle-time-inf", ["-d", PORT, "-t", "inf"], ["--idle-time", "finite"]),
    ("idle-time-nan", ["-d", PORT, "-t", "nan"], ["--idle-time", "finite"]),
    ("idle-time-arabic-digits", ["-d", PORT, "-t", "\u0663"], ["--idle-time", "ASCII"]),
    ("idle-time-underscore", ["-d", PORT, "-t", "1_0"], ["--idle-time", "ASCII"]),
    ("port-superscript", ["-d", PORT, "-d", "\u00b2"], ["--dport", "not a port number"]),
    ("port-arabic-digits", ["-d", "\u0667\u0660\u0660\u0661"], ["--dport", "not a port number"]),
    ("pid-arabic-digits", ["-d", PORT, "--pid", "\u0661"], ["--pid", "ASCII"]),
    ("last-recv-limit-nan", ["-d", PORT, "--last-recv-limit", "nan"], ["--last-recv-limit"]),
    # an empty owner selector is no selector: these alone would select everything
    ("empty-cgroup", ["--cgroup", ""], ["--cgroup", "empty"]),
    ("empty-comm", ["--comm", ""], ["--comm", "empty"]),
    ("empty-pid", ["--pid", ""], ["--pid", "empty"]),
    ("empty-uid", ["--uid", ""], ["--uid", "empty"]),
    ("empty-dport", ["--dport", ""], ["--dport"]),
    ("comm-too-long", ["--comm", "a-process-name-longer-than-15"], ["--comm", "15 bytes"]),
    ("cgroup-not-a-path", ["--cgroup", "system.slice"], ["--cgroup", "starts with /"]),
    # selectors that cannot mean one thing
    ("ipv6-scope-id", ["-d", PORT, "--dst", "::1%lo"], ["--dst", "scope id"]),
    ("cidr-host-bits", ["--dst", "127.0.0.1/8"], ["--dst", "host bits", "127.0.0.0/8"]),
    # paths
    ("netns-empty", ["-d", PORT, "--netns", ""], ["--netns", "empty"]),
    ("netns-regular-file", ["-d", PORT, "--netns", "/etc/hostname"],
     ["--netns", "not a network namespace"]),
    ("netns-directory", ["-d", PORT, "--netns", "/tmp"], ["--netns", "a directory"]),
    ("netns-mount-ns", ["-d", PORT, "--netns", "/proc/self/ns/mnt"], ["--netns", "mount namespace"]),
    ("logfile-empty", ["-d", PORT, "-f", ""], ["--logfile", "empty"]),
    ("logfile-directory", ["-d", PORT, "-f", "/tmp"], ["--logfile", "directory"]),
    ("logfile-no-such-dir", ["-d", PORT, "-f", "/nonexistent-tcpidle/x.log"],
     ["--logfile", "no such directory"]),
    ("pin-dir-empty", ["-d", PORT, "--pin-dir", ""], ["--pin-dir", "empty"]),
    ("pin-dir-file", ["-d", PORT, "--pin-dir", "/etc/hostname"], ["--pin-dir", "not a directory"]),
]

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
NO_CAPS = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]


@pytest.fixture(scope="module")
def lab():
    """One namespace and farm for the module: idle and active connections to PORT."""
    factory = NetnsFactory("tilab-")
    ns = factory()
    farm = Farm(ns.name, max_seconds=600)
    try:
        farm.serve([PORT])
        farm.populate([PORT], idle=2, active=1)
        yield ns, farm
    finally:
        farm.stop()
        factory.cleanup()


def assert_farm_unharmed(farm):
    st = farm.status()
    assert len(st) == 12
    for rec in st.values():
        assert rec["alive"] and rec["error"] is None and not rec["eof"], rec
    res = farm.ping()
    assert len(res) == 12 and all(res.values()), res


def assert_one_error_line(res, exit_code, needles):
    assert res.returncode == exit_code, (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("tcpidle: error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert res.stdout == "", res.stdout


@pytest.mark.parametrize("args, needles", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_usage_error_and_harms_nothing(lab, run_tcpidle, args, needles):
    ns, farm = lab
    res = run_tcpidle(ns, "kill", *args)
    assert_one_error_line(res, 2, needles)
    assert_farm_unharmed(farm)


def test_fifo_paths_are_refused_at_once(lab, run_tcpidle, tmp_path):
    """A FIFO nobody reads would block open(2) forever: refused before anything is done."""
    ns, farm = lab
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    for args, needles in [
        (["kill", "-d", PORT, "-f", fifo], ["--logfile", "FIFO"]),
        (["kill", "-d", PORT, "--pin-dir", fifo], ["--pin-dir", "a FIFO"]),
        (["kill", "-d", PORT, "--netns", fifo], ["--netns", "not a network namespace"]),
        (["track", "-d", PORT, "--event-log", fifo, "--pin-dir", str(tmp_path / "pins")],
         ["--event-log", "FIFO"]),
    ]:
        res = run_tcpidle(ns, *args, timeout=20)
        assert_one_error_line(res, 2, needles)
    assert not os.path.exists(str(tmp_path / "pins"))
    assert_farm_unharmed(farm)


def test_log_on_a_read_only_fs_is_refused(lab, run_tcpidle, tmp_path):
    """A new log file in a directory nobody can write to (here a read-only mount, which
    stops root too) is refused at parse time, not after the kills."""
    ns, farm = lab
    ro = str(tmp_path / "ro")
    os.mkdir(ro)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=4k", "tiro", ro], check=True)
    try:
        res = run_tcpidle(ns, "kill", "-d", PORT, "-f", os.path.join(ro, "kill.log"))
    finally:
        subprocess.run(["umount", ro], check=False)
    assert_one_error_line(res, 2, ["--logfile", "not writable"])
    assert_farm_unharmed(farm)


@pytest.mark.parametrize("args, needles", [
    (["--interval", "nan"], ["--interval", "finite"]),
    (["--interval", "inf"], ["--interval", "finite"]),
    (["--max-kills-per-interval", "\u0661"], ["--max-kills-per-interval", "ASCII"]),
    (["--metrics-port", "0"], ["--metrics-port", "at least 1"]),
    (["--metrics-addr", ""], ["--metrics-addr", "empty"]),
    (["--map-size", "1e300"], ["--map-size"]),
    (["--event-log", ""], ["--event-log", "empty"]),
    (["--exclude-cidr", "::1%lo"], ["--exclude-cidr", "scope id"]),
], ids=["interval-nan", "interval-inf", "max-kills-digits", "metrics-port-0", "metrics-addr-empty",
        "map-size-huge", "event-log-empty", "exclude-scope-id"])
def test_track_bad_input_touches_nothing(lab, run_tcpidle, tmp_path, args, needles):
    """The tracker refuses before attaching, pinning or killing (-t 0 would kill the farm)."""
    ns, farm = lab
    pins = str(tmp_path / "pins")
    res = run_tcpidle(ns, "track", "--disable-syslog", "-d", PORT, "--pin-dir", pins, *args,
                      timeout=30)
    assert_one_error_line(res, 2, needles)
    assert not os.path.exists(pins)
    assert_farm_unharmed(farm)


def test_audit_watch_nan_returns_at_once(lab, run_tcpidle):
    """--watch nan used to observe forever with the probe attached."""
    ns, _farm = lab
    res = run_tcpidle(ns, "audit", "--watch", "nan", timeout=20)
    assert_one_error_line(res, 2, ["--watch", "finite"])


def _nobody_can_run_tcpidle(ns):
    """uid 65534 must be able to reach the interpreter and the package."""
    res = ns.run(*NOBODY, sys.executable, "-c", "import tcpidle.cli", check=False,
                 cwd="/")
    return res.returncode == 0


@pytest.mark.parametrize("prefix", [NOBODY, NO_CAPS], ids=["uid-nobody", "root-without-caps"])
def test_kill_without_cap_net_admin_fails_cleanly(lab, run_tcpidle, prefix):
    ns, farm = lab
    if prefix is NOBODY and not _nobody_can_run_tcpidle(ns):
        pytest.skip("uid 65534 cannot read %s or the tcpidle package" % sys.executable)
    # -t 0: every connection on PORT would be a victim if the privilege check let it through.
    res = run_tcpidle(ns, "kill", "-d", PORT, "-t", "0", prefix=prefix)
    assert_one_error_line(res, 1, ["CAP_NET_ADMIN"])
    assert_farm_unharmed(farm)


def test_setpriv_really_drops_the_capability(lab):
    """Guard for the test above: under the prefixes, CapEff is empty."""
    ns, _ = lab
    for prefix in (NO_CAPS, NOBODY):
        res = ns.run(*prefix, "grep", "^CapEff:", "/proc/self/status",
                     stdout=subprocess.PIPE)
        assert res.stdout.split()[1] == "0000000000000000", res.stdout
