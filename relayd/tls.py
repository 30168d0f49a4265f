"""TLS for ``[http]`` and device listeners: contexts, and the handshake of one connection.

relayd accepts every connection in plain TCP first, so that it can refuse it
(``allow``, ``max_connections``, draining) before reading a byte, and then runs
the TLS handshake itself with ``loop.start_tls`` and ``handshake_timeout``: a
handshake that fails or never finishes is closed and counted, and nothing
reaches the protocol behind it (relayd.toml(5), TLS).

Contexts are built from files at start and on every reload; a reload that
cannot read or match the files is rejected like an invalid configuration.
A new context serves new handshakes only: connections already open keep theirs.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from relayd.errors import ConfigError

logger = logging.getLogger(__name__)

LOG_EVERY = 10.0  # seconds: failed handshakes are logged at most once per interval and place


def server_context(where: str, cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """A TLS server context; ``ConfigError`` names ``where`` and what is wrong."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            why = (exc.reason or str(exc)).lower().replace("_", " ")
            raise ConfigError([f"{where}: cannot use {cert} with {key}: {why}"]) from None
        raise ConfigError(
            [f"{where}: cannot read {exc.filename or cert}: {(exc.strerror or str(exc)).lower()}"]
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except OSError as ca_exc:
            ca_why = ca_exc.reason if isinstance(ca_exc, ssl.SSLError) else ca_exc.strerror
            raise ConfigError(
                [f"{where}: cannot use client CA {client_ca}: {(ca_why or str(ca_exc)).lower()}"]
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_identity(transport: asyncio.BaseTransport) -> str | None:
    """The subject CN of the peer's verified certificate, if it presented one."""
    cert: Any = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)[:256]
    return None


class FailureLog:
    """One warning line per place and interval for failed handshakes, never one per failure."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def failed(self, where: str, peer: str, reason: str) -> None:
        now = self._clock()
        if now - self._last.get(where, -LOG_EVERY) < LOG_EVERY:
            self._suppressed[where] = self._suppressed.get(where, 0) + 1
            return
        self._last[where] = now
        more = self._suppressed.pop(where, 0)
        logger.warning(
            "%s: TLS handshake with %s failed: %s%s",
            where,
            peer,
            reason,
            f" ({more} more since the last report)" if more else "",
        )


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or str(exc)).lower().replace("_", " ")
    if isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc):
        return "timed out"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).lower()


class Handover(asyncio.Protocol):
    """Stands in for the real protocol during the handshake, then hands over.

    A client may send its first data in the same flight as the end of its
    handshake (TLS 1.3), before ``start_tls`` returns: that data is kept here.
    And ``start_tls`` reports the end of a connection whose handshake failed
    to its protocol; the real one never saw it begin, so it must not see it end.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received: list[bytes] = []
        self.eof = False
        self.lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return True  # keep the connection until the real protocol decides

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)

    def hand_over(self, protocol: asyncio.Protocol) -> None:
        """Give the TLS connection to ``protocol``, with what arrived meanwhile."""
        assert self.transport is not None
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        self.replay(protocol)

    def replay(self, protocol: asyncio.Protocol) -> None:
        """What arrived during the hand-over, to the protocol that now has the transport."""
        assert self.transport is not None
        for data in self.received:
            protocol.data_received(data)
        self.received.clear()
        if self.eof and not protocol.eof_received():
            self.transport.close()
        if self.lost is not None:
            protocol.connection_lost(self.lost[0])


async def handshake(
    transport: asyncio.Transport,
    context: ssl.SSLContext,
    timeout: float,
) -> Handover:
    """Run the server side of a TLS handshake; ``hand_over`` gives it to a protocol.

    The caller paused reading on ``transport`` when it accepted the connection,
    so that no byte of the client's hello reaches the plain protocol. Raises
    ``OSError`` (``ssl.SSLError``, ``ConnectionError``, ``TimeoutError``) when the
    handshake fails or does not finish within ``timeout``; the connection is
    closed then.
    """
    loop = asyncio.get_running_loop()
    handover = Handover()
    try:
        async with asyncio.timeout(timeout + 1):  # start_tls enforces timeout; this bounds it
            tls = await loop.start_tls(
                transport, handover, context, server_side=True, ssl_handshake_timeout=timeout
            )
    except BaseException:
        transport.abort()
        raise
    if tls is None:  # pragma: no cover - only for a transport that closed meanwhile
        raise ConnectionResetError("connection closed during the TLS handshake")
    handover.transport = tls
    return handover


class TlsAcceptor(asyncio.Protocol):
    """A plain connection to a TLS server: handshake first, then the real protocol.

    ``make_protocol`` builds the protocol that gets the TLS transport (uvicorn's
    HTTP protocol for ``[http]``); ``context`` is read per connection, so a
    reload's new context serves the next handshake.
    """

    def __init__(
        self,
        make_protocol: Callable[[], asyncio.Protocol],
        context: Callable[[], ssl.SSLContext],
        timeout: Callable[[], float],
        on_failure: Callable[[str, BaseException], None],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self._make_protocol = make_protocol
        self._context = context
        self._timeout = timeout
        self._on_failure = on_failure
        self._tasks = tasks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._handshake(transport))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        try:
            handover = await handshake(transport, self._context(), self._timeout())
        except OSError as exc:
            self._on_failure(str(peer[0]) if peer else "?", exc)
            return
        handover.hand_over(self._make_protocol())
