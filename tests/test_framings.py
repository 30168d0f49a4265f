"""Framings on a real daemon: delimiter, length, fixed; their keys and their errors."""

from __future__ import annotations

import struct
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from relayd.config import Settings
from relayd.errors import ConfigError
from tests.helpers import NotifySocket, recv, run_daemon, send_device, wait_until

pytestmark = pytest.mark.anyio


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "relayd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    return info.value.problems


@pytest.mark.parametrize(
    ("port_extra", "chunks", "expected"),
    [
        (
            'framing = "delimiter"\ndelimiter = "\\u0003"\n',
            [b"\x02one\x03\x02t", b"wo\x03\x03", b"tail"],
            ["\x02one", "\x02two", "tail"],  # empty message skipped, partial relayed at EOF
        ),
        (
            'framing = "delimiter"\ndelimiter = "\\r\\n\\u00ff"\n',
            [b"a\r", b"\n\xffb\r\n", b"\xffc"],
            ["a", "b", "c"],
        ),
        (
            'framing = "length"\nlength_prefix = "u16be"\n',
            [b"\x00\x03ab", b"c\x00\x00\x00\x01", b"d\x00\x05ab"],  # partial frame dropped
            ["abc", "d"],
        ),
        (
            'framing = "length"\nlength_prefix = "u32le"\n',
            [struct.pack("<I", 2) + b"hi" + struct.pack("<I", 1), b"!"],
            ["hi", "!"],
        ),
        (
            'framing = "length"\nlength_prefix = "u8"\n',
            [b"\x01x\x02y", b"z"],
            ["x", "yz"],
        ),
        (
            'framing = "fixed"\nsize = 3\n',
            [b"abcd", b"ef\x00\x00\x00\xff\x00", b"\x01gh"],  # "gh": a partial frame
            ["abc", "def", "\x00\x00\x00", b"\xff\x00\x01"],
        ),
        ('framing = "raw"\n', [b"ab"], ["ab"]),
    ],
)
async def test_framings_relay_byte_exact(
    tmp_path: Path,
    notify: NotifySocket,
    port_extra: str,
    chunks: list[bytes],
    expected: list[str | bytes],
) -> None:
    async with run_daemon(tmp_path, notify, nports=1, port_extra=port_extra) as d:
        async with connect(d.ws_url) as ws:
            await send_device(d.ports[0], *chunks)
            assert await recv(ws, len(expected)) == expected


async def test_length_over_max_message_closes_and_is_counted(
    tmp_path: Path, notify: NotifySocket
) -> None:
    port_extra = 'framing = "length"\nlength_prefix = "u16be"\n'
    extra = "[relay]\nmax_message = 16\n"
    async with run_daemon(tmp_path, notify, nports=1, port_extra=port_extra, extra=extra) as d:
        port = d.ports[0]
        async with connect(d.ws_url) as ws:
            sock = await send_device(port, b"\x00\x02ok\x00\x11", close=False)
            try:
                assert await recv(ws) == ["ok"]
                listener = d.runtime.registry.get(port)
                await wait_until(lambda: not listener.connections)  # relayd closed it
            finally:
                sock.close()
            # The port keeps serving other devices.
            await send_device(port, b"\x00\x02go")
            assert await recv(ws) == ["go"]
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{d.url}/metrics")).text
        line = f'relayd_framing_errors_total{{port="{port}",reason="too_long"}} 1.0'
        assert line in text


async def test_partial_frame_at_eof_is_counted(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(
        tmp_path, notify, nports=1, port_extra='framing = "fixed"\nsize = 4\n'
    ) as d:
        port = d.ports[0]
        listener = d.runtime.registry.get(port)
        await send_device(port, b"abcdef")
        await wait_until(lambda: listener.framing_errors.get("partial") == 1)
        assert listener.messages_received == 1


async def test_runtime_port_with_a_framing(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(tmp_path, notify, nports=1) as d, d.admin() as admin:
        from tests.helpers import free_port

        port = free_port()
        body = {"port": port, "host": "127.0.0.1", "framing": "delimiter", "delimiter": ";"}
        answer = await admin.post("/v1/ports", json=body)
        assert answer.status_code == 201, answer.text
        assert answer.json()["delimiter"] == ";"
        bad = await admin.post("/v1/ports", json={"port": port + 1, "framing": "length"})
        assert bad.status_code == 422
        assert "length_prefix is required" in bad.json()["detail"]
        big = await admin.post(
            "/v1/ports", json={"port": port + 1, "framing": "fixed", "size": 70000}
        )
        assert big.status_code == 422
        assert "over relay.max_message (65536)" in big.json()["detail"]
        async with connect(d.ws_url + f"?port={port}") as ws:
            await send_device(port, b"a;;b;")
            assert await recv(ws, 2) == ["a", "b"]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ('framing = "delimiter"', 'ports[0]: delimiter is required with framing = "delimiter"'),
        ('framing = "length"', 'ports[0]: length_prefix is required with framing = "length"'),
        ('framing = "fixed"', 'ports[0]: size is required with framing = "fixed"'),
        ('delimiter = ";"', 'ports[0]: delimiter needs framing = "delimiter"'),
        ('framing = "length"\nlength_prefix = "u24"', "ports[0].length_prefix: Input should be"),
        ('framing = "delimiter"\ndelimiter = "€"', "ports[0]: delimiter: each character is one"),
        ('framing = "delimiter"\ndelimiter = ""', "ports[0].delimiter: String should have at"),
        ('framing = "fixed"\nsize = 65537', "ports[0].size: 65537 is over relay.max_message"),
    ],
)
def test_framing_keys_are_checked(tmp_path: Path, entry: str, problem: str) -> None:
    found = problems(tmp_path, f"[[ports]]\nport = 8001\n{entry}\n")
    assert len(found) == 1
    assert found[0].startswith(problem), found
