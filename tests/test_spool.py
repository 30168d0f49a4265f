"""The MQTT disk spool on real files: order, acks, restarts, recovery, bounds, disk errors."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd import spool as spool_mod
from relayd import spoolfile
from relayd.spool import Spool, SpoolError, SpoolRecord

BIG = 1 << 30


def fill(s: Spool, n: int, topic: str = "relayd/gw/8001", start: int = 0) -> None:
    for i in range(start, start + n):
        s.append(topic, b"m%06d" % i)


def payloads(records: list[SpoolRecord]) -> list[bytes]:
    return [r.payload for r in records]


def segments(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".seg"))


def test_append_read_ack_in_order_flushed_or_not(tmp_path: Path) -> None:
    s = Spool.open(tmp_path / "spool", max_bytes=BIG)
    fill(s, 5)
    s.flush()
    fill(s, 5, start=5)  # still buffered: read() hands these out too
    got = s.read(100)
    assert payloads(got) == [b"m%06d" % i for i in range(10)]
    assert [r.id for r in got] == list(range(10))
    assert got[0].topic == "relayd/gw/8001"
    assert s.read(100) == []  # handed out: not again until rewind()
    assert s.messages == 10
    assert s.bytes > 10 * 6
    s.ack(0)
    s.ack(1)
    assert s.messages == 8
    s.close()


def test_rewind_serves_the_unacked_again_and_acks_may_come_out_of_order(tmp_path: Path) -> None:
    s = Spool.open(tmp_path / "spool", max_bytes=BIG)
    fill(s, 6)
    got = s.read(4)
    assert [r.id for r in got] == [0, 1, 2, 3]
    s.ack(2)  # out of order: 0 and 1 are still in flight
    s.ack(0)
    s.rewind()
    assert [r.id for r in s.read(100)] == [1, 3, 4, 5]
    s.ack(1)
    s.ack(3)
    assert s.messages == 2
    s.ack(3)  # twice, and unknown ids: no effect
    s.ack(999)
    s.ack(-1)
    assert s.messages == 2
    s.close()


def test_a_restart_keeps_the_unacked_and_never_reuses_ids(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    s = Spool.open(d, max_bytes=BIG)
    fill(s, 10)
    for r in s.read(4):
        s.ack(r.id)
    s.ack(6)  # beyond the contiguous prefix: at least once, it comes back
    s.close()
    s = Spool.open(d, max_bytes=BIG)
    assert s.messages == 6
    assert [r.id for r in s.read(100)] == [4, 5, 6, 7, 8, 9]
    for i in range(4, 10):
        s.ack(i)
    s.close()
    s = Spool.open(d, max_bytes=BIG)
    assert s.messages == 0
    assert s.read(10) == []
    assert segments(d) == []  # wholly acked segments are deleted
    s.append("t", b"new")
    assert [r.id for r in s.read(10)] == [10]
    s.close()


def test_files_are_private(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    d.mkdir(mode=0o755)
    s = Spool.open(d, max_bytes=BIG)
    fill(s, 3)
    s.ack(0)
    s.close()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for p in d.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name


def test_an_unusable_directory_is_a_spool_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(SpoolError, match="spool directory .* is unusable"):
        Spool.open(f, max_bytes=BIG)
    with pytest.raises(SpoolError):
        Spool.open(f / "spool", max_bytes=BIG)


def test_segments_rotate_reads_come_from_disk_and_acked_segments_are_freed_by_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_mod, "CACHE_RECORDS", 10)  # make read() go to the disk
    d = tmp_path / "spool"
    s = Spool.open(d, max_bytes=BIG, segment_bytes=4096)
    for k in range(40):
        fill(s, 25, start=25 * k)
        s.flush()
    assert len(segments(d)) > 5
    assert segments(d)[0] == spoolfile.segment_name(0)
    got = s.read(600)
    assert payloads(got) == [b"m%06d" % i for i in range(600)]
    got += s.read(1000)
    assert payloads(got) == [b"m%06d" % i for i in range(1000)]
    s.rewind()
    assert [r.id for r in s.read(3)] == [0, 1, 2]
    n_before = len(segments(d))
    for i in range(700):
        s.ack(i)
    asyncio.run(s.sync())
    assert len(segments(d)) < n_before
    assert (d / "commit").read_text() == "700\n"
    s.rewind()
    assert [r.id for r in s.read(2)] == [700, 701]
    s.close()
    s = Spool.open(d, max_bytes=BIG, segment_bytes=4096)
    assert s.messages == 300
    assert payloads(s.read(1000)) == [b"m%06d" % i for i in range(700, 1000)]
    s.close()


def test_beyond_max_bytes_the_oldest_segments_are_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "spool"
    s = Spool.open(d, max_bytes=64 * 1024, segment_bytes=8 * 1024)
    for k in range(200):
        fill(s, 20, start=20 * k)
        s.flush()
    assert s.bytes <= 64 * 1024
    assert sum(p.stat().st_size for p in d.iterdir()) == s.bytes
    assert s.dropped > 0
    assert s.messages + s.dropped == 4000
    got = s.read(10_000)
    assert len(got) == s.messages
    assert payloads(got) == [b"m%06d" % i for i in range(s.dropped, 4000)]  # the newest
    assert "dropped the oldest" in caplog.text
    s.close()


def test_a_torn_last_record_is_cut_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "spool"
    s = Spool.open(d, max_bytes=BIG)
    fill(s, 10)
    s.close()
    seg = d / segments(d)[0]
    with seg.open("r+b") as f:
        f.truncate(seg.stat().st_size - 3)  # a crash in the middle of the last write
    s = Spool.open(d, max_bytes=BIG)
    assert payloads(s.read(100)) == [b"m%06d" % i for i in range(9)]
    assert "cut short" in caplog.text
    fill(s, 1, start=100)
    got = s.read(10)
    assert [r.payload for r in got] == [b"m000100"]
    assert got[0].id >= 9
    s.close()
    s = Spool.open(d, max_bytes=BIG)
    assert s.corrupt == 0
    assert len(s.read(100)) == 10
    s.close()


def corrupt_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_damaged_middle_segment_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "spool"
    s = Spool.open(d, max_bytes=BIG, segment_bytes=1024)
    for k in range(12):
        fill(s, 20, start=20 * k)
        s.flush()
    s.close()
    names = segments(d)
    assert len(names) >= 3
    bad = d / names[1]
    first_bad = spoolfile.segment_id(bad)
    last_bad = spoolfile.segment_id(d / names[2])
    assert first_bad is not None and last_bad is not None
    corrupt_byte(bad, 200)
    s = Spool.open(d, max_bytes=BIG, segment_bytes=1024)
    assert s.corrupt == 1
    assert (d / (names[1] + ".corrupt")).exists()
    assert "is damaged" in caplog.text
    expected = [i for i in range(240) if not first_bad <= i < last_bad]
    assert s.messages == len(expected)
    got = s.read(1000)
    assert [r.id for r in got] == expected
    assert payloads(got) == [b"m%06d" % i for i in expected]
    for r in got:  # acking everything steps over the ids that went with the damaged segment
        s.ack(r.id)
    assert s.messages == 0
    s.close()
    assert (d / "commit").read_text() == "240\n"


def test_a_damaged_record_in_the_last_segment_cuts_it_there(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "spool"
    s = Spool.open(d, max_bytes=BIG)
    fill(s, 10)
    s.flush()
    size_10 = s.bytes
    fill(s, 10, start=10)
    s.close()
    corrupt_byte(d / segments(d)[0], size_10 + 30)  # a power cut: a page never written
    s = Spool.open(d, max_bytes=BIG)
    got = s.read(100)
    assert len(got) == 10
    assert payloads(got) == [b"m%06d" % i for i in range(len(got))]
    assert s.corrupt == 0
    assert "cut off" in caplog.text
    s.close()


def test_garbage_and_a_damaged_commit_file_do_not_stop_the_start(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    d.mkdir(mode=0o700)
    (d / spoolfile.segment_name(0)).write_bytes(b"not a spool segment at all")
    (d / "commit").write_bytes(b"\xff\xfe")
    (d / "notes.txt").write_text("left alone")
    s = Spool.open(d, max_bytes=BIG)
    assert s.messages == 0
    assert s.corrupt == 1  # set aside, not cut to nothing
    assert (d / (spoolfile.segment_name(0) + ".corrupt")).exists()
    fill(s, 2)
    assert [r.id for r in s.read(5)] == [1, 2]
    s.close()
    assert (d / "notes.txt").exists()


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_keeps_relaying_counts_and_logs_once_per_episode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with tiny_tmpfs(tmp_path / "fs", "256k") as fs:
        s = Spool.open(fs / "spool", max_bytes=BIG, segment_bytes=64 * 1024)
        filler = fs / "filler"
        with filler.open("wb") as f:  # leave about 20 KiB
            with contextlib.suppress(OSError):
                f.write(b"\0" * (256 - 20) * 1024)
        sent = 0
        while not s.write_errors:
            fill(s, 50, start=sent)
            sent += 50
            s.flush()
            got = s.read(1000)  # relaying goes on, from memory once the disk is full
            for r in got:
                s.ack(r.id)
            assert sent < 100_000
        for _ in range(20):  # still full: more errors, no more log lines
            fill(s, 50, start=sent)
            sent += 50
            s.flush()
            assert payloads(s.read(1000)) == [b"m%06d" % i for i in range(sent - 50, sent)]
        assert s.write_errors > 10
        assert s.dropped == 0
        assert caplog.text.count("cannot write") == 1
        assert "Traceback" not in caplog.text
        filler.unlink()
        fill(s, 50, start=sent)
        s.flush()
        assert caplog.text.count("writing works again") == 1
        s.close()
        s = Spool.open(fs / "spool", max_bytes=BIG)
        got = s.read(10_000)
        assert [r.payload for r in got][-50:] == [b"m%06d" % i for i in range(sent, sent + 50)]
        s.close()


def test_an_io_error_keeps_unacked_messages_in_memory_within_a_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(spool_mod, "MEMORY_BYTES", 4096)
    s = Spool.open(tmp_path / "spool", max_bytes=BIG)
    fill(s, 3)
    s.flush()
    real_write = os.write

    def failing_write(fd: int, data: bytes) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "write", failing_write)
    fill(s, 500, start=3)  # about 20 bytes each: most do not fit in 4 KiB
    s.flush()
    assert s.dropped > 300
    kept = s.messages
    assert kept + s.dropped == 503
    monkeypatch.setattr(os, "write", real_write)
    s.flush()
    s.close()
    s = Spool.open(tmp_path / "spool", max_bytes=BIG)
    got = s.read(1000)
    assert len(got) == kept
    assert [r.id for r in got] == sorted(r.id for r in got)
    assert caplog.text.count("cannot write") == 1
    s.close()


def test_sync_runs_in_a_thread_while_appends_go_on(tmp_path: Path) -> None:
    d = tmp_path / "spool"

    async def main() -> None:
        s = Spool.open(d, max_bytes=BIG, segment_bytes=64 * 1024)
        stop = asyncio.Event()

        async def syncer() -> None:
            while not stop.is_set():
                await s.sync()

        task = asyncio.create_task(syncer())
        for k in range(200):
            fill(s, 50, start=50 * k)
            s.flush()
            for r in s.read(40):
                s.ack(r.id)
            await asyncio.sleep(0)
        stop.set()
        await task
        await s.sync()
        assert s.write_errors == 0
        s.close()

    asyncio.run(main())
    s = Spool.open(d, max_bytes=BIG)
    got = s.read(100_000)
    assert payloads(got)[-1] == b"m%06d" % 9999
    assert [r.id for r in got] == sorted(r.id for r in got)
    assert len(got) == s.messages
    s.close()


@pytest.mark.parametrize("level", [logging.INFO])
def test_a_restart_with_waiting_messages_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, level: int
) -> None:
    caplog.set_level(level)
    d = tmp_path / "spool"
    s = Spool.open(d, max_bytes=BIG)
    fill(s, 4)
    s.close()
    Spool.open(d, max_bytes=BIG).close()
    assert "4 messages" in caplog.text


def test_a_record_bigger_than_a_read_chunk_comes_back_from_disk(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    s = Spool.open(d, max_bytes=BIG)
    big = os.urandom(3 * 1024 * 1024 + 7)
    s.append("a", b"small")
    s.append("b", big)
    s.append("c", b"after")
    s.close()
    s = Spool.open(d, max_bytes=BIG)
    got = s.read(10)
    assert [(r.topic, r.payload) for r in got] == [("a", b"small"), ("b", big), ("c", b"after")]
    s.close()


def test_a_failing_sync_is_counted_and_logged_once_per_episode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = Spool.open(tmp_path / "spool", max_bytes=BIG)
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    async def syncs(n: int) -> None:
        for _ in range(n):
            fill(s, 2)
            s.flush()
            await s.sync()

    monkeypatch.setattr(os, "fdatasync", failing)
    asyncio.run(syncs(3))
    assert s.write_errors == 3
    assert caplog.text.count("cannot sync (input/output error)") == 1
    monkeypatch.setattr(os, "fdatasync", real)
    asyncio.run(syncs(2))
    assert s.write_errors == 3
    assert caplog.text.count("syncing works again") == 1
    s.close()


def test_segments_acked_before_a_crash_are_deleted_at_open(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    s = Spool.open(d, max_bytes=BIG, segment_bytes=200)
    for k in range(5):
        fill(s, 5, start=5 * k)
        s.flush()
    s.close()
    assert len(segments(d)) == 5
    (d / "commit").write_text("12\n")  # committed, but killed before the segments went
    s = Spool.open(d, max_bytes=BIG, segment_bytes=200)
    assert len(segments(d)) == 3
    assert s.messages == 13
    assert [r.id for r in s.read(100)] == list(range(12, 25))
    s.close()


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda rec: b"\xff\xff\xff\x7f" + rec[4:], "bad record length"),
        (lambda rec: rec[:-1], "cut short"),
    ],
)
def test_scan_and_decode_name_the_damage(damage: object, problem: str) -> None:
    good = spoolfile.encode(1, b"t", b"payload")
    assert callable(damage)
    bad = damage(good)
    data = spoolfile.MAGIC + good + bad
    s = spoolfile.scan(data, 1)
    assert s.count == 1
    assert s.good_end == len(spoolfile.MAGIC) + len(good)
    assert s.problem is not None and problem in s.problem
    got = spoolfile.decode(data, s.good_end)
    assert isinstance(got, str)


def test_scan_refuses_ids_out_of_order_and_bad_topic_lengths() -> None:
    a, b = spoolfile.encode(5, b"t", b"x"), spoolfile.encode(5, b"t", b"y")
    s = spoolfile.scan(spoolfile.MAGIC + a + b, 5)
    at = len(spoolfile.MAGIC) + len(a)
    assert (s.count, s.problem) == (1, f"record id 5 out of order at offset {at}")
    body = struct.pack("<QH", 6, 500) + b"t"
    bad = struct.pack("<II", len(body), zlib.crc32(body)) + body
    s = spoolfile.scan(spoolfile.MAGIC + a + bad, 5)
    assert s.count == 1
    assert s.problem is not None and "bad topic length 500" in s.problem
    assert spoolfile.decode(bad, 0) == "bad topic length 500"
    assert spoolfile.scan(b"RDSP", 0).torn
    assert spoolfile.scan(b"JUNK", 0).problem == "not a spool segment"


def test_dropping_segments_forgets_their_out_of_order_acks(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    s = Spool.open(d, max_bytes=16 * 1024, segment_bytes=2048)
    fill(s, 50)
    s.flush()
    s.read(50)
    for i in (3, 7, 40):  # out of order: 0 is still in flight
        s.ack(i)
    assert s.messages == 47
    for k in range(1, 40):
        fill(s, 50, start=50 * k)
        s.flush()
    assert s.dropped > 50
    assert s.messages + s.dropped + 3 == 2000
    s.ack(3)  # an ack for a dropped record is no-op
    assert s.messages + s.dropped + 3 == 2000
    s.rewind()
    got = s.read(10_000)
    assert len(got) == s.messages
    assert payloads(got) == [b"m%06d" % i for i in range(2000 - len(got), 2000)]
    s.close()
