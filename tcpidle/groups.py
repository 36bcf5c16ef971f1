"""Grouping connections for per-group reports (`audit --by dport|sport|netns|owner`).

Owns the group keys and their labels, in one place, for every report that
groups (the idle-time histograms of `audit --hist`, and per-group counts).
Pure: owners come in as the engine's {inode: OwnerSummary} (Scan.owners).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .model import Verdict

BY = ("dport", "sport", "netns", "owner")
NO_OWNER = "-"


def key(verdict: Verdict, by: str, owners: Optional[Mapping] = None) -> Tuple:
    """Sort key and label of the connection's group: (sortable, label)."""
    s = verdict.socket
    if by == "dport":
        return (0, s.dport), str(s.dport)
    if by == "sport":
        return (0, s.sport), str(s.sport)
    if by == "netns":
        if s.netns is None:
            return (0, ""), "(own)"
        return (1, str(s.netns)), str(s.netns)
    if by == "owner":
        held = (owners or {}).get(s.inode)
        if not held or not held.pids:
            return (1, NO_OWNER), NO_OWNER
        label = "%s[%s]" % (",".join(held.comms) or "?", ",".join(str(p) for p in held.pids))
        return (0, label), label
    raise ValueError("cannot group by %r (want %s)" % (by, ", ".join(BY)))


def group(verdicts: Sequence[Verdict], by: Optional[str],
          owners: Optional[Mapping] = None) -> List[Tuple[str, List[Verdict]]]:
    """[(label, verdicts)] in a stable order (ports numerically, own netns first,
    unknown owner last); by=None is one group labelled "all"."""
    if by is None:
        return [("all", list(verdicts))]
    groups: Dict[Tuple, Tuple[str, List[Verdict]]] = {}
    for v in verdicts:
        sort, label = key(v, by, owners)
        groups.setdefault(sort, (label, []))[1].append(v)
    return [groups[k] for k in sorted(groups)]
