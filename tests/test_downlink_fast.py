"""Downlink under load: coalesced device writes, quick paths for commands (relayd(8))."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd import downlink, listeners
from relayd.auth import Grant
from relayd.downlink import Command, parse_command
from tests.helpers import (
    MS,
    NotifySocket,
    examples,
    free_port,
    run_daemon,
    wait_until,
)
from tests.test_downlink import (
    connected,
    device,
    device_and_client,
    downlink_ports,
    json_client,
    read_exactly,
)

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


def client_frame(payload: bytes, opcode: int = 1, *, fin: bool = True, key: bytes = b"") -> bytes:
    """A client's frame, masked with ``key`` (random if not given)."""
    key = key or os.urandom(4)
    n = len(payload)
    head = bytes((0x80 * fin | opcode,))
    head += bytes((0x80 | n,)) if n < 126 else bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def test_commands_in_any_framing_are_answered_in_order_and_reach_the_device(
    tmp_path: Path, notify: NotifySocket
) -> None:
    """Whole data frames take relayd's quick path; whatever else websockets parses."""
    port = free_port()
    async with run_daemon(tmp_path, notify, extra=downlink_ports(port)) as d:
        reader, writer, ws_reader, ws_writer, sub = await device_and_client(d, port)
        parsed: list[int] = []  # reads that websockets parsed
        real_receive = sub.sink.conn.receive_data

        def counting(data: bytes) -> None:
            parsed.append(len(data))
            real_receive(data)

        sub.sink.conn.receive_data = counting

        def command(i: int, data: str) -> bytes:
            return json.dumps({"port": port, "data": data, "id": i}).encode()

        big = "b" * 300  # a 16-bit length
        cut = client_frame(command(3, "c3"))
        answers: list[tuple[int, bytes]] = []

        async def send(data: bytes, frames: int) -> None:
            ws_writer.write(data)
            async with asyncio.timeout(5_000 * MS):
                for _ in range(frames):  # answered before the next read: one read each
                    head = await ws_reader.readexactly(2)
                    answers.append((head[0], await ws_reader.readexactly(head[1] & 0x7F)))

        # Whole frames, masked with zeros, a random key, and a 16-bit length: quick.
        await send(
            client_frame(command(0, "c0"), key=bytes(4))
            + client_frame(command(1, "c1"))
            + client_frame(command(2, big), opcode=2),
            3,
        )
        # A frame cut in two by the reads: websockets takes both parts.
        ws_writer.write(cut[:9])
        await wait_until(lambda: len(parsed) == 1)
        await send(cut[9:], 1)
        # A ping between two commands, then not JSON: websockets (and its pong).
        await send(
            client_frame(command(4, "c4")) + client_frame(b"hi", opcode=9) + client_frame(b"{x"),
            3,
        )
        await send(client_frame(command(5, "c5")), 1)  # whole frames again: quick
        expected = b"c0\nc1\n" + big.encode() + b"\nc3\nc4\nc5\n"
        assert await read_exactly(reader, len(expected)) == expected
        ws_writer.close()
        writer.close()
    pong = (0x8A, b"hi")
    assert pong in answers
    texts = [json.loads(p) for h, p in answers if (h, p) != pong]
    assert [t.get("ack", t.get("error")) for t in texts] == [0, 1, 2, 3, 4, "invalid JSON", 5]
    assert all(t.get("delivered", 1) == 1 for t in texts)
    assert len(parsed) == 3  # the cut frame's two reads and the ping's; the rest was quick


async def test_after_a_fragment_websockets_judges_the_frames_that_follow(
    tmp_path: Path, notify: NotifySocket
) -> None:
    """A fragment is refused; a new message before its continuation is a protocol error."""
    port = free_port()
    async with run_daemon(tmp_path, notify, extra=downlink_ports(port)) as d:
        ws_reader, ws_writer = await json_client(d)
        async with asyncio.timeout(5_000 * MS):
            ws_writer.write(client_frame(b'{"port": 1, "da', fin=False))
            head = await ws_reader.readexactly(2)
            refused = json.loads(await ws_reader.readexactly(head[1] & 0x7F))
            ws_writer.write(client_frame(json.dumps({"port": port, "data": "x"}).encode()))
            head = await ws_reader.readexactly(2)
            close = await ws_reader.readexactly(head[1] & 0x7F)
        ws_writer.close()
    assert refused == {"error": "fragmented messages are not accepted", "id": None}
    assert head[0] == 0x88 and int.from_bytes(close[:2], "big") == 1002, close


