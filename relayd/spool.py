"""The MQTT uplink's write-ahead disk spool (see relayd(8), MQTT SPOOL).

Every message the uplink publishes goes through here first: ``append`` (hot
path, memory only) → ``flush`` (one ``write`` per loop iteration) → ``read``
(oldest first) → publish → ``ack``. ``sync`` (every second, in a thread)
fdatasyncs the segments, records the acked low-water id in ``commit`` (atomic
replace, like ``ports.json``) and only then deletes segments wholly behind it.

So a crash loses nothing that was flushed, and a power cut at most what was
flushed since the last ``sync``; at least once: what was published but whose
ack was not yet committed is published again after a restart.

Ids are strictly increasing and never reused, but need not be contiguous:
ranges that are missing (a segment set aside as damaged; records acked and then
discarded while the disk was failing) are "holes" that the low-water mark steps
over. Invariant: every id in ``[low, next_id)`` is a live record, an acked one
(``_acked``) or in a hole, so ``messages = next_id - low - len(acked) - holes``.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import threading
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from relayd import spoolfile
from relayd.atomicfile import write_atomic
from relayd.errors import RelaydError
from relayd.spoolfile import Segment

logger = logging.getLogger(__name__)

COMMIT = "commit"
SEGMENT_BYTES = 8 * 1024 * 1024
# Flushed records kept in memory for read(), so a connected uplink never reads the disk.
CACHE_RECORDS = 16384
# Room for records that cannot reach the disk (full disk, I/O error).
MEMORY_BYTES = 16 * 1024 * 1024
_READ_CHUNK = 1024 * 1024
_id_of = attrgetter("id")


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    id: int  # strictly increasing across restarts, never reused
    topic: str
    payload: bytes


class SpoolError(RelaydError):
    """The spool directory cannot be used (relayd exits 78)."""


class Spool:
    """See the module docstring. Not thread-safe: use it from the event loop."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_bytes: int,
        recovered: spoolfile.Recovered,
    ) -> None:
        segments, low, next_id = recovered.segments, recovered.low, recovered.next_id
        holes = recovered.holes
        self._dir = directory
        self._commit = directory / COMMIT
        self._max_bytes = max_bytes
        self._seg_bytes = segment_bytes
        self._room = min(max_bytes, MEMORY_BYTES)
        self._segs = segments
        self._low = low
        self._committed_low = low
        self._next_id = next_id
        self._holes = holes
        self._hole_ids = sum(e - s for s, e in holes)
        self._acked: set[int] = set()
        self._cursor = low
        self._disk_bytes = sum(s.size for s in segments)
        self._active: Segment | None = None
        self._fd = -1
        self._retired: list[int] = []  # fds of rotated segments, fdatasync'd by sync()
        self._dir_dirty = False
        self._to_free: list[Path] = []
        # Records: _mem[_head:] in id order; _mem[_unflushed:] are not on disk yet,
        # their encodings in _pend.
        self._mem: list[SpoolRecord] = []
        self._head = 0
        self._unflushed = 0
        self._pend: list[bytes] = []
        self._pend_bytes = 0
        # Disk reader: an fd on one segment and where the last read stopped.
        self._rd_seg: Segment | None = None
        self._rd_fd = -1
        self._rd_off = 0
        self._rd_before = -1  # every record before _rd_off has an id <= this
        self._failing = False
        self._sync_failing = False
        self._syncing = False
        self._closed = False
        self._lock = threading.Lock()  # commit writes and unlinks: sync()'s thread vs close()
        self.dropped = 0
        self.write_errors = 0
        self.corrupt = recovered.corrupt  # segments set aside at open

    # --- counters ---------------------------------------------------------------

    @property
    def messages(self) -> int:
        """Records not yet acked (dropped ones excluded)."""
        return self._next_id - self._low - len(self._acked) - self._hole_ids

    # (``bytes`` is defined last: inside the class body it would shadow the type.)

    # --- open and recovery ------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, *, max_bytes: int, segment_bytes: int | None = None) -> Spool:
        """Open (creating it 0700) and recover the spool in ``directory``; SpoolError if unusable.

        Segments are read in order; a damaged tail of the last one is cut off (a
        crash mid-write), any other damaged segment is renamed ``*.seg.corrupt``
        and logged. Segments wholly acked are deleted.
        """
        if segment_bytes is None:
            segment_bytes = max(64 * 1024, min(SEGMENT_BYTES, max_bytes // 8))
        try:
            got = spoolfile.recover(directory, directory / COMMIT)
        except OSError as exc:
            why = spoolfile.reason(exc)
            raise SpoolError(f"spool directory {directory} is unusable: {why}") from None
        spool = cls(directory, max_bytes=max_bytes, segment_bytes=segment_bytes, recovered=got)
        if spool.messages:
            logger.info(
                "spool %s: %d messages (%d bytes) waiting from before",
                directory,
                spool.messages,
                spool._disk_bytes,
            )
        return spool

    # --- writing ----------------------------------------------------------------

    def append(self, topic: str, payload: bytes) -> None:
        """Buffer one message (memory only; never raises, never blocks)."""
        rid = self._next_id
        t = topic.encode("utf-8", "surrogatepass")
        if self._closed or len(t) > spoolfile.MAX_TOPIC or len(payload) > spoolfile.MAX_BODY // 2:
            self.dropped += 1
            return
        enc = spoolfile.encode(rid, t, payload)
        if self._pend_bytes + len(enc) > self._room:
            self.flush()
            if self._pend_bytes + len(enc) > self._room:
                self.dropped += 1
                return
        self._next_id = rid + 1
        self._pend.append(enc)
        self._pend_bytes += len(enc)
        self._mem.append(SpoolRecord(rid, topic, payload))

    def flush(self) -> None:
        """Write the buffered records to the OS (one ``write``); never raises.

        The uplink calls it once per loop iteration. On a write error (full
        disk, I/O error) the records stay in memory within a bound, counted in
        ``write_errors`` and logged once per episode.
        """
        if not self._pend or self._closed:
            return
        data = b"".join(self._pend)
        seg = self._active
        try:
            if seg is None or seg.size >= self._seg_bytes:
                seg = self._rotate(self._mem[self._unflushed].id)
            if not seg.size:
                data = spoolfile.MAGIC + data
            self._write(seg, data)
        except OSError as exc:
            self._write_failed(exc)
            return
        n = len(self._pend)
        seg.size += len(data)
        seg.count += n
        seg.last = self._mem[-1].id
        self._disk_bytes += len(data)
        self._pend.clear()
        self._pend_bytes = 0
        self._unflushed = len(self._mem)
        if self._failing:
            self._failing = False
            logger.warning("spool %s: writing works again", self._dir)
        self._enforce_bound()
        self._trim()

    def _rotate(self, first: int) -> Segment:
        path = self._dir / spoolfile.segment_name(first)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)  # O_APPEND: after a cut-off partial write too
        if self._fd >= 0:
            self._retired.append(self._fd)
        self._fd = fd
        seg = self._active = Segment(first, path)
        self._segs.append(seg)
        self._dir_dirty = True
        return seg

    def _write(self, seg: Segment, data: bytes) -> None:
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                done += os.write(self._fd, view[done:])
        except OSError:
            if done:  # a partial record would break every later one: cut it off
                try:
                    os.ftruncate(self._fd, seg.size)
                except OSError:
                    self._active = None  # the next flush starts a new segment
            raise

    def _write_failed(self, exc: OSError) -> None:
        self.write_errors += 1
        if not self._failing:
            self._failing = True
            logger.warning(
                "spool %s: cannot write (%s); messages are kept in memory (up to %d bytes) "
                "and relaying goes on",
                self._dir,
                spoolfile.reason(exc),
                self._room,
            )
        # Records acked while they could not be written need no disk: drop them.
        i = self._unflushed
        while i < len(self._mem) and self._mem[i].id < self._low:
            i += 1
        if i > self._unflushed:
            k = i - self._unflushed
            self._pend_bytes -= sum(len(b) for b in self._pend[:k])
            del self._pend[:k]
            del self._mem[self._unflushed : i]

    def _enforce_bound(self) -> None:
        """Beyond max_bytes, drop whole oldest segments (never the one being written)."""
        while self._disk_bytes + self._pend_bytes > self._max_bytes and len(self._segs) > 1:
            seg = self._segs.pop(0)
            before = self.messages
            self._disk_bytes -= seg.size
            self._set_low(max(self._low, seg.last + 1))
            lost = before - self.messages
            self.dropped += lost
            if seg is self._rd_seg:
                self._close_reader()
            try:
                seg.path.unlink()
            except OSError as exc:
                logger.warning("cannot remove %s: %s", seg.path.name, spoolfile.reason(exc))
            logger.warning(
                "spool %s over %d bytes: dropped the oldest %d messages (%s)",
                self._dir,
                self._max_bytes,
                lost,
                seg.path.name,
            )

    def _trim(self) -> None:
        """Forget flushed records that are acked, or beyond the cache (the disk has them)."""
        mem, head, low = self._mem, self._head, self._low
        keep_from = max(head, self._unflushed - CACHE_RECORDS)
        while head < self._unflushed and (head < keep_from or mem[head].id < low):
            head += 1
        if head > 4096 and head * 2 > len(mem):
            del mem[:head]
            self._unflushed -= head
            head = 0
        self._head = head

    # --- acknowledgements -------------------------------------------------------

    def ack(self, record_id: int) -> None:
        """The broker has this record; acks may come out of order."""
        if record_id == self._low and not self._acked and not self._holes:
            self._low = record_id + 1
            return
        if record_id < self._low or record_id >= self._next_id:
            return
        self._acked.add(record_id)
        self._set_low(self._low)

    def _set_low(self, low: int) -> None:
        """Move the low-water mark to ``low``, then past acked ids and holes."""
        acked, holes = self._acked, self._holes
        if acked and low > self._low:
            self._acked = acked = {i for i in acked if i >= low}
        while holes and holes[0][1] <= low:
            s, e = holes.popleft()
            self._hole_ids -= e - s
        if holes and holes[0][0] < low:
            self._hole_ids -= low - holes[0][0]
            holes[0][0] = low
        while True:
            if low in acked:
                acked.discard(low)
                low += 1
            elif holes and holes[0][0] == low:
                s, e = holes.popleft()
                self._hole_ids -= e - s
                low = e
            else:
                break
        self._low = low

    # --- reading ----------------------------------------------------------------

    def read(self, max_records: int) -> list[SpoolRecord]:
        """Up to ``max_records`` un-acked records after the read cursor, oldest first."""
        out: list[SpoolRecord] = []
        cur = max(self._cursor, self._low)
        mem = self._mem
        mem_first = mem[self._head].id if self._head < len(mem) else self._next_id
        if cur < mem_first:
            self._read_disk(cur, mem_first, max_records, out)
            if len(out) >= max_records:
                self._cursor = out[-1].id + 1
                return out
            cur = mem_first
        acked = self._acked
        i = bisect.bisect_left(mem, cur, lo=self._head, key=_id_of)
        end = min(len(mem), i + max_records - len(out))
        if not acked:
            out.extend(mem[i:end])
        else:
            while i < len(mem) and len(out) < max_records:
                if mem[i].id not in acked:
                    out.append(mem[i])
                i += 1
        if out:
            self._cursor = out[-1].id + 1
        return out

    def rewind(self) -> None:
        """read() starts again at the oldest un-acked record (after a reconnect)."""
        self._cursor = self._low

    def _read_disk(self, cur: int, stop: int, n: int, out: list[SpoolRecord]) -> None:
        segs = self._segs
        i = max(0, bisect.bisect_right(segs, cur, key=attrgetter("first")) - 1)
        for seg in segs[i:]:
            if seg.first >= stop or len(out) >= n:
                return
            if seg.last < cur:
                continue
            try:
                cur = self._read_segment(seg, cur, stop, n, out)
            except OSError as exc:
                logger.error(
                    "spool segment %s cannot be read: %s", seg.path.name, spoolfile.reason(exc)
                )
                self._close_reader()

    def _read_segment(
        self, seg: Segment, cur: int, stop: int, n: int, out: list[SpoolRecord]
    ) -> int:
        if seg is not self._rd_seg:
            self._close_reader()
            self._rd_fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
            self._rd_seg = seg
        if self._rd_before >= cur or self._rd_off == 0:
            self._rd_off, self._rd_before = len(spoolfile.MAGIC), -1
        off, acked = self._rd_off, self._acked
        buf = b""
        base = off
        while off < seg.size and len(out) < n:
            got = spoolfile.decode(buf, off - base)
            if got == spoolfile.SHORT:
                want = max(_READ_CHUNK, 2 * (len(buf) - (off - base)) + spoolfile.HEAD)
                buf = os.pread(self._rd_fd, min(want, seg.size - off), off)
                base = off
                got = spoolfile.decode(buf, 0)
                if got == spoolfile.SHORT and len(buf) < seg.size - off:
                    continue  # a record bigger than the chunk: the next round reads more
            if isinstance(got, str):
                logger.error("spool segment %s: %s at offset %d", seg.path.name, got, off)
                break
            rid, topic, payload, end = got
            if rid >= stop:
                break
            off = base + end
            self._rd_off, self._rd_before = off, rid
            if rid >= cur and rid not in acked:
                out.append(SpoolRecord(rid, topic, payload))
        return out[-1].id + 1 if out else cur

    def _close_reader(self) -> None:
        if self._rd_fd >= 0:
            os.close(self._rd_fd)
        self._rd_fd, self._rd_seg, self._rd_off, self._rd_before = -1, None, 0, -1

    # --- durability -------------------------------------------------------------

    async def sync(self) -> None:
        """fdatasync the segments, commit the acked low-water id, free acked segments.

        The disk work runs in a thread (on duplicated fds, so appends and
        rotations go on meanwhile); a call while one is running returns at once.
        """
        if self._closed or self._syncing:
            return
        self._syncing = True
        try:
            fds, low, free, dirty = self._prepare_sync()
            await asyncio.to_thread(self._sync_files, fds, low, free, dirty)
        except OSError as exc:
            self.write_errors += 1
            if not self._sync_failing:
                self._sync_failing = True
                logger.warning("spool %s: cannot sync (%s)", self._dir, spoolfile.reason(exc))
        else:
            if self._sync_failing:
                self._sync_failing = False
                logger.warning("spool %s: syncing works again", self._dir)
        finally:
            self._syncing = False

    def _prepare_sync(self) -> tuple[list[int], int, list[Path], bool]:
        fds, self._retired = self._retired, []
        if self._fd >= 0:
            fds.append(os.dup(self._fd))
        low = self._low
        free, self._to_free = self._to_free, []
        while self._segs and self._segs[0] is not self._active and self._segs[0].last < low:
            seg = self._segs.pop(0)
            if seg is self._rd_seg:
                self._close_reader()
            self._disk_bytes -= seg.size
            free.append(seg.path)
        dirty, self._dir_dirty = self._dir_dirty, False
        return fds, low, free, dirty

    def _sync_files(self, fds: list[int], low: int, free: list[Path], dirty: bool) -> None:
        try:
            for fd in fds:
                os.fdatasync(fd)
        except OSError:
            self._dir_dirty = True
            self._to_free.extend(free)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        self._commit_and_free(low, free, dirty)

    def _commit_and_free(self, low: int, free: list[Path], dirty: bool) -> None:
        with self._lock:
            try:
                if low > self._committed_low:
                    write_atomic(self._commit, f"{low}\n".encode(), 0o600)
                    self._committed_low = low
                for path in free:
                    path.unlink(missing_ok=True)
                if dirty or free:
                    dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        os.fsync(dir_fd)
                    finally:
                        os.close(dir_fd)
            except OSError:
                self._to_free.extend(p for p in free if p.exists())
                raise

    def close(self) -> None:
        """Flush, fsync and commit (blocking; at stop). Idempotent; never raises."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._pend:
            logger.warning(
                "spool %s: %d messages that could not be written are lost at stop",
                self._dir,
                len(self._pend),
            )
        fds, low, free, dirty = self._prepare_sync()
        self._retired = []
        if self._fd >= 0:
            fds.append(self._fd)
            self._fd = -1
        try:
            self._sync_files(fds, low, free, dirty)
        except OSError as exc:
            self.write_errors += 1
            logger.warning("spool %s: cannot sync at stop (%s)", self._dir, spoolfile.reason(exc))
        self._close_reader()

    @property
    def bytes(self) -> int:
        """Bytes of the segments on disk plus the records still buffered."""
        return self._disk_bytes + self._pend_bytes
