"""The real daemon in-process: devices over TCP, clients over WebSocket."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed

from tests.helpers import (
    MS,
    Daemon,
    NotifySocket,
    RawWebSocket,
    accepts,
    recv,
    run_daemon,
    send_device,
    wait_until,
)

pytestmark = pytest.mark.anyio


async def closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    async with asyncio.timeout(5_000 * MS):
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.recv()
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason


async def test_ready_means_every_socket_accepts(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(tmp_path, notify, nports=3) as d:
        # READY=1 has been received: connect once each, no retries.
        for port in d.ports:
            assert await accepts(port, d)
        assert await accepts(d.http_port)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(d.admin_socket))
        assert (d.admin_socket.stat().st_mode & 0o777) == 0o660
        status = await notify.wait_for("STATUS=")
        assert "relaying 3 ports" in status


async def test_message_reaches_every_client(shared_daemon: Daemon) -> None:
    d = shared_daemon
    async with connect(d.ws_url) as a, connect(d.ws_url) as b:
        await send_device(d.ports[0], b"hi\r\n", "wägt €\n".encode(), b"\xff\xfe\n")
        for ws in (a, b):
            assert await recv(ws, 3) == ["hi", "wägt €", b"\xff\xfe"]


async def test_port_filter_and_unknown_port(shared_daemon: Daemon) -> None:
    d = shared_daemon
    first, second = d.ports
    async with connect(f"{d.ws_url}?port={second}") as ws:
        await send_device(first, b"not for you\n")
        await send_device(second, b"for you\n")
        assert await recv(ws) == ["for you"]
    async with connect(f"{d.ws_url}?port={first}&port=1") as ws:
        code, reason = await closed_with(ws)
        assert code == 1008
        assert reason is not None and "unknown port 1" in reason


async def test_json_envelopes(shared_daemon: Daemon) -> None:
    d = shared_daemon
    async with connect(f"{d.ws_url}?format=json") as ws:
        await send_device(d.ports[0], b"12.5 kg\n\x80\n")
        text, binary = [json.loads(m) for m in await recv(ws, 2)]
        assert text["port"] == d.ports[0]
        assert text["name"] == f"dev-{d.ports[0]}"
        assert text["peer"].startswith("127.0.0.1:")
        assert text["data"] == "12.5 kg"
        assert binary["data_b64"] == "gA=="


async def test_client_over_admin_socket(shared_daemon: Daemon) -> None:
    d = shared_daemon
    async with unix_connect(str(d.admin_socket), "ws://relayd/ws") as ws:
        await send_device(d.ports[1], b"via socket\n")
        assert await recv(ws) == ["via socket"]


async def test_slow_client_does_not_slow_a_healthy_one(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with run_daemon(tmp_path, notify, extra="[relay]\nqueue_size = 16\n") as d:
        # A client that completes the handshake and then never reads.
        stalled = await RawWebSocket.open(d.http_port, rcvbuf=4096)
        loop = asyncio.get_running_loop()
        async with connect(d.ws_url, max_queue=None) as healthy:
            await wait_until(lambda: d.runtime.hub.clients == 2)
            n = 20_000
            line = b"x" * 200
            device = await send_device(d.ports[0], close=False)
            payload = b"".join(b"%d " % i + line + b"\n" for i in range(n))
            await loop.sock_sendall(device, payload)
            device.close()
            got = await recv(healthy, n)
            assert [int(str(m).split()[0]) for m in got] == list(range(n))
            assert d.runtime.hub.dropped["queue_full"] > 0  # the stalled client lost, alone
        await stalled.close()


async def test_disconnect_policy_closes_slow_client(tmp_path: Path, notify: NotifySocket) -> None:
    extra = '[relay]\nqueue_size = 4\nslow_client = "disconnect"\n'
    async with run_daemon(tmp_path, notify, extra=extra) as d:
        async with connect(d.ws_url, max_queue=4) as ws:
            # The client library stops reading once 4 messages are queued: the socket backs up.
            await send_device(d.ports[0], b"y" * 2_000_000 + b"\n")
            for _ in range(200):
                await send_device(d.ports[0], b"z" * 60_000 + b"\n")
                if d.runtime.hub.dropped["slow_client_disconnected"]:
                    break
            assert d.runtime.hub.dropped["slow_client_disconnected"] > 0
            ws.max_queue = None  # type: ignore[attr-defined]
            code, _ = await closed_with(ws)
            assert code == 1008


async def test_max_clients(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(tmp_path, notify, extra="[relay]\nmax_clients = 1\n") as d:
        async with connect(d.ws_url):
            async with connect(d.ws_url) as second:
                code, reason = await closed_with(second)
                assert code == 1013 and reason


async def test_max_connections(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(tmp_path, notify, port_extra="max_connections = 2\n") as d:
        port = d.ports[0]
        held = [await send_device(port, close=False) for _ in range(2)]
        await wait_until(lambda: len(d.runtime.registry.get(port).connections) == 2)
        extra = await send_device(port, close=False)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5_000 * MS):
            assert await loop.sock_recv(extra, 10) == b""  # closed at once
        assert d.runtime.registry.get(port).rejected["max_connections"] == 1
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"{d.url}/metrics")).text
        assert (
            f'relayd_tcp_connections_rejected_total{{port="{port}",reason="max_connections"}} 1.0'
            in text
        )
        for s in [*held, extra]:
            s.close()


async def test_health_ready_and_metrics(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(tmp_path, notify) as d:
        async with httpx.AsyncClient(base_url=d.url) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            assert (await client.get("/readyz")).status_code == 200
            await send_device(d.ports[0], b"a\nb\n")
            await wait_until(lambda: d.runtime.registry.get(d.ports[0]).messages_received == 2)
            text = (await client.get("/metrics")).text
            for name in (
                "relayd_ports 2.0",
                "relayd_ws_clients 0.0",
                f'relayd_tcp_connections{{port="{d.ports[0]}"}}',
                f'relayd_messages_received_total{{port="{d.ports[0]}"}} 2.0',
                f'relayd_bytes_received_total{{port="{d.ports[0]}"}} 4.0',
                "relayd_messages_sent_total",
                'relayd_messages_dropped_total{reason="queue_full"}',
            ):
                assert name in text
            d.runtime.phase = "draining"
            assert (await client.get("/readyz")).status_code == 503
            d.runtime.phase = "ready"


async def test_admin_routes_are_not_served_on_http_port(shared_daemon: Daemon) -> None:
    d = shared_daemon
    async with httpx.AsyncClient(base_url=d.url) as client:
        assert (await client.get("/openapi.json")).status_code == 404
    async with d.admin() as admin:
        assert (await admin.get("/openapi.json")).status_code == 200
        assert (await admin.get("/healthz")).status_code == 200


async def test_per_message_deflate_relays_text_and_binary_intact(
    tmp_path: Path, notify: NotifySocket
) -> None:
    extra = "[relay]\nper_message_deflate = true\n"
    async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
        text = "wägt 12,5 kg; " * 500  # compresses well, longer than a TCP segment
        binary = bytes(b for b in range(256) if b not in b"\r\n") * 40  # not UTF-8
        lines = [f"{i} {text}".encode() for i in range(50)] + [binary, b"short"]
        expected = [line.decode() for line in lines[:-2]] + [binary, "short"]
        async with (
            connect(d.ws_url, max_size=2**20) as deflated,
            connect(f"{d.ws_url}?format=json", max_size=2**20) as envelopes,
            connect(d.ws_url, compression=None, max_size=2**20) as plain,
        ):
            for ws in (deflated, envelopes):
                assert [type(e).__name__ for e in ws.protocol.extensions] == ["PerMessageDeflate"]
            assert plain.protocol.extensions == []
            await wait_until(lambda: d.runtime.hub.clients == 3)
            # One write: relayd relays the burst as several messages at once.
            await send_device(d.ports[0], b"\n".join(lines) + b"\n")
            assert await recv(deflated, len(lines)) == expected
            assert await recv(plain, len(lines)) == expected
            got = [json.loads(m) for m in await recv(envelopes, len(lines))]
            assert [m.get("data") for m in got[:-2]] == expected[:-2]
            assert got[-2]["data_b64"] == base64.b64encode(binary).decode()
            assert got[-1]["data"] == "short"
