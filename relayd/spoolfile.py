"""The on-disk format of the MQTT spool's segments (see relayd(8), MQTT SPOOL).

A segment is ``<state-dir>/spool/<20-digit id of its first record>.seg``: the
8-byte magic ``RDSPOOL1`` followed by records, each::

    u32 body length | u32 crc32(body) | body = u64 id | u16 topic length | topic | payload

all little-endian. Ids are strictly increasing within a segment and from one
segment to the next. ``decode`` is the only parser; recovery and the reader
both go through it, so a record is either whole and checked or not returned.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from relayd.atomicfile import remove_leftovers

logger = logging.getLogger(__name__)

MAGIC = b"RDSPOOL1"
SUFFIX = ".seg"
CORRUPT_SUFFIX = ".seg.corrupt"
_NAME = re.compile(r"^(\d{20})\.seg$")

_LEN_CRC = struct.Struct("<II")
_ID_TLEN = struct.Struct("<QH")
HEAD = _LEN_CRC.size  # bytes before the body
_MIN_BODY = _ID_TLEN.size
MAX_TOPIC = 0xFFFF
# No message relayd relays comes near this; a larger length field is damage.
MAX_BODY = 64 * 1024 * 1024

# What decode() says when the buffer ends inside a record (read more, or a torn tail).
SHORT = "short"


def segment_name(first_id: int) -> str:
    return f"{first_id:020d}{SUFFIX}"


def segment_id(path: Path) -> int | None:
    """The first id a segment file is named after, or None for any other file."""
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def encode(record_id: int, topic: bytes, payload: bytes) -> bytes:
    body = _ID_TLEN.pack(record_id, len(topic)) + topic + payload
    return _LEN_CRC.pack(len(body), zlib.crc32(body)) + body


def decode(buf: bytes, off: int) -> tuple[int, str, bytes, int] | str:
    """The record at ``off``: ``(id, topic, payload, end offset)``, or why there is none.

    ``SHORT`` when ``buf`` ends inside the record (whether more bytes exist is
    the caller's business); any other string describes damage.
    """
    end_head = off + HEAD
    if end_head > len(buf):
        return SHORT
    length, crc = _LEN_CRC.unpack_from(buf, off)
    if length < _MIN_BODY or length > MAX_BODY:
        return f"bad record length {length}"
    end = end_head + length
    if end > len(buf):
        return SHORT
    body = buf[end_head:end]
    if zlib.crc32(body) != crc:
        return "checksum mismatch"
    record_id, tlen = _ID_TLEN.unpack_from(body, 0)
    if _MIN_BODY + tlen > length:
        return f"bad topic length {tlen}"
    topic = body[_MIN_BODY : _MIN_BODY + tlen].decode("utf-8", "surrogatepass")
    return record_id, topic, bytes(body[_MIN_BODY + tlen :]), end


@dataclass(slots=True)
class Scan:
    """What recovery learnt from one segment file."""

    count: int = 0  # whole records
    first: int = -1  # id of the first record (-1: none)
    last: int = -1  # id of the last record (-1: none)
    good_end: int = 0  # offset after the last whole record (0: not even the magic)
    problem: str | None = None  # why the scan stopped before the end of the file
    torn: bool = False  # the problem is a record cut short at the end of the file
    # (start, end) ranges of ids skipped inside the segment, for the caller's holes
    jumps: list[tuple[int, int]] | None = None


def scan(data: bytes, name_id: int) -> Scan:
    """Check a whole segment's bytes record by record."""
    s = Scan()
    if len(data) < len(MAGIC):
        if MAGIC.startswith(data):
            s.torn = bool(data)
            s.problem = "file cut short in its header" if data else None
            return s
        s.problem = "not a spool segment"
        return s
    if not data.startswith(MAGIC):
        s.problem = "not a spool segment"
        return s
    off = len(MAGIC)
    s.good_end = off
    prev = name_id - 1
    jumps: list[tuple[int, int]] = []
    # decode() without building records: recovery only needs ids and checksums.
    view, size, count = memoryview(data), len(data), 0
    unpack_head, unpack_id, crc32 = _LEN_CRC.unpack_from, _ID_TLEN.unpack_from, zlib.crc32
    while off < size:
        if off + HEAD > size:
            s.torn, s.problem = True, "last record cut short"
            break
        length, crc = unpack_head(view, off)
        end = off + HEAD + length
        if length < _MIN_BODY or length > MAX_BODY:
            s.problem = f"bad record length {length} at offset {off}"
            break
        if end > size:
            s.torn, s.problem = True, "last record cut short"
            break
        if crc32(view[off + HEAD : end]) != crc:
            s.problem = f"checksum mismatch at offset {off}"
            break
        rid, tlen = unpack_id(view, off + HEAD)
        if _MIN_BODY + tlen > length:
            s.problem = f"bad topic length {tlen} at offset {off}"
            break
        if rid <= prev:
            s.problem = f"record id {rid} out of order at offset {off}"
            break
        if rid != prev + 1 and count:
            jumps.append((prev + 1, rid))
        if not count:
            s.first = rid
        count += 1
        prev = rid
        off = end
    s.count = count
    s.last = prev if count else -1
    s.good_end = off  # the start of the damaged record, if any
    s.jumps = jumps
    return s


@dataclass(slots=True)
class Segment:
    first: int  # the id in its name; its records' ids are >= first
    path: Path
    size: int = 0  # bytes written and accepted (magic included)
    count: int = 0
    last: int = -1  # id of its last record, -1 while empty


def reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


@dataclass(slots=True)
class Recovered:
    segments: list[Segment]
    low: int  # every id below it is acked
    next_id: int
    holes: deque[list[int]]  # [start, end) ranges of ids >= low that no record has
    corrupt: int  # segments set aside


def recover(directory: Path, commit: Path) -> Recovered:
    """Read back a spool directory (creating it 0700); OSError if it cannot be used.

    Segments are read in order; a damaged tail of the last one is cut off (a
    crash mid-write), any other damaged segment is renamed ``*.seg.corrupt``
    and logged. Empty and wholly acked segments are deleted.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory")
    if directory.stat().st_mode & 0o077:
        directory.chmod(0o700)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "permission denied")
    remove_leftovers(commit)
    low = _read_commit(commit)
    found = sorted((sid, p) for p in directory.iterdir() if (sid := segment_id(p)) is not None)
    segs: list[Segment] = []
    holes: deque[list[int]] = deque()
    corrupt = 0
    next_id = low
    expect = low  # the id that would follow the records kept so far
    for i, (sid, path) in enumerate(found):
        next_id = max(next_id, sid + 1)  # a new segment's name never meets an old one
        data = path.read_bytes()
        s = scan(data, sid)
        # The last segment's damage is a write a crash (or power cut) cut short: cut
        # it off there. Elsewhere, or with nothing whole before it, set the file aside.
        last = i == len(found) - 1
        if s.problem is not None and (not last or (not s.count and not s.torn)):
            aside = path.with_name(path.stem + CORRUPT_SUFFIX)
            logger.warning(
                "spool segment %s is damaged (%s): set aside as %s",
                path.name,
                s.problem,
                aside.name,
            )
            corrupt += 1
            try:
                path.rename(aside)
            except OSError as exc:
                logger.warning("cannot set aside %s: %s", path.name, reason(exc))
            continue
        if s.problem is not None:
            logger.warning(
                "spool segment %s: %s (a crash while writing?): %d bytes cut off",
                path.name,
                s.problem,
                len(data) - s.good_end,
            )
            os.truncate(path, s.good_end)
        if s.count:
            next_id = max(next_id, s.last + 1)
        if not s.count or s.last < low:
            path.unlink()  # empty or wholly acked: its ids are accounted for in next_id
            continue
        ranges = s.jumps or []
        if not segs:
            low = max(low, s.first)  # nothing before it is left
        else:
            ranges = [(expect, s.first), *ranges]
        for a, b in ranges:
            if b > max(a, low):
                holes.append([max(a, low), b])
        expect = s.last + 1
        segs.append(Segment(sid, path, s.good_end, s.count, s.last))
    if not segs:
        low = next_id
    elif next_id > expect:
        holes.append([expect, next_id])
    return Recovered(segs, low, next_id, holes, corrupt)


def _read_commit(path: Path) -> int:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as exc:
        why = reason(exc) if isinstance(exc, OSError) else "not text"
        logger.warning("spool commit file %s unreadable (%s): starting from 0", path, why)
        return 0
    if not text.strip().isdigit() or len(text) > 40:
        logger.warning("spool commit file %s is damaged: starting from 0", path)
        return 0
    return int(text)
