"""The sans-I/O framers, without sockets: bytes in, messages out, errors as values."""

from __future__ import annotations

import logging
import re
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.config import PortSettings
from relayd.framing import (
    DelimiterFramer,
    FixedFramer,
    Framer,
    FramingError,
    LengthFramer,
    LengthPrefix,
    LinesFramer,
    RawFramer,
    _cut,
    make_framer,
)
from relayd.listeners import DeviceConnection, Listener, ListenerEnv
from tests.helpers import examples
from tests.test_framing import FakeTransport, RecordingHub, split

PREFIXES: list[LengthPrefix] = ["u8", "u16be", "u16le", "u32be", "u32le"]
FORMATS = {"u8": ">B", "u16be": ">H", "u16le": "<H", "u32be": ">I", "u32le": "<I"}


def run(framer: Framer, reads: list[bytes]) -> tuple[list[bytes], FramingError | None]:
    """Everything a framer relays for ``reads`` then end of stream, and its error."""
    out: list[bytes] = []
    for data in reads:
        messages = framer.feed(data)
        if framer.text:
            for m in messages:
                m.decode("ascii")  # the framer promised text
        out += messages
    out += framer.close()
    return out, framer.error


def frame(prefix: LengthPrefix, payload: bytes) -> bytes:
    return struct.pack(FORMATS[prefix], len(payload)) + payload


def reference_cut(parts: list[bytes], size: int) -> list[bytes]:
    """Each part cut to ``size`` (whole UTF-8 characters where possible), empty ones dropped."""
    return [piece for part in parts if part for piece in _cut(part, size)]


# Streams rich in what framers care about: CR, LF, delimiter bytes, multi-byte characters.
texty = st.text(alphabet="ab\r\n€ä\x03", max_size=120).map(lambda s: s.encode())
streams = st.binary(max_size=300) | texty
cuts = st.lists(st.integers(min_value=0, max_value=400), max_size=12)


# lines


def test_lines_split_strip_crlf_and_drop_blank_lines() -> None:
    assert run(LinesFramer(100), [b"a\r\nb\n\n\r\nc\r\r\n"]) == ([b"a", b"b", b"c\r"], None)


def test_lines_trailing_partial_line_is_the_last_message_without_its_cr() -> None:
    framer = LinesFramer(100)
    assert framer.feed(b"one\ntwo\r") == [b"one"]
    assert framer.buffered == 4
    assert framer.close() == [b"two"]
    assert framer.close() == []
    assert framer.error is None


def test_lines_a_lone_cr_at_the_end_is_not_a_message() -> None:
    assert run(LinesFramer(100), [b"a\n\r"]) == ([b"a"], None)


def test_lines_long_line_is_cut_and_holds_at_most_max_message() -> None:
    framer = LinesFramer(4096)
    out = []
    for _ in range(50):
        out += framer.feed(b"x" * 1000)
        assert framer.buffered <= 4096
    out += framer.feed(b"\n")
    assert b"".join(out) == b"x" * 50_000
    assert all(len(m) <= 4096 for m in out)


def test_lines_cut_keeps_utf8_characters_whole() -> None:
    line = "€uro" * 10
    messages, _ = run(LinesFramer(5), [line.encode() + b"\n"])
    assert b"".join(messages) == line.encode()
    assert all(len(m) <= 5 for m in messages)
    for m in messages:
        m.decode()


def test_lines_text_flag_only_for_ascii() -> None:
    framer = LinesFramer(100)
    framer.feed(b"abc\n")
    assert framer.text
    framer.feed("wägt\n".encode())
    assert not framer.text


@settings(max_examples=examples(300), deadline=None)
@given(data=streams, cuts=cuts, max_message=st.integers(min_value=1, max_value=64))
def test_lines_any_read_split_gives_the_reference_messages(
    data: bytes, cuts: list[int], max_message: int
) -> None:
    lines = [line[:-1] if line.endswith(b"\r") else line for line in data.split(b"\n")]
    expected = reference_cut(lines, max_message)
    framer = LinesFramer(max_message)
    assert run(framer, split(data, cuts)) == (expected, None)
    assert all(0 < len(m) <= max_message for m in expected)


@settings(max_examples=examples(100), deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=80), cuts=cuts)
def test_lines_pieces_of_text_are_text(text: str, cuts: list[int]) -> None:
    messages, _ = run(LinesFramer(4), split(text.encode(), cuts))
    for m in messages:
        m.decode()  # 4 bytes hold any character: no cut inside one


# raw


def test_raw_each_read_is_a_message() -> None:
    assert run(RawFramer(100), [b"abc", b"\x00\xff", b"x\ny"]) == (
        [b"abc", b"\x00\xff", b"x\ny"],
        None,
    )


