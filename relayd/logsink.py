"""relayd's log output: one line per record on standard error (relayd(8), SYSTEMD).

Under load the log carries thousands of lines a second (a downlink write is
audited one line each, relayd(8) DOWNLINK), so the line is made cheaply and
written in batches: what the event loop logs during one iteration goes out
in one ``write`` at the end of it, not one system call (and, under systemd,
one wake-up of journald) per line. A warning or an error is written at
once, with whatever waited before it, and so is anything logged off the
loop. The batch is bounded by the stream's buffer: a full one is written
then and there.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import time
from typing import TextIO

SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
BUFFER = 64 * 1024  # bytes of lines that may wait for the end of a loop iteration


class JournalFormatter(logging.Formatter):
    """``<N>message``: journald reads the priority and adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


class TimeFormatter(logging.Formatter):
    """``logging.Formatter``'s ``asctime``, with the date and time of day made once a second."""

    DATE = "%Y-%m-%d %H:%M:%S"  # logging.Formatter's default_time_format and _msec_format
    MSEC = "%s,%03d"

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime(self.DATE, self.converter(record.created))
            self._second = second
        return self.MSEC % (self._text, record.msecs)


class LoopBatchedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the loop's info lines at the end of its iteration."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._due_on: asyncio.AbstractEventLoop | None = None  # the loop a flush waits on

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            if record.levelno < logging.WARNING and self._later():
                return
            self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _later(self) -> bool:
        """Whether the line can wait for the end of this loop iteration (a flush is due then)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # off the loop (another thread, or before and after it)
            return False
        if self._due_on is not loop:
            self._due_on = loop
            loop.call_soon(self._flush_due)
        return True

    def _flush_due(self) -> None:
        self._due_on = None
        self.flush()


def stderr_stream() -> TextIO | None:
    """Standard error's file descriptor behind a buffer of ``BUFFER`` bytes, not line buffered.

    None when there is none (started with it closed: Python's ``sys.stderr`` is None).
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(
        io.BufferedWriter(raw, BUFFER), encoding="utf-8", errors="backslashreplace"
    )


def configure(level: str, *, journal: bool) -> None:
    """The root logger writes to standard error at ``level``; for journald if ``journal``."""
    stream = stderr_stream()
    handler: logging.Handler
    if stream is None:  # nowhere to write: nothing to format either
        handler = logging.NullHandler()
    else:
        handler = LoopBatchedHandler(stream)
    if journal:
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(TimeFormatter("%(asctime)s %(levelname)s %(message)s"))
    # What no relayd format shows is not looked up for every record (the logging
    # HOWTO's "Optimization"): thread, process and task names.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12
        logging.logAsyncioTasks = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
