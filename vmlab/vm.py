"""Boot one lab kernel with virtme-ng and run vmlab/guest.sh inside.

Owns the virtme-ng command line and the VM's life: its output goes to a log
file, it is killed (with its QEMU) after a deadline, and a boot that dies
before the guest script starts is tried again once.

Facts of QEMU under TCG on the development machine that shape this:
- KVM is not used unless asked (`kvm=True`): /dev/kvm exists there but QEMU
  aborts ("failed to set MSR 0x10a") or hangs with it.
- Debian's 6.12 kernel sometimes dies early in boot with "Oops: int3" in
  code the kernel is patching (a static key flipped while the other vCPU
  runs it; multi-threaded TCG does not make the patch visible in time).  It
  happens before init, so the retry is safe: a VM that got as far as the
  guest script is never restarted, its failures are the tests'.
- virtme-ng's script channel (virtio-serial) is absent in this set-up, so the
  script's output arrives on the serial console mixed with kernel messages,
  and vng's exit status is not the script's: guest.sh writes its status to
  a file on the shared root file system instead.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .kernels import KernelTree

STARTED = "tcpidle-lab: kernel "  # the guest script's first line
GUEST_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest.sh")


@dataclass
class Boot:
    """What one VM run left: did the guest script start, its exit status, time, log."""

    started: bool
    rc: Optional[int]
    seconds: float
    log: str
    attempts: int
    timed_out: bool = False
    why: str = ""


def vng_argv(tree: KernelTree, guest_cmd: str, cpus: int = 2, memory: str = "4G",
             kvm: bool = False, vng: str = "vng") -> List[str]:
    """The virtme-ng command line for one run (pure)."""
    # --verbose: the script's output arrives on the boot console (see above);
    # without it vng shows nothing when its output is not a terminal.
    argv = [vng, "--verbose", "--run", tree.image, "--memory", memory, "--cpus", str(cpus),
            "--rw"]
    if not kvm:
        argv.append("--disable-kvm")
    return argv + ["--", guest_cmd]


def guest_command(out_dir: str, pytest_args: Sequence[str], headers: bool = True,
                  guest_env: Optional[dict] = None) -> str:
    """The shell command the guest runs (pure); guest_env: variables for the tests."""
    words = ["env"] + ["%s=%s" % kv for kv in sorted((guest_env or {}).items())]
    words += ["sh", GUEST_SCRIPT, out_dir] + ([] if headers else ["--no-headers"])
    return " ".join(shlex.quote(w) for w in words + ["--"] + list(pytest_args))


def _why_not_started(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            text = f.read()
    except OSError:
        return "no log"
    for marker in ("Kernel panic", "Oops:", "Unable to mount root", "not syncing",
                   "No such file or directory", "not found"):
        for line in text.splitlines():
            if marker in line:
                return " ".join(line.split())[-160:]
    tail = [ln for ln in text.splitlines() if ln.strip()][-1:]
    return " ".join(tail[0].split())[-160:] if tail else "no output"


def run(tree: KernelTree, repo: str, out_dir: str, pytest_args: Sequence[str],
        headers: bool = True, timeout: float = 3600.0, kvm: bool = False,
        tries: int = 2, env: Optional[dict] = None, guest_env: Optional[dict] = None) -> Boot:
    """Boot `tree`, run pytest with `pytest_args` in `repo` inside; see Boot."""
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "console.log")
    rc_path = os.path.join(out_dir, "rc")
    cmd = vng_argv(tree, guest_command(out_dir, pytest_args, headers, guest_env), kvm=kvm)
    t0 = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        for stale in (rc_path, os.path.join(out_dir, "junit.xml")):
            if os.path.exists(stale):
                os.unlink(stale)
        with open(os.path.join(out_dir, "command"), "w") as f:
            f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=repo, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with open(log_path, errors="replace") as f:
            started = STARTED in f.read()
        rc = None
        try:
            with open(rc_path) as f:
                rc = int(f.read().strip())
        except (OSError, ValueError):
            pass
        if started or timed_out or attempt >= tries:
            why = "" if started else _why_not_started(log_path)
            if timed_out:
                why = "no result after %.0f s" % timeout
            return Boot(started, rc, time.monotonic() - t0, log_path, attempt, timed_out, why)
        os.rename(log_path, os.path.join(out_dir, "console.attempt%d.log" % attempt))


# ---------------------------------------------------------------------------
# systemd as init: the unit in deploy/systemd, really run (scripts/lab --systemd)

SYSTEMD_SCRIPT = os.path.join("deploy", "systemd", "vm-check.sh")
SYSTEMD_MARK = "tcpidle-sd: "
# Units that must not run on a root file system shared with the host, even a
# read-only one (tmpfiles' "D /tmp" would empty the host's /tmp on a
# writable one), or that only cost boot time here.
SYSTEMD_MASKS = ("systemd-tmpfiles-setup.service", "systemd-tmpfiles-clean.timer")


def systemd_argv(tree: KernelTree, script: str, cpus: int = 2, memory: str = "2G",
                 kvm: bool = False, vng: str = "vng") -> List[str]:
    """virtme-ng with systemd as init running `script` as its only job, then powering off (pure).

    The host's root stays read-only (no --rw): systemd's boot would write to
    it.  The guest sees the host's /.dockerenv, so systemd believes it runs in
    a container and ignores /proc/cmdline; its settings go in
    $SYSTEMD_PROC_CMDLINE instead (the kernel hands variables without a dot
    to init's environment).  systemd.run= makes the script the unit
    kernel-command-line.service, and systemd.unit= boots just that.
    """
    settings = ["systemd.unit=kernel-command-line.service", "systemd.run=" + script,
                "systemd.run_success_action=poweroff", "systemd.run_failure_action=poweroff",
                "systemd.show_status=0"] + ["systemd.mask=" + u for u in SYSTEMD_MASKS]
    argv = [vng, "--verbose", "--run", tree.image, "--systemd", "--memory", memory,
            "--cpus", str(cpus), "--append", 'SYSTEMD_PROC_CMDLINE="%s"' % " ".join(settings)]
    if not kvm:
        argv.append("--disable-kvm")
    return argv


def systemd_lines(console: str) -> List[str]:
    """The script's report lines in a console log (pure): after the "tcpidle-sd: " mark."""
    out = []
    for line in console.splitlines():
        i = line.find(SYSTEMD_MARK)
        if i >= 0:
            out.append(line[i + len(SYSTEMD_MARK):].strip())
    return out


def run_systemd(tree: KernelTree, repo: str, out_dir: str, timeout: float = 1800.0,
                kvm: bool = False, env: Optional[dict] = None) -> Tuple[bool, List[str], Boot]:
    """Boot `tree` with systemd as init running deploy/systemd/vm-check.sh; (passed, lines, boot)."""
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "console.log")
    cmd = systemd_argv(tree, os.path.join(repo, SYSTEMD_SCRIPT), kvm=kvm)
    with open(os.path.join(out_dir, "command"), "w") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
    t0 = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=repo, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with open(log_path, errors="replace") as f:
        lines = systemd_lines(f.read())
    passed = any(line.startswith("PASS") for line in lines) and not timed_out
    why = "no result after %.0f s" % timeout if timed_out else ""
    boot = Boot(bool(lines), None, time.monotonic() - t0, log_path, 1, timed_out, why)
    return passed, lines, boot
