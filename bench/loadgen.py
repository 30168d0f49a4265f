"""Load generator: TCP producers and lean raw-socket WebSocket consumers.

Talks to a relay only through its outside. Every line a producer sends is

    PPP SSSSSSSSSS TTTTTTTTTTTTTTTT xxxx…x$\\n

(producer id, sequence number, CLOCK_MONOTONIC send time in µs, padding, an
end mark) so that a consumer can tell whole lines from pieces, find loss,
duplicates and reordering per producer, and measure latency. Everything runs
on one host, so the monotonic clock is shared by every process.

Consumers do the HTTP upgrade themselves and parse unmasked server frames from
the byte stream: a frame may carry one line without its newline (the relayd
contract) or any chunk of the device's byte stream (the naive relay forwards
1 KiB reads). Pings are answered with masked pongs; a close frame is answered
and its code kept.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import select
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.tlsread import TlsEOF, TlsLayer, TlsProtocol, handshake

HEAD_LEN = 32  # "PPP SSSSSSSSSS TTTTTTTTTTTTTTTT "
END_MARK = 0x24  # "$"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

BULK_SAMPLE = 8  # in runs of lines from one producer, latency of 1 line in 8 is kept
PIDS = {b"%03d" % i: i for i in range(1000)}  # producer id field -> id
SUFFIXES = [b"%03d" % i for i in range(1000)]

mono_ns = time.monotonic_ns


def line_format(length: int) -> bytes:
    """printf-style template of one line of `length` bytes plus the newline."""
    if not 34 <= length <= 65_000:
        raise ValueError("line length must be within 34..65000 bytes")
    return b"%03d %010d %016d " + b"x" * (length - HEAD_LEN - 1) + b"$\n"


class Latency:
    """Latency histogram shared by the consumers of one process.

    10 µs buckets up to 1 s; slower lines are kept exactly. Lines are only
    recorded while `on` is set (the measurement window).
    """

    BUCKET_US = 10
    BUCKETS = 100_000

    def __init__(self) -> None:
        self.hist = [0] * self.BUCKETS
        self.over: list[int] = []
        self.max_us = 0
        self.on = False

    @property
    def n(self) -> int:
        return sum(self.hist) + len(self.over)

    def percentile(self, q: float) -> float | None:
        """Latency in ms below which a share `q` (0..1) of recorded lines fall."""
        n = self.n
        if n == 0:
            return None
        rank = max(1, round(q * n))
        seen = 0
        for i, c in enumerate(self.hist):
            if c:
                seen += c
                if seen >= rank:
                    return (i + 0.5) * self.BUCKET_US / 1000
        over = sorted(self.over)
        return over[rank - seen - 1] / 1000

    def summary(self) -> dict[str, float | int | None]:
        return {
            "lat_n": self.n,
            "p50_ms": _r(self.percentile(0.50)),
            "p99_ms": _r(self.percentile(0.99)),
            "max_ms": _r(self.max_us / 1000 if self.n else None),
        }


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


class Consumer(asyncio.Protocol):
    """One WebSocket client that counts every line it receives."""

    def __init__(
        self,
        lat: Latency,
        producers: int,
        line_len: int,
        host: str,
        port: int,
        path: str = "/ws",
    ) -> None:
        self.lat = lat
        self.L = line_len
        self.host = host
        self.port = port
        self.path = path  # request target, with its query (?format=json, ?access_token=)
        self.expected = [0] * producers  # next sequence number per producer
        self.gaps: dict[int, list[list[int]]] = {}  # producer -> missing [start, end) ranges
        self.count = 0  # lines received, duplicates included
        self.dups = 0
        self.reordered = 0
        self.bad = 0  # pieces that are no line of ours (a corrupted stream)
        self.frames = 0
        self.target = -1  # done is set once count - dups reaches this
        self.done = asyncio.Event()
        self.watch: tuple[int, int] | None = None  # (producer, seq): caught is set once seen
        self.caught = asyncio.Event()
        self.close_code: int | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._key = base64.b64encode(os.urandom(16))
        self._head = b""
        self._open = False
        self._buf = b""
        self._carry = b""
        self._frag: list[bytes] = []

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(
            b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (self.path.encode(), self.host.encode(), self.port, self._key)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.done.set()
        self.caught.set()

    def data_received(self, data: bytes) -> None:
        if not self._open:
            data = self._handshake(data)
            if not data:
                return
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        now = mono_ns() // 1000
        rec = self.lat.on
        L = self.L
        expected = self.expected
        hist = self.lat.hist
        nb = Latency.BUCKETS
        mx = self.lat.max_us
        count = 0
        frames = 0
        if n >= 8 * (L + 2) and not self._carry:
            pos = self._bulk(buf, n, now, rec)
            count = frames = pos // (L + 2)
            mx = self.lat.max_us
        pids = PIDS
        L1 = L + 1
        while n - pos >= 2:
            # Fast path: a final text frame holding exactly one whole line, without its
            # newline (the contract) or with it (a relay forwarding reads as they come).
            b1 = buf[pos + 1]
            end = pos + 2 + b1
            if buf[pos] == 0x81 and (b1 == L or b1 == L1) and end <= n and not self._carry:
                if buf[pos + 1 + L] == END_MARK and (b1 == L or buf[end - 1] == 10):
                    try:
                        pid = pids[buf[pos + 2 : pos + 5]]
                        seq = int(buf[pos + 6 : pos + 16])
                        ts = int(buf[pos + 17 : pos + 33])
                        e = expected[pid]
                    except (KeyError, ValueError, IndexError):
                        pass
                    else:
                        if seq == e:
                            expected[pid] = e + 1
                        else:
                            self._out_of_order(pid, seq, e)
                        count += 1
                        frames += 1
                        if rec:
                            d = now - ts
                            if d > mx:
                                mx = d
                            b = d // 10
                            if b < nb:
                                hist[b if b > 0 else 0] += 1
                            else:
                                self.lat.over.append(d)
                        pos = end
                        continue
            nxt = self._frame(buf, pos, n, now, rec)
            if nxt < 0:
                break
            pos = nxt
        self._buf = buf[pos:]
        self.count += count
        self.frames += frames
        if rec and mx > self.lat.max_us:
            self.lat.max_us = mx
        if self.target >= 0 and self.count - self.dups >= self.target:
            self.done.set()
        if self.watch is not None and expected[self.watch[0]] > self.watch[1]:
            self.caught.set()

    # -- helpers ------------------------------------------------------------
    def _bulk(self, buf: bytes, n: int, now: int, rec: bool) -> int:
        """Accept a run of whole one-line frames at once; return the bytes consumed."""
        F = self.L + 2
        k = n // F
        stop = k * F
        if buf[0:stop:F].count(0x81) != k or buf[1:stop:F].count(self.L) != k:
            return 0
        return stop if self._run(buf, 2, F, k, now, rec) else 0

    def _run(self, buf: bytes, off: int, stride: int, k: int, now: int, rec: bool) -> bool:
        """Accept k lines at buf[off + j * stride] at once if they are one producer's next lines.

        This is what one fast device produces; it lets a single consumer keep up
        with a relay doing far beyond 250,000 lines/s. The checks run in C on
        strided byte columns: every line ends with the end mark, every line has
        the same producer id, and the first and last sequence numbers span
        exactly k lines (any loss, duplicate or reordering fails it and the lines
        go the slow way). Latency is sampled on every BULK_SAMPLE-th line; the
        first line of the run is the oldest, so the maximum is exact.
        """
        L = self.L
        stop = off + k * stride
        if buf[off + L - 1 : stop : stride].count(END_MARK) != k:
            return False
        for col in (0, 1, 2):
            c = buf[off + col : stop : stride]
            if c.count(c[0]) != k:
                return False
        lastoff = stop - stride
        try:
            pid = PIDS[buf[off : off + 3]]
            first = int(buf[off + 4 : off + 14])
            last = int(buf[lastoff + 4 : lastoff + 14])
            if first != self.expected[pid] or last - first + 1 != k:
                return False
        except (KeyError, ValueError, IndexError):
            return False
        self.expected[pid] = last + 1
        if rec:
            lat = self.lat
            hist, nb = lat.hist, Latency.BUCKETS
            for o in range(off, stop, stride * BULK_SAMPLE):
                d = now - int(buf[o + 15 : o + 31])
                if d // 10 < nb:
                    hist[max(0, d // 10)] += 1
                else:
                    lat.over.append(d)
            lat.max_us = max(lat.max_us, now - int(buf[off + 15 : off + 31]))
        return True

    def _handshake(self, data: bytes) -> bytes:
        self._head += data
        i = self._head.find(b"\r\n\r\n")
        if i < 0:
            if len(self._head) > 65536:
                self._fail("oversized handshake answer")
            return b""
        head, rest = self._head[:i], self._head[i + 4 :]
        self._head = b""
        accept = base64.b64encode(hashlib.sha1(self._key + WS_GUID).digest())
        if not head.startswith(b"HTTP/1.1 101") or accept not in head:
            self._fail("handshake refused: " + head.split(b"\r\n", 1)[0].decode("latin-1"))
            return b""
        self._open = True
        self.opened.set_result(None)
        return rest

    def _fail(self, why: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def _frame(self, buf: bytes, pos: int, n: int, now: int, rec: bool) -> int:
        """Handle the frame at `pos`; return where the next one starts, -1 if incomplete."""
        b0, b1 = buf[pos], buf[pos + 1]
        if b1 & 0x80:
            self._fail("server frame is masked")
            return -1
        ln, hl = b1 & 0x7F, 2
        if ln == 126:
            if n - pos < 4:
                return -1
            ln, hl = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
        elif ln == 127:
            if n - pos < 10:
                return -1
            ln, hl = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
        end = pos + hl + ln
        if end > n:
            return -1
        payload = buf[pos + hl : end]
        op, fin = b0 & 0x0F, b0 & 0x80
        if op in (0, 1, 2):
            if not fin:
                self._frag.append(payload)
                return end
            if self._frag:
                payload = b"".join([*self._frag, payload])
                self._frag = []
            self.frames += 1
            self._payload(payload, now, rec)
        elif op == 9:  # ping
            self.send_frame(0xA, payload)
        elif op == 8:  # close
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.send_frame(0x8, payload[:2])
        return end

    def _payload(self, payload: bytes, now: int, rec: bool) -> None:
        """A frame that is not exactly one line: a piece of the device's byte stream.

        Split it on newlines, carry a trailing piece to the next frame. Runs of
        whole lines from one producer are accepted at once (see _run).
        """
        i = 0
        if self._carry:
            nl = payload.find(b"\n")
            if nl < 0:
                self._carry += payload
                return
            self._pieces(self._carry + payload[:nl], now, rec, last=False)
            self._carry = b""
            i = nl + 1
        S = self.L + 1
        k = (len(payload) - i) // S
        if k >= 4 and payload[i + S - 1 : i + k * S : S].count(10) == k:
            if self._run(payload, i, S, k, now, rec):
                self.count += k
                i += k * S
        self._pieces(payload[i:] if i else payload, now, rec, last=True)

    def _pieces(self, data: bytes, now: int, rec: bool, last: bool) -> None:
        pieces = data.split(b"\n")
        end = len(pieces) - 1
        for j, piece in enumerate(pieces):
            if not piece:
                continue
            if piece[-1] == END_MARK:
                self._line(piece, now, rec)
            elif last and j == end:
                self._carry = piece
            else:
                self.bad += 1

    def _line(self, line: bytes, now: int, rec: bool) -> None:
        try:
            if len(line) != self.L:
                raise ValueError
            pid = PIDS[line[0:3]]
            seq = int(line[4:14])
            ts = int(line[15:31])
            e = self.expected[pid]
        except (KeyError, ValueError, IndexError):
            self.bad += 1
            return
        if seq == e:
            self.expected[pid] = e + 1
        else:
            self._out_of_order(pid, seq, e)
        self.count += 1
        if rec:
            d = max(0, now - ts)
            self.lat.max_us = max(self.lat.max_us, d)
            if d // 10 < Latency.BUCKETS:
                self.lat.hist[d // 10] += 1
            else:
                self.lat.over.append(d)

    def _out_of_order(self, pid: int, seq: int, e: int) -> None:
        if seq > e:  # a gap: remember what is missing
            self.gaps.setdefault(pid, []).append([e, seq])
            self.expected[pid] = seq + 1
            return
        for r in self.gaps.get(pid, ()):  # late or duplicate
            if r[0] <= seq < r[1]:
                self.reordered += 1
                if seq == r[0]:
                    r[0] += 1
                else:  # split the range; the right part keeps seq + 1 .. end
                    self.gaps[pid].append([seq + 1, r[1]])
                    r[1] = seq
                return
        self.dups += 1

    def send_frame(self, op: int, payload: bytes) -> None:
        """Send a masked control frame (payload ≤ 125 bytes)."""
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        self.transport.write(bytes([0x80 | op, 0x80 | len(payload)]) + mask + masked)

    # -- results --------------------------------------------------------------
    @property
    def unique(self) -> int:
        return self.count - self.dups

    def delivered_below(self, pid: int, cutoff: int) -> int:
        """How many of producer `pid`'s lines with seq < cutoff this client got."""
        top = min(self.expected[pid], cutoff)
        missing = sum(max(0, min(r[1], top) - r[0]) for r in self.gaps.get(pid, ()))
        return top - missing

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.send_frame(0x8, (1000).to_bytes(2, "big"))
            self.transport.close()