def test_raw_unfinished_utf8_tail_waits_for_the_next_read() -> None:
    euro = "€".encode()
    framer = RawFramer(100)
    assert framer.feed(b"h" + euro[:2]) == [b"h"]
    assert framer.buffered == 2
    assert framer.feed(euro[2:] + b"llo") == [euro + b"llo"]
    assert framer.buffered == 0


def test_raw_unfinished_tail_is_the_last_message_at_end_of_stream() -> None:
    framer = RawFramer(100)
    assert framer.feed(b"ok\xe2\x82") == [b"ok"]
    assert framer.close() == [b"\xe2\x82"]
    assert framer.error is None


def test_raw_invalid_utf8_is_not_held_back() -> None:
    assert run(RawFramer(100), [b"a\xff", b"\x80\x80\x80\x80"]) == (
        [b"a\xff", b"\x80\x80\x80\x80"],
        None,
    )


def test_raw_long_read_is_cut() -> None:
    messages, _ = run(RawFramer(3), [b"abcdefg"])
    assert messages == [b"abc", b"def", b"g"]


@settings(max_examples=examples(200), deadline=None)
@given(data=streams, cuts=cuts, max_message=st.integers(min_value=4, max_value=64))
def test_raw_any_read_split_relays_every_byte_in_order(
    data: bytes, cuts: list[int], max_message: int
) -> None:
    framer = RawFramer(max_message)
    out = []
    for read in split(data, cuts):
        out += framer.feed(read)
        assert framer.buffered <= 3
    out += framer.close()
    assert b"".join(out) == data
    assert all(0 < len(m) <= max_message for m in out)
    try:
        data.decode()
    except UnicodeDecodeError:
        return
    for m in out:
        m.decode()  # text split anywhere is still relayed as text


# delimiter


def test_delimiter_is_stripped_and_empty_messages_are_not_relayed() -> None:
    framer = DelimiterFramer(b"\x03", 100)
    assert run(framer, [b"\x02a\x03\x03\x02b\x03"]) == ([b"\x02a", b"\x02b"], None)


def test_delimiter_keeps_cr() -> None:
    assert run(DelimiterFramer(b"\n", 100), [b"a\r\nb"]) == ([b"a\r", b"b"], None)


def test_delimiter_of_several_bytes_split_across_reads() -> None:
    framer = DelimiterFramer(b"\r\n", 100)
    assert framer.feed(b"one\r") == []
    assert framer.feed(b"\ntwo\r\nthr") == [b"one", b"two"]
    assert framer.close() == [b"thr"]
    assert framer.error is None


def test_delimiter_never_arriving_is_bounded_and_cut() -> None:
    framer = DelimiterFramer(b"END", 10)
    out = []
    for _ in range(20):
        out += framer.feed(b"x" * 7)
        assert framer.buffered <= 10 + 2
    out += framer.close()
    assert b"".join(out) == b"x" * 140
    assert all(len(m) <= 10 for m in out)


def test_delimiter_held_back_bytes_may_start_the_delimiter() -> None:
    framer = DelimiterFramer(b"XYZ", 2)
    assert framer.feed(b"aXY") == []  # "aX" could be cut, but X may be a delimiter's
    assert framer.feed(b"Z") == [b"a"]
    assert framer.close() == []


@settings(max_examples=examples(300), deadline=None)
@given(
    data=streams,
    cuts=cuts,
    delimiter=st.sampled_from([b"\x03", b"\n", b"\r\n", b"ab", b"aa", b"aba", b"\xe2\x82"])
    | st.binary(min_size=1, max_size=4),
    max_message=st.integers(min_value=1, max_value=64),
)
def test_delimiter_any_read_split_gives_the_reference_messages(
    data: bytes, cuts: list[int], delimiter: bytes, max_message: int
) -> None:
    expected = reference_cut(data.split(delimiter), max_message)
    framer = DelimiterFramer(delimiter, max_message)
    out = []
    for read in split(data, cuts):
        out += framer.feed(read)
        assert framer.buffered <= max_message + len(delimiter) - 1
    out += framer.close()
    assert out == expected
    assert framer.error is None


# length


@pytest.mark.parametrize("prefix", PREFIXES)
def test_length_frames_in_every_prefix(prefix: LengthPrefix) -> None:
    stream = frame(prefix, b"hello") + frame(prefix, b"") + frame(prefix, b"\x00\xff")
    assert run(LengthFramer(prefix, 100), [stream]) == ([b"hello", b"\x00\xff"], None)


def test_length_byte_order() -> None:
    assert run(LengthFramer("u16le", 300), [b"\x02\x00ab"]) == ([b"ab"], None)
    framer = LengthFramer("u16be", 600)
    assert framer.feed(b"\x02\x00ab") == []  # 512 bytes announced
    assert framer.buffered == 4


