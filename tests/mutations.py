#!/usr/bin/env python3
"""Mutation check: every listed single-line bug must make some unit test fail.

    .venv/bin/python tests/mutations.py            all mutations
    .venv/bin/python tests/mutations.py -k uid     those whose name contains "uid"
    .venv/bin/python tests/mutations.py --list     names only

The tree (tracked and untracked files, .venv and ignored files left out) is
copied to a scratch directory; the working tree is never touched.  The
unmutated copy must pass the tests first.  Then each mutation replaces one
exact piece of code text in the copy, runs the unit tests that guard it
(no root needed: the fake netlink kernel and fake /proc trees), and puts the
text back.  A mutation is *caught* when pytest reports failed tests (exit
status 1), *missed* when they pass, and an *error* for anything else
(collection error, usage error...).  A pattern that no longer matches the
code exactly once is *stale*: it is reported loudly and never counts as
caught.  Exit status 0 only when every mutation was caught.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_TESTS = ["tests/unit/test_engine.py"]
EXPLAIN_TESTS = ["tests/unit/test_explain.py"]


@dataclass
class Mutation:
    name: str
    path: str  # relative to the repository
    old: str  # exact code text, must occur exactly once (lines of context allowed)
    new: str  # the same text with exactly one line changed
    tests: Sequence[str]  # pytest arguments (files or node ids), relative to the repository
    why: str = ""


MUTATIONS: List[Mutation] = [
    Mutation(
        "gone reported as destroyed", "tcpidle/engine.py",
        "elif err == errno.ENOENT:\n"
        "                outcomes.append(self._outcome(verdict, Action.GONE, None, owners))",
        "elif err == errno.ENOENT:\n"
        "                outcomes.append(self._outcome(verdict, Action.DESTROYED, None, owners))",
        ENGINE_TESTS),
    Mutation(
        "--cgroup ignored", "tcpidle/selectors.py",
        "if selector.cgroups and not any(",
        "if False and not any(",
        ENGINE_TESTS),
    Mutation(
        "--uid ignored", "tcpidle/selectors.py",
        "if selector.uids and sock.uid not in selector.uids:",
        "if False:",
        ENGINE_TESTS),
    Mutation(
        "--pid ignored", "tcpidle/selectors.py",
        "if selector.pids and not any(pid in selector.pids for pid in owners.pids):",
        "if False:",
        ENGINE_TESTS),
    Mutation(
        "--comm ignored", "tcpidle/selectors.py",
        "if selector.comms and not any(comm in selector.comms for comm in owners.comms):",
        "if False:",
        ENGINE_TESTS),
    Mutation(
        "EPERM during a kill no longer fails the run", "tcpidle/engine.py",
        'fatal = PrivilegeError("SOCK_DESTROY refused (EPERM): need CAP_NET_ADMIN in this network namespace")',
        "fatal = None",
        ENGINE_TESTS, "the pass goes on to the next batches and namespaces"),
    Mutation(
        "EOPNOTSUPP no longer switches later passes to /proc", "tcpidle/engine.py",
        "self.use_proc = True",
        "pass",
        ENGINE_TESTS),
    Mutation(
        "namespace pid-reuse check removed", "tcpidle/netns.py",
        "if os.fstat(fd).st_ino != ns.inode:",
        "if False:",
        ENGINE_TESTS),
    Mutation(
        "COUNTERS order swapped", "tcpidle/probe/maps.py",
        '"inserts", "deletes", "failed", "no_cookie",',
        '"inserts", "deletes", "no_cookie", "failed",',
        ["tests/unit/test_probe_logic.py"]),
    Mutation(
        "JSON row fields swapped (what test_report.py:48's self-comparison missed)",
        "tcpidle/report.py",
        "s.src, s.sport, s.dst, s.dport,",
        "s.dst, s.dport, s.src, s.sport,",
        ["tests/unit/test_report.py"]),
    Mutation(
        "a documented series left out of SERIES (what test_track_logic.py:146's constant missed)",
        "tcpidle/metrics.py",
        '"tcpidle_poll_duration_seconds", "tcpidle_poll_errors_total", "tcpidle_spared_total",',
        '"tcpidle_poll_duration_seconds", "tcpidle_poll_errors_total",',
        ["tests/unit/test_track_logic.py"],
        "as SERIES forgot tcpidle_spared_total until 0ea6d68"),
    Mutation(
        "re-check before destroying skipped", "tcpidle/engine.py",
        "checked = self._recheck(scan, part, nl)",
        "checked = [(None, None) for _ in part]",
        ENGINE_TESTS),
    Mutation(
        "all victims asked again up front, then destroyed (batch order)", "tcpidle/scope.py",
        "def batches(self, scan, victims: Sequence[Verdict], chunk: int = 256",
        "def batches(self, scan, victims: Sequence[Verdict], chunk: int = 1 << 30",
        ENGINE_TESTS),
    Mutation(
        "an ack trusted: the destroyed not looked at again", "tcpidle/engine.py",
        "remains = self._still_there(destroyed, nl)",
        "remains = {}",
        ENGINE_TESTS),
    Mutation(
        "SOCK_DESTROY batches not capped at 256", "tcpidle/diag.py",
        "size = max(1, min(batch, fit_answers, fit_send))",
        "size = max(1, min(fit_answers, fit_send))",
        ENGINE_TESTS),
    Mutation(
        "the cookie not sent in SOCK_DESTROY", "tcpidle/diag.py",
        "buf[off + 24 : off + _REQUEST_MSG_LEN] = raw",
        'buf[off + 24 : off + _REQUEST_MSG_LEN] = raw[:40] + b"\\xff" * 8',
        ENGINE_TESTS, "INET_DIAG_NOCOOKIE: the kernel then skips its cookie check"),
    Mutation(
        "a failed destroy reported as gone", "tcpidle/engine.py",
        'outcomes.append(self._outcome(verdict, Action.FAILED, "SOCK_DESTROY: " + os.strerror(err), owners))\n'
        "        if unsupported:",
        "outcomes.append(self._outcome(verdict, Action.GONE, None, owners))\n"
        "        if unsupported:",
        ENGINE_TESTS),
    Mutation(
        "the dump not read to its end (acting on its first part)", "tcpidle/diag.py",
        "if feed(view, n):",
        "if feed(view, n) or True:",
        ENGINE_TESTS),
    Mutation(
        "the idle threshold ignored", "tcpidle/idle.py",
        "victim = idle_ms is not None and idle_ms >= policy.idle_time_ms",
        "victim = idle_ms is not None",
        ENGINE_TESTS),
    Mutation(
        "a kernel refusing the one-walk dump with EINVAL fails the run", "tcpidle/diag.py",
        "_LEGACY_REFUSED = frozenset((errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT))",
        "_LEGACY_REFUSED = frozenset((errno.EOPNOTSUPP, errno.ENOENT))",
        ENGINE_TESTS),
    Mutation(
        "victims of another namespace destroyed in ours", "tcpidle/scope.py",
        "                nl = self._open(fd, label)\n            with nl:",
        "                nl = self._open(None, label)\n            with nl:",
        ENGINE_TESTS),
    Mutation(
        "a TIME_WAIT refused with EOPNOTSUPP switches the run to /proc", "tcpidle/engine.py",
        "elif err == errno.EOPNOTSUPP and verdict.socket.state in MINISOCK_STATES:",
        "elif err == errno.EOPNOTSUPP and verdict.socket.state in ():",
        ENGINE_TESTS),
    Mutation(
        "--dry-run destroys", "tcpidle/engine.py",
        "if self.policy.dry_run:",
        "if False:",
        ENGINE_TESTS),
    Mutation(
        "max kills take the least idle", "tcpidle/engine.py",
        "victims = sorted(victims, key=lambda v: -(v.idle_ms or 0.0))[: self.policy.max_kills]",
        "victims = sorted(victims, key=lambda v: (v.idle_ms or 0.0))[: self.policy.max_kills]",
        ENGINE_TESTS),
    Mutation(
        "the owner's descriptor used without its cookie checked", "tcpidle/fallback.py",
        "if got != cookie:",
        "if False:",
        ["tests/unit/test_retrofit.py", "tests/unit/test_owners_fallback.py"]),
    Mutation(
        "keep-alive set over the owner's own settings", "tcpidle/retrofit.py",
        "if sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE):",
        "if False:",
        ["tests/unit/test_retrofit.py"]),
    Mutation(
        "keep-alive retrofit on a socket whose timer is armed", "tcpidle/idle.py",
        "if policy.keepalive is not None and victim and health.keepalive_armed(sock):",
        "if False:",
        ["tests/unit/test_retrofit.py"]),
    Mutation(
        "explain: the protected list left out of a kill's clauses", "tcpidle/explain.py",
        "if selector.exclude_ports is not None or selector.exclude_nets:",
        "if False:",
        EXPLAIN_TESTS),
    Mutation(
        "explain: a 4-tuple written from the peer's side preferred to the one as written",
        "tcpidle/explain.py",
        "return exact if exact else [s for o, s in found if o == 1]",
        "return [s for o, s in found if o == 1] or exact",
        EXPLAIN_TESTS),
    Mutation(
        "explain: the threshold judged without the probe's record", "tcpidle/explain.py",
        "alone = idle.decide(sock, activity, now_ns, replace(policy, verdicts=None, middlebox=None))",
        "alone = idle.decide(sock, None, now_ns, replace(policy, verdicts=None, middlebox=None))",
        EXPLAIN_TESTS),
    Mutation(
        "--destroy-with netlink falls back on EOPNOTSUPP anyway", "tcpidle/engine.py",
        'if self.policy.destroy_with == "netlink":',
        "if False:",
        ENGINE_TESTS),
    Mutation(
        "the BPF cap keeps the first met, not the idlest", "tcpidle/probe/iterdestroy.py",
        "return sorted(records, key=lambda r: -(r.idle_ns or 0))[:n]",
        "return list(records)[:n]",
        ["tests/unit/test_iterdestroy.py"]),
    Mutation(
        "a stale program file of this boot is removed while still in use",
        "tcpidle/probe/iterprog.py",
        "elif m.group(1) not in keep and (boot_of(name) != boot",
        "elif m.group(1) not in keep and (True",
        ["tests/unit/test_iterdestroy.py"]),
    Mutation(
        "compiling one variant removes the other", "tcpidle/probe/iterprog.py",
        "for v in (False, True)], boot)",
        "for v in (storage,)], boot)",
        ["tests/unit/test_iterdestroy.py"]),
    Mutation(
        "the iterator's verdict says tcp_info for the probe's ns idle", "tcpidle/kdestroy.py",
        'if rec.idle_source == "bpf":',
        "if False:",
        ["tests/unit/test_iterdestroy.py"]),
]


def tree_files(root: str) -> List[str]:
    """Tracked and untracked files, without ignored ones (.venv, caches)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(root, p))]


