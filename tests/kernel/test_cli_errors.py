"""Bad input and missing privilege: one error line, the documented exit status,
and not one connection harmed.

Every bad command line below also carries a valid selector for the farm's
port and the default `-t 0` (every matching connection), so a CLI that
ignored the bad value and went on would destroy the farm's connections; the
farm is checked (alive, no error, still round-trips data) after each case.
"""

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
