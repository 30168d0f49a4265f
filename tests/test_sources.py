"""``connect`` sources on a real daemon: dial, relay, reconnect, report why, remove."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from relayd.config import Settings
from relayd.errors import ConfigError
from relayd.sources import Backoff, RetryingSource
from tests.helpers import (
    MS,
    Daemon,
    NotifySocket,
    free_port,
    recv,
    run_daemon,
    wait_until,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RetryingSource, "BACKOFF_START", 0.05)
    monkeypatch.setattr(RetryingSource, "BACKOFF_CAP", 0.2)


class DeviceServer:
    """A serial device server in TCP-server mode, on loopback: one device at a time."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.received = bytearray()
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()

    async def start(self) -> None:
        self.connected.clear()
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.disconnected.clear()
        self.connected.set()
        try:
            while data := await reader.read(4096):
                self.received += data
        except ConnectionError:
            pass
        finally:
            self.disconnected.set()
            writer.close()

    async def send(self, data: bytes) -> None:
        async with asyncio.timeout(5_000 * MS):
            await self.connected.wait()
        writer = self.writers[-1]
        writer.write(data)
        await writer.drain()

    async def stop(self) -> None:
        """Drop the device and stop listening (the device server is switched off)."""
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        self.writers.clear()
        await self.server.wait_closed()


@pytest.fixture
async def device_server() -> AsyncIterator[DeviceServer]:
    server = DeviceServer()
    await server.start()
    try:
        yield server
    finally:
        if server.server is not None and server.server.is_serving():
            await server.stop()


def source(port: int, target: str, more: str = "") -> str:
    return f'[[ports]]\nport = {port}\nname = "nport"\nconnect = "{target}"\n{more}\n'


async def port_object(d: Daemon, port: int) -> dict[str, object]:
    async with d.admin() as admin:
        answer = await admin.get(f"/v1/ports/{port}")
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


async def wait_state(d: Daemon, port: int, state: str) -> dict[str, object]:
    await wait_until(lambda: d.runtime.registry.get(port).state == state)
    return await port_object(d, port)


async def test_connect_source_relays_reconnects_and_takes_downlink(
    tmp_path: Path, notify: NotifySocket, device_server: DeviceServer
) -> None:
    number = free_port()
    extra = source(number, f"127.0.0.1:{device_server.port}", "downlink = true")
    async with run_daemon(tmp_path, notify, nports=0, extra=extra) as d:
        async with connect(f"{d.ws_url}?port={number}") as ws:
            await device_server.send(b"12.5 kg\r\n7.0 kg\n")
            assert await recv(ws, 2) == ["12.5 kg", "7.0 kg"]
            obj = await port_object(d, number)
            assert obj["kind"] == "connect"
            assert obj["state"] == "connected"
            assert obj["last_error"] is None
            assert obj["connections"] == 1
            assert obj["connect"] == f"127.0.0.1:{device_server.port}"

            async with d.admin() as admin:
                sent = await admin.post(f"/v1/ports/{number}/send", json={"data": "TARE\n"})
            assert sent.json() == {"delivered": 1}
            await wait_until(lambda: device_server.received == b"TARE\n")

            # The device server goes away: connecting, with the reason.
            await device_server.stop()
            obj = await wait_state(d, number, "connecting")
            assert obj["last_error"] is not None
            status = d.runtime.status_text()
            assert "(1 connecting)" in status

            # ... and comes back on the same port: relayd dials again on its own.
            await device_server.start()
            await device_server.send(b"back\n")
            assert await recv(ws) == ["back"]
            assert (await port_object(d, number))["state"] == "connected"
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{d.url}/metrics")).text
        assert f'relayd_source_connected{{port="{number}"}} 1.0' in text
        assert f'relayd_source_reconnects_total{{port="{number}"}}' in text
        assert d.runtime.registry.get(number).reconnects >= 1


@pytest.mark.parametrize(
    ("target", "reason"),
    [("refused", "connection refused"), ("nohost.invalid:4001", "cannot resolve host")],
)
async def test_device_away_is_connecting_not_a_start_failure(
    tmp_path: Path, notify: NotifySocket, target: str, reason: str
) -> None:
    number = free_port()
    if target == "refused":
        target = f"127.0.0.1:{free_port()}"  # nobody listens there
    async with run_daemon(tmp_path, notify, nports=1, extra=source(number, target)) as d:
        # READY came, and the listener works, with the device away.
        obj = await port_object(d, number)
        assert obj["kind"] == "connect"
        assert obj["state"] == "connecting"
        await wait_until(lambda: d.runtime.registry.get(number).last_error is not None)
        obj = await port_object(d, number)
        assert reason in str(obj["last_error"])
        async with d.admin() as admin:
            gone = await admin.delete(f"/v1/ports/{number}")
        assert gone.status_code == 200
        assert number not in d.runtime.registry


async def test_runtime_connect_source_is_persisted_and_removal_hangs_up(
    tmp_path: Path, notify: NotifySocket, device_server: DeviceServer
) -> None:
    number = free_port()
    async with run_daemon(tmp_path, notify, nports=1) as d, d.admin() as admin:
        target = f"127.0.0.1:{device_server.port}"
        answer = await admin.post("/v1/ports", json={"port": number, "connect": target})
        assert answer.status_code == 201, answer.text
        assert answer.json()["kind"] == "connect"
        assert answer.json()["host"] == "0.0.0.0"
        assert d.state()["added"][0]["connect"] == target
        async with asyncio.timeout(5_000 * MS):
            await device_server.connected.wait()
        await wait_state(d, number, "connected")
        bad = await admin.post(
            "/v1/ports", json={"port": number + 1, "connect": target, "host": "127.0.0.1"}
        )
        assert bad.status_code == 422
        assert "host is for listeners" in bad.json()["detail"]

        removed = await admin.delete(f"/v1/ports/{number}")
        assert removed.status_code == 200
        async with asyncio.timeout(5_000 * MS):
            await device_server.disconnected.wait()  # relayd hung up after the drain
        device_server.connected.clear()
        # It does not dial again.
        await asyncio.sleep(0.3)  # several backoff periods: a redial would show up
        assert not device_server.connected.is_set()


