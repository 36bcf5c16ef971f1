"""Shared pytest wiring: the `kernel` skip rule and the lab fixtures.

Tests marked ``kernel`` need root (namespaces, SOCK_DESTROY, BPF); they are
skipped with a reason when not run as root.  CI runs as root, so there they
run.  The fixtures give a test throw-away network namespaces, connection
farms inside them, and a way to run the tcpidle CLI inside a namespace.
"""

import json
import os
import resource
import shutil
import subprocess
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from lab.farm import Farm  # noqa: E402
from lab.netns import NetnsFactory, join_veth, remove_stale  # noqa: E402

NS_PREFIX = "tilab-"

# How the tests invoke the tool: the interpreter running pytest (the venv's),
# so the same tcpidle package is used inside and outside namespaces.
TCPIDLE = [sys.executable, "-m", "tcpidle"]


# The kernel tier holds thousands of sockets in one process (2,000
# connections = 4,000 descriptors in test_diag_kernel): far above the soft
# limit of 1024 that most systems start processes with.
FDS_NEEDED = 8192


def raise_fd_limit(needed=FDS_NEEDED):
    """Raise RLIMIT_NOFILE's soft limit to the hard one; a note if that is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    top = float("inf") if hard == resource.RLIM_INFINITY else hard
    if top < needed:
        return ("file descriptors: hard limit %d < %d, tests with thousands of sockets "
                "will fail with EMFILE (raise it: ulimit -Hn %d)" % (hard, needed, needed))
    return "file descriptors: soft limit raised from %s to %s" % (soft, hard) if soft != hard \
        else None


_FD_NOTE = raise_fd_limit()


def pytest_report_header(config):
    return [_FD_NOTE] if _FD_NOTE else []


def _kernel_skip_reason():
    if os.geteuid() != 0:
        return "kernel test: needs root (network namespaces, SOCK_DESTROY); run as root"
    if shutil.which("ip") is None:
        return "kernel test: needs iproute2 (`ip`)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _kernel_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _remove_stale_namespaces():
    """Namespaces from earlier runs that died before their teardown."""
    if _kernel_skip_reason() is None:
        remove_stale(NS_PREFIX)
    yield


# -- namespaces ---------------------------------------------------------------


@pytest.fixture
def make_netns():
    """Factory: make_netns() -> Netns, with `lo` up; all deleted on teardown."""
    factory = NetnsFactory(NS_PREFIX)
    yield factory
    factory.cleanup()


@pytest.fixture
def bpffs(tmp_path):
    """A BPF filesystem of the test's own, visible inside `ip netns exec`; unmounted after."""
    from tcpidle.probe import mount_bpffs

    d = str(tmp_path / "bpffs")
    assert mount_bpffs(d) is True
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=False)


@pytest.fixture
def netns(make_netns):
    """One fresh namespace."""
    return make_netns()


@pytest.fixture
def veth_pair(make_netns):
    """Two namespaces (a, b) joined by veth0 (in a) <-> veth1 (in b).

    a has 10.231.0.1/24 and fd00:231::1/64, b has 10.231.0.2 and fd00:231::2.
    """
    a, b = make_netns(), make_netns()
    join_veth(a, b)
    return a, b


@pytest.fixture
def sockets():
    """A list the test appends its own sockets to (lab.tcp); all closed on teardown."""
    made = []
    yield made
    for s in made:
        s.close()


# -- farms ----------------------------------------------------------------------


@pytest.fixture
def make_farm():
    """Factory: make_farm(ns, max_seconds=120) -> Farm; all stopped on teardown."""
    farms = []

    def start(ns, max_seconds=120.0):
        farm = Farm(ns.name if hasattr(ns, "name") else ns, max_seconds=max_seconds)
        farms.append(farm)
        return farm

    yield start
    for farm in farms:
        farm.stop()


# -- the tool -------------------------------------------------------------------


def tcpidle_argv(ns, *args, prefix=()):
    """argv running tcpidle inside namespace `ns` (optionally under `prefix`,
    e.g. a setpriv invocation)."""
    name = ns.name if hasattr(ns, "name") else ns
    return (["ip", "netns", "exec", name] + list(prefix) + TCPIDLE
            + [str(a) for a in args])


@pytest.fixture(name="tcpidle_argv")
def _tcpidle_argv_fixture():
    """tcpidle_argv(ns, *args, prefix=()) -> argv (for background runs with Popen)."""
    return tcpidle_argv


@pytest.fixture
def run_tcpidle():
    """run_tcpidle(ns, *args, prefix=(), timeout=60) -> CompletedProcess (text)."""

    def run(ns, *args, prefix=(), timeout=60):
        return subprocess.run(tcpidle_argv(ns, *args, prefix=prefix), cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=timeout)

    return run


def parse_json_lines(text):
    """Every non-empty line of `text` as a JSON object (fails loudly otherwise)."""
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                raise AssertionError("not a JSON line: %r (%s)" % (line, exc))
    return out


@pytest.fixture
def json_lines():
    return parse_json_lines
