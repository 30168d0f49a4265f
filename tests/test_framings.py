"""Framings on a real daemon: delimiter, length, fixed; their keys and their errors."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from relayd.config import Settings
from relayd.errors import ConfigError
from relayd.framing import make_framer
from tests.helpers import (
    THOROUGH,
    Daemon,
    NotifySocket,
    device,
    free_port,
    recv,
    run_daemon,
    send_device,
    wait_until,
)

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


# Every framing through the real daemon, one device's bytes cut into reads at
# random places (each piece is read on its own: the test waits until relayd has
# counted it): the messages are those of the framer fed the whole stream at
# once. A marker from a second device afterwards shows that nothing more came.
SPLIT_FRAMINGS = {
    "lines": ('framing = "lines"\n', {}),
    "delimiter": (
        'framing = "delimiter"\ndelimiter = "\\r\\u0003"\n',
        {"delimiter": b"\r\x03"},
    ),
    "length": ('framing = "length"\nlength_prefix = "u16le"\n', {"length_prefix": "u16le"}),
    "fixed": ('framing = "fixed"\nsize = 5\n', {"size": 5}),
}


def _stream(framing: str, rng: random.Random) -> bytes:
    """A device's bytes: messages of random bytes, framed (the last may be partial)."""
    alphabet = b"ab\r\n\x00\x03\xff\xc3\xa4"  # delimiters' bytes and a split UTF-8 character
    msgs = [bytes(rng.choices(alphabet, k=rng.randint(0, 12))) for _ in range(rng.randint(1, 8))]
    if framing == "length":
        data = b"".join(struct.pack("<H", len(m)) + m for m in msgs)
    elif framing == "fixed":
        data = b"".join(msgs)
    else:
        sep = b"\n" if framing == "lines" else b"\r\x03"
        data = sep.join(msgs)
    return data[: rng.randint(len(data) * 3 // 4, len(data))]  # a cut-off end, at times


def _marker(framing: str) -> bytes:
    return {"lines": b"END\n", "delimiter": b"END\r\x03", "length": b"\x03\x00END"}.get(
        framing, b"END\x00\x00"
    )


async def _relayed(d: Daemon, port: int, pieces: list[bytes], marker: bytes, n: int) -> list[bytes]:
    """What a client of ``port`` gets when a device sends ``pieces`` as reads, then ``marker``."""
    listener = d.runtime.registry.get(port)
    async with connect(f"{d.ws_url}?port={port}") as ws:
        sock = await device(port)
        try:
            for piece in pieces:
                total = listener.bytes_received + len(piece)
                sock.send(piece)
                await wait_until(lambda t=total: listener.bytes_received == t)
        finally:
            sock.close()
        await wait_until(lambda: not listener.connections)
        await send_device(port, marker)
        got = await recv(ws, n)
    return [m.encode() if isinstance(m, str) else m for m in got]


async def test_byte_exact_under_random_read_splits(tmp_path: Path, notify: NotifySocket) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    numbers = {name: free_port() for name in SPLIT_FRAMINGS}
    extra = "".join(
        f'[[ports]]\nport = {numbers[name]}\nhost = "127.0.0.1"\n{keys}\n'
        for name, (keys, _) in SPLIT_FRAMINGS.items()
    )
    async with run_daemon(tmp_path, notify, nports=0, extra=extra) as d:
        # Three random splits per framing with RELAYD_TEST_THOROUGH=1, one in `make test`:
        # the framers themselves take every split in tests/test_framer.py, without sockets.
        for _ in range(3 if THOROUGH else 1):
            for name, (_, params) in SPLIT_FRAMINGS.items():
                data = _stream(name, rng)
                framer = make_framer(name, max_message=65536, **params)  # type: ignore[arg-type]
                marker = make_framer(name, max_message=65536, **params).feed(_marker(name))  # type: ignore[arg-type]
                expected = framer.feed(data) + framer.close() + marker
                cuts = sorted(rng.sample(range(1, len(data)), min(max(len(data) - 1, 0), 6)))
                pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
                got = await _relayed(d, numbers[name], pieces, _marker(name), len(expected))
                assert got == expected, f"{name}, seed {seed}, pieces {pieces!r}"
