"""wss for the bench's consumers: TLS decrypted in memory, on the same read paths as ws.

A wss consumer reads its socket exactly as a ws consumer does (an event-loop
protocol over a plain TCP transport, or `loadgen.Poller`'s `recv_into`), and
only then decrypts: the ciphertext goes into an `ssl.MemoryBIO`, `SSLObject.read`
turns every complete TLS record into plaintext, and everything a read brought is
handed to the same `Consumer.data_received`, the same frame parser and latency
stamping, in one call. A record cut by a TCP read stays in the BIO until the
rest comes (`SSLWantReadError`); a WebSocket frame cut by a record boundary is
carried by the parser, as one cut by TCP is. The TLS handshake happens while
the client connects, before any measurement window.

This replaces the event loop's SSL transport for the generator's wss clients
(`--set wss_reader=loop` keeps it, for comparison): with it, the generator spent
far more of its core per delivered frame on wss than on ws, and the wss/ws p99
ratio measured the generator's TLS as much as the relay's.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

RECORD_MAX = 1 << 14  # plaintext of one TLS record, at most


class TlsEOF(Exception):
    """The peer ended the TLS session (close_notify) or broke it."""


class TlsLayer:
    """One client's TLS session over memory BIOs."""

    def __init__(self, context: ssl.SSLContext, host: str) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname=host)
        self.ready = False

    def handshake(self) -> bytes:
        """Advance the handshake with what `incoming` holds; return the bytes to send."""
        try:
            self.obj.do_handshake()
            self.ready = True
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def encrypt(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.outgoing.read()

    def decrypt(self, cipher: bytes | memoryview) -> bytes:
        """Feed ciphertext; return all the plaintext of the complete records so far.

        Raises TlsEOF when the peer closed the session or sent garbage. Reading
        until `SSLWantReadError` would cost an exception per read, ~6 µs here,
        three times the decryption of a small record (the event loop's SSL
        transport pays it on every read): it reads while the BIO holds bytes,
        so the exception comes only when a TCP read cut a record.
        """
        incoming = self.incoming
        incoming.write(cipher)
        obj = self.obj
        parts: list[bytes] = []
        try:
            while True:
                data = obj.read(RECORD_MAX)
                if not data:  # close_notify
                    raise TlsEOF("close_notify")
                if not parts and not incoming.pending and not obj.pending():
                    return data  # the common case: one record, nothing left
                parts.append(data)
                if not incoming.pending and not obj.pending():
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as e:
            raise TlsEOF(str(e)) from e
        return b"".join(parts)


async def handshake(sock: socket.socket, layer: TlsLayer, timeout: float = 30.0) -> None:
    """Do `layer`'s handshake over the connected non-blocking `sock` (the poller's path)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        for _ in range(100):  # a TLS 1.3 handshake takes 2 reads; 100 is a bound, not a goal
            out = layer.handshake()
            if out:
                await loop.sock_sendall(sock, out)
            if layer.ready:
                return
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise ConnectionError("closed during the TLS handshake")
            layer.incoming.write(data)
    raise ConnectionError("TLS handshake did not finish")


class TlsProtocol(asyncio.Protocol):
    """An event-driven wss consumer: a plain TCP protocol that decrypts, then hands on.

    It is also the consumer's transport (its writes are encrypted, then written
    to the TCP transport). `inner` is a `loadgen.Consumer` (any asyncio.Protocol
    with its connection_made/data_received/connection_lost).
    """

    def __init__(self, inner: asyncio.Protocol, layer: TlsLayer) -> None:
        self.inner = inner
        self.layer = layer
        self.raw: asyncio.Transport | None = None
        self.closing = False

    # -- towards the TCP transport -------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        self._handshake(b"")

    def data_received(self, data: bytes) -> None:
        layer = self.layer
        if not layer.ready:
            self._handshake(data)
            if not layer.ready:
                return
            data = b""
        try:
            plain = layer.decrypt(data)
        except TlsEOF:
            self.abort()
            return
        if plain:
            self.inner.data_received(plain)

    def eof_received(self) -> bool | None:
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.inner.connection_lost(exc)

    def _handshake(self, data: bytes) -> None:
        assert self.raw is not None
        if data:
            self.layer.incoming.write(data)
        try:
            out = self.layer.handshake()
        except ssl.SSLError:
            self.raw.abort()  # connection_lost tells the consumer (its `opened` fails)
            return
        if out:
            self.raw.write(out)
        if self.layer.ready:
            self.inner.connection_made(self)  # type: ignore[arg-type]

    # -- the consumer's transport ----------------------------------------------
    def write(self, data: bytes) -> None:
        if self.raw is not None and not self.closing:
            self.raw.write(self.layer.encrypt(data))

    def is_closing(self) -> bool:
        return self.closing or self.raw is None or self.raw.is_closing()

    def close(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.close()

    def abort(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()

    def pause_reading(self) -> None:
        if self.raw is not None:
            self.raw.pause_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.raw.get_extra_info(name, default) if self.raw is not None else default