def test_the_usual_commands_read_without_the_json_decoder_are_what_it_reads() -> None:
    usual = [
        b'{"port": 8001, "data": "T"}',
        b'{"port":8001,"data":"T","id":7}',
        b'{"port": 65535, "data": "", "id": -0}',
        b'{"port": 1, "data": " !#[]~", "id": 123456789012345678}',
    ]
    for raw in usual:
        assert downlink._USUAL.fullmatch(raw), raw  # the quick path takes them
        assert parse_command(raw) == downlink._parse_json(raw), raw
    assert parse_command(usual[1]) == Command(8001, b"T", id=7)
    for raw in (  # near misses: the JSON decoder says what they are
        b'{"port": 65536, "data": "T"}',
        b'{"port": 08001, "data": "T"}',
        b'{"port": 8001, "data": "T\\n"}',
        b'{"port": 8001, "data": "\xc3\xa9"}',
        b'{"port": 8001, "data": "T", "id": 1234567890123456789}',
        b'{"port": 8001, "data": "T", "id": 1.5}',
        b'{"port": 8001,  "data": "T"}',
        b'{"data": "T", "port": 8001}',
    ):
        assert parse_command(raw) == downlink._parse_json(raw), raw


@settings(max_examples=examples(300), deadline=None)
@given(
    port=st.integers(-1, 70_000),
    data=st.text(max_size=20),
    ident=st.one_of(st.none(), st.integers(-(10**19), 10**19)),
    compact=st.booleans(),
    cut=st.integers(0, 60),
)
def test_any_command_reads_as_the_json_decoder_reads_it(
    port: int, data: str, ident: int | None, compact: bool, cut: int
) -> None:
    message: dict[str, Any] = {"port": port, "data": data}
    if ident is not None:
        message["id"] = ident
    separators = (",", ":") if compact else (", ", ": ")
    raw = json.dumps(message, separators=separators).encode()
    for text in (raw, raw[:cut] + raw[cut + 1 :]):  # and with a byte missing
        assert parse_command(text) == downlink._parse_json(text), text


@pytest.mark.parametrize("quick", [True, False], ids=["quick-path", "websockets"])
async def test_a_text_message_that_is_not_utf8_closes_the_client_with_1007(
    tmp_path: Path, notify: NotifySocket, quick: bool
) -> None:
    """RFC 6455 §8.1: nothing of it reaches the device, the client is closed with 1007,
    whether relayd's quick path or websockets' parser read the frame."""
    port = free_port()
    async with run_daemon(tmp_path, notify, extra=downlink_ports(port)) as d:
        reader, writer, ws_reader, ws_writer, _ = await device_and_client(d, port)
        async with asyncio.timeout(5_000 * MS):
            good = json.dumps({"port": port, "data": "ok\u00e9", "id": 1}, ensure_ascii=False)
            ws_writer.write(client_frame(good.encode()))  # UTF-8: written
            assert await read_exactly(reader, 5) == b"ok\xc3\xa9\n"
            head = await ws_reader.readexactly(2)
            assert json.loads(await ws_reader.readexactly(head[1] & 0x7F))["ack"] == 1
            bad = client_frame(good.encode().replace(b"ok\xc3\xa9", b"ok\xff"))
            # After a ping in the same read, websockets parses the read, not the quick path.
            ws_writer.write(bad if quick else client_frame(b"p", opcode=9) + bad)
            if not quick:
                assert await ws_reader.readexactly(3) == b"\x8a\x01p"  # the pong
            head = await ws_reader.readexactly(2)
            close = await ws_reader.readexactly(head[1] & 0x7F)
        ws_writer.close()
        writer.close()
        assert d.runtime.downlink.stats.messages.get(port, 0) == 1
    assert head[0] == 0x88 and int.from_bytes(close[:2], "big") == 1007, close
