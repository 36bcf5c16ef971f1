"""Kernel tests of who may touch the tracker's pins, locks and caches (issue #15).

Every pinned map is checked before anything reads it; bpffs and pin
directories that tcpidle makes are root-only, and ones made by someone else
are refused; the lock is out of other users' reach; cleanup removes BPF pins
only; a header or BTF cache another user could write is not trusted; and
what degrades under a running tracker (pins vanishing, LRU evictions) is
said.  The unprivileged user is nobody (65534), through setpriv.  Every
bpffs here is the test's own, unmounted at the end (with the pins in it).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from lab.netns import in_netns, wait_for  # noqa: E402
from tcpidle.probe import (LOCK_DIR, PinError, PinnedMap, Probe, ProbeUnavailable,
                           cached_btf_offsets, libbpf, mount_bpffs, pin_dir_holder)

pytestmark = pytest.mark.kernel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
PORT = 7131
LRU_HASH, PERCPU_ARRAY, BPF_F_NO_COMMON_LRU = 9, 6, 1 << 1


class _CreateOpts(ctypes.Structure):
    # struct bpf_map_create_opts (libbpf >= 0.7), up to map_flags
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32),
                ("btf_key_type_id", ctypes.c_uint32), ("btf_value_type_id", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32)]


def pin_map(path, map_type, key, value, entries, flags=0):
    """Create a BPF map of this shape and pin it at path (as another program would)."""
    lib = libbpf()
    lib.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32,
                                   ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(_CreateOpts)]
    lib.bpf_map_create.restype = ctypes.c_int
    opts = _CreateOpts(sz=ctypes.sizeof(_CreateOpts), map_flags=flags)
    fd = lib.bpf_map_create(map_type, b"foreign", key, value, entries, ctypes.byref(opts))
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        assert lib.bpf_obj_pin(fd, os.fsencode(path)) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)


@pytest.fixture
def open_bpffs():
    """A bpffs with the kernel's own defaults (mode 1777) where nobody can reach it."""
    top = tempfile.mkdtemp(prefix="tipins-")
    os.chmod(top, 0o755)
    d = os.path.join(top, "bpffs")
    os.mkdir(d)
    subprocess.run(["mount", "-t", "bpf", "bpf", d], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=False)
        os.rmdir(d)
        os.rmdir(top)


@pytest.fixture
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tipins-cache"))


def one_line_error(res, rc):
    assert res.returncode == rc, (res.returncode, res.stderr)
    assert res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr and "[Errno" not in res.stderr, res.stderr
    return res.stderr


# -- every pinned map is checked before any read, by every command -----------------------


def foreign_counters_value(d):
    pin_map(os.path.join(d, "activity"), LRU_HASH, 8, 40, 64)
    pin_map(os.path.join(d, "counters"), PERCPU_ARRAY, 4, 4096, 6)  # segfaulted audit


def foreign_counters_entries(d):
    pin_map(os.path.join(d, "activity"), LRU_HASH, 8, 40, 64)
    pin_map(os.path.join(d, "counters"), PERCPU_ARRAY, 4, 8, 2)  # was a bare [Errno 2]


def foreign_activity_flags(d):
    pin_map(os.path.join(d, "activity"), LRU_HASH, 8, 40, 64, BPF_F_NO_COMMON_LRU)
    pin_map(os.path.join(d, "counters"), PERCPU_ARRAY, 4, 8, 6)


def counters_symlink(d):
    other = d + "-other"
    os.mkdir(other, 0o700)
    pin_map(os.path.join(other, "counters"), PERCPU_ARRAY, 4, 8, 6)
    pin_map(os.path.join(d, "activity"), LRU_HASH, 8, 40, 64)
    os.symlink(os.path.join(other, "counters"), os.path.join(d, "counters"))


def counters_missing(d):
    pin_map(os.path.join(d, "activity"), LRU_HASH, 8, 40, 64)


LAYOUTS = [  # (make, what the one line says, does track refuse it too?)
    (foreign_counters_value, "counters is not a tcpidle counters map (map type 6, key/value "
                             "4/4096 bytes", True),
    (foreign_counters_entries, "counters is not a tcpidle counters map (map type 6, key/value "
                               "4/8 bytes, 2 entries", True),
    (foreign_activity_flags, "activity is not a tcpidle activity map (map type 9, key/value "
                             "8/40 bytes, 64 entries, flags 0x2", True),
    (counters_symlink, "counters is a symbolic link, not a BPF pin", True),
    (counters_missing, "counters is missing (the activity map is pinned without it)", False),
]


