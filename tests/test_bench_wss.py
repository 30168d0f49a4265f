"""The bench's wss consumers (bench/tlsread.py): TLS decrypted in memory, the ws parser after it.

Bench code is not shipped, but issue 11's wss/ws ratios are only as right as
these clients: every line counted once, none seen as corrupt, whatever way TCP
reads and TLS records cut the WebSocket frames.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import socket
import ssl
from pathlib import Path

import pytest

from bench import loadgen as lg
from bench.tlsread import TlsLayer, TlsProtocol
from tests.certs import Authority, Pair
from tests.conftest import MS, NotifySocket, run_daemon

pytestmark = pytest.mark.anyio

LINE = 64


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Pair]:
    ca = Authority(tmp_path_factory.mktemp("pki"), "bench-ca")
    return ca, ca.issue("relayd", server=True)


class Pipe:
    """The TCP transport under a TlsProtocol, in memory: what it writes goes to a server BIO."""

    def __init__(self, server: ssl.SSLObject, incoming: ssl.MemoryBIO) -> None:
        self.server, self.incoming = server, incoming
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.incoming.write(data)

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    close = abort


def frames(fmt: bytes, first: int, n: int) -> bytes:
    """n one-line text frames (the relayd contract: the line without its newline)."""
    ts = lg.mono_ns() // 1000
    return b"".join(b"\x81" + bytes([LINE]) + (fmt % (0, s, ts))[:-1] for s in range(first, n))


async def test_frames_cut_by_tls_records_and_tcp_reads(pki: tuple[Authority, Pair]) -> None:
    ca, server_pair = pki
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(server_pair.cert, server_pair.key)
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    lat = lg.Latency()
    lat.on = True
    c = lg.Consumer(lat, 1, LINE, "127.0.0.1", 1)
    proto = TlsProtocol(c, TlsLayer(ca.client_context(), "127.0.0.1"))
    pipe = Pipe(server, s_in)
    proto.connection_made(pipe)  # type: ignore[arg-type]
    for _ in range(10):  # the handshake, pumped by hand
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        if out := s_out.read():
            proto.data_received(out)
        if c.transport is not None:
            break
    assert c.transport is proto, "TLS handshake did not finish"
    request = server.read(4096)
    assert request.startswith(b"GET /ws HTTP/1.1\r\n")
    key = request.split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0]
    accept = base64.b64encode(hashlib.sha1(key + lg.WS_GUID).digest())
    fmt = lg.line_format(LINE)
    stream = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        + frames(fmt, 0, 150) + b"\x89\x04ping" + frames(fmt, 150, 300)
    )  # fmt: skip
    rng = random.Random(11)
    pos = 0
    while pos < len(stream):  # records of 1..500 bytes: frames and the 101 cut anywhere
        n = rng.randint(1, 500)
        server.write(stream[pos : pos + n])
        pos += n
    server.write(frames(fmt, 300, 1000))  # and many frames in one record
    cipher = s_out.read()
    pos = 0
    while pos < len(cipher):  # TCP reads of 1..3000 bytes: records cut anywhere
        n = rng.randint(1, 3000)
        proto.data_received(cipher[pos : pos + n])
        pos += n
    assert c.opened.done() and c.opened.exception() is None
    assert (c.count, c.unique, c.bad, c.frames) == (1000, 1000, 0, 1000)
    assert c.expected[0] == 1000 and not c.gaps
    assert lat.n > 0 and lat.max_us >= 0
    pong = server.read(4096)  # the ping was answered, encrypted, masked
    assert pong[0] == 0x8A and pong[1] == 0x80 | 4 and len(pong) == 2 + 4 + 4
    mask = pong[2:6]
    assert bytes(b ^ mask[i & 3] for i, b in enumerate(pong[6:])) == b"ping"
    # The server ends the session: close_notify aborts the TCP transport.
    with pytest.raises(ssl.SSLWantReadError):
        server.unwrap()
    proto.data_received(s_out.read())
    assert pipe.aborted


async def test_wss_consumers_event_driven_and_polled_against_relayd(
    tmp_path: Path, notify: NotifySocket, pki: tuple[Authority, Pair]
) -> None:
    """Real relayd over wss: both read paths get every line, in order, none broken."""
    ca, server = pki
    tls = f'tls_cert = "{server.cert}"\ntls_key = "{server.key}"\n'
    async with run_daemon(tmp_path, notify, http_extra=tls) as d:
        lat = lg.Latency()
        lat.on = True
        ctx = ca.client_context()
        events = await lg.connect_consumers(3, lat, 1, LINE, "127.0.0.1", d.http_port, tls=ctx)
        poller = lg.Poller(0.002)
        poller.start(max_seconds=30.0)
        polled = await lg.connect_consumers(
            3, lat, 1, LINE, "127.0.0.1", d.http_port, poller=poller, tls=ctx
        )
        cons = events + polled
        assert all(isinstance(c.transport, TlsProtocol) for c in events)
        fmt = lg.line_format(LINE)
        lines = 2000
        with socket.create_connection(("127.0.0.1", d.ports[0])) as dev:
            ts = lg.mono_ns() // 1000
            dev.sendall(b"".join(fmt % (0, s, ts) for s in range(lines)))
            assert await lg.drained(cons, lines, timeout=10_000 * MS)
        for c in cons:
            assert (c.count, c.bad, c.expected[0]) == (lines, 0, lines)
        assert lat.n >= 6 * lines // lg.BULK_SAMPLE
        for c in cons:
            c.close()
        async with asyncio.timeout(5_000 * MS):
            await asyncio.gather(*(c.closed for c in events))
        await poller.stop()
        assert all(c.closed.done() for c in polled)
