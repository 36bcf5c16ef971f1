"""Unit tests for tcpidle.owners (the /proc walk on fake trees, the owner
pick-up of this very process, the one summary of owners), tcpidle.fallback
(its bookkeeping) and tcpidle.privilege (capability parsing).

Nothing here needs root.  Where a test needs an unreadable directory and the
suite runs as root (root ignores mode bits), the walk runs in a forked child
that first drops its effective uid to nobody.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import subprocess
import sys
import tempfile

import pytest

from tcpidle.fallback import (NO_OWNER, ProcActionError, SocketGone, apply_fallback, ptrace_refusal,
                              shutdown_socket)
from tcpidle.model import SO_COOKIE, Action, OwnerSummary, Socket, TcpState
from tcpidle.owners import (Owner, Owners, ProcWalkError, _pick_cgroup, owners_by_inode,
                            summaries_by_inode, summarize)
from tcpidle.privilege import has_cap_net_admin, has_capability, is_root

NOBODY = 65534


# ---------------------------------------------------------------------------
# helpers


def make_pid(root, pid, fds=None, comm=None, cgroup=None, fd_dir=True):
    """Create ROOT/PID with fd/N -> target symlinks, comm, cgroup."""
    d = os.path.join(str(root), str(pid))
    os.makedirs(d)
    if fd_dir:
        os.mkdir(os.path.join(d, "fd"))
        for name, target in (fds or {}).items():
            os.symlink(target, os.path.join(d, "fd", str(name)))
    if comm is not None:
        with open(os.path.join(d, "comm"), "w") as f:
            f.write(comm + "\n")
    if cgroup is not None:
        with open(os.path.join(d, "cgroup"), "w") as f:
            f.write(cgroup)
    return d


def run_unprivileged(fn):
    """Run FN() with an unprivileged effective uid and return its result.

    As root this forks: the child drops its euid to nobody (so mode bits and
    ptrace checks apply) and pickles the result, or the exception, back.
    """
    if os.geteuid() != 0:
        return fn()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            os.setegid(NOBODY)
            os.seteuid(NOBODY)
            try:
                payload = ("ok", fn())
            except BaseException as e:  # noqa: BLE001 - ship it to the parent
                payload = ("err", repr(e))
            with os.fdopen(w, "wb") as f:
                f.write(pickle.dumps(payload))
        except BaseException:  # noqa: BLE001 - the child exits whatever happened
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    kind, value = pickle.loads(data)
    if kind == "err":
        raise AssertionError("unprivileged run raised " + value)
    return value


def make_socket(inode, cookie=1):
    return Socket(
        cookie=cookie,
        family=socket.AF_INET,
        state=TcpState.ESTABLISHED,
        src="127.0.0.1",
        sport=1,
        dst="127.0.0.1",
        dport=2,
        inode=inode,
        uid=0,
        raw_id=b"\0" * 48,
    )


def cookie_of(s):
    return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


# ---------------------------------------------------------------------------
# the walk on a fake tree


@pytest.fixture
def fake_proc(tmp_path):
    root = tmp_path / "proc"
    root.mkdir()
    make_pid(
        root,
        100,
        {0: "/dev/null", 3: "socket:[111]", 4: "pipe:[999]", 5: "socket:[222]"},
        comm="alpha",
        cgroup="0::/system.slice/alpha.service\n",
    )
    # A forked holder of socket 111, on a cgroup v1 host.
    make_pid(
        root,
        200,
        {7: "socket:[111]", 8: "anon_inode:[eventpoll]", 9: "/var/log/x.log"},
        comm="beta",
        cgroup="12:cpu,cpuacct:/cpu/beta\n1:name=systemd:/system.slice/beta.service\n",
    )
    # Exited between the listing of /proc and the walk: no fd dir.
    make_pid(root, 300, fd_dir=False, comm="ghost")
    # Something that is not a process dir: fd is a plain file.
    make_pid(root, 400, fd_dir=False)
    (root / "400" / "fd").write_text("not a dir")
    # Missing comm/cgroup, an fd whose name is not a number, a plain file
    # among the fds (readlink fails with EINVAL), malformed socket links.
    make_pid(root, 500, {9: "socket:[333]", "x": "socket:[444]",
                             11: "socket:[abc]", 12: "socket:[555"})
    (root / "500" / "fd" / "10").write_text("")
    # Non-numeric entries at the top level.
    (root / "self").symlink_to("100")
    (root / "sys").mkdir()
    (root / "meminfo").write_text("MemTotal: 1 kB\n")
    (root / "12abc").mkdir()
    return root


def test_walk_maps_every_socket_to_its_holders(fake_proc):
    got = owners_by_inode(proc_root=str(fake_proc))
    assert got == {
        111: [
            Owner(100, 3, "alpha", "/system.slice/alpha.service"),
            Owner(200, 7, "beta", "/system.slice/beta.service"),
        ],
        222: [Owner(100, 5, "alpha", "/system.slice/alpha.service")],
        333: [Owner(500, 9, "", None)],
    }


def test_walk_filters_by_inode(fake_proc):
    got = owners_by_inode({222, 333, 987654}, proc_root=str(fake_proc))
    assert sorted(got) == [222, 333]
    assert [o.pid for o in got[222]] == [100]
    assert got[333][0].fd == 9


def test_walk_with_empty_filter_finds_nothing(fake_proc):
    assert owners_by_inode(set(), proc_root=str(fake_proc)) == {}


def test_walk_orders_holders_by_pid(fake_proc):
    got = owners_by_inode({111}, proc_root=str(fake_proc))
    assert [o.pid for o in got[111]] == [100, 200]


def test_one_summary_of_owners_sorted_without_repeats():
    """Two workers of one name sharing a socket: both pids, the name once, whatever the order."""
    held = [Owner(813, 7, "nginx", "/w"), Owner(812, 4, "nginx", None), Owner(812, 9, "nginx", "/w"),
            Owner(5, 3, "master", "/m")]
    assert summarize(held) == OwnerSummary((5, 812, 813), ("master", "nginx"), ("/m", "/w"))
    assert summarize([]) == summarize(None) == OwnerSummary((), (), ())


def test_summaries_by_inode_covers_every_inode_asked(fake_proc):
    got = summaries_by_inode({111, 333, 4242}, proc_root=str(fake_proc))
    assert set(got) == {111, 333, 4242}
    assert got[111].pids == (100, 200) and got[4242] == OwnerSummary()


def test_walk_missing_proc_root_is_an_error(tmp_path):
    with pytest.raises(ProcWalkError, match="nope: No such file or directory"):
        owners_by_inode(proc_root=str(tmp_path / "nope"))


@pytest.mark.parametrize(
    "text, want",
    [
        ("0::/user.slice/user-0.slice/session-1.scope\n", "/user.slice/user-0.slice/session-1.scope"),
        # hybrid: v1 controllers plus the unified line; the v2 line wins.
        ("4:memory:/m\n1:name=systemd:/s\n0::/unified\n", "/unified"),
        ("4:memory:/m\n1:name=systemd:/s\n", "/s"),
        ("4:memory:/m\n3:cpu:/c\n", "/m"),
        ("", None),
        ("garbage\n", None),
    ],
)
def test_cgroup_choice(text, want):
    assert _pick_cgroup(text) == want


@pytest.fixture
def open_tree():
    """A tree under a world-traversable dir (tmp_path's parents are 0700)."""
    d = tempfile.mkdtemp(prefix="tiproc-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    for dirpath, dirnames, _ in os.walk(d):
        for n in dirnames:
            os.chmod(os.path.join(dirpath, n), 0o755)
    subprocess.run(["rm", "-rf", d], check=True)


def test_walk_skips_unreadable_fd_dirs(open_tree):
    root = os.path.join(open_tree, "proc")
    os.mkdir(root)
    os.chmod(root, 0o755)
    make_pid(root, 10, {3: "socket:[1010]"}, comm="locked")
    make_pid(root, 20, {4: "socket:[2020]"}, comm="open")
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for n in filenames:
            if not os.path.islink(os.path.join(dirpath, n)):
                os.chmod(os.path.join(dirpath, n), 0o644)
    os.chmod(os.path.join(root, "10", "fd"), 0o000)

    got = run_unprivileged(lambda: owners_by_inode(proc_root=root))
    assert got == {2020: [Owner(20, 4, "open", None)]}
    assert got.unreadable == (10,)  # not gone: its sockets are not called ownerless


def test_walk_of_real_proc_unprivileged_finds_own_socket():
    """As nobody, other users' /proc/PID/fd are EACCES; the walk goes on and
    still finds the sockets of its own process."""

    def walk():
        a, b = socket.socketpair()
        ino = os.fstat(a.fileno()).st_ino
        got = owners_by_inode()
        mine = [(o.pid, o.fd) for o in got.get(ino, [])]
        return mine, (os.getpid(), a.fileno()), len(got)

    mine, want, _ = run_unprivileged(walk)
    assert mine == [want]


def test_walk_of_real_proc_finds_own_socket_with_details():
    a, b = socket.socketpair()
    with a, b:
        ia, ib = os.fstat(a.fileno()).st_ino, os.fstat(b.fileno()).st_ino
        got = owners_by_inode({ia, ib})
        assert set(got) == {ia, ib}
        (oa,) = got[ia]
        assert (oa.pid, oa.fd) == (os.getpid(), a.fileno())
        with open("/proc/self/comm") as f:
            assert oa.comm == f.read().strip()
        assert oa.cgroup is not None and oa.cgroup.startswith("/")
        # A dup is a second holder of the same socket, in the same process.
        c = os.dup(a.fileno())
        try:
            fds = [o.fd for o in owners_by_inode({ia})[ia]]
            assert fds == sorted([a.fileno(), c])
        finally:
            os.close(c)


# ---------------------------------------------------------------------------
# shutdown_socket on a socket of this very process (pidfd_getfd on oneself
# needs no privilege)


def test_shutdown_own_socket_gives_peer_eof():
    a, b = socket.socketpair()
    with a, b:
        owner = Owner(os.getpid(), a.fileno())
        shutdown_socket(owner, os.fstat(a.fileno()).st_ino, cookie_of(a))
        b.settimeout(5)
        assert b.recv(10) == b""
        # Our own fd is still open (only the duplicate was closed).
        os.fstat(a.fileno())


def test_shutdown_refuses_other_socket_behind_the_fd():
    a, b = socket.socketpair()
    with a, b:
        owner = Owner(os.getpid(), a.fileno())
        ino = os.fstat(a.fileno()).st_ino
        with pytest.raises(SocketGone, match="another file"):
            shutdown_socket(owner, ino + 1, cookie_of(a))
        with pytest.raises(SocketGone, match="cookie"):
            shutdown_socket(owner, ino, cookie_of(a) + 1)
        # Neither attempt touched the socket.
        a.sendall(b"x")
        b.settimeout(5)
        assert b.recv(1) == b"x"


def test_shutdown_closed_fd_is_gone():
    a, b = socket.socketpair()
    fd, ino = a.fileno(), os.fstat(a.fileno()).st_ino
    a.close()
    b.close()
    with pytest.raises(SocketGone):
        shutdown_socket(Owner(os.getpid(), fd), ino, None)


def test_socketgone_is_a_procactionerror():
    assert issubclass(SocketGone, ProcActionError)


# ---------------------------------------------------------------------------
# apply_fallback bookkeeping


def exited_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_fallback_without_owner_fails_with_reason():
    tw = make_socket(0)  # TIME_WAIT sockets have inode 0
    orphan = make_socket(4242)
    res = apply_fallback([tw, orphan], "shutdown", owners={})
    assert [(r.action, r.error, r.owners) for r in res] == [
        (Action.FAILED, NO_OWNER, OwnerSummary()),
        (Action.FAILED, NO_OWNER, OwnerSummary()),
    ]
    assert res[0][0] is tw and res[1][0] is orphan


def test_fallback_rejects_unknown_action():
    with pytest.raises(ValueError):
        apply_fallback([make_socket(1)], "nuke", owners={})


@pytest.mark.parametrize("action", ["shutdown", "kill"])
def test_fallback_on_exited_owners_is_gone(action):
    pid = exited_pid()
    s = make_socket(4242)
    owners = {4242: [Owner(pid, 3, "gone1"), Owner(pid, 4, "gone1")]}
    ((sock, act, err, (pids, comms, _)),) = apply_fallback([s], action, owners=owners)
    assert act == Action.GONE
    assert "%d" % pid in err
    assert (pids, comms) == ((pid,), ("gone1",))


def test_fallback_shutdown_on_own_socket_reports_all_holders():
    a, b = socket.socketpair()
    with a, b:
        ino = os.fstat(a.fileno()).st_ino
        s = make_socket(ino, cookie_of(a))
        owners = owners_by_inode({ino})
        ((_, act, err, (pids, comms, _)),) = apply_fallback([s], "shutdown", owners=owners)
        assert (act, err, pids) == (Action.SHUTDOWN, None, (os.getpid(),))
        b.settimeout(5)
        assert b.recv(1) == b""


def test_fallback_walks_proc_when_owners_not_given():
    a, b = socket.socketpair()
    with a, b:
        s = make_socket(os.fstat(b.fileno()).st_ino, cookie_of(b))
        ((_, act, err, (pids, _, _)),) = apply_fallback([s], "shutdown")
        assert (act, err, pids) == (Action.SHUTDOWN, None, (os.getpid(),))
        a.settimeout(5)
        assert a.recv(1) == b""


# ---------------------------------------------------------------------------
# capabilities


def write_status(tmp_path, capeff):
    p = tmp_path / "status"
    p.write_text("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t%s\nCapBnd:\t000001ffffffffff\n" % capeff)
    return str(p)


def test_cap_net_admin_bit(tmp_path):
    assert has_cap_net_admin(write_status(tmp_path, "0000000000001000"))
    assert not has_cap_net_admin(write_status(tmp_path, "000001ffffffefff"))
    assert has_capability(21, write_status(tmp_path, "0000000000200000"))
    assert not has_cap_net_admin(str(tmp_path / "missing"))
    assert not has_cap_net_admin(write_status(tmp_path, "zz"))


def test_cap_and_root_of_this_process():
    with open("/proc/self/status") as f:
        capeff = [int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:")][0]
    assert has_cap_net_admin() == bool(capeff & (1 << 12))
    assert is_root() == (os.geteuid() == 0)


def test_unprivileged_process_lacks_cap_net_admin():
    if os.geteuid() == 0:
        # Dropping euid from 0 clears the effective capability set.
        assert run_unprivileged(lambda: (has_cap_net_admin(), is_root())) == (False, False)
    else:
        assert not is_root()


@pytest.mark.parametrize("scope, needle", [
    (None, "needs CAP_SYS_PTRACE (or running as the owner's user)"),
    ("1", "needs CAP_SYS_PTRACE (%s = 1)"),
    ("3", "Yama forbids attaching to any process (%s = 3"),
])
def test_pidfd_getfd_refusal_names_the_cause(tmp_path, scope, needle):
    path = tmp_path / "ptrace_scope"
    if scope is not None:
        path.write_text(scope + "\n")
    assert (needle % path if "%s" in needle else needle) in ptrace_refusal(str(path))


def test_fallback_without_a_readable_owner_says_so():
    owners = Owners()
    owners.unreadable = (1, 4242)
    ((_s, act, err, _o),) = apply_fallback([make_socket(777)], "shutdown", owners)
    assert act == Action.FAILED
    assert err.startswith("no readable process holds this socket: the descriptors of 2 "
                          "processes could not be read (pid 1, 4242;")
    ((_s, act, err, _o),) = apply_fallback([make_socket(0)], "shutdown", owners)
    assert (act, err) == (Action.FAILED, NO_OWNER)  # inode 0: no file holds it, certainly
