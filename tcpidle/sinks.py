"""Where tcpidle's output goes, and what happens when it cannot go there.

Owns the outputs that can fail under a running tool -- stdout (a reader
that went away: `tcpidle track --json | head -1`; a full disk), the log
file (-f) and the event log (--event-log) -- and the rule for them: a
failed write never stops anything else.  The kill it reported on was done;
the other outputs (log file, syslog, event log, metrics) still say so.
Each failure is recorded here (`FAILURES`), said once on stderr and in the
log, counted in `tcpidle_output_errors_total{output}` by the tracker (once
per poll, `Tracker.poll`), and turns the exit status to 1 (`exit_status`).

Why not Python's own handlers: logging.FileHandler writes through a
buffered file object, and on ENOSPC or EIO the data stays in the buffer
while every later record fails again, each with a traceback on stderr
(logging.Handler.handleError).  Here each line is one write(2) on an
O_APPEND descriptor: a line is written whole or counted as lost, and a
disk that has room again takes the next line.

Everything these handlers write is made printable first (`safetext`): log
lines carry process names and paths that other users chose.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from typing import Dict, List, Tuple

from .safetext import printable

log = logging.getLogger("tcpidle")

STDOUT, LOGFILE, EVENT_LOG = "stdout", "logfile", "event-log"
OUTPUTS = (STDOUT, LOGFILE, EVENT_LOG)
_NAMES = {LOGFILE: "log file", EVENT_LOG: "event log"}


class Failures:
    """What could not be written, by output: lines lost and the last reason."""

    def __init__(self):
        self.lost: Counter = Counter()  # output -> lines lost, over the whole run
        self.reason: Dict[str, str] = {}  # output -> "PATH: strerror" of the last failure
        self._told: Counter = Counter()  # lines already said by take_new()

    def record(self, output: str, where: str, exc: BaseException, lines: int = 1) -> None:
        """Count `lines` lost on `output`, and why."""
        self.lost[output] += lines
        self.reason[output] = "%s: %s" % (printable(where), _strerror(exc))

    def take_new(self) -> Dict[str, Tuple[int, str]]:
        """output -> (lines lost since the last call, reason); for the per-poll notice."""
        new = {}
        for output, lost in list(self.lost.items()):
            if lost > self._told[output]:
                new[output] = (lost - self._told[output], self.reason[output])
                self._told[output] = lost
        return new

    def summary(self) -> List[str]:
        """One text per failed output, for the final error lines."""
        return ["%s: %d line%s not written" % (self.reason[o], n, "" if n == 1 else "s")
                for o, n in sorted(self.lost.items()) if o in self.reason]

    def clear(self) -> None:
        self.__init__()


FAILURES = Failures()


def _strerror(exc: BaseException) -> str:
    return printable(getattr(exc, "strerror", None) or exc)


def exit_status(code: int) -> int:
    """The exit status with output failures counted: 0 becomes 1 when something was lost.

    Says each failed output once more, on stderr, as the run's last words.
    """
    lines = FAILURES.summary()
    for text in lines:
        write_stderr("tcpidle: error: %s\n" % text)
    if lines and code == 0:
        return 1
    return code


def write_stderr(text: str) -> None:
    """Write to stderr; nothing else can be done if that fails too."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------------------
# files appended to: the log file and the event log


