"""Downlink: clients and operators write to devices; bounded per device, audited, permitted."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from relayd.api import MAX_BODY, send_body_limit
from relayd.auth import Grant
from relayd.downlink import Command, Refusal, parse_command
from tests.helpers import MS, WS_HANDSHAKE, Daemon, NotifySocket, free_port, run_daemon, wait_until

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}


def downlink_ports(*ports: int, framing: str = "lines", extra: str = "") -> str:
    text = ""
    for port in ports:
        text += (
            f'[[ports]]\nport = {port}\nhost = "127.0.0.1"\nframing = "{framing}"\n'
            f"downlink = true\n{extra}\n"
        )
    return text


async def json_client(d: Daemon) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw ``/ws?format=json`` client past its handshake (frames written by hand)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", d.http_port)
    writer.write(WS_HANDSHAKE.replace(b"GET /ws ", b"GET /ws?format=json "))
    async with asyncio.timeout(5_000 * MS):
        await reader.readuntil(b"\r\n\r\n")
    return reader, writer


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def device(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    async with asyncio.timeout(5_000 * MS):
        return await reader.readexactly(n)


async def ask(ws: ClientConnection, command: dict[str, Any] | str) -> dict[str, Any]:
    await ws.send(command if isinstance(command, str) else json.dumps(command))
    async with asyncio.timeout(5_000 * MS):
        answer = json.loads(await ws.recv())
    assert isinstance(answer, dict)
    return answer


async def connected(d: Any, port: int, n: int) -> None:
    await wait_until(lambda: len(d.runtime.registry.get(port).connections) == n)


async def device_and_client(
    d: Daemon, port: int
) -> tuple[
    asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamWriter, Any
]:
    """A device on ``port`` and a raw JSON client, both connected; the client's subscription."""
    reader, writer = await device(port)
    await connected(d, port, 1)
    ws_reader, ws_writer = await json_client(d)
    await wait_until(lambda: d.runtime.hub.clients == 1)
    (sub,) = d.runtime.hub._subs
    return reader, writer, ws_reader, ws_writer, sub


def test_commands_are_parsed_strictly() -> None:
    assert parse_command(b'{"port": 8001, "data": "T\\n", "id": 7}') == Command(8001, b"T\n", id=7)
    assert parse_command(b'{"port": 8001, "data_b64": "AAE="}') == Command(8001, b"\0\1")
    for raw, ident in (
        (b"not json", None),
        (b"[1]", None),
        (b'{"port": "8001", "data": "x", "id": 3}', 3),
        (b'{"port": 8001, "id": "a"}', "a"),
        (b'{"port": 8001, "data": "x", "data_b64": "eA=="}', None),
        (b'{"port": 8001, "data_b64": "***"}', None),
        (b'{"port": 8001, "data": "x", "peer": "a", "device": "b"}', None),
        (b'{"port": 8001, "data": "x", "sudo": true}', None),
        (b"[" * 100_000, None),
    ):
        result = parse_command(raw)
        assert isinstance(result, tuple), raw[:40]
        refusal, got = result
        assert isinstance(refusal, Refusal) and refusal.reason == "invalid" and got == ident