async def test_reload_redirects_a_connect_source(
    tmp_path: Path, notify: NotifySocket, device_server: DeviceServer
) -> None:
    number = free_port()
    other = DeviceServer()
    await other.start()
    try:
        extra = source(number, f"127.0.0.1:{device_server.port}")
        async with run_daemon(tmp_path, notify, nports=1, extra=extra, drain=0.2) as d:
            async with asyncio.timeout(5_000 * MS):
                await device_server.connected.wait()
            text = d.config.read_text().replace(str(device_server.port), str(other.port))
            d.config.write_text(text)
            async with d.admin() as admin:
                report = (await admin.post("/v1/reload")).json()
            assert report["changed"] == [number]
            async with asyncio.timeout(5_000 * MS):
                await device_server.disconnected.wait()
                await other.connected.wait()
            async with connect(f"{d.ws_url}?port={number}") as ws:
                await other.send(b"from the other\n")
                assert await recv(ws) == ["from the other"]
    finally:
        await other.stop()


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ('connect = "a:1"\nserial = "/dev/ttyS0"', "connect and serial exclude each other"),
        ('connect = "a:1"\nhost = "127.0.0.1"', "host is for listeners"),
        ('serial = "/dev/ttyS0"\nallow = ["10.0.0.0/8"]', "allow is for listeners"),
        ('connect = "a:1"\ntls = true', "tls is for listeners"),
        ('connect = "nocolon"', "expected HOST:PORT"),
        ('connect = "a:1"\nbaudrate = 9600', "baudrate needs serial"),
    ],
)
def test_source_keys_are_checked(tmp_path: Path, entry: str, problem: str) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text(f'[defaults]\nhost = "127.0.0.1"\n[[ports]]\nport = 8001\n{entry}\n')
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    assert len(info.value.problems) == 1
    assert problem in info.value.problems[0]


def test_defaults_host_skips_sources(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text('[defaults]\nhost = "127.0.0.1"\n[[ports]]\nport = 8001\nconnect = "a:1"\n')
    assert Settings.load(path).ports[0].source_kind == "connect"


def test_backoff_doubles_to_the_cap_with_jitter() -> None:
    backoff = Backoff(0.5, 30.0)
    waits = [backoff.next() for _ in range(9)]
    for wait, base in zip(waits, [0.5, 1, 2, 4, 8, 16, 30, 30, 30], strict=True):
        assert base <= wait <= base * 1.25
    backoff.reset()
    assert backoff.next() <= 0.625


async def test_length_over_max_message_hangs_up_counts_and_dials_again(
    tmp_path: Path, notify: NotifySocket, device_server: DeviceServer
) -> None:
    number = free_port()
    more = 'framing = "length"\nlength_prefix = "u16be"'
    extra = "[relay]\nmax_message = 16\n" + source(number, f"127.0.0.1:{device_server.port}", more)
    async with run_daemon(tmp_path, notify, nports=0, extra=extra) as d:
        async with connect(f"{d.ws_url}?port={number}") as ws:
            await device_server.send(b"\x00\x02ok\x00\x11")  # then 17 bytes announced: too long
            assert await recv(ws) == ["ok"]
            async with asyncio.timeout(5_000 * MS):
                await device_server.disconnected.wait()  # relayd hung up
            # ... and dials again on its own: a second connection, which relays.
            await wait_until(lambda: len(device_server.writers) == 2)
            await device_server.send(b"\x00\x02go")
            assert await recv(ws) == ["go"]
        source_obj = d.runtime.registry.get(number)
        assert source_obj.framing_errors == {"too_long": 1}
        assert source_obj.reconnects >= 1
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{d.url}/metrics")).text
        assert f'relayd_framing_errors_total{{port="{number}",reason="too_long"}} 1.0' in text


async def test_a_name_with_several_addresses_is_tried_address_by_address(
    tmp_path: Path,
    notify: NotifySocket,
    device_server: DeviceServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # "nport.test" resolves to 127.0.0.2 first, where nobody listens (refused),
    # then to 127.0.0.1, the device server: relayd must reach the second.
    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo
    asked: list[str] = []

    async def getaddrinfo(host: object, port: object, *args: object, **kwargs: object) -> object:
        if host != "nport.test":
            return await resolve(host, port, *args, **kwargs)  # type: ignore[arg-type]
        asked.append(host)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))
            for ip in ("127.0.0.2", "127.0.0.1")
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    number = free_port()
    extra = source(number, f"nport.test:{device_server.port}")
    async with run_daemon(tmp_path, notify, nports=0, extra=extra) as d:
        async with connect(f"{d.ws_url}?port={number}") as ws:
            await device_server.send(b"via the second address\n")
            assert await recv(ws) == ["via the second address"]
        assert asked == ["nport.test"]  # one attempt reached it: no backoff round
        assert d.runtime.registry.get(number).reconnects == 0
