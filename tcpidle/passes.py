"""A kill pass as the user sees it: scan, act batch by batch, each batch reported as done.

Owns the one pass of `kill`, shared by every poll of `kill -i` and `track`:
the engine's scan, then its destroy batches (`Engine.act_batches`), each
handed to `report` (log lines, rows) and to `on_batch` (the tracker's event
log and metrics) as soon as the kernel answered it, before the next is
sent; a summary at the end.  An error raised by a later batch, or a stop
request between batches (a signal), loses nothing that was done: the
summary then says the pass was cut short, and the error propagates.

The pass returns what happened (`Pass`); the engine prints nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional

from . import report
from .engine import Batch, Engine, Scan, Spare, why
from .model import Outcome


@dataclass
class Pass:
    """What one pass found (`scan`), did (`outcomes`) and left alone (`spared`)."""

    scan: Scan
    outcomes: List[Outcome]
    spared: List[Spare]
    seconds: float
    dry_run: bool
    interrupted: int = 0  # victims not acted on: a stop request came first


def run_pass(engine: Engine, as_json: bool, name: str, quiet_if_empty: bool = False,
             clock: Callable[[], float] = time.monotonic,
             on_batch: Optional[Callable[[Batch], None]] = None,
             stop: Optional[Callable[[], bool]] = None) -> Pass:
    """Scan, then act batch by batch, each batch reported as soon as it is done.

    `name` prefixes the summary ("kill", "track"); `quiet_if_empty`: no
    summary when nothing happened (polls).
    """
    started = clock()
    scan = engine.scan(every=False)  # the victims and the counts, not a verdict per socket
    outcomes: List[Outcome] = []
    spared: List[Spare] = []
    refused: list = []  # keep-alive retrofit: pidfd_getfd refused, said once per owner below
    cut: Optional[str] = None
    header = None  # the table's header, printed for the first batch only
    try:
        for batch in engine.act_batches(scan, stop):
            outcomes.extend(batch.outcomes)
            spared.extend(batch.spared)
            refused.extend(batch.refused)
            report.log_batch(batch.outcomes, batch.spared,
                             said_per_owner={e.inode for e in batch.refused})
            if on_batch is not None:
                on_batch(batch)
            header = report.show(batch.outcomes, as_json, header_shown=header)
        if engine.interrupted:
            cut = "stopped by a signal"
    except BaseException as exc:
        cut = "stopped by an error (%s)" % (why(exc) if isinstance(exc, Exception)
                                             else type(exc).__name__)
        raise
    finally:
        scan.close()
        if refused:
            from .retrofit import refusal_lines  # only the keep-alive retrofit refuses

            for line in refusal_lines(refused):
                report.log.error("%s", line)
        elapsed = clock() - started
        if outcomes or spared or cut or not quiet_if_empty:
            left = 0
            if cut:
                planned = len(scan.victims)
                if engine.policy.max_kills is not None:
                    planned = min(planned, engine.policy.max_kills)
                left = max(0, planned - len(outcomes) - len(spared))
            report.summary_kill(outcomes, scan.matched, len(scan.victims), elapsed * 1000.0,
                                engine.policy.dry_run, prefix=name,
                                spared=[s.kind for s in spared], cut=cut, left=left,
                                victims_are="idle" if engine.policy.keepalive is None
                                else "without keep-alive")
    return Pass(scan, outcomes, spared, elapsed, engine.policy.dry_run, engine.interrupted)
