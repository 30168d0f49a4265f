"""Reference relay "floor": the least work a Python relay can do (not shipped).

Raw asyncio protocols: a minimal HTTP upgrade handshake on the WebSocket port;
each device read is split into lines (one text frame per line, without the
newline; binary when the bytes are not UTF-8; lines longer than 65536 bytes are
cut; blank lines skipped), the frames of that read are encoded once, and the
same bytes are written to every client's transport in one write. No queues, no limits, no pings, no metrics.

SIGTERM: stop accepting, give devices --drain-timeout s to close on their own
(their data still relayed), close the rest, deliver a trailing partial line,
close every client with 1001 and exit once their buffers are flushed.

    python floor.py --ws-port 8000 --tcp-port 8001 [--tcp-port 8002 ...]
"""

import argparse
import asyncio
import base64
import hashlib
import os
import signal
import socket

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_MESSAGE = 65536

clients = set()
devices = set()


HEADER = {True: [bytes((0x81, n)) for n in range(126)], False: [bytes((0x82, n)) for n in range(126)]}


def frame(payload, text):
    n = len(payload)
    op = 0x81 if text else 0x82
    if n < 126:
        return bytes((op, n)) + payload
    if n < 65536:
        return bytes((op, 126)) + n.to_bytes(2, "big") + payload
    return bytes((op, 127)) + n.to_bytes(8, "big") + payload


def is_text(line):
    try:
        line.decode()
    except UnicodeDecodeError:
        return False
    return True


def encode(lines, ascii):
    """The frames of these lines, as one bytes object (the lines are never empty)."""
    if ascii:
        head = HEADER[True]
        return b"".join([head[len(m)] + m if len(m) < 126 else frame(m, True) for m in lines])
    return b"".join([frame(m, is_text(m)) for m in lines])


def broadcast(data):
    for c in clients:
        c.write(data)


class Device(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""
        devices.add(self)

    def data_received(self, data):
        if self.buf:
            data = self.buf + data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        if b"\r" in data:
            lines = [m[:-1] if m[-1:] == b"\r" else m for m in lines]
        if len(data) > MAX_MESSAGE:
            lines = [m[i : i + MAX_MESSAGE] for m in lines for i in range(0, len(m), MAX_MESSAGE)]
            if len(self.buf) >= MAX_MESSAGE:
                lines.append(self.buf)
                self.buf = b""
        if b"" in lines:
            lines = [m for m in lines if m]
        if lines and clients:
            broadcast(encode(lines, data.isascii()))

    def connection_lost(self, exc):
        if self.buf:
            broadcast(encode([self.buf], self.buf.isascii()))
            self.buf = b""
        devices.discard(self)
        if not devices:
            no_devices.set()


class Client(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.head = b""
        self.open = False
        self.gone = asyncio.get_running_loop().create_future()

    def data_received(self, data):
        if self.open:
            return  # client frames are ignored
        self.head += data
        if b"\r\n\r\n" not in self.head:
            if len(self.head) > 16384:
                self.transport.close()
            return
        key = None
        for line in self.head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        if key is None:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.open = True
        clients.add(self.transport)

    def connection_lost(self, exc):
        clients.discard(self.transport)
        self.gone.set_result(None)


def notify_ready():
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        if path.startswith("@"):
            path = "\0" + path[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", path)


async def main(args):
    global no_devices
    loop = asyncio.get_running_loop()
    no_devices = asyncio.Event()
    client_protos = []

    def client_factory():
        p = Client()
        client_protos.append(p)
        return p

    ws = await loop.create_server(client_factory, args.host, args.ws_port, backlog=4096)
    tcp = [
        await loop.create_server(Device, args.host, port, backlog=4096) for port in args.tcp_port
    ]
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    notify_ready()
    await stop.wait()
    for s in tcp:
        s.close()
    ws.close()
    if devices:
        no_devices.clear()
        try:
            await asyncio.wait_for(no_devices.wait(), args.drain_timeout)
        except TimeoutError:
            pass
    for d in list(devices):
        d.transport.close()  # connection_lost delivers the trailing piece
    if devices:
        try:
            await asyncio.wait_for(no_devices.wait(), 1.0)
        except TimeoutError:
            pass
    close = bytes((0x88, 2)) + (1001).to_bytes(2, "big")
    for t in list(clients):
        t.write(close)
        t.close()  # flushes the write buffer first
    pending = [p.gone for p in client_protos if not p.gone.done()]
    if pending:
        await asyncio.wait(pending, timeout=3.0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--ws-port", type=int, required=True)
    ap.add_argument("--tcp-port", type=int, action="append", required=True)
    ap.add_argument("--drain-timeout", type=float, default=5.0)
    ap.add_argument("--uvloop", action="store_true")
    a = ap.parse_args()
    if a.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(a))
