"""Stopping a one-shot run between two destroy batches.

Owns the SIGTERM/SIGINT handling of `tcpidle kill` (the tracker's loop has
its own, in polling.py).  Python's defaults would end the run wherever the
signal lands -- SIGTERM at once, SIGINT as a KeyboardInterrupt in the middle
of a netlink exchange -- and the connections destroyed so far would go
unreported.  Here the handler only records the signal; the engine asks
between batches (`stop()`), so the batch in flight completes, is reported,
and the pass ends there.  A second signal of the same kind while stopping
gets the default behaviour back (a way out if something hangs).
"""

from __future__ import annotations

import signal
from typing import Dict, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """A context manager and a stop() callable: true once SIGTERM or SIGINT arrived."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handler(self, signum, _frame) -> None:
        if self.signum is not None:  # asked twice: stop waiting for the batch
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self) -> "StopOnSignal":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