@pytest.mark.parametrize("make,says,track_refuses", LAYOUTS,
                         ids=[m.__name__ for m, _, _ in LAYOUTS])
def test_a_foreign_pinned_map_is_one_clear_error_for_every_command(
        make, says, track_refuses, bpffs, netns, run_tcpidle):
    d = os.path.join(bpffs, "pins")
    os.mkdir(d, 0o700)
    make(d)
    with pytest.raises(PinError, match="^%s/" % d) as e:
        PinnedMap.open(d)
    assert says in str(e.value)

    # audit and kill: tcp_info, with one warning (--require-bpf: exit 1, one line)
    audit = run_tcpidle(netns, "audit", "-d", PORT, "--pin-dir", d)
    assert audit.returncode == 0, audit.stderr
    assert "cannot read the tracker's pinned map in %s: " % d in audit.stderr
    assert says in audit.stderr and "idle from tcp_info" in audit.stderr
    assert "Traceback" not in audit.stderr and "[Errno" not in audit.stderr
    kill = run_tcpidle(netns, "kill", "-d", PORT, "--pin-dir", d, "--require-bpf",
                       "--disable-syslog")
    assert says in one_line_error(kill, 1) and "--require-bpf" in kill.stderr
    # track: an unusable pin directory is fatal
    if track_refuses:
        track = run_tcpidle(netns, "track", "-d", PORT, "--pin-dir", d, "--disable-syslog",
                            "--interval", 1)
        assert says.partition(" (")[0] in one_line_error(track, 1)


def test_a_pin_of_another_user_is_refused(bpffs):
    d = os.path.join(bpffs, "pins")
    os.mkdir(d, 0o700)
    pin_map(os.path.join(d, "activity"), LRU_HASH, 8, 40, 64)
    pin_map(os.path.join(d, "counters"), PERCPU_ARRAY, 4, 8, 6)
    os.chown(os.path.join(d, "counters"), NOBODY, NOBODY)
    with pytest.raises(PinError, match="counters was pinned by uid 65534, not root"):
        PinnedMap.open(d)


# -- bpffs and pin directories: root-only ---------------------------------------------------


def test_bpffs_that_tcpidle_mounts_is_root_only(tmp_path):
    d = str(tmp_path / "fresh")
    assert mount_bpffs(d) is True
    try:
        # bpffs always sets the sticky bit; the kernel's default is 1777
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o1700
    finally:
        subprocess.run(["umount", d], check=True)
    # /sys/fs/bpf itself, mounted by the tracker's own path, in a private mount namespace
    script = ("from tcpidle.probe import ensure_bpffs; import os, stat; "
              "print(ensure_bpffs('/sys/fs/bpf/tcpidle')[0]); "
              "print(oct(stat.S_IMODE(os.stat('/sys/fs/bpf').st_mode)))")
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          "umount -l /sys/fs/bpf 2>/dev/null; exec \"$0\" -c \"$1\"",
                          sys.executable, script], cwd=REPO_ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["mounted a BPF filesystem at /sys/fs/bpf", "0o1700"]


def test_pin_directories_are_created_root_only(bpffs, cache_dir):
    d = os.path.join(bpffs, "a", "pins")
    p = Probe.attach(map_size=16, hook="tracepoint", cache_dir=cache_dir, pin_dir=d)
    try:
        for path in (d, os.path.dirname(d)):
            st = os.stat(path)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700), path
        st = os.stat(LOCK_DIR)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    finally:
        p.close()


def nobodys(d):
    os.mkdir(d, 0o700)
    os.chown(d, NOBODY, NOBODY)


def open_to_all(d):
    os.mkdir(d)
    os.chmod(d, 0o777)


def symlinked(d):
    os.mkdir(d + "-real", 0o700)
    os.symlink(d + "-real", d)


@pytest.mark.parametrize("make,says", [
    (nobodys, "belongs to uid 65534, not root: refused"),
    (open_to_all, "is writable by other users (mode 777): refused"),
    (symlinked, "is a symbolic link: refused"),
], ids=["nobodys", "open-to-all", "symlink"])
def test_a_pin_directory_someone_else_could_change_is_refused(make, says, bpffs, netns,
                                                              run_tcpidle):
    d = os.path.join(bpffs, "pins")
    make(d)
    with pytest.raises(PinError, match=re.escape(says)):
        Probe.attach(map_size=16, hook="tracepoint", pin_dir=d)
    with pytest.raises(PinError, match=re.escape(says)):
        PinnedMap.open(d)
    res = run_tcpidle(netns, "track", "-d", PORT, "--pin-dir", d, "--disable-syslog")
    assert says in one_line_error(res, 1)
    assert not any(os.path.lexists(os.path.join(d, n)) for n in ("activity", "counters"))


