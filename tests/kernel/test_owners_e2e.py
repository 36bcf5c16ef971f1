"""Owners that cannot be read, walks that fail, pidfd_getfd refused: said as such.

Real processes of another user in a namespace made here, tcpidle run with
fewer capabilities (setpriv), a walk under a descriptor limit: each must end
in a text that names the cause, never in "no process holds this socket" or
in every process looking ownerless.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from lab.netns import NetnsFactory  # noqa: E402
from lab.window import Pairs  # noqa: E402

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, setpriv)")]

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
# Root, but with CAP_NET_ADMIN alone: SOCK_DESTROY and INET_DIAG work, another
# user's /proc/PID/fd does not (no CAP_SYS_PTRACE, no CAP_DAC_READ_SEARCH).
NET_ADMIN_ONLY = ["setpriv", "--inh-caps=-all", "--bounding-set=-all,+net_admin"]
REPO_ROOT = os.path.dirname(TESTS_DIR)


@pytest.fixture
def ns():
    factory = NetnsFactory("tiown-")
    yield factory()
    factory.cleanup()


def _as_nobody_can_import_tcpidle():
    res = subprocess.run(NOBODY + [sys.executable, "-c", "import tcpidle.fallback"], cwd="/",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return res.returncode == 0


def test_use_proc_with_only_cap_net_admin_says_the_owners_could_not_be_read(ns):
    """The victim's owner is a process of uid 65534; tcpidle runs as root with
    CAP_NET_ADMIN alone, so it may destroy but not read that process's
    descriptors: the outcome says so, it does not claim that no process holds
    the socket.  The connection is left alone."""
    pairs = Pairs(ns.name)
    owner = None
    try:
        port = pairs.server_port
        code = textwrap.dedent("""
            import socket, sys, time
            s = socket.create_connection(("127.0.0.1", %d))
            print(s.getsockname()[1], flush=True)
            sys.stdin.read()
        """ % port)
        owner = subprocess.Popen(["ip", "netns", "exec", ns.name] + NOBODY
                                 + ["/usr/bin/python3", "-c", code],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        client_port = int(owner.stdout.readline())
        server, _ = pairs.listener.accept()
        res = subprocess.run(["ip", "netns", "exec", ns.name] + NET_ADMIN_ONLY
                             + [sys.executable, "-m", "tcpidle", "kill", "--use-proc", "-d", str(port),
                                "-t", "0", "--json", "--disable-syslog"],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, timeout=60)
        rows = [json.loads(ln) for ln in res.stdout.splitlines() if ln.strip()]
        assert res.returncode == 1, res.stderr
        assert [(r["sport"], r["action"]) for r in rows] == [(client_port, "failed")], rows
        assert rows[0]["error"].startswith("no readable process holds this socket"), rows
        assert "CAP_SYS_PTRACE" in rows[0]["error"]
        server.sendall(b"still")  # untouched
        server.settimeout(1)
        with pytest.raises(socket.timeout):
            server.recv(1)
        server.close()
    finally:
        if owner is not None:
            owner.kill()
            owner.wait()
        pairs.close()


def test_a_walk_that_runs_out_of_descriptors_is_an_error_not_ownerless():
    """EMFILE in the middle of the /proc walk: one clear error, not an empty
    map that would make every process look ownerless."""
    code = textwrap.dedent("""
        import os, resource
        from tcpidle import owners
        n = len(os.listdir("/proc/self/fd"))  # counts the listing's own descriptor
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))  # one to spare: not two
        try:
            got = owners.owners_by_inode({1})
            print("no error", dict(got))
        except owners.ProcWalkError as e:
            print("error:", e)
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("error: walking /proc for socket owners: /proc/"), res.stdout
    assert "Too many open files" in res.stdout


def test_pidfd_getfd_refused_is_one_error_naming_the_cause():
    """The owner is another user's process (root's, here) and the caller has no
    CAP_SYS_PTRACE: the kernel refuses pidfd_getfd with EPERM, and the text
    says what attaching needs."""
    if not _as_nobody_can_import_tcpidle():
        pytest.skip("uid 65534 cannot read %s or the tcpidle package" % sys.executable)
    a, b = socket.socketpair()
    try:
        inode = os.fstat(a.fileno()).st_ino
        code = textwrap.dedent("""
            from tcpidle import fallback, owners
            try:
                fallback.shutdown_socket(owners.Owner(pid=%d, fd=%d), %d, None)
                print("no error")
            except fallback.ProcActionError as e:
                print(type(e).__name__, e)
        """ % (os.getpid(), a.fileno(), inode))
        res = subprocess.run(NOBODY + [sys.executable, "-c", code], cwd="/",
                             env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        out = res.stdout.strip()
        # AttachRefused: the ProcActionError a caller can say once per owner (retrofit)
        assert out.startswith("AttachRefused pidfd_getfd(pid %d" % os.getpid()), out
        assert "refused (EPERM)" in out and "CAP_SYS_PTRACE" in out, out
        b.sendall(b"x")  # the socket was not touched
        assert a.recv(1) == b"x"
    finally:
        a.close()
        b.close()
