"""A kernel without bpf_sock_destroy() (before 6.5: the lab's 5.10 and 6.1): the BPF
iterator says it is unavailable, netlink is used, and `--destroy-with bpf` exits 1.

Runs only where the kfunc is missing (skipped on 6.12 and 6.18, whose
iterator tests are test_iterdestroy_kernel.py and test_kill_bpf_e2e.py).
Ground truth is each socket's own TCP_INFO state.
"""

from __future__ import annotations

import pytest

from test_iterdestroy_kernel import Pairs, closed

pytestmark = pytest.mark.kernel


@pytest.fixture(autouse=True)
def _without_kfunc():
    from tcpidle import kdestroy
    if kdestroy.unavailable() is None:
        pytest.skip("this kernel has bpf_sock_destroy")


def test_destroy_with_bpf_is_a_clear_exit_1_and_touches_nothing(netns, run_tcpidle, record_property):
    p = Pairs(netns, 7301, 2)
    try:
        r = run_tcpidle(netns, "kill", "-d", "7301", "--destroy-with", "bpf", "--disable-syslog",
                        timeout=120)
        assert r.returncode == 1, r.stderr
        line, = [x for x in r.stderr.splitlines() if x.strip()]
        assert line.startswith("tcpidle: error: --destroy-with bpf: ") and "Traceback" not in line
        assert "bpf_sock_destroy" in line or "BTF" in line or "HZ" in line, line
        record_property("lab_bpf_destroy", "unavailable: " + line.split(": ", 3)[-1])
        assert not any(closed(p.clients + p.servers))
    finally:
        p.close()


def test_auto_says_the_iterator_is_unavailable_and_destroys_by_netlink(netns, run_tcpidle):
    p = Pairs(netns, 7302, 2)
    try:
        r = run_tcpidle(netns, "kill", "-d", "7302", "-v", "--disable-syslog", timeout=120)
        assert r.returncode == 0, r.stderr
        assert "destroy: netlink SOCK_DESTROY" in r.stderr
        assert "the BPF iterator is unavailable: " in r.stderr
        assert "in the kernel (BPF TCP iterator" not in r.stderr
        assert closed(p.clients) == [True, True]
    finally:
        p.close()


@pytest.mark.parametrize("args", [["kill", "-i", "1"], ["track", "--interval", "1"]])
def test_polls_and_the_tracker_with_destroy_with_bpf_exit_1_before_anything(
        netns, run_tcpidle, tmp_path, args):
    """kill -i and track take --destroy-with bpf too: on a kernel without the kfunc
    they exit 1 with the reason before polling, attaching or pinning anything."""
    p = Pairs(netns, 7303, 2)
    pins = str(tmp_path / "pins")
    try:
        r = run_tcpidle(netns, *args, "-d", "7303", "-t", "1", "--destroy-with", "bpf",
                        "--pin-dir", pins, "--disable-syslog", timeout=120)
        assert r.returncode == 1, r.stderr
        line, = [x for x in r.stderr.splitlines() if x.strip()]
        assert line.startswith("tcpidle: error: --destroy-with bpf: "), line
        assert not any(closed(p.clients + p.servers))
        assert not (tmp_path / "pins").exists()
    finally:
        p.close()