def test_length_over_max_message_is_an_error_after_the_good_frames() -> None:
    framer = LengthFramer("u8", 4)
    assert framer.feed(frame("u8", b"ok") + b"\x05hello" + frame("u8", b"no")) == [b"ok"]
    assert framer.error == FramingError("too_long", "length prefix 5 over max_message 4")
    assert framer.buffered == 0
    assert framer.feed(frame("u8", b"no")) == []
    assert framer.close() == []
    assert framer.error.reason == "too_long"  # the first error stays


def test_length_too_long_is_seen_as_soon_as_the_prefix_arrives() -> None:
    framer = LengthFramer("u32be", 65536)
    assert framer.feed(b"\x00\x01\x00") == []
    assert framer.error is None
    assert framer.feed(b"\x01") == []
    assert framer.error is not None and framer.error.reason == "too_long"


def test_length_partial_frame_at_end_of_stream_is_dropped_and_reported() -> None:
    framer = LengthFramer("u16be", 100)
    assert framer.feed(frame("u16be", b"one") + frame("u16be", b"two")[:-1]) == [b"one"]
    assert framer.close() == []
    assert framer.error == FramingError(
        "partial", "4 bytes of an unfinished frame dropped at end of stream"
    )


def test_length_partial_prefix_at_end_of_stream_is_reported() -> None:
    assert run(LengthFramer("u32le", 100), [b"\x01\x00"])[1] == FramingError(
        "partial", "2 bytes of an unfinished frame dropped at end of stream"
    )


def test_length_large_frame_in_small_reads() -> None:
    payload = bytes(range(256)) * 256  # 64 KiB
    stream = frame("u32be", payload)
    framer = LengthFramer("u32be", len(payload))
    out = []
    for i in range(0, len(stream), 100):
        out += framer.feed(stream[i : i + 100])
    assert out == [payload]
    assert framer.buffered == 0


@settings(max_examples=examples(300), deadline=None)
@given(
    prefix=st.sampled_from(PREFIXES),
    payloads=st.lists(st.binary(max_size=80), max_size=12),
    cuts=cuts,
    max_message=st.integers(min_value=1, max_value=64),
    truncate=st.integers(min_value=0, max_value=3),
)
def test_length_any_read_split_gives_the_same_messages_and_error(
    prefix: LengthPrefix,
    payloads: list[bytes],
    cuts: list[int],
    max_message: int,
    truncate: int,
) -> None:
    payloads = [p[:255] for p in payloads]  # u8
    data = b"".join(frame(prefix, p) for p in payloads)
    data = data[: len(data) - truncate]
    expected: list[bytes] = []
    error = None
    pos = 0
    header = len(frame(prefix, b""))
    for p in payloads:
        if pos == len(data):
            break
        if len(p) > max_message and pos + header <= len(data):
            error = "too_long"
            break
        end = pos + len(frame(prefix, p))
        if end > len(data):
            error = "partial"
            break
        if p:
            expected.append(p)
        pos = end
    framer = LengthFramer(prefix, max_message)
    out = []
    for read in split(data, cuts):
        out += framer.feed(read)
        assert framer.buffered <= len(frame(prefix, b"")) + max_message
    out += framer.close()
    assert out == expected
    assert (framer.error.reason if framer.error else None) == error


# fixed


def test_fixed_frames() -> None:
    assert run(FixedFramer(3, 100), [b"abcd", b"efghi"]) == ([b"abc", b"def", b"ghi"], None)


def test_fixed_partial_frame_at_end_of_stream_is_dropped_and_reported() -> None:
    assert run(FixedFramer(4, 100), [b"abcdef"]) == (
        [b"abcd"],
        FramingError("partial", "2 bytes of an unfinished frame dropped at end of stream"),
    )


def test_fixed_frame_over_max_message_is_cut() -> None:
    assert run(FixedFramer(5, 2), [b"abcde"]) == ([b"ab", b"cd", b"e"], None)


@settings(max_examples=examples(200), deadline=None)
@given(
    data=st.binary(max_size=200),
    cuts=cuts,
    size=st.integers(min_value=1, max_value=20),
    max_message=st.integers(min_value=1, max_value=64),
)
def test_fixed_any_read_split_gives_the_reference_messages(
    data: bytes, cuts: list[int], size: int, max_message: int
) -> None:
    whole = len(data) - len(data) % size
    expected = reference_cut([data[i : i + size] for i in range(0, whole, size)], max_message)
    framer = FixedFramer(size, max_message)
    messages, error = run(framer, split(data, cuts))
    assert messages == expected
    assert (error.reason if error else None) == ("partial" if whole < len(data) else None)


