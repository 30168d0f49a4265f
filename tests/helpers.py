"""What the tests share: loopback sockets, relayd's config and state files, the daemon
starters (in-process and subprocess), a raw WebSocket client, and bounded waits.

Every start and stop of an in-process relayd goes through ``run_daemon`` and
``Daemon.stop()``; tests reach the daemon's objects only through ``Daemon.runtime``.
Fixtures live in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import httpx
from websockets.asyncio.client import ClientConnection

from relayd import daemon
from relayd.config import PortSettings, Settings
from relayd.errors import ListenerNotFound

# Every wait in the tests is bounded by k * MS; slow machines raise the scale.
MS = float(os.environ.get("RELAYD_TEST_TIMEOUT_SCALE", "1")) / 1000

# `make test` runs the property tests with a quarter of their examples (at least 10);
# RELAYD_TEST_THOROUGH=1 (`make test-thorough`) runs all of them.
THOROUGH = os.environ.get("RELAYD_TEST_THOROUGH", "") not in ("", "0")


def examples(n: int) -> int:
    """Hypothesis ``max_examples`` for a property test that runs ``n`` when thorough."""
    return n if THOROUGH else max(10, n // 4)


T = TypeVar("T")

# --- loopback ports ---------------------------------------------------------------


# Test ports come from below the kernel's range for outgoing connections (32768 and
# up on Linux), each xdist worker from its own slice, without repeats until the
# slice wraps. A port the kernel hands out (bind to 0) can be taken by any outgoing
# connection between the test's check and the daemon's bind; the suite opens thousands.
PORT_BASE, PORT_SLICE, PORT_SLICES = 12000, 2500, 8


@functools.cache
def _port_candidates() -> Iterator[int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = PORT_BASE + (int(worker) if worker.isdigit() else 0) % PORT_SLICES * PORT_SLICE
    return itertools.cycle(range(first, first + PORT_SLICE))


def free_port() -> int:
    """A loopback port that is free now and that no other test of this run is handed
    (the config format forbids port 0)."""
    for port in itertools.islice(_port_candidates(), PORT_SLICE):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free test port in a slice of {PORT_SLICE} from {PORT_BASE}")


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    """A loopback port somebody else listens on, for as long as the block runs."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


async def with_fresh_ports(start: Callable[[], Awaitable[T | None]], attempts: int = 3) -> T:
    """``start()`` on fresh ports; it returns None when a port was taken meanwhile."""
    for _ in range(attempts):
        started = await start()
        if started is not None:
            return started
    raise AssertionError("relayd could not bind fresh ports")


async def accepts(port: int, d: Daemon | None = None) -> bool:
    """Whether ``port`` on 127.0.0.1 takes a connection.

    With ``d``, a connection to one of its listeners is followed until relayd
    handled it: on Python 3.11 a connection still being accepted when the
    listener closes trips an assertion inside asyncio (``Server._attach``).
    """
    loop = asyncio.get_running_loop()
    with socket.socket() as device:
        device.setblocking(False)
        try:
            async with asyncio.timeout(5_000 * MS):
                await loop.sock_connect(device, ("127.0.0.1", port))
        except ConnectionRefusedError:
            return False
        if d is None:
            return True
        try:
            listener = d.runtime.registry.get(port)
        except ListenerNotFound:
            return True  # someone listens, but not relayd: the caller's assertion fails
        before = listener.bytes_received
        await loop.sock_sendall(device, b"\n")
    await wait_until(lambda: listener.bytes_received > before)
    return True


async def send_device(port: int, *chunks: bytes, close: bool = True) -> socket.socket:
    """Connect to a listener, send ``chunks`` as separate writes, optionally close."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    for chunk in chunks:
        await loop.sock_sendall(sock, chunk)
    if close:
        sock.close()
    return sock


async def device(port: int) -> socket.socket:
    """A connected device socket that sends each write at once (TCP_NODELAY)."""
    sock = await send_device(port, close=False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# --- waiting ----------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], timeout: float = 5_000 * MS) -> None:
    """Poll a condition that has no event of its own, bounded by ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


async def wait_status(admin: httpx.AsyncClient, key: str, value: object) -> None:
    """Poll GET /v1/status (a subprocess daemon has no event to wait on) until key == value."""
    async with asyncio.timeout(10_000 * MS):
        while True:
            if (await admin.get("/v1/status")).json()[key] == value:
                return
            await asyncio.sleep(0.01)


async def recv(ws: ClientConnection, n: int = 1, timeout: float = 10_000 * MS) -> list[Any]:
    """The next ``n`` messages of a WebSocket client."""
    out = []
    async with asyncio.timeout(timeout):
        for _ in range(n):
            out.append(await ws.recv())
    return out


