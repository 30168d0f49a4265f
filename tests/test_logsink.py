"""relayd.logsink: the loop's info lines go out once per iteration, warnings at once."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from relayd import logsink

pytestmark = pytest.mark.anyio


class CountingStream(io.StringIO):
    """What reached the stream, and what was flushed (the system calls of a real one)."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue()[sum(map(len, self.flushed)) :])


@pytest.fixture
def sink() -> Iterator[tuple[logging.Logger, CountingStream]]:
    stream = CountingStream()
    handler = logsink.LoopBatchedHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logsink.JournalFormatter("%(message)s"))
    log = logging.getLogger("relayd.test_logsink")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log, stream
    log.handlers[:] = []
    log.propagate = True


async def test_lines_of_one_iteration_go_out_together(
    sink: tuple[logging.Logger, CountingStream],
) -> None:
    log, stream = sink
    for n in range(3):
        log.info("line %d", n)
    assert stream.flushed == []  # written to the buffer, not yet flushed
    await asyncio.sleep(0)  # the rest of this iteration: the flush was due before this task
    assert stream.flushed == ["<6>line 0\n<6>line 1\n<6>line 2\n"]
    log.info("next")
    await asyncio.sleep(0)
    assert stream.flushed[1:] == ["<6>next\n"]


async def test_a_warning_goes_out_at_once_with_what_waited(
    sink: tuple[logging.Logger, CountingStream],
) -> None:
    log, stream = sink
    log.info("before")
    log.warning("trouble")
    assert stream.flushed == ["<6>before\n<4>trouble\n"]


def test_off_the_loop_every_line_goes_out_at_once(
    sink: tuple[logging.Logger, CountingStream],
) -> None:
    log, stream = sink
    log.info("no loop")
    assert stream.flushed == ["<6>no loop\n"]
    done = threading.Event()

    async def loop_then_thread() -> None:
        log.info("on the loop")  # its flush waits for the iteration's end
        thread = threading.Thread(target=lambda: (log.info("from a thread"), done.set()))
        thread.start()
        await asyncio.to_thread(thread.join)

    asyncio.run(loop_then_thread())
    assert done.is_set()
    assert "".join(stream.flushed) == "<6>no loop\n<6>on the loop\n<6>from a thread\n"


def test_a_line_left_when_a_loop_ends_does_not_hold_back_later_ones(
    sink: tuple[logging.Logger, CountingStream],
) -> None:
    log, stream = sink

    async def log_and_return() -> None:
        log.info("last on the loop")

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(log_and_return())
    finally:
        loop.close()  # the due flush never ran
    log.info("after the loop")
    assert stream.getvalue() == "<6>last on the loop\n<6>after the loop\n"
    assert "".join(stream.flushed) == stream.getvalue()

    async def again() -> None:
        log.info("a new loop")
        await asyncio.sleep(0)
        assert stream.flushed[-1] == "<6>a new loop\n"

    asyncio.run(again())


def test_time_formatter_matches_logging_formatter() -> None:
    fmt = "%(asctime)s %(levelname)s %(message)s"
    ours, theirs = logsink.TimeFormatter(fmt), logging.Formatter(fmt)
    base = 1_790_000_000.0
    for created in (base + 0.001, base + 0.999, base + 1.5, base + 1.5, base + 3661.25):
        record = logging.LogRecord("relayd", logging.INFO, __file__, 1, "hello", (), None)
        record.created, record.msecs = created, int((created - int(created)) * 1000)
        assert ours.format(record) == theirs.format(record)


def test_configure_writes_to_standard_error() -> None:
    """The real stream: standard error's descriptor, not Python's sys.stderr object."""
    script = (
        "import asyncio, logging\n"
        "from relayd import logsink\n"
        "logsink.configure('info', journal=False)\n"
        "async def main():\n"
        "    logging.getLogger('relayd').info('on the loop é')\n"
        "asyncio.run(main())\n"
        "logging.getLogger('relayd').warning('after')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=True
    ).stderr.decode()
    lines = out.splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "INFO on the loop é",
        "WARNING after",
    ]


def test_configure_without_standard_error_starts_quietly() -> None:
    """Started with descriptor 2 closed, as some supervisors do: no crash, no output."""
    script = (
        "import asyncio, logging\n"
        "from relayd import logsink\n"
        "logsink.configure('info', journal=True)\n"
        "async def main():\n"
        "    logging.getLogger('relayd').info('nowhere')\n"
        "asyncio.run(main())\n"
        "logging.getLogger('relayd').error('nowhere either')\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.close(2),  # noqa: PLW1509  (single-threaded here)
    )
    assert (done.returncode, done.stdout) == (0, b"ok\n")
