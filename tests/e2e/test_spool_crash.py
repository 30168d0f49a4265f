"""The MQTT spool survives kill -9: every flushed record is there after a reopen, in order."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from relayd.spool import Spool
from tests.helpers import MS

# A writer that appends, flushes, acks a prefix and syncs now and then, and says on
# stdout how many records it has flushed; it runs until it is killed.
WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from relayd.spool import Spool

    async def main() -> None:
        s = Spool.open(Path(sys.argv[1]), max_bytes=1 << 30, segment_bytes=256 * 1024)
        n = acked = 0
        while True:
            for _ in range(200):
                s.append("relayd/gw/8001", b"m%08d" % n)
                n += 1
            s.flush()
            while acked < n - 2000:
                s.ack(acked)
                acked += 1
            if n % 5000 == 0:
                await s.sync()
            sys.stdout.write(f"{n}\\n")
            sys.stdout.flush()

    asyncio.run(main())
    """
)


def test_kill_9_loses_nothing_that_was_flushed(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    flushed = 0
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(d)], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        try:
            while flushed < 30_000:
                line = proc.stdout.readline()
                assert line, "the writer died"
                flushed = int(line)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10_000 * MS)
    assert proc.returncode == -signal.SIGKILL

    s = Spool.open(d, max_bytes=1 << 30)
    got = s.read(10_000_000)
    ids = [r.id for r in got]
    assert ids == sorted(set(ids))  # strictly increasing
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # the writer appended without gaps
    assert 3000 <= ids[0] <= flushed - 2000  # the commit counts; nothing un-acked is missing
    assert ids[-1] >= flushed - 1  # every flushed record is there
    assert all(r.payload == b"m%08d" % r.id for r in got)
    assert s.corrupt == 0
    s.append("relayd/gw/8001", b"after")
    assert s.read(1)[0].id == ids[-1] + 1
    s.close()
