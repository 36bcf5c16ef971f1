"""The doctor's results and what they mean (pure: no system calls).

A Check is one answer: a stable `name` (the JSON key for scripts), a
`status` and one line of detail.  Status words:

  ok    works (tried, where trying is possible)
  no    does not work here; `detail` says why
  warn  works only in part, or something an admin should look at
  info  a fact (versions, paths), not a judgement

decide() turns the checks into the exit status: 0 when the main path
(SOCK_DESTROY over netlink) works; 0 with a note when only the /proc
fallback (pidfd_getfd + shutdown) can destroy; 1, with the reason, when
nothing can destroy a connection at all.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

STATUSES = ("ok", "no", "warn", "info")

# Checks decide() reads, by name.
SOCK_DESTROY = "sock_destroy"
PIDFD_GETFD = "pidfd_getfd"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    title: str = ""
    netns: Optional[str] = None
    ms: Optional[float] = None

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError("status %r not in %s" % (self.status, STATUSES))


def decide(checks: Sequence[Check]) -> Tuple[int, str]:
    """(exit status, one line) for the checks of the caller's own namespace."""
    by: Dict[str, Check] = {c.name: c for c in checks if c.netns is None}
    destroy = by.get(SOCK_DESTROY)
    fallback = by.get(PIDFD_GETFD)
    if destroy is not None and destroy.status == "ok":
        return 0, "tcpidle can destroy connections here (SOCK_DESTROY)"
    why = destroy.detail if destroy is not None else "not checked"
    if fallback is not None and fallback.status == "ok":
        return 0, ("SOCK_DESTROY unavailable (%s): tcpidle kill falls back to /proc "
                   "(pidfd_getfd + shutdown in the owner)" % why)
    fb = fallback.detail if fallback is not None else "not checked"
    return 1, "tcpidle cannot destroy connections here: SOCK_DESTROY %s; /proc fallback %s" % (why, fb)


def _label(c: Check) -> str:
    return c.title or c.name


def table(checks: Sequence[Check], width: int = 100) -> List[str]:
    """Aligned lines: CHECK  STATUS  DETAIL (namespaced checks say their namespace)."""
    labels = [(_label(c) + (" [%s]" % c.netns if c.netns else "")) for c in checks]
    w = max([len("CHECK")] + [len(s) for s in labels])
    lines = ["%-*s  %-6s %s" % (w, "CHECK", "STATUS", "DETAIL")]
    for label, c in zip(labels, checks):
        detail = c.detail + (" (%.0f ms)" % c.ms if c.ms is not None and c.ms >= 1 else "")
        lines.append("%-*s  %-6s %s" % (w, label, c.status, detail))
    return lines


def json_lines(checks: Sequence[Check]) -> List[str]:
    """One JSON object per check: name, status, detail, title, netns, ms."""
    out = []
    for c in checks:
        d = asdict(c)
        if d["ms"] is not None:
            d["ms"] = round(d["ms"], 1)
        out.append(json.dumps(d, sort_keys=True))
    return out
