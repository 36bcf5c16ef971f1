"""A fake /proc tree for the unit tier: who holds which socket inode.

`make_proc(root, {pid: Holder(...)})` writes ROOT/PID/{comm,cgroup,fd/N,ns/net}
as the kernel shows them (fd/N a symlink to "socket:[INODE]"), for
`procfs.owners_by_inode(proc_root=ROOT)` to walk.  Pids are impossible ones
by default (above the kernel's PID_MAX_LIMIT, 4194304), so that the /proc
fallback's pidfd_open() on them answers ESRCH and no real process is ever
touched by a unit test.  `--pid` refuses those, so tests of the owner
selectors use pids below the limit (`SELECTOR_PID`) with `impossible=False`:
they must never reach the fallback (SOCK_DESTROY is supported there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Sequence

PID_MAX_LIMIT = 1 << 22
FIRST_PID = 5_000_001  # > PID_MAX_LIMIT: no process can have it
SELECTOR_PID = 4_190_001  # what --pid accepts; only ever read, never acted on


@dataclass
class Holder:
    comm: str
    inodes: Sequence[int]
    cgroup: str = "/"


def make_proc(root: str, holders: Dict[int, Holder], impossible: bool = True) -> str:
    for pid, h in holders.items():
        if impossible and pid <= PID_MAX_LIMIT:
            raise ValueError("fake pid %d could be a real process" % pid)
        d = os.path.join(root, str(pid))
        os.makedirs(os.path.join(d, "fd"))
        os.makedirs(os.path.join(d, "ns"))
        with open(os.path.join(d, "comm"), "w") as f:
            f.write(h.comm + "\n")
        with open(os.path.join(d, "cgroup"), "w") as f:
            f.write("0::%s\n" % h.cgroup)
        open(os.path.join(d, "ns", "net"), "w").close()
        for fd, inode in enumerate(h.inodes, start=3):
            os.symlink("socket:[%d]" % inode, os.path.join(d, "fd", str(fd)))
    return root