# --- relayd's files ---------------------------------------------------------------


def config_text(
    http_port: int,
    ports: list[int],
    *,
    extra: str = "",
    port_extra: str = "",
    drain: float = 2.0,
    http_extra: str = "",
) -> str:
    text = f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n{http_extra}\n'
    text += f"[drain]\ntimeout = {drain}\n\n{extra}\n"
    for port in ports:
        text += f'[[ports]]\nport = {port}\nhost = "127.0.0.1"\nname = "dev-{port}"\n{port_extra}\n'
    return text


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def config_port(port: int, **shown: object) -> dict[str, object]:
    """``GET /v1/ports/{port}`` for an idle port of ``config_text``'s.

    Its settings are the config model's defaults: the port object is the port's
    settings plus its state and counters (relayd(8), ADMIN API).
    """
    settings = PortSettings(port=port, host="127.0.0.1", name=f"dev-{port}").model_dump()
    return (
        settings
        | {
            "kind": "listen",
            "state": "listening",
            "last_error": None,
            "source": "config",
            "connections": 0,
            "messages_received": 0,
            "bytes_received": 0,
        }
        | shown
    )


def state_file(state_dir: Path) -> dict[str, Any]:
    """The daemon's ``ports.json`` as written (see relayd(8), FILES)."""
    return json.loads((state_dir / "ports.json").read_text())  # type: ignore[no-any-return]


def admin_client(path: Path) -> httpx.AsyncClient:
    """An HTTP client for the admin API on the Unix socket at ``path``.

    Plain HTTP only: ``verify=False`` spares loading the CA bundle for each client.
    The first admin request to a daemon builds its admin API (relayd.app.LazyAdmin):
    seconds on a loaded machine, hence the timeout.
    """
    transport = httpx.AsyncHTTPTransport(uds=str(path), verify=False)
    return httpx.AsyncClient(transport=transport, base_url="http://relayd", timeout=10_000 * MS)


# --- a WebSocket client that does only what a test tells it ---------------------

WS_HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: relayd\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class RawWebSocket:
    """A client that completes the handshake and then only reads: it never answers pings
    and, unless ``frame()`` is awaited, never reads at all."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int | None = None) -> RawWebSocket:
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except OSError:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(WS_HANDSHAKE)
        async with asyncio.timeout(5_000 * MS):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def frame(self) -> tuple[int, bytes]:
        """The next frame's opcode and payload (relayd never fragments nor masks)."""
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return b0 & 0x0F, await self.reader.readexactly(n)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


# --- systemd's notify socket --------------------------------------------------------


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def receive(self) -> str:
        loop = asyncio.get_running_loop()
        data = await loop.sock_recv(self.sock, 4096)
        message = data.decode()
        self.messages.append(message)
        return message

    async def wait_for(self, prefix: str, timeout: float = 10_000 * MS) -> str:
        """The next message with a line starting with ``prefix``."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.receive()
                if any(line.startswith(prefix) for line in message.splitlines()):
                    return message

    @contextlib.asynccontextmanager
    async def drained(self) -> AsyncIterator[None]:
        """Read every message, as systemd would, while the block runs."""

        async def read_forever() -> None:
            while True:
                await self.receive()

        reader = asyncio.create_task(read_forever())
        try:
            yield
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    def close(self) -> None:
        self.sock.close()


# --- relayd in this process -------------------------------------------------------


class Endpoints:
    """Where a relayd on 127.0.0.1 answers."""

    http_port: int
    admin_socket: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}/ws"

    def admin(self) -> httpx.AsyncClient:
        return admin_client(self.admin_socket)


@dataclass
class Daemon(Endpoints):
    """A relayd running in this test's event loop."""

    config: Path
    http_port: int
    ports: list[int]
    admin_socket: Path
    state_dir: Path
    notify: NotifySocket
    task: asyncio.Task[int] | None = None
    runtime: Any = None  # the daemon's Runtime: its registry, hub and phase
    stop_event: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def state(self) -> dict[str, Any]:
        return state_file(self.state_dir)

    async def stop(self) -> int:
        """Stop as SIGTERM would (drain, close clients with 1001); the exit code.

        The daemon's injected shutdown trigger does what the signal handler does.
        """
        assert self.task is not None
        self.stop_event.set()
        async with asyncio.timeout(15_000 * MS):
            return await self.task


