"""The doctor's questions to the running system, each answered by trying where that is harmless.

Kernel-facing.  What is tried, and why it harms nothing:

- SOCK_DESTROY, its cookie check, TIME_WAIT destroy and the one-walk dump:
  in a forked child that unshares a network namespace of its own (no other
  socket can be reached from there), on a loopback connection it made
  itself; the namespace dies with the child.
- pidfd_getfd: on a process of its own that is not its descendant (a
  grandchild whose parent exited), as tcpidle's /proc fallback faces the
  owner of a socket, so Yama's ptrace_scope=1 ("descendants only") and
  CAP_SYS_PTRACE count as they would.
- probe hooks: tcpidle's own probe, compiled, loaded and attached on each
  hook in turn (tcpidle.probe does the choosing: its hook plan says which
  hooks are worth trying, a real attach says which load), then detached.
- per-socket storage: a BPF_MAP_TYPE_SK_STORAGE map created (it needs BTF
  for its key and value, so a two-type BTF blob is loaded first) and closed.
- the in-kernel destroy kfunc: bpf_sock_destroy looked up in the kernel's BTF.

Nothing here prints; every function returns doctor.verdict.Check records.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import socket
import struct
import time
from dataclasses import replace
from typing import Callable, Dict, List, Optional

from .. import diag, netns
from ..errors import TcpidleError
from ..model import DEFAULT_PIN_DIR, TcpState
from ..probe import features
from ..probe.bpfsys import bpf
from .verdict import PIDFD_GETFD, SOCK_DESTROY, Check

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
# The forked tries take milliseconds here, but 10 s was too short under QEMU's emulation
# in the kernel lab (5.10): a limit for a hung child, not an expected time.
CHILD_TIMEOUT = 60.0

# Capabilities tcpidle uses (see deploy/systemd/tcpidle.service for what each is for).
CAPS = {"NET_ADMIN": 12, "SYS_ADMIN": 21, "SYS_PTRACE": 19, "SYS_RESOURCE": 24,
        "DAC_READ_SEARCH": 2, "KILL": 5, "BPF": 39, "PERFMON": 38}


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno and not e.filename:
        return "%s (%s)" % (os.strerror(e.errno), errno.errorcode.get(e.errno, e.errno))
    return " ".join(str(e).split()) or type(e).__name__


def _timed(fn: Callable[[], Check]) -> Check:
    t0 = time.monotonic()
    c = fn()
    return c if c.ms is not None else replace(c, ms=(time.monotonic() - t0) * 1000.0)


# ---------------------------------------------------------------------------
# facts


def kernel() -> Check:
    u = os.uname()
    return Check("kernel", "info", "%s %s (%s)" % (u.release, u.version, u.machine), "kernel")


def capabilities(status_path: str = "/proc/self/status") -> Check:
    eff = 0
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    eff = int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    have = [n for n, bit in CAPS.items() if eff >> bit & 1]
    missing = [n for n, bit in CAPS.items() if not eff >> bit & 1]
    detail = "uid %d; has %s" % (os.geteuid(), ", ".join(have) or "none of tcpidle's")
    if missing:
        detail += "; lacks %s" % ", ".join(missing)
    status = "ok" if not missing else ("warn" if "NET_ADMIN" in have else "no")
    return Check("capabilities", status, detail, "capabilities")


def bcc_and_headers() -> List[Check]:
    out = []
    try:
        import bcc  # noqa: F401  (python3-bpfcc)

        out.append(Check("bcc", "ok", "bcc %s (%s)" % (getattr(bcc, "__version__", "?"),
                                                        os.path.dirname(bcc.__file__)), "bcc"))
    except ImportError as e:
        out.append(Check("bcc", "no", "bcc not importable: %s (install python3-bpfcc)" % e, "bcc"))
    from ..probe import kheaders

    try:
        tree = kheaders.find_headers()
        out.append(Check("headers", "ok", tree.source, "kernel headers"))
    except (kheaders.HeadersNotFound, OSError) as e:
        out.append(Check("headers", "no", _one_line(e), "kernel headers"))
    return out


# ---------------------------------------------------------------------------
# BTF: the probe's offsets, and the in-kernel destroy kfunc


def btf_checks(path: str = VMLINUX_BTF) -> List[Check]:
    from ..probe import btf as btfmod
    from .. import probe

    try:
        size = os.path.getsize(path)
        b = btfmod.BTF.load(path)
    except (OSError, btfmod.BTFError) as e:
        why = _one_line(e)
        return [Check("btf", "no", "%s: %s" % (path, why), "kernel BTF"),
                Check("kfunc_sock_destroy", "no", "no kernel BTF to look it up", "bpf_sock_destroy kfunc")]
    try:
        probe.btf_offsets(path)
        offs = "the probe's struct offsets found"
        status = "ok"
    except btfmod.BTFError as e:
        offs = "probe offsets missing: %s" % _one_line(e)
        status = "warn"
    out = [Check("btf", status, "%s (%d KiB); %s" % (path, size // 1024, offs), "kernel BTF")]
    if b.has_func("bpf_sock_destroy"):
        out.append(Check("kfunc_sock_destroy", "ok", "bpf_sock_destroy in kernel BTF (destroy from a "
                         "BPF TCP iterator, Linux >= 6.5)", "bpf_sock_destroy kfunc"))
    else:
        out.append(Check("kfunc_sock_destroy", "no", "bpf_sock_destroy not in kernel BTF "
                         "(Linux < 6.5, or built without it)", "bpf_sock_destroy kfunc"))
    return out


# ---------------------------------------------------------------------------
# bpf(2): per-socket storage

BPF_MAP_CREATE = 0
BPF_BTF_LOAD = 18
BPF_MAP_TYPE_SK_STORAGE = 24
BPF_F_NO_PREALLOC = 1
def int_btf() -> bytes:
    """A BTF blob with one type, [1] = signed 32-bit "int" (what SK_STORAGE keys must be)."""
    strings = b"\0int\0"
    types = struct.pack("<III", 1, 1 << 24, 4) + struct.pack("<I", (1 << 24) | 32)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def sk_storage() -> Check:
    title = "per-socket storage"
    blob = ctypes.create_string_buffer(int_btf())
    try:
        btf_fd = bpf(BPF_BTF_LOAD, struct.pack("<QQIII", ctypes.addressof(blob), 0,
                                                len(blob.raw) - 1, 0, 0))
    except OSError as e:
        return Check("sk_storage", "no", "loading BTF for its key failed: %s" % _one_line(e), title)
    try:
        # key and value both [1] int: SK_STORAGE wants an int key and BTF for the value.
        attr = struct.pack("<7I16sIIII", BPF_MAP_TYPE_SK_STORAGE, 4, 4, 0, BPF_F_NO_PREALLOC, 0, 0,
                           b"tcpidle_doctor", 0, btf_fd, 1, 1)
        fd = bpf(BPF_MAP_CREATE, attr)
        os.close(fd)
    except OSError as e:
        return Check("sk_storage", "no", "BPF_MAP_TYPE_SK_STORAGE refused: %s" % _one_line(e), title)
    finally:
        os.close(btf_fd)
    if not features.release_at_least(os.uname().release, (5, 11)):
        # The map type exists since 5.2, but bpf_sk_storage_get() is callable
        # from tracing programs (the probe's tp_btf) only since 5.11.
        return Check("sk_storage", "warn", "BPF_MAP_TYPE_SK_STORAGE map created, but tracing "
                     "programs can use it only from Linux 5.11: the probe records into its LRU "
                     "map here", title)
    return Check("sk_storage", "ok", "BPF_MAP_TYPE_SK_STORAGE map created", title)


# ---------------------------------------------------------------------------
# the probe's hooks, by really attaching each


def probe_hooks() -> List[Check]:
    from .. import probe

    if os.geteuid() != 0:
        return [Check("hook_" + h, "no", "not tried: loading BPF needs root", "hook " + h)
                for h in probe.HOOKS]
    probe.ensure_tracefs()
    need_btf = True
    feats = probe.detect_features(need_btf)
    reasons = probe.unavailable_reasons(feats)
    out = []
    for hook in probe.HOOKS:
        title = "probe hook " + hook
        if reasons.get(hook):
            out.append(Check("hook_" + hook, "no", "%s (not tried)" % reasons[hook], title))
            continue
        t0 = time.monotonic()
        try:
            p = probe.Probe.attach(map_size=64, hook=hook)
        except probe.ProbeUnavailable as e:
            ms = (time.monotonic() - t0) * 1000.0
            out.append(Check("hook_" + hook, "no", attach_reason(hook, str(e)), title, ms=ms))
            continue
        ms = (time.monotonic() - t0) * 1000.0
        try:
            detail = "loads and attaches (compile + load + attach)"
        finally:
            p.close()
        out.append(Check("hook_" + hook, "ok", detail, title, ms=ms))
    if not any(c.status == "ok" for c in out):
        out.append(Check("probe", "warn", "no hook loads: idle times from tcp_info (ms steps)", "probe"))
    return out


def attach_reason(hook: str, message: str) -> str:
    """The probe's refusal for one forced hook, said for this hook only."""
    text = " ".join(message.split())
    prefix = "no BPF hook could attach ("
    if text.startswith(prefix) and text.endswith(")"):
        text = text[len(prefix):-1]
    if text.startswith(hook + ": "):
        text = text[len(hook) + 2:]
    if hook == "fentry" and os.geteuid() == 0 and "Operation not permitted" in text:
        # As root an EPERM at load is the kernel refusing the program type:
        # BPF trampolines (fentry/fexit/LSM) disabled, e.g. by lockdown or a vendor patch.
        text += ": this kernel refuses BPF trampolines"
    return text