def test_an_unprivileged_user_cannot_block_the_tracker(open_bpffs, cache_dir):
    """nobody can open the pin directory (root's, mode 755, on a bpffs of
    mode 1777) and flock it: the tracker starts all the same, because its
    lock is a file in root-only /run/tcpidle, which nobody can open."""
    d = os.path.join(open_bpffs, "pins")
    os.mkdir(d, 0o755)
    # -o: the lock stays with flock itself, not with the command
    holder = subprocess.Popen(AS_NOBODY + ["flock", "-n", "-o", d, "sleep", "60"],
                              start_new_session=True)
    try:
        import fcntl

        def held():
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return False
            except BlockingIOError:
                return True
            finally:
                os.close(fd)

        assert wait_for(held, timeout=10), "nobody did not get the flock"
        p = Probe.attach(map_size=16, hook="tracepoint", cache_dir=cache_dir, pin_dir=d)
        try:
            assert pin_dir_holder(d) == os.getpid()
            st = os.stat(d)
            lock = os.path.join(LOCK_DIR, "pins-%d-%d.lock" % (st.st_dev, st.st_ino))
            assert os.path.exists(lock)
            res = subprocess.run(AS_NOBODY + ["flock", "-n", lock, "true"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert res.returncode != 0 and "Permission denied" in res.stderr
        finally:
            p.close()
        assert not os.path.exists(lock)  # let go: no file left behind
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


# -- cleanup removes BPF pins only ------------------------------------------------------------


def test_cleanup_never_removes_ordinary_files(tmp_path, netns, run_tcpidle):
    d = tmp_path / "notbpffs"
    d.mkdir()
    for name in ("activity", "counters"):
        (d / name).write_text("precious\n")
    res = run_tcpidle(netns, "track", "--cleanup", "--pin-dir", str(d))
    assert "is not on a BPF filesystem: nothing removed" in one_line_error(res, 2)
    assert sorted(os.listdir(d)) == ["activity", "counters"]
    assert (d / "activity").read_text() == "precious\n"


def test_cleanup_leaves_a_symlink_and_everything_else_alone(bpffs, netns, run_tcpidle):
    d = os.path.join(bpffs, "pins")
    os.mkdir(d, 0o700)
    pin_map(os.path.join(d, "activity"), LRU_HASH, 8, 40, 64)
    os.symlink("/etc/passwd", os.path.join(d, "counters"))
    res = run_tcpidle(netns, "track", "--cleanup", "--pin-dir", d)
    assert "counters is a symbolic link, not a BPF pin" in one_line_error(res, 1)
    assert sorted(os.listdir(d)) == ["activity", "counters"]
    os.unlink(os.path.join(d, "counters"))
    res = run_tcpidle(netns, "track", "--cleanup", "--pin-dir", d)
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(d)


# -- caches another user planted are not trusted -------------------------------------------------


def test_a_header_cache_of_another_user_is_not_trusted(tmp_path, monkeypatch):
    if os.path.exists("/lib/modules/%s/build/include/linux/kconfig.h" % os.uname().release):
        pytest.skip("this kernel has its own headers: no cache is used")
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.delenv("TCPIDLE_CACHE_DIR", raising=False)
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    (xdg / "tcpidle").mkdir()
    os.chown(xdg / "tcpidle", NOBODY, NOBODY)  # planted by nobody
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    with pytest.raises(ProbeUnavailable, match="header cache %s/tcpidle belongs to uid 65534: "
                                               "not trusted" % xdg):
        Probe.attach(map_size=16, hook="tracepoint")
    assert os.listdir(xdg / "tcpidle") == []  # nothing written there either


def test_a_btf_offset_cache_another_user_could_write_is_not_believed(tmp_path, caplog):
    real = cached_btf_offsets(str(tmp_path / "mine"))
    planted = tmp_path / "planted"
    planted.mkdir()
    lie = {"boot": json.loads((tmp_path / "mine" / "btf-offsets.json").read_text())["boot"],
           "offsets": {k: v + 8 for k, v in real.items()}}
    (planted / "btf-offsets.json").write_text(json.dumps(lie))
    os.chmod(planted, 0o777)
    assert cached_btf_offsets(str(planted)) == real
    assert "writable by other users (mode 777): not trusted" in caplog.text
    assert json.loads((planted / "btf-offsets.json").read_text()) == lie  # not written either
    os.chmod(planted, 0o700)
    os.chmod(planted / "btf-offsets.json", 0o666)
    assert cached_btf_offsets(str(planted)) == real  # the file alone, writable by others
    assert json.loads((planted / "btf-offsets.json").read_text())["offsets"] == real


# -- said plainly under a running tracker ------------------------------------------------------


def free_port(netns):
    def pick():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return in_netns(netns.name, pick)


def scrape(netns, port, series):
    url = "http://127.0.0.1:%d/metrics" % port
    text = in_netns(netns.name, lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


class Tracker:
    def __init__(self, tcpidle_argv, netns, tmp_path, *args):
        self.err_path = str(tmp_path / "track.err")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(tcpidle_argv(netns, "track", "--disable-syslog", *args),
                                     stdout=subprocess.DEVNULL, stderr=self._err, cwd=REPO_ROOT)

    def stderr(self):
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def wait_for(self, text, timeout=30):
        ok = wait_for(lambda: text in self.stderr() or self.proc.poll() is not None, timeout)
        assert ok and text in self.stderr(), self.stderr()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        rc = self.proc.wait(15)
        self._err.close()
        return rc


@pytest.fixture
def tracker(tcpidle_argv, netns, tmp_path):
    made = []

    def start(*args):
        made.append(Tracker(tcpidle_argv, netns, tmp_path, *args))
        return made[-1]

    yield start
    for t in made:
        t.stop()


def test_pins_vanishing_under_a_running_tracker_are_said(tracker, netns, tmp_path):
    mnt = str(tmp_path / "vanishing")
    assert mount_bpffs(mnt)
    try:
        d = os.path.join(mnt, "pins")
        port = free_port(netns)
        t = tracker("-d", PORT, "-t", 600000, "--interval", 0.3, "--pin-dir", d,
                    "--metrics-port", port)
        t.wait_for("polling every")
        assert wait_for(lambda: scrape(netns, port, "tcpidle_probe_pin_problems") == 0.0, 10)
        # bpffs unmounted where the tracker runs (its own mount namespace:
        # `ip netns exec` made one): the pins go with it
        subprocess.run(["nsenter", "-t", str(t.proc.pid), "-m", "umount", mnt], check=True)
    finally:
        subprocess.run(["umount", mnt], check=False)
    # the maps the tracker reads: the activity map and counters, or the
    # storage and counters; where the probe is pinned with its links
    # (probe/detached.py), the receive hook's link too, and on the LRU path
    # the destroy hook's
    detached = "the probe pinned beside them" in t.stderr()
    storage = "per-socket storage" in t.stderr()
    names = ("storage", "counters") if storage else ("activity", "counters")
    if detached:
        names += ("link",) if storage else ("link", "destroy_link")
    t.wait_for("BPF pins: %s/%s vanished (bpffs unmounted" % (d, names[0]))
    for name in names:
        assert "%s/%s vanished" % (d, name) in t.stderr()
    assert wait_for(lambda: scrape(netns, port, "tcpidle_probe_pin_problems") == len(names), 10)
    time.sleep(1.0)  # several more polls: said once, not every poll
    assert t.stderr().count("%s vanished" % names[0]) == 1
    assert t.stop() == 0


def test_lru_evictions_are_said_each_interval_they_grow(tracker, netns, make_farm, bpffs,
                                                        run_tcpidle):
    farm = make_farm(netns)
    farm.serve([PORT])
    farm.connect("127.0.0.1", PORT, n=12, label="active")  # 24 sockets talking
    d = os.path.join(bpffs, "pins")
    # the LRU map (the per-socket storage, where tp_btf records into it, evicts nothing)
    t = tracker("-d", PORT, "-t", 600000, "--interval", 0.3, "--map-size", 4, "--pin-dir", d,
                "--bpf-hook", "raw_tracepoint")
    t.wait_for("entries evicted since the last poll", timeout=30)
    assert "raise --map-size for full precision" in t.stderr()
    # a one-shot kill reading the tracker's map says them too (-v: the map's health)
    kill = run_tcpidle(netns, "kill", "-v", "-d", PORT, "-t", 600000, "--dry-run", "--pin-dir", d,
                       "--disable-syslog")
    assert kill.returncode == 0, kill.stderr
    assert re.search(r"BPF map: \d+ entries of 4; [1-9]\d* evicted", kill.stderr), kill.stderr
    assert "the BPF map lost" in kill.stderr and "raise --map-size" in kill.stderr
    assert t.stop() == 0
