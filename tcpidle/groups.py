"""Grouping connections for per-group reports (`audit --by dport|sport|netns|owner`).

Owns the group keys and their labels, in one place, for every report that
groups: the idle-time histograms of `audit --hist` (`group`: the
connections of each group), and the counts per verdict of `audit --by`,
the middlebox report and the tracker's per-process gauges (`count`).
The CLOSE_WAIT leak report is `audit --by owner --state close-wait`: the
process that never closes its sockets heads the list with its count.
Pure: owners come in as the engine's {inode: OwnerSummary} (Scan.owners).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .health import VERDICTS
from .model import Verdict

BY = ("dport", "sport", "netns", "owner")
NO_OWNER = "-"


def key(verdict: Verdict, by: str, owners: Optional[Mapping] = None) -> Tuple:
    """Sort key and label of the connection's group: (sortable, label).

    Besides BY, "comm" groups by the owners' process names alone (the
    tracker's gauges: nginx's workers together).
    """
    s = verdict.socket
    if by == "dport":
        return (0, s.dport), str(s.dport)
    if by == "sport":
        return (0, s.sport), str(s.sport)
    if by == "netns":
        if s.netns is None:
            return (0, ""), "(own)"
        return (1, str(s.netns)), str(s.netns)
    if by in ("owner", "comm"):
        held = (owners or {}).get(s.inode) if s.inode else None
        if not held or not held.pids:
            return (1, NO_OWNER), NO_OWNER
        if by == "comm":
            label = ",".join(held.comms) or "?"
        else:
            label = "%s[%s]" % (",".join(held.comms) or "?", ",".join(str(p) for p in held.pids))
        return (0, label), label
    raise ValueError("cannot group by %r (want %s)" % (by, ", ".join(BY + ("comm",))))


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


class Count(NamedTuple):
    """One line of a report that counts per group: `audit --by`, the middlebox report."""

    by: str  # "owner", "dport", "sport", "netns" (or "comm")
    key: str  # "nginx[812,813]", "5432", "blue", "(own)", "-" for no owner
    pids: Tuple[int, ...]  # the owners', with by="owner"
    comms: Tuple[str, ...]
    counts: Dict[str, int]  # label -> connections, every column present (0 included)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count(verdicts: Sequence[Verdict], by: str, owners: Optional[Mapping] = None,
          label: Optional[Callable[[Verdict], Optional[str]]] = None,
          columns: Sequence[str] = VERDICTS) -> List[Count]:
    """Count `verdicts` per group, the largest group first (then in group() order).

    `label(verdict)` says what to count a connection as: by default its
    health verdict ("unknown" when it has none); a label of None leaves the
    connection out (the middlebox report counts only past / at-risk ones).
    `columns` are the labels every group lists, 0 included.
    """
    if label is None:
        def label(v: Verdict) -> Optional[str]:
            return v.health.verdict if v.health is not None else "unknown"
    out = []
    for order, (name, members) in enumerate(group(verdicts, by, owners)):
        counter = Counter(x for x in map(label, members) if x is not None)
        if not counter:
            continue
        held = (owners or {}).get(members[0].socket.inode) if by in ("owner", "comm") else None
        pids = held.pids if held is not None and by == "owner" else ()
        comms = held.comms if held is not None else ()
        names = list(columns) + sorted(set(counter) - set(columns))
        out.append((order, Count(by, name, tuple(pids), tuple(comms),
                                 {n: counter.get(n, 0) for n in names})))
    out.sort(key=lambda oc: (-oc[1].total, oc[0]))
    return [c for _order, c in out]