# ---------------------------------------------------------------------------
# bpffs and the tracker's pins


def bpffs_and_pins(pin_dir: str = DEFAULT_PIN_DIR) -> List[Check]:
    from .. import probe

    out = []
    root = "/sys/fs/bpf"
    if probe.is_bpffs(root):
        out.append(Check("bpffs", "ok", "bpffs mounted at %s" % root, "bpffs"))
    else:
        out.append(Check("bpffs", "warn", "no bpffs at %s (the tracker mounts one when it starts)"
                         % root, "bpffs"))
    found = {}
    try:
        for name in probe.PIN_NAMES + ("storage",):
            found[name] = probe.pinned_info(os.path.join(pin_dir, name))
        # the probe itself, pinned where it records while no tracker runs
        linked = probe.check_pin(os.path.join(pin_dir, "link"))
    except probe.ProbeUnavailable as e:
        out.append(Check("pins", "warn", _one_line(e), "pinned maps"))
        return out
    if not any(found.values()):
        out.append(Check("pins", "info", "nothing pinned in %s (no tracker has run; audit and "
                         "kill use tcp_info)" % pin_dir, "pinned maps"))
        return out
    parts = ["%s%s" % (n, " (%d entries max)" % i.max_entries if i and n == "activity" else "")
             for n, i in found.items() if i]
    if linked:
        parts.append("the probe's link (it records while no tracker runs; "
                     "`tcpidle track --cleanup` stops it)")
    holder = probe.pin_dir_holder(pin_dir)
    who = ("held by a running tracker (pid %d)" % holder if holder else
           "held by a running tracker") if holder is not None else "no tracker running"
    out.append(Check("pins", "ok", "%s: %s; %s" % (pin_dir, ", ".join(parts), who), "pinned maps"))
    return out