class PageConsumer(Consumer):
    """The status page's live tail (``/ws?format=json``): counts frames, checks nothing.

    Its frames are JSON envelopes, not lines; only how many arrive matters here.
    """

    def _payload(self, payload: bytes, now: int, rec: bool) -> None:
        self.count += 1


class Producer(asyncio.Protocol):
    """One device: writes lines, honours the transport's flow control."""

    def __init__(self, pid: int, fmt: bytes) -> None:
        self.pid = pid
        self.fmt = fmt
        self.seq = 0
        self.transport: asyncio.Transport | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=256 * 1024)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        pass

    @property
    def alive(self) -> bool:
        return not self.lost.done()

    def send(self, k: int) -> None:
        """Write the next k lines, stamped now, in one write."""
        if not self.alive or self.transport is None:
            return
        ts = mono_ns() // 1000
        fmt, pid, s = self.fmt, self.pid, self.seq
        self.transport.write(b"".join([fmt % (pid, i, ts) for i in range(s, s + k)]))
        self.seq = s + k

    def send_block(self) -> None:
        """Write the next 1000 lines in one write, cheaply (the throughput device).

        Starting at a multiple of 1000, the lines differ only in the last three
        digits of the sequence number, so the block is one C-level join.
        """
        if not self.alive or self.transport is None:
            return
        if self.seq % 1000:
            self.send(1000 - self.seq % 1000)
            return
        head = b"%03d %07d" % (self.pid, self.seq // 1000)  # "PPP SSSSSSS"
        tail = (self.fmt % (self.pid, 0, mono_ns() // 1000))[14:]  # " TTTT… xxx…$\n"
        self.transport.write(head + (tail + head).join(SUFFIXES) + tail)
        self.seq += 1000

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# -- polled consumers -----------------------------------------------------------


class SockTransport:
    """Just enough of an asyncio transport for a Consumer whose socket is polled."""

    layer: TlsLayer | None = None  # plain ws (TlsSockTransport: wss)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closing = False

    def write(self, data: bytes) -> None:
        if not self.closing:
            with contextlib.suppress(OSError):  # control frames only: tiny, never blocks
                self.sock.send(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock.getsockname() if name == "sockname" else default


class TlsSockTransport(SockTransport):
    """The poller's transport for a wss consumer: control frames go out encrypted."""

    def __init__(self, sock: socket.socket, layer: TlsLayer) -> None:
        super().__init__(sock)
        self.layer = layer

    def write(self, data: bytes) -> None:
        if not self.closing:
            with contextlib.suppress(OSError, ssl.SSLError):  # control frames: tiny, never block
                self.sock.send(self.layer.encrypt(data))


class Poller:
    """Reads many consumers' sockets every `period` s, instead of once per event.

    With 200 clients a relay writes ~400,000 tiny frames/s, and reading each as
    it comes costs the generator one wake-up and one recv per frame: more than
    its core has. Polling makes each recv carry the frames of `period` seconds,
    at the price of up to `period` of extra measured latency.

    wss consumers (`connect(..., tls=)`) are read the same way; what each recv
    brought is decrypted in memory (bench/tlsread.py) before the frame parser.
    """

    def __init__(self, period: float) -> None:
        self.period = period
        self.items: dict[int, tuple[socket.socket, Consumer, SockTransport | TlsSockTransport]] = {}
        self.epoll = select.epoll()
        self.buf = bytearray(1 << 18)
        self.stopped = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self, max_seconds: float = 3600.0) -> None:
        until = time.monotonic() + max_seconds
        self.task = asyncio.get_running_loop().create_task(self._run(until))

    async def stop(self) -> None:
        self.stopped.set()
        if self.task is not None:
            await self.task
        for fd in list(self.items):
            self._drop(fd)
        self.epoll.close()

    async def connect(
        self, c: Consumer, host: str, port: int, tls: ssl.SSLContext | None = None
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        t: SockTransport | TlsSockTransport
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is None:
                t = SockTransport(sock)
            else:
                layer = TlsLayer(tls, host)
                await handshake(sock, layer)
                t = TlsSockTransport(sock, layer)
        except BaseException:
            sock.close()
            raise
        self.items[sock.fileno()] = (sock, c, t)
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        c.connection_made(t)  # type: ignore[arg-type]

    async def _run(self, until: float) -> None:
        """Poll at a fixed cadence until stopped (or `until`, a safety bound)."""
        period = self.period
        nxt = time.monotonic()
        for _ in range(int((until - nxt) / period) + 1):
            if self.stopped.is_set() or time.monotonic() > until:
                return
            self.poll_once()
            nxt += period
            delay = nxt - time.monotonic()
            if delay < 0:  # behind: do not try to catch up with a burst of polls
                nxt, delay = time.monotonic(), 0.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), delay)

    def poll_once(self) -> None:
        buf = self.buf
        mv = memoryview(buf)
        size = len(buf)
        items = self.items
        for fd, _ in self.epoll.poll(0):
            item = items.get(fd)
            if item is None:
                continue
            sock, c, t = item
            if t.closing:
                self._drop(fd)
                continue
            for _ in range(64):  # bounded per socket and poll
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    break
                except OSError:
                    n = 0
                if n == 0:
                    self._drop(fd)
                    break
                if t.layer is None:
                    c.data_received(bytes(mv[:n]))
                else:
                    try:
                        plain = t.layer.decrypt(mv[:n])
                    except TlsEOF:
                        self._drop(fd)
                        break
                    if plain:
                        c.data_received(plain)
                if n < size:
                    break
        for fd in [fd for fd, (_, _, t) in items.items() if t.closing]:
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        sock, c, _ = self.items.pop(fd)
        with contextlib.suppress(OSError):
            self.epoll.unregister(fd)
        sock.close()
        c.connection_lost(None)


# -- connecting ---------------------------------------------------------------


async def _connect(  # type: ignore[no-untyped-def]
    factory, host: str, port: int, rcvbuf: int | None = None, tls: ssl.SSLContext | None = None
):
    loop = asyncio.get_running_loop()
    if rcvbuf is None:
        _, proto = await loop.create_connection(factory, host, port, ssl=tls)
        return proto
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    _, proto = await loop.create_connection(
        factory, sock=sock, ssl=tls, server_hostname=host if tls else None
    )
    return proto


async def connect_consumers(
    n: int,
    lat: Latency,
    producers: int,
    line_len: int,
    host: str,
    port: int,
    rcvbuf: int | None = None,
    parallel: int = 50,
    timeout: float = 30.0,
    poller: Poller | None = None,
    tls: ssl.SSLContext | None = None,
    path: str = "/ws",
    kind: type[Consumer] = Consumer,
    tls_reader: str = "bio",
) -> list[Consumer]:
    """Open n WebSocket clients, `parallel` handshakes at a time (read by `poller` if given).

    With `tls`, the clients speak wss, read as ws clients are and decrypted in
    memory (bench/tlsread.py); `tls_reader="loop"`: through the event loop's SSL
    transport instead (event-driven clients only).
    """
    if tls_reader not in ("bio", "loop"):
        raise ValueError(f"tls_reader {tls_reader!r}: 'bio' or 'loop'")
    if poller is not None and tls is not None and tls_reader != "bio":
        raise ValueError("polled wss consumers decrypt in memory (tls_reader='bio')")
    sem = asyncio.Semaphore(parallel)

    def wrapped(c: Consumer) -> asyncio.Protocol:
        assert tls is not None
        return TlsProtocol(c, TlsLayer(tls, host))

    async def one() -> Consumer:
        async with sem:
            if poller is not None:
                c = kind(lat, producers, line_len, host, port, path)
                await poller.connect(c, host, port, tls)
            elif tls is not None and tls_reader == "bio":
                c = kind(lat, producers, line_len, host, port, path)
                await _connect(lambda: wrapped(c), host, port, rcvbuf)
            else:
                c = await _connect(
                    lambda: kind(lat, producers, line_len, host, port, path),
                    host,
                    port,
                    rcvbuf,
                    tls,
                )
            await c.opened
            return c

    return list(await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), timeout))