async def test_bare_and_json_writes_reach_the_devices(
    tmp_path: Path, notify: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    port, raw_port = free_port(), free_port()
    extra = downlink_ports(port) + downlink_ports(raw_port, framing="raw")
    caplog.set_level(logging.INFO, logger="relayd.audit")
    async with run_daemon(tmp_path, notify, extra=extra) as d, d.admin() as admin:
        (r1, w1), (r2, w2), (r3, w3) = [await device(p) for p in (port, port, raw_port)]
        await connected(d, port, 2)
        await connected(d, raw_port, 1)
        async with connect(f"{d.ws_url}?port={port}") as bare:
            await bare.send("TARE")  # lines framing: a newline is added
            await bare.send(b"ZERO\n")  # ends with one already
            for reader in (r1, r2):
                assert await read_exactly(reader, 10) == b"TARE\nZERO\n"
        async with connect(f"{d.ws_url}?format=json") as js:
            peer = f"127.0.0.1:{w1.get_extra_info('sockname')[1]}"
            answers = [
                await ask(js, {"port": port, "data": "A", "id": 1}),
                await ask(js, {"port": port, "data": "B", "peer": peer, "id": "two"}),
                await ask(js, {"port": raw_port, "data_b64": b64(b"\x02S\x03")}),
                await ask(js, {"port": port, "data": "C", "peer": "192.0.2.1:1", "id": 4}),
                await ask(js, {"port": d.ports[0], "data": "D", "id": 5}),
                await ask(js, {"port": 1, "data": "E", "id": 6}),
                await ask(js, "{oops"),
                await ask(js, {"port": port, "data": "x" * 70_000, "id": 8}),
            ]  # fmt: skip
        assert answers[:3] == [
            {"ack": 1, "port": port, "delivered": 2},
            {"ack": "two", "port": port, "delivered": 1},
            {"ack": None, "port": raw_port, "delivered": 1},
        ]
        assert [a.get("id", "?") for a in answers[3:]] == [4, 5, 6, None, 8]
        assert all("error" in a for a in answers[3:])
        assert "downlink is off" in answers[4]["error"]
        assert await read_exactly(r1, 4) == b"A\nB\n"
        assert await read_exactly(r2, 2) == b"A\n"
        assert await read_exactly(r3, 3) == b"\x02S\x03"  # raw framing: as sent
        sent = await admin.post(f"/v1/ports/{port}/send", json={"data": "PRINT"})
        assert sent.json() == {"delivered": 2}
        assert await read_exactly(r1, 6) == b"PRINT\n"
        off = await admin.post(f"/v1/ports/{d.ports[0]}/send", json={"data": "x"})
        assert off.status_code == 409 and "downlink is off" in off.json()["detail"]
        assert (await admin.post("/v1/ports/1/send", json={"data": "x"})).status_code == 404
        metrics = (await admin.get("/metrics")).text
        for w in (w1, w2, w3):
            w.close()
    assert f'relayd_downlink_messages_total{{port="{port}"}} 5.0' in metrics
    assert 'relayd_downlink_rejected_total{reason="no_such_peer"} 1.0' in metrics
    assert 'relayd_downlink_rejected_total{reason="downlink_off"} 2.0' in metrics
    audit = [r.getMessage() for r in caplog.records if r.name == "relayd.audit"]
    assert "downlink: anonymous 127.0.0.1:" in audit[0] and f"on port {port}" in audit[0]
    assert any(line.startswith("downlink: admin wrote 6 byte(s) to 2 device(s)") for line in audit)
    assert not any("TARE" in line or "PRINT" in line for line in audit)  # never the content


async def test_a_device_that_does_not_read_fills_only_its_own_buffer(
    tmp_path: Path, notify: NotifySocket
) -> None:
    port = free_port()
    extra = downlink_ports(port, extra="downlink_buffer = 65536")
    async with run_daemon(tmp_path, notify, extra=extra) as d:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", port))  # never reads
        reader, writer = await device(port)
        await connected(d, port, 2)
        chunk = "z" * 60_000
        delivered = []
        async with connect(f"{d.ws_url}?format=json") as js:
            # Past the kernel's buffers for the stuck device, then past its own 64 KiB.
            for i in range(1000):
                answer = await ask(js, {"port": port, "data": chunk, "id": i})
                assert "delivered" in answer, (i, answer)
                delivered.append(answer["delivered"])
                await reader.readexactly(60_001)  # the healthy device keeps up
                if delivered[-3:] == [1, 1, 1]:
                    break
        stuck.close()
        writer.close()
    assert delivered[0] == 2 and delivered[-3:] == [1, 1, 1]  # the stuck one skipped, alone
    assert d.runtime.downlink.stats.rejected["buffer_full"] == 0  # the other always took it


async def test_only_permitted_clients_write(tmp_path: Path, notify: NotifySocket) -> None:
    port = free_port()
    extra = '[auth]\nmode = "token"\n' + downlink_ports(port)
    async with run_daemon(tmp_path, notify, extra=extra) as d, d.admin() as admin:
        reader, writer = await device(port)
        await connected(d, port, 1)
        viewer = (await admin.post("/v1/tokens", json={"name": "viewer"})).json()["token"]
        tare = (await admin.post("/v1/tokens", json={"name": "tare", "write": [port]})).json()[
            "token"
        ]
        async with connect(f"{d.ws_url}?format=json&access_token={viewer}") as js:
            answer = await ask(js, {"port": port, "data": "T", "id": 1})
            assert answer == {"error": f"not permitted to write to port {port}", "id": 1}
        async with connect(f"{d.ws_url}?port={port}&access_token={viewer}") as bare:
            await bare.send("IGNORED")
        async with connect(f"{d.ws_url}?port={port}&access_token={tare}") as bare:
            await bare.send("T")
            assert await read_exactly(reader, 2) == b"T\n"  # and nothing of IGNORED before it
        writer.close()
        assert d.runtime.downlink.stats.rejected["not_permitted"] == 2


async def test_downlink_on_without_auth_warns_and_a_stop_flushes_accepted_writes(
    tmp_path: Path, notify: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    with caplog.at_level(logging.WARNING, logger="relayd.runtime"):
        async with run_daemon(tmp_path, notify, extra=downlink_ports(port)) as d:
            reader, writer = await device(port)
            await connected(d, port, 1)
            async with connect(f"{d.ws_url}?port={port}") as bare:
                for i in range(100):
                    await bare.send(f"cmd {i}")
                await bare.ping()  # every message read by relayd
                await d.stop()
            async with asyncio.timeout(5_000 * MS):
                got = await reader.read()  # until relayd closed the device
            writer.close()
    assert got == b"".join(f"cmd {i}\n".encode() for i in range(100))
    warnings = [r.getMessage() for r in caplog.records if "downlink is on" in r.getMessage()]
    assert len(warnings) == 1 and f"port {port}" in warnings[0]


async def test_a_downlink_opened_at_runtime_warns_too(
    tmp_path: Path, notify: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    added, reloaded = free_port(), free_port()

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if "downlink is on" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="relayd.runtime"):
        async with run_daemon(tmp_path, notify, nports=1) as d, d.admin() as admin:
            assert warned() == []
            body = {"port": added, "host": "127.0.0.1", "downlink": True}
            assert (await admin.post("/v1/ports", json=body)).status_code == 201
            assert len(warned()) == 1 and f"port {added}:" in warned()[0]
            d.config.write_text(d.config.read_text() + downlink_ports(reloaded))
            assert (await admin.post("/v1/reload")).status_code == 200
            assert len(warned()) == 2 and f"port {reloaded}:" in warned()[1]
            assert (await admin.post("/v1/reload")).status_code == 200  # nothing new opened
            assert len(warned()) == 2


async def test_admin_send_validation(tmp_path: Path, notify: NotifySocket) -> None:
    port = free_port()
    async with run_daemon(tmp_path, notify, extra=downlink_ports(port)) as d, d.admin() as admin:
        for body in ({}, {"data": "a", "data_b64": "YQ=="}, {"data_b64": "@@"}, {"data": 5}):
            answer = await admin.post(f"/v1/ports/{port}/send", json=body)
            assert answer.status_code == 422, body
        none = await admin.post(f"/v1/ports/{port}/send", json={"data": "x"})
        assert none.status_code == 409 and "no device" in none.json()["detail"]
        async with httpx.AsyncClient() as client:  # not on [http] without the admin token
            assert (await client.post(f"{d.url}/v1/ports/{port}/send", json={})).status_code == 404


async def test_admin_send_takes_a_message_of_max_message_bytes(
    tmp_path: Path, notify: NotifySocket
) -> None:
    # In base64 a max_message (65536 bytes) message is larger than the 64 KiB
    # other admin bodies may be: the limit of /send follows relay.max_message.
    port = free_port()
    extra = downlink_ports(port, framing="raw")
    async with run_daemon(tmp_path, notify, extra=extra) as d, d.admin() as admin:
        reader, writer = await device(port)
        try:
            await connected(d, port, 1)
            data = bytes(range(256)) * 256
            body = json.dumps({"data_b64": b64(data)}).encode()
            assert len(body) > MAX_BODY
            sent = await admin.post(f"/v1/ports/{port}/send", content=body, headers=JSON)
            assert (sent.status_code, sent.json()) == (200, {"delivered": 1})
            assert await read_exactly(reader, len(data)) == data
            limit = send_body_limit(65536)
            padded = body[:-1] + b" " * (limit + 1 - len(body)) + b"}"  # one byte too long
            over = await admin.post(f"/v1/ports/{port}/send", content=padded, headers=JSON)
            assert over.status_code == 413
            assert over.json() == {"detail": f"the request body is larger than {limit} bytes"}
            fits = padded[: limit - 1] + b"}"
            assert len(fits) == limit and json.loads(fits)
            ok = await admin.post(f"/v1/ports/{port}/send", content=fits, headers=JSON)
            assert ok.status_code == 200, ok.text
            assert await read_exactly(reader, len(data)) == data
            # Other admin routes keep their 64 KiB.
            big = await admin.post("/v1/ports", content=b" " * (MAX_BODY + 1), headers=JSON)
            assert big.status_code == 413
        finally:
            writer.close()


async def test_admin_send_passes_a_lone_surrogate_as_ws_does(
    tmp_path: Path, notify: NotifySocket
) -> None:
    port = free_port()
    async with run_daemon(tmp_path, notify, extra=downlink_ports(port)) as d, d.admin() as admin:
        reader, writer = await device(port)
        try:
            await connected(d, port, 1)
            lone = b'{"data": "\\ud800"}'  # valid JSON, but no UTF-8 for it: was a 500
            answer = await admin.post(f"/v1/ports/{port}/send", content=lone, headers=JSON)
            assert answer.json() == {"delivered": 1}
            expected = parse_command(b'{"port": 1, "data": "\\ud800"}')
            assert isinstance(expected, Command)  # what a /ws client's command writes
            assert await read_exactly(reader, 4) == expected.data + b"\n" == b"\xed\xa0\x80\n"
        finally:
            writer.close()


def masked_text(payload: bytes) -> bytes:
    """A client's text frame (clients mask theirs; the mask may be zeros)."""
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload


@pytest.mark.xdist_group("heavy")  # a flood or a timed wait: one at a time
async def test_a_client_that_sends_but_never_reads_is_not_buffered_without_bound(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with run_daemon(tmp_path, notify) as d:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", d.http_port))
        sock.sendall(
            b"GET /ws?format=json HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await wait_until(lambda: d.runtime.hub.clients == 1)
        sock.setblocking(False)
        flood = masked_text(b"{}") * 4096  # each is answered with an error, never read
        loop = asyncio.get_running_loop()
        sent = 0

        async def send() -> None:  # until relayd stops reading and our sends block
            nonlocal sent
            while sent < 32 << 20:
                await loop.sock_sendall(sock, flood)
                sent += len(flood)

        (sub,) = d.runtime.hub._subs
        sender = asyncio.create_task(send())
        try:
            await wait_until(lambda: sub.sink.read_paused or sender.done(), 20_000 * MS)
            stopped_reading = sub.sink.read_paused
            # Whatever we still push now stays in the kernel's buffers, not relayd's.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(500 * MS):
                    await asyncio.shield(sender)
            buffered = sub.sink.transport.get_write_buffer_size()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
            sock.close()
    # relayd stopped reading from it, so what it holds of the answers stays bounded.
    assert stopped_reading, sent
    assert buffered < 8 << 20, (sent, buffered)


async def test_writes_of_one_loop_iteration_reach_a_device_in_one_write_in_order(
    tmp_path: Path, notify: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    caplog.set_level(logging.INFO, logger="relayd.audit")
    async with run_daemon(tmp_path, notify, extra=downlink_ports(port)) as d:
        readers = [await device(port) for _ in range(2)]
        await connected(d, port, 2)
        writes: list[bytes] = []
        conns = list(d.runtime.registry.get(port).connections)
        for conn in conns:  # count what reaches each transport
            transport = conn.transport
            real_write = transport.write

            def counting(data: Any, real_write: Any = real_write) -> None:
                writes.append(bytes(data))
                real_write(data)

            transport.write = counting  # type: ignore[method-assign]
        anyone = Grant.anonymous()
        for i in range(50):  # in one loop iteration, as from many clients at once
            assert d.runtime.downlink.send(anyone, "50% bench", port, b"cmd %d" % i) == 2
        assert writes == []  # nothing written yet: at the end of the iteration
        expected = b"".join(b"cmd %d\n" % i for i in range(50))
        for reader, _ in readers:
            assert await read_exactly(reader, len(expected)) == expected
        assert writes == [expected, expected]  # one write per device
        for _, writer in readers:
            writer.close()
    audit = [r.getMessage() for r in caplog.records if r.name == "relayd.audit"]
    assert len(audit) == 50  # still one audit line per write (relayd(8), DOWNLINK)
    # Formatted once: a "%" in a name stays as it is.
    assert audit[7] == f"downlink: 50% bench wrote 6 byte(s) to 2 device(s) on port {port}"


async def test_what_waits_for_the_end_of_the_iteration_counts_against_the_buffer(
    tmp_path: Path, notify: NotifySocket
) -> None:
    port = free_port()
    extra = downlink_ports(port, framing="raw", extra="downlink_buffer = 100")
    async with run_daemon(tmp_path, notify, extra=extra) as d:
        reader, writer = await device(port)
        await connected(d, port, 1)
        downlink, anyone = d.runtime.downlink, Grant.anonymous()
        results = [downlink.send(anyone, "t", port, b"%030d" % i) for i in range(5)]
        assert results[:3] == [1, 1, 1]  # 90 bytes wait; a fourth 30 would pass 100
        assert all(isinstance(r, Refusal) and r.reason == "buffer_full" for r in results[3:])
        assert await read_exactly(reader, 90) == b"".join(b"%030d" % i for i in range(3))
        # Written out: the buffer is free again.
        assert downlink.send(anyone, "t", port, b"x" * 100) == 1
        assert await read_exactly(reader, 100) == b"x" * 100
        writer.close()


async def test_a_close_right_after_writes_delivers_them_first(
    tmp_path: Path, notify: NotifySocket
) -> None:
    port = free_port()
    async with run_daemon(tmp_path, notify, extra=downlink_ports(port)) as d:
        reader, writer = await device(port)
        await connected(d, port, 1)
        (conn,) = d.runtime.registry.get(port).connections
        for i in range(3):
            assert d.runtime.downlink.send(Grant.anonymous(), "t", port, b"last %d" % i) == 1
        conn.close()  # in the same iteration: the outbox goes first
        async with asyncio.timeout(5_000 * MS):
            got = await reader.read()  # until relayd closed the device
        writer.close()
    assert got == b"last 0\nlast 1\nlast 2\n"


def test_acks_are_the_json_answers_byte_for_byte() -> None:
    from relayd.ws import _ack, _answer

    for ident in (None, 0, -7, 12345678901234567890, 'a"b', 1.5, True, [1, {"x": None}]):
        expected = _answer({"ack": ident, "port": 8001, "delivered": 3})
        assert _ack(ident, 8001, 3) == expected
        assert json.loads(expected)["ack"] == ident


async def test_commands_read_together_are_answered_in_one_write_in_order(
    tmp_path: Path, notify: NotifySocket
) -> None:
    port = free_port()
    async with run_daemon(tmp_path, notify, extra=downlink_ports(port)) as d:
        reader, writer, ws_reader, ws_writer, sub = await device_and_client(d, port)
        writes: list[bytes] = []
        real_write = sub.sink.transport.write

        def counting(data: Any) -> None:
            writes.append(bytes(data))
            real_write(data)

        sub.sink.transport.write = counting
        commands = [json.dumps({"port": port, "data": f"c{i}", "id": i}).encode() for i in range(4)]
        commands.insert(2, b"{oops")
        ws_writer.write(b"".join(masked_text(c) for c in commands))  # one send: read together
        answers = []
        async with asyncio.timeout(5_000 * MS):
            for _ in commands:
                head = await ws_reader.readexactly(2)
                answers.append(json.loads(await ws_reader.readexactly(head[1] & 0x7F)))
        assert await read_exactly(reader, 12) == b"c0\nc1\nc2\nc3\n"
        ws_writer.close()
        writer.close()
    assert [a.get("ack", a.get("error")) for a in answers] == [0, 1, "invalid JSON", 2, 3]
    assert len(writes) == 1  # relayd read all five in one go, and answered in one write
