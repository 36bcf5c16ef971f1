"""What a pass keeps of the sockets it matched: the victims, the exposed, the counts.

Owns `Tally`, filled verdict by verdict while the dump streams
(`Engine.scan`): a poll of 100,000 sockets must not hold 100,000 verdicts
(~1.6 KB each with their sockets) until it ends, so each verdict is counted
and dropped unless something after the dump needs it:

- the victims (acted on; shown), with the probe record each was judged by
  (the re-check compares it with a fresh one);
- with a middlebox policy, the connections past its timeout or at risk
  (their owners name the tracker's gauges);
- for the summary and the metrics: how many matched, each known idle time
  (8 bytes each, for the idle histogram), the count per health verdict.

`every=True` keeps every verdict as well (`verdicts`: audit shows them).
With `armed` (the keep-alive retrofit: cookies this engine armed), a
victim already armed is counted as no victim, and the armed cookies still
matched are collected (`still_armed`).  Pure: no I/O.
"""

from __future__ import annotations

from array import array
from typing import Dict, Iterable, List, Optional

from .model import Activity, Verdict

# middlebox.PAST, middlebox.AT_RISK (not imported: the tally needs the names only)
EXPOSED = ("past", "at-risk")


class Tally:
    """The matched sockets of one pass, counted; only what must survive it kept."""

    __slots__ = ("matched", "victims", "exposed", "idle_ms", "by_verdict", "records",
                 "verdicts", "armed", "still_armed")

    def __init__(self, every: bool = False, armed: Optional[set] = None):
        self.matched = 0
        self.victims: List[Verdict] = []
        self.exposed: List[Verdict] = []
        self.idle_ms = array("d")  # every known idle time, ms
        self.by_verdict: Dict[str, int] = {}
        self.records: Dict[int, Activity] = {}  # by cookie: the victims' probe records
        self.verdicts: Optional[List[Verdict]] = [] if every else None
        self.armed = armed or None
        self.still_armed: set = set()

    @classmethod
    def of(cls, verdicts: Iterable[Verdict], records: Optional[Dict[int, Activity]] = None,
           every: bool = False, armed: Optional[set] = None) -> "Tally":
        """A tally of verdicts decided already (`records`: the probe records, by cookie)."""
        t = cls(every, armed)
        if not records:
            for v in verdicts:
                t.add(v, None)
            return t
        get = records.get
        for v in verdicts:
            t.add(v, get(v.socket.cookie))
        return t

    def add(self, v: Verdict, record: Optional[Activity]) -> None:
        """Count one matched socket's verdict (and keep it, if it must be kept)."""
        self.matched += 1
        if self.armed is not None:
            cookie = v.socket.cookie
            if cookie in self.armed:
                self.still_armed.add(cookie)
                if v.victim:
                    v = v._replace(victim=False)
        if v.idle_ms is not None:
            self.idle_ms.append(v.idle_ms)
        h = v.health
        if h is not None:
            by = self.by_verdict
            by[h.verdict] = by.get(h.verdict, 0) + 1
        if v.exposure in EXPOSED:
            self.exposed.append(v)
        if v.victim:
            self.victims.append(v)
            if record is not None:
                self.records[v.socket.cookie] = record
        if self.verdicts is not None:
            self.verdicts.append(v)
