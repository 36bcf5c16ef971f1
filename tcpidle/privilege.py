"""May this process act?  Capabilities read from /proc/self/status.

Lets the commands refuse early, with one line, what the kernel would refuse
later (SOCK_DESTROY without CAP_NET_ADMIN), and say when owners can be shown
only for the caller's own processes.
"""

from __future__ import annotations

import os

# include/uapi/linux/capability.h
CAP_NET_ADMIN = 12

__all__ = ["has_capability", "has_cap_net_admin", "is_root", "CAP_NET_ADMIN"]


def has_capability(cap: int, status_path: str = "/proc/self/status") -> bool:
    """True if bit CAP is set in the effective capability set (CapEff)."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool((int(line.split()[1], 16) >> cap) & 1)
    except (OSError, ValueError, IndexError):
        return False
    return False


def has_cap_net_admin(status_path: str = "/proc/self/status") -> bool:
    """SOCK_DESTROY and dumping other users' sockets need CAP_NET_ADMIN."""
    return has_capability(CAP_NET_ADMIN, status_path)


def is_root() -> bool:
    """Effective uid 0 (pidfd_getfd on other users' processes needs it or
    CAP_SYS_PTRACE)."""
    return os.geteuid() == 0
