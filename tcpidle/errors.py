"""Exceptions tcpidle raises on purpose, each mapped to an exit status.

`UsageError` (exit 2) is bad input found before anything is touched;
`RuntimeFailure` (exit 1) is a failure while running: missing privilege, a
kernel feature that is absent with no fallback, a kill that failed.
"""


class TcpidleError(Exception):
    """Base of every error tcpidle reports as one line."""

    exit_code = 1


class UsageError(TcpidleError):
    """The user's input is invalid; nothing has been done."""

    exit_code = 2


class RuntimeFailure(TcpidleError):
    """Something failed at run time."""

    exit_code = 1


class PrivilegeError(RuntimeFailure):
    """The caller lacks a capability the operation needs."""


class NetlinkError(RuntimeFailure):
    """The kernel answered a netlink request with an error."""

    def __init__(self, errno_: int, what: str):
        import os

        self.errno = errno_
        super().__init__("%s: %s" % (what, os.strerror(errno_)))