def open_append(path: str, create: bool = True) -> int:
    """An O_APPEND descriptor for a log (created 0640 if missing), never blocking in open().

    O_NONBLOCK makes open(2) of a FIFO with no reader fail with ENXIO
    instead of waiting for one; it is cleared after, so writes wait as a
    log's should.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    fd = os.open(path, flags | (os.O_CREAT if create else 0), 0o640)
    try:
        os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        raise
    return fd


class AppendFile:
    """A file written one whole write(2) at a time; failures are recorded, never raised.

    open() failures at start-up raise (the caller makes them exit 1 before
    anything is done); `reopen()` (SIGHUP) keeps the old descriptor when the
    new open fails, and records why.
    """

    def __init__(self, path: str, output: str):
        self.path = path
        self.output = output
        self.where = "%s %s" % (_NAMES.get(output, output), path)
        self.fd = open_append(path)

    def write(self, text: str, lines: int = 1) -> bool:
        """Append `text`; False (and the loss recorded) when it could not be written."""
        data = text.encode("utf-8", "backslashreplace")
        try:
            if self.fd < 0:
                raise OSError(9, "not open")
            view = memoryview(data)
            while view:
                # A short write (a disk filling up) leaves the rest to the next call.
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            FAILURES.record(self.output, self.where, exc, lines)
            return False
        return True

    def reopen(self) -> None:
        try:
            fd = open_append(self.path)
        except OSError as exc:
            log.error("%s: cannot reopen (%s): still writing to the old file",
                      self.where, _strerror(exc))
            return
        old, self.fd = self.fd, fd
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------------------
# logging


NOTICE = "tcpidle_output_notice"  # a record about an output's failure: not sent to that output


class PrintableFormatter(logging.Formatter):
    """A Formatter whose message has every control character escaped (safetext)."""

    def formatMessage(self, record):  # noqa: N802 - logging's name
        record.message = printable(record.message)
        return super().formatMessage(record)


class LogFileHandler(logging.Handler):
    """-f/--logfile: one line per record, appended; reopened on SIGHUP; never raises."""

    def __init__(self, path: str):
        super().__init__()
        self.file = AppendFile(path, LOGFILE)

    @property
    def path(self) -> str:
        return self.file.path

    def emit(self, record):
        if getattr(record, NOTICE, None) == LOGFILE:
            return
        try:
            text = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 - a bad format string must not become a traceback
            text = "%s (unformattable log record)\n" % printable(record.msg)
        self.file.write(text)

    def reopen(self) -> None:
        self.acquire()
        try:
            self.file.reopen()
        finally:
            self.release()

    def close(self):
        self.file.close()
        super().close()


class StderrHandler(logging.StreamHandler):
    """stderr (with -v): a write that fails is dropped; there is nowhere left to say it."""

    def __init__(self):
        super().__init__(sys.stderr)

    def handleError(self, record):  # noqa: N802 - logging's name
        pass


def quiet_logging_errors() -> None:
    """No logging traceback ever: a handler that fails records it (above) or is silent."""
    logging.raiseExceptions = False


def say_new_failures() -> Dict[str, int]:
    """Log the outputs that lost lines since the last call, once each; output -> lines lost.

    The tracker calls this once per poll: a disk that stays full is one
    line per interval, not one per kill.  A broken stdout was said when it
    broke, and stays broken: only counted.
    """
    new = FAILURES.take_new()
    for output, (lost, reason) in sorted(new.items()):
        if output == STDOUT:
            continue
        log.error("%s: %d line%s not written since the last poll", reason, lost,
                  "" if lost == 1 else "s", extra={NOTICE: output})
    return {output: lost for output, (lost, _reason) in new.items()}


# ---------------------------------------------------------------------------
# stdout


class SafeStdout:
    """sys.stdout for rows: the first failed write closes it for good, said once.

    After EPIPE (the reader went away) or another error (ENOSPC), rows are
    dropped and counted; fd 1 is pointed at /dev/null so that no later
    flush, the interpreter's own at exit included, fails again.
    """

    def __init__(self):
        self.broken = False
        self._pending = 0  # lines written since the last flush that succeeded

    def write(self, text: str) -> None:
        lines = text.count("\n")
        if self.broken:
            FAILURES.lost[STDOUT] += lines
            return
        self._pending += lines
        try:
            sys.stdout.write(text)
        except (OSError, ValueError) as exc:
            self._break(exc)

    def flush(self) -> None:
        if self.broken:
            return
        try:
            sys.stdout.flush()
        except (OSError, ValueError) as exc:
            self._break(exc)
            return
        self._pending = 0

    def _break(self, exc: BaseException) -> None:
        self.broken = True
        FAILURES.record(STDOUT, "stdout", exc, self._pending)
        self._pending = 0
        try:
            devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            sys.stdout.flush()  # what was buffered goes to /dev/null
        except (OSError, ValueError):
            pass
        log.error("stdout: %s: rows are no longer printed; the log, event log and metrics "
                  "go on", _strerror(exc))


_STDOUT = SafeStdout()


def stdout() -> SafeStdout:
    """The process's guarded stdout (report.show writes rows there)."""
    return _STDOUT
