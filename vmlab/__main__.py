"""scripts/lab [KERNEL...] [options] [-- PYTEST ARGS]: the kernel tier on Debian kernels.

Each KERNEL (5.10, 6.1, 6.12; default all three) is fetched (cached), booted
under QEMU with this machine's root file system, and runs PLANS[KERNEL] (or
the given pytest arguments) from this checkout.  One line per kernel says
what happened; the exit status is 0 only if every kernel booted and passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence

from . import kernels, results, vm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What each kernel runs by default (CI runs these; README says why and how long).
# Under TCG a bcc compile takes 20-60 s, so the plans keep the probe tests that
# prove each hook (the header-less compile, the hook chosen, every hook forced,
# ground-truth precision per hook, the selftest, lazy cookies, every branch
# compiling), the INET_DIAG tier (dumps, one walk, SOCK_DESTROY, TIME_WAIT
# destroy), which compiles nothing, and `tcpidle doctor` (its answers are
# checked against the kernel and published as lab facts).
PROBE_PROOFS = ("header_less or auto_hook or forced_hook or precision or lazy_cookie "
                "or readers_agree or every_hook_branch or entries_disappear")
SUBSET = ["tests/kernel/test_diag_kernel.py", "tests/kernel/test_probe_kernel.py",
          "tests/kernel/test_doctor_kernel.py",
          "-k", "test_diag_kernel or test_doctor_kernel or " + PROBE_PROOFS]
# 5.10 also proves the LRU path's detached probe (the tracker without bcc,
# the probe recording while no tracker runs, its destroy hook pinned, reuse,
# cleanup): its kernel is where auto takes that path (no per-socket storage
# for tracing programs before 5.11); one more compile, ~1-2 min under TCG.
DETACHED_LRU = "lru_probe_is_pinned"
SUBSET_510 = SUBSET[:3] + ["tests/kernel/test_detached_probe.py", "-k",
                           SUBSET[-1] + " or " + DETACHED_LRU]
PLANS: Dict[str, List[str]] = {
    "5.10": SUBSET_510,
    "6.1": SUBSET,
    "6.12": SUBSET,
}
ORDER = ("5.10", "6.1", "6.12")
# Hooks that must attach on each kernel (tests fail, not skip, if one does
# not): Debian builds all three with BTF, kprobes and the tcp tracepoints.
ALL_HOOKS = "tp_btf,raw_tracepoint,kprobe,tracepoint"
EXPECTED_HOOKS: Dict[str, str] = {"5.10": ALL_HOOKS, "6.1": ALL_HOOKS, "6.12": ALL_HOOKS}


def say(msg: str) -> None:
    print("lab: %s" % msg, flush=True)


def preflight() -> Optional[str]:
    """Why no VM can boot here, or None."""
    if os.geteuid() != 0:
        return "run me as root (the guest runs the kernel tier as root)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not found (Debian package qemu-system-x86; scripts/setup lab installs it)"
    if shutil.which("vng") is None:
        return "vng (virtme-ng) not found on PATH (scripts/setup lab installs it into .venv)"
    if shutil.which("busybox") is None:
        return "busybox not found (Debian package busybox-static)"
    if not os.path.exists(os.path.join(REPO, ".venv", "bin", "python")):
        return "no .venv in %s (run scripts/setup env)" % REPO
    return None


# Directories the guest's init mounts afresh (tmpfs) over this machine's root:
# what the guest writes there (junit.xml, env) is lost with the VM.
GUEST_PRIVATE = ("/tmp", "/var/tmp", "/var/log", "/run", "/dev")


def guest_private(path: str) -> Optional[str]:
    """The directory of GUEST_PRIVATE that `path` is in, or None (pure)."""
    real = os.path.realpath(path)
    for top in GUEST_PRIVATE:
        if real == top or real.startswith(top + "/"):
            return top
    return None


def parse_args(argv: Sequence[str]):
    argv = list(argv)
    pytest_args: Optional[List[str]] = None
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="scripts/lab", description=__doc__.split("\n\n")[1])
    p.add_argument("kernels", nargs="*", metavar="KERNEL",
                   help="kernel series: %s (default: all)" % ", ".join(ORDER))
    p.add_argument("--refresh", action="store_true",
                   help="ask apt for the newest release of each series (default: the cached one)")
    p.add_argument("--no-headers", action="store_true",
                   help="hide the kernel's own headers in the guest (the header-less path)")
    p.add_argument("--timeout", type=float, default=2400.0, metavar="S",
                   help="give up on a kernel after S seconds (default 2400)")
    p.add_argument("--kvm", action="store_true", help="use KVM (default: TCG; KVM fails here)")
    p.add_argument("--systemd", action="store_true",
                   help="boot with systemd as init and run the tcpidle unit for real "
                        "(deploy/systemd/vm-check.sh) instead of pytest")
    p.add_argument("--cache", default=os.environ.get("TCPIDLE_LAB_CACHE", kernels.DEFAULT_CACHE),
                   help="cache directory (default %(default)s)")
    a = p.parse_args(argv)
    for k in a.kernels:
        if k not in kernels.SERIES:
            p.error("unknown KERNEL %r (want %s)" % (k, ", ".join(ORDER)))
    if a.timeout <= 0:
        p.error("--timeout must be positive")
    private = guest_private(a.cache)
    if private:
        p.error("--cache %s (or TCPIDLE_LAB_CACHE): the guest mounts a fresh %s, so its test "
                "report would never reach this side; use a directory elsewhere (default %s)"
                % (a.cache, private, kernels.DEFAULT_CACHE))
    a.pytest_args = pytest_args
    return a


def _kernel(series: str, a):
    """The kernel tree of `series` from the cache (fetched if missing), or None, said."""
    try:
        return kernels.fetch(series, a.cache, a.refresh, say=lambda m: say("%s: %s" % (series, m)))
    except kernels.LabError as e:
        say("%s: FAILED, no kernel: %s" % (series, e))
        return None


def _host_env() -> Dict[str, str]:
    """Our environment with this checkout's .venv first on PATH (vng, the guest's python)."""
    env = dict(os.environ)
    env["PATH"] = os.path.join(REPO, ".venv", "bin") + os.pathsep + env.get("PATH", "")
    return env


def run_one(series: str, a) -> bool:
    t0 = time.monotonic()
    tree = _kernel(series, a)
    if tree is None:
        return False
    # A directory of its own for each run: several runs (other checkouts,
    # other users of the cache) may boot the same kernel at once.
    out = os.path.join(a.cache, "runs", tree.release,
                       time.strftime("%Y%m%d-%H%M%S") + "-%d" % os.getpid())
    args = a.pytest_args if a.pytest_args is not None else PLANS[series]
    say("%s: booting %s (Debian %s) under QEMU, pytest %s; console: %s"
        % (series, tree.release, tree.version, " ".join(args), os.path.join(out, "console.log")))
    env = _host_env()
    boot = vm.run(tree, REPO, out, args, headers=not a.no_headers, timeout=a.timeout,
                  kvm=a.kvm, env=env, guest_env={"TCPIDLE_LAB_HOOKS": EXPECTED_HOOKS[series]})
    took = results.duration(time.monotonic() - t0)
    if not boot.started:
        say("%s: FAILED, %s did not boot (%s; %d tries, %s): %s"
            % (series, tree.release, boot.why, boot.attempts, took, boot.log))
        return False
    try:
        with open(os.path.join(out, "junit.xml")) as f:
            res = results.parse_junit(f.read())
    except (OSError, ValueError) as e:
        res = None
        why = "no test report (%s)" % e
    try:
        with open(os.path.join(out, "env")) as f:
            genv = results.parse_env(f.read())
    except OSError:
        genv = {}
    hdr = {"own": "own headers", "none": "no own headers"}.get(genv.get("headers", ""), "headers ?")
    if res is None:
        say("%s: FAILED, %s: %s%s; %s: %s" % (series, tree.release, why,
            ", timed out" if boot.timed_out else "", took, boot.log))
        return False
    hook = res.facts.get("hook", "?")
    ok = boot.rc == 0 and res.failed == 0 and not boot.timed_out
    say("%s %s: %s, hook %s, %s: %s in %s%s" % (
        "ok" if ok else "FAILED", tree.release, hdr, hook, "pytest " + " ".join(args),
        res.counts(), took, "" if ok else " (pytest exit %s%s; console: %s)" % (
            boot.rc, ", timed out" if boot.timed_out else "", boot.log)))
    for name in res.failures:
        say("    failed on %s: %s" % (tree.release, name))
    if res.facts:
        say("    facts on %s: %s" % (tree.release, ", ".join(
            "%s=%s" % kv for kv in sorted(res.facts.items()))))
    return ok


def run_systemd(series: str, a) -> bool:
    """--systemd: the unit installed as README.md says, started, scraped, reloaded, stopped."""
    t0 = time.monotonic()
    tree = _kernel(series, a)
    if tree is None:
        return False
    out = os.path.join(a.cache, "runs", tree.release + "-systemd")
    say("%s: booting %s with systemd as init, the tcpidle unit; console: %s"
        % (series, tree.release, os.path.join(out, "console.log")))
    env = _host_env()
    passed, lines, boot = vm.run_systemd(tree, REPO, out, timeout=a.timeout, kvm=a.kvm, env=env)
    for line in lines:
        say("    %s: %s" % (tree.release, line))
    took = results.duration(time.monotonic() - t0)
    if passed:
        say("ok %s: the systemd unit runs (%s)" % (tree.release, took))
    else:
        say("%s: FAILED, the systemd unit%s (%s): %s" % (
            series, ": " + boot.why if boot.why else "", took, boot.log))
    return passed


def main(argv: Sequence[str]) -> int:
    a = parse_args(argv)
    why = preflight()
    if why:
        say("FAILED, no VM can boot: %s" % why)
        return 1
    t0 = time.monotonic()
    series = a.kernels or list(ORDER)
    ok = [(run_systemd if a.systemd else run_one)(s, a) for s in series]
    say("%d of %d kernels passed in %s" % (sum(ok), len(ok), results.duration(time.monotonic() - t0)))
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
