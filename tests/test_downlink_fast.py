"""Downlink under load: coalesced device writes, quick paths for commands (relayd(8))."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from relayd import listeners
from relayd.auth import Grant
from tests.helpers import MS, NotifySocket, free_port, run_daemon
from tests.test_downlink import connected, device, downlink_ports, read_exactly

pytestmark = pytest.mark.anyio


async def test_writes_that_come_faster_than_the_interval_wait_for_it_then_go_together(
    tmp_path: Path, notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    interval = 0.5  # long enough that a loaded machine does not pass it by accident
    monkeypatch.setattr(listeners, "OUTBOX_INTERVAL", interval)
    port = free_port()
    async with run_daemon(tmp_path, notify, extra=downlink_ports(port)) as d:
        reader, writer = await device(port)
        await connected(d, port, 1)
        (conn,) = d.runtime.registry.get(port).connections
        loop = asyncio.get_running_loop()
        writes: list[tuple[float, bytes]] = []
        written = asyncio.Event()
        real_write = conn.transport.write

        def counting(data: Any) -> None:
            writes.append((loop.time(), bytes(data)))
            written.set()
            real_write(data)

        conn.transport.write = counting
        downlink, anyone = d.runtime.downlink, Grant.anonymous()
        assert downlink.send(anyone, "t", port, b"first") == 1
        async with asyncio.timeout(5_000 * MS):
            await written.wait()  # after a quiet spell: at the end of this iteration
        for i in range(3):  # within the interval, each in its own iteration
            assert downlink.send(anyone, "t", port, b"next %d" % i) == 1
            await asyncio.sleep(0)
        assert len(writes) == 1  # the others wait for the interval's end
        assert await read_exactly(reader, 6) == b"first\n"
        expected = b"next 0\nnext 1\nnext 2\n"
        assert await read_exactly(reader, len(expected)) == expected
        assert [w for _, w in writes] == [b"first\n", expected]  # together, in order
        assert writes[1][0] - writes[0][0] >= interval - 0.01
        # A close does not wait for the interval: what is accepted goes first.
        assert downlink.send(anyone, "t", port, b"last") == 1
        started = loop.time()
        conn.close()
        async with asyncio.timeout(5_000 * MS):
            assert await reader.read() == b"last\n"  # then relayd closed the device
        assert loop.time() - started < interval
        assert conn.outbox_handle is None
        writer.close()
