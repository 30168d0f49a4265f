"""The /ws connection's write side: every frame whole and in order, or counted as dropped.

What a client's socket does not take at once stays in its transport, which
pauses the hub past the high-water mark; the hub then keeps at most
``queue_size`` messages for it and drops the oldest (relayd(8), SLOW CLIENTS).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from pathlib import Path

import pytest

from tests.certs import Authority
from tests.helpers import MS, WS_HANDSHAKE, NotifySocket, run_daemon, send_device, wait_until

pytestmark = pytest.mark.anyio

MESSAGES = 300
BODY = 40_000  # bytes per message: a few fill the stalled client's socket buffers


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ssl.SSLContext]:
    """``[http]`` TLS lines for relayd, and a client context that trusts its certificate."""
    ca = Authority(tmp_path_factory.mktemp("pki"), "relayd-test-ca")
    server = ca.issue("relayd", server=True)
    return f'tls_cert = "{server.cert}"\ntls_key = "{server.key}"\n', ca.client_context()


async def stalled_client(
    port: int, context: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with a small receive buffer that completes the handshake, then reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=context, server_hostname="127.0.0.1" if context else None, limit=1 << 20
    )
    writer.write(WS_HANDSHAKE)
    async with asyncio.timeout(5_000 * MS):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    b0, b1 = await reader.readexactly(2)
    assert b0 == 0x81, hex(b0)  # FIN + text: relayd neither fragments nor masks
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return await reader.readexactly(n)


@pytest.mark.xdist_group("heavy")  # megabytes through a stalled socket
@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_a_stalled_client_gets_whole_frames_in_order_and_the_rest_is_counted(
    tmp_path: Path, notify: NotifySocket, server_tls: tuple[str, ssl.SSLContext], scheme: str
) -> None:
    http_extra, context = server_tls if scheme == "wss" else ("", None)
    extra = "[relay]\nqueue_size = 8\n"
    async with run_daemon(tmp_path, notify, extra=extra, http_extra=http_extra) as d:
        hub = d.runtime.hub
        reader, writer = await stalled_client(d.http_port, context)
        await wait_until(lambda: hub.clients == 1)
        [sub] = list(hub._subs)
        body = b"m" * BODY
        device = await send_device(d.ports[0], close=False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(
            device, b"".join(b"%04d " % i + body + b"\n" for i in range(MESSAGES))
        )
        device.close()
        # The client never read: relayd paused it and dropped its oldest messages.
        await wait_until(lambda: hub.dropped["queue_full"] > 0, timeout=10_000 * MS)
        listener = d.runtime.registry.get(d.ports[0])
        await wait_until(lambda: listener.messages_received == MESSAGES)
        # The bound applies when the hub's pass runs (at most FLUSH_INTERVAL later).
        await wait_until(lambda: hub._flush_handle is None)
        dropped = hub.dropped["queue_full"]
        assert len(sub.queue) <= 8
        seen: list[int] = []
        async with asyncio.timeout(20_000 * MS):
            while len(seen) + dropped < MESSAGES:
                payload = await read_frame(reader)
                number, _, rest = payload.partition(b" ")
                assert rest == body, (len(rest), number)
                seen.append(int(number))
                dropped = hub.dropped["queue_full"]
        assert seen == sorted(set(seen)), "frames out of order or repeated"
        assert seen[-1] == MESSAGES - 1  # the newest messages are kept, the oldest dropped
        assert len(seen) + hub.dropped["queue_full"] == MESSAGES
        writer.close()
