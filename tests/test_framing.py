"""Framing of device streams: lines and raw, across arbitrary read boundaries."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.config import PortSettings
from relayd.framing import _cut
from relayd.hub import Source
from relayd.listeners import DeviceConnection, Listener, ListenerEnv
from tests.helpers import examples


class RecordingHub:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def publish(self, source: Source, messages: list[bytes], all_text: bool = False) -> None:
        if all_text:
            for m in messages:
                m.decode("utf-8")  # the caller promised text
        self.messages.extend(messages)


class FakeTransport(asyncio.Transport):
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 51234) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def feed(chunks: list[bytes], *, framing: str = "lines", max_message: int = 65536) -> list[bytes]:
    """Messages published for a device that sends ``chunks`` as reads, then closes."""
    hub = RecordingHub()
    with socket.socket() as sock:
        listener = Listener(
            PortSettings(port=8001, framing=framing, keepalive=False),  # type: ignore[arg-type]
            sock,
            ListenerEnv(hub),  # type: ignore[arg-type]
            origin="config",
            max_message=max_message,
        )
        conn = DeviceConnection(listener)
        conn.connection_made(FakeTransport())
        for chunk in chunks:
            conn.data_received(chunk)
        conn.connection_lost(None)
    assert listener.messages_received == len(hub.messages)
    assert listener.bytes_received == sum(map(len, chunks))
    return hub.messages


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def test_lines_split_and_strip_crlf() -> None:
    assert feed([b"a\r\nb\nc\r\n"]) == [b"a", b"b", b"c"]


def test_blank_lines_are_not_relayed() -> None:
    assert feed([b"a\n\n\r\nb\n"]) == [b"a", b"b"]


def test_trailing_partial_line_is_delivered_on_close() -> None:
    assert feed([b"one\ntw", b"o"]) == [b"one", b"two"]


def test_read_split_inside_utf8_character() -> None:
    data = "wägt 12,5 kg €\n".encode()
    cut = data.index("€".encode()) + 1
    assert feed([data[:cut], data[cut:]]) == ["wägt 12,5 kg €".encode()]


def test_raw_read_split_inside_utf8_character_is_held_back() -> None:
    data = "h€llo".encode()
    messages = feed([data[:2], data[2:]], framing="raw")
    assert b"".join(messages) == data
    assert all(m.decode() for m in messages)


def test_raw_each_read_is_a_message() -> None:
    assert feed([b"abc", b"\x00\xff", b"x\ny"], framing="raw") == [b"abc", b"\x00\xff", b"x\ny"]


def test_long_line_is_cut_and_memory_stays_bounded() -> None:
    hub_messages = feed([b"x" * 1000] * 50 + [b"\n"], max_message=4096)
    assert b"".join(hub_messages) == b"x" * 50_000
    assert all(len(m) <= 4096 for m in hub_messages)


def test_cut_keeps_utf8_characters_whole() -> None:
    data = "€uro" * 10
    pieces = _cut(data.encode(), 5)
    assert b"".join(pieces) == data.encode()
    assert all(p.decode() for p in pieces)


@settings(max_examples=examples(300), deadline=None)
@given(
    data=st.binary(max_size=300)
    | st.text(alphabet="ab\r\n€ä", max_size=120).map(lambda s: s.encode()),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    max_message=st.integers(min_value=1, max_value=64),
)
def test_lines_any_read_split_gives_the_same_messages(
    data: bytes, cuts: list[int], max_message: int
) -> None:
    whole = feed([data], max_message=max_message)
    assert feed(split(data, cuts), max_message=max_message) == whole
    assert all(0 < len(m) <= max_message for m in whole)


@settings(max_examples=examples(200), deadline=None)
@given(
    text=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=80),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_lines_match_the_reference_split(text: str, cuts: list[int]) -> None:
    data = text.encode()
    expected = [line[:-1] if line.endswith(b"\r") else line for line in data.split(b"\n")]
    expected = [m for m in expected if m]
    assert feed(split(data, cuts)) == expected


@settings(max_examples=examples(200), deadline=None)
@given(
    text=st.text(max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_raw_text_is_never_split_inside_a_character(text: str, cuts: list[int]) -> None:
    data = text.encode("utf-8", "surrogatepass")
    messages = feed(split(data, cuts), framing="raw")
    assert b"".join(messages) == data
    if text and all(not 0xD800 <= ord(c) <= 0xDFFF for c in text):
        for m in messages:
            m.decode("utf-8")


@pytest.mark.parametrize("framing", ["lines", "raw"])
def test_over_max_connections_is_rejected_and_counted(framing: str) -> None:
    hub = RecordingHub()
    with socket.socket() as sock:
        listener = Listener(
            PortSettings(port=8001, framing=framing, max_connections=1),  # type: ignore[arg-type]
            sock,
            ListenerEnv(hub),  # type: ignore[arg-type]
            origin="config",
            max_message=100,
        )
        first, second = DeviceConnection(listener), DeviceConnection(listener)
        first.connection_made(FakeTransport())
        second.connection_made(FakeTransport())
        assert len(listener.connections) == 1
        assert listener.rejected["max_connections"] == 1
