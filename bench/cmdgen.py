"""downlink50's command clients, cheap enough that the figure is relayd's (issue 12).

    python -m bench.cmdgen HOST WS_PORT CMD_PORT DEV_PORT FIRST COUNT RATE SAMPLE

Runs ``COUNT`` WebSocket clients (ids ``FIRST`` …) in this process, on
connections subscribed to ``CMD_PORT`` (device-less: no fan-out of their own).
Once they are open it prints ``ready`` and reads ``START UNTIL FROM`` (monotonic
seconds, shared by every process of the machine) from stdin; then each client
sends ``RATE`` JSON commands/s to port ``DEV_PORT`` from ``START`` to ``UNTIL``.
Sampled commands sent from ``FROM`` on have their send time as ``id`` too: the
ack that relayd writes while it handles the command gives the round trip
client -> relayd -> client (``ack_us``), without the device side.
Several of these processes share the load (bench/downlink.py).

Cheap by construction: raw asyncio protocols, no WebSocket library; every
command is a frame built once per client (a zero mask key is a valid mask that
leaves the payload as it is); only one command in ``SAMPLE`` carries its send
time (``C…``, built when sent), the others are constant (``c…``). Answers are
counted by walking frame headers; a payload is only looked into when it is not
an ack or is the ack of a sampled command. Prints one JSON line: sent, acked,
errors, first_error, cpu_pct, ack_us.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from typing import Any

COMMAND = "%s%03d %07d %016d"  # kind (C sampled, c not), client, seq, send time (µs): 33 bytes
HANDSHAKE = (
    "GET /ws?format=json&port={port} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def masked_text(payload: bytes) -> bytes:
    """A client's text frame with the zero mask key (RFC 6455 5.3: any key is valid)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, 0x80 | n)) + b"\0\0\0\0" + payload
    return bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big") + b"\0\0\0\0" + payload


def command_frame(
    dev_port: int, kind: str, cid: int, seq: int, ts_us: int, ident: int | None = None
) -> bytes:
    data = COMMAND % (kind, cid, seq, ts_us)
    if ident is None:
        return masked_text(b'{"port": %d, "data": "%s"}' % (dev_port, data.encode()))
    return masked_text(b'{"port": %d, "data": "%s", "id": %d}' % (dev_port, data.encode(), ident))


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.opened = asyncio.get_running_loop().create_future()
        self.buf = b""
        self.handshaken = False
        self.acked = 0
        self.errors = 0
        self.first_error: str | None = None
        self.ack_us: list[int] = []  # round trips of the sampled commands' acks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before the 101: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.handshaken:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(buf[:200].decode("latin-1")))
                return
            self.handshaken = True
            self.opened.set_result(None)
            buf = buf[end + 4 :]
        i, n = 0, len(buf)
        while n - i >= 2:
            length = buf[i + 1] & 0x7F
            head = 2
            if length == 126:
                if n - i < 4:
                    break
                length = int.from_bytes(buf[i + 2 : i + 4], "big")
                head = 4
            elif length == 127:
                if n - i < 10:
                    break
                length = int.from_bytes(buf[i + 2 : i + 10], "big")
                head = 10
            end = i + head + length
            if end > n:
                break
            if buf[i] & 0x0F == 1:  # text: an answer
                if buf.startswith(b'{"ack": ', i + head):
                    self.acked += 1
                    if 0x30 <= buf[i + head + 8] <= 0x39:  # an id: a sampled command's send time
                        comma = buf.find(b",", i + head + 8, end)
                        self.ack_us.append(
                            time.monotonic_ns() // 1000 - int(buf[i + head + 8 : comma])
                        )
                else:
                    self.errors += 1
                    if self.first_error is None:
                        self.first_error = buf[i + head : end][:200].decode("utf-8", "replace")
            i = end
        self.buf = buf[i:]


async def run(argv: list[str]) -> dict[str, Any]:
    host = argv[0]
    ws_port, cmd_port, dev_port, first, count = (int(a) for a in argv[1:6])
    rate = float(argv[6])
    sample = int(argv[7])
    loop = asyncio.get_running_loop()
    clients: list[Client] = []
    for _ in range(count):
        _, client = await loop.create_connection(Client, host, ws_port)
        key = base64.b64encode(os.urandom(16)).decode()
        assert client.transport is not None
        client.transport.write(HANDSHAKE.format(port=cmd_port, host=host, key=key).encode())
        await asyncio.wait_for(client.opened, 30.0)
        clients.append(client)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    start, until, sample_from = (float(a) for a in line.split())
    sample_from_us = int(sample_from * 1e6)
    plain = [command_frame(dev_port, "c", first + k, 0, 0) for k in range(count)]
    transports = [c.transport for c in clients]
    total_rate = rate * count  # this process's commands/s, round robin over its clients
    sent = 0
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    cpu0 = time.process_time()
    while (now := time.monotonic()) < until:
        due = int((now - start) * total_rate) + 1 - sent
        for _ in range(due):
            k = sent % count
            transport = transports[k]
            assert transport is not None
            if sent % sample == 0:
                ts = time.monotonic_ns() // 1000
                ident = ts if ts >= sample_from_us else None
                transport.write(command_frame(dev_port, "C", first + k, sent // count, ts, ident))
            else:
                transport.write(plain[k])
            sent += 1
        await asyncio.sleep(max(0.0005, start + sent / total_rate - time.monotonic()))
    cpu = (time.process_time() - cpu0) / max(1e-9, until - start)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:  # until every command is answered
        if sum(c.acked + c.errors for c in clients) >= sent:
            break
        await asyncio.sleep(0.01)
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    errors = [c.first_error for c in clients if c.first_error]
    return {
        "sent": sent,
        "acked": sum(c.acked for c in clients),
        "errors": sum(c.errors for c in clients),
        "first_error": errors[0] if errors else None,
        "cpu_pct": round(100 * cpu, 1),
        "ack_us": [us for c in clients for us in c.ack_us],
    }


def main() -> None:
    try:
        import uvloop  # the generator's loop, as bench.run's (from .venv/bench-site)

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(run(sys.argv[1:]))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
