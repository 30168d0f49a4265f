"""TCP listeners: one ``Listener`` per device port, and the one registry of them.

A ``Listener`` owns its ``asyncio.Server``, its set of device connections and
its own stop event. Stopping it is a drain: stop accepting, give connected
devices up to the drain timeout to close on their own while their data is
still relayed, then close the rest. Every byte read before a connection closed
is published, a trailing partial line as a last message.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import ssl
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from relayd.config import PortSettings
from relayd.errors import BindError, ListenerExists, ListenerNotFound, Stopping
from relayd.framing import Framer, FramingError, make_framer
from relayd.hub import Hub, Source, call_when_due
from relayd.tls import FailureLog, failure_reason, handshake, peer_identity

logger = logging.getLogger(__name__)

BACKLOG = 4096  # the kernel's queue of connections not yet accepted (capped by somaxconn)
ACCEPT_BATCH = 4  # connections accepted per event loop iteration (see Listener.start)
KEEPALIVE_IDLE = 30  # seconds of silence before the first TCP keepalive probe
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3
CLOSE_GRACE = 1.0  # seconds closed connections get to report connection_lost (port removal)
# Downlink writes to one device go to its transport at most this often (seconds):
# one system call per device per interval however many commands (relayd(8), DOWNLINK).
OUTBOX_INTERVAL = 0.002  # half the device writes of 1 ms under load (bench/RESULTS.md)

Origin = Literal["config", "runtime"]
SourceKind = Literal["listen", "connect", "serial"]
RejectReason = Literal["max_connections", "not_allowed", "tls", "draining"]
REJECT_REASONS: tuple[RejectReason, ...] = ("max_connections", "not_allowed", "tls", "draining")


@dataclass(frozen=True)
class ListenerEnv:
    """What every listener shares: the hub, and the TLS settings of the running daemon."""

    hub: Hub
    tls_context: Callable[[int], ssl.SSLContext | None] = lambda port: None
    handshake_timeout: Callable[[], float] = lambda: 10.0
    tls_failures: FailureLog = field(default_factory=FailureLog)
    on_change: Callable[[], None] = lambda: None  # a source's state changed (STATUS=)


def _reason(exc: OSError, host: str) -> str:
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot assign address {host}"
    return (exc.strerror or str(exc)).lower()


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket; ``BindError`` names port and reason.

    A host name that resolves to several addresses (``localhost``: 127.0.0.1
    and ::1) binds the first one getaddrinfo(3) returns (relayd.toml(5)).
    Every OS error (in use, permission, out of file descriptors) is a
    ``BindError``: one line for the operator, never a traceback.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(port, host, f"cannot resolve host {host!r} ({exc.strerror})") from None
    except OSError as exc:  # pragma: no cover - getaddrinfo fails with gaierror
        raise BindError(port, host, _reason(exc, host)) from None
    family, _, proto, _, address = infos[0]
    try:
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
    except OSError as exc:  # EMFILE, ENFILE, EAFNOSUPPORT ...
        raise BindError(port, host, _reason(exc, host)) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(port, host, _reason(exc, host)) from None
    return sock


def bind_unix(path: str) -> socket.socket:
    """The admin socket, created with mode 0660; a stale socket file is replaced."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(target.lstat().st_mode):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    try:
                        probe.connect(path)
                    except OSError:
                        target.unlink()  # nobody listens: stale
                    else:
                        raise BindError(0, path, "another relayd is listening on it")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise BindError(0, path, (exc.strerror or str(exc)).lower()) from None
    old_umask = os.umask(0o117)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(0, path, (exc.strerror or str(exc)).lower()) from None
    finally:
        os.umask(old_umask)
    return sock


def bind(settings: PortSettings) -> socket.socket:
    return bind_tcp(settings.host, settings.port)


def format_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer or "?")


