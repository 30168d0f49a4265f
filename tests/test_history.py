"""History and recovery: the per-port ring, ``?last`` and ``?since`` on the real daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from relayd.history import ENTRY_OVERHEAD, History, Replay, Ring
from relayd.hub import REPLAY_CHUNK, Source
from relayd.ws import Closed, Query, parse_query
from tests.helpers import (
    MS,
    THOROUGH,
    WS_HANDSHAKE,
    Daemon,
    NotifySocket,
    RawWebSocket,
    config_text,
    free_port,
    recv,
    run_daemon,
    send_device,
    wait_until,
    write_config,
)
from tests.test_hub import FakeSink, make_hub, next_iteration, payloads

pytestmark = pytest.mark.anyio

SRC = Source(8001, "scale-1", "192.0.2.7:51234")
META = (0.0, SRC)


# --- the ring, without sockets ------------------------------------------------------


def kept(ring: Ring) -> list[tuple[int, bytes]]:
    return [(seq, m) for seq, m, _ in ring.after(0)]


def test_ring_numbers_every_message_and_evicts_by_count() -> None:
    ring = Ring(limit=3, max_bytes=1 << 20)
    ring.add([b"a", b"b"], META)
    ring.add([b"c", b"d", b"e"], META)
    assert ring.seq == 5
    assert kept(ring) == [(3, b"c"), (4, b"d"), (5, b"e")]
    assert ring.first_seq == 3
    assert ring.nbytes == 3 * (1 + ENTRY_OVERHEAD)
    assert [seq for seq, _, _ in ring.after(3)] == [4, 5]
    assert list(ring.after(5)) == []


def test_ring_evicts_by_bytes_and_counts_its_overhead() -> None:
    size = 100 + ENTRY_OVERHEAD
    ring = Ring(limit=1000, max_bytes=3 * size)
    ring.add([b"x" * 100] * 5, META)
    assert [seq for seq, _ in kept(ring)] == [3, 4, 5]
    assert ring.nbytes == 3 * size
    ring.add([b"y" * 1000], META)  # larger than the whole budget: nothing is kept
    assert (len(ring), ring.nbytes, ring.seq, ring.first_seq) == (0, 0, 6, 7)


def test_ring_off_still_numbers_and_shrinks_on_configure() -> None:
    ring = Ring(limit=0, max_bytes=1 << 20)
    ring.add([b"a", b"b"], META)
    assert (ring.seq, len(ring), ring.first_seq) == (2, 0, 3)
    ring.configure(10, 1 << 20)
    ring.add([b"c", b"d", b"e"], META)
    ring.configure(1, 1 << 20)
    assert kept(ring) == [(5, b"e")]


def test_history_drop_forgets_messages_and_keeps_numbering() -> None:
    history = History("e", 10, 1 << 20)
    history.ring(8001).add([b"a", b"b"], META)
    history.ring(8002).add([b"z"], META)
    assert history.nbytes == {8001: 2 * (1 + ENTRY_OVERHEAD), 8002: 1 + ENTRY_OVERHEAD}
    history.drop(8001)
    assert 8001 not in history.rings
    assert history.peek(8001).seq == 2 and 8001 not in history.rings  # peek keeps nothing
    history.ring(8001).add([b"c"], META)
    assert kept(history.rings[8001]) == [(3, b"c")]


async def test_replay_is_queued_ahead_of_live_and_keeps_the_slow_client_policy() -> None:
    hub = make_hub(queue_size=3, epoch="E", history=100, history_max_bytes=1 << 20)
    hub.publish(SRC, [b"1", b"2", b"3", b"4", b"5"])
    sink = FakeSink()
    sub = hub.subscribe(sink, None, False)
    hub.replay(sub, Replay(last=2))
    hub.publish(SRC, [b"6"])
    await next_iteration()
    assert payloads(sink.frames) == [b"4", b"5", b"6"]
    # A paused (slow) client: its replay waits, its live frames are bounded by queue_size.
    slow = FakeSink()
    sub = hub.subscribe(slow, None, False)
    sub.pause()
    hub.replay(sub, Replay(last=100))
    hub.publish(SRC, [b"7", b"8", b"9", b"10", b"11"])
    await next_iteration()
    assert slow.frames == []
    sub.resume()
    await next_iteration()
    assert payloads(slow.frames) == [b"%d" % i for i in (1, 2, 3, 4, 5, 6, 9, 10, 11)]
    assert sub.dropped == 2


async def test_a_long_replay_goes_a_chunk_per_iteration() -> None:
    hub = make_hub(queue_size=10_000, epoch="E", history=10_000, history_max_bytes=1 << 30)
    hub.publish(SRC, [b"%d" % i for i in range(1, 1001)])
    sink = FakeSink()
    sub = hub.subscribe(sink, None, True)
    hub.replay(sub, Replay(last=1000))
    hub.publish(SRC, [b"live"])
    await asyncio.sleep(0)
    assert len(sink.frames) == REPLAY_CHUNK  # the rest waits for the next iterations
    for _ in range(4):  # three more chunks, then the live frame
        await asyncio.sleep(0)
    got = [json.loads(p) for p in payloads(sink.frames)]
    assert [e["seq"] for e in got] == list(range(1, 1002))
    assert got[-1]["data"] == "live"
    assert sink.writes == 5  # four chunks of replay, then the live frame


async def test_replayed_envelopes_are_the_live_ones() -> None:
    hub = make_hub(epoch="E", history=100, history_max_bytes=1 << 20)
    live = FakeSink()
    hub.subscribe(live, None, True)
    hub.publish(SRC, [b"a", b"\xff"])
    hub.publish(Source(8001, "scale-1", "192.0.2.8:1"), [b"b"])
    late = FakeSink()
    hub.replay(hub.subscribe(late, [8001], True), Replay(last=3))
    await next_iteration()
    assert payloads(late.frames) == payloads(live.frames)
    envelopes = [json.loads(p) for p in payloads(live.frames)]
    assert [(e["seq"], e["epoch"], e["peer"]) for e in envelopes] == [
        (1, "E", "192.0.2.7:51234"),
        (2, "E", "192.0.2.7:51234"),
        (3, "E", "192.0.2.8:1"),
    ]


# --- the query ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("last=-1", "is not a count"),
        ("last=ten", "is not a count"),
        ("last=", "is not a count"),
        ("last=1" + "0" * 18, "is not a count"),
        ("last=1&last=2", "last given twice"),
        ("since=8001:E:1", "since needs format=json"),
        ("format=json&since=8001:E", "is not PORT:EPOCH:SEQ"),
        ("format=json&since=8001::3", "is not PORT:EPOCH:SEQ"),
        ("format=json&since=8001:E:-3", "is not PORT:EPOCH:SEQ"),
        ("format=json&since=x:E:3", "is not PORT:EPOCH:SEQ"),
        ("format=json&since=8001:" + "e" * 65 + ":3", "is not PORT:EPOCH:SEQ"),
        ("format=json&since=9:E:3", "since: unknown port 9"),
        ("format=json&port=8002&since=8001:E:3", "port 8001 is not subscribed"),
        ("format=json&since=8001:E:3&since=8001:F:4", "since given twice for port 8001"),
    ],
)
def test_bad_history_queries_close_with_1008(query: str, reason: str) -> None:
    parsed = parse_query(query, {8001, 8002})
    assert isinstance(parsed, Closed)
    assert parsed.code == 1008
    assert reason in parsed.reason


def test_history_query() -> None:
    parsed = parse_query("format=json&port=8001&port=8002&since=8002:E:7&last=99", {8001, 8002})
    assert parsed == Query([8001, 8002], True, Replay(99, ((8002, "E", 7),)))


# --- the real daemon ------------------------------------------------------------------

HISTORY = "[relay]\nhistory = {n}\nhistory_max_bytes = {nbytes}\nqueue_size = 1000000\n"


@contextlib.asynccontextmanager
async def history_daemon(
    tmp_path: Path, notify: NotifySocket, n: int = 1000, nbytes: int = 1 << 20
) -> AsyncIterator[Daemon]:
    async with run_daemon(tmp_path, notify, extra=HISTORY.format(n=n, nbytes=nbytes)) as d:
        yield d


async def relayed(d: Daemon, port: int, seq: int) -> None:
    """Wait until ``port`` has numbered ``seq`` messages."""
    await wait_until(lambda: d.runtime.hub.history.peek(port).seq >= seq)


async def envelopes(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    return [json.loads(m) for m in await recv(ws, n)]


async def closed_with(ws: ClientConnection) -> tuple[int | None, str]:
    async with asyncio.timeout(5_000 * MS):
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.recv()
    return ws.close_code, ws.close_reason or ""


async def test_reconnect_with_since_misses_nothing(tmp_path: Path, notify: NotifySocket) -> None:
    async with history_daemon(tmp_path, notify) as d:
        port, other = d.ports
        url = f"{d.ws_url}?format=json&port={port}"
        async with connect(url) as ws:
            await send_device(port, b"1\n2\n")
            first = await envelopes(ws, 2)
        assert [(e["seq"], e["data"]) for e in first] == [(1, "1"), (2, "2")]
        epoch = first[-1]["epoch"]
        assert epoch == d.runtime.epoch and re.fullmatch(r"[0-9a-f]{16}", epoch)
        await send_device(port, b"3\n4\n")  # while the client is away
        await send_device(other, b"elsewhere\n")
        await relayed(d, port, 4)
        async with connect(f"{url}&since={port}:{epoch}:2") as ws:
            assert await envelopes(ws, 1) == [{"port": port, "recovered": True}]
            await send_device(port, b"5\n")
            again = await envelopes(ws, 3)
        assert [(e["seq"], e["data"]) for e in again] == [(3, "3"), (4, "4"), (5, "5")]
        # Up to date: recovered, nothing replayed, then live.
        async with connect(f"{url}&since={port}:{epoch}:5") as ws:
            assert await envelopes(ws, 1) == [{"port": port, "recovered": True}]
            await send_device(port, b"6\n")
            assert [e["seq"] for e in await envelopes(ws, 1)] == [6]
        # Another epoch (a restart): not recovered, and everything kept is replayed.
        async with connect(f"{d.ws_url}?format=json&since={port}:0123456789abcdef:5") as ws:
            assert await envelopes(ws, 1) == [
                {"port": port, "recovered": False, "epoch": epoch, "first_seq": 1}
            ]
            assert [e["data"] for e in await envelopes(ws, 6)] == ["1", "2", "3", "4", "5", "6"]


async def test_evicted_messages_are_not_recovered(tmp_path: Path, notify: NotifySocket) -> None:
    async with history_daemon(tmp_path, notify, n=3) as d:
        port = d.ports[0]
        await send_device(port, b"".join(b"%d\n" % i for i in range(1, 11)))
        await relayed(d, port, 10)
        epoch = d.runtime.epoch
        async with connect(f"{d.ws_url}?format=json&since={port}:{epoch}:2") as ws:
            assert await envelopes(ws, 1) == [
                {"port": port, "recovered": False, "epoch": epoch, "first_seq": 8}
            ]
            assert [(e["seq"], e["data"]) for e in await envelopes(ws, 3)] == [
                (8, "8"),
                (9, "9"),
                (10, "10"),
            ]
        async with connect(f"{d.ws_url}?format=json&since={port}:{epoch}:7") as ws:
            assert await envelopes(ws, 1) == [{"port": port, "recovered": True}]
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"{d.url}/metrics")).text
        assert f'relayd_history_bytes{{port="{port}"}} {3 * (1 + ENTRY_OVERHEAD) + 1}.0' in text


async def test_last_in_both_formats(tmp_path: Path, notify: NotifySocket) -> None:
    async with history_daemon(tmp_path, notify, n=5) as d:
        a, b = d.ports
        await send_device(a, b"".join(b"a%d\n" % i for i in range(1, 8)))
        await send_device(b, b"b1\n\xff\n")
        await relayed(d, a, 7)
        await relayed(d, b, 2)
        async with connect(f"{d.ws_url}?port={a}&last=2") as ws:
            assert await recv(ws, 2) == ["a6", "a7"]
            await send_device(a, b"a8\n")
            assert await recv(ws) == ["a8"]
        # N above what is kept gives what is kept; every port, oldest first within each.
        async with connect(f"{d.ws_url}?format=json&last=1000000") as ws:
            got = await envelopes(ws, 7)
        by_port = {p: [(e["seq"], e.get("data", e.get("data_b64"))) for e in got if e["port"] == p]
                   for p in (a, b)}  # fmt: skip
        assert by_port[a] == [(4, "a4"), (5, "a5"), (6, "a6"), (7, "a7"), (8, "a8")]
        assert by_port[b] == [(1, "b1"), (2, "/w==")]
        async with connect(f"{d.ws_url}?last=0&port={b}") as ws:
            await send_device(b, b"live\n")
            assert await recv(ws) == ["live"]


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("last=-5", "is not a count"),
        ("since={a}:E:1", "since needs format=json"),
        ("format=json&since={a}:E", "is not PORT:EPOCH:SEQ"),
        ("format=json&port={b}&since={a}:E:1", "is not subscribed"),
        ("format=json&since=1:E:1", "unknown port 1"),
        ("format=json&since={a}:E:1&since={a}:E:2", "given twice"),
    ],
)
async def test_bad_input_closes_1008(shared_daemon: Daemon, query: str, reason: str) -> None:
    d = shared_daemon
    a, b = d.ports
    async with connect(f"{d.ws_url}?{query.format(a=a, b=b)}") as ws:
        code, why = await closed_with(ws)
    assert code == 1008 and reason in why


async def test_reload_keeps_history_and_removing_drops_it(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with history_daemon(tmp_path, notify) as d, d.admin() as admin:
        a, b = d.ports
        epoch = d.runtime.epoch
        await send_device(a, b"a1\na2\n")
        await send_device(b, b"b1\n")
        await relayed(d, a, 2)
        await relayed(d, b, 1)
        # Port a's settings change, port b leaves the config.
        cfg = config_text(
            d.http_port,
            [a],
            extra=HISTORY.format(n=1000, nbytes=1 << 20),
            port_extra="keepalive = false",
        )
        write_config(d.config, cfg)
        report = (await admin.post("/v1/reload")).json()
        assert (report["changed"], report["removed"]) == ([a], [b])
        assert d.runtime.epoch == epoch
        async with connect(f"{d.ws_url}?format=json&since={a}:{epoch}:0") as ws:
            assert await envelopes(ws, 1) == [{"port": a, "recovered": True}]
            assert [e["data"] for e in await envelopes(ws, 2)] == ["a1", "a2"]
        assert b not in d.runtime.hub.history.rings
        # Removed at runtime, then added again: no history, numbering goes on.
        assert (await admin.delete(f"/v1/ports/{a}")).status_code == 200
        assert a not in d.runtime.hub.history.rings
        r = await admin.post("/v1/ports", json={"port": a, "host": "127.0.0.1"})
        assert r.status_code == 201, r.text
        async with connect(f"{d.ws_url}?format=json&since={a}:{epoch}:1") as ws:
            assert await envelopes(ws, 1) == [
                {"port": a, "recovered": False, "epoch": epoch, "first_seq": 3}
            ]
            await send_device(a, b"a3\n")
            assert [(e["seq"], e["data"]) for e in await envelopes(ws, 1)] == [(3, "a3")]
        # A port that is new to this daemon starts at 1.
        fresh = free_port()
        r = await admin.post("/v1/ports", json={"port": fresh, "host": "127.0.0.1"})
        assert r.status_code == 201, r.text
        async with connect(f"{d.ws_url}?format=json&port={fresh}&last=5") as ws:
            await send_device(fresh, b"f\n")
            assert [e["seq"] for e in await envelopes(ws, 1)] == [1]


# --- the seam under a device streaming at full speed -----------------------------------


async def frames(d: Daemon, query: str, n: int) -> list[str]:
    """The first ``n`` text frames of ``/ws?query``; then the connection is dropped.

    Dropped, not closed: a closing handshake would wait behind the live frames
    already on their way, which a device at full speed makes plenty.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", d.http_port)
    try:
        writer.write(WS_HANDSHAKE.replace(b"GET /ws ", f"GET /ws?{query} ".encode()))
        async with asyncio.timeout(10_000 * MS):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            ws = RawWebSocket(reader, writer)
            out = []
            for _ in range(n):
                opcode, payload = await ws.frame()
                assert opcode == 1
                out.append(payload.decode())
            return out
    finally:
        writer.transport.abort()