# max_message changed at run time (a reload)


def test_lines_smaller_max_message_applies_from_the_next_read() -> None:
    framer = LinesFramer(100)
    assert framer.feed(b"abcdef\nabcdef") == [b"abcdef"]
    framer.max_message = 4
    assert framer.feed(b"gh\nxy") == [b"abcd", b"efgh"]
    framer.max_message = 1
    assert framer.close() == [b"x", b"y"]


def test_raw_and_delimiter_larger_max_message_applies_from_the_next_read() -> None:
    raw = RawFramer(2)
    assert raw.feed(b"abc") == [b"ab", b"c"]
    raw.max_message = 3
    assert raw.feed(b"abc") == [b"abc"]
    delimited = DelimiterFramer(b";", 2)
    assert delimited.feed(b"abc;") == [b"ab", b"c"]
    delimited.max_message = 3
    assert delimited.feed(b"abc;") == [b"abc"]


def test_length_smaller_max_message_applies_to_the_next_frame() -> None:
    framer = LengthFramer("u8", 10)
    assert framer.feed(frame("u8", b"abcde")) == [b"abcde"]
    framer.max_message = 4
    assert framer.feed(frame("u8", b"abcde")) == []
    assert framer.error is not None and framer.error.reason == "too_long"


# the factory


def test_make_framer_builds_each_framing() -> None:
    assert isinstance(make_framer("lines", max_message=10), LinesFramer)
    assert isinstance(make_framer("raw", max_message=10), RawFramer)
    delimited = make_framer("delimiter", max_message=10, delimiter=b"\x03")
    assert isinstance(delimited, DelimiterFramer) and delimited.delimiter == b"\x03"
    length = make_framer("length", max_message=10, length_prefix="u16le")
    assert isinstance(length, LengthFramer) and length.prefix == "u16le"
    fixed = make_framer("fixed", max_message=10, size=4)
    assert isinstance(fixed, FixedFramer) and fixed.size == 4
    assert fixed.max_message == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"framing": "delimiter"}, "needs a delimiter"),
        ({"framing": "delimiter", "delimiter": b""}, "at least one byte"),
        ({"framing": "length"}, "needs a length_prefix"),
        ({"framing": "length", "length_prefix": "u24"}, "unknown length prefix 'u24'"),
        ({"framing": "fixed"}, "needs a size"),
        ({"framing": "fixed", "size": 0}, "at least 1"),
        ({"framing": "lines", "max_message": 0}, "max_message must be at least 1"),
        ({"framing": "lines?"}, "unknown framing 'lines?'"),
    ],
)
def test_make_framer_refuses_bad_parameters(kwargs: dict[str, object], message: str) -> None:
    kwargs.setdefault("max_message", 10)
    with pytest.raises(ValueError, match=re.escape(message)):
        make_framer(**kwargs)  # type: ignore[arg-type]


# a device connection acts on framing errors


def connection(framer: Framer) -> tuple[DeviceConnection, RecordingHub, list[bool]]:
    hub = RecordingHub()
    closed: list[bool] = []

    class Transport(FakeTransport):
        def close(self) -> None:
            closed.append(True)

    with socket.socket() as sock:
        listener = Listener(
            PortSettings(port=8001, keepalive=False),
            sock,
            ListenerEnv(hub),  # type: ignore[arg-type]
            origin="config",
            max_message=100,
        )
    conn = DeviceConnection(listener)
    conn.framer = framer
    conn.connection_made(Transport())
    return conn, hub, closed


def test_connection_closes_on_a_framing_error_and_logs_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn, hub, closed = connection(LengthFramer("u8", 4))
    with caplog.at_level(logging.WARNING, logger="relayd.listeners"):
        conn.data_received(frame("u8", b"ok") + b"\x05hello")
        conn.connection_lost(None)
    assert hub.messages == [b"ok"]
    assert conn.listener.messages_received == 1
    assert closed == [True]
    assert [r.getMessage() for r in caplog.records] == [
        "port 8001: device 192.0.2.7:51234: framing error too_long:"
        " length prefix 5 over max_message 4"
    ]


def test_connection_logs_a_partial_frame_at_end_of_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn, hub, closed = connection(FixedFramer(4, 100))
    with caplog.at_level(logging.WARNING, logger="relayd.listeners"):
        conn.data_received(b"abcdef")
        conn.connection_lost(None)
    assert hub.messages == [b"abcd"]
    assert closed == []
    assert [r.getMessage() for r in caplog.records] == [
        "port 8001: device 192.0.2.7:51234: framing error partial:"
        " 2 bytes of an unfinished frame dropped at end of stream"
    ]