@contextlib.asynccontextmanager
async def run_daemon(
    tmp_path: Path,
    notify: NotifySocket,
    *,
    nports: int = 2,
    extra: str = "",
    port_extra: str = "",
    admin_token: str | None = None,
    ports: list[int] | None = None,
    drain: float = 2.0,
    http_extra: str = "",
) -> AsyncIterator[Daemon]:
    """Start relayd in-process on fresh loopback ports; yield once READY=1 arrived.

    ``ports``: use these listener ports (to restart a daemon on the same ones).
    """

    async def start() -> Daemon | None:
        http_port = free_port()
        listen = ports or [free_port() for _ in range(nports)]
        cfg = write_config(
            tmp_path / "relayd.toml",
            config_text(
                http_port,
                listen,
                extra=extra,
                port_extra=port_extra,
                drain=drain,
                http_extra=http_extra,
            ),
        )
        d = Daemon(
            config=cfg,
            http_port=http_port,
            ports=listen,
            admin_socket=tmp_path / "admin.sock",
            state_dir=tmp_path / "state",
            notify=notify,
        )
        captured: list[Any] = []
        d.task = task = asyncio.create_task(
            daemon.serve(
                Settings.load(cfg, admin_socket=str(d.admin_socket)),
                load_settings=lambda: Settings.load(cfg, admin_socket=str(d.admin_socket)),
                state_dir=d.state_dir,
                admin_token=admin_token,
                shutdown_trigger=d.stop_event.wait,
                on_runtime=captured.append,
            )
        )
        ready = asyncio.create_task(notify.wait_for("READY=1"))
        done, _ = await asyncio.wait(
            {task, ready}, timeout=10_000 * MS, return_when=asyncio.FIRST_COMPLETED
        )
        if ready in done:
            d.runtime = captured[-1]
            return d
        ready.cancel()
        if task in done:
            return None  # a port was taken in the meantime: try fresh ones
        raise AssertionError("relayd did not become ready")

    d = await with_fresh_ports(start)
    try:
        yield d
    finally:
        assert d.task is not None
        if not d.task.done():
            await d.stop()


# --- relayd as a subprocess ------------------------------------------------------


def relayd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "relayd", *args]


def log_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # handed to the subprocess; the caller closes it


@dataclass
class DaemonProcess(Endpoints):
    """A relayd subprocess; its stdout and stderr go to ``log``."""

    proc: asyncio.subprocess.Process
    http_port: int
    ports: list[int]
    config: Path
    admin_socket: Path
    notify: NotifySocket
    log: Path

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 15_000 * MS) -> int:
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


async def start_process(
    tmp_path: Path,
    config: Path,
    notify: NotifySocket,
    *,
    http_port: int,
    ports: list[int],
    env: dict[str, str] | None = None,
    log: Path | None = None,
    wait_ready: bool = True,
) -> DaemonProcess | None:
    """``python -m relayd`` with ``config``; None if it exited because a port was taken.

    The admin socket and the state directory are ``tmp_path``'s, so a restart finds
    what the previous run left.
    """
    log = log or tmp_path / "relayd.log"
    admin = tmp_path / "admin.sock"
    out = log_file(log)
    try:
        proc = await asyncio.create_subprocess_exec(
            *relayd_command(
                "--config",
                str(config),
                "--admin-socket",
                str(admin),
                "--state-dir",
                str(tmp_path / "state"),
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": str(notify.path), **(env or {})},
        )
    finally:
        out.close()
    d = DaemonProcess(proc, http_port, ports, config, admin, notify, log)
    if not wait_ready:
        return d
    ready = asyncio.create_task(notify.wait_for("READY=1", timeout=15_000 * MS))
    exited = asyncio.create_task(proc.wait())
    await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and not ready.exception():
        exited.cancel()
        return d
    ready.cancel()
    if exited.done() and "cannot listen" in d.output():
        return None  # a port was taken in the meantime
    exited.cancel()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    raise AssertionError(f"relayd did not become ready:\n{d.output()}")


@contextlib.asynccontextmanager
async def spawn_daemon(
    tmp_path: Path,
    notify: NotifySocket,
    *,
    nports: int = 2,
    extra: str = "",
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    drain: float = 2.0,
) -> AsyncIterator[DaemonProcess]:
    """Start relayd as a subprocess on fresh ports; yield once READY=1 arrived."""

    async def start() -> DaemonProcess | None:
        http_port = free_port()
        ports = [free_port() for _ in range(nports)]
        cfg = write_config(
            tmp_path / "relayd.toml", config_text(http_port, ports, extra=extra, drain=drain)
        )
        return await start_process(
            tmp_path, cfg, notify, http_port=http_port, ports=ports, env=env, wait_ready=wait_ready
        )

    d = await with_fresh_ports(start)
    try:
        yield d
    finally:
        if d.proc.returncode is None:
            d.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await d.proc.wait()
            except TimeoutError:
                d.proc.kill()
                await d.proc.wait()