def copy_tree(root: str, dest: str) -> None:
    for rel in tree_files(root):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, rel), target)


def pytest(scratch: str, tests: Sequence[str]) -> Tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=scratch, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not kernel", "-p", "no:cacheprovider",
           "-o", "addopts=", "--no-header", "-rf", *tests]
    done = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout + done.stderr


def check_imports_from(scratch: str) -> None:
    """The copy's tcpidle must be the one imported (the venv has an editable install)."""
    env = dict(os.environ, PYTHONPATH=scratch)
    where = subprocess.run([sys.executable, "-c", "import tcpidle; print(tcpidle.__file__)"],
                           cwd=scratch, env=env, capture_output=True, text=True, check=True)
    got = os.path.realpath(where.stdout.strip())
    if not got.startswith(os.path.realpath(scratch) + os.sep):
        sys.exit("mutations: the scratch copy's tcpidle is not the one imported (%s)" % got)


def failed_tests(output: str) -> List[str]:
    return re.findall(r"^FAILED (\S+)", output, re.M)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", dest="match", default="", help="only mutations whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="show pytest's output for misses")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.match.lower() in m.name.lower()]
    if args.list:
        for m in chosen:
            print("%-70s %s" % (m.name, m.path))
        return 0
    if not chosen:
        print("mutations: none match %r" % args.match)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tcpidle-mutations-") as scratch:
        copy_tree(ROOT, scratch)
        check_imports_from(scratch)
        union = sorted({t for m in chosen for t in m.tests})
        code, out = pytest(scratch, union)
        if code != 0:
            print(out)
            print("mutations: the unmutated tree does not pass %s; nothing to measure"
                  % " ".join(union))
            return 1
        results = []
        for m in chosen:
            path = os.path.join(scratch, m.path)
            try:
                with open(path) as f:
                    original = f.read()
            except FileNotFoundError:
                results.append((m, "STALE", "%s does not exist" % m.path))
                continue
            count = original.count(m.old)
            changed = [a for a, b in zip(m.old.splitlines(), m.new.splitlines()) if a != b]
            if len(changed) != 1 or len(m.old.splitlines()) != len(m.new.splitlines()):
                results.append((m, "STALE", "not a single-line mutation (context lines must match)"))
                continue
            if count != 1:
                results.append((m, "STALE", "pattern found %d times in %s: %r" % (count, m.path, m.old)))
                continue
            with open(path, "w") as f:
                f.write(original.replace(m.old, m.new))
            try:
                code, out = pytest(scratch, m.tests)
            finally:
                with open(path, "w") as f:
                    f.write(original)
            if code == 1:
                names = failed_tests(out)
                results.append((m, "caught", "%d failed: %s" % (len(names), ", ".join(
                    n.split("::", 1)[-1] for n in names[:3]) + (" ..." if len(names) > 3 else ""))))
            elif code == 0:
                results.append((m, "MISSED", "every test passed" + ("\n" + out if args.verbose else "")))
            else:
                results.append((m, "ERROR", "pytest exit %d\n%s" % (code, out[-2000:])))
    width = max(len(m.name) for m, _s, _d in results)
    for m, status, detail in results:
        print("%-7s %-*s  %s" % (status, width, m.name, detail))
    bad = [r for r in results if r[1] != "caught"]
    print("mutations: %d of %d caught in %.0f s%s" % (
        len(results) - len(bad), len(results), time.monotonic() - started,
        "" if not bad else "; NOT caught: " + ", ".join(m.name for m, _s, _d in bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
