"""The MQTT 3.1.1 session after CONNACK, spoken by relayd itself (relayd(8), MQTT).

paho-mqtt makes the connection (DNS, TCP, TLS, CONNECT, CONNACK: relayd.mqtt);
then ``Session`` takes its socket over. paho handles every message with several
Python objects, a lock and a ``recv`` per packet part, which made the uplink the
largest cost of a relay under load. Here a loop iteration's PUBLISH packets are
encoded into one ``bytes`` join and written with one ``send``, and a read's
PUBACKs are parsed in one pass. The rest of a 3.1.1 session is small:
SUBSCRIBE/UNSUBSCRIBE (downlink topics), PUBLISH received (QoS 0 and 1:
PUBACK), PINGREQ every half keep-alive, DISCONNECT at the end.

At least once: a QoS 1 message is acknowledged in the spool only on its PUBACK;
a QoS 0 one when its bytes are in the kernel (the whole write buffer sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Protocol

from relayd.mqttsetup import failure_reason

logger = logging.getLogger(__name__)

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
READ_SIZE = 256 * 1024
# A bigger packet from the broker is skipped, not buffered (relay.max_message is at
# most 16 MiB, and a downlink write over it is refused anyway).
MAX_PACKET = 16 * 1024 * 1024 + 65536
_SHORT_LEN = [bytes((n,)) for n in range(128)]
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux


class Record(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length integer (1 to 4 bytes)."""
    if n < 128:
        return _SHORT_LEN[n]
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def topic_field(topic: str) -> bytes:
    t = topic.encode("utf-8")
    return len(t).to_bytes(2, "big") + t


