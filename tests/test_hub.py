"""The hub without sockets: encoding once, per-client queues, overflow policies."""

from __future__ import annotations

import asyncio
import json

import pytest

from relayd.hub import (
    FLUSH_CHUNK,
    FLUSH_INTERVAL,
    OP_BINARY,
    OP_TEXT,
    Hub,
    HubFull,
    Source,
    encode_frame,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.anyio


class FakeSink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.writes = 0
        self.closed: tuple[int, str] | None = None
        self.aborted = False

    def send_frames(self, frames: list[bytes]) -> None:
        self.writes += 1
        self.frames.extend(frames)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def abort(self) -> None:
        self.aborted = True


def payloads(frames: list[bytes]) -> list[bytes]:
    out = []
    for frame in frames:
        n = frame[1] & 0x7F
        offset = 2 if n < 126 else 4 if n == 126 else 10
        out.append(frame[offset:])
    return out


async def next_iteration() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def make_hub(**kwargs: object) -> Hub:
    """A hub that starts a pass in every loop iteration (the FLUSH_INTERVAL tests set one)."""
    options: dict[str, object] = {
        "queue_size": 4,
        "slow_client": "drop",
        "max_clients": 10,
        "flush_interval": 0.0,
    }
    options.update(kwargs)
    return Hub(**options)  # type: ignore[arg-type]


SRC = Source(8001, "scale-1", "192.0.2.7:51234")


def test_encode_frame_lengths() -> None:
    assert encode_frame(b"hi", OP_TEXT) == b"\x81\x02hi"
    assert encode_frame(b"x" * 126, OP_BINARY)[:4] == b"\x82\x7e\x00\x7e"
    assert encode_frame(b"x" * 70000, OP_TEXT)[:10] == b"\x81\x7f" + (70000).to_bytes(8, "big")


async def test_publish_encodes_once_and_batches_per_iteration() -> None:
    hub = make_hub()
    a, b = FakeSink(), FakeSink()
    hub.subscribe(a, None, False)
    hub.subscribe(b, None, False)
    hub.publish(SRC, [b"one", b"two"], all_text=True)
    hub.publish(SRC, [b"three"])
    assert a.frames == []  # nothing is written synchronously
    await next_iteration()
    assert payloads(a.frames) == [b"one", b"two", b"three"]
    assert a.writes == 1  # one transport write per client per loop iteration
    assert a.frames[0] is b.frames[0]  # the same bytes object for every client
    assert hub.messages_sent == 6


async def test_a_message_after_a_quiet_spell_goes_out_in_its_own_iteration() -> None:
    hub = make_hub(flush_interval=FLUSH_INTERVAL)
    sink = FakeSink()
    hub.subscribe(sink, None, False)
    hub.publish(SRC, [b"first"], all_text=True)
    await next_iteration()
    assert payloads(sink.frames) == [b"first"]


async def test_messages_that_come_faster_than_the_interval_go_together() -> None:
    """A busy port: one write per client per interval, whatever the message rate."""
    interval = 0.05  # long enough that the loop's iterations cannot reach it by chance
    hub = make_hub(flush_interval=interval, max_clients=2)
    a, b = FakeSink(), FakeSink()
    hub.subscribe(a, None, False)
    hub.subscribe(b, None, False)
    loop = asyncio.get_running_loop()
    hub.publish(SRC, [b"0"], all_text=True)
    await next_iteration()
    first = loop.time()
    assert a.writes == b.writes == 1
    for i in range(1, 6):
        hub.publish(SRC, [str(i).encode()], all_text=True)
        await next_iteration()
    assert a.writes == b.writes == 1  # the others wait for the rest of the interval ...
    await wait_until(lambda: a.writes == 2 and b.writes == 2)
    assert loop.time() - first >= interval * 0.9  # (the loop's clock resolution)
    for sink in (a, b):  # ... then go in one write each, in order
        assert payloads(sink.frames) == [str(i).encode() for i in range(6)]
    assert hub.messages_sent == 12


async def test_close_does_not_wait_for_the_interval() -> None:
    hub = make_hub(flush_interval=3600.0)
    sink = FakeSink()
    hub.subscribe(sink, None, False)
    hub.publish(SRC, [b"a"], all_text=True)
    await next_iteration()
    hub.publish(SRC, [b"b"], all_text=True)
    await next_iteration()
    assert payloads(sink.frames) == [b"a"]
    await hub.close(0.0)
    assert payloads(sink.frames) == [b"a", b"b"]
    assert sink.closed == (1001, "relayd is stopping")


async def test_a_long_pass_takes_in_what_arrives_while_it_writes() -> None:
    """Thousands of clients: FLUSH_CHUNK per loop iteration. A message published
    between two chunks goes out with this pass to the clients it has not reached,
    and in the next pass to the others; each client still gets one write per pass."""
    n = FLUSH_CHUNK * 2 + 10
    hub = make_hub(max_clients=n)
    sinks = [FakeSink() for _ in range(n)]
    for sink in sinks:
        hub.subscribe(sink, None, False)
    hub.publish(SRC, [b"one"], all_text=True)
    await asyncio.sleep(0)  # publish's flush: the first chunk
    written = [s for s in sinks if s.writes]
    assert len(written) == FLUSH_CHUNK
    hub.publish(SRC, [b"two"], all_text=True)
    await wait_until(lambda: all(payloads(s.frames) == [b"one", b"two"] for s in sinks))
    reached = [s for s in sinks if s.writes == 2]
    assert reached == written  # [one], then [two] in the next pass
    assert all(s.writes == 1 for s in sinks if s not in written)  # [one, two] in one write
    assert hub.messages_sent == 2 * n
    await next_iteration()
    assert not hub._pass and not hub._dirty and hub._flush_handle is None


async def test_close_writes_the_rest_of_a_pass_under_way() -> None:
    n = FLUSH_CHUNK + 5
    hub = make_hub(max_clients=n)
    sinks = [FakeSink() for _ in range(n)]
    for sink in sinks:
        hub.subscribe(sink, None, False)
    hub.publish(SRC, [b"last"], all_text=True)
    await asyncio.sleep(0)
    assert sum(1 for s in sinks if s.writes) == FLUSH_CHUNK
    await hub.close(0.0)
    assert all(
        payloads(s.frames) == [b"last"] and s.closed == (1001, "relayd is stopping") for s in sinks
    )


async def test_text_and_binary_opcodes() -> None:
    hub = make_hub()
    sink = FakeSink()
    hub.subscribe(sink, None, False)
    hub.publish(SRC, ["héllo".encode(), b"\xff\x00"])
    await next_iteration()
    assert [f[0] & 0x0F for f in sink.frames] == [OP_TEXT, OP_BINARY]


async def test_port_filter() -> None:
    hub = make_hub()
    only_8002, every = FakeSink(), FakeSink()
    hub.subscribe(only_8002, [8002], False)
    hub.subscribe(every, None, False)
    hub.publish(SRC, [b"a"])
    hub.publish(Source(8002, None, "x:1"), [b"b"])
    await next_iteration()
    assert payloads(only_8002.frames) == [b"b"]
    assert payloads(every.frames) == [b"a", b"b"]


async def test_json_envelopes() -> None:
    hub = make_hub()
    sink = FakeSink()
    hub.subscribe(sink, None, True)
    hub.publish(SRC, [b'say "hi"', b"\xff"])
    await next_iteration()
    text, binary = (json.loads(p) for p in payloads(sink.frames))
    assert text["data"] == 'say "hi"'
    assert (text["port"], text["name"], text["peer"]) == (8001, "scale-1", "192.0.2.7:51234")
    assert text["ts"].endswith("Z")
    assert binary["data_b64"] == "/w=="
    assert "data" not in binary


async def test_paused_client_is_bounded_and_drops_oldest_alone() -> None:
    hub = make_hub(queue_size=4)
    slow, healthy = FakeSink(), FakeSink()
    slow_sub = hub.subscribe(slow, None, False)
    hub.subscribe(healthy, None, False)
    slow_sub.pause()
    for i in range(10):
        hub.publish(SRC, [str(i).encode()])
        await next_iteration()
    assert payloads(healthy.frames) == [str(i).encode() for i in range(10)]
    assert slow.frames == []
    assert len(slow_sub.queue) == 4
    assert slow_sub.dropped == 6
    assert hub.dropped["queue_full"] == 6
    slow_sub.resume()
    assert payloads(slow.frames) == [b"6", b"7", b"8", b"9"]


async def test_disconnect_policy_closes_slow_client_with_1008() -> None:
    hub = make_hub(queue_size=2, slow_client="disconnect")
    slow, healthy = FakeSink(), FakeSink()
    hub.subscribe(slow, None, False).pause()
    hub.subscribe(healthy, None, False)
    hub.publish(SRC, [b"1", b"2", b"3"])
    await next_iteration()
    assert slow.closed is not None and slow.closed[0] == 1008
    assert len(healthy.frames) == 3
    assert hub.dropped["slow_client_disconnected"] == 3


async def test_max_clients() -> None:
    hub = make_hub(max_clients=1)
    sub = hub.subscribe(FakeSink(), None, False)
    with pytest.raises(HubFull):
        hub.subscribe(FakeSink(), None, False)
    hub.unsubscribe(sub)
    hub.subscribe(FakeSink(), None, False)


async def test_close_flushes_paused_queues_then_closes_with_1001() -> None:
    hub = make_hub()
    sink = FakeSink()
    sub = hub.subscribe(sink, None, False)
    sub.pause()
    hub.publish(SRC, [b"last"])
    close = asyncio.create_task(hub.close(5))
    await next_iteration()
    assert payloads(sink.frames) == [b"last"]
    assert sink.closed is not None and sink.closed[0] == 1001
    hub.unsubscribe(sub)
    await asyncio.wait_for(close, 1)


async def test_close_aborts_clients_that_do_not_go() -> None:
    hub = make_hub()
    sink = FakeSink()
    hub.subscribe(sink, None, False)
    await hub.close(0.01)
    assert sink.aborted


async def test_a_batched_subscription_is_written_at_most_once_per_interval() -> None:
    """?batch_ms= (the status page): fewer writes, same messages, same order, bounded."""
    hub = make_hub(queue_size=50)
    sink, page = FakeSink(), FakeSink()
    hub.subscribe(sink, None, False)
    batched = hub.subscribe(page, None, False, batch=0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(10):
        hub.publish(SRC, [f"m{i}".encode()])
        await next_iteration()
    assert sink.writes == 10 and page.writes == 0  # the page waits ...
    await wait_until(lambda: page.writes > 0)
    assert loop.time() - started >= 0.05
    assert page.writes == 1  # ... then gets them in one write, in order
    assert payloads(page.frames) == [f"m{i}".encode() for i in range(10)]
    hub.publish(SRC, [b"x"] * 60)  # more than queue_size at once: written now, not held
    await next_iteration()
    assert page.writes == 2
    hub.publish(SRC, [b"y"])
    await next_iteration()
    assert batched.batch_timer is not None
    hub.unsubscribe(batched)
    assert batched.batch_timer is None


def test_batch_ms_in_the_query() -> None:
    from relayd.ws import Closed, parse_query

    parsed = parse_query("format=json&batch_ms=250", {8001})
    assert not isinstance(parsed, Closed) and parsed.batch == 0.25
    for bad in ("batch_ms=x", "batch_ms=-1", "batch_ms=10001", "batch_ms="):
        refused = parse_query(bad, {8001})
        assert isinstance(refused, Closed) and refused.code == 1008, bad
