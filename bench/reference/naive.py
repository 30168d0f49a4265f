"""Reference relay "naive": the pattern of most tutorials (not shipped).

A set of connected WebSocket clients (the `websockets` library's asyncio
server, its defaults); each device read of up to 1 KiB is forwarded as it comes
(it may hold several lines or a piece of one), awaiting every client in turn.

SIGTERM: stop, closing every client with 1001 (the library's default).

    python naive.py --ws-port 8000 --tcp-port 8001 [--tcp-port 8002 ...]
"""

import argparse
import asyncio
import os
import signal
import socket

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

clients = set()


async def handle_ws(websocket):
    clients.add(websocket)
    try:
        await websocket.wait_closed()
    finally:
        clients.discard(websocket)


async def handle_device(reader, writer):
    try:
        while True:
            data = await reader.read(1024)
            if not data:
                break
            message = data.decode("utf-8", "replace")
            for websocket in list(clients):
                try:
                    await websocket.send(message)
                except ConnectionClosed:
                    clients.discard(websocket)
    finally:
        writer.close()


def notify_ready():
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        if path.startswith("@"):
            path = "\0" + path[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", path)


async def main(args):
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
    async with serve(handle_ws, args.host, args.ws_port, backlog=4096):
        servers = [
            await asyncio.start_server(handle_device, args.host, port, backlog=4096)
            for port in args.tcp_port
        ]
        notify_ready()
        await stop
        for s in servers:
            s.close()
    # leaving `serve` closed every client with 1001 (going away)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--ws-port", type=int, required=True)
    ap.add_argument("--tcp-port", type=int, action="append", required=True)
    ap.add_argument("--drain-timeout", type=float, default=5.0)  # accepted, unused
    ap.add_argument("--uvloop", action="store_true")
    a = ap.parse_args()
    if a.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(a))