class Session:
    """One connected broker socket (plain or TLS, non-blocking) on the event loop."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        qos: int,
        retain: bool,
        keepalive: float,
        on_acked: Callable[[list[int]], None],
        on_message: Callable[[str, bytes], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._qos = qos
        self._first = 0x30 | (qos << 1) | (1 if retain else 0)
        self._keepalive = keepalive
        self._on_acked = on_acked
        self._on_message = on_message
        self._on_lost = on_lost
        self._topics: dict[str, bytes] = {}
        self.inflight: dict[int, int] = {}  # QoS 1: packet id -> spool record id
        self.unsent: list[int] = []  # QoS 0: record ids whose bytes are not all sent
        self._mid = 0
        self._in = bytearray()
        self._skip = 0  # bytes still to drop of a packet over MAX_PACKET
        self._out = b""
        self._writing = False
        self._last_read = self._loop.time()
        self.closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock, self._readable)
        self._ping = self._loop.call_later(keepalive / 2, self._tick)
        self._loop.call_soon(self._readable)  # what TLS already decrypted is not in the kernel

    @property
    def in_flight(self) -> int:
        return len(self.inflight) if self._qos else len(self.unsent)

    # --- writing ----------------------------------------------------------------

    def _next_mid(self) -> int:
        mid = self._mid
        while True:
            mid = mid + 1 if mid < 65535 else 1
            if mid not in self.inflight:
                self._mid = mid
                return mid

    def publish(self, records: Iterable[Record]) -> None:
        """Encode and write ``records`` (one join, one send)."""
        parts: list[bytes] = []
        add = parts.extend
        first, topics = bytes((self._first,)), self._topics
        qos1 = self._qos == 1
        extra = 2 if qos1 else 0
        for record in records:
            tf = topics.get(record.topic)
            if tf is None:
                tf = topics[record.topic] = topic_field(record.topic)
            payload = record.payload
            n = len(tf) + extra + len(payload)
            length = _SHORT_LEN[n] if n < 128 else remaining_length(n)
            if qos1:
                mid = self._next_mid()
                self.inflight[mid] = record.id
                add((first, length, tf, mid.to_bytes(2, "big"), payload))
            else:
                self.unsent.append(record.id)
                add((first, length, tf, payload))
        if parts:
            self.write(b"".join(parts))

    def subscribe(self, topics: list[str], qos: int) -> None:
        body = self._next_mid().to_bytes(2, "big") + b"".join(
            topic_field(t) + bytes((qos,)) for t in topics
        )
        self.write(b"\x82" + remaining_length(len(body)) + body)

    def unsubscribe(self, topics: list[str]) -> None:
        body = self._next_mid().to_bytes(2, "big") + b"".join(topic_field(t) for t in topics)
        self.write(b"\xa2" + remaining_length(len(body)) + body)

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self._out:
            self._out += data
            return
        self._out = data
        self._send()

    def _send(self) -> None:
        data = self._out
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except (OSError, ssl.SSLError) as exc:
            self._lose(failure_reason(exc))
            return
        self._out = data[sent:]
        if self._out:
            if not self._writing:
                self._writing = True
                self._loop.add_writer(self._sock, self._send)
            return
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._sock)
        if self.unsent:  # QoS 0: in the kernel is as far as it goes
            done, self.unsent = self.unsent, []
            self._on_acked(done)

    # --- reading ----------------------------------------------------------------

    def _readable(self) -> None:
        if self.closed:
            return
        buf = self._in
        try:
            while True:  # until the kernel (and TLS) has no more
                chunk = self._sock.recv(READ_SIZE)
                if not chunk:
                    self._lose("the broker closed the connection")
                    return
                buf += chunk
                if len(chunk) < READ_SIZE and not _pending(self._sock):
                    break
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except (OSError, ssl.SSLError) as exc:
            self._lose(failure_reason(exc))
            return
        if _QUICKACK is not None:
            # ACK the broker's segments at once: a broker with Nagle on (mosquitto's
            # default) holds its next PUBACKs until then, which stalls a QoS 1 window.
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        if buf:
            self._last_read = self._loop.time()
            self._parse()

    def _parse(self) -> None:
        buf = self._in
        if self._skip:
            n = min(self._skip, len(buf))
            del buf[:n]
            self._skip -= n
        acked: list[int] = []
        inflight = self.inflight
        pos, end = 0, len(buf)
        while end - pos >= 2:
            kind = buf[pos]
            if kind == 0x40 and buf[pos + 1] == 2:  # PUBACK, the common case
                if end - pos < 4:
                    break
                rid = inflight.pop((buf[pos + 2] << 8) | buf[pos + 3], None)
                if rid is not None:
                    acked.append(rid)
                pos += 4
                continue
            length, shift, i = 0, 0, pos + 1
            while True:
                if i >= end:
                    length = -1
                    break
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                i += 1
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    self._lose("a malformed packet from the broker")
                    return
            if length < 0:
                break
            if length > MAX_PACKET:
                logger.warning("mqtt: skipped a packet of %d bytes from the broker", length)
                self._skip = length - (end - i)  # (negative: all of it is here)
                pos = min(end, i + length)
                if self._skip > 0:
                    break
                self._skip = 0
                continue
            if end - i < length:
                break
            self._packet(kind, bytes(buf[i : i + length]))
            if self.closed:
                return
            pos = i + length
        del buf[:pos]
        if acked:
            self._on_acked(acked)

    def _packet(self, kind: int, body: bytes) -> None:
        if kind & 0xF0 == 0x30 and len(body) >= 2:  # PUBLISH (a downlink topic)
            qos = (kind >> 1) & 3
            n = int.from_bytes(body[:2], "big")
            topic = body[2 : 2 + n].decode("utf-8", "replace")
            rest = body[2 + n :]
            if qos:
                self.write(b"\x40\x02" + rest[:2])  # PUBACK (QoS 2 is never granted)
                rest = rest[2:]
            self._on_message(topic, rest)
        # SUBACK, UNSUBACK, PINGRESP and anything else: nothing to do

    # --- keep-alive and the end ------------------------------------------------

    def _tick(self) -> None:
        if self._loop.time() - self._last_read > self._keepalive * 1.5:
            self._lose("no answer from the broker within the keep-alive")
            return
        self.write(PINGREQ)
        self._ping = self._loop.call_later(self._keepalive / 2, self._tick)

    def _lose(self, reason: str) -> None:
        if not self.closed:
            self.close(polite=False)
            self._on_lost(reason)

    def close(self, polite: bool = True) -> None:
        """Stop; DISCONNECT first when nothing is half written."""
        if self.closed:
            return
        self.closed = True
        self._ping.cancel()
        sock = self._sock
        if sock.fileno() >= 0:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            if polite and not self._out:
                with contextlib.suppress(OSError, ssl.SSLError):
                    sock.send(DISCONNECT)
            sock.close()


def _pending(sock: socket.socket) -> int:
    return sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