# ---------------------------------------------------------------------------
# forked helpers


def _run_child(body: Callable[[], Dict], timeout: float = CHILD_TIMEOUT) -> Dict:
    """Run body() in a forked child; its dict comes back as JSON ({"error": ...} if it raised)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        code = 0
        try:
            os.close(r)
            try:
                result = body()
            except BaseException as e:  # noqa: BLE001 -- the child reports every failure as data
                result = {"error": _one_line(e)}
            os.write(w, json.dumps(result).encode())
        except BaseException:  # noqa: BLE001 -- the child never unwinds into the parent's code
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                return {"error": "timed out after %.0f s" % timeout}
            data = os.read(r, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    try:
        return json.loads(b"".join(chunks).decode() or "{}")
    except ValueError:
        return {"error": "the helper process died"}


def _unshare_net() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(netns.CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "unshare(CLONE_NEWNET): %s" % os.strerror(e))


def _loopback_up() -> None:
    import fcntl

    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _pair(srv: socket.socket):
    cli = socket.create_connection(srv.getsockname(), timeout=2)
    acc, _ = srv.accept()
    return cli, acc


def _find(ds, state: int, port: int, family=socket.AF_INET):
    return [s for s in ds.dump(family, 1 << state) if s.sport == port]


def _wrong_cookie(sk):
    raw = bytearray(sk.raw_id)
    raw[40] ^= 0x01  # inet_diag_sockid.idiag_cookie[0]
    return replace(sk, raw_id=bytes(raw), cookie=sk.cookie ^ 1)


def _netlink_body() -> Dict:
    """In a private network namespace: destroy (checked), TIME_WAIT destroy, one-walk dump."""
    _unshare_net()
    _loopback_up()
    res: Dict = {}
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    cli, acc = _pair(srv)
    port = cli.getsockname()[1]
    with diag.DiagSocket() as ds:
        try:
            t0 = time.monotonic()
            n = len(ds.dump(diag.AF_UNSPEC, 1 << TcpState.ESTABLISHED))
            res["one_walk"] = ["ok", "TCPDIAG_GETSOCK answers both families in one walk "
                               "(%d sockets)" % n, (time.monotonic() - t0) * 1000]
        except (TcpidleError, OSError) as e:
            res["one_walk"] = ["no", "refused (%s): dumps go per family, as ss" % _one_line(e), None]
        found = _find(ds, TcpState.ESTABLISHED, port)
        if len(found) != 1:
            raise RuntimeError("INET_DIAG dump did not list the test connection (%d found)" % len(found))
        t0 = time.monotonic()
        wrong = ds.destroy([_wrong_cookie(found[0])])[0]
        cli.sendall(b"x")
        alive = acc.recv(1) == b"x"
        err = ds.destroy(found)[0]
        ms = (time.monotonic() - t0) * 1000
        if err:
            res["sock_destroy"] = ["no", "the kernel answered %s%s" % (
                errno.errorcode.get(err, err),
                " (built without CONFIG_INET_DIAG_DESTROY)" if err == errno.EOPNOTSUPP else
                " (no CAP_NET_ADMIN)" if err == errno.EPERM else ""), ms]
        else:
            cli.settimeout(2)
            try:
                cli.recv(1)
                seen = "but the owner saw no error"
            except ConnectionAbortedError:
                seen = "the owner got ECONNABORTED"
            except OSError as e:
                seen = "the owner got %s" % _one_line(e)
            checked = ("a wrong cookie was refused (%s)" % errno.errorcode.get(wrong, wrong)
                       if wrong == errno.ENOENT and alive else
                       "A WRONG COOKIE WAS NOT REFUSED (answer %s)" % errno.errorcode.get(wrong, wrong))
            ok = "ECONNABORTED" in seen and wrong == errno.ENOENT and alive
            res["sock_destroy"] = ["ok" if ok else "warn",
                                   "destroyed a loopback connection in a private namespace; "
                                   "%s; %s" % (seen, checked), ms]
        # TIME_WAIT: the side that closes first ends in it.
        c2, a2 = _pair(srv)
        port2 = c2.getsockname()[1]
        c2.close()
        a2.recv(1)  # its FIN arrived
        a2.close()
        deadline = time.monotonic() + 2
        tw = []
        while time.monotonic() < deadline and not tw:
            tw = _find(ds, TcpState.TIME_WAIT, port2)
            if not tw:
                time.sleep(0.01)
        if not tw:
            res["time_wait_destroy"] = ["warn", "no TIME_WAIT socket appeared to try on", None]
        else:
            err = ds.destroy(tw)[0]
            left = _find(ds, TcpState.TIME_WAIT, port2)
            if err == 0 and not left:
                res["time_wait_destroy"] = ["ok", "a TIME_WAIT socket was destroyed (Linux >= 6.0)",
                                            None]
            else:
                res["time_wait_destroy"] = ["no", "the kernel answered %s%s (Linux < 6.0 cannot)" % (
                    errno.errorcode.get(err, err) if err else "ok",
                    ", the socket stayed" if left else ""), None]
    for s in (cli, acc, srv):
        s.close()
    return res


def netlink() -> List[Check]:
    titles = {"sock_destroy": "SOCK_DESTROY (netlink)", "time_wait_destroy": "TIME_WAIT destroy",
              "one_walk": "one-walk dump"}
    t0 = time.monotonic()
    res = _run_child(_netlink_body)
    total = (time.monotonic() - t0) * 1000
    if "error" in res:
        why = res["error"]
        if os.geteuid() != 0 and ("unshare" in why or "EPERM" in why):
            why += " (run as root)"
        return [Check(SOCK_DESTROY, "no", "could not test: %s" % why, titles["sock_destroy"], ms=total)]
    out = []
    for name in ("sock_destroy", "time_wait_destroy", "one_walk"):
        if name in res:
            status, detail, ms = res[name]
            out.append(Check(name, status, detail, titles[name], ms=ms))
    return out


# ---------------------------------------------------------------------------
# pidfd_getfd, as the /proc fallback uses it


def _ptrace_scope() -> Optional[int]:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def pidfd() -> Check:
    from .. import fallback

    title = "pidfd_getfd (/proc fallback)"
    scope = _ptrace_scope()
    where = "Yama ptrace_scope=%s" % scope if scope is not None else "no Yama"
    if not hasattr(os, "pidfd_open"):
        return Check(PIDFD_GETFD, "no", "Python lacks os.pidfd_open", title)
    info_r, info_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child): leave a grandchild that is not our descendant
        try:
            os.close(info_r)
            os.close(hold_w)
            if os.fork() == 0:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                os.write(info_w, b"%d %d\n" % (os.getpid(), s.fileno()))
                os.close(info_w)
                select.select([hold_r], [], [], CHILD_TIMEOUT)  # until the doctor is done
        finally:
            os._exit(0)
    os.close(info_w)
    os.close(hold_r)
    os.waitpid(pid, 0)
    gpid = None
    try:
        if not select.select([info_r], [], [], CHILD_TIMEOUT)[0]:
            return Check(PIDFD_GETFD, "no", "helper process did not start", title)
        gpid, fd = map(int, os.read(info_r, 64).split())
        pfd = os.pidfd_open(gpid)
        try:
            dup = fallback._pidfd_getfd(pfd, fd)
            os.close(dup)
        except OSError as e:
            return Check(PIDFD_GETFD, "no", "refused on a process of its own (%s): %s"
                         % (where, _one_line(e)), title)
        finally:
            os.close(pfd)
        return Check(PIDFD_GETFD, "ok", "duplicated a socket from a non-descendant process (%s)"
                     % where, title)
    except OSError as e:
        return Check(PIDFD_GETFD, "no", "%s (%s)" % (_one_line(e), where), title)
    finally:
        os.close(info_r)
        os.close(hold_w)  # the grandchild exits


# ---------------------------------------------------------------------------
# other namespaces: can tcpidle dump there?


def namespace(ns: "netns.Netns") -> Check:
    label = str(ns.label)
    try:
        fd = netns.open_fd(ns)
    except (TcpidleError, OSError) as e:
        return Check("netns", "no", _one_line(e), "INET_DIAG dump", netns=label)
    try:
        with diag.DiagSocket(netns_fd=fd, netns_label=label) as ds:
            mask = (1 << TcpState.ESTABLISHED)
            socks = ds.dump_sockets((socket.AF_INET, socket.AF_INET6), mask)
        walk = "one walk" if diag.DiagSocket.single_walk else "per family"
        return Check("netns", "ok", "dumped %d established connections (%s)" % (len(socks), walk),
                     "INET_DIAG dump", netns=label)
    except (TcpidleError, OSError) as e:
        return Check("netns", "no", _one_line(e), "INET_DIAG dump", netns=label)
    finally:
        os.close(fd)
