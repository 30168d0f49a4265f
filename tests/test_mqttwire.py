"""relayd's own MQTT session after CONNACK (relayd.mqttwire), against a broker played on a
real socket pair; and where the uplink's work falls in a loop iteration (after the fan-out)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relayd import mqttwire
from relayd.config import MqttSettings
from relayd.hub import Hub, Source
from relayd.mqtt import BACKLOG, CHUNK, MqttUplink
from relayd.mqttwire import Session
from relayd.spool import Spool, SpoolRecord
from tests.helpers import MS

pytestmark = pytest.mark.anyio


def decode(data: bytes) -> list[tuple[int, bytes]]:
    """The packets in ``data`` (first byte, body): the test's own decoder."""
    out, pos = [], 0
    while pos < len(data):
        first, pos = data[pos], pos + 1
        length = shift = 0
        while True:
            byte, pos = data[pos], pos + 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        out.append((first, data[pos : pos + length]))
        pos += length
    return out


def publish_packet(topic: bytes, payload: bytes, qos: int, mid: int = 0) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"")
    return (
        bytes((0x30 | qos << 1,)) + mqttwire.remaining_length(len(body + payload)) + body + payload
    )


@dataclass
class Broker:
    """The far end of the session's socket, and what the session reported."""

    sock: socket.socket
    session: Session
    acked: list[int] = field(default_factory=list)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    received: bytes = b""

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def read_packets(self, n: int) -> list[tuple[int, bytes]]:
        """The next ``n`` packets the session wrote."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5000 * MS):
            while True:
                try:
                    packets = decode(self.received)
                except IndexError:  # a packet not all here yet
                    packets = []
                if len(packets) >= n:
                    done = packets[:n]
                    self.received = self.received[sum(_size(p) for p in done) :]
                    return done
                chunk = await loop.sock_recv(self.sock, 1 << 20)
                assert chunk, "the session closed the connection"
                self.received += chunk

    async def until(self, predicate: object) -> None:
        async with asyncio.timeout(5000 * MS):
            while not predicate():  # type: ignore[operator]
                self.changed.clear()
                await self.changed.wait()


def _size(packet: tuple[int, bytes]) -> int:
    return 1 + len(mqttwire.remaining_length(len(packet[1]))) + len(packet[1])


async def make_broker(qos: int, retain: bool = False, keepalive: float = 30.0) -> Broker:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    broker: Broker

    def acked(ids: list[int]) -> None:
        broker.acked += ids
        broker.changed.set()

    def message(topic: str, payload: bytes) -> None:
        broker.messages.append((topic, payload))
        broker.changed.set()

    def lost(reason: str) -> None:
        broker.lost.append(reason)
        broker.changed.set()

    session = Session(
        ours,
        qos=qos,
        retain=retain,
        keepalive=keepalive,
        on_acked=acked,
        on_message=message,
        on_lost=lost,
    )
    broker = Broker(theirs, session)
    return broker


@pytest.fixture
async def qos1() -> AsyncIterator[Broker]:
    broker = await make_broker(1, retain=True)
    yield broker
    broker.session.close()
    broker.sock.close()


PAYLOADS = [b"a", b"x" * 200, b"y" * 20_000, b"z" * 70_000]  # remaining length: 1 to 3 bytes


async def test_qos1_publishes_encode_and_acks_across_split_reads(qos1: Broker) -> None:
    records = [SpoolRecord(100 + i, f"gw/{i}", p) for i, p in enumerate(PAYLOADS)]
    qos1.session.publish(records)
    packets = await qos1.read_packets(len(records))
    mids = []
    for (first, body), record in zip(packets, records, strict=True):
        assert first == 0x33  # PUBLISH, QoS 1, retain
        n = int.from_bytes(body[:2], "big")
        assert body[2 : 2 + n].decode() == record.topic
        mids.append(int.from_bytes(body[2 + n : 4 + n], "big"))
        assert body[4 + n :] == record.payload
    assert len(set(mids)) == 4 and qos1.session.in_flight == 4
    pubacks = b"".join(b"\x40\x02" + m.to_bytes(2, "big") for m in mids)
    await qos1.send(pubacks[:6])  # one PUBACK and half of the next: a read ends mid-packet
    await qos1.until(lambda: qos1.acked == [100])
    await qos1.send(pubacks[6:] + pubacks[:4])  # the rest, and a duplicate: ignored
    await qos1.until(lambda: len(qos1.acked) == 4)
    assert qos1.acked == [100, 101, 102, 103] and qos1.session.in_flight == 0


async def test_qos0_is_acked_when_written_and_packet_ids_are_left_out() -> None:
    broker = await make_broker(0)
    try:
        broker.session.publish([SpoolRecord(7, "t", b"one"), SpoolRecord(8, "t", b"two")])
        assert broker.acked == [7, 8] and broker.session.in_flight == 0
        packets = await broker.read_packets(2)
        assert packets == [(0x30, b"\x00\x01tone"), (0x30, b"\x00\x01ttwo")]
    finally:
        broker.session.close()
        broker.sock.close()


async def test_received_publish_is_delivered_and_qos1_acknowledged(qos1: Broker) -> None:
    await qos1.send(
        b"\x90\x03\x00\x01\x01"  # SUBACK: nothing to do
        + publish_packet(b"down/1", b"cmd0", 0)
        + publish_packet(b"down/1", b"cmd1", 1, mid=513)
        + b"\xd0\x00"  # PINGRESP
    )
    await qos1.until(lambda: len(qos1.messages) == 2)
    assert qos1.messages == [("down/1", b"cmd0"), ("down/1", b"cmd1")]
    assert await qos1.read_packets(1) == [(0x40, (513).to_bytes(2, "big"))]


async def test_subscribe_and_unsubscribe_packets(qos1: Broker) -> None:
    qos1.session.subscribe(["a/1", "b/2"], 1)
    qos1.session.unsubscribe(["a/1"])
    (sub, body), (unsub, ubody) = await qos1.read_packets(2)
    assert sub == 0x82 and body[2:] == b"\x00\x03a/1\x01\x00\x03b/2\x01"
    assert unsub == 0xA2 and ubody[2:] == b"\x00\x03a/1"
    assert body[:2] != ubody[:2]  # packet ids


async def test_a_packet_over_the_limit_is_skipped(
    qos1: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mqttwire, "MAX_PACKET", 1000)
    big = publish_packet(b"down/1", b"B" * 5000, 0)
    await qos1.send(big[:3000])
    await qos1.send(big[3000:] + publish_packet(b"down/1", b"small", 0))
    await qos1.until(lambda: qos1.messages != [])
    assert qos1.messages == [("down/1", b"small")] and qos1.lost == []


async def test_pings_within_the_keepalive_and_drops_a_silent_broker() -> None:
    keepalive = 400 * MS
    broker = await make_broker(1, keepalive=keepalive)
    try:
        for _ in range(3):  # answered: the session stays
            assert await broker.read_packets(1) == [(0xC0, b"")]
            await broker.send(b"\xd0\x00")
        assert broker.lost == []
        await broker.until(lambda: broker.lost != [])  # no more answers
        assert "keep-alive" in broker.lost[0]
        assert broker.session.closed
    finally:
        broker.session.close()
        broker.sock.close()


async def test_the_broker_closing_is_a_lost_session(qos1: Broker) -> None:
    qos1.session.publish([SpoolRecord(1, "t", b"x")])
    await qos1.read_packets(1)  # (unread bytes would make the close a reset)
    qos1.sock.close()
    await qos1.until(lambda: qos1.lost != [])
    assert qos1.lost == ["the broker closed the connection"]
    assert qos1.acked == []  # not acknowledged: the uplink publishes it again


# --- the uplink in a loop iteration ---------------------------------------------------


class Sink:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def send_frames(self, frames: list[bytes]) -> None:
        self.events.append(f"ws {len(frames)}")

    def close(self, code: int, reason: str) -> None:
        pass

    def abort(self) -> None:
        pass


class RecordingSpool(Spool):
    events: list[str]

    def append(self, topic: str, payload: bytes) -> None:
        if not self.events or not self.events[-1].startswith("spool"):
            self.events.append("spool")
        super().append(topic, payload)


async def test_the_tap_spools_after_the_fan_out_in_slices(tmp_path: Path) -> None:
    events: list[str] = []
    spool = RecordingSpool.open(tmp_path / "spool", max_bytes=1 << 24)
    assert isinstance(spool, RecordingSpool)
    spool.events = events
    hub = Hub(queue_size=100_000, slow_client="drop", max_clients=10)
    uplink = MqttUplink(
        MqttSettings(url="mqtt://127.0.0.1:1"),
        spool,
        password=None,
        on_state=lambda: None,
        downlink=lambda port, data: None,
        downlink_ports=lambda: [],
    )
    hub.tap = uplink
    hub.subscribe(Sink(events), None, False)
    n = CHUNK * 2 + 10
    hub.publish(Source(8001, None, "x:1"), [b"m%d" % i for i in range(n)])
    assert events == [] and uplink.spooled == n  # the tap only took the batch
    seen = [0]
    async with asyncio.timeout(5000 * MS):
        while seen[-1] < n:
            await asyncio.sleep(0)  # loop iterations, one at a time
            seen.append(spool.messages)
    assert events[0] == f"ws {n}"  # the WebSocket write came first
    assert events[1:] == ["spool"]
    steps = [b - a for a, b in zip(seen, seen[1:], strict=False) if b != a]
    assert steps == [CHUNK, CHUNK, 10]  # in slices, one per iteration
    assert uplink.spooled == n
    # Devices faster than a slice per iteration: the backlog stays bounded.
    hub.publish(Source(8001, None, "x:1"), [b"f%d" % i for i in range(BACKLOG * 3)])
    for _ in range(100):
        await asyncio.sleep(0)  # one loop iteration
        if spool.messages > n:
            break
    assert spool.messages == n + BACKLOG * 2 and uplink.spooled == n + BACKLOG * 3
    spool.close()
