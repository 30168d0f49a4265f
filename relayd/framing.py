"""Framers: a device's byte stream in, messages out, no I/O (sans-I/O).

A framer turns the reads of one device connection into the messages relayd
relays. It never touches a socket, a clock or the event loop, so it is tested
by feeding it bytes (``tests/test_framer.py``), like websockets'
``ServerProtocol`` (``receive_data``/``events_received``) or h11's
``Connection``. The connection that owns it calls:

``feed(data) -> list[bytes]``
    for every read: the messages complete so far, in order, each 1 to
    ``max_message`` bytes (``length`` errors instead of cutting). After
    ``feed`` returns, ``text`` tells whether the messages just returned are
    all ASCII (so valid UTF-8, and the hub needs no check: this is the
    ``all_text`` flag of ``Hub.publish``), and ``error`` whether the stream
    broke the framing.
``close() -> list[bytes]``
    once, at end of stream: the last messages (a trailing partial message
    where the framing relays it); a partial frame that is dropped sets
    ``error``. Nothing is fed after ``close``.

Errors are values, not exceptions: ``error`` is ``None`` or a
``FramingError``, whose ``reason`` is what the owner counts (the ``reason``
label of ``relayd_framing_errors_total``) and whose ``detail`` it logs. It
is set once and stays; from then on ``feed`` and ``close`` return nothing.
``lines``, ``raw`` and ``delimiter`` never fail.

- ``too_long``: a ``length`` prefix over ``max_message``. The owner closes
  the connection; messages returned with or before the error are valid.
- ``partial``: ``length`` or ``fixed`` ended inside a frame; those bytes
  are dropped.

``max_message`` is a plain attribute: the owner may change it between reads
(a reload) and it applies from the next ``feed``.

The framings (relayd.toml(5) ``framing``):

``lines`` (``LinesFramer``)
    A message is a line: split on ``\\n``, and a ``\\r`` right before it is
    removed. Blank lines are not relayed. A line longer than ``max_message``
    is cut into pieces of at most that size, relayed as messages; a cut
    moves back (up to 3 bytes) so as not to split a UTF-8 sequence when the
    piece is long enough to allow it. At most ``max_message`` bytes are held
    between reads, so a device that never sends a newline holds bounded
    memory. At end of stream a trailing partial line (``\\r`` removed) is
    the last message.
``raw`` (``RawFramer``)
    Each read is a message, cut into pieces of at most ``max_message`` like
    lines. An incomplete UTF-8 sequence at the end of a read (at most 3
    bytes) is held back and goes in front of the next read, so text split
    across reads is relayed as text; at end of stream what is held back is
    the last message.
``delimiter`` (``DelimiterFramer``)
    Like ``lines`` with any delimiter of one or more bytes, stripped, and no
    ``\\r`` rule: empty messages (two delimiters in a row) are not relayed,
    over-long messages are cut, a trailing partial message is relayed at
    end of stream. Between reads at most ``max_message`` plus
    ``len(delimiter) - 1`` bytes are held (a delimiter may be arriving).
``length`` (``LengthFramer``)
    Each frame is an unsigned length prefix (``u8``, ``u16be``, ``u16le``,
    ``u32be``, ``u32le``) counting the payload bytes that follow; the
    payload is the message (a zero length is an empty message, not
    relayed). A length over ``max_message`` is the error ``too_long``, seen
    as soon as the prefix arrives; a partial frame at end of stream is
    dropped, error ``partial``. At most the prefix plus ``max_message``
    bytes are held between reads.
``fixed`` (``FixedFramer``)
    Each message is exactly ``size`` bytes (all of them relayed, even if
    they are zeros); a frame longer than ``max_message`` is cut like a long
    line. A partial frame at end of stream is dropped, error ``partial``.

Every framing gives the same messages however the stream is split into
reads (the property tests check this), with one exception by design:
``raw``, whose messages are the reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

FramingName = Literal["lines", "raw", "delimiter", "length", "fixed"]
LengthPrefix = Literal["u8", "u16be", "u16le", "u32be", "u32le"]
ErrorReason = Literal["too_long", "partial"]

_PREFIX_FORMATS: dict[str, str] = {
    "u8": ">B",
    "u16be": ">H",
    "u16le": "<H",
    "u32be": ">I",
    "u32le": "<I",
}


@dataclass(frozen=True, slots=True)
class FramingError:
    """The stream broke its framing; ``detail`` is one sentence for the log."""

    reason: ErrorReason
    detail: str


def _cut(data: bytes, size: int) -> list[bytes]:
    """Pieces of at most ``size`` bytes, not cut inside a UTF-8 sequence where avoidable.

    Greedy from the start: each cut depends only on the bytes up to it, so the
    pieces of a prefix are the first pieces of the whole.
    """
    pieces = []
    start = 0
    while len(data) - start > size:
        cut = back = start + size
        while back > start and back > cut - 3 and 0x80 <= data[back] < 0xC0:
            back -= 1  # data[cut] continues a sequence: look for its lead byte
        if back > start and data[back] >= 0xC0:
            cut = back
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    return pieces


def _incomplete_utf8_tail(data: bytes) -> int:
    """Length of a UTF-8 sequence cut short at the end of ``data`` (0 if none)."""
    for i in range(1, min(4, len(data)) + 1):
        byte = data[-i]
        if byte < 0x80:
            return 0
        if byte > 0xF4:
            return 0  # never part of UTF-8
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return i if i < need else 0
    return 0


class Framer:
    """The interface every framing implements (see the module docstring)."""

    __slots__ = ("error", "max_message", "text")

    def __init__(self, max_message: int) -> None:
        if max_message < 1:
            raise ValueError("max_message must be at least 1")
        self.max_message = max_message
        self.text = False  # the messages last returned by feed() are all ASCII
        self.error: FramingError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """The messages completed by one read."""
        raise NotImplementedError

    def close(self) -> list[bytes]:
        """End of stream: the last messages; may set ``error``."""
        raise NotImplementedError

    @property
    def buffered(self) -> int:
        """Bytes held back for the next read."""
        raise NotImplementedError


class LinesFramer(Framer):
    """``lines``: split on LF, strip CR LF, drop blank lines, cut long lines."""

    __slots__ = ("_partial",)

    def __init__(self, max_message: int) -> None:
        super().__init__(max_message)
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        if self._partial:
            data = self._partial + data
        size = self.max_message
        if b"\r" in data:  # a CR right before each LF goes: one pass in C, not one per line
            data = data.replace(b"\r\n", b"\n")
        messages = data.split(b"\n")  # one split; most reads hold many short lines
        partial = messages.pop()
        if len(data) > size:  # only then can a line need cutting
            if messages and max(map(len, messages)) > size:
                messages = [piece for m in messages for piece in _cut(m, size)]
            if len(partial) >= size:
                pieces = _cut(partial, size)
                partial = pieces.pop()
                messages += pieces
        self._partial = partial
        if b"" in messages:  # blank lines carry no data and are not relayed
            messages = [m for m in messages if m]
        if messages:
            self.text = data.isascii()
        return messages

    def close(self) -> list[bytes]:
        partial = self._partial
        self._partial = b""
        if partial.endswith(b"\r"):
            partial = partial[:-1]
        if not partial:
            return []
        self.text = False
        return _cut(partial, self.max_message)  # longer only if max_message shrank

    @property
    def buffered(self) -> int:
        return len(self._partial)


class RawFramer(Framer):
    """``raw``: each read is a message; an unfinished UTF-8 tail waits for the next."""

    __slots__ = ("_partial",)

    def __init__(self, max_message: int) -> None:
        super().__init__(max_message)
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        if self._partial:
            data = self._partial + data
        is_ascii = data.isascii()
        tail = 0 if is_ascii else _incomplete_utf8_tail(data)
        if tail:
            self._partial = data[-tail:]
            data = data[:-tail]
        else:
            self._partial = b""
        size = self.max_message
        self.text = is_ascii
        return _cut(data, size) if len(data) > size else [data] if data else []

    def close(self) -> list[bytes]:
        partial = self._partial
        self._partial = b""
        self.text = False
        return [partial] if partial else []

    @property
    def buffered(self) -> int:
        return len(self._partial)


class DelimiterFramer(Framer):
    """``delimiter``: split on a byte string, stripped; like lines otherwise."""

    __slots__ = ("_hold", "_partial", "delimiter")

    def __init__(self, delimiter: bytes, max_message: int) -> None:
        if not delimiter:
            raise ValueError("the delimiter must be at least one byte")
        super().__init__(max_message)
        self.delimiter = delimiter
        self._hold = len(delimiter) - 1  # tail bytes that may begin a delimiter
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        if self._partial:
            data = self._partial + data
        size = self.max_message
        messages = data.split(self.delimiter)
        partial = messages.pop()
        if len(data) > size:
            if messages and max(map(len, messages)) > size:
                messages = [piece for m in messages for piece in _cut(m, size)]
            hold = self._hold
            if len(partial) > size + hold:
                # Cut only bytes that are surely message bytes: the last ``hold``
                # may be the start of a delimiter still arriving.
                safe = len(partial) - hold
                pieces = _cut(partial[:safe], size)
                partial = pieces.pop() + partial[safe:]
                messages += pieces
        self._partial = partial
        if b"" in messages:  # empty messages are not relayed
            messages = [m for m in messages if m]
        if messages:
            self.text = data.isascii()
        return messages

    def close(self) -> list[bytes]:
        partial = self._partial
        self._partial = b""
        if not partial:
            return []
        self.text = False
        return _cut(partial, self.max_message)

    @property
    def buffered(self) -> int:
        return len(self._partial)


class _BufferedFramer(Framer):
    """Frames whose bytes are held until complete: ``length`` and ``fixed``."""

    __slots__ = ("_buf", "_need")

    def __init__(self, max_message: int) -> None:
        super().__init__(max_message)
        self._buf = bytearray()  # an unfinished frame; grows in place, no quadratic copies
        self._need = 0  # bytes _buf must reach before parsing again

    def _take(self, data: bytes) -> bytes | None:
        """``data`` behind what is buffered, or ``None`` while a frame is still short."""
        buf = self._buf
        if not buf:
            return data
        buf += data
        if len(buf) < self._need:
            return None
        data = bytes(buf)
        buf.clear()
        return data

    def close(self) -> list[bytes]:
        if self._buf and self.error is None:
            self.error = FramingError(
                "partial", f"{len(self._buf)} bytes of an unfinished frame dropped at end of stream"
            )
        self._buf.clear()
        return []

    @property
    def buffered(self) -> int:
        return len(self._buf)


class LengthFramer(_BufferedFramer):
    """``length``: a length prefix, then that many payload bytes."""

    __slots__ = ("_header", "_unpack_from", "prefix")

    def __init__(self, prefix: LengthPrefix, max_message: int) -> None:
        try:
            fmt = _PREFIX_FORMATS[prefix]
        except KeyError:
            raise ValueError(f"unknown length prefix {prefix!r}") from None
        super().__init__(max_message)
        self.prefix = prefix
        header = struct.Struct(fmt)
        self._header = header.size
        self._unpack_from = header.unpack_from

    def feed(self, data: bytes) -> list[bytes]:
        if self.error is not None:
            return []
        taken = self._take(data)
        if taken is None:
            return []
        data = taken
        header = self._header
        unpack_from = self._unpack_from
        size = self.max_message
        messages = []
        pos = 0
        end = len(data)
        need = header
        while end - pos >= header:
            (n,) = unpack_from(data, pos)
            if n > size:
                self.error = FramingError("too_long", f"length prefix {n} over max_message {size}")
                break
            stop = pos + header + n
            if stop > end:
                need = header + n
                break
            if n:
                messages.append(data[pos + header : stop])
            pos = stop
        if pos < end and self.error is None:
            self._buf += memoryview(data)[pos:]
        self._need = need
        if messages:
            self.text = data.isascii()
        return messages


class FixedFramer(_BufferedFramer):
    """``fixed``: every message is ``size`` bytes."""

    __slots__ = ("size",)

    def __init__(self, size: int, max_message: int) -> None:
        if size < 1:
            raise ValueError("the frame size must be at least 1")
        super().__init__(max_message)
        self.size = size
        self._need = size

    def feed(self, data: bytes) -> list[bytes]:
        taken = self._take(data)
        if taken is None:
            return []
        data = taken
        n = self.size
        end = len(data) - len(data) % n
        messages = [data[i : i + n] for i in range(0, end, n)]
        if end < len(data):
            self._buf += memoryview(data)[end:]
        if n > self.max_message:
            size = self.max_message
            messages = [piece for m in messages for piece in _cut(m, size)]
        if messages:
            self.text = data.isascii()
        return messages


def make_framer(
    framing: FramingName,
    *,
    max_message: int,
    delimiter: bytes | None = None,
    length_prefix: LengthPrefix | None = None,
    size: int | None = None,
) -> Framer:
    """A new framer for one connection; ``ValueError`` if a parameter is missing or bad."""
    if framing == "lines":
        return LinesFramer(max_message)
    if framing == "raw":
        return RawFramer(max_message)
    if framing == "delimiter":
        if delimiter is None:
            raise ValueError("framing 'delimiter' needs a delimiter")
        return DelimiterFramer(delimiter, max_message)
    if framing == "length":
        if length_prefix is None:
            raise ValueError("framing 'length' needs a length_prefix")
        return LengthFramer(length_prefix, max_message)
    if framing == "fixed":
        if size is None:
            raise ValueError("framing 'fixed' needs a size")
        return FixedFramer(size, max_message)
    raise ValueError(f"unknown framing {framing!r}")