class DeviceConnection(asyncio.Protocol):
    """One device's TCP connection: framing, counting, publishing."""

    # One per device connection, thousands per gateway: no instance __dict__.
    __slots__ = (
        "device",
        "framer",
        "hub",
        "idle_timer",
        "last_data",
        "listener",
        "outbox",
        "outbox_handle",
        "outbox_next",
        "outbox_size",
        "peer",
        "source",
        "transport",
    )

    def __init__(self, listener: PortSource) -> None:
        self.listener = listener
        self.hub = listener.hub
        self.transport: asyncio.Transport | None = None
        self.source: Source | None = None
        self.peer = "?"
        self.device: str | None = None  # the TLS client certificate's CN
        # Made on the first read: a refused connection, or a device that stays
        # silent, costs no framer.
        self.framer: Framer | None = None
        self.last_data = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        # Downlink writes waiting to be written together (see ``write``).
        self.outbox: list[bytes] | None = None
        self.outbox_size = 0
        self.outbox_handle: asyncio.Handle | None = None  # the outbox's flush, scheduled
        self.outbox_next = 0.0  # loop time from which the next flush may be written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self.listener
        assert isinstance(transport, asyncio.Transport)
        peername = transport.get_extra_info("peername")
        self.peer = format_peer(peername)
        refusal = listener.refusal(peername)
        if refusal is not None:  # before a byte is read
            listener.reject(refusal, self.peer)
            transport.abort()
            return
        self.transport = transport
        listener.connections.add(self)
        listener.idle.clear()
        sock = transport.get_extra_info("socket")
        if listener.settings.keepalive and sock is not None:
            _enable_keepalive(sock)
        context = listener.env.tls_context(listener.port)
        if context is None:
            self._open(None)
            return
        transport.pause_reading()  # the client's hello is for the TLS handshake
        task = asyncio.get_running_loop().create_task(self._handshake(transport, context))
        listener.handshakes.add(task)
        task.add_done_callback(listener.handshakes.discard)

    async def _handshake(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        listener = self.listener
        try:
            handover = await handshake(transport, context, listener.env.handshake_timeout())
        except OSError as exc:
            listener.rejected["tls"] += 1
            listener.env.tls_failures.failed(
                f"port {listener.port}", self.peer, failure_reason(exc)
            )
            self._forget()
            return
        tls = handover.transport
        assert tls is not None
        tls.set_protocol(self)
        self.transport = tls
        self._open(peer_identity(tls))
        handover.replay(self)

    def _open(self, device: str | None) -> None:
        listener = self.listener
        self.device = device
        self.source = Source(listener.port, listener.settings.name, self.peer, device)
        if listener.settings.idle_timeout > 0:
            self.last_data = time.monotonic()
            loop = asyncio.get_running_loop()
            self.idle_timer = loop.call_later(listener.settings.idle_timeout, self._check_idle)
        who = f"{self.peer} ({device})" if device else self.peer
        logger.info("port %d: device %s connected", listener.port, who)

    def _forget(self) -> None:
        listener = self.listener
        listener.connections.discard(self)
        if not listener.connections:
            listener.idle.set()

    def data_received(self, data: bytes) -> None:
        listener = self.listener
        listener.bytes_received += len(data)
        if self.idle_timer is not None:
            self.last_data = time.monotonic()
        framer = self.framer
        if framer is None:
            framer = self.framer = self._new_framer()
        messages = framer.feed(data)
        if messages:
            listener.messages_received += len(messages)
            assert self.source is not None
            self.hub.publish(self.source, messages, framer.text)
        if framer.error is not None:  # e.g. a length over max_message: stop reading
            self._framing_error(framer.error)
            self.close()

    def _new_framer(self) -> Framer:
        listener = self.listener
        settings = listener.settings
        return make_framer(
            settings.framing,
            max_message=listener.max_message,
            delimiter=settings.delimiter_bytes,
            length_prefix=settings.length_prefix,
            size=settings.size,
        )

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost delivers the rest

    def connection_lost(self, exc: Exception | None) -> None:
        listener = self.listener
        if self.source is None:
            return  # refused at connection_made, or its TLS handshake failed
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        framer = self.framer
        if framer is not None:
            failed = framer.error is not None  # already reported
            messages = framer.close()  # a trailing partial line or an unfinished UTF-8 tail
            if messages:
                assert self.source is not None
                listener.messages_received += len(messages)
                self.hub.publish(self.source, messages)
            if framer.error is not None and not failed:
                self._framing_error(framer.error)
        self._forget()
        peer = self.peer
        if exc is not None:
            logger.info("port %d: device %s disconnected (%s)", listener.port, peer, exc)
        else:
            logger.info("port %d: device %s disconnected", listener.port, peer)

    def close(self) -> None:
        """Close once the downlink writes already accepted are handed to the transport."""
        self.flush_outbox()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # Downlink (relayd.downlink)

    @property
    def writable(self) -> bool:
        transport = self.transport
        return self.source is not None and transport is not None and not transport.is_closing()

    def write(self, data: bytes) -> bool:
        """Queue ``data`` for the device unless that takes its buffer past ``downlink_buffer``.

        Writes to one device are handed to its transport together, in order,
        at most once per ``OUTBOX_INTERVAL`` (relayd(8), DOWNLINK): a write
        after a quiet spell goes at the end of this loop iteration, writes
        that come faster wait for the rest of the interval. Many clients'
        commands to the same devices then cost one system call per device
        and interval, not one per command. What waits in the outbox counts
        against ``downlink_buffer`` (relayd.toml(5)).
        """
        transport = self.transport
        assert transport is not None
        size = self.outbox_size + len(data)
        if transport.get_write_buffer_size() + size > self.listener.settings.downlink_buffer:
            return False
        outbox = self.outbox
        if outbox is None:
            self.outbox = [data]
            self.outbox_handle = call_when_due(
                asyncio.get_running_loop(), self.outbox_next, self._outbox_due
            )
        else:
            outbox.append(data)
        self.outbox_size = size
        return True

    def _outbox_due(self) -> None:
        self.outbox_handle = None
        self.flush_outbox()

    def flush_outbox(self) -> None:
        """Hand the outbox to the transport (when due, see ``write``, and before a close)."""
        handle = self.outbox_handle
        if handle is not None:  # called before it was due: a close
            self.outbox_handle = None
            handle.cancel()
        outbox = self.outbox
        if outbox is None:
            return
        self.outbox = None
        self.outbox_size = 0
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the device is gone: its connection_lost is on its way
        self.outbox_next = asyncio.get_running_loop().time() + OUTBOX_INTERVAL
        transport.write(outbox[0] if len(outbox) == 1 else b"".join(outbox))

    def _framing_error(self, error: FramingError) -> None:
        errors = self.listener.framing_errors
        errors[error.reason] = errors.get(error.reason, 0) + 1
        logger.warning(
            "port %d: device %s: framing error %s: %s",
            self.listener.port,
            self.source.peer if self.source else "?",
            error.reason,
            error.detail,
        )

    def _check_idle(self) -> None:
        timeout = self.listener.settings.idle_timeout
        remaining = self.last_data + timeout - time.monotonic()
        if remaining > 0:
            self.idle_timer = asyncio.get_running_loop().call_later(remaining, self._check_idle)
            return
        self.idle_timer = None
        logger.info(
            "port %d: device %s idle for %g s: closing",
            self.listener.port,
            self.source.peer if self.source else "?",
            timeout,
        )
        self.close()


def _enable_keepalive(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:  # pragma: no cover - not every socket family supports them
        logger.debug("cannot enable TCP keepalive", exc_info=True)


class PortSource:
    """One numbered source (relayd.toml(5), SOURCES): its device connections and stop event.

    The registry drives every kind through the same small interface: ``start``,
    ``stop(drain_timeout)``, ``wait_closed``, ``snapshot`` and ``connections``.
    ``Listener`` accepts devices; ``relayd.sources`` dials them or opens a serial
    line. Each reads through ``DeviceConnection``, so framing, downlink, history
    and the drain are the same for all.
    """

    kind: SourceKind = "listen"

    def __init__(
        self, settings: PortSettings, env: ListenerEnv, *, origin: Origin, max_message: int
    ) -> None:
        self.settings = settings
        self.origin: Origin = origin
        self.env = env
        self.hub = env.hub
        self.max_message = max_message
        self.allow = [ipaddress.ip_network(net) for net in settings.allow]
        self.connections: set[DeviceConnection] = set()
        self.handshakes: set[asyncio.Task[None]] = set()
        self.messages_received = 0
        self.bytes_received = 0
        self.rejected: dict[RejectReason, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.framing_errors: dict[str, int] = {}  # by reason (relayd.framing)
        self.last_error: str | None = None  # why the last dial or open failed
        self.reconnects = 0  # dials or opens after the first
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()
        self._stop = asyncio.Event()
        self._drain_timeout = 0.0
        self._close_grace = CLOSE_GRACE
        self._task: asyncio.Task[None] | None = None
        self._last_reject_log = 0.0

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def state(self) -> str:
        return "draining" if self.draining else "listening"

    def snapshot(self) -> dict[str, Any]:
        """The port object of the admin API (relayd(8)): its settings and live counters."""
        return {
            **self.settings.model_dump(),
            "kind": self.kind,
            "state": self.state,
            "last_error": self.last_error if self.state == "connecting" else None,
            "source": self.origin,
            "connections": len(self.connections),
            "messages_received": self.messages_received,
            "bytes_received": self.bytes_received,
        }

    async def start(self) -> None:
        raise NotImplementedError

    def stop(self, drain_timeout: float, *, close_grace: float = CLOSE_GRACE) -> None:
        """Set this source's stop event: drain for up to ``drain_timeout`` seconds.

        Connections still open then are closed, and get ``close_grace`` seconds
        to report it. The first call decides; later ones change nothing.
        """
        if not self._stop.is_set():
            self._drain_timeout = drain_timeout
            self._close_grace = close_grace
            self._stop.set()

    async def wait_closed(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    def refusal(self, peername: object) -> RejectReason | None:
        """Why a new connection from ``peername`` is refused, or None to take it."""
        if self.draining:
            return "draining"
        if self.allow and not _allowed(peername, self.allow):
            return "not_allowed"
        if len(self.connections) >= self.settings.max_connections:
            return "max_connections"
        return None

    def reject(self, reason: RejectReason, peer: str) -> None:
        self.rejected[reason] += 1
        now = time.monotonic()
        if now - self._last_reject_log > 10:
            self._last_reject_log = now
            detail = {
                "max_connections": f"max_connections={self.settings.max_connections}",
                "not_allowed": "not in allow",
            }.get(reason, reason)
            logger.warning("port %d: connection from %s refused (%s)", self.port, peer, detail)

    async def _drain(self) -> None:
        """Give connections the drain timeout to close on their own, then close them."""
        n = len(self.connections)
        if n and self._drain_timeout > 0:
            logger.info(
                "port %d: draining %d connection(s) for up to %g s",
                self.port,
                n,
                self._drain_timeout,
            )
            try:
                async with asyncio.timeout(self._drain_timeout):
                    await self.idle.wait()
            except TimeoutError:
                pass
        if self.connections:
            logger.info("port %d: closing %d connection(s)", self.port, len(self.connections))
            for conn in list(self.connections):
                conn.close()
            try:
                async with asyncio.timeout(self._close_grace):
                    await self.idle.wait()
            except TimeoutError:  # pragma: no cover - connection_lost is always called soon
                logger.warning("port %d: connections did not report closing", self.port)
        logger.info("port %d: closed", self.port)


class Listener(PortSource):
    """One device port that listens: a server, its connections, its stop event."""

    def __init__(
        self,
        settings: PortSettings,
        sock: socket.socket,
        env: ListenerEnv,
        *,
        origin: Origin,
        max_message: int,
    ) -> None:
        super().__init__(settings, env, origin=origin, max_message=max_message)
        self._sock: socket.socket | None = sock
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Serve on the pre-bound socket; returns once connections are being accepted."""
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        sock = self._sock
        self._server = await loop.create_server(
            lambda: DeviceConnection(self), sock=sock, backlog=ACCEPT_BATCH
        )
        # asyncio accepts up to ``backlog`` connections per loop iteration and listens
        # with the same number: keep the batch small, so a connection flood is
        # interleaved with other work, and the kernel's queue of waiting connections long.
        sock.listen(BACKLOG)
        self._sock = None
        self._task = asyncio.create_task(self._run(), name=f"listener-{self.port}")
        logger.info("port %d: listening on %s", self.port, self.settings.host)

    async def wait_closed(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)
        elif self._sock is not None:  # never started
            self._sock.close()
            self._sock = None

    async def _run(self) -> None:
        await self._stop.wait()
        self.draining = True
        assert self._server is not None
        self._server.close()  # stop accepting now
        await self._drain()


class ListenerRegistry:
    """The one map of port to listener."""

    def __init__(
        self,
        hub: Hub,
        *,
        max_message: int,
        on_change: Callable[[], None],
        tls_context: Callable[[int], ssl.SSLContext | None] = lambda port: None,
        handshake_timeout: Callable[[], float] = lambda: 10.0,
        tls_failures: FailureLog | None = None,
    ) -> None:
        self.hub = hub
        self.env = ListenerEnv(
            hub, tls_context, handshake_timeout, tls_failures or FailureLog(), on_change
        )
        self.max_message = max_message
        self._listeners: dict[int, PortSource] = {}
        self._on_change = on_change
        self.closing = False  # set by stop_all: nothing is added any more

    def __contains__(self, port: object) -> bool:
        return port in self._listeners

    def __len__(self) -> int:
        return len(self._listeners)

    def get(self, port: int) -> PortSource:
        try:
            return self._listeners[port]
        except KeyError:
            raise ListenerNotFound(port) from None

    def listeners(self) -> list[PortSource]:
        return [self._listeners[p] for p in sorted(self._listeners)]

    async def add(
        self, settings: PortSettings, *, origin: Origin, sock: socket.socket | None = None
    ) -> PortSource:
        """Bind (unless ``sock`` is given) and start a listener; it accepts when this returns.

        A ``connect`` or ``serial`` source binds nothing: it starts dialling or
        opening in the background and this returns at once (READY does not wait).
        """
        if self.closing:
            if sock is not None:
                sock.close()
            raise Stopping
        if settings.port in self._listeners:
            if sock is not None:
                sock.close()
            raise ListenerExists(settings.port)
        listener: PortSource
        if settings.source_kind != "listen":
            from relayd.sources import make_source  # it builds on this module

            listener = make_source(settings, self.env, origin=origin, max_message=self.max_message)
        else:
            if sock is None:
                sock = bind(settings)
            listener = Listener(
                settings, sock, self.env, origin=origin, max_message=self.max_message
            )
        self._listeners[settings.port] = listener
        try:
            await listener.start()
        except BaseException:
            del self._listeners[settings.port]
            if sock is not None:
                sock.close()
            raise
        self._on_change()
        return listener

    async def remove(self, port: int, *, drain_timeout: float) -> PortSource:
        """Drain and close one listener; the others are not touched."""
        listener = self.get(port)
        listener.stop(drain_timeout)
        self._on_change()
        try:
            await listener.wait_closed()
        finally:
            if self._listeners.get(port) is listener:
                del self._listeners[port]
            self._on_change()
        return listener

    def stop_all(self, drain_timeout: float, *, close_grace: float = CLOSE_GRACE) -> None:
        """Stop accepting on every listener now; nothing is added after this."""
        self.closing = True
        for listener in self._listeners.values():
            listener.stop(drain_timeout, close_grace=close_grace)
        self._on_change()

    async def drain_all(self, drain_timeout: float, *, close_grace: float = CLOSE_GRACE) -> None:
        """Stop every listener at once and wait for all of them."""
        self.stop_all(drain_timeout, close_grace=close_grace)
        listeners = list(self._listeners.values())
        await asyncio.gather(*(listener.wait_closed() for listener in listeners))
        self._listeners.clear()
        self._on_change()

    def configure(self, *, max_message: int) -> None:
        self.max_message = max_message
        for listener in self._listeners.values():
            listener.max_message = max_message

    @property
    def tcp_connections(self) -> int:
        return sum(len(listener.connections) for listener in self._listeners.values())


def _allowed(
    peername: object, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    if not isinstance(peername, tuple) or not peername:
        return False
    try:
        address = ipaddress.ip_address(str(peername[0]).partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
