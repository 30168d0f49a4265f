"""``serial`` sources on a real daemon, over a pty pair made by socat(1)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from relayd.sources import RetryingSource
from tests.helpers import MS, NotifySocket, free_port, recv, run_daemon, wait_until

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed"),
]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RetryingSource, "BACKOFF_START", 0.05)
    monkeypatch.setattr(RetryingSource, "BACKOFF_CAP", 0.2)


class NullModem:
    """Two ptys joined by socat: relayd opens ``line``, the test plays the device on ``device``.

    Stopping socat is unplugging the adapter: both links vanish.
    """

    def __init__(self, directory: Path) -> None:
        self.line = directory / "ttyUSB0"
        self.device = directory / "device"
        self.process: asyncio.subprocess.Process | None = None
        self.fd: int | None = None

    async def plug(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            "socat",
            f"pty,raw,echo=0,link={self.device}",
            f"pty,raw,echo=0,link={self.line}",
        )
        await wait_until(lambda: self.line.exists() and self.device.exists())
        self.fd = os.open(self.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        os.write(self.fd, data)

    async def read(self, n: int) -> bytes:
        assert self.fd is not None
        got = b""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.fd, ready.set)
        try:
            async with asyncio.timeout(5_000 * MS):
                while len(got) < n:
                    await ready.wait()
                    ready.clear()
                    try:
                        got += os.read(self.fd, n - len(got))
                    except BlockingIOError:
                        pass
        finally:
            loop.remove_reader(self.fd)
        return got

    async def unplug(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            async with asyncio.timeout(5_000 * MS):
                await self.process.wait()


@pytest.fixture
async def modem(tmp_path: Path) -> AsyncIterator[NullModem]:
    m = NullModem(tmp_path)
    await m.plug()
    try:
        yield m
    finally:
        await m.unplug()


async def test_serial_source_relays_writes_and_survives_unplugging(
    tmp_path: Path, notify: NotifySocket, modem: NullModem
) -> None:
    number = free_port()
    extra = (
        f'[[ports]]\nport = {number}\nserial = "{modem.line}"\nbaudrate = 115200\n'
        'parity = "even"\nstopbits = 2\nframing = "delimiter"\ndelimiter = "\\u0003"\n'
        "downlink = true\n"
    )
    async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
        source = d.runtime.registry.get(number)
        await wait_until(lambda: source.state == "connected")
        async with d.admin() as admin:
            obj = (await admin.get(f"/v1/ports/{number}")).json()
        assert obj["kind"] == "serial"
        assert obj["state"] == "connected"
        assert obj["baudrate"] == 115200
        async with connect(f"{d.ws_url}?port={number}") as ws:
            modem.write(b"\x0212.5 kg\x03\x027")
            modem.write(b".0 kg\x03")
            assert await recv(ws, 2) == ["\x0212.5 kg", "\x027.0 kg"]

            async with d.admin() as admin:
                sent = await admin.post(f"/v1/ports/{number}/send", json={"data": "T\x03"})
            assert sent.json() == {"delivered": 1}
            assert await modem.read(2) == b"T\x03"

            # Unplugged: connecting, and why.
            await modem.unplug()
            await wait_until(lambda: source.state == "connecting" and bool(source.last_error))
            async with d.admin() as admin:
                obj = (await admin.get(f"/v1/ports/{number}")).json()
            assert obj["state"] == "connecting"
            assert obj["last_error"]

            # Plugged back: reopened on its own.
            await modem.plug()
            await wait_until(lambda: source.state == "connected")
            modem.write(b"again\x03")
            assert await recv(ws) == ["again"]
        assert source.reconnects >= 1


async def test_missing_serial_device_is_connecting(tmp_path: Path, notify: NotifySocket) -> None:
    number = free_port()
    missing = tmp_path / "ttyACM9"
    extra = f'[[ports]]\nport = {number}\nserial = "{missing}"\n'
    async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
        source = d.runtime.registry.get(number)
        await wait_until(lambda: source.last_error is not None)
        assert source.state == "connecting"
        assert source.last_error == "no such file or directory"
        async with d.admin() as admin:
            assert (await admin.delete(f"/v1/ports/{number}")).status_code == 200
        assert number not in d.runtime.registry