async def connect_producers(
    n: int, fmt: bytes, host: str, port: int, first_id: int = 0, parallel: int = 100
) -> list[Producer]:
    sem = asyncio.Semaphore(parallel)

    async def one(pid: int) -> Producer:
        async with sem:
            p: Producer = await _connect(lambda: Producer(pid, fmt), host, port)
            return p

    return list(
        await asyncio.wait_for(
            asyncio.gather(*(one(first_id + i) for i in range(n))), 30.0 + n / 50
        )
    )


# -- driving ------------------------------------------------------------------


async def blast(p: Producer, until: float) -> None:
    """Send as fast as the relay takes it, until the monotonic time `until`."""
    while p.alive:
        remaining = until - time.monotonic()
        if remaining <= 0:
            return
        if not p.writable.is_set():
            try:
                await asyncio.wait_for(p.writable.wait(), remaining)
            except TimeoutError:
                return
            continue
        p.send_block()
        await asyncio.sleep(0)  # let the consumers in this process run


async def burst(p: Producer, lines: int, until: float) -> None:
    """Send `lines` lines (rounded up to a block) as fast as the relay takes them."""
    for _ in range(lines // 1000 + 2):
        if p.seq >= lines or not p.alive:
            return
        remaining = until - time.monotonic()
        if remaining <= 0:
            return
        if not p.writable.is_set():
            try:
                await asyncio.wait_for(p.writable.wait(), remaining)
            except TimeoutError:
                return
        p.send_block()
        await asyncio.sleep(0)


async def caught_up(consumers: Sequence[Consumer], pid: int, seq: int, timeout: float) -> bool:
    """Wait until every consumer has seen line `seq` of producer `pid` (or closed)."""
    for c in consumers:
        c.caught.clear()
        c.watch = (pid, seq)
        if c.expected[pid] > seq or c.closed.done():
            c.caught.set()
    try:
        await asyncio.wait_for(asyncio.gather(*(c.caught.wait() for c in consumers)), timeout)
        return True
    except TimeoutError:
        return False
    finally:
        for c in consumers:
            c.watch = None


async def paced(p: Producer, rate: float, start: float, until: float) -> None:
    """Send `rate` lines/s, one write per line when on time, from `start` to `until`."""
    if start > time.monotonic():
        await asyncio.sleep(start - time.monotonic())
    # Timers may fire early (uvloop rounds to whole ms): then nothing is due and we
    # sleep at least 1 ms, so the loop runs at most once per line plus once per ms.
    max_steps = int((until - start) * (rate + 1000)) + 100
    for _ in range(max_steps):
        now = time.monotonic()
        if now >= until or not p.alive:
            return
        due = int((now - start) * rate) + 1 - p.seq
        if due > 0:
            p.send(due)
            await asyncio.sleep(max(0.0, start + p.seq / rate - time.monotonic()))
        else:
            await asyncio.sleep(max(0.001, start + p.seq / rate - now))


async def run_paced(prods: Sequence[Producer], rate: float, duration: float) -> None:
    t0 = time.monotonic()
    step = 1.0 / rate / max(1, len(prods))
    await asyncio.gather(
        *(paced(p, rate, t0 + i * step, t0 + duration) for i, p in enumerate(prods))
    )


async def drained(
    consumers: Sequence[Consumer], target: int, timeout: float, idle: float = 1.0
) -> bool:
    """Wait until every consumer has `target` unique lines, or progress stops."""
    for c in consumers:
        c.target = target
        if c.unique >= target or c.closed.done():
            c.done.set()
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        pending = [c.done.wait() for c in consumers if not c.done.is_set()]
        if not pending:
            return True
        try:
            await asyncio.wait_for(
                asyncio.gather(*pending), min(idle, max(0.01, deadline - time.monotonic()))
            )
            return True
        except TimeoutError:
            total = sum(c.count for c in consumers)
            if total == last:
                return False
            last = total
    return False


def totals(consumers: Iterable[Consumer]) -> int:
    return sum(c.count for c in consumers)


@dataclass
class Loss:
    lost: int
    dups: int
    reordered: int
    bad: int
    frames: int
    lines: int


def loss(consumers: Sequence[Consumer], sent: int) -> Loss:
    return Loss(
        lost=sum(max(0, sent - c.unique) for c in consumers),
        dups=sum(c.dups for c in consumers),
        reordered=sum(c.reordered for c in consumers),
        bad=sum(c.bad for c in consumers),
        frames=sum(c.frames for c in consumers),
        lines=sum(c.count for c in consumers),
    )


# -- status pages -------------------------------------------------------------


@dataclass
class PageStats:
    gets: int = 0
    errors: int = 0
    bytes: int = 0


async def poll_status(
    base_url: str,
    period: float,
    start: float,
    until: float,
    stats: PageStats,
    tls: ssl.SSLContext | None = None,
) -> None:
    """What relayd/static/status.js does: GET /status.json every `period` s, kept alive.

    One client per page, so one keep-alive connection per page, as in a browser.
    """
    import httpx  # a relayd dependency; only the generator needs it here

    if start > time.monotonic():
        await asyncio.sleep(start - time.monotonic())
    async with httpx.AsyncClient(base_url=base_url, verify=tls or True, timeout=5.0) as client:
        nxt = start
        for _ in range(int((until - start) / period) + 2):
            if time.monotonic() >= until:
                return
            try:
                resp = await client.get("/status.json", headers={"Cache-Control": "no-store"})
                stats.gets += 1
                stats.bytes += len(resp.content)
                if resp.status_code != 200:
                    stats.errors += 1
            except httpx.HTTPError:
                stats.errors += 1
            nxt += period
            await asyncio.sleep(max(0.0, min(nxt, until) - time.monotonic()))


# -- admin socket ---------------------------------------------------------------


async def create_token(admin_socket: str, name: str) -> str:
    """POST /v1/tokens on relayd's admin socket; return the secret (shown once)."""
    import httpx

    transport = httpx.AsyncHTTPTransport(uds=admin_socket)
    async with httpx.AsyncClient(transport=transport, base_url="http://relayd") as client:
        resp = await client.post("/v1/tokens", json={"name": name, "read": "*"}, timeout=10.0)
        resp.raise_for_status()
        token = resp.json()["token"]
    if not isinstance(token, str):
        raise ValueError("POST /v1/tokens: no token in the answer")
    return token