async def stream(port: int, sent: list[int], stop: asyncio.Event) -> None:
    """Send numbered lines as fast as the socket takes them until ``stop``."""
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        n = 0
        while not stop.is_set():
            await loop.sock_sendall(sock, b"".join(b"%d\n" % i for i in range(n + 1, n + 101)))
            n += 100
            sent[0] = n


@pytest.mark.xdist_group("heavy")  # a flood or a timed wait: one at a time
async def test_no_gap_and_no_duplicate_at_the_seam_under_full_speed(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with history_daemon(tmp_path, notify, n=20_000, nbytes=4 << 20) as d:
        port = d.ports[0]
        sent = [0]
        stop = asyncio.Event()
        device = asyncio.create_task(stream(port, sent, stop))
        try:
            await relayed(d, port, 500)
            # A chain of reconnects with since: each sees the messages after the last
            # one it saw, or (evicted meanwhile) from the oldest kept; never one twice.
            seen: list[int] = []
            epoch = d.runtime.epoch
            query = f"format=json&port={port}&last=50"
            for _ in range(4 if THOROUGH else 2):  # a full-speed stream costs CPU
                got = [json.loads(f) for f in await frames(d, query, 200)]
                if seen:
                    status = got.pop(0)
                    if status["recovered"]:
                        assert status == {"port": port, "recovered": True}
                        assert got[0]["seq"] == seen[-1] + 1
                    else:
                        assert got[0]["seq"] == status["first_seq"] > seen[-1] + 1
                numbers = [int(e["data"]) for e in got]
                assert numbers == [e["seq"] for e in got]  # the device's count is relayd's
                assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
                seen += numbers
                query = f"format=json&port={port}&since={port}:{epoch}:{seen[-1]}"
            # The bare format with last: consecutive numbers, no duplicate.
            for _ in range(3 if THOROUGH else 1):
                bare = [int(m) for m in await frames(d, f"port={port}&last=100", 300)]
                assert bare == list(range(bare[0], bare[0] + 300))
            assert not device.done()  # the device was streaming all along
            assert d.runtime.hub.history.peek(port).seq > seen[-1]
        finally:
            stop.set()
            async with asyncio.timeout(5_000 * MS):
                await device


@pytest.mark.parametrize("size", [10, 100, 1000])
async def test_the_memory_a_history_holds_stays_within_history_max_bytes(size: int) -> None:
    """What Python really holds for a port's kept messages (tracemalloc), small or large."""
    import gc
    import tracemalloc

    from relayd.hub import Hub

    def history_hub(max_bytes: int) -> Hub:
        return Hub(
            queue_size=16, slow_client="drop", max_clients=1, epoch="e",
            history=1_000_000, history_max_bytes=max_bytes,
        )  # fmt: skip

    source = Source(8001, "dev", "127.0.0.1:1")
    max_bytes = 64 * 1024
    hub = history_hub(max_bytes)
    count = 4 * max_bytes // size + 100  # far more than fits: the bytes limit binds
    # Only what relayd's code and this test's messages allocate counts, not what a
    # tracer (coverage) or asyncio's debug mode keep in their own files meanwhile.
    import relayd

    ours = [
        tracemalloc.Filter(True, str(Path(relayd.__file__).parent / "*")),
        tracemalloc.Filter(True, __file__),
    ]
    gc.collect()
    tracemalloc.start()
    try:
        # The same path once on a small history first, evictions included, so that
        # what the interpreter sets up for code run the first time is not counted.
        warm = history_hub(1024)
        for i in range(2 * 1024 // size + 10):
            warm.publish(source, [i.to_bytes(8, "big") * (size // 8) or b"x"])
        del warm
        gc.collect()
        before = tracemalloc.take_snapshot().filter_traces(ours)
        for i in range(count):  # one message per read: a (time, source) tuple each
            hub.publish(source, [i.to_bytes(8, "big") * (size // 8) or b"x"])
        await asyncio.sleep(0)
        gc.collect()
        after = tracemalloc.take_snapshot().filter_traces(ours)
    finally:
        tracemalloc.stop()
    diff = after.compare_to(before, "lineno")
    held = sum(stat.size_diff for stat in diff)
    top = "; ".join(str(stat) for stat in diff[:4])
    assert hub.history.rings[8001].nbytes <= max_bytes
    assert held <= 1.1 * max_bytes, f"{held} bytes held for {max_bytes}: {top}"
