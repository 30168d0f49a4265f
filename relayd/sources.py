"""Sources that are not listeners: relayd dials the device, or opens a serial line.

Both keep trying on their own (relayd.toml(5), SOURCES): a device that is away
is state ``connecting`` with ``last_error`` saying why, never a start failure,
and READY does not wait for it. Between attempts the wait doubles from 0.5 s
to 30 s, each wait stretched by up to a quarter at random (jitter), so
gateways that lost the same device server do not all dial it at once. The
wait starts over at 0.5 s once a connection was made.

The connection itself is a ``DeviceConnection``, as for a listener's devices:
framing, counting, history, downlink and the drain are the same.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from relayd.config import PortSettings, parse_host_port
from relayd.listeners import (
    DeviceConnection,
    ListenerEnv,
    Origin,
    PortSource,
    SourceKind,
)

if TYPE_CHECKING:
    import serial

logger = logging.getLogger(__name__)

T = TypeVar("T")

READ_SIZE = 65536  # bytes asked of a serial line per read


class Backoff:
    """Waits between attempts: ``start`` doubling to ``cap``, plus up to 25 % jitter."""

    def __init__(self, start: float, cap: float) -> None:
        self.start = start
        self.cap = cap
        self.delay = start

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, self.cap)
        return delay * random.uniform(1.0, 1.25)  # noqa: S311 - not for secrets

    def reset(self) -> None:
        self.delay = self.start


class RetryingSource(PortSource):
    """A source that makes its own connection and makes it again when it ends."""

    BACKOFF_START = 0.5  # seconds (class attributes: tests shorten them)
    BACKOFF_CAP = 30.0
    ATTEMPT_TIMEOUT = 10.0  # seconds one dial may take

    def __init__(
        self, settings: PortSettings, env: ListenerEnv, *, origin: Origin, max_message: int
    ) -> None:
        super().__init__(settings, env, origin=origin, max_message=max_message)
        self.attempts = 0

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        return "connected" if self.connections else "connecting"

    @property
    def target(self) -> str:
        raise NotImplementedError

    async def start(self) -> None:
        """Start trying in the background; returns at once."""
        self._task = asyncio.create_task(self._run(), name=f"{self.kind}-{self.port}")
        logger.info("port %d: %s source for %s", self.port, self.kind, self.target)

    async def _attempt(self) -> None:
        """Make the connection (a ``DeviceConnection`` joins ``connections``); OSError if not."""
        raise NotImplementedError

    async def _until_stopped(self, aw: Awaitable[T], timeout: float | None) -> T | None:
        """``aw``'s result, or None when the stop event came first (``aw`` is cancelled)."""
        task = asyncio.ensure_future(aw)
        stop = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait(
                {task, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop.cancel()
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except OSError:  # failed while being cancelled: it does not matter any more
            pass
        else:  # pragma: no cover - finished just as it was cancelled: close what it made
            for conn in list(self.connections):
                conn.close()
        if not done:
            raise TimeoutError
        return None

    async def _run(self) -> None:
        backoff = Backoff(self.BACKOFF_START, self.BACKOFF_CAP)
        while not self._stop.is_set():
            self.attempts += 1
            if self.attempts > 1:
                self.reconnects += 1
            try:
                await self._until_stopped(self._attempt(), self.ATTEMPT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                self._failed(self.describe(exc))
            else:
                if self.connections:
                    backoff.reset()
                    self.last_error = None
                    self.env.on_change()
                    await self._until_stopped(self.idle.wait(), None)
                    if self._stop.is_set():
                        break
                    self.last_error = "the device closed the connection"
                    self.env.on_change()
            if self._stop.is_set():
                break
            try:
                await self._until_stopped(asyncio.sleep(backoff.next()), None)
            except TimeoutError:  # pragma: no cover - no timeout given
                pass
        self.draining = True
        self.env.on_change()
        await self._drain()

    def _failed(self, reason: str) -> None:
        if reason != self.last_error:  # one line per new reason, not per attempt
            logger.warning("port %d: cannot reach %s: %s", self.port, self.target, reason)
        self.last_error = reason

    def describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer within {self.ATTEMPT_TIMEOUT:g} s"
        if isinstance(exc, OSError):
            if exc.errno:  # asyncio puts the address in strerror: say what happened
                return os.strerror(exc.errno).lower()
            return str(exc).lower()
        return str(exc)  # pragma: no cover


class ConnectSource(RetryingSource):
    """``connect = "host:port"``: relayd dials the device (a serial device server)."""

    kind: SourceKind = "connect"

    def __init__(
        self, settings: PortSettings, env: ListenerEnv, *, origin: Origin, max_message: int
    ) -> None:
        super().__init__(settings, env, origin=origin, max_message=max_message)
        assert settings.connect is not None
        self.host, self.remote_port = parse_host_port(settings.connect)

    @property
    def target(self) -> str:
        return self.settings.connect or "?"

    async def _attempt(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(
            lambda: DeviceConnection(self), self.host, self.remote_port, happy_eyeballs_delay=0.25
        )

    def describe(self, exc: BaseException) -> str:
        if isinstance(exc, socket.gaierror):
            return f"cannot resolve host {self.host!r} ({exc.strerror})"
        return super().describe(exc)


PARITY = {"none": "N", "even": "E", "odd": "O"}  # pyserial's names


class SerialSource(RetryingSource):
    """``serial = "/dev/ttyUSB0"``: a serial line, reopened after it vanishes."""

    kind: SourceKind = "serial"

    @property
    def target(self) -> str:
        return self.settings.serial or "?"

    async def _attempt(self) -> None:
        import serial  # pyserial only when a serial source is configured

        settings = self.settings
        line = serial.Serial()  # configured first, then opened: O_NONBLOCK, termios set
        line.port = settings.serial
        line.baudrate = settings.baudrate or 9600
        line.bytesize = settings.bytesize or 8
        line.parity = PARITY[settings.parity or "none"]
        line.stopbits = settings.stopbits or 1
        line.timeout = 0
        line.write_timeout = 0
        line.exclusive = True  # one reader: a second relayd (or a getty) is an error, not a race
        line.open()
        try:
            os.set_blocking(line.fileno(), False)
            SerialTransport(asyncio.get_running_loop(), line, DeviceConnection(self))
        except BaseException:
            line.close()
            raise


class SerialTransport(asyncio.Transport):
    """A serial line's fd as a transport, read and written by the event loop itself.

    A read error (the adapter was unplugged: EIO) or end of file ends the
    connection; ``close`` drops data not yet written.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, line: serial.Serial, protocol: asyncio.Protocol
    ) -> None:
        super().__init__(extra={"peername": line.port})
        self._loop = loop
        self._line = line
        self._fd: int = line.fileno()
        self._protocol = protocol
        self._buffer = bytearray()
        self._closing = False
        self._closed = False
        self._reading = True
        protocol.connection_made(self)
        if not self._closing:
            loop.add_reader(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        if not data:
            self._fatal(None)
            return
        self._protocol.data_received(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._buffer:
            try:
                n = os.write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if n == len(data):
                return
            data = memoryview(data)[n:]
            self._loop.add_writer(self._fd, self._write_ready)
        self._buffer += data

    def _write_ready(self) -> None:
        try:
            n = os.write(self._fd, self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        del self._buffer[:n]
        if not self._buffer:
            self._loop.remove_writer(self._fd)

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        if self._reading and not self._closing:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def close(self) -> None:
        self._fatal(None)

    def abort(self) -> None:
        self._fatal(None)

    def _fatal(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._buffer.clear()
        self._loop.call_soon(self._finish, exc)

    def _finish(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._line.close()


def make_source(
    settings: PortSettings, env: ListenerEnv, *, origin: Origin, max_message: int
) -> PortSource:
    """The source for a ``[[ports]]`` entry that does not listen."""
    if settings.source_kind == "connect":
        return ConnectSource(settings, env, origin=origin, max_message=max_message)
    if settings.source_kind == "serial":
        return SerialSource(settings, env, origin=origin, max_message=max_message)
    raise ValueError(f"port {settings.port}: no source for kind {settings.source_kind}")
